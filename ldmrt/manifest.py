"""The artifact bundle format: manifest.json (versioned JSON) plus the files it lists by sha256.

Part of the lean runtime: standard library, numpy (through iospec) and ldmrt's torch-free
modules only. A manifest is untrusted input: loading checks every field and every failure is
a BundleError naming the bundle, the field, what was expected and what was found.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ldmrt.atomic import atomic_write
from ldmrt.config import Family, ModelConfig
from ldmrt.digest import sha256_file  # noqa: F401 (also ldmrt.manifest.sha256_file, as before)
from ldmrt.engine_record import EngineRecord, parse_engine_record
from ldmrt.errors import BundleError, ConfigError
from ldmrt.iospec import TENSOR_DTYPES, ComponentSpec, Precision, ShapeRanges, component_specs, parse_dim
from ldmrt.manifest_reader import (COMPONENT_NAME, MANIFEST_NAME, MAX_INT, MISSING, TENSOR_NAME, VERSION,
                                   Reader, describe, join_path)
from ldmrt.source_record import SourceRecord, parse_source

SCHEMA_VERSION = 1
LDMRT_VERSION = "0.1.0"  # the package version written into new manifests
TOKENIZER_DIR = "tokenizer"
DEFAULT_POSTPROCESS: Mapping[str, str] = {"images": "clamp(x / 2 + 0.5, 0, 1)"}
TOKENIZER_KINDS = ("clip", "wordpiece")
COMPONENT_DTYPES = ("float32", "float16", "bfloat16")

MAX_MANIFEST_BYTES = 16 * 2**20   # real manifests are a few kB; refuse to parse a huge file
# Shape ranges bound what a default request allocates (the opt size) and what engines are built
# for: 16384 px is 4x the largest image any supported model was trained near; 1024 images per call.
MAX_IMAGE_SIDE = 16384
MAX_BATCH = 1024

_SYMBOL = re.compile(r"^[a-z_]+$")



def utc_now() -> str:
    """The current time as ISO-8601 UTC, to the second: 2024-05-01T12:00:00Z."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return now.isoformat().replace("+00:00", "Z")


# --- the schema as frozen dataclasses ------------------------------------------------------

@dataclass(frozen=True)
class ParityRecord:
    """Export-time agreement of a component with the reference (PyTorch) on fresh inputs."""
    reference: str
    rel_l2: float
    max_abs: float
    tolerance: float
    shapes: Mapping[str, int | tuple[int, ...]]  # input name -> shape (or symbol -> value)

    @property
    def passed(self) -> bool:
        return self.rel_l2 <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "rel_l2": self.rel_l2, "max_abs": self.max_abs,
                "tolerance": self.tolerance,
                "shapes": {k: v if isinstance(v, int) else list(v) for k, v in self.shapes.items()}}


@dataclass(frozen=True)
class ComponentEntry:
    """One exported graph: its file(s) with their sha256, its I/O spec and its parity record."""
    name: str
    file: str                          # "<component>.onnx", a plain name inside the bundle
    external_data: str | None          # "<component>.onnx.data" when the graph exceeds 2 GB
    sha256: Mapping[str, str]          # file name -> hex digest, for file and external_data
    size_bytes: int                    # file + external data
    spec: ComponentSpec
    dtype: str                         # the graph's float dtype (numpy name)
    parity: ParityRecord | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return (self.file,) if self.external_data is None else (self.file, self.external_data)

    @property
    def digest(self) -> str:
        """The graph's identity: what engine records and the ORT cache key it by."""
        return onnx_digest([self.sha256[name] for name in self.files])

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "external_data": self.external_data,
                "sha256": dict(self.sha256), "size_bytes": self.size_bytes,
                "io": self.spec.to_dict(), "dtype": self.dtype,
                "parity": None if self.parity is None else self.parity.to_dict()}

    @classmethod
    def from_dict(cls, name: str, data: Any, origin: str = "<in memory>") -> "ComponentEntry":
        return _parse_component(Reader(origin), name, data, f"components.{name}")

    @classmethod
    def from_files(cls, bundle_dir: str | os.PathLike, spec: ComponentSpec, dtype: str,
                   parity: ParityRecord | None = None) -> "ComponentEntry":
        """The entry for `<spec.name>.onnx` (and `.onnx.data` if present) already in the bundle."""
        bundle = Path(bundle_dir)
        file = f"{spec.name}.onnx"
        external = f"{file}.data" if (bundle / f"{file}.data").is_file() else None
        names = (file,) if external is None else (file, external)
        hashes = {n: sha256_file(bundle / n) for n in names}
        size = sum((bundle / n).stat().st_size for n in names)
        return cls(name=spec.name, file=file, external_data=external, sha256=hashes,
                   size_bytes=size, spec=spec, dtype=dtype, parity=parity)


@dataclass(frozen=True)
class TokenizerEntry:
    """The tokenizer assets under `tokenizer/`: which tokenizer, and each file's sha256."""
    kind: str                          # "clip" (byte-level BPE) or "wordpiece"
    files: Mapping[str, str]           # file name -> hex digest

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "files": dict(self.files)}

    @classmethod
    def from_dict(cls, data: Any, origin: str = "<in memory>") -> "TokenizerEntry":
        return _parse_tokenizer(Reader(origin), data, "tokenizer")

    @classmethod
    def from_folder(cls, bundle_dir: str | os.PathLike, kind: str) -> "TokenizerEntry":
        """The entry for every file already in `<bundle>/tokenizer/`."""
        folder = Path(bundle_dir) / TOKENIZER_DIR
        return cls(kind=kind, files={p.name: sha256_file(p)
                                     for p in sorted(folder.iterdir()) if p.is_file()})


@dataclass(frozen=True)
class Manifest:
    """What `ldmrt export` wrote: the model, its precision and shape ranges, and every file."""
    name: str
    source: str                        # "preset:<name>" or the checkpoint path (for people)
    random_weights: bool
    config: ModelConfig
    precision: Precision
    shape_ranges: ShapeRanges
    components: Mapping[str, ComponentEntry]
    tokenizer: TokenizerEntry | None = None
    engines: tuple[EngineRecord, ...] = ()         # oldest first; select with engines_for
    postprocess: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_POSTPROCESS))
    created: str = field(default_factory=utc_now)
    ldmrt_version: str = LDMRT_VERSION
    model_source: SourceRecord | None = None      # None: a bundle written before the record

    @property
    def family(self) -> Family:
        return self.config.family

    @property
    def latent_scale(self) -> float:
        """latent = latent_scale * first-stage encoding; the runtime divides before decoding."""
        return self.config.scale_factor

    def component(self, name: str) -> ComponentEntry:
        try:
            return self.components[name]
        except (KeyError, TypeError):
            raise BundleError(f"manifest {self.name!r}: no component {name!r}; available: "
                              f"{sorted(self.components)}") from None

    def with_engine(self, record: EngineRecord) -> "Manifest":
        """This manifest with `record` listed last, in place of any record with its key."""
        return replace(self, engines=tuple(r for r in self.engines if r.key != record.key) + (record,))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION, "ldmrt_version": self.ldmrt_version,
            "created": self.created, "name": self.name, "source": self.source,
            "random_weights": self.random_weights, "family": self.family.value,
            "config": self.config.to_dict(), "precision": self.precision.value,
            "latent_scale": self.latent_scale, "postprocess": dict(self.postprocess),
            "shape_ranges": _shape_ranges_dict(self.shape_ranges),
            "components": {name: entry.to_dict() for name, entry in self.components.items()},
            "tokenizer": None if self.tokenizer is None else self.tokenizer.to_dict(),
            "engines": [record.to_dict() for record in self.engines],
            **({} if self.model_source is None else {"model_source": self.model_source.to_dict()}),
        }

    @classmethod
    def from_dict(cls, data: Any, origin: str = "<in memory>") -> "Manifest":
        """Validate untrusted JSON data; BundleError (naming `origin` and the field) if invalid."""
        return _parse_manifest(Reader(origin), data)


# --- files ---------------------------------------------------------------------------------

def load_manifest(bundle_dir: str | os.PathLike) -> Manifest:
    """Read and validate `<bundle_dir>/manifest.json`; BundleError on anything unexpected."""
    bundle = _bundle_path(bundle_dir)
    path = bundle / MANIFEST_NAME
    try:
        if not bundle.is_dir():
            what = "a file" if bundle.exists() else "nothing"
            raise BundleError(f"bundle {bundle}: expected the folder `ldmrt export` writes, found {what}")
        if not path.is_file():
            what = "something that is not a file" if path.exists() else "no such file"
            raise BundleError(f"bundle {bundle}: expected {MANIFEST_NAME}, found {what}; the export "
                              f"did not finish (it writes the manifest last): re-run `ldmrt export`")
        with open(path, "rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise BundleError(f"bundle {bundle}: cannot read {MANIFEST_NAME}: {exc}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"bundle {bundle}: expected {MANIFEST_NAME} of at most "
                          f"{MAX_MANIFEST_BYTES} bytes, found a larger file")
    data = Reader(str(bundle), remedy="the file is corrupt: re-export the bundle").parse_json(raw)
    return Manifest.from_dict(data, origin=str(bundle))


def write_manifest(bundle_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Validate `manifest` and write it atomically (temp file, fsync, rename); returns the path."""
    bundle = _bundle_path(bundle_dir)
    try:
        data = manifest.to_dict()
        Manifest.from_dict(data, origin=str(bundle))
        text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n"
    except BundleError as exc:
        raise BundleError(f"refusing to write an invalid manifest: {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"bundle {bundle}: refusing to write a manifest that cannot be "
                          f"serialised ({type(exc).__name__}: {exc})") from None
    target = bundle / MANIFEST_NAME
    try:
        atomic_write(target, text.encode("utf-8"))
    except OSError as exc:
        raise BundleError(f"bundle {bundle}: cannot write {MANIFEST_NAME}: {exc}") from None
    _fsync_folder(bundle)  # make the rename itself durable
    return target


def onnx_digest(file_digests: Sequence[str]) -> str:
    """A graph's identity from its files' sha256: the graph file's own, or, with external data,
    the sha256 of the files' hex digests in order (graph first)."""
    if len(file_digests) == 1:
        return file_digests[0]
    return hashlib.sha256("".join(file_digests).encode()).hexdigest()


def verify_bundle(bundle_dir: str | os.PathLike, manifest: Manifest,
                  components: Iterable[str] | None = None) -> None:
    """Check that every file of `components` (default: all) and the tokenizer matches its sha256."""
    bundle = _bundle_path(bundle_dir)
    names = list(manifest.components) if components is None else (
        [components] if isinstance(components, str) else list(components))
    reader = Reader(str(bundle))
    for name in names:
        entry = manifest.component(name)
        where = f"components.{name}.sha256"
        for file in entry.sha256:
            reader.file_name(file, where)
        # Missing files and a wrong total size are found before hashing gigabytes.
        sizes = [_file_size(bundle, file, where) for file in entry.sha256]
        if sum(sizes) != entry.size_bytes:
            raise BundleError(f"bundle {bundle}: components.{name}.size_bytes: expected "
                              f"{entry.size_bytes} bytes in {list(entry.sha256)}, found {sum(sizes)}; "
                              f"a file is truncated or was replaced: re-export the bundle")
        for file, expected in entry.sha256.items():
            _verify_file(bundle, file, expected, where)
    if manifest.tokenizer is not None:
        where = "tokenizer.files"
        for file, expected in manifest.tokenizer.files.items():
            reader.file_name(file, where)
            _file_size(bundle, f"{TOKENIZER_DIR}/{file}", where)
            _verify_file(bundle, f"{TOKENIZER_DIR}/{file}", expected, where)


def _bundle_path(bundle_dir: Any) -> Path:
    try:
        path = os.fspath(bundle_dir)
    except TypeError:
        path = None
    if not isinstance(path, str) or "\0" in path:
        raise BundleError(f"bundle: expected a folder path, found {describe(bundle_dir)}")
    return Path(path)


def _inside(bundle: Path, relative: str, where: str) -> Path:
    """The path of a listed file, refused when it (or a link on the way) leads outside the bundle."""
    path = bundle / relative
    try:
        resolved, root = path.resolve(), bundle.resolve()
    except (OSError, RuntimeError):
        raise BundleError(f"bundle {bundle}: file {relative} (listed in {where}) cannot be resolved") from None
    if root != resolved and root not in resolved.parents:
        raise BundleError(f"bundle {bundle}: file {relative} (listed in {where}) leads outside the "
                          f"bundle (to {resolved}); expected a file inside the bundle folder")
    return path


def _file_size(bundle: Path, relative: str, where: str) -> int:
    path = _inside(bundle, relative, where)
    try:
        if path.is_file():
            return path.stat().st_size
    except (OSError, ValueError):
        pass
    raise BundleError(f"bundle {bundle}: file {relative} (listed in {where}) is missing; "
                      f"copy the whole bundle folder or re-export it")


def _verify_file(bundle: Path, relative: str, expected: str, where: str) -> None:
    found = sha256_file(_inside(bundle, relative, where))
    if found != expected:
        raise BundleError(f"bundle {bundle}: file {relative} does not match {where}: expected "
                          f"sha256 {expected}, found {found}; the file is corrupt or was "
                          f"replaced: re-export the bundle")


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. Windows); the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_TOP_KEYS = ("schema_version", "ldmrt_version", "created", "name", "source", "random_weights",
             "family", "config", "precision", "latent_scale", "postprocess", "shape_ranges",
             "components", "tokenizer", "engines")
_OPTIONAL_TOP_KEYS = ("model_source",)       # absent in bundles written before it
_COMPONENT_KEYS = ("file", "external_data", "sha256", "size_bytes", "io", "dtype", "parity")
_PARITY_KEYS = ("reference", "rel_l2", "max_abs", "tolerance", "shapes")
_SHAPE_RANGE_KEYS = ("min_size", "opt_size", "max_size", "max_batch", "opt_batch")


def _parse_manifest(reader: Reader, data: Any) -> Manifest:
    reader.json_value(data, "<root>")
    if not isinstance(data, dict):
        reader.fail("<root>", "an object", data)
    version = data.get("schema_version", MISSING)
    if type(version) is not int:
        reader.fail("schema_version", f"the integer {SCHEMA_VERSION}", version)
    readable = f"{SCHEMA_VERSION}, the schema this ldmrt reads"
    if version > SCHEMA_VERSION:
        raise reader.error("schema_version", readable, f"{version}: the bundle was written by a "
                           f"newer ldmrt; upgrade ldmrt to load it")
    if version < SCHEMA_VERSION:
        raise reader.error("schema_version", readable, f"{version}: the bundle was written by an "
                           f"older ldmrt whose format this version no longer reads; re-export it")
    reader.record(data, "<root>", _TOP_KEYS, _OPTIONAL_TOP_KEYS)
    reader.string(data["ldmrt_version"], "ldmrt_version", VERSION, "a version string such as '0.1.0'")
    created = reader.utc_time(data["created"], "created")

    config_data = reader.mapping(data["config"], "config")
    config: ModelConfig = reader.foreign(lambda: ModelConfig.from_dict(config_data), "config",
                                         "a valid model configuration")
    reader.choice(data["family"], "family", [f.value for f in Family])
    if data["family"] != config.family.value:
        reader.fail("family", f"{config.family.value!r}, the family of config", data["family"])
    # The runtime divides the latents by it before decoding: 0 or a negative flips or blows them up.
    scale = reader.number(data["latent_scale"], "latent_scale", positive=True)
    if scale != config.scale_factor:
        reader.fail("latent_scale", f"{config.scale_factor}, the scale_factor of config", scale)
    precision = Precision(reader.choice(data["precision"], "precision", [p.value for p in Precision]))

    # The runtime applies DEFAULT_POSTPROCESS and nothing else: another expression would be ignored.
    postprocess = reader.mapping(data["postprocess"], "postprocess", minimum=1)
    for key, expression in postprocess.items():
        if key not in DEFAULT_POSTPROCESS:
            reader.fail("postprocess", f"only the outputs {list(DEFAULT_POSTPROCESS)} as keys (the "
                                       f"runtime post-processes nothing else)", key)
        if expression != DEFAULT_POSTPROCESS[key]:
            reader.fail(join_path("postprocess", key), f"{DEFAULT_POSTPROCESS[key]!r}, the expression "
                                                   f"the runtime applies", expression)

    ranges_data = reader.record(data["shape_ranges"], "shape_ranges", _SHAPE_RANGE_KEYS, ("vae_max_size",))
    ranges = ShapeRanges(**{key: reader.integer(ranges_data[key], join_path("shape_ranges", key), 1,
                                                MAX_BATCH if key.endswith("batch") else MAX_IMAGE_SIDE)
                            for key in _SHAPE_RANGE_KEYS},
                         vae_max_size=reader.integer(ranges_data.get("vae_max_size", 0),
                                                     join_path("shape_ranges", "vae_max_size"), 0, MAX_IMAGE_SIDE))
    reader.foreign(lambda: (ranges.vae_latent_range(config.downsampling_factor),
                            ranges.batch_range(guided=False)),
                   "shape_ranges", f"sizes that are multiples of the latent factor "
                                   f"{config.downsampling_factor} with min <= opt <= max")

    components_data = reader.mapping(data["components"], "components", minimum=1)
    components: dict[str, ComponentEntry] = {}
    owner: dict[str, str] = {}
    for name, entry_data in components_data.items():
        reader.string(name, "components", COMPONENT_NAME,
                      "component names of lowercase letters, digits and '_'")
        entry = _parse_component(reader, name, entry_data, join_path("components", name))
        for file in entry.files:
            if file in owner:
                reader.fail(join_path(join_path("components", name), "file"),
                            f"a file no other component lists (components.{owner[file]} has it)", file)
            owner[file] = name
        components[name] = entry
    _check_against_config(reader, config, ranges, precision, components)

    tokenizer = None if data["tokenizer"] is None else \
        _parse_tokenizer(reader, data["tokenizer"], "tokenizer")
    engines = tuple(parse_engine_record(reader, record, join_path("engines", i))
                    for i, record in enumerate(reader.sequence(data["engines"], "engines")))

    random_weights = reader.boolean(data["random_weights"], "random_weights")
    model_source = data.get("model_source")
    if model_source is not None:
        model_source = parse_source(reader, model_source, "model_source")
        if model_source.kind == "preset" and not random_weights:
            reader.fail("random_weights", "true (model_source is a preset: random weights)", random_weights)

    return Manifest(
        name=reader.string(data["name"], "name"), source=reader.string(data["source"], "source"),
        random_weights=random_weights, config=config,
        precision=precision, shape_ranges=ranges, components=components, tokenizer=tokenizer,
        engines=engines, postprocess=dict(postprocess),
        created=created, ldmrt_version=data["ldmrt_version"], model_source=model_source)


def _parse_component(reader: Reader, name: str, data: Any, where: str) -> ComponentEntry:
    reader.json_value(data, where)
    reader.record(data, where, _COMPONENT_KEYS)
    file = reader.file_name(data["file"], join_path(where, "file"))
    if not file.endswith(".onnx"):
        reader.fail(join_path(where, "file"), "a file name ending in '.onnx'", file)
    external = data["external_data"]
    if external is not None:
        reader.file_name(external, join_path(where, "external_data"))
        if external in (file, MANIFEST_NAME):
            reader.fail(join_path(where, "external_data"), f"a file other than the graph and {MANIFEST_NAME}",
                        external)
    files = (file,) if external is None else (file, external)

    hashes = reader.mapping(data["sha256"], join_path(where, "sha256"))
    if sorted(hashes) != sorted(files):
        raise reader.error(join_path(where, "sha256"), f"a sha256 for exactly {list(files)}",
                           f"keys {sorted(hashes)[:8]}")
    for file_name, digest in hashes.items():
        reader.sha256(digest, join_path(join_path(where, "sha256"), file_name))
    size = reader.integer(data["size_bytes"], join_path(where, "size_bytes"))
    spec = _parse_io(reader, name, data["io"], join_path(where, "io"))
    dtype = reader.choice(data["dtype"], join_path(where, "dtype"), COMPONENT_DTYPES)
    parity = None if data["parity"] is None else _parse_parity(reader, data["parity"], join_path(where, "parity"))
    return ComponentEntry(name=name, file=file, external_data=external,
                          sha256={f: hashes[f] for f in files}, size_bytes=size, spec=spec,
                          dtype=dtype, parity=parity)


def _parse_io(reader: Reader, name: str, data: Any, where: str) -> ComponentSpec:
    """Check the shape of the JSON first: ComponentSpec.from_dict trusts its input's types."""
    reader.record(data, where, ("inputs", "outputs", "ranges"))
    seen: set[str] = set()
    for group in ("inputs", "outputs"):
        tensors = reader.sequence(data[group], join_path(where, group), minimum=1)
        for i, tensor in enumerate(tensors):
            at = join_path(join_path(where, group), i)
            reader.record(tensor, at, ("name", "dtype", "shape"))
            tensor_name = reader.string(tensor["name"], join_path(at, "name"), TENSOR_NAME,
                                        "a tensor name (letters, digits, '_', '.')")
            if tensor_name in seen:
                reader.fail(join_path(at, "name"), "a name no other tensor of this component has", tensor_name)
            seen.add(tensor_name)
            reader.choice(tensor["dtype"], join_path(at, "dtype"), TENSOR_DTYPES)
            for axis, dim in enumerate(reader.sequence(tensor["shape"], join_path(at, "shape"))):
                if not _is_dim(dim):
                    reader.fail(join_path(join_path(at, "shape"), axis),
                                "a size >= 1 or a symbol such as 'batch' or '8*latent_height'", dim)
    ranges = reader.mapping(data["ranges"], join_path(where, "ranges"))
    for symbol, triple in ranges.items():
        reader.string(symbol, join_path(where, "ranges"), _SYMBOL, "symbol names of lowercase letters and '_'")
        at = join_path(join_path(where, "ranges"), symbol)
        if not isinstance(triple, list) or len(triple) != 3:
            reader.fail(at, "[min, opt, max]", triple)
        for value in triple:
            reader.integer(value, at, 1)
    return reader.foreign(lambda: ComponentSpec.from_dict(name, data), where,
                          "a consistent I/O spec")


def _is_dim(value: Any) -> bool:
    if not (type(value) is int and value <= MAX_INT or type(value) is str):
        return False
    try:
        parse_dim(value)
    except ConfigError:
        return False
    return True


def _check_against_config(reader: Reader, config: ModelConfig, ranges: ShapeRanges,
                          precision: Precision, components: Mapping[str, ComponentEntry]) -> None:
    """Every component's I/O must be the spec ldmrt derives from the manifest's own config, shape
    ranges and precision, as export wrote it: then the text width, latent channels and latent
    factor the runtime takes from config are the ones the graphs are declared with (and the
    graphs are checked against those declarations at load)."""
    for name, entry in components.items():
        allowed = list(dict.fromkeys((precision.dtype, "float32")))   # float32: --fp32-vae-decoder
        if entry.dtype not in allowed:
            reader.fail(join_path(join_path("components", name), "dtype"),
                        f"one of {allowed} (precision {precision.value})", entry.dtype)
    fp32 = frozenset(name for name, entry in components.items() if entry.dtype == "float32")
    derived = reader.foreign(lambda: component_specs(config, ranges, precision, fp32), "config",
                             "a model configuration ldmrt can derive component I/O from")
    for name, entry in components.items():
        if name not in derived:
            reader.fail("components", f"the components of this model (some of {list(derived)})", name)
        difference = derived[name].difference(entry.spec)
        if difference is not None:
            path, expected, found = difference
            raise reader.error(f"{join_path(join_path('components', name), 'io')}.{path}",
                               f"{expected!r} (what ldmrt derives from config and shape_ranges)",
                               f"{found!r}; the manifest contradicts its own config: re-export the bundle")


def _parse_parity(reader: Reader, data: Any, where: str) -> ParityRecord:
    reader.record(data, where, _PARITY_KEYS)
    shapes: dict[str, int | tuple[int, ...]] = {}
    for key, value in reader.mapping(data["shapes"], join_path(where, "shapes")).items():
        at = join_path(join_path(where, "shapes"), key)
        reader.string(key, join_path(where, "shapes"), TENSOR_NAME, "tensor or symbol names as keys")
        if isinstance(value, list):
            shapes[key] = tuple(reader.integer(v, at) for v in value)
        else:
            shapes[key] = reader.integer(value, at)
    return ParityRecord(reference=reader.string(data["reference"], join_path(where, "reference")),
                        rel_l2=reader.number(data["rel_l2"], join_path(where, "rel_l2")),
                        max_abs=reader.number(data["max_abs"], join_path(where, "max_abs")),
                        tolerance=reader.number(data["tolerance"], join_path(where, "tolerance")),
                        shapes=shapes)


def _parse_tokenizer(reader: Reader, data: Any, where: str) -> TokenizerEntry:
    reader.json_value(data, where)
    reader.record(data, where, ("kind", "files"))
    kind = reader.choice(data["kind"], join_path(where, "kind"), TOKENIZER_KINDS)
    files = reader.mapping(data["files"], join_path(where, "files"), minimum=1)
    for file, digest in files.items():
        reader.file_name(file, join_path(where, "files"))
        reader.sha256(digest, join_path(join_path(where, "files"), file))
    # what load_tokenizer reads: tokenizer.json, or the files of bundles before it
    legacy = {"clip": {"vocab.json", "merges.txt"}, "wordpiece": {"vocab.txt"}}[kind]
    if "tokenizer.json" not in files and not legacy <= set(files):
        reader.fail(join_path(where, "files"), f"tokenizer.json (or {' + '.join(sorted(legacy))}) for a {kind} "
                    f"tokenizer", sorted(files))
    return TokenizerEntry(kind=kind, files=dict(files))


def _shape_ranges_dict(ranges: ShapeRanges) -> dict[str, int]:
    out = {key: getattr(ranges, key) for key in _SHAPE_RANGE_KEYS}
    if ranges.vae_max_size:                # written only when set: older readers never see the key
        out["vae_max_size"] = ranges.vae_max_size
    return out
