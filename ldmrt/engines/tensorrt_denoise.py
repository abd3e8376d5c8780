"""The TensorRT denoiser: the UNet engine and the bundle's update graph on device buffers.

Lean: numpy, the standard library and the runner's TensorRT module and `CudaDevice`. Per job
the state (latents, history, noise, the step table, a device step counter) is uploaded once;
each model evaluation is then two engine launches (the UNet, then `denoise_step`: guidance,
the sampler update and the next UNet input) and device-to-device copies of the step's `next_*`
outputs into its inputs, with no host copy and no synchronisation until the final latents
come back. After one warm-up evaluation those enqueues are captured as one CUDA graph per
shape and replayed for every later evaluation, and for every evaluation of a later job of the
same shape. Each thread has its own execution contexts, stream, buffers and graphs.
"""
from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from ldmrt.engines import trt_api
from ldmrt.errors import (BackendUnavailableError, BundleError, CorruptEngineError, GenerationError, LdmrtError,
                          ShapeError)
from ldmrt.iospec import Component, ComponentSpec, GraphTensor
from ldmrt.sampling.denoise import (MAX_HISTORY, STEP_TABLE_COLUMNS, DenoiseJob, DenoiseResult,
                                    Denoiser, NumpyDenoiser, StepCallback, step_table)

log = logging.getLogger(__name__)

STEP_COMPONENT = Component.DENOISE_STEP
PAST = MAX_HISTORY - 1                 # x_{i-1} .. x_{i-4} and m_{i-1} .. m_{i-4}
UNET_STATE = ("sample", "timestep")    # the UNet inputs the update graph writes each step
STEP_INPUTS = {"latents": "float32", "model_output": None, "past_latents": "float32",
               "past_outputs": "float32", "noise": "float32", "step_table": "float32",
               "step_index": "int32", "guidance": "float32"}     # None: the UNet output's dtype
STEP_OUTPUTS = {"next_latents": "float32", "next_past_latents": "float32",
                "next_past_outputs": "float32", "next_step_index": "int32",
                "next_sample": None, "next_timestep": "float32"}  # None: the UNet sample's dtype
# What each evaluation's outputs become for the next one (destination <- source).
CARRIED = (("latents", "next_latents"), ("past_latents", "next_past_latents"),
           ("past_outputs", "next_past_outputs"), ("step_index", "next_step_index"),
           ("sample", "next_sample"), ("timestep", "next_timestep"))
_RE_EXPORT = "re-export the bundle with `ldmrt export` and rebuild its engines"


Shape = tuple[int, ...]


class EngineTensor(Protocol):
    """An engine's tensor as its runner lists it (ldmrt.engines.tensorrt.TensorInfo)."""
    name: str
    dtype: str                                          # numpy name
    profiles: tuple[tuple[Shape, Shape, Shape], ...]    # inputs: (min, opt, max) per profile

    def graph_tensor(self) -> GraphTensor: ...


class EngineRunner(Protocol):
    """What the denoiser uses of a `TensorRTRunner`: its engine, device, tensors and checks.
    (ldmrt.engines.tensorrt opens this module, so this module does not import it.)"""
    name: str
    engine: Any
    device: Any
    inputs: Sequence[EngineTensor]
    outputs: Sequence[EngineTensor]

    def _require(self, ok: Any, what: str, error: type[LdmrtError] = BackendUnavailableError) -> None: ...

    def profile_for(self, shapes: Mapping[str, Sequence[int]]) -> int: ...


@dataclass(frozen=True)
class ShapeKey:
    """What one set of device buffers and one CUDA graph are specialised for."""
    latents: tuple[int, ...]                           # (B, C, h, w)
    unet_batch: int                                    # B unguided, 2B guided
    evaluations: int                                   # N: rows of the step table and the noise
    conditioning: tuple[tuple[str, tuple[int, ...]], ...]


@dataclass
class _Buffer:
    ptr: int
    nbytes: int
    shape: tuple[int, ...]


@dataclass
class _ShapeState:
    """One shape's device buffers (every tensor of both engines, by name), profiles and graph."""
    key: ShapeKey
    buffers: dict[str, _Buffer]
    profiles: tuple[int, int]                          # (UNet, denoise_step)
    graph: Any = None
    warm: bool = False                                 # evaluated once: capture on the next one


@dataclass
class _Worker:
    """One thread's execution contexts (UNet, denoise_step), stream and per-shape state."""
    unet: Any
    step: Any
    stream: Any
    profiles: list[int] = field(default_factory=lambda: [0, 0])
    states: "OrderedDict[ShapeKey, _ShapeState]" = field(default_factory=OrderedDict)
    bound: ShapeKey | None = None                     # whose buffers and shapes the contexts hold


class TensorRTDenoiser:
    """The `Denoiser` of the TensorRT backends: the whole loop on the device (see the module doc).

    `unet` and `step` are the runners of the UNet engine and of the bundle's `denoise_step`
    engine (the update graph, ldmrt/export/step_graph.py); both run on `unet.device`. Their specs,
    when given, check the engines' I/O as the manifest declares it. `cuda_graphs`: capture one
    graph per shape after a warm-up evaluation. `max_shapes`: shapes whose buffers and graph a
    thread keeps (least recently used ones are freed). `on_step(done, total)` is called after each
    evaluation is enqueued, so it reports progress ahead of the device; an exception it raises
    stops the loop (the enqueued work is drained, the state stays reusable). Non-finite latents
    show in the result only: the loop never looks at the device.
    """

    def __init__(self, unet: EngineRunner, step: EngineRunner, *,
                 unet_spec: ComponentSpec | None = None, step_spec: ComponentSpec | None = None,
                 cuda_graphs: bool = True, max_shapes: int = 4) -> None:
        self.unet, self.step, self.device = unet, step, unet.device
        self.cuda_graphs, self.max_shapes = cuda_graphs, max(1, int(max_shapes))
        for spec, runner in ((unet_spec, unet), (step_spec, step)):
            if spec is not None:
                spec.check_graph([t.graph_tensor() for t in runner.inputs],
                                 [t.graph_tensor() for t in runner.outputs], f"{runner.name} engine")
        self.tensors = _check_engines(unet, step)      # name -> EngineTensor, both engines
        self.conditioning = tuple(t.name for t in unet.inputs if t.name not in UNET_STATE)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._workers: list[_Worker] = []

    # --- the loop ---------------------------------------------------------------------------

    def __call__(self, job: DenoiseJob, on_step: StepCallback | None = None) -> DenoiseResult:
        if job.image_guide is not None:     # the pipeline refuses first: this backend has no decoder gradient
            raise GenerationError("guide_image: post-hoc image guidance needs the decoder's gradient; the "
                                  "TensorRT loop has none: use --backend torch", field="guide_image")
        plan = job.plan
        total = plan.num_evaluations
        table = step_table(plan)                                       # (N, 17) float32
        feeds = self._conditioning(job)
        latents = np.ascontiguousarray(job.latents, dtype=np.float32)  # (B, C, h, w)
        key = ShapeKey(latents.shape, job.unet_batch, total,
                       tuple((name, feeds[name].shape) for name in self.conditioning))
        worker = self._worker()
        state = self._state_for(worker, key)
        self._bind(worker, state)
        stream = worker.stream
        try:
            self._upload(worker, state, job, latents, feeds, table)
            for done in range(1, total + 1):
                self._evaluate(worker, state)
                if on_step is not None:
                    on_step(done, total)
        except BaseException:
            self._drain(worker)
            raise
        out = np.empty(latents.shape, np.float32)
        self.device.copy_to_host(out, state.buffers["latents"].ptr, stream)
        self.device.synchronize(stream)
        return DenoiseResult(out, total, None)

    def _conditioning(self, job: DenoiseJob) -> dict[str, np.ndarray]:
        """The job's conditioning in the UNet engine's dtypes; ShapeError naming what is missing."""
        if sorted(job.conditioning) != sorted(self.conditioning):
            raise ShapeError(f"conditioning: the {self.unet.name} engine takes "
                             f"{list(self.conditioning) or 'no conditioning inputs'}, found "
                             f"{sorted(job.conditioning)}", field="conditioning")
        feeds = {}
        for name in self.conditioning:
            info, value = self.tensors[name], np.asarray(job.conditioning[name])
            rank = len(info.profiles[0][0])
            if value.ndim != rank:
                raise ShapeError(f"{name}: the {self.unet.name} engine expects {rank} dimensions, "
                                 f"found shape {list(value.shape)}", field=name)
            feeds[name] = np.ascontiguousarray(value, dtype=_numpy_dtype(info))
        return feeds

    def _upload(self, worker: _Worker, state: _ShapeState, job: DenoiseJob, latents: np.ndarray,
                feeds: Mapping[str, np.ndarray], table: np.ndarray) -> None:
        """Everything the loop reads, once; history zeroed, step counter at 0."""
        plan, buffers = job.plan, state.buffers
        scale = plan.input_scale[0]
        scaled = latents * scale if scale != 1.0 else latents          # as NumpyDenoiser does
        sample = np.concatenate([scaled] * (job.unet_batch // latents.shape[0]))
        history = np.zeros(buffers["past_latents"].shape, np.float32)  # (4, B, C, h, w)
        arrays = {
            **feeds, "latents": latents,
            "sample": sample.astype(_numpy_dtype(self.tensors["sample"])),
            "timestep": np.full((job.unet_batch,), plan.timesteps[0], np.float32),
            "past_latents": history, "past_outputs": history, "noise": job.stacked_noise(),
            "step_table": table, "step_index": np.zeros((1,), np.int32),
            "guidance": np.array([1.0 if job.guidance is None else job.guidance], np.float32)}
        for name, array in arrays.items():
            buffer = buffers[name]
            if tuple(array.shape) != buffer.shape or array.nbytes != buffer.nbytes:
                raise ShapeError(f"{name}: expected shape {list(buffer.shape)} ({buffer.nbytes} "
                                 f"bytes), found {list(array.shape)} ({array.nbytes} bytes)",
                                 field=name)
            self.device.copy_to_device(buffer.ptr, np.ascontiguousarray(array), worker.stream)

    def _evaluate(self, worker: _Worker, state: _ShapeState) -> None:
        """One evaluation: replay the shape's graph, or enqueue (warm-up), or capture then replay."""
        stream = worker.stream
        if state.graph is not None:
            self.device.launch(state.graph, stream)
            return
        if not (self.cuda_graphs and state.warm and self._capturable(worker)):
            self._enqueue(worker, state)
            state.warm = True
            return
        self.device.begin_capture(stream)
        try:
            self._enqueue(worker, state, " (during CUDA graph capture)")
        except BaseException:
            self._abandon_capture(stream)
            raise
        state.graph = self.device.end_capture(stream)
        self.device.launch(state.graph, stream)

    def _enqueue(self, worker: _Worker, state: _ShapeState, when: str = "") -> None:
        handle = self.device.stream_handle(worker.stream)
        self.unet._require(worker.unet.execute_async_v3(handle), f"execute_async_v3{when}")
        self.step._require(worker.step.execute_async_v3(handle), f"execute_async_v3{when}")
        for destination, source in CARRIED:
            dst, src = state.buffers[destination], state.buffers[source]
            self.device.copy_device_to_device(dst.ptr, src.ptr, dst.nbytes, worker.stream)

    def _capturable(self, worker: _Worker) -> bool:
        handle = self.device.stream_handle(worker.stream)
        for runner, context in ((self.unet, worker.unet), (self.step, worker.step)):
            check = getattr(context, "is_stream_capturable", None)
            if check is not None and not check(handle):
                log.info("%s: context is not stream-capturable; denoising without a CUDA graph",
                         runner.name)
                return False
        return True

    def _abandon_capture(self, stream: Any) -> None:
        try:
            self.device.destroy_graph(self.device.end_capture(stream))
        except LdmrtError as exc:       # an invalidated capture: the first error is the one to see
            log.warning("denoiser: ending a failed CUDA graph capture: %s", exc)

    def _drain(self, worker: _Worker) -> None:
        """Wait for what was enqueued before a stop, so the next job starts on an idle stream."""
        try:
            self.device.synchronize(worker.stream)
        except LdmrtError as exc:
            log.warning("denoiser: synchronising after a stopped loop: %s", exc)

    # --- per-thread contexts and per-shape buffers ---------------------------------------------

    def _worker(self) -> _Worker:
        worker = getattr(self._local, "worker", None)
        if worker is None:
            with self._lock:
                contexts = []
                for runner in (self.unet, self.step):
                    context = runner.engine.create_execution_context()
                    if context is None:
                        raise BackendUnavailableError(f"{runner.name}: could not create an "
                                                      f"execution context (out of GPU memory?)")
                    contexts.append(context)
                worker = _Worker(*contexts, stream=self.device.create_stream())
                self._workers.append(worker)
            self._local.worker = worker
        return worker

    def _shapes(self, key: ShapeKey) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape for `key`, as the update graph's contract states it."""
        latents, u, n = key.latents, key.unet_batch, key.evaluations
        unet_sized = (u, *latents[1:])
        past = (PAST, *latents)
        return {"sample": unet_sized, "timestep": (u,), **dict(key.conditioning),
                "model_output": unet_sized, "latents": latents, "past_latents": past,
                "past_outputs": past, "noise": (n, *latents),
                "step_table": (n, len(STEP_TABLE_COLUMNS)), "step_index": (1,), "guidance": (1,),
                "next_latents": latents, "next_past_latents": past, "next_past_outputs": past,
                "next_step_index": (1,), "next_sample": unet_sized, "next_timestep": (u,)}

    def _state_for(self, worker: _Worker, key: ShapeKey) -> _ShapeState:
        state = worker.states.get(key)
        if state is not None:
            worker.states.move_to_end(key)
            return state
        shapes = self._shapes(key)
        profiles = (self.unet.profile_for(shapes), self.step.profile_for(shapes))
        while len(worker.states) >= self.max_shapes:
            self._release(worker, worker.states.popitem(last=False)[1])
        buffers: dict[str, _Buffer] = {}
        try:
            for name, info in self.tensors.items():
                nbytes = math.prod(shapes[name]) * trt_api.itemsize(info.dtype)
                buffers[name] = _Buffer(self.device.malloc(nbytes), nbytes, shapes[name])
        except BaseException:
            for buffer in buffers.values():
                self.device.free(buffer.ptr)
            raise
        state = worker.states[key] = _ShapeState(key, buffers, profiles)
        return state

    def _release(self, worker: _Worker, state: _ShapeState) -> None:
        if state.graph is not None:
            self.device.destroy_graph(state.graph)
        for buffer in state.buffers.values():
            self.device.free(buffer.ptr)
        if worker.bound == state.key:
            worker.bound = None

    def _bind(self, worker: _Worker, state: _ShapeState) -> None:
        """Point both contexts at this shape's profiles, input shapes and buffers."""
        if worker.bound == state.key:
            return
        worker.bound = None
        handle = self.device.stream_handle(worker.stream)
        for index, (runner, context) in enumerate(((self.unet, worker.unet), (self.step, worker.step))):
            profile = state.profiles[index]
            if worker.profiles[index] != profile:
                runner._require(context.set_optimization_profile_async(profile, handle),
                                f"set_optimization_profile_async({profile})")
                worker.profiles[index] = profile
            for tensor in runner.inputs:
                shape = state.buffers[tensor.name].shape
                runner._require(context.set_input_shape(tensor.name, shape),
                                f"set_input_shape({tensor.name}, {list(shape)})", ShapeError)
            for tensor in runner.outputs:
                expected = state.buffers[tensor.name].shape
                found = tuple(int(d) for d in context.get_tensor_shape(tensor.name))
                if found != expected:
                    raise BundleError(f"{runner.name}.{tensor.name}: the engine gives shape "
                                      f"{list(found)} for these inputs, the denoiser expects "
                                      f"{list(expected)}; {_RE_EXPORT}")
            for tensor in (*runner.inputs, *runner.outputs):
                runner._require(context.set_tensor_address(tensor.name, state.buffers[tensor.name].ptr),
                                f"set_tensor_address({tensor.name})")
        worker.bound = state.key

    def drop_graphs(self) -> None:
        """Destroy every captured loop graph (after the UNet engine is refitted: a replay would run
        what it held before); each shape warms up and captures again. No loop may be in flight."""
        with self._lock:
            for worker in self._workers:
                for state in worker.states.values():
                    if state.graph is not None:
                        self.device.destroy_graph(state.graph)
                    state.graph, state.warm = None, False

    def close(self) -> None:
        """Free every thread's graphs, buffers and stream (the engines go with their runners)."""
        with self._lock:
            for worker in self._workers:
                for state in worker.states.values():
                    self._release(worker, state)
                worker.states.clear()
                self.device.destroy_stream(worker.stream)
            self._workers.clear()
            self._local = threading.local()


# --- checks ----------------------------------------------------------------------------------

def _check_engines(unet: EngineRunner, step: EngineRunner) -> dict[str, EngineTensor]:
    """Both engines' tensors by name, once the update graph's I/O fits the UNet engine's."""
    unet_in = {t.name: t for t in unet.inputs}
    unet_out = {t.name: t for t in unet.outputs}
    if not set(UNET_STATE) <= set(unet_in) or list(unet_out) != ["model_output"]:
        raise BundleError(f"{unet.name} engine: expected inputs {list(UNET_STATE)} (+ conditioning) "
                          f"and the one output ['model_output'], found inputs {list(unet_in)}, "
                          f"outputs {list(unet_out)}; {_RE_EXPORT}")
    for group, declared, default, tensors in (
            ("inputs", STEP_INPUTS, unet_out["model_output"].dtype, step.inputs),
            ("outputs", STEP_OUTPUTS, unet_in["sample"].dtype, step.outputs)):
        wanted = {name: dtype or default for name, dtype in declared.items()}
        found = {t.name: t.dtype for t in tensors}
        if found != wanted:
            raise BundleError(f"{step.name} engine: expected {group} {wanted} (the update graph of "
                              f"this {unet.name}: model_output as the UNet returns it, next_sample "
                              f"as it takes it), found {found}; {_RE_EXPORT}")
    if unet_in["timestep"].dtype != "float32":
        raise BundleError(f"{unet.name}.timestep: expected dtype float32, found "
                          f"{unet_in['timestep'].dtype}; {_RE_EXPORT}")
    tensors = {**unet_in, **unet_out}
    for tensor in (*step.inputs, *step.outputs):
        tensors.setdefault(tensor.name, tensor)     # model_output: one buffer, the UNet's output
    return tensors


def _numpy_dtype(info: EngineTensor) -> np.dtype:
    try:
        return np.dtype(info.dtype)
    except TypeError:
        raise BackendUnavailableError(f"{info.name}: the engine takes {info.dtype}, which numpy "
                                      f"cannot write; export the graph with float32 or float16 "
                                      f"inputs") from None


# --- the backend's choice -------------------------------------------------------------------

def open_denoiser(manifest: Any, unet: Any, load: Callable[[str], EngineRunner], *,
                  cuda_graphs: bool = True) -> Denoiser:
    """The TensorRTDenoiser over the opened UNet (`unet`: its checked component engine, with
    `.runner` and `.spec`) when the bundle has a `denoise_step` graph with an engine here
    (`load(name)` finds, checks and loads one), else the numpy loop over `unet`, saying why.
    A stale or corrupt denoise_step engine is refused like any other engine."""
    if STEP_COMPONENT not in manifest.components:
        log.info("TensorRT: the bundle has no %s graph (exported before the update graph); "
                 "denoising with the numpy loop over the UNet engine. Re-export to run the loop "
                 "on the device", STEP_COMPONENT)
        return NumpyDenoiser(unet, unet.spec)
    try:
        step = load(STEP_COMPONENT)
    except BundleError as exc:     # the manifest lists no engine of it for this backend
        if isinstance(exc, CorruptEngineError):
            raise
        log.info("TensorRT: %s; denoising with the numpy loop over the UNet engine", exc)
        return NumpyDenoiser(unet, unet.spec)
    return TensorRTDenoiser(unet.runner, step, unet_spec=unet.spec,
                            step_spec=manifest.component(STEP_COMPONENT).spec,
                            cuda_graphs=cuda_graphs)
