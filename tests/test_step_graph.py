"""The update graph (component denoise_step) against the numpy loop it replaces on the device.

The oracle is ldmrt's numpy reference loop (`NumpyDenoiser`: `guide` + `step`) driving a
nonlinear fake UNet; the graph runs in ONNX Runtime (CPU) over whole trajectories, its outputs
fed back as its next inputs (latents, history, step counter, the UNet's next sample and
timestep), for every sampler and schedule option. A graph with one deliberate bug must fail the
same comparison. TensorRT-RTX builds the graph ahead of time (skips without it); running the
engine needs a GPU and is not tested here.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import ldmrt.export.step_graph as step_graph_module
from ldmrt.config import SAMPLERS, PredictionType, SchedulerConfig, TimestepSpacing
from ldmrt.presets import preset
from ldmrt.engines import trt_api
from ldmrt.errors import ExportError, ParityError
from ldmrt.export.step_graph import build_step_graph, check_step_graph
from ldmrt.iospec import Component, Precision, ShapeRanges, component_specs
from ldmrt.manifest import MANIFEST_NAME, load_manifest, sha256_file, verify_bundle
from ldmrt.sampling import (STEP_TABLE_COLUMNS, DenoiseJob, NumpyDenoiser, make_plan, max_steps,
                            step_table)

ort = pytest.importorskip("onnxruntime")

OPSET = 18                     # the export's MIN_OPSET (ldmrt/export/onnx_graph.py)
# rel L2 per trajectory, fp32: measured worst 2.4e-7 (euler, epsilon, leading, guided, batch 1). The
# update itself is bit for bit (the export check measures 0); what differs is the UNet input: the
# graph scales in float32, NumpyDenoiser by the float64 scale then rounds, and the fake UNet spreads it.
TOLERANCE = 1e-6
FP16_TOLERANCE = 1e-6          # fp16 UNet I/O: measured worst 7.2e-8
RANGES = ShapeRanges(min_size=32, opt_size=32, max_size=64, max_batch=2)
LATENT = (4, 8, 10)            # (C, h, w): non-square, inside the tiny preset's 8..16 latent sides
STEPS = 8                      # PLMS: 9 evaluations, every one of its four lags in use


def specs(precision: Precision = Precision.FP32):
    return component_specs(preset("tiny"), RANGES, precision)


_SESSIONS: dict[str, object] = {}


def session(precision: Precision):
    """One ONNX Runtime CPU session of the update graph per precision, for the whole module."""
    if precision.value not in _SESSIONS:
        model = build_step_graph(specs(precision)["denoise_step"], OPSET)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        _SESSIONS[precision.value] = ort.InferenceSession(model.SerializeToString(), options,
                                                          providers=["CPUExecutionProvider"])
    return _SESSIONS[precision.value]


def fake_unet(sample: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> np.ndarray:
    """Nonlinear in the sample, different per timestep and per conditioning row, bounded."""
    h = sample.astype(np.float32)
    c = context.astype(np.float32).mean(axis=(1, 2))[:, None, None, None]           # one number per row
    t = timestep.astype(np.float32)[:, None, None, None] / 1000.0
    out = np.tanh(0.9 * h + c) * (0.5 + t) + 0.1 * np.sin(3.0 * h) * c
    return out.astype(sample.dtype)


@dataclasses.dataclass
class Case:
    plan: object
    latents: np.ndarray            # (B, C, h, w) start latents
    context: np.ndarray            # (G*B, 2, 3): rows [uncond; cond] when guided
    guidance: float | None
    noise: list


def make_case(plan, batch: int, guided: bool, seed: int, dtype=np.float32) -> Case:
    rng = np.random.default_rng(seed)
    shape = (batch, *LATENT)
    latents = plan.initial_latents(rng.standard_normal(shape)).astype(np.float32)
    rows = 2 * batch if guided else batch
    context = rng.standard_normal((rows, 2, 3)).astype(dtype)
    if guided:
        context[:batch] = 0.0      # an empty prompt's embedding: uncond and cond differ
    noise = [rng.standard_normal(shape).astype(np.float32) if needed else None for needed in plan.needs_noise]
    return Case(plan, latents, context, 7.5 if guided else None, noise)


def numpy_trajectory(case: Case, precision: Precision) -> np.ndarray:
    """The reference: the numpy loop the runtime runs, with the UNet's dtypes of `precision`."""
    job = DenoiseJob(case.plan, case.latents, {"encoder_hidden_states": case.context}, case.guidance, case.noise)
    denoiser = NumpyDenoiser(lambda feeds: fake_unet(feeds["sample"], feeds["timestep"],
                                                     feeds["encoder_hidden_states"]), specs(precision)["unet"])
    result = denoiser(job)
    assert result.evaluations == case.plan.num_evaluations
    return result.latents


def graph_trajectory(case: Case, precision: Precision, graph=None, check_next_input: bool = False):
    """The same trajectory on the update graph: every output is the next evaluation's input.
    Returns (final latents, final step_index)."""
    run = (graph or session(precision)).run
    plan, dtype = case.plan, np.dtype(precision.dtype)
    table = step_table(plan)
    batch = case.latents.shape[0]
    repeats = 1 if case.guidance is None else 2
    x = case.latents
    past_x = past_m = np.zeros((4, *x.shape), np.float32)
    # The first UNet input is the host's (DenoiseJob semantics); the graph makes every later one.
    sample = np.tile(x * np.float32(plan.input_scale[0]), (repeats, 1, 1, 1)).astype(dtype)
    timestep = np.full((repeats * batch,), plan.timesteps[0], np.float32)
    index = np.zeros((1,), np.int32)
    noise = DenoiseJob(plan, x, {}, case.guidance, case.noise).stacked_noise()
    guidance = np.array([1.0 if case.guidance is None else case.guidance], np.float32)
    context = case.context.astype(dtype)
    for i in range(plan.num_evaluations):
        model_output = fake_unet(sample, timestep, context)
        x, past_x, past_m, index, sample, timestep = run(None, {
            "latents": x, "model_output": model_output, "past_latents": past_x, "past_outputs": past_m,
            "noise": noise, "step_table": table, "step_index": index, "guidance": guidance})
        j = (i + 1) % plan.num_evaluations
        assert index.dtype == np.int32 and index.tolist() == [j]
        assert sample.dtype == dtype and sample.shape == (repeats * batch, *LATENT)
        if check_next_input:
            # Independent of the step table: the plan's own float64 scale and float32 timesteps.
            expected = np.tile(x.astype(np.float64) * plan.input_scale[j], (repeats, 1, 1, 1))
            assert rel_l2(sample, expected) <= (TOLERANCE if dtype == np.float32 else 1e-3), i
            np.testing.assert_array_equal(timestep, np.full((repeats * batch,), plan.timesteps[j], np.float32))
    return x, index


def rel_l2(found, expected) -> float:
    found64, expected64 = np.asarray(found, np.float64), np.asarray(expected, np.float64)
    assert found64.shape == expected64.shape
    if not (np.isfinite(found64).all() and np.isfinite(expected64).all()):
        return float("inf")
    return float(np.linalg.norm(found64 - expected64) / np.linalg.norm(expected64))


def schedule_options() -> list[tuple[str, SchedulerConfig, float]]:
    """Every sampler x prediction type x timestep spacing, with clip_sample on and off where the
    sampler clips (ddim, ddpm, lcm) and ddim at eta 0 and 1."""
    cases = []
    for name in SAMPLERS:
        for prediction in (PredictionType.EPSILON, PredictionType.V_PREDICTION):
            for spacing in TimestepSpacing:
                for clip in ((False, True) if name in ("ddim", "ddpm", "lcm") else (False,)):
                    for eta in ((0.0, 1.0) if name == "ddim" else (0.0,)):
                        config = SchedulerConfig(prediction_type=prediction, timestep_spacing=spacing,
                                                 clip_sample=clip)
                        cases.append((name, config, eta))
    return cases


def case_id(case) -> str:
    name, config, eta = case
    return f"{name}-{config.prediction_type.value}-{config.timestep_spacing.value}" \
           f"{'-clip' if config.clip_sample else ''}{f'-eta{eta:g}' if name == 'ddim' else ''}"


# --- trajectories: ONNX Runtime == numpy --------------------------------------------------------

def test_the_cases_cover_every_sampler_and_option():
    cases = schedule_options()
    assert {name for name, _, _ in cases} == set(SAMPLERS)
    assert {c.timestep_spacing for _, c, _ in cases} == set(TimestepSpacing) and len(TimestepSpacing) == 3
    assert {(n, c.clip_sample) for n, c, _ in cases} >= {(n, b) for n in ("ddim", "ddpm", "lcm") for b in (0, 1)}
    assert {eta for n, _, eta in cases if n == "ddim"} == {0.0, 1.0}
    # The clipped x0 path, the noise path and five-deep history all occur.
    plans = [make_plan(n, c, STEPS, eta=eta) for n, c, eta in cases]
    assert any(p.clip_range is not None and p.clip_coefs.any() for p in plans)
    assert any(p.needs_noise.any() for p in plans) and max(p.history for p in plans) == 5


@pytest.mark.parametrize("option", schedule_options(), ids=case_id)
def test_graph_trajectory_equals_the_numpy_loop(option):
    name, config, eta = option
    plan = make_plan(name, config, STEPS, eta=eta)
    errors = {}
    for guided in (False, True):
        for batch in (1, 2):
            case = make_case(plan, batch, guided, seed=len(errors))
            found, index = graph_trajectory(case, Precision.FP32)
            errors[(guided, batch)] = rel_l2(found, numpy_trajectory(case, Precision.FP32))
            assert index.tolist() == [0]                         # the counter wrapped after the last step
    assert all(e <= TOLERANCE for e in errors.values()), errors


@pytest.mark.parametrize("name", SAMPLERS)
def test_fp16_unet_io_trajectory_equals_the_numpy_loop(name):
    """model_output and next_sample in float16 (an fp16 bundle), the update in float32."""
    plan = make_plan(name, SchedulerConfig(clip_sample=name in ("ddim", "ddpm")), STEPS)
    for guided in (False, True):
        case = make_case(plan, 2, guided, seed=3, dtype=np.float16)
        found, _ = graph_trajectory(case, Precision.FP16)
        assert rel_l2(found, numpy_trajectory(case, Precision.FP16)) <= FP16_TOLERANCE, guided


@pytest.mark.parametrize("name", ["euler", "euler-a", "plms"])
def test_next_sample_and_timestep_are_the_next_unet_input(name):
    """next_sample = x_{i+1} * input_scale[i+1] tiled (guided: twice), next_timestep = timesteps[i+1]."""
    plan = make_plan(name, SchedulerConfig(), STEPS)
    assert np.all(plan.input_scale == 1.0) == (name == "plms")      # Euler scales its input
    for precision in (Precision.FP32, Precision.FP16):
        for guided in (False, True):
            graph_trajectory(make_case(plan, 2, guided, seed=5), precision, check_next_input=True)


def test_the_longest_plan_runs_to_its_end():
    """PLMS at its most steps: 1001 evaluations, the top of the evaluations range."""
    scheduler = SchedulerConfig(timestep_spacing=TimestepSpacing.LINSPACE)
    steps = max_steps("plms", scheduler)
    plan = make_plan("plms", scheduler, steps)
    spec = specs()["denoise_step"]
    assert plan.num_evaluations == steps + 1 == spec.ranges["evaluations"][2] == 1001
    case = make_case(plan, 1, True, seed=11)
    found, index = graph_trajectory(case, Precision.FP32)
    assert index.tolist() == [0] and rel_l2(found, numpy_trajectory(case, Precision.FP32)) <= TOLERANCE


# --- a wrong graph fails ------------------------------------------------------------------------

def with_bug(model: onnx.ModelProto, bug: str) -> onnx.ModelProto:
    """A copy of the graph with one deliberate mistake."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    nodes = list(broken.graph.node)
    if bug == "guidance sign":           # cond - uncond -> uncond - cond
        node = next(n for n in nodes if n.output[0] == "guidance/difference")
        node.input[:] = [node.input[1], node.input[0]]
    elif bug == "no clip":               # the clipped x0 term's coefficient -> the noise's
        node = next(n for n in nodes if n.name.startswith("table/clip_coef/"))
        node.input[1] = next(n for n in nodes if n.name.startswith("table/noise_coef/")).input[1]
    elif bug == "history order":         # m_{i-1} read where m_{i-2} belongs
        gathers = [n for n in nodes if n.op_type == "Gather" and n.input[0] == "past_outputs"]
        gathers[1].input[1] = gathers[0].input[1]
    return broken


@pytest.mark.parametrize("bug", ["guidance sign", "no clip", "history order"])
def test_a_graph_with_one_bug_fails_the_comparison(bug):
    spec = specs()["denoise_step"]
    good = build_step_graph(spec, OPSET)
    broken = with_bug(good, bug)
    assert broken.SerializeToString() != good.SerializeToString()
    assert check_step_graph(good, spec).passed
    record = check_step_graph(broken, spec)
    assert not record.passed and record.rel_l2 > 1e3 * TOLERANCE, record
    # The trajectory comparison fails too, for a sampler that uses the broken part.
    name, config = {"guidance sign": ("euler", SchedulerConfig()),
                    "no clip": ("ddim", SchedulerConfig(clip_sample=True,
                                                        prediction_type=PredictionType.V_PREDICTION)),
                    "history order": ("plms", SchedulerConfig())}[bug]
    plan = make_plan(name, config, STEPS)
    case = make_case(plan, 1, True, seed=2)
    graph = ort.InferenceSession(broken.SerializeToString(), providers=["CPUExecutionProvider"])
    found, _ = graph_trajectory(case, Precision.FP32, graph)
    assert rel_l2(found, numpy_trajectory(case, Precision.FP32)) > 1e3 * TOLERANCE


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16, Precision.BF16])
def test_the_export_check_passes_bit_for_bit_at_every_precision(precision):
    spec = specs(precision)["denoise_step"]
    record = check_step_graph(build_step_graph(spec, 22 if precision == Precision.BF16 else OPSET), spec)
    assert record.passed and record.tolerance == TOLERANCE and record.rel_l2 == 0.0, record


def test_spec_dtypes_follow_the_unet():
    for precision in (Precision.FP32, Precision.FP16, Precision.BF16, Precision.INT8):
        all_specs = specs(precision)
        unet, step = all_specs["unet"], all_specs["denoise_step"]
        dtypes = {t.name: t.dtype for t in step.inputs + step.outputs}
        assert dtypes.pop("model_output") == unet.outputs[0].dtype
        assert dtypes.pop("next_sample") == unet.input("sample").dtype
        assert dtypes.pop("step_index") == dtypes.pop("next_step_index") == "int32"
        assert set(dtypes.values()) == {"float32"}, precision
    ranges = specs()["denoise_step"].ranges
    assert ranges["unet_batch"] == (1, 2, 2 * RANGES.max_batch) and ranges["batch"] == (1, 1, RANGES.max_batch)
    assert ranges["evaluations"] == (1, 50, 1 + max(max_steps(n, preset("tiny").scheduler) for n in SAMPLERS))
    assert specs()["denoise_step"].input("step_table").shape[1] == len(STEP_TABLE_COLUMNS) == 17


def test_an_opset_below_the_graph_minimum_is_refused():
    with pytest.raises(ExportError, match="opset 12") as info:
        build_step_graph(specs()["denoise_step"], 12)
    assert info.value.field == "opset"


# --- the bundle ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The tiny preset as `ldmrt export` writes it by default, without the (slow) torch parity runs."""
    from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source

    out = tmp_path_factory.mktemp("step") / "tiny"
    export_bundle(preset_source("tiny"), out, ExportOptions(shape_ranges=RANGES, validate=False))
    return out


def test_the_bundle_lists_denoise_step_with_a_passing_parity_record(bundle):
    manifest = load_manifest(bundle)
    assert Component.DENOISE_STEP == "denoise_step" and sorted(manifest.components) == [
        "denoise_step", "text_encoder", "unet", "vae_decoder", "vae_encoder"]
    entry = manifest.component("denoise_step")
    assert entry.spec == component_specs(manifest.config, RANGES, Precision.FP32)["denoise_step"]
    assert entry.file == "denoise_step.onnx" and entry.external_data is None and entry.dtype == "float32"
    assert entry.sha256 == {"denoise_step.onnx": sha256_file(bundle / "denoise_step.onnx")}
    # Checked at export even with validation off (it takes milliseconds).
    assert entry.parity is not None and entry.parity.passed and entry.parity.tolerance == TOLERANCE
    assert entry.parity.rel_l2 <= TOLERANCE and entry.parity.reference.startswith("numpy")
    verify_bundle(bundle, manifest, ["denoise_step"])
    graph = ort.InferenceSession(str(bundle / entry.file), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in graph.get_inputs()] == [(t.name, list(t.shape)) for t in entry.spec.inputs]
    assert [o.name for o in graph.get_outputs()] == [t.name for t in entry.spec.outputs]


def test_the_pipeline_does_not_open_it_and_a_bundle_without_it_still_generates(bundle, tmp_path):
    from ldmrt.runtime.pipeline import GenerationRequest, Pipeline

    old = Path(shutil.copytree(bundle, tmp_path / "old"))
    data = json.loads((old / MANIFEST_NAME).read_text())
    del data["components"]["denoise_step"]                     # as a bundle from before the graph
    (old / MANIFEST_NAME).write_text(json.dumps(data))
    (old / "denoise_step.onnx").unlink()
    request = GenerationRequest(prompt="a cat", steps=3, seed=1, height=32, width=32)
    new = Pipeline.load(bundle, "onnxruntime", threads=1, cache_dir="off")
    assert "denoise_step" not in new.runners
    without = Pipeline.load(old, "onnxruntime", threads=1, cache_dir="off")
    assert "denoise_step" not in without.manifest.components
    images = without.generate(request).images
    assert np.isfinite(images).all() and images.std() > 0
    np.testing.assert_array_equal(images, new.generate(request).images)


def test_a_wrong_update_graph_fails_the_export(tmp_path, monkeypatch):
    from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source

    real = step_graph_module.build_step_graph
    monkeypatch.setattr(step_graph_module, "build_step_graph",
                        lambda spec, opset: with_bug(real(spec, opset), "guidance sign"))
    out = tmp_path / "bundle"
    with pytest.raises(ParityError, match="denoise_step"):
        export_bundle(preset_source("tiny"), out,
                      ExportOptions(shape_ranges=RANGES, components=("denoise_step",)))
    assert not out.exists() and list(tmp_path.iterdir()) == []


# --- TensorRT-RTX builds it (ahead of time, on this CPU machine) -----------------------------------

needs_rtx = pytest.mark.skipif(not trt_api.available(trt_api.TENSORRT_RTX), reason="TensorRT-RTX is not "
                               "installed: pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs")


@needs_rtx
def test_ldmrt_build_builds_the_update_graph_with_the_specs_profile(bundle, tmp_path):
    from ldmrt.export.engines import BundleBuildOptions, build_bundle

    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    [record] = build_bundle(copy, BundleBuildOptions(backend=trt_api.TENSORRT_RTX, components=("denoise_step",)))
    spec = load_manifest(copy).component("denoise_step").spec
    assert record.component == "denoise_step" and record.size > 0
    assert record.profiles == (spec.profile(),)
    (lo, opt, hi) = record.profiles[0]["step_table"]
    assert (lo[0], opt[0], hi[0]) == spec.ranges["evaluations"] == (1, 50, 1001)
    assert record.profiles[0]["model_output"][2][0] == 2 * RANGES.max_batch          # CFG rows
    assert (copy / "engines" / record.key / "denoise_step.plan").stat().st_size == record.size


@needs_rtx
def test_a_static_build_fixes_the_image_and_keeps_the_step_count_dynamic(bundle, tmp_path):
    from ldmrt.export.engines import BundleBuildOptions, build_bundle

    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    [record] = build_bundle(copy, BundleBuildOptions(components=("denoise_step",), static_size=(32, 40),
                                                     static_batch=1))
    profile = record.profiles[0]
    assert profile["latents"] == ((1, 4, 8, 10),) * 3
    assert profile["model_output"] == ((2, 4, 8, 10),) * 3                          # guided: 2 x 1 image
    assert [shape[0] for shape in profile["noise"]] == [1, 50, 1001]


@needs_rtx
@pytest.mark.parametrize("precision", [Precision.FP16, Precision.BF16])
def test_tensorrt_rtx_builds_the_half_precision_graphs(precision, tmp_path):
    from ldmrt.export.step_graph import write_step_graph
    from ldmrt.export.tensorrt import BuildOptions, build_engine

    spec = specs(precision)["denoise_step"]
    path = write_step_graph(spec, tmp_path / "denoise_step.onnx", 22 if precision == Precision.BF16 else OPSET)
    record = build_engine(path, spec, tmp_path, BuildOptions(backend=trt_api.TENSORRT_RTX))
    assert record.profiles == (spec.profile(),) and record.size > 0
