"""Where a bundle's weights came from, as data: the `model_source` record of manifest.json.

The torch backend rebuilds the model from it and refuses weights whose digest differs
(ldmrt.checkpoints.source), so it runs exactly what the graphs were exported from. Torch-free;
the record is untrusted input like the rest of the manifest (parse_source checks every field).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from ldmrt.manifest_reader import Reader, join_path

_SOURCE_KEYS = ("kind", "location", "seed", "preset", "yaml", "tokenizer", "strict", "weights_sha256")
_PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

SOURCE_KINDS = ("preset", "checkpoint")


@dataclass(frozen=True)
class SourceRecord:
    """Where a bundle's weights came from and how they were loaded: what the torch backend rebuilds.

    `weights_sha256` is the digest of the weights as exported (ldmrt.checkpoints.source
    .weights_digest); the torch backend refuses a rebuild whose digest differs. None only before
    export fills it in; a manifest always has it.
    """
    kind: str                          # "preset" (random weights from `seed`) or "checkpoint"
    location: str                      # the preset's name, or the checkpoint's absolute path
    weights_sha256: str | None = None
    seed: int | None = None            # preset: the seed of its random weights
    preset: str | None = None          # checkpoint: the preset it follows (--preset)
    yaml: str | None = None            # checkpoint: its inference YAML, absolute (--yaml)
    tokenizer: str | None = None       # checkpoint: its tokenizer folder, absolute (--tokenizer)
    strict: bool = True                # checkpoint: False = loaded with --no-strict
    ema: bool | None = None            # checkpoint: --ema (True) / --no-ema (False) / neither (None)
    # LoRA adapters fused at export (--lora), in order: (absolute path, sha256 of the file, scale)
    loras: tuple[tuple[str, str, float], ...] = ()

    def describe(self) -> str:
        """'preset 'tiny' (seed 5)' or 'checkpoint /x.safetensors (preset 'tiny', ...)', for messages."""
        if self.kind == "preset":
            fused = "".join(f" + LoRA {path} x {scale:g}" for path, _, scale in self.loras)
            return f"preset {self.location!r} (seed {self.seed})" + fused
        options = [f"preset {self.preset!r}" if self.preset else "", f"yaml {self.yaml}" if self.yaml else "",
                   f"tokenizer {self.tokenizer}" if self.tokenizer else "", "" if self.strict else "no-strict",
                   {True: "ema", False: "no-ema", None: ""}[self.ema]]
        shown = ", ".join(o for o in options if o)
        fused = "".join(f" + LoRA {path} x {scale:g}" for path, _, scale in self.loras)
        return f"checkpoint {self.location}" + (f" ({shown})" if shown else "") + fused

    def to_dict(self) -> dict[str, Any]:
        data = {"kind": self.kind, "location": self.location, "seed": self.seed, "preset": self.preset,
                "yaml": self.yaml, "tokenizer": self.tokenizer, "strict": self.strict,
                "weights_sha256": self.weights_sha256}
        if self.ema is not None:                         # absent: neither option given
            data["ema"] = self.ema
        if self.loras:                                   # absent: none fused
            data["loras"] = [{"path": p, "sha256": d, "scale": s} for p, d, s in self.loras]
        return data

    @classmethod
    def from_dict(cls, data: Any, origin: str = "<in memory>") -> "SourceRecord":
        return parse_source(Reader(origin), data, "model_source")


def parse_source(reader: Reader, data: Any, where: str) -> SourceRecord:
    """The model source: a preset (name, seed) or a checkpoint (absolute paths, loading options)."""
    reader.json_value(data, where)
    reader.record(data, where, _SOURCE_KEYS, optional=("ema", "loras"))      # written since issues 19, 20
    kind = reader.choice(data["kind"], join_path(where, "kind"), SOURCE_KINDS)
    digest = reader.sha256(data["weights_sha256"], join_path(where, "weights_sha256"))
    strict = reader.boolean(data["strict"], join_path(where, "strict"))
    ema = data.get("ema")
    if ema is not None:
        ema = reader.boolean(ema, join_path(where, "ema"))

    def absent(key: str) -> None:
        if data[key] is not None:
            reader.fail(join_path(where, key), f"null (a {kind} source has no {key})", data[key])

    def path(key: str, required: bool = False) -> str | None:
        value = data[key]
        if value is None and not required:
            return None
        return _absolute(reader, value, join_path(where, key))

    loras = _loras(reader, data.get("loras", []), join_path(where, "loras"))
    if kind == "preset":
        location = reader.string(data["location"], join_path(where, "location"), _PRESET_NAME,
                                 "a preset name such as 'tiny'")
        seed = reader.integer(data["seed"], join_path(where, "seed"))
        for key in ("preset", "yaml", "tokenizer"):
            absent(key)
        if not strict:
            reader.fail(join_path(where, "strict"), "true (a preset is built, not loaded)", strict)
        if ema is not None:
            reader.fail(join_path(where, "ema"), "null (a preset is built, not loaded)", ema)
        return SourceRecord(kind=kind, location=location, weights_sha256=digest, seed=seed, loras=loras)
    location = path("location", required=True)
    absent("seed")
    preset = None if data["preset"] is None else reader.string(
        data["preset"], join_path(where, "preset"), _PRESET_NAME, "null or a preset name such as 'sd15'")
    yaml = path("yaml")
    if preset is not None and yaml is not None:
        reader.fail(join_path(where, "yaml"), "null when a preset is given (one or the other)", yaml)
    return SourceRecord(kind=kind, location=location, weights_sha256=digest, preset=preset, yaml=yaml,
                        tokenizer=path("tokenizer"), strict=strict, ema=ema, loras=loras)


def _loras(reader: Reader, value: Any, where: str) -> tuple[tuple[str, str, float], ...]:
    """model_source.loras: [{path (absolute), sha256, scale (any sign: a negative scale removes a style)}, ...]."""
    entries = []
    for i, entry in enumerate(reader.sequence(value, where)):
        at = f"{where}[{i}]"
        reader.record(entry, at, ("path", "sha256", "scale"))
        entries.append((_absolute(reader, entry["path"], join_path(at, "path")), reader.sha256(entry["sha256"], join_path(at, "sha256")),
                        reader.number(entry["scale"], join_path(at, "scale"), signed=True)))
    return tuple(entries)


def _absolute(reader: Reader, value: Any, where: str) -> str:
    text = reader.string(value, where)
    if not os.path.isabs(text) or any(ord(c) < 32 or ord(c) == 127 for c in text):
        reader.fail(where, "an absolute path", value)
    return text
