"""ONNX Runtime's optimized graphs, cached per machine, so a cold start skips graph optimization.

At session creation with ORT_ENABLE_ALL, ONNX Runtime rewrites each graph for the CPU it runs
on (QDQ pairs -> integer kernels, NCHWc convolution layouts sized to the vector width, fusions):
8.4 s of CPU for the sd15 fp32 UNet on every process start, against 1.3 s to load the rewritten
graph back with optimizations off (docs/cpu_speed.md). The rewrite is only valid for the ONNX
Runtime build and instruction set that made it, so an entry is keyed by (source graph sha256,
onnxruntime version, the CPU features that steer the rewrite) and a mismatch simply misses.

    <cache>/<component>-<key>/graph.onnx (+ graph.onnx.data)   written by ONNX Runtime
    <cache>/<component>-<key>/record.json                     key fields, each file's size and sha256

The key holds the source graph's identity (`ComponentEntry.digest`), and an entry is stored only
once the source's files are proven to have that digest, so an entry is bound to the verified graph
it was made from; the record holds every cached file's sha256, checked before the entry is used,
so a graph of the same size put in its place, or a damaged disk, is rebuilt with a warning instead
of run. A hit therefore never reads or hashes the source graph: the entry's own check stands in
for it (one hash per warm load, not two). Entries are written to a private folder (unique per
call: threads and processes never share one) and renamed into place, so a reader never sees half
an entry; of racing writers the first entry stays. ldmrt replaces an entry only when it holds
nothing but what ldmrt writes there. Torch-free.
"""
from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import platform
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from ldmrt.atomic import Ownership, describe, foreign_entries, move_into_place, work_folder
from ldmrt.digest import sha256_file
from ldmrt.errors import BundleError
from ldmrt.manifest_reader import COMPONENT_NAME, MAX_STRING, Reader, join_path

log = logging.getLogger(__name__)

CACHE_ENV = "LDMRT_ORT_CACHE"          # a folder, or "off"
BUNDLE_CACHE_DIR = "ort_cache"         # default: inside the bundle when it is writable
RECORD = "record.json"
GRAPH = "graph.onnx"
ENTRY_FILES = (RECORD, GRAPH, f"{GRAPH}.data")      # the names ldmrt writes in an entry folder
SCHEMA = 2                                           # 2: each file's sha256 (1: sizes only)
MAX_RECORD_BYTES = 1 << 20
_ENTRY_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}-[0-9a-f]{16}$")     # <component>-<key digest>
# CPU features that change what ORT_ENABLE_ALL writes (NCHWc block size, integer and bf16 kernels).
_ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "bf16", "sve")


@dataclass(frozen=True)
class CacheKey:
    graph_sha256: str
    onnxruntime: str
    machine: str
    isa: tuple[str, ...]
    level: str = "ORT_ENABLE_ALL"

    @property
    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FileFacts:
    size: int
    sha256: str


@dataclass(frozen=True)
class CacheRecord:
    """record.json: the graph, onnxruntime and CPU an entry was made for, and its files."""
    component: str
    key: CacheKey
    files: Mapping[str, FileFacts]             # file name in the entry folder -> size, sha256

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "component": self.component,
                "key": {**asdict(self.key), "isa": list(self.key.isa)},
                "files": {name: asdict(facts) for name, facts in self.files.items()}}

    @classmethod
    def from_dict(cls, data: Any, origin: str = "<in memory>") -> "CacheRecord":
        return parse_cache_record(Reader(origin, RECORD, kind="ORT cache entry"), data, "<root>")


def parse_cache_record(reader: Reader, data: Any, where: str) -> CacheRecord:
    """Every field checked (BundleError naming it): an entry is used only when its record parses."""
    def at(*keys: str) -> str:
        path = where
        for key in keys:
            path = join_path(path, key)
        return path

    reader.json_value(data, where)
    reader.record(data, where, ("schema", "component", "key", "files"))
    if data["schema"] != SCHEMA:
        reader.fail(at("schema"), f"{SCHEMA} (a record of this ldmrt)", data["schema"])
    key = reader.record(data["key"], at("key"), tuple(f.name for f in fields(CacheKey)))
    if not isinstance(key["machine"], str) or len(key["machine"]) > MAX_STRING:
        reader.fail(at("key", "machine"), "a machine name (platform.machine())", key["machine"])
    cache_key = CacheKey(graph_sha256=reader.sha256(key["graph_sha256"], at("key", "graph_sha256")),
                         onnxruntime=reader.string(key["onnxruntime"], at("key", "onnxruntime")),
                         machine=key["machine"],
                         isa=tuple(reader.string(flag, join_path(at("key", "isa"), i)) for i, flag
                                   in enumerate(reader.sequence(key["isa"], at("key", "isa")))),
                         level=reader.string(key["level"], at("key", "level")))
    files = {}
    for name, facts in reader.mapping(data["files"], at("files")).items():
        reader.file_name(name, at("files"))
        reader.record(facts, at("files", name), ("size", "sha256"))
        files[name] = FileFacts(size=reader.integer(facts["size"], at("files", name, "size")),
                                sha256=reader.sha256(facts["sha256"], at("files", name, "sha256")))
    if GRAPH not in files:
        reader.fail(at("files"), f"an object listing {GRAPH}", sorted(files))
    return CacheRecord(component=reader.string(data["component"], at("component"), COMPONENT_NAME,
                                               "a component name"),
                       key=cache_key, files=files)


def read_cache_record(folder: Path) -> CacheRecord:
    """An entry's record.json; BundleError naming the file and the field when it is not one."""
    reader = Reader(str(folder), RECORD, kind="ORT cache entry")
    return parse_cache_record(reader, reader.read_file(MAX_RECORD_BYTES), "<root>")


def cpu_isa() -> tuple[str, ...]:
    """The features of `_ISA_FLAGS` this CPU reports (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    return tuple(f for f in _ISA_FLAGS if f in flags)


def cache_key(graph_sha256: str) -> CacheKey:
    import onnxruntime as ort

    return CacheKey(graph_sha256=graph_sha256, onnxruntime=ort.__version__, machine=platform.machine(),
                    isa=cpu_isa())


def cache_folder(bundle: Path, explicit: Path | str | None = None) -> Path | None:
    """Where entries live: `explicit`, else $LDMRT_ORT_CACHE, else <bundle>/ort_cache when the
    bundle folder is writable; None (no caching) for "off" or a read-only bundle."""
    chosen = explicit if explicit is not None else os.environ.get(CACHE_ENV)
    if chosen is not None:
        return None if str(chosen).lower() in ("off", "0", "") else Path(chosen)
    return Path(bundle) / BUNDLE_CACHE_DIR if os.access(bundle, os.W_OK) else None


def entry_folder(cache: Path, component: str, key: CacheKey) -> Path:
    return cache / f"{component}-{key.digest}"


def lookup(cache: Path, component: str, key: CacheKey) -> Path | None:
    """The cached graph for `key` once every file's size and sha256 match its record; None when
    there is no entry, or (logged as a warning) when it is foreign, stale or damaged."""
    folder = entry_folder(cache, component, key)
    if not os.path.lexists(folder):
        return None
    problem = _entry_problem(folder, component, key)
    if problem is not None:
        log.warning("%s: ignoring ORT cache entry %s (%s); rebuilding it", component, folder, problem)
        return None
    return folder / GRAPH


def _entry_problem(folder: Path, component: str, key: CacheKey) -> str | None:
    """Why `folder` is not a sound entry for (component, key), or None."""
    problem, digests = _record_problem(folder, component, key)
    return problem or _digest_problem(folder, digests)


def _record_problem(folder: Path, component: str, key: CacheKey) -> tuple[str | None, dict[str, str]]:
    """(why the entry's record, names or sizes are wrong, or None; file name -> recorded sha256).
    Nothing is hashed here: a truncated or missing file costs nothing to find."""
    if folder.is_symlink() or not folder.is_dir():
        return "not a folder", {}
    try:
        record = read_cache_record(folder)
    except BundleError as exc:
        return str(exc), {}
    if record.component != component or record.key != key:
        return "made for another graph, onnxruntime or CPU", {}
    for name, facts in record.files.items():
        path = folder / name
        if path.is_symlink() or not path.is_file():
            return f"{name}: missing or not a plain file", {}
        if path.stat().st_size != facts.size:
            return f"{name}: {path.stat().st_size} bytes, the record says {facts.size}", {}
    return None, {name: facts.sha256 for name, facts in record.files.items()}


def _digest_problem(folder: Path, digests: dict[str, str]) -> str | None:
    for name, digest in digests.items():
        found = sha256_file(folder / name)
        if found != digest:
            return f"{name}: sha256 {found[:12]}... differs from the record's {digest[:12]}..."
    return None


def ownership(cache: Path):
    """What ldmrt wrote in a cache folder (atomic.Judge): `<component>-<key>/` entry folders
    holding record.json, graph.onnx, graph.onnx.data and what their record lists, and entries'
    staging folders. Anything else there (a user's file, a folder of another name) is not ldmrt's."""
    listed: dict[str, set[str]] = {}

    def record_files(entry: str) -> set[str]:
        if entry not in listed:
            try:
                listed[entry] = set(read_cache_record(cache / entry).files)
            except BundleError:
                listed[entry] = set()
        return listed[entry]

    def judge(parts: tuple[str, ...], is_dir: bool) -> Ownership:
        if len(parts) == 1 and is_dir and _ENTRY_NAME.match(parts[0]):
            return Ownership.FOLDER
        if len(parts) == 2 and not is_dir and (parts[1] in ENTRY_FILES or parts[1] in record_files(parts[0])):
            return Ownership.WHOLE
        return Ownership.FOREIGN
    return judge


def _foreign_in_entry(folder: Path) -> list[str]:
    """What the entry folder holds that ldmrt did not write there."""
    judge = ownership(folder.parent)
    foreign, complete = foreign_entries(folder, lambda parts, is_dir: judge((folder.name, *parts), is_dir))
    return foreign if complete else foreign + ["..."]


@dataclass(frozen=True)
class GraphCache:
    """One component's entry: the cache folder, the component and the key of its source graph."""
    folder: Path
    component: str
    key: CacheKey

    @classmethod
    def for_graph(cls, folder: Path, component: str, digest: str) -> "GraphCache":
        """`digest`: the graph's identity from the manifest (`ComponentEntry.digest`)."""
        return cls(folder, component, cache_key(digest))


class SourceCheck(enum.Enum):
    """When a source graph's sha256 is checked, if the cache cannot serve its component."""
    DONE = "done"                          # checked already, before any graph was loaded
    BEFORE_READING = "before reading"      # right before ONNX Runtime reads it
    BEFORE_STORING = "before storing"      # unverified (Pipeline.load(verify=False)): hashed only to
                                           # prove that its rewrite may be cached; runs either way


@dataclass(frozen=True)
class SourceGraph:
    """A component's graph in the bundle and the check that its files are the manifest's (the graph
    the cache key names). ONNX Runtime reads it only when the cache cannot serve the component."""
    path: Path
    verify: Callable[[], None]     # raises BundleError naming the file unless every sha256 matches
    check: SourceCheck = SourceCheck.BEFORE_READING


def may_hit(cache: GraphCache) -> bool:
    """Whether an entry for `cache` is there with the right record, names and sizes. Nothing is
    hashed: its files' sha256 are checked when it is loaded (create_session)."""
    folder = entry_folder(cache.folder, cache.component, cache.key)
    return os.path.lexists(folder) and _record_problem(folder, cache.component, cache.key)[0] is None


def create_session(source: SourceGraph, options, providers: list[str], cache: GraphCache | None):
    """(InferenceSession, hit): from the cached optimized graph (optimizations off) when the cache
    has a sound entry (hit: the source graph is neither read nor hashed), else from the source
    with ORT_ENABLE_ALL, storing the rewrite only once the source is proven to be the key's graph."""
    import onnxruntime as ort

    if cache is not None:
        folder = entry_folder(cache.folder, cache.component, cache.key)
        if os.path.lexists(folder):
            problem, digests = _record_problem(folder, cache.component, cache.key)
            if problem is None:
                session, problem = _load_verified(folder, digests, options, providers)
                if session is not None:
                    return session, True
            # Rebuilt below; the new entry replaces this one if it holds only what ldmrt wrote.
            log.warning("%s: ignoring ORT cache entry %s (%s); rebuilding it", cache.component, folder, problem)
    if source.check is SourceCheck.BEFORE_READING:
        source.verify()            # BundleError before ONNX Runtime reads a byte of it
    if cache is None or (source.check is SourceCheck.BEFORE_STORING and not _proven(source, cache)):
        return ort.InferenceSession(str(source.path), options, providers=providers), False
    try:
        stage = _staging(cache)
    except OSError as exc:
        log.info("%s: not caching the optimized graph (%s)", cache.component, exc)
        return ort.InferenceSession(str(source.path), options, providers=providers), False
    options.optimized_model_filepath = str(stage / GRAPH)
    # Weights go to graph.onnx.data: graphs over 2 GB cannot be one protobuf.
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{GRAPH}.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        session = ort.InferenceSession(str(source.path), options, providers=providers)
        _commit(stage, cache)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return session, False


def _proven(source: SourceGraph, cache: GraphCache) -> bool:
    """Whether an unverified source is the key's graph, so that its rewrite may be stored. Hashed
    before ONNX Runtime reads it, not alongside: on two busy cores a hashing thread slowed the
    optimization by more than the hash itself costs."""
    try:
        source.verify()
    except BundleError as exc:
        log.warning("%s: not caching the optimized graph of a source that differs from the manifest "
                    "(it runs unverified, as asked): %s", cache.component, exc)
        return False
    return True


def _load_verified(folder: Path, digests: dict[str, str], options, providers: list[str]):
    """(session, None) from the entry's graph once every file's sha256 matches `digests`, else
    (None, why). The files are hashed before ONNX Runtime reads them: a damaged or foreign entry is
    never parsed (its protobuf and external data could cost memory or trip a parser bug). Hashing
    on a second thread during the read was measured and gained nothing on two cores
    (docs/cpu_speed.md)."""
    import onnxruntime as ort

    problem = _digest_problem(folder, digests)
    if problem is not None:
        return None, problem
    level = options.graph_optimization_level
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(folder / GRAPH), options, providers=providers), None
    except Exception as exc:
        options.graph_optimization_level = level
        return None, f"did not load: {exc}"


def discard(cache: GraphCache) -> None:
    """Remove the entry for `cache.key` (a forced rebuild) when it holds only what ldmrt wrote
    there; anything else is kept, with a warning, and the entry with it."""
    folder = entry_folder(cache.folder, cache.component, cache.key)
    if not os.path.lexists(folder):
        return
    foreign = ["(not a folder)"] if folder.is_symlink() or not folder.is_dir() else _foreign_in_entry(folder)
    if foreign:
        log.warning("%s: keeping ORT cache entry %s: it holds files ldmrt did not write (%s)",
                    cache.component, folder, describe(foreign))
        return
    shutil.rmtree(folder, ignore_errors=True)


class _AlreadyCached(Exception):
    """Another thread or process stored a sound entry first: it stays, this one is dropped."""


def _staging(cache: GraphCache) -> Path:
    """A private staging folder next to the entry; staging folders of killed processes are removed."""
    def replaceable(folder: Path) -> None:      # a moved-aside entry is removed only if all ldmrt's
        foreign = _foreign_in_entry(folder)
        if foreign:
            raise LookupError(f"it holds {foreign[:3]}")
    return work_folder(entry_folder(cache.folder, cache.component, cache.key), replaceable)


def _commit(stage: Path, cache: GraphCache) -> None:
    """Record the written files (size, sha256) and rename the staging folder into place: a new
    entry, or in place of a damaged one that holds only ldmrt's files; a sound entry stays."""
    files = {p.name: FileFacts(p.stat().st_size, sha256_file(p))
             for p in sorted(stage.iterdir()) if p.is_file()}
    if GRAPH not in files:
        log.info("%s: ONNX Runtime wrote no optimized graph; nothing cached", cache.component)
        shutil.rmtree(stage, ignore_errors=True)
        return
    record = CacheRecord(cache.component, cache.key, files)
    (stage / RECORD).write_text(json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n")
    final = entry_folder(cache.folder, cache.component, cache.key)

    def replaceable(folder: Path) -> None:
        if _entry_problem(folder, cache.component, cache.key) is None:
            raise _AlreadyCached()
        foreign = ["(not a folder)"] if folder.is_symlink() or not folder.is_dir() else _foreign_in_entry(folder)
        if foreign:
            raise OSError(f"{final} holds files ldmrt did not write ({describe(foreign)}); "
                          f"not replacing it (move them out to let ldmrt cache there)")
    try:
        move_into_place(stage, final, replaceable)
        log.info("%s: cached ONNX Runtime's optimized graph in %s", cache.component, final)
    except _AlreadyCached:
        shutil.rmtree(stage, ignore_errors=True)
    except OSError as exc:
        log.warning("%s: ORT cache entry not stored (%s)", cache.component, exc)
        shutil.rmtree(stage, ignore_errors=True)
