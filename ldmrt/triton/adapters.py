"""The LoRA adapters a pipeline model may load, and a request's choice among them.

`ldmrt triton --lora NAME=FILE[:SCALE]` (the library's `PipelineModelOptions.loras`, a tuple of
`NamedAdapter`) copies each file to `<pipeline>/1/loras/NAME.safetensors` and lists them in
config.pbtxt's parameter `loras`: JSON {NAME: {"file", "scale", "sha256"}}, `scale` the default.
A request's `lora` input (BYTES [K]) holds "NAME" or "NAME:SCALE" per element; absent or empty:
the base weights. Torch-free; vendored with the runtime (model.py reads requests by it).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ldmrt.errors import BundleError, LoraError
from ldmrt.lora.choice import LoraChoice
from ldmrt.manifest_reader import Reader, join_path
from ldmrt.triton.pipeline_io import ADAPTERS

ADAPTER_DIR = "loras"          # <pipeline>/1/loras/NAME.safetensors
PARAMETER = "loras"            # config.pbtxt parameter: the adapters, as JSON
SUFFIX = ".safetensors"
# A name is a file name and a request's token: no ':' (the scale follows it), no leading '.' or '-'
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
NAME_RULE = "1 to 64 letters, digits, '_', '.' or '-', not starting with '.' or '-'"


@dataclass(frozen=True)
class NamedAdapter:
    """One adapter the pipeline model may load: a request selects it by `name`; `scale` is its
    default (a request may give another)."""
    name: str
    path: Path
    scale: float = 1.0

    def __post_init__(self) -> None:
        choice = _checked(self.name, self.path, self.scale, "loras")
        object.__setattr__(self, "path", choice.path)
        object.__setattr__(self, "scale", choice.scale)

    @classmethod
    def parse(cls, text: str, field_name: str = "loras") -> "NamedAdapter":
        """`NAME=FILE` or `NAME=FILE:SCALE` (as `ldmrt triton --lora` takes it)."""
        name, sep, rest = str(text).partition("=")
        if not sep or not rest:
            raise LoraError(f"{field_name} {text!r}: expected NAME=FILE[:SCALE], e.g. "
                            f"style=style.safetensors:0.8", field=field_name)
        choice = LoraChoice.parse(rest, field_name)
        _checked(name, choice.path, choice.scale, field_name)
        return cls(name, choice.path, choice.scale)

    @property
    def file(self) -> str:
        """Its file name in the pipeline model's ADAPTER_DIR."""
        return f"{self.name}{SUFFIX}"


def _checked(name: Any, path: Any, scale: Any, field_name: str) -> LoraChoice:
    if not isinstance(name, str) or not NAME.match(name):
        raise LoraError(f"{field_name} name {name!r}: expected {NAME_RULE}", field=field_name)
    return LoraChoice.of(path, scale, field_name)


def adapter_tuple(adapters: Sequence[NamedAdapter], field_name: str = "loras") -> tuple[NamedAdapter, ...]:
    """`adapters` as a tuple of NamedAdapters with unique names; LoraError naming `field_name`."""
    if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence):
        raise LoraError(f"{field_name}: expected a tuple of NamedAdapter, found {type(adapters).__name__}",
                        field=field_name)
    seen: set[str] = set()
    for adapter in adapters:
        if not isinstance(adapter, NamedAdapter):
            raise LoraError(f"{field_name}: expected NamedAdapter items, found {type(adapter).__name__}",
                            field=field_name)
        if adapter.name in seen:
            raise LoraError(f"{field_name} name {adapter.name!r}: given twice; expected each name once",
                            field=field_name)
        seen.add(adapter.name)
    return tuple(adapters)


def check_adapter_files(adapters: Sequence[NamedAdapter], field_name: str = "loras") -> None:
    """Each file a LoRA file ldmrt reads (LoraError naming `field_name` and the file otherwise).
    Whether it fits the model is checked where it is applied, on the request that selects it."""
    from ldmrt.lora.reading import read_lora

    for adapter in adapters:
        read_lora(adapter.path, field_name=field_name)


# --- config.pbtxt's record ------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterEntry:
    """One adapter as the parameter `loras` lists it."""
    file: str        # in ADAPTER_DIR
    scale: float     # the default scale
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "scale": self.scale, "sha256": self.sha256}


def adapters_parameter(adapters: Sequence[NamedAdapter]) -> str:
    """The parameter `loras`: {NAME: AdapterEntry} as JSON ("{}" without adapters)."""
    from ldmrt.digest import sha256_file

    return json.dumps({a.name: AdapterEntry(a.file, a.scale, sha256_file(a.path)).to_dict() for a in adapters},
                      sort_keys=True)


def parse_adapters(text: str, origin: str) -> dict[str, AdapterEntry]:
    """The parameter `loras` as written by adapters_parameter; BundleError naming the field."""
    reader = Reader(origin, f"config.pbtxt parameter {PARAMETER}", kind="Triton model",
                    remedy="write the repository again with ldmrt triton --lora NAME=FILE[:SCALE]")
    data = reader.parse_json((text or "{}").encode("utf-8"))
    reader.json_value(data, "<root>")
    entries = {}
    for name, entry in reader.mapping(data, "<root>").items():
        at = join_path("<root>", name)
        reader.string(name, at, NAME, f"an adapter name of {NAME_RULE}")
        reader.record(entry, at, ("file", "scale", "sha256"))
        entries[name] = AdapterEntry(reader.file_name(entry["file"], join_path(at, "file")),
                                     reader.number(entry["scale"], join_path(at, "scale"), signed=True),
                                     reader.sha256(entry["sha256"], join_path(at, "sha256")))
    return entries


def served_adapters(entries: Mapping[str, AdapterEntry], version_dir: Path, verify: bool) -> dict[str, LoraChoice]:
    """name -> its file in `version_dir`/ADAPTER_DIR at its default scale; BundleError naming a
    file that is missing (or, with verify, whose sha256 is not the recorded one)."""
    from ldmrt.digest import sha256_file

    served = {}
    for name, entry in entries.items():
        path = version_dir / ADAPTER_DIR / entry.file
        if not path.is_file():
            raise BundleError(f"Triton model {version_dir}: adapter {name!r}: {path} is missing; the "
                              f"repository must hold the files its parameter {PARAMETER} lists (write it "
                              f"again with ldmrt triton --lora)")
        if verify and sha256_file(path) != entry.sha256:
            raise BundleError(f"Triton model {version_dir}: adapter {name!r}: {path} does not match the "
                              f"sha256 in parameter {PARAMETER} (changed since ldmrt triton wrote it); "
                              f"write the repository again")
        served[name] = LoraChoice(path, entry.scale)
    return served


# --- a request's choice -------------------------------------------------------------------------------

def requested_adapters(elements: Iterable[str], served: Mapping[str, LoraChoice],
                       field_name: str = ADAPTERS.name) -> tuple[LoraChoice, ...]:
    """The request's `lora` elements ("NAME" or "NAME:SCALE") as the adapters to run on, in the
    order of their names (so one set is one set of weights whatever the order sent); LoraError
    naming `field_name` and the allowed names for an unknown or repeated name or a bad scale."""
    allowed = (f"this model may load {sorted(served)}" if served else
               "this model has no adapters (its repository was written without ldmrt triton --lora)")
    chosen: dict[str, LoraChoice] = {}
    for index, element in enumerate(elements):
        text = element.strip()
        name, sep, scale_text = text.partition(":")       # names hold no ':'
        where = f"{field_name} element {index} {text!r}"
        if name not in served:
            raise LoraError(f"{where}: unknown adapter {name!r}; {allowed}", field=field_name)
        if name in chosen:
            raise LoraError(f"{where}: adapter {name!r} given twice; expected each name once ({allowed})",
                            field=field_name)
        scale = served[name].scale
        if sep:
            try:
                scale = float(scale_text)
            except ValueError:
                scale = math.nan
            if not math.isfinite(scale):
                raise LoraError(f"{where}: scale {scale_text!r}: expected a finite number, as NAME:SCALE "
                                f"(e.g. {name}:0.5); {allowed}", field=field_name)
        chosen[name] = LoraChoice(served[name].path, scale)
    return tuple(chosen[name] for name in sorted(chosen))
