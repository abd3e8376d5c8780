"""Engine records: what a TensorRT / TensorRT-RTX plan was built from and for, as data.

One format in two places: next to the plan as engines/<key>/<component>.engine.json (written
last, so a record means a whole plan) and in manifest.json's `engines` list, oldest first (the
builder appends). A record is untrusted input like the rest of the manifest: `parse_engine_record`
checks every field, and a failure names the file and the field. Here too are the one selection
of a bundle's records (`engines_for`) and the one check of a plan file against its record
(`check_plan`). Whether this machine may run an engine (builder, version, GPU) is the runtime's
question: ldmrt.engines.tensorrt.check_engine_record. Standard library only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from ldmrt.digest import sha256_file
from ldmrt.errors import CorruptEngineError
from ldmrt.manifest_reader import COMPONENT_NAME, TENSOR_NAME, VERSION, Reader, join_path

RECORD_SUFFIX = ".engine.json"       # engines/<key>/<component>.engine.json
ENGINES_DIR = "engines"
MAX_RECORD_BYTES = 1 << 20           # a record is a few kB, even with many profiles
ENGINE_PRECISIONS = ("fp32", "fp16", "bf16")              # the graph's float dtype
TIMING_CACHE_STATES = ("none", "created", "loaded", "ignored")
_TARGET = re.compile(r"^[a-z0-9][a-z0-9+_.-]{0,31}$")     # sm86, default, ampere+
# A backend name (engines.backend.Backend values; the manifest layer sits below engines/):
# a record of a builder this ldmrt does not know parses, and no runtime selects it.
_BUILDER = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]   # input name -> (min, opt, max)


@dataclass(frozen=True)
class EngineRecord:
    """What an engine was built from and for; stored next to the plan as <component>.engine.json."""
    component: str
    file: str                          # plan file name, relative to the record's folder
    sha256: str                        # of the plan file
    size: int                          # bytes of the plan file
    builder: str                       # tensorrt | tensorrt-rtx
    builder_version: str
    targets: tuple[str, ...]           # ("sm86", "sm89"), ("default",) for RTX, ("ampere+",)
    precision: str                     # the graph's dtype: fp32 | fp16 | bf16
    profiles: tuple[ProfileShapes, ...]
    onnx_sha256: str
    build_seconds: float
    created: str                       # ISO 8601, UTC
    flags: Mapping[str, Any] = field(default_factory=dict)   # refit, weight_streaming, ...
    key: str = ""                      # the engines/<key>/ folder name
    timing_cache: str = "none"         # none | created | loaded | ignored

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["targets"] = list(self.targets)
        out["profiles"] = [{name: [list(s) for s in shapes] for name, shapes in p.items()}
                           for p in self.profiles]
        out["flags"] = dict(self.flags)
        return out

    @classmethod
    def from_dict(cls, data: Any, origin: str = "<in memory>",
                  document: str = "engine record") -> "EngineRecord":
        """Validate an untrusted record; CorruptEngineError (a BundleError) naming the field."""
        return parse_engine_record(_record_reader(origin, document), data, "<root>")


def _record_reader(folder: str, document: str) -> Reader:
    return Reader(folder, document, kind="engine folder", error=CorruptEngineError,
                  remedy="rebuild the engine")


# Every ldmrt that wrote records wrote every field, so all are required.
_KEYS = tuple(f.name for f in fields(EngineRecord))


def parse_engine_record(reader: Reader, data: Any, where: str) -> EngineRecord:
    """One record, every field checked (a record in a manifest, or a record file)."""
    reader.json_value(data, where)
    reader.record(data, where, _KEYS)

    def at(key: str) -> str:
        return join_path(where, key)

    targets = reader.sequence(data["targets"], at("targets"), minimum=1)
    profiles = reader.sequence(data["profiles"], at("profiles"), minimum=1)
    flags = reader.mapping(data["flags"], at("flags"))
    if "version_compatible" in flags:      # the one flag the runtime reads
        reader.boolean(flags["version_compatible"], join_path(at("flags"), "version_compatible"))
    return EngineRecord(
        component=reader.string(data["component"], at("component"), COMPONENT_NAME,
                                "a component name (lowercase letters, digits and '_')"),
        file=reader.file_name(data["file"], at("file")),
        sha256=reader.sha256(data["sha256"], at("sha256")),
        size=reader.integer(data["size"], at("size"), 1),
        builder=reader.string(data["builder"], at("builder"), _BUILDER,
                              "a builder name such as 'tensorrt' or 'tensorrt-rtx'"),
        builder_version=reader.string(data["builder_version"], at("builder_version"), VERSION,
                                      "a version string such as '10.13.0'"),
        targets=tuple(reader.string(target, join_path(at("targets"), i), _TARGET,
                                    "a GPU target such as 'sm86', 'default' or 'ampere+'")
                      for i, target in enumerate(targets)),
        precision=reader.choice(data["precision"], at("precision"), ENGINE_PRECISIONS),
        profiles=tuple(_parse_profile(reader, profile, join_path(at("profiles"), i))
                       for i, profile in enumerate(profiles)),
        onnx_sha256=reader.sha256(data["onnx_sha256"], at("onnx_sha256")),
        build_seconds=reader.number(data["build_seconds"], at("build_seconds")),
        created=reader.utc_time(data["created"], at("created")),
        flags=dict(flags),
        key=reader.file_name(data["key"], at("key")),
        timing_cache=reader.choice(data["timing_cache"], at("timing_cache"), TIMING_CACHE_STATES))


def _parse_profile(reader: Reader, data: Any, where: str) -> ProfileShapes:
    """input name -> [min, opt, max] shapes of one rank with min <= opt <= max on every axis."""
    profile: ProfileShapes = {}
    for name, triple in reader.mapping(data, where, minimum=1).items():
        reader.string(name, where, TENSOR_NAME, "input tensor names as keys")
        at = join_path(where, name)
        if not isinstance(triple, list) or len(triple) != 3:
            reader.fail(at, "[min, opt, max] shapes", triple)
        low, opt, high = (tuple(reader.integer(dim, join_path(join_path(at, i), axis))
                                for axis, dim in enumerate(reader.sequence(shape, join_path(at, i))))
                          for i, shape in enumerate(triple))
        if not len(low) == len(opt) == len(high) or not all(
                a <= b <= c for a, b, c in zip(low, opt, high)):
            reader.fail(at, "min, opt and max shapes of one rank with min <= opt <= max", triple)
        profile[name] = (low, opt, high)
    return profile


def read_engine_record(path: str | Path) -> EngineRecord:
    """Load <component>.engine.json; CorruptEngineError naming the file when it is missing,
    larger than a record, not JSON, or any field is wrong."""
    path = Path(path)
    reader = _record_reader(str(path.parent), path.name)
    return parse_engine_record(reader, reader.read_file(MAX_RECORD_BYTES), "<root>")


def engines_for(records: Iterable[EngineRecord], component: str | None = None, *,
                builder: str | None = None, key: str | None = None) -> tuple[EngineRecord, ...]:
    """The records of `component` built with `builder` and named `key` (None: any), newest first
    (`records` as a manifest lists them: oldest first)."""
    return tuple(record for record in reversed(tuple(records))
                 if (component is None or record.component == component)
                 and (builder is None or record.builder == builder)
                 and (key is None or record.key == key))


def engine_plan_path(bundle: str | Path, record: EngineRecord) -> Path:
    """BUNDLE/engines/<key>/<file> (a parsed record's key and file are plain names)."""
    return Path(bundle) / ENGINES_DIR / record.key / record.file


def rebuild_command(record: EngineRecord, bundle: str | Path | None) -> str:
    return f"ldmrt build {bundle or 'BUNDLE'} --backend {record.builder}"


def check_plan(record: EngineRecord, plan: str | Path, bundle: str | Path | None = None) -> None:
    """CorruptEngineError naming the plan file unless it has its record's size and sha256 (a plan
    of another size is refused without hashing it)."""
    plan = Path(plan)
    engine, fix = f"{record.component} engine {record.key or record.file}", \
        f"rebuild it: {rebuild_command(record, bundle)}"
    try:
        size = plan.stat().st_size if plan.is_file() else None
    except (OSError, ValueError):
        size = None
    if size is None:
        raise CorruptEngineError(f"{engine}: plan {plan} is missing; {fix}")
    if size != record.size:
        raise CorruptEngineError(f"{engine}: plan {plan} does not match the size in its record: "
                                 f"size {size}, the record says size {record.size}; {fix}")
    found = sha256_file(plan)
    if found != record.sha256:
        raise CorruptEngineError(f"{engine}: plan {plan} does not match the sha256 in its record: "
                                 f"sha256 {found[:12]}…, the record says {record.sha256[:12]}… "
                                 f"(both {size} bytes); {fix}")
