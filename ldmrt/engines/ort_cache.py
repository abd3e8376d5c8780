"""ONNX Runtime's optimized graphs, cached per machine, so a cold start skips graph optimization.

At session creation with ORT_ENABLE_ALL, ONNX Runtime rewrites each graph for the CPU it runs
on (QDQ pairs -> integer kernels, NCHWc convolution layouts sized to the vector width, fusions):
8.4 s of CPU for the sd15 fp32 UNet on every process start, against 1.3 s to load the rewritten
graph back with optimizations off (docs/cpu_speed.md). The rewrite is only valid for the ONNX
Runtime build and instruction set that made it, so an entry is keyed by (source graph sha256,
onnxruntime version, the CPU features that steer the rewrite) and a mismatch simply misses.

    <cache>/<component>-<key>/graph.onnx (+ graph.onnx.data)   written by ONNX Runtime
    <cache>/<component>-<key>/record.json                     key fields, files' sizes

Entries are written to a private folder and renamed into place, so a reader never sees half
an entry; a truncated or foreign entry is ignored (logged) and rebuilt. Torch-free.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ldmrt.atomic import work_folder

log = logging.getLogger(__name__)

CACHE_ENV = "LDMRT_ORT_CACHE"          # a folder, or "off"
BUNDLE_CACHE_DIR = "ort_cache"         # default: inside the bundle when it is writable
RECORD = "record.json"
GRAPH = "graph.onnx"
SCHEMA = 1
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
    """The cached graph for `key`, or None when absent, foreign or incomplete."""
    folder = entry_folder(cache, component, key)
    try:
        record = json.loads((folder / RECORD).read_text())
        files = dict(record["files"])
        ok = (record["schema"] == SCHEMA and record["component"] == component
              and record["key"] == json.loads(json.dumps(asdict(key))) and GRAPH in files)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if ok:
        for name, size in files.items():
            path = folder / str(name)
            if path.parent != folder or not path.is_file() or path.stat().st_size != size:
                ok = False
                break
    if not ok:
        log.warning("%s: ignoring ORT cache entry %s (record does not match its key or files)", component, folder)
        return None
    return folder / GRAPH


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


def create_session(source: Path, options, providers: list[str], cache: GraphCache | None):
    """(InferenceSession, hit) for `source`: from the cached optimized graph (optimizations off)
    when the cache has it (hit), else from `source` with ORT_ENABLE_ALL, storing the rewrite."""
    import onnxruntime as ort

    if cache is None:
        return ort.InferenceSession(str(source), options, providers=providers), False
    level = options.graph_optimization_level
    cached = lookup(cache.folder, cache.component, cache.key)
    if cached is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(cached), options, providers=providers), True
        except Exception as exc:   # a corrupt entry: rebuild it from the source graph
            log.warning("%s: ORT cache entry %s did not load (%s); rebuilding it",
                        cache.component, cached.parent, exc)
            shutil.rmtree(cached.parent, ignore_errors=True)
            options.graph_optimization_level = level
    try:
        stage = _staging(cache)
    except OSError as exc:
        log.info("%s: not caching the optimized graph (%s)", cache.component, exc)
        return ort.InferenceSession(str(source), options, providers=providers), False
    options.optimized_model_filepath = str(stage / GRAPH)
    # Weights go to graph.onnx.data: graphs over 2 GB cannot be one protobuf.
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{GRAPH}.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        session = ort.InferenceSession(str(source), options, providers=providers)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _commit(stage, cache)
    return session, False


def _staging(cache: GraphCache) -> Path:
    """`.<entry>.partial-PID` next to the entry; staging folders of killed processes are removed."""
    return work_folder(entry_folder(cache.folder, cache.component, cache.key))


def _commit(stage: Path, cache: GraphCache) -> None:
    """Record the written files and rename the staging folder into place."""
    files = {p.name: p.stat().st_size for p in stage.iterdir() if p.is_file()}
    final = entry_folder(cache.folder, cache.component, cache.key)
    if GRAPH not in files or lookup(cache.folder, cache.component, cache.key) is not None:
        shutil.rmtree(stage, ignore_errors=True)    # nothing written, or another process was first
        return
    record = {"schema": SCHEMA, "component": cache.component, "key": asdict(cache.key), "files": files}
    (stage / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    try:
        shutil.rmtree(final, ignore_errors=True)    # a broken entry under the same key
        stage.rename(final)
        log.info("%s: cached ONNX Runtime's optimized graph in %s", cache.component, final)
    except OSError as exc:
        log.info("%s: ORT cache entry not stored (%s)", cache.component, exc)
        shutil.rmtree(stage, ignore_errors=True)
