"""The TensorRT denoiser on fakes: device memory as numpy bytes keyed by pointer, engines that
compute from the buffers bound to them, CUDA graphs that record enqueued work and replay it.

The reference is NumpyDenoiser over the same fake UNet; the update graph is either a numpy
implementation of its contract written here, or (where ldmrt/export/step_graph.py exists) the
exported ONNX graph itself under ONNX Runtime.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import threading
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ldmrt.config import SAMPLERS, PredictionType, SchedulerConfig
from ldmrt.engines import tensorrt as trt_module
from ldmrt.engines import trt_api
from ldmrt.engines.tensorrt import RuntimeInfo, TensorRTRunner
from ldmrt.engines.tensorrt_denoise import STEP_COMPONENT, TensorRTDenoiser
from ldmrt.errors import (BackendUnavailableError, BundleError, CorruptEngineError, ShapeError,
                          StaleEngineError)
from ldmrt.iospec import ComponentSpec, TensorSpec, parse_dim
from ldmrt.sampling import DenoiseJob, NumpyDenoiser, make_plan
from tests.test_tensorrt import DataType, FakeDevice, TensorIOMode, fake_api

TRT_DTYPES = {"float32": DataType.FLOAT, "float16": DataType.HALF, "int32": DataType.INT32}
LATENT = ("batch", 4, "latent_height", "latent_width")
SIZES = {"latent_height": (4, 8, 16), "latent_width": (4, 8, 16)}
CONTEXT_SHAPE = (3, 8)            # (L, D) of the fake text embeddings


def rel_l2(found: np.ndarray, expected: np.ndarray) -> float:
    found, expected = np.asarray(found, np.float64), np.asarray(expected, np.float64)
    assert np.isfinite(found).all()
    return float(np.linalg.norm(found - expected) / np.linalg.norm(expected))


# --- the fake device and engines ---------------------------------------------------------------

class RecordingDevice(FakeDevice):
    """FakeDevice that records every host-visible call in order and copies device to device."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []
        self.captures = 0

    def copy_to_device(self, ptr, array, stream):
        self.ops.append(("h2d", ptr))
        super().copy_to_device(ptr, array, stream)

    def copy_to_host(self, array, ptr, stream):
        self.ops.append(("d2h", ptr))
        super().copy_to_host(array, ptr, stream)

    def copy_device_to_device(self, dst, src, nbytes, stream):
        assert len(self.memory[dst]) >= nbytes and len(self.memory[src]) >= nbytes
        self.ops.append(("d2d", dst, src))

        def copy():
            self.memory[dst][:nbytes] = self.memory[src][:nbytes]
        self.enqueue(copy)

    def synchronize(self, stream):
        self.ops.append(("sync",))

    def begin_capture(self, stream):
        self.captures += 1
        self.ops.append(("capture",))
        super().begin_capture(stream)

    def launch(self, graph, stream):
        self.ops.append(("launch",))
        super().launch(graph, stream)

    def enqueue(self, work):
        if self.capturing is not None:
            self.capturing.append(work)
        else:
            work()

    def read(self, ptr, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(bytes(self.memory[ptr][:n]), dtype).reshape(shape).copy()


class SpecEngine:
    """A fake engine with `spec`'s I/O and profiles: `compute(inputs) -> outputs` in numpy, on
    what the bound buffers hold when the enqueued work runs."""

    def __init__(self, device, spec, compute, profiles=None, refuse=()):
        self.device, self.spec, self.compute, self.refuse = device, spec, compute, set(refuse)
        self.profiles = profiles or [spec.profile()]
        self.num_optimization_profiles = len(self.profiles)
        self.tensors = {t.name: t for t in (*spec.inputs, *spec.outputs)}
        self.input_names = [t.name for t in spec.inputs]
        self.num_io_tensors = len(self.tensors)
        self.contexts, self.enqueues, self.computations = [], 0, 0

    def get_tensor_name(self, index):
        return list(self.tensors)[index]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.input_names else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return TRT_DTYPES[self.tensors[name].dtype]

    def get_tensor_profile_shape(self, name, index):
        return [list(s) for s in self.profiles[index][name]]

    def get_tensor_shape(self, name):
        return [-1 if parse_dim(d)[1] else parse_dim(d)[0] for d in self.tensors[name].shape]

    def create_execution_context(self):
        context = SpecContext(self)
        self.contexts.append(context)
        return context


class SpecContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.profile = engine, {}, {}, 0
        self.capturable = True

    def _ok(self, call):
        return call not in self.engine.refuse

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return self._ok("set_optimization_profile_async")

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profiles[self.profile][name]
        self.shapes[name] = tuple(shape)
        return self._ok("set_input_shape") and all(a <= s <= b for a, s, b in zip(lo, shape, hi))

    def get_tensor_shape(self, name):
        if name in self.engine.input_names:
            return list(self.shapes[name])
        if any(n not in self.shapes for n in self.engine.input_names):
            return self.engine.get_tensor_shape(name)
        values = self.engine.spec.bind({n: np.broadcast_to(np.zeros((), self.engine.tensors[n].dtype),
                                                           self.shapes[n])
                                        for n in self.engine.input_names})
        return list(self.engine.tensors[name].resolve(values))

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return self._ok("set_tensor_address")

    def is_stream_capturable(self, stream):
        return self.capturable

    def execute_async_v3(self, stream):
        engine, device = self.engine, self.engine.device
        if not self._ok("execute_async_v3"):
            return False
        engine.enqueues += 1
        device.ops.append(("execute", engine.spec.name))
        # What the engine reads and writes is fixed at enqueue time (and baked into a capture).
        addresses = dict(self.addresses)
        shapes = {name: tuple(self.get_tensor_shape(name)) for name in engine.tensors}

        def run():
            engine.computations += 1
            feeds = {n: device.read(addresses[n], shapes[n], engine.tensors[n].dtype)
                     for n in engine.input_names}
            for name, value in engine.compute(feeds).items():
                tensor = engine.tensors[name]
                assert value.shape == shapes[name], (name, value.shape, shapes[name])
                data = np.ascontiguousarray(value, tensor.dtype).tobytes()
                device.memory[addresses[name]][:len(data)] = data
        device.enqueue(run)
        return True


# --- the fake UNet and the update graph's contract in numpy --------------------------------------

def fake_unet(sample, timestep, context=None):
    """Nonlinear in the sample, different at every timestep and for every conditioning row."""
    dtype = sample.dtype
    x = sample.astype(np.float32)
    t = (timestep.astype(np.float32) / np.float32(1000))[:, None, None, None]
    out = np.tanh(x * (np.float32(0.5) + t)) + np.float32(0.1) * np.cos(np.float32(3) * t) * x
    if context is not None:
        c = context.reshape(len(context), -1).astype(np.float32).mean(axis=1)[:, None, None, None]
        out = out + np.float32(0.3) * np.sin(c + np.float32(0.5)) * np.cos(x)
    return out.astype(dtype)


def unet_compute(conditioning):
    return lambda feeds: {"model_output": fake_unet(feeds["sample"], feeds["timestep"],
                                                    feeds.get(conditioning))}


def contract_step(feeds):
    """The denoise_step contract, written from its statement (float32, plan.step's term order)."""
    x, out = feeds["latents"], feeds["model_output"].astype(np.float32)
    table, i = feeds["step_table"], int(feeds["step_index"][0])
    n, b = table.shape[0], x.shape[0]
    uncond, cond = out[:b], out[out.shape[0] - b:]
    m = uncond + feeds["guidance"][0] * (cond - uncond) if out.shape[0] == 2 * b else out
    row = table[i]
    a, bb = row[2:7], row[7:12]
    c, p, q, e, r = row[12:17]
    nxt = x * a[0]
    nxt = nxt + m * bb[0]
    for lag in range(1, 5):
        nxt = nxt + feeds["past_latents"][lag - 1] * a[lag]
        nxt = nxt + feeds["past_outputs"][lag - 1] * bb[lag]
    nxt = nxt + np.clip(x * p + m * q, -r, r) * e
    nxt = nxt + feeds["noise"][i] * c
    following = table[(i + 1) % n]
    sample = np.concatenate([nxt * following[1]] * (out.shape[0] // b))
    return {"next_latents": nxt,
            "next_past_latents": np.concatenate([x[None], feeds["past_latents"][:3]]),
            "next_past_outputs": np.concatenate([m[None], feeds["past_outputs"][:3]]),
            "next_step_index": np.array([(i + 1) % n], np.int32),
            "next_sample": sample, "next_timestep": np.full((out.shape[0],), following[0], np.float32)}


def unet_spec(conditioning="encoder_hidden_states", dtype="float32", batch=(1, 2, 4)):
    text = TensorSpec("encoder_hidden_states", dtype, ("batch", *CONTEXT_SHAPE))
    extra = {"encoder_hidden_states": (text,),
             "class_labels": (TensorSpec("class_labels", "int32", ("batch",)),), None: ()}[conditioning]
    return ComponentSpec("unet", inputs=(TensorSpec("sample", dtype, LATENT),
                                         TensorSpec("timestep", "float32", ("batch",)), *extra),
                         outputs=(TensorSpec("model_output", dtype, LATENT),),
                         ranges={"batch": batch, **SIZES})


def contract_spec(dtype="float32", max_evaluations=1001):
    """The update graph's I/O as its contract states it (latent batch 1..2, UNet batch 1..4)."""
    unet_sized = ("unet_batch", 4, "latent_height", "latent_width")
    past = (4, *LATENT)
    return ComponentSpec(
        STEP_COMPONENT,
        inputs=(TensorSpec("latents", "float32", LATENT), TensorSpec("model_output", dtype, unet_sized),
                TensorSpec("past_latents", "float32", past), TensorSpec("past_outputs", "float32", past),
                TensorSpec("noise", "float32", ("evaluations", *LATENT)),
                TensorSpec("step_table", "float32", ("evaluations", 17)),
                TensorSpec("step_index", "int32", (1,)), TensorSpec("guidance", "float32", (1,))),
        outputs=(TensorSpec("next_latents", "float32", LATENT),
                 TensorSpec("next_past_latents", "float32", past),
                 TensorSpec("next_past_outputs", "float32", past),
                 TensorSpec("next_step_index", "int32", (1,)),
                 TensorSpec("next_sample", dtype, unet_sized),
                 TensorSpec("next_timestep", "float32", ("unet_batch",))),
        ranges={"batch": (1, 1, 2), "unet_batch": (1, 2, 4), "evaluations": (1, 8, max_evaluations),
                **SIZES})


def make_fakes(conditioning="encoder_hidden_states", *, dtype="float32", step_spec=None,
               step_compute=contract_step, unet_profiles=None, device=None):
    """(unet runner, step runner, namespace of the fakes and specs) on one recording device."""
    device = device or RecordingDevice()
    uspec, sspec = unet_spec(conditioning, dtype), step_spec or contract_spec(dtype)
    unet_engine = SpecEngine(device, uspec, unet_compute(conditioning), unet_profiles)
    step_engine = SpecEngine(device, sspec, step_compute)
    unet = TensorRTRunner(b"fake plan", fake_api(unet_engine), device=device, name="unet")
    step = TensorRTRunner(b"fake plan", fake_api(step_engine), device=device, name=STEP_COMPONENT)
    fakes = types.SimpleNamespace(device=device, unet_engine=unet_engine, step_engine=step_engine,
                                  unet_spec=uspec, step_spec=sspec, conditioning=conditioning)
    return unet, step, fakes


def make_denoiser(conditioning="encoder_hidden_states", *, cuda_graphs=True, max_shapes=4, **kwargs):
    unet, step, fakes = make_fakes(conditioning, **kwargs)
    denoiser = TensorRTDenoiser(unet, step, unet_spec=fakes.unet_spec, step_spec=fakes.step_spec,
                                cuda_graphs=cuda_graphs, max_shapes=max_shapes)
    return denoiser, fakes


def reference(fakes):
    name = fakes.conditioning

    def unet(feeds):
        return fake_unet(feeds["sample"], feeds["timestep"], feeds.get(name))
    return NumpyDenoiser(unet, fakes.unet_spec)


# --- jobs ----------------------------------------------------------------------------------------

def make_job(sampler="ddim", *, steps=4, batch=1, size=8, guided=True, seed=0, eta=0.0,
             config=SchedulerConfig(), conditioning="encoder_hidden_states", dtype="float32",
             context_shape=CONTEXT_SHAPE):
    plan = make_plan(sampler, config, steps, eta=eta)
    rng = np.random.default_rng(seed)
    shape = (batch, 4, size, size)
    latents = plan.initial_latents(rng.standard_normal(shape)).astype(np.float32)
    noise = [rng.standard_normal(shape).astype(np.float32) if need else None for need in plan.needs_noise]
    rows = 2 * batch if guided else batch
    conditioned = {}
    if conditioning == "encoder_hidden_states":
        conditioned[conditioning] = rng.standard_normal((rows, *context_shape)).astype(dtype)
    elif conditioning == "class_labels":
        conditioned[conditioning] = rng.integers(0, 10, rows).astype(np.int32)
    return DenoiseJob(plan, latents, conditioned, 7.5 if guided else None, noise)


SAMPLER_CASES = [pytest.param(name, SchedulerConfig(), 0.0, id=name) for name in SAMPLERS] + [
    pytest.param("ddim", SchedulerConfig(clip_sample=True), 1.0, id="ddim-clip-eta1"),
    pytest.param("dpmpp-2m", SchedulerConfig(prediction_type=PredictionType.V_PREDICTION), 0.0,
                 id="dpmpp-2m-v")]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("guided", [True, False], ids=["guided", "unguided"])
@pytest.mark.parametrize("sampler,config,eta", SAMPLER_CASES)
def test_final_latents_equal_the_numpy_loop(sampler, config, eta, guided, batch):
    denoiser, fakes = make_denoiser()
    job = make_job(sampler, config=config, eta=eta, guided=guided, batch=batch, seed=batch)
    found = denoiser(job)
    expected = reference(fakes)(job)
    assert found.evaluations == expected.evaluations == job.plan.num_evaluations
    assert found.latents.shape == job.latents.shape and found.latents.dtype == np.float32
    assert rel_l2(found.latents, expected.latents) <= 1e-6
    assert rel_l2(job.latents, expected.latents) > 1e-2          # the loop did move the latents
    # Every evaluation ran the UNet once (warm-up, capture + replay, then replays).
    assert fakes.unet_engine.computations == job.plan.num_evaluations


@pytest.mark.parametrize("conditioning,dtype,tolerance", [
    ("class_labels", "float32", 1e-6), (None, "float32", 1e-6),
    # fp16 UNet: the host rounds the first sample through float64, the graph in float32.
    ("encoder_hidden_states", "float16", 1e-3)])
def test_other_conditioning_and_an_fp16_unet(conditioning, dtype, tolerance):
    denoiser, fakes = make_denoiser(conditioning, dtype=dtype)
    job = make_job("dpmpp-2m", guided=conditioning is not None, conditioning=conditioning,
                   dtype=dtype, batch=2)
    assert rel_l2(denoiser(job).latents, reference(fakes)(job).latents) <= tolerance


# --- (b) the exported update graph itself, under ONNX Runtime -------------------------------------

STEP_GRAPH = Path(__file__).parent.parent / "ldmrt" / "export" / "step_graph.py"


@pytest.fixture(scope="module")
def onnx_step():
    """compute(spec) -> a SpecEngine compute running ldmrt.export.step_graph's graph for `spec`
    in ONNX Runtime (CPU)."""
    if not STEP_GRAPH.is_file():
        pytest.skip("ldmrt/export/step_graph.py (the update graph) is not in this tree")
    ort = pytest.importorskip("onnxruntime")
    from ldmrt.export.step_graph import build_step_graph
    sessions = {}

    def compute(spec):
        key = repr(spec.to_dict())
        if key not in sessions:
            model = build_step_graph(spec, 18)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            sessions[key] = ort.InferenceSession(model.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"])
        session = sessions[key]
        names = [o.name for o in session.get_outputs()]
        return lambda feeds: dict(zip(names, session.run(names, feeds)))
    return compute


@pytest.mark.parametrize("guided", [True, False], ids=["guided", "unguided"])
@pytest.mark.parametrize("sampler,config,eta", SAMPLER_CASES)
def test_with_the_exported_update_graph_the_final_latents_equal_the_numpy_loop(onnx_step, sampler, config,
                                                                                eta, guided):
    denoiser, fakes = make_denoiser(step_compute=onnx_step(contract_spec()))
    for batch in (1, 2):
        job = make_job(sampler, config=config, eta=eta, guided=guided, batch=batch, seed=batch)
        assert rel_l2(denoiser(job).latents, reference(fakes)(job).latents) <= 1e-6
    assert fakes.device.captures == 2 and fakes.step_engine.computations == 2 * job.plan.num_evaluations


def test_with_the_exported_fp16_update_graph(onnx_step):
    denoiser, fakes = make_denoiser(dtype="float16", step_compute=onnx_step(contract_spec("float16")))
    job = make_job("plms", batch=2, dtype="float16")
    assert rel_l2(denoiser(job).latents, reference(fakes)(job).latents) <= 1e-3


def test_a_tiny_bundles_own_specs_and_update_graph(onnx_step):
    """The specs an export of the tiny preset declares (unet, denoise_step), the graph built from
    the latter: what open_tensorrt hands the denoiser for such a bundle."""
    from ldmrt.presets import preset
    from ldmrt.iospec import Precision, ShapeRanges, component_specs
    specs = component_specs(preset("tiny"), ShapeRanges(min_size=32, opt_size=64, max_size=64, max_batch=2),
                            Precision.FP32)
    unet_spec_, step_spec_ = specs["unet"], specs[STEP_COMPONENT]
    device = RecordingDevice()
    engines = (SpecEngine(device, unet_spec_, unet_compute("encoder_hidden_states")),
               SpecEngine(device, step_spec_, onnx_step(step_spec_)))
    unet, step = (TensorRTRunner(b"fake plan", fake_api(e), device=device, name=s.name)
                  for e, s in zip(engines, (unet_spec_, step_spec_)))
    denoiser = TensorRTDenoiser(unet, step, unet_spec=unet_spec_, step_spec=step_spec_)
    fakes = types.SimpleNamespace(unet_spec=unet_spec_, conditioning="encoder_hidden_states")
    for batch, size in ((1, 8), (2, 16)):
        job = make_job("dpmpp-2m-karras", batch=batch, size=size, context_shape=(77, 32), seed=size)
        assert rel_l2(denoiser(job).latents, reference(fakes)(job).latents) <= 1e-6
    assert device.captures == 2


# --- what the loop does on the device ----------------------------------------------------------

def loop_span(ops):
    """(first, last) index of the recorded engine enqueues and graph launches: the loop."""
    steps = [i for i, op in enumerate(ops) if op[0] in ("execute", "launch")]
    return steps[0], steps[-1]


@pytest.mark.parametrize("steps", [3, 8])
def test_no_host_copy_and_no_sync_inside_the_loop(steps):
    denoiser, fakes = make_denoiser()
    device = fakes.device
    for seed in range(2):                                     # a job, then one that replays only
        start = len(device.ops)
        job = make_job("plms", steps=steps, seed=seed)
        assert rel_l2(denoiser(job).latents, reference(fakes)(job).latents) <= 1e-6
        ops = device.ops[start:]
        first, last = loop_span(ops)
        assert not [op for op in ops[first:last + 1] if op[0] in ("h2d", "d2h", "sync")]
        # Before the loop: every state tensor uploaded once, whatever the number of steps.
        unet_at, step_at = fakes.unet_engine.contexts[0].addresses, fakes.step_engine.contexts[0].addresses
        state = [unet_at[t.name] for t in fakes.unet_spec.inputs] + \
            [step_at[t.name] for t in fakes.step_spec.inputs if t.name != "model_output"]
        uploads = [op[1] for op in ops if op[0] == "h2d"]
        assert sorted(uploads) == sorted(state) and len(state) == 10
        assert max(i for i, op in enumerate(ops) if op[0] == "h2d") < first
        assert uploads.count(unet_at["encoder_hidden_states"]) == 1
        # After it: the final latents come back, then one synchronize.
        tail = ops[last + 1:]
        latents = fakes.step_engine.contexts[0].addresses["latents"]
        assert tail == [("d2h", latents), ("sync",)]


def test_one_graph_per_shape_replayed_after_one_warm_up():
    denoiser, fakes = make_denoiser()
    device, unet = fakes.device, fakes.unet_engine
    first = make_job("plms", steps=4)                                  # 5 evaluations
    n = first.plan.num_evaluations
    assert rel_l2(denoiser(first).latents, reference(fakes)(first).latents) <= 1e-6
    # Warm-up enqueued directly, the second evaluation captured and replayed, the rest replayed.
    assert (device.captures, device.launches, unet.enqueues, unet.computations) == (1, n - 1, 2, n)
    again = make_job("plms", steps=4, seed=5)                          # same shape, new values
    assert rel_l2(denoiser(again).latents, reference(fakes)(again).latents) <= 1e-6
    assert (device.captures, device.launches, unet.enqueues) == (1, 2 * n - 1, 2)
    for job in (make_job("plms", steps=4, size=16), make_job("plms", steps=5),
                make_job("plms", steps=4, guided=False)):             # new shapes: a graph each
        assert rel_l2(denoiser(job).latents, reference(fakes)(job).latents) <= 1e-6
    assert device.captures == 4
    back = make_job("plms", steps=4, seed=9)                           # the first shape again
    assert rel_l2(denoiser(back).latents, reference(fakes)(back).latents) <= 1e-6
    assert device.captures == 4 and len(denoiser._workers[0].states) == 4


@pytest.mark.parametrize("why", ["cuda_graphs off", "not capturable"])
def test_without_a_graph_every_evaluation_is_enqueued(why, caplog):
    denoiser, fakes = make_denoiser(cuda_graphs=why != "cuda_graphs off")
    if why == "not capturable":
        denoiser(make_job("euler", size=16))          # the thread's contexts exist from here on
        fakes.unet_engine.contexts[0].capturable = False
    captures, enqueues = fakes.device.captures, fakes.unet_engine.enqueues
    job = make_job("euler")
    with caplog.at_level(logging.INFO, logger="ldmrt.engines.tensorrt_denoise"):
        assert rel_l2(denoiser(job).latents, reference(fakes)(job).latents) <= 1e-6
    assert fakes.device.captures == captures
    assert fakes.unet_engine.enqueues - enqueues == job.plan.num_evaluations
    assert ("not stream-capturable" in caplog.text) == (why == "not capturable")


class Stop(Exception):
    pass


def test_on_step_raising_stops_the_loop_and_the_next_job_is_right():
    denoiser, fakes = make_denoiser()
    job = make_job("dpmpp-2m", steps=6, guided=True, batch=2)
    seen = []

    def stop_after_three(done, total):
        seen.append((done, total))
        if done == 3:
            raise Stop("cancelled")

    syncs = fakes.device.ops.count(("sync",))
    with pytest.raises(Stop):
        denoiser(job, stop_after_three)
    assert seen == [(1, 6), (2, 6), (3, 6)]
    assert fakes.unet_engine.computations == 3                 # nothing enqueued after the stop
    assert fakes.device.ops.count(("sync",)) == syncs + 1      # drained before raising
    progress = []
    found = denoiser(job, lambda done, total: progress.append(done))
    assert progress == list(range(1, 7))
    assert rel_l2(found.latents, reference(fakes)(job).latents) <= 1e-6
    assert fakes.device.captures == 1                          # the graph survived the stop


def test_profiles_are_switched_per_shape():
    small = {"sample": ((1, 4, 4, 4), (1, 4, 8, 8), (2, 4, 8, 8)), "timestep": ((1,), (1,), (2,)),
             "encoder_hidden_states": ((1, 3, 8), (1, 3, 8), (2, 3, 8))}
    large = {"sample": ((2, 4, 8, 8), (4, 4, 16, 16), (4, 4, 16, 16)), "timestep": ((2,), (4,), (4,)),
             "encoder_hidden_states": ((2, 3, 8), (4, 3, 8), (4, 3, 8))}
    denoiser, fakes = make_denoiser(unet_profiles=[small, large])
    for job, profile in [(make_job(guided=False), 0), (make_job(size=16), 1),
                         (make_job(seed=4, guided=False), 0)]:
        assert rel_l2(denoiser(job).latents, reference(fakes)(job).latents) <= 1e-6
        assert fakes.unet_engine.contexts[0].profile == profile
    with pytest.raises(ShapeError, match="unet: input shapes .* fit no optimization profile"):
        denoiser(make_job(batch=2, size=4))                     # batch 4 at 4x4: in neither


def test_least_recently_used_shapes_are_freed():
    denoiser, fakes = make_denoiser(max_shapes=1)
    for size in (8, 16, 8):
        job = make_job("ddim", size=size, seed=size)
        assert rel_l2(denoiser(job).latents, reference(fakes)(job).latents) <= 1e-6
    per_shape = len(denoiser.tensors)
    assert len(fakes.device.freed) == 2 * per_shape and fakes.device.captures == 3
    denoiser.close()
    assert len(fakes.device.freed) == 3 * per_shape and not denoiser._workers


def test_one_worker_per_thread():
    denoiser, fakes = make_denoiser()
    errors, barrier = [], threading.Barrier(3)

    def work(size):
        try:
            barrier.wait()
            for seed in range(2):
                job = make_job("euler-a", size=size, seed=seed)
                assert rel_l2(denoiser(job).latents, reference(fakes)(job).latents) <= 1e-6
        except Exception as exc:    # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(size,)) for size in (4, 8, 16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(fakes.unet_engine.contexts) == len(fakes.step_engine.contexts) == 3
    assert len({id(w.stream) for w in denoiser._workers}) == 3


# --- refusals ------------------------------------------------------------------------------------

def test_job_inputs_the_engines_cannot_take_are_refused():
    denoiser, _ = make_denoiser()
    job = make_job()
    wrong = replace(job, conditioning={"class_labels": np.zeros(2, np.int32)})
    with pytest.raises(ShapeError, match=r"conditioning: the unet engine takes "
                                         r"\['encoder_hidden_states'\]") as error:
        denoiser(wrong)
    assert error.value.field == "conditioning"
    flat = replace(job, conditioning={"encoder_hidden_states": np.zeros((2, 24), np.float32)})
    with pytest.raises(ShapeError, match="expects 3 dimensions, found shape \\[2, 24\\]"):
        denoiser(flat)
    short, _ = make_denoiser(step_spec=contract_spec(max_evaluations=8))
    with pytest.raises(ShapeError, match="denoise_step: input shapes .*'noise': \\[11,"):
        short(make_job("ddim", steps=11))


def test_engines_that_do_not_fit_each_other_are_refused():
    unet, step, fakes = make_fakes(step_spec=contract_spec("float16"))
    with pytest.raises(BundleError, match="denoise_step engine: expected inputs .*'model_output': "
                                          "'float32'.*found .*'model_output': 'float16'"):
        TensorRTDenoiser(unet, step)
    spec = contract_spec()
    missing = replace(spec, outputs=spec.outputs[:-1])
    unet, step, fakes = make_fakes(step_spec=missing)
    with pytest.raises(BundleError, match="expected outputs .*next_timestep"):
        TensorRTDenoiser(unet, step)
    with pytest.raises(BundleError, match="denoise_step graph denoise_step engine: outputs"):
        TensorRTDenoiser(unet, step, step_spec=spec)           # the manifest's spec, checked too


@pytest.mark.parametrize("engine,call,error", [
    ("unet", "set_input_shape", ShapeError), ("unet", "set_tensor_address", BackendUnavailableError),
    ("unet", "execute_async_v3", BackendUnavailableError),
    ("step", "set_input_shape", ShapeError), ("step", "execute_async_v3", BackendUnavailableError)])
def test_every_boolean_tensorrt_returns_is_checked(engine, call, error):
    denoiser, fakes = make_denoiser()
    fake = fakes.unet_engine if engine == "unet" else fakes.step_engine
    fake.refuse.add(call)
    name = "unet" if engine == "unet" else STEP_COMPONENT
    job = make_job()
    with pytest.raises(error, match=f"{name}: .* refused {call}"):
        denoiser(job)
    fake.refuse.clear()                                        # the denoiser is still usable
    assert rel_l2(denoiser(job).latents, reference(fakes)(job).latents) <= 1e-6


def test_a_refused_enqueue_during_capture_leaves_no_graph():
    denoiser, fakes = make_denoiser()
    job = make_job(steps=4)

    def fail_second(done, total):
        if done == 1:
            fakes.step_engine.refuse.add("execute_async_v3")

    with pytest.raises(BackendUnavailableError, match="during CUDA graph capture"):
        denoiser(job, fail_second)
    assert fakes.device.capturing is None                      # the capture was ended
    fakes.step_engine.refuse.clear()
    assert rel_l2(denoiser(job).latents, reference(fakes)(job).latents) <= 1e-6
    assert fakes.device.captures == 2


# --- the backend's choice: open_tensorrt --------------------------------------------------------

class FakeManifest:
    def __init__(self, specs):
        self.components = {spec.name: types.SimpleNamespace(spec=spec) for spec in specs}

    def component(self, name):
        try:
            return self.components[name]
        except KeyError:
            raise BundleError(f"no component {name!r}") from None


@pytest.fixture
def fake_backend(monkeypatch, tmp_path):
    """open_tensorrt against fake engines: `engines` maps component -> fake engine; a component
    without an entry has no engine in the manifest."""
    device = RecordingDevice()
    engines = {}
    api = fake_api(None)

    class Runtime(api.module.Runtime):
        def deserialize_cuda_engine(self, plan):
            return engines.get(plan.decode())

    api.module.Runtime = Runtime

    def find_engine(bundle, component, runtime, key=None):
        if isinstance(engines.get(component), Exception):
            raise engines[component]
        if component not in engines:
            raise BundleError(f"bundle {bundle}: manifest.json lists no tensorrt-rtx engine for "
                              f"{component}; build one")
        plan = tmp_path / f"{component}.plan"
        plan.write_bytes(component.encode())
        return types.SimpleNamespace(component=component, builder="tensorrt-rtx"), plan   # a record

    monkeypatch.setattr(trt_api, "load", lambda backend: api)
    monkeypatch.setattr(RuntimeInfo, "detect",
                        classmethod(lambda cls, backend, **_: RuntimeInfo(backend, api.version, None)))
    monkeypatch.setattr(trt_module, "find_engine", find_engine)
    return types.SimpleNamespace(device=device, engines=engines, bundle=tmp_path)


def test_open_tensorrt_runs_the_loop_on_the_device_with_a_denoise_step_engine(fake_backend):
    from ldmrt.engines.dispatch import open_runners
    _, _, fakes = make_fakes(device=fake_backend.device)
    fake_backend.engines.update(unet=fakes.unet_engine, denoise_step=fakes.step_engine)
    manifest = FakeManifest([fakes.unet_spec, fakes.step_spec])
    opened = open_runners("tensorrt-rtx", fake_backend.bundle, manifest, ("unet",), verify=False,
                          device=fake_backend.device)
    assert list(opened.runners) == ["unet"] and isinstance(opened.denoiser, TensorRTDenoiser)
    job = make_job("plms", batch=2)
    assert rel_l2(opened.denoiser(job).latents, reference(fakes)(job).latents) <= 1e-6
    assert fake_backend.device.captures == 1


@pytest.mark.parametrize("why", ["no denoise_step graph", "no denoise_step engine"])
def test_open_tensorrt_falls_back_to_the_numpy_loop(fake_backend, why, caplog):
    _, _, fakes = make_fakes(device=fake_backend.device)
    fake_backend.engines["unet"] = fakes.unet_engine
    specs = [fakes.unet_spec] if why == "no denoise_step graph" else [fakes.unet_spec, fakes.step_spec]
    with caplog.at_level(logging.INFO, logger="ldmrt.engines.tensorrt_denoise"):
        opened = trt_module.open_tensorrt(fake_backend.bundle, FakeManifest(specs), ("unet",),
                                          backend="tensorrt-rtx", device=fake_backend.device)
    assert isinstance(opened.denoiser, NumpyDenoiser)
    assert opened.denoiser.unet is opened.runners["unet"]
    assert ("no denoise_step graph" if why == "no denoise_step graph" else
            "lists no tensorrt-rtx engine for denoise_step") in caplog.text
    job = make_job("euler", steps=3)
    assert rel_l2(opened.denoiser(job).latents, reference(fakes)(job).latents) <= 1e-6
    # The host loop: the UNet runner copies its inputs in every evaluation; no update engine ran.
    uploads = sum(op[0] == "h2d" for op in fake_backend.device.ops)
    assert uploads == len(fakes.unet_spec.inputs) * job.plan.num_evaluations
    assert not fakes.step_engine.contexts


@pytest.mark.parametrize("error", [CorruptEngineError("denoise_step: plan has size 5, its record says 9"),
                                   StaleEngineError("denoise_step engine is stale: builder version")])
def test_a_bad_denoise_step_engine_is_refused_not_skipped(fake_backend, error):
    _, _, fakes = make_fakes(device=fake_backend.device)
    fake_backend.engines.update(unet=fakes.unet_engine, denoise_step=error)
    with pytest.raises(type(error), match="denoise_step"):
        trt_module.open_tensorrt(fake_backend.bundle, FakeManifest([fakes.unet_spec, fakes.step_spec]),
                                 ("unet",), backend="tensorrt-rtx", device=fake_backend.device)


def test_open_tensorrt_without_the_unet_has_no_denoiser(fake_backend):
    _, _, fakes = make_fakes(device=fake_backend.device)
    fake_backend.engines.update(unet=fakes.unet_engine, denoise_step=fakes.step_engine)
    opened = trt_module.open_tensorrt(fake_backend.bundle, FakeManifest([fakes.unet_spec]), (),
                                      backend="tensorrt-rtx", device=fake_backend.device)
    assert opened.runners == {} and opened.denoiser is None


def test_denoiser_module_imports_without_torch_or_onnx():
    code = ("import sys; sys.modules.update(torch=None, onnx=None, onnxruntime=None);"
            "import ldmrt.engines.tensorrt_denoise, ldmrt.engines.tensorrt")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
