"""ONNX Runtime backend: CPU everywhere; CUDA EP with I/O binding where onnxruntime-gpu is installed."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Mapping

import numpy as np

from ldmrt import onnx_wire
from ldmrt.engines.base import verify_graphs
from ldmrt.engines.ort_cache import (GraphCache, SourceCheck, SourceGraph, cache_folder, create_session,
                                     discard, entry_folder, lookup, may_hit)
from ldmrt.errors import BackendUnavailableError, BundleError, ConfigError
from ldmrt.iospec import ComponentSpec, GraphTensor
from ldmrt.manifest import Manifest

log = logging.getLogger(__name__)

# ONNX Runtime's type strings -> numpy names (as in TensorSpec.dtype)
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
               "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(double)": "float64",
               "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError("backend onnxruntime: not installed; pip install onnxruntime "
                                      "(or onnxruntime-gpu for CUDA)", field="backend") from None
    return onnxruntime


class OnnxRuntimeRunner:
    """One InferenceSession per component; `run` is thread-safe (ORT sessions are)."""

    def __init__(self, source: SourceGraph, spec: ComponentSpec, providers: list[str], threads: int | None,
                 cache: GraphCache | None = None):
        self.spec = spec
        self.source, self._providers, self._threads, self._cache = source, providers, threads, cache
        self.session, self.cache_hit = self._open(lambda options: create_session(source, options, providers, cache))
        self.adapted = False           # whether the session holds replaced initializers (LoRA)
        self._held: list = []          # the OrtValues a session with replaced initializers reads
        self._source_checked = not self.cache_hit     # create_session checked a source it read
        self.output = spec.outputs[0].name

    def reopened(self, initializers: Mapping[str, np.ndarray] | None = None):
        """(a new session of this graph, the values it reads): with `initializers` replaced (by name;
        from the source graph at full optimization, outside the cache), or the base graph as this
        runner first opened it."""
        if not initializers:
            return self._open(lambda options: create_session(self.source, options, self._providers,
                                                             self._cache))[0], []
        import onnxruntime as ort

        # Replaced before ONNX Runtime optimizes the graph: SessionOptions.add_initializer takes
        # effect only after the optimizer, which at ORT_ENABLE_ALL has already reordered convolution
        # weights from the old values (measured: ORT 1.32). So initializers stored in `.data` are
        # given as external ones (swapped in at load), and those inside the protobuf are written over
        # in a copy of its bytes (same dtype and shape: same length; ldmrt.onnx_wire finds them).
        self.verify_source()
        where = str(self.source.path)
        data = self.source.path.read_bytes()
        spans = onnx_wire.initializers(data, where)
        external = [name for name in initializers if spans[name].location is not None]
        embedded = [name for name in initializers if spans[name].location is None]
        if embedded:
            data = bytearray(data)
            for name in embedded:
                span, raw = spans[name], np.ascontiguousarray(initializers[name]).tobytes()
                if len(raw) != span.end - span.start:
                    raise BundleError(f"{where}: initializer {name}: {span.end - span.start} bytes in the graph, "
                                      f"{len(raw)} to write")
                data[span.start:span.end] = raw
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(initializers[n])) for n in external]
        model = bytes(data) if embedded else where
        del data

        def create(options):
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(self.source.path.parent))
            if external:
                options.add_external_initializers(external, values)
            return ort.InferenceSession(model, options, providers=self._providers), False

        return self._open(create)[0], values

    def verify_source(self) -> None:
        """Check the source graph's files before it is read, where the load was asked to (a cache hit
        never read it); once."""
        if self.source.check is SourceCheck.BEFORE_READING and not self._source_checked:
            self.source.verify()
            self._source_checked = True

    def use(self, session, held: list, adapted: bool) -> None:
        """Serve from `session` from now on (the caller holds the pipeline's adapter lock)."""
        self.session, self._held, self.adapted = session, held, adapted

    def _open(self, create):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self._threads:
            options.intra_op_num_threads = self._threads
        try:
            session, hit = create(options)
        except BundleError:
            raise          # the source graph is not the manifest's: the bundle's fault, named by file
        except Exception as exc:
            raise BackendUnavailableError(f"onnxruntime could not load {self.source.path.name}: {exc}") from exc
        # Here, not in ort_cache: every session (from the source graph or a cached rewrite) passes.
        self.spec.check_graph(_graph_tensors(session.get_inputs()), _graph_tensors(session.get_outputs()),
                              str(self.source.path))
        return session, hit

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        values = self.spec.bind(inputs)
        output = self.session.run([self.output], dict(inputs))[0]
        return self.spec.check_output(self.output, output, values)

    def run_all(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.spec.bind(inputs)
        names = [t.name for t in self.spec.outputs]
        outputs = self.session.run(names, dict(inputs))
        return {name: self.spec.check_output(name, array, values) for name, array in zip(names, outputs)}


def _graph_tensors(args) -> list[GraphTensor]:
    """A session's NodeArgs as GraphTensors: ORT gives ints, dim_param names, or None per dim.
    An empty shape is taken as unstated: every spec tensor has at least one dim."""
    return [GraphTensor(arg.name, _ORT_DTYPES.get(arg.type, arg.type),
                        tuple(d if isinstance(d, (int, str)) else None for d in arg.shape) or None)
            for arg in args]


def source_graph(bundle: Path, manifest: Manifest, component: str, check: SourceCheck) -> SourceGraph:
    return SourceGraph(bundle / manifest.component(component).file,
                       partial(verify_graphs, bundle, manifest, (component,)), check)


def open_onnxruntime(bundle: Path, manifest: Manifest, components: tuple[str, ...], *,
                     device: str = "cpu", threads: int | None = None,
                     cache_dir: Path | str | None = None, verify: bool = True) -> dict[str, OnnxRuntimeRunner]:
    """`cache_dir`: where optimized CPU graphs are cached (ort_cache.py; default <bundle>/ort_cache).
    `verify`: a graph's files are sha256-checked before ONNX Runtime reads them, so only where the
    cache cannot serve it (a hit is checked through its entry; see open_runners)."""
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: expected 'cpu' or 'cuda'", field="device")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads {threads!r}: expected an integer >= 1, or None (ONNX Runtime's default)",
                          field="threads")
    ort = _import_onnxruntime()
    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(f"onnxruntime has no CUDA provider here (found {available}); "
                                          f"pip install onnxruntime-gpu")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    threads = threads or int(os.environ.get("LDMRT_THREADS", "0")) or None
    folder = cache_folder(bundle, cache_dir) if device == "cpu" else None
    caches = {name: GraphCache.for_graph(folder, name, manifest.component(name).digest) if folder else None
              for name in components}
    # The graphs the cache cannot serve (all of them without a cache: off, read-only bundle, CUDA)
    # are checked before any is loaded; one whose entry fails its own sha256 is checked once that
    # is found, right before ONNX Runtime reads it. A hit's source is neither read nor hashed.
    unserved = [name for name, cache in caches.items() if cache is None or not may_hit(cache)]
    if verify and unserved:
        verify_graphs(bundle, manifest, unserved)
    runners = {}
    for name, cache in caches.items():
        check = (SourceCheck.BEFORE_STORING if not verify else
                 SourceCheck.DONE if name in unserved else SourceCheck.BEFORE_READING)
        runners[name] = OnnxRuntimeRunner(source_graph(bundle, manifest, name, check),
                                          manifest.component(name).spec, providers, threads, cache)
    return runners


@dataclass(frozen=True)
class CachedGraph:
    """One component's entry after `prepare_cache`."""
    component: str
    folder: Path
    reused: bool
    seconds: float
    size_bytes: int


def prepare_cache(bundle: Path, manifest: Manifest, components: tuple[str, ...], *,
                  cache_dir: Path | str | None = None, force: bool = False,
                  progress=lambda component, stage: None) -> list[CachedGraph]:
    """Write ONNX Runtime's optimized CPU graphs for this machine ahead of the first load
    (`ldmrt build DIR --backend onnxruntime`), so a service's first start is a warm one.
    Entries that already match are reused unless `force`; a graph is optimized only once its
    files match the manifest (BundleError naming the file otherwise)."""
    _import_onnxruntime()
    entries = [manifest.component(name) for name in components]     # unknown names fail before any work
    folder = cache_folder(bundle, cache_dir)
    if folder is None:
        raise BundleError(f"{bundle}: no ONNX Runtime cache to write: the bundle folder is not writable "
                          f"or LDMRT_ORT_CACHE is off (set LDMRT_ORT_CACHE=<folder> to cache elsewhere)")
    results = []
    for name, entry in zip(components, entries):
        cache = GraphCache.for_graph(folder, name, entry.digest)
        if force:
            discard(cache)     # only what ldmrt wrote there; a user's files are kept
        stored = entry_folder(folder, name, cache.key)
        progress(name, "loading or optimizing")
        start = time.perf_counter()
        runner = OnnxRuntimeRunner(source_graph(bundle, manifest, name, SourceCheck.BEFORE_READING), entry.spec,
                                   ["CPUExecutionProvider"], None, cache)
        seconds = time.perf_counter() - start
        if lookup(folder, name, cache.key) is None:
            raise BundleError(f"{name}: ONNX Runtime's optimized graph could not be stored in {folder} "
                              f"(see the log; is the disk full or the folder read-only?)")
        size = sum(p.stat().st_size for p in stored.iterdir() if p.is_file())
        results.append(CachedGraph(name, stored, runner.cache_hit, seconds, size))
    return results
