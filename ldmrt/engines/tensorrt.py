"""TensorRT / TensorRT-RTX runtime: staleness checks of engine records, and a checked runner.

Lean: numpy, the standard library, the TensorRT module and cuda-python (imported lazily).
One engine is shared; each thread gets its own execution context, stream and static device
buffers, so CUDA graphs captured for a shape stay valid across calls.
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ldmrt.engine_record import (EngineRecord, Shape, check_plan, engine_plan_path, engines_for,
                                 read_engine_record, rebuild_command)
from ldmrt.engines import trt_api
from ldmrt.engines.trt_api import TrtApi
from ldmrt.errors import (BackendUnavailableError, CorruptEngineError, LdmrtError, ShapeError,
                          StaleEngineError)
from ldmrt.iospec import Component, ComponentSpec, GraphTensor

if TYPE_CHECKING:
    from ldmrt.engines.base import BackendRunners

log = logging.getLogger(__name__)


# --- staleness --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RuntimeInfo:
    """What the machine that wants to run an engine has."""
    builder: str                       # tensorrt | tensorrt-rtx
    builder_version: str
    gpu_target: str | None             # "sm89"; None where no GPU is visible (nothing to check)
    allow_version_compatible: bool = False

    @classmethod
    def detect(cls, backend: str, *, allow_version_compatible: bool = False) -> "RuntimeInfo":
        api = trt_api.load(backend)
        try:
            gpu: str | None = trt_api.current_gpu_target()
        except BackendUnavailableError:
            gpu = None
        return cls(backend, api.version, gpu, allow_version_compatible)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def _runs_on(targets: Sequence[str], gpu: str) -> bool:
    capability = trt_api.target_capability(gpu) or 0
    for target in targets:
        if target == gpu:
            return True
        if target == trt_api.RTX_DEFAULT and capability in trt_api.RTX_DEFAULT_CAPABILITIES:
            return True
        if target == trt_api.AMPERE_PLUS and capability >= 80:
            return True
    return False


def check_engine_record(record: EngineRecord, runtime: RuntimeInfo, *,
                        onnx_sha256: str | None = None, plan_path: str | Path | None = None,
                        bundle: str | Path | None = None) -> None:
    """Refuse an engine built for another builder, version, GPU or ONNX graph, or a changed plan.

    StaleEngineError lists every difference and the command that rebuilds; CorruptEngineError
    when the plan file's size or sha256 differ from the record. Version-compatible engines run
    on a newer runtime of the same major version only when `runtime.allow_version_compatible`.
    """
    stale = []
    if record.builder != runtime.builder:
        stale.append(f"built with {record.builder}, this runtime is {runtime.builder}")
    elif record.builder_version != runtime.builder_version:
        built, here = _version_tuple(record.builder_version), _version_tuple(runtime.builder_version)
        compatible = (record.flags.get("version_compatible", False) and built[:1] == here[:1]
                      and here >= built)
        if not compatible:
            stale.append(f"builder version {record.builder_version}, runtime {runtime.builder_version}")
        elif not runtime.allow_version_compatible:
            stale.append(f"builder version {record.builder_version}, runtime "
                         f"{runtime.builder_version} (the engine is version-compatible: opt in "
                         f"with allow_version_compatible to run it)")
    if runtime.gpu_target is not None and not _runs_on(record.targets, runtime.gpu_target):
        stale.append(f"GPU compute capability {runtime.gpu_target}, engine targets "
                     f"{list(record.targets)}")
    if onnx_sha256 is not None and onnx_sha256 != record.onnx_sha256:
        stale.append(f"ONNX sha256 {onnx_sha256[:12]}…, engine built from "
                     f"{record.onnx_sha256[:12]}…")
    if stale:
        raise StaleEngineError(f"{record.component} engine {record.key or record.file} is stale: "
                               f"{'; '.join(stale)}. Rebuild it: {rebuild_command(record, bundle)}")
    if plan_path is not None:
        check_plan(record, plan_path, bundle)


# --- engines listed in a bundle's manifest ----------------------------------------------------

def find_engine(bundle_dir: str | Path, component: str, runtime: RuntimeInfo, *,
                key: str | None = None) -> tuple[EngineRecord, Path]:
    """The newest engine of `component` in the bundle's manifest that passes
    `check_engine_record` here (this builder, version and GPU, the manifest's ONNX, an intact
    plan); returns its record and plan path.

    StaleEngineError / CorruptEngineError from the newest candidate when none passes;
    BundleError when the manifest lists no engine of `component` for this builder (or `key`).
    """
    from ldmrt.errors import BundleError
    from ldmrt.manifest import load_manifest

    bundle = Path(bundle_dir)
    manifest = load_manifest(bundle)
    entry = manifest.component(component)
    onnx_sha = entry.digest
    candidates = engines_for(manifest.engines, component, builder=runtime.builder, key=key)
    if not candidates:
        wanted = f"engine {key}" if key else f"{runtime.builder} engine"
        raise BundleError(f"bundle {bundle}: manifest.json lists no {wanted} for {component}; "
                          f"build one: ldmrt build {bundle} --backend {runtime.builder}")
    first_error: LdmrtError | None = None
    for record in candidates:
        try:
            plan = engine_plan_path(bundle, record)
            check_engine_record(record, runtime, onnx_sha256=onnx_sha, plan_path=plan,
                                bundle=bundle)
            return record, plan
        except (StaleEngineError, CorruptEngineError) as exc:
            first_error = first_error or exc
    assert first_error is not None
    raise first_error


# --- device memory, streams and graphs (cuda-python) ------------------------------------------

class CudaDevice:
    """The few cuda-python calls the runner needs; a test passes a fake with the same methods."""

    def __init__(self, device: int = 0) -> None:
        self.rt = trt_api.cudart()
        count = trt_api.check_cuda(self.rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
        if count <= device:
            raise BackendUnavailableError(f"CUDA device {device} requested, {count} visible")
        trt_api.check_cuda(self.rt.cudaSetDevice(device), "cudaSetDevice")

    def _ok(self, result: Any, what: str) -> Any:
        return trt_api.check_cuda(result, what)

    def malloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self._ok(self.rt.cudaFree(ptr), "cudaFree")

    def create_stream(self) -> Any:
        return self._ok(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def copy_to_device(self, ptr: int, array: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, stream),
                 "cudaMemcpyAsync (host to device)")

    def copy_to_host(self, array: np.ndarray, ptr: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._ok(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, stream),
                 "cudaMemcpyAsync (device to host)")

    def copy_device_to_device(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._ok(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream),
                 "cudaMemcpyAsync (device to device)")

    def synchronize(self, stream: Any) -> None:
        self._ok(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def begin_capture(self, stream: Any) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._ok(self.rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")

    def end_capture(self, stream: Any) -> Any:
        graph = self._ok(self.rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        executable = self._ok(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        self._ok(self.rt.cudaGraphDestroy(graph), "cudaGraphDestroy")
        return executable

    def launch(self, graph: Any, stream: Any) -> None:
        self._ok(self.rt.cudaGraphLaunch(graph, stream), "cudaGraphLaunch")

    def destroy_graph(self, graph: Any) -> None:
        self._ok(self.rt.cudaGraphExecDestroy(graph), "cudaGraphExecDestroy")

    def destroy_stream(self, stream: Any) -> None:
        self._ok(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")


# --- the runner -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str                                  # numpy name
    profiles: tuple[tuple[Shape, Shape, Shape], ...] = ()   # inputs: (min, opt, max) per profile
    shape: Shape = ()                           # as the network declares it: -1 where dynamic

    def graph_tensor(self) -> GraphTensor:
        return GraphTensor(self.name, self.dtype, tuple(None if d < 0 else d for d in self.shape))


def engine_io(engine: Any, api: TrtApi) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The engine's inputs (with their profile shapes) and outputs, in engine order."""
    inputs, outputs = [], []
    n_profiles = engine.num_optimization_profiles
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        dtype = trt_api.numpy_dtype_name(engine.get_tensor_dtype(name))
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        if engine.get_tensor_mode(name) == api.module.TensorIOMode.INPUT:
            profiles = tuple(tuple(tuple(int(d) for d in s) for s in
                                   engine.get_tensor_profile_shape(name, p))
                             for p in range(n_profiles))
            inputs.append(TensorInfo(name, dtype, profiles, shape))  # type: ignore[arg-type]
        else:
            outputs.append(TensorInfo(name, dtype, shape=shape))
    return inputs, outputs


def _volume(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


class _Worker:
    """One thread's execution context, stream, static buffers and captured graphs."""

    def __init__(self, context: Any, stream: Any) -> None:
        self.context = context
        self.stream = stream
        self.profile = 0
        self.buffers: dict[str, tuple[int, int]] = {}      # name -> (device pointer, bytes)
        self.graphs: dict[tuple, Any] = {}                  # shapes -> instantiated CUDA graph
        self.warm: set[tuple] = set()                       # shapes run once (graph capture next)


class TensorRTRunner:
    """Run one deserialized engine with checked inputs; one execution context per thread."""

    def __init__(self, plan: bytes, api: TrtApi, *, device: Any | None = None,
                 cuda_graphs: bool = False, allow_version_compatible: bool = False,
                 name: str = "engine", rebuild: str | None = None) -> None:
        self.api, self.name, self.cuda_graphs = api, name, cuda_graphs
        rebuild = rebuild or f"ldmrt build BUNDLE --backend {api.name}"
        self.device = device if device is not None else CudaDevice()
        self.runtime = api.module.Runtime(api.logger)
        if allow_version_compatible:
            # Version-compatible plans carry their own lean runtime, which is host code.
            self.runtime.engine_host_code_allowed = True
        validity = api.engine_validity(self.runtime, plan)
        if validity is not None and validity[0] == "INVALID":
            raise StaleEngineError(f"{name}: {api.name} {api.version} says the plan is invalid on "
                                   f"this machine ({', '.join(validity[1]) or 'no reason given'}); "
                                   f"rebuild it: {rebuild}")
        with api.capture() as messages:
            self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            # The record's sha256 was checked before: a plan that fails here is incompatible.
            raise StaleEngineError(f"{name}: {api.name} {api.version} could not deserialize the "
                                   f"plan ({' | '.join(messages[-3:]) or 'no message'}); rebuild it: "
                                   f"{rebuild}")
        self.inputs, self.outputs = engine_io(self.engine, api)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._workers: list[_Worker] = []

    @classmethod
    def from_record(cls, record_path: str | Path, api: TrtApi, *,
                    runtime: RuntimeInfo | None = None, onnx_sha256: str | None = None,
                    **kwargs: Any) -> "TensorRTRunner":
        """Check the record against this machine and the plan's sha256, then load the plan."""
        record_path = Path(record_path)
        record = read_engine_record(record_path)
        runtime = runtime or RuntimeInfo(api.name, api.version, trt_api.current_gpu_target(),
                                         kwargs.get("allow_version_compatible", False))
        plan_path = record_path.parent / record.file
        bundle = record_path.parent.parent.parent     # BUNDLE/engines/<key>/<record>
        check_engine_record(record, runtime, onnx_sha256=onnx_sha256, plan_path=plan_path,
                            bundle=bundle)
        return cls(plan_path.read_bytes(), api, name=record.component,
                   rebuild=rebuild_command(record, bundle), **kwargs)

    # --- checks -------------------------------------------------------------------------------

    def check_inputs(self, arrays: Mapping[str, np.ndarray]) -> int:
        """Every input's name, dtype and shape against the engine; returns the profile to use."""
        expected = [t.name for t in self.inputs]
        if sorted(arrays) != sorted(expected):
            raise ShapeError(f"{self.name}: expected inputs {expected}, found {sorted(arrays)}")
        for tensor in self.inputs:
            array = arrays[tensor.name]
            if str(array.dtype) != tensor.dtype:
                raise ShapeError(f"{self.name}.{tensor.name}: expected dtype {tensor.dtype}, "
                                 f"found {array.dtype}")
            rank = len(tensor.profiles[0][0])
            if array.ndim != rank:
                raise ShapeError(f"{self.name}.{tensor.name}: expected {rank} dimensions, found "
                                 f"shape {list(array.shape)}")
        return self.profile_for({name: tuple(a.shape) for name, a in arrays.items()})

    def profile_for(self, shapes: Mapping[str, Sequence[int]]) -> int:
        """The first optimization profile every input shape fits; ShapeError naming them otherwise."""
        for index in range(len(self.inputs[0].profiles) if self.inputs else 1):
            if all(self._fits(t, shapes[t.name], index) for t in self.inputs):
                return index
        ranges = {t.name: [(list(lo), list(hi)) for lo, _, hi in t.profiles] for t in self.inputs}
        found = {t.name: list(shapes[t.name]) for t in self.inputs}
        raise ShapeError(f"{self.name}: input shapes {found} fit no optimization profile of the "
                         f"engine (min, max per profile: {ranges}); rebuild with a wider profile")

    @staticmethod
    def _fits(tensor: TensorInfo, shape: Sequence[int], profile: int) -> bool:
        lo, _, hi = tensor.profiles[profile]
        return all(a <= s <= b for a, s, b in zip(lo, shape, hi))

    def _require(self, ok: Any, what: str, error: type[LdmrtError] = BackendUnavailableError) -> None:
        """TensorRT reports most failures as a False return (and a log line): never ignore one."""
        if not ok:
            raise error(f"{self.name}: {self.api.name} refused {what}; see the TensorRT log above")

    # --- execution ----------------------------------------------------------------------------

    def _worker(self) -> _Worker:
        worker = getattr(self._local, "worker", None)
        if worker is None:
            with self._lock:
                context = self.engine.create_execution_context()
                if context is None:
                    raise BackendUnavailableError(f"{self.name}: could not create an execution "
                                                  f"context (out of GPU memory?)")
                worker = _Worker(context, self.device.create_stream())
                self._workers.append(worker)
            self._local.worker = worker
        return worker

    def _ensure_buffer(self, worker: _Worker, name: str, nbytes: int) -> None:
        ptr, capacity = worker.buffers.get(name, (0, -1))
        if nbytes <= capacity:
            return
        if capacity >= 0:
            self.device.free(ptr)
        self._drop_graphs(worker)              # graphs hold the old addresses
        ptr = self.device.malloc(nbytes)
        worker.buffers[name] = (ptr, nbytes)
        self._require(worker.context.set_tensor_address(name, ptr), f"set_tensor_address({name})")

    def _reserve(self, worker: _Worker, profile: int) -> None:
        """Allocate every buffer once, at the profile's max shapes, so addresses stay fixed."""
        for tensor in self.inputs:
            shape = tensor.profiles[profile][2]
            self._require(worker.context.set_input_shape(tensor.name, shape),
                          f"set_input_shape({tensor.name}, {list(shape)})", ShapeError)
            self._ensure_buffer(worker, tensor.name, _volume(shape) * trt_api.itemsize(tensor.dtype))
        for tensor in self.outputs:
            shape = tuple(worker.context.get_tensor_shape(tensor.name))
            if min(shape, default=0) >= 0:
                self._ensure_buffer(worker, tensor.name,
                                    _volume(shape) * trt_api.itemsize(tensor.dtype))

    def run(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check inputs, copy them in, execute (or replay a CUDA graph), copy outputs back."""
        profile = self.check_inputs(arrays)
        worker = self._worker()
        if all(self._fits(t, arrays[t.name].shape, worker.profile) for t in self.inputs):
            profile = worker.profile     # stay on the current profile: switching drops graphs
        context, stream = worker.context, worker.stream
        handle = self.device.stream_handle(stream)
        if profile != worker.profile or not worker.buffers:
            if profile != worker.profile:
                self._require(context.set_optimization_profile_async(profile, handle),
                              f"set_optimization_profile_async({profile})")
                worker.profile = profile
            self._reserve(worker, profile)
        for tensor in self.inputs:
            shape = tuple(arrays[tensor.name].shape)
            self._require(context.set_input_shape(tensor.name, shape),
                          f"set_input_shape({tensor.name}, {list(shape)})", ShapeError)
        out_shapes = {}
        for tensor in self.outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(tensor.name))
            if min(shape, default=0) < 0:
                raise ShapeError(f"{self.name}.{tensor.name}: output shape {list(shape)} is not "
                                 f"determined by the input shapes")
            self._ensure_buffer(worker, tensor.name, _volume(shape) * trt_api.itemsize(tensor.dtype))
            out_shapes[tensor.name] = shape
        for tensor in self.inputs:
            array = np.ascontiguousarray(arrays[tensor.name])
            self.device.copy_to_device(worker.buffers[tensor.name][0], array, stream)
        self._execute(worker, tuple(tuple(arrays[t.name].shape) for t in self.inputs), handle)
        results = {}
        for tensor in self.outputs:
            out = np.empty(out_shapes[tensor.name], dtype=tensor.dtype)
            self.device.copy_to_host(out, worker.buffers[tensor.name][0], stream)
            results[tensor.name] = out
        self.device.synchronize(stream)
        return results

    __call__ = run

    def _execute(self, worker: _Worker, shapes: tuple, handle: int) -> None:
        graph = worker.graphs.get(shapes)
        if graph is not None:
            self.device.launch(graph, worker.stream)
            return
        capture = self.cuda_graphs and shapes in worker.warm
        capturable = getattr(worker.context, "is_stream_capturable", None)
        if capture and capturable is not None and not capturable(handle):
            log.info("%s: context is not stream-capturable at %s; running without a CUDA graph",
                     self.name, shapes)
            capture = False
        if not capture:
            self._require(worker.context.execute_async_v3(handle), "execute_async_v3")
            worker.warm.add(shapes)
            return
        self.device.begin_capture(worker.stream)
        try:
            ok = worker.context.execute_async_v3(handle)
        finally:
            graph = self.device.end_capture(worker.stream)
        self._require(ok, "execute_async_v3 (during CUDA graph capture)")
        worker.graphs[shapes] = graph
        self.device.launch(graph, worker.stream)

    def _drop_graphs(self, worker: _Worker) -> None:
        for graph in worker.graphs.values():
            self.device.destroy_graph(graph)
        worker.graphs.clear()
        worker.warm.clear()

    def drop_graphs(self) -> None:
        """Destroy every thread's captured CUDA graphs (after a refit: they must not replay what
        the engine held before); the next runs warm up and capture again. No run may be in flight
        (the pipeline's adapter lock sees to it)."""
        with self._lock:
            for worker in self._workers:
                self._drop_graphs(worker)

    def close(self) -> None:
        """Free every worker's graphs, buffers and stream (the engine goes with the runner)."""
        with self._lock:
            for worker in self._workers:
                for graph in worker.graphs.values():
                    self.device.destroy_graph(graph)
                for ptr, _ in worker.buffers.values():
                    self.device.free(ptr)
                self.device.destroy_stream(worker.stream)
            self._workers.clear()
            self._local = threading.local()


# --- the pipeline's view: one runner per component of a bundle --------------------------------

class _ComponentEngine:
    """A component's engine behind the pipeline's runner interface (first output as numpy)."""

    def __init__(self, spec: ComponentSpec, runner: TensorRTRunner) -> None:
        self.spec, self.runner = spec, runner
        self.output = spec.outputs[0].name
        spec.check_graph([t.graph_tensor() for t in runner.inputs],
                         [t.graph_tensor() for t in runner.outputs], f"{runner.name} engine")

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        values = self.spec.bind(inputs)
        return self.spec.check_output(self.output, self.runner.run(inputs)[self.output], values)

    def run_all(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.spec.bind(inputs)
        outputs = self.runner.run(inputs)
        return {t.name: self.spec.check_output(t.name, outputs[t.name], values) for t in self.spec.outputs}


def open_tensorrt(bundle: Path, manifest: Any, components: Sequence[str], *, backend: str = "tensorrt",
                  cuda_graphs: bool = True, allow_version_compatible: bool = False,
                  device: Any = None) -> "BackendRunners":
    """Checked engines for `components` (StaleEngineError / CorruptEngineError before any load)
    and the loop: BackendRunners(runners, the TensorRTDenoiser where the bundle has a
    denoise_step engine, else the numpy loop; engines/tensorrt_denoise.py)."""
    from ldmrt.engines.base import BackendRunners
    from ldmrt.engines.tensorrt_denoise import open_denoiser
    from ldmrt.engines.trt_lora import trt_switch

    api = trt_api.load(backend)
    runtime = RuntimeInfo.detect(backend, allow_version_compatible=allow_version_compatible)
    # Every engine is found and checked before CUDA is touched: a missing or stale engine is
    # the error a user can act on (`ldmrt build`), whatever else this machine lacks.
    found = {name: find_engine(bundle, name, runtime) for name in components}
    device = device if device is not None else CudaDevice()

    def load(name: str) -> TensorRTRunner:
        record, plan_path = found[name] if name in found else find_engine(bundle, name, runtime)
        return TensorRTRunner(plan_path.read_bytes(), api, device=device, cuda_graphs=cuda_graphs,
                              allow_version_compatible=allow_version_compatible, name=name,
                              rebuild=rebuild_command(record, bundle))

    runners = {name: _ComponentEngine(manifest.component(name).spec, load(name)) for name in components}
    unet = runners.get(Component.UNET)
    denoiser = None if unet is None else open_denoiser(manifest, unet, load, cuda_graphs=cuda_graphs)

    def after_refit(component: str) -> None:       # the loop's captured graphs replay the UNet engine
        if component == Component.UNET and hasattr(denoiser, "drop_graphs"):
            denoiser.drop_graphs()

    weights = trt_switch(api, lambda name: bundle / manifest.component(name).file,
                         {name: engine.runner for name, engine in runners.items()}, after_refit)
    return BackendRunners(runners, denoiser, weights=weights)
