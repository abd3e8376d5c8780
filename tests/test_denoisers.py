"""Every Denoiser against an independent reference, for every sampler and schedule option (issue 15).

The reference is written here: diffusers' scheduler of each sampler (configured from the same
SchedulerConfig, schedule tensors in float64: tests/test_samplers.py's `oracle`) driven step by step
in float64, with classifier-free guidance written out, over a nonlinear fake UNet whose output
depends on the sample, the timestep and each conditioning row. Against it:

- `NumpyDenoiser` (the reference loop of the runtime) in float64 and in float32,
- the torch backend's `FusedDenoiser` (eager, CPU) on a torch copy of the fake UNet,

for every sampler x prediction type x timestep spacing x clip_sample x ddim eta, guided and
unguided; then the pipeline on a bundle whose schedule clips (torch vs ONNX Runtime), the int8
calibration's trajectories, and the audit: the one-line bugs issue 15's mutation run left alive
(and a few more) applied in-process, each of which must make these comparisons fail.
(The update graph and the TensorRT denoiser have their own tests.)
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np
import pytest

from ldmrt.config import PredictionType, SchedulerConfig, TimestepSpacing
from ldmrt.presets import preset
from ldmrt.iospec import Precision, ShapeRanges, component_specs
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
from ldmrt.tokenizer import load_tokenizer
from ldmrt.sampling import SAMPLERS, DenoiseJob, NumpyDenoiser, SamplerPlan, make_plan
from ldmrt.source_record import SourceRecord
from ldmrt.synthetic_tokenizer import write_synthetic_tokenizer

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")
import ldmrt.engines.torch as torch_engine  # noqa: E402
import ldmrt.sampling.denoise as denoise_module  # noqa: E402
import ldmrt.sampling.tables as tables_module  # noqa: E402
from ldmrt.engines.torch import FusedDenoiser  # noqa: E402
from ldmrt.export.bundle import ExportOptions, ModelSource, export_bundle, synthetic_tokenizer_writer  # noqa: E402
from ldmrt.export.quantize import Trajectory, TrajectoryMaker  # noqa: E402
from ldmrt.models import build_model  # noqa: E402
from tests.test_pipeline import (IMAGE_MAX_TOL, IMAGE_TOL, LATENT_RTOL, NEGATIVE, PROMPTS,  # noqa: E402
                                 assert_images, max_abs, mean_abs, rel_l2)
from tests.test_samplers import RTOL, feed_noise, oracle, rel_err  # noqa: E402,F401

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SHAPE = (2, 4, 4, 4)          # (B, C, h, w): two latents, so a row mix-up between them shows too
CONTEXT = (3, 8)              # (L, D) of the fake encoder_hidden_states
STEPS = 5
GUIDANCE = 7.5
CLIP_RANGE = 0.5              # clip_sample_range: small, so the clamp bites (asserted per case)
CLIPPING = ("ddim", "ddpm", "lcm")          # the samplers whose diffusers scheduler has clip_sample
SPACING_FREE = ("dpmpp-2m-karras", "lcm")   # timestep_spacing is unused by these
# NumpyDenoiser in float64 vs the float64 reference: test_samplers.RTOL (2e-6; the difference is
# float32 rounding inside diffusers' Euler and DPM steps and one-ulp float32 betas; worst measured
# here 2.3e-7). float32 denoisers vs the float64 reference: float32 arithmetic over five steps,
# worst measured 1.2e-6 (numpy and torch alike).
FLOAT32_RTOL = 1e-5
TORCH_RTOL = 1e-5             # FusedDenoiser vs NumpyDenoiser, both float32 (worst measured 7.8e-7)
MIN_EFFECT = 1e-2             # what clipping, guidance or a bug must change, relative


# --- the fake UNet: numpy (reference, NumpyDenoiser) and torch (FusedDenoiser) ------------------

@functools.lru_cache(maxsize=None)
def mixing(width: int, channels: int) -> np.ndarray:
    """(D, C) fixed weights: how a conditioning row moves each latent channel."""
    return np.random.default_rng(width * 100 + channels).standard_normal((width, channels)) * 0.3


def fake_unet(sample: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> np.ndarray:
    """(R, C, h, w), (R,), (R, L, D) -> (R, C, h, w) in sample's dtype: nonlinear in the sample,
    different at every timestep and for every conditioning row."""
    dtype = sample.dtype
    t = np.asarray(timestep, dtype).reshape(-1, 1, 1, 1)
    shift = np.tanh(context.astype(dtype).mean(axis=1) @ mixing(context.shape[-1], sample.shape[1]).astype(dtype))
    return (np.tanh(sample * (0.3 + t / 1500.0)) + 0.2 * np.cos(t / 97.0) * sample + 0.05 * np.sin(t / 50.0)
            + shift[:, :, None, None] * (0.5 + 0.1 * np.sin(sample)))


def fake_unet_feeds(feeds) -> np.ndarray:
    """fake_unet as a ComponentRunner: spec-named feeds -> model_output."""
    return fake_unet(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"])


def torch_fake_unet(sample: torch.Tensor, timestep: torch.Tensor, conditioning) -> torch.Tensor:
    """fake_unet in torch, called as FusedDenoiser calls a UNet: unet(sample, timestep, conditioning)."""
    context = conditioning["encoder_hidden_states"]
    t = timestep.to(sample.dtype).reshape(-1, 1, 1, 1)
    weights = torch.from_numpy(mixing(context.shape[-1], sample.shape[1])).to(sample.dtype)
    shift = torch.tanh(context.to(sample.dtype).mean(dim=1) @ weights)
    return (torch.tanh(sample * (0.3 + t / 1500.0)) + 0.2 * torch.cos(t / 97.0) * sample
            + 0.05 * torch.sin(t / 50.0) + shift[:, :, None, None] * (0.5 + 0.1 * torch.sin(sample)))


# --- the cases -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    sampler: str
    prediction: PredictionType
    spacing: TimestepSpacing
    clip: bool
    eta: float
    guided: bool

    def config(self, clip: bool | None = None) -> SchedulerConfig:
        return SchedulerConfig(prediction_type=self.prediction, timestep_spacing=self.spacing,
                               clip_sample=self.clip if clip is None else clip,
                               clip_sample_range=CLIP_RANGE)

    @property
    def id(self) -> str:
        parts = [self.sampler, self.prediction.value, self.spacing.value]
        parts += ["clip"] if self.clip else []
        parts += [f"eta{self.eta:g}"] if self.sampler == "ddim" else []
        return "-".join(parts + ["guided" if self.guided else "unguided"])


def all_cases() -> list[Case]:
    cases = []
    for sampler in SAMPLERS:
        spacings = [TimestepSpacing.LEADING] if sampler in SPACING_FREE else list(TimestepSpacing)
        for prediction in PredictionType:
            for spacing in spacings:
                for clip in ((False, True) if sampler in CLIPPING else (False,)):
                    for eta in ((0.0, 1.0) if sampler == "ddim" else (0.0,)):
                        for guided in (True, False):
                            cases.append(Case(sampler, prediction, spacing, clip, eta, guided))
    return cases


CASES = all_cases()


def case(sampler: str, *, prediction=PredictionType.EPSILON, spacing=TimestepSpacing.LEADING, clip=False,
         eta=0.0, guided=True) -> Case:
    found = Case(sampler, prediction, spacing, clip, eta, guided)
    assert found in CASES, found
    return found


@dataclasses.dataclass(frozen=True)
class Draws:
    """One case's random inputs, float64: start noise, per-evaluation noise, [uncond; cond] rows."""
    noise: np.ndarray                 # (B, C, h, w)
    step_noises: list[np.ndarray]     # N x (B, C, h, w)
    context: np.ndarray               # (2B, L, D): rows [uncond; cond]

    @classmethod
    def make(cls, c: Case, seed: int = 0) -> "Draws":
        count = make_plan(c.sampler, c.config(), STEPS, eta=c.eta).num_evaluations
        rng = np.random.default_rng(seed)
        return cls(rng.standard_normal(SHAPE), [rng.standard_normal(SHAPE) for _ in range(count)],
                   rng.standard_normal((2 * SHAPE[0], *CONTEXT)))

    def rows(self, guided: bool) -> np.ndarray:
        """The UNet's conditioning: [uncond; cond] guided, the cond rows alone unguided."""
        return self.context if guided else self.context[SHAPE[0]:]


# --- the independent reference: diffusers' scheduler + CFG written out, float64 ----------------

def diffusers_run(sampler: str, config: SchedulerConfig, noise: np.ndarray, context: np.ndarray,
                  guidance: float | None, state, *, eta: float = 0.0, step_noises=()) -> np.ndarray:
    """Final latents of sampler's diffusers scheduler from `noise` (B, C, h, w), float64, guided
    over `context` rows [uncond; cond] (2B rows) or unguided (B rows)."""
    scheduler = oracle(sampler, config)
    scheduler.set_timesteps(STEPS)
    if sampler.startswith(("euler", "dpmpp")):
        scheduler.sigmas = scheduler.sigmas.double()
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    kwargs = {"eta": eta} if sampler == "ddim" else {}
    state["noises"] = list(step_noises)
    batch = noise.shape[0]
    x = torch.from_numpy(noise * float(scheduler.init_noise_sigma))
    for i, t in enumerate(scheduler.timesteps):
        state["i"] = i
        model_input = scheduler.scale_model_input(x, t).numpy()
        if guidance is not None:
            output = fake_unet(np.concatenate([model_input, model_input]), np.full(2 * batch, float(t)), context)
            uncond, cond = output[:batch], output[batch:]
            output = uncond + guidance * (cond - uncond)
        else:
            output = fake_unet(model_input, np.full(batch, float(t)), context)
        x = scheduler.step(torch.from_numpy(output), t, x, **kwargs).prev_sample
    return x.numpy()


def reference_run(c: Case, draws: Draws, state, *, clip: bool | None = None) -> np.ndarray:
    """The reference's final latents for case `c` (clip overrides c.clip)."""
    return diffusers_run(c.sampler, c.config(clip), draws.noise, draws.rows(c.guided),
                         GUIDANCE if c.guided else None, state, eta=c.eta, step_noises=draws.step_noises)


# --- the denoisers under test ----------------------------------------------------------------------

def job_for(c: Case, draws: Draws, dtype, *, swap_rows: bool = False) -> DenoiseJob:
    plan = make_plan(c.sampler, c.config(), STEPS, eta=c.eta)
    context = draws.rows(c.guided)
    if swap_rows:
        context = np.concatenate([context[SHAPE[0]:], context[:SHAPE[0]]])
    noise = [n.astype(dtype) if need else None for n, need in zip(draws.step_noises, plan.needs_noise)]
    return DenoiseJob(plan, plan.initial_latents(draws.noise).astype(dtype),
                      {"encoder_hidden_states": context.astype(dtype)}, GUIDANCE if c.guided else None, noise)


def numpy_run(job: DenoiseJob) -> np.ndarray:
    result = NumpyDenoiser(fake_unet_feeds)(job)
    assert result.evaluations == job.plan.num_evaluations and result.latents.dtype == job.latents.dtype
    return result.latents


def torch_run(job: DenoiseJob) -> np.ndarray:
    result = FusedDenoiser(torch_fake_unet, torch.device("cpu"), torch.float32, use_cuda_graph=False)(job)
    assert result.evaluations == job.plan.num_evaluations
    return result.latents


@dataclasses.dataclass
class Errors:
    """Relative L2 errors of one case's denoisers."""
    numpy64: float       # NumpyDenoiser float64 vs the reference
    numpy32: float       # NumpyDenoiser float32 vs the reference
    torch: float         # FusedDenoiser vs the reference
    torch_numpy: float   # FusedDenoiser vs NumpyDenoiser float32

    def check(self) -> None:
        assert self.numpy64 <= RTOL, f"numpy denoiser (float64) vs reference: {self.numpy64:.3g} > {RTOL}"
        assert self.numpy32 <= FLOAT32_RTOL, f"numpy denoiser (float32) vs reference: {self.numpy32:.3g}"
        assert self.torch <= FLOAT32_RTOL, f"torch denoiser vs reference: {self.torch:.3g}"
        assert self.torch_numpy <= TORCH_RTOL, f"torch denoiser vs numpy denoiser: {self.torch_numpy:.3g}"


def denoiser_errors(c: Case, state, *, swap_rows: bool = False, reference: np.ndarray | None = None) -> Errors:
    """Every denoiser on case `c` vs `reference` (default: reference_run on Draws.make(c))."""
    draws = Draws.make(c)
    expected = reference_run(c, draws, state) if reference is None else reference
    ours32 = numpy_run(job_for(c, draws, np.float32, swap_rows=swap_rows))
    fused = torch_run(job_for(c, draws, np.float32, swap_rows=swap_rows))
    return Errors(numpy64=rel_err(numpy_run(job_for(c, draws, np.float64, swap_rows=swap_rows)), expected),
                  numpy32=rel_err(ours32, expected), torch=rel_err(fused, expected),
                  torch_numpy=rel_err(fused, ours32))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tensors of 128 numbers: one thread is faster than several, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- 1. every denoiser equals the reference ------------------------------------------------------

@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_denoisers_match_the_reference(c: Case, feed_noise) -> None:
    draws = Draws.make(c)
    expected = reference_run(c, draws, feed_noise)
    assert np.isfinite(expected).all()
    denoiser_errors(c, feed_noise, reference=expected).check()
    if c.clip:     # the range clips here: the case says something about the clamp
        unclipped = reference_run(c, draws, feed_noise, clip=False)
        assert rel_err(unclipped, expected) > MIN_EFFECT, "clip_sample_range never clips in this case"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_fake_unet_makes_guidance_and_rows_matter(sampler: str, feed_noise) -> None:
    """Guided and unguided runs, and a run with the rows swapped, differ (else the cases above
    could not see a wrong guidance formula or a row mix-up)."""
    c = case(sampler)
    draws = Draws.make(c)
    guided = numpy_run(job_for(c, draws, np.float64))
    unguided = numpy_run(job_for(dataclasses.replace(c, guided=False), draws, np.float64))
    swapped = numpy_run(job_for(c, draws, np.float64, swap_rows=True))
    assert rel_err(unguided, guided) > MIN_EFFECT and rel_err(swapped, guided) > MIN_EFFECT


# --- 2. the pipeline on a schedule that clips: torch backend vs ONNX Runtime --------------------

@pytest.fixture(scope="module")
def clip_bundle(tmp_path_factory) -> Path:
    """The tiny preset (seed 0) with clip_sample=True, clip_sample_range 0.5: text encoder, UNet and
    decoder for 32..48 px, at most 2 images (no constant folding: not what these tests are about)."""
    config = preset("tiny")
    config = dataclasses.replace(config, scheduler=dataclasses.replace(
        config.scheduler, clip_sample=True, clip_sample_range=CLIP_RANGE))
    source = ModelSource(model=build_model(config, seed=0), source="test:tiny-clip-sample", random_weights=True,
                         write_tokenizer=synthetic_tokenizer_writer(config.conditioner),
                         record=SourceRecord(kind="preset", location="tiny", seed=0))
    options = ExportOptions(components=("text_encoder", "unet", "vae_decoder"), optimize=False,
                            shape_ranges=ShapeRanges(min_size=32, opt_size=32, max_size=48, max_batch=2))
    return export_bundle(source, tmp_path_factory.mktemp("clip") / "bundle", options).path


@pytest.fixture(scope="module")
def clip_pipelines(clip_bundle) -> dict[str, Pipeline]:
    return {"onnxruntime": Pipeline.load(clip_bundle, "onnxruntime", threads=1),
            "torch": Pipeline.load(clip_bundle, "torch", device="cpu")}


def clip_request(sampler: str) -> GenerationRequest:
    return GenerationRequest(prompt=list(PROMPTS), negative_prompt=NEGATIVE, steps=4, guidance=GUIDANCE,
                             sampler=sampler, seed=42, height=32, width=48, batch=2)


def without_clip_sample(pipeline: Pipeline, monkeypatch) -> None:
    scheduler = dataclasses.replace(pipeline.config.scheduler, clip_sample=False)
    monkeypatch.setattr(pipeline, "config", dataclasses.replace(pipeline.config, scheduler=scheduler))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_clip_sample_schedule_torch_backend_matches_onnxruntime(clip_pipelines, sampler: str,
                                                                monkeypatch) -> None:
    onnx_pipeline, torch_pipeline = clip_pipelines["onnxruntime"], clip_pipelines["torch"]
    request = clip_request(sampler)
    assert onnx_pipeline.checked(request)[2].clip_range == CLIP_RANGE
    found, expected = torch_pipeline.generate(request), onnx_pipeline.generate(request)
    assert_images(found, 2, 32, 48)
    # the tolerances of test_pipeline's torch-vs-ONNX Runtime tests
    assert mean_abs(found.images, expected.images) <= IMAGE_TOL
    assert max_abs(found.images, expected.images) <= IMAGE_MAX_TOL
    assert rel_l2(found.latents, expected.latents) <= LATENT_RTOL
    # the clamp bites: without clip_sample the same request ends elsewhere
    without_clip_sample(onnx_pipeline, monkeypatch)
    unclipped = onnx_pipeline.generate(request)
    assert rel_l2(unclipped.latents, expected.latents) > MIN_EFFECT


# --- 3. int8 calibration: its trajectories are the runtime's loop ---------------------------------

CALIBRATION_PROMPT = "a red fox"


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """A guided TrajectoryMaker over the tiny preset (synthetic tokenizer) and its UNet spec."""
    config = preset("tiny")
    folder = tmp_path_factory.mktemp("tokenizer")
    write_synthetic_tokenizer(folder, config.conditioner)
    tokenizer = load_tokenizer(folder, config.conditioner)
    model = build_model(config, seed=0).eval()
    spec = component_specs(config, ShapeRanges.for_model(config), Precision.FP32)["unet"]
    return TrajectoryMaker(model, spec, (4, 4), GUIDANCE, tokenizer), tokenizer


def calibration_error(maker: TrajectoryMaker, state) -> tuple[float, Trajectory]:
    """(a guided calibration run of the fake UNet vs the reference from its start latents and
    logged rows, the run)."""
    run = maker.run(fake_unet_feeds, STEPS, 3, CALIBRATION_PROMPT)
    first = run.feeds[0]
    start = first["sample"][:1].astype(np.float64)      # DDIM: input_scale 1, init_noise_sigma 1
    expected = diffusers_run("ddim", maker.config.scheduler, start,
                             first["encoder_hidden_states"].astype(np.float64), GUIDANCE, state)
    return rel_err(run.latents, expected), run


def test_int8_calibration_trajectories_are_the_runtime_loop(calibration, feed_noise) -> None:
    maker, tokenizer = calibration
    error, run = calibration_error(maker, feed_noise)
    assert error <= FLOAT32_RTOL, "the calibration run vs the reference"
    plan = make_plan("ddim", maker.config.scheduler, STEPS)
    assert np.all(plan.input_scale == 1.0) and plan.init_noise_sigma == 1.0
    assert len(run.feeds) == len(run.outputs) == plan.num_evaluations
    # every logged feed: one latent twice, rows [uncond; cond] = [embed(""); embed(prompt)]
    with torch.no_grad():
        uncond, cond = (maker.model.conditioner(torch.from_numpy(np.asarray(
            tokenizer.encode([text]).input_ids, np.int32))).numpy() for text in ("", CALIBRATION_PROMPT))
    for i, feeds in enumerate(run.feeds):
        assert feeds["sample"].shape == (2, 4, 4, 4)
        np.testing.assert_array_equal(feeds["sample"][:1], feeds["sample"][1:])
        np.testing.assert_array_equal(feeds["timestep"], np.full(2, plan.timesteps[i], np.float32))
        np.testing.assert_allclose(feeds["encoder_hidden_states"][:1], uncond, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(feeds["encoder_hidden_states"][1:], cond, rtol=1e-5, atol=1e-6)
    assert rel_err(uncond, cond) > MIN_EFFECT

    # the same model outputs through a NumpyDenoiser built here: the same latents, bit for bit
    logged = iter(zip(run.feeds, run.outputs))

    def replay(feeds) -> np.ndarray:
        expected_feeds, output = next(logged)
        for name, value in expected_feeds.items():
            np.testing.assert_array_equal(feeds[name], value, err_msg=name)
        return output

    first = run.feeds[0]
    job = DenoiseJob(plan, first["sample"][:1].copy(), {"encoder_hidden_states": first["encoder_hidden_states"]},
                     GUIDANCE, [None] * plan.num_evaluations)
    np.testing.assert_array_equal(NumpyDenoiser(replay, maker.spec)(job).latents, run.latents)


# --- 4. the audit: each one-line bug makes the comparisons fail ---------------------------------

def swapped_guide(model_output, scale):
    """The mutation: guidance toward the unconditional prediction, cond + g * (uncond - cond)."""
    half = model_output.shape[0] // 2
    uncond, cond = model_output[:half], model_output[half:]
    return cond + scale * (uncond - cond)


def remove_torch_clamp(monkeypatch) -> None:
    """The mutation: the torch step's x0.clamp(-r, r) removed (its tables carry r = inf instead)."""
    clamped = torch_engine._Tables.from_plan
    monkeypatch.setattr(torch_engine._Tables, "from_plan", classmethod(
        lambda cls, plan, device: dataclasses.replace(clamped(plan, device), clip_range=math.inf)))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_audit_swapped_guidance_formula_fails(sampler: str, feed_noise, monkeypatch) -> None:
    c = case(sampler)
    # the one formula, wherever it was imported (the numpy loop and the torch step)
    monkeypatch.setattr(denoise_module, "guide", swapped_guide)
    monkeypatch.setattr(torch_engine, "guide", swapped_guide)
    errors = denoiser_errors(c, feed_noise)
    assert errors.numpy64 > MIN_EFFECT and errors.numpy32 > MIN_EFFECT and errors.torch > MIN_EFFECT, errors
    with pytest.raises(AssertionError, match="numpy denoiser"):
        errors.check()
    # unguided runs never call it: the comparison blames guidance, not the loop
    denoiser_errors(dataclasses.replace(c, guided=False), feed_noise).check()


@pytest.mark.parametrize("sampler", ["ddim", "euler-a", "dpmpp-2m"])
def test_audit_swapped_conditioning_rows_fail(sampler: str, feed_noise) -> None:
    errors = denoiser_errors(case(sampler), feed_noise, swap_rows=True)
    assert errors.numpy64 > MIN_EFFECT and errors.torch > MIN_EFFECT, errors
    with pytest.raises(AssertionError, match="numpy denoiser"):
        errors.check()


@pytest.mark.parametrize("prediction", list(PredictionType), ids=lambda p: p.value)
@pytest.mark.parametrize("sampler", CLIPPING)
def test_audit_torch_clamp_removed_fails(sampler: str, prediction: PredictionType, feed_noise,
                                         monkeypatch) -> None:
    c = case(sampler, prediction=prediction, clip=True)
    remove_torch_clamp(monkeypatch)
    errors = denoiser_errors(c, feed_noise)
    assert errors.torch > MIN_EFFECT and errors.torch_numpy > MIN_EFFECT, errors
    assert errors.numpy64 <= RTOL, "the mutation reached the numpy loop"
    with pytest.raises(AssertionError, match="torch denoiser"):
        errors.check()


def test_audit_torch_clip_term_dropped_fails(feed_noise) -> None:
    """A plan whose clip_range is None (no clipped x0 term at all) given to the torch denoiser."""
    c = case("ddim", clip=True)
    draws = Draws.make(c)
    job = job_for(c, draws, np.float32)
    dropped = dataclasses.replace(job, plan=dataclasses.replace(job.plan, clip_range=None))
    assert rel_err(torch_run(dropped), reference_run(c, draws, feed_noise)) > FLOAT32_RTOL * 100


@pytest.mark.parametrize("c", [case("euler-a"), case("euler-a", guided=False),
                               case("ddpm", prediction=PredictionType.V_PREDICTION), case("ddim", eta=1.0),
                               case("lcm")], ids=lambda c: c.id)
def test_audit_update_noise_dropped_fails(c: Case, feed_noise, monkeypatch) -> None:
    """The noise coefficient C dropped from the tables (needs_noise untouched, noise still drawn)."""
    assemble = tables_module._assemble

    def without_noise(*args, **kwargs) -> SamplerPlan:
        plan = assemble(*args, **kwargs)
        return dataclasses.replace(plan, noise_coefs=np.zeros_like(plan.noise_coefs))

    monkeypatch.setattr(tables_module, "_assemble", without_noise)
    assert make_plan(c.sampler, c.config(), STEPS, eta=c.eta).needs_noise.any()
    errors = denoiser_errors(c, feed_noise)
    assert errors.numpy64 > MIN_EFFECT and errors.torch > MIN_EFFECT, errors
    with pytest.raises(AssertionError, match="numpy denoiser"):
        errors.check()


def test_audit_swapped_guidance_formula_fails_the_calibration_check(calibration, feed_noise,
                                                                    monkeypatch) -> None:
    """Issue 15's survivor: the formula swapped where calibration makes its trajectories."""
    monkeypatch.setattr(denoise_module, "guide", swapped_guide)
    assert calibration_error(calibration[0], feed_noise)[0] > MIN_EFFECT


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_audit_torch_clamp_removed_fails_the_pipeline_check(clip_pipelines, sampler: str,
                                                           monkeypatch) -> None:
    """Issue 15's survivor at the pipeline level: the clip_sample schedule on the torch backend."""
    remove_torch_clamp(monkeypatch)
    request = clip_request(sampler)
    found, expected = clip_pipelines["torch"].generate(request), clip_pipelines["onnxruntime"].generate(request)
    assert rel_l2(found.latents, expected.latents) > LATENT_RTOL * 100
