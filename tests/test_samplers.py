"""Samplers against diffusers' schedulers: same timesteps, same trajectories, same img2img start.

The oracle is the diffusers scheduler of each sampler configured from the same SchedulerConfig,
driven like StableDiffusionPipeline drives it. Both sides run in float64 with the same
deterministic nonlinear fake UNet and the same standard normal noise (diffusers' noise draw is
replaced by one that returns our noise for the current step).
"""
from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import types

import numpy as np
import pytest

from ldmrt.config import BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing
from ldmrt.errors import ConfigError, GenerationError, ShapeError
from ldmrt import sampling as samplers
from ldmrt.sampling import DenoiseJob, History, NumpyDenoiser, make_plan, step

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (  # noqa: E402
    StableDiffusionImg2ImgPipeline)

SHAPE = (2, 4, 8, 8)
# Worst relative L2 error measured over samplers x predictions x spacings x beta schedules x
# {1, 2, 4, 13, 50} steps: 6e-7 (one-ulp differences of float32 linspace betas, and the float32
# sample rounding inside diffusers' Euler and DPM steps).
RTOL = 2e-6
# Stock diffusers evaluates its step scalars in float32 as well; with very large sigmas (cosine
# schedule near t = T-1) that alone costs up to 1e-4.
RTOL_STOCK = 1e-4

from tests.reference import DIFFUSERS_SCHEDULERS as _ORACLES  # noqa: E402
_NOISE_MODULES = ("scheduling_ddim", "scheduling_ddpm", "scheduling_euler_ancestral_discrete",
                  "scheduling_lcm")


def oracle(name: str, config: SchedulerConfig, *, promote: bool = True):
    """The diffusers scheduler of sampler `name`, configured from `config`.

    promote: hold the schedule tensors in float64 (same values) so that diffusers' step scalars
    are not rounded to float32; the schedule itself is untouched.
    """
    class_name, extra = _ORACLES[name]
    cls = getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    config = samplers.scheduler_for(name, config)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    fields = {k: (v.value if hasattr(v, "value") else v) for k, v in fields.items() if k in accepted}
    return promoted(name, cls(**fields, **extra)) if promote else cls(**fields, **extra)


def promoted(name: str, scheduler):
    """`scheduler` with its schedule tensors held in float64 (same values)."""
    if not name.startswith(("euler", "dpmpp")):
        for attribute in ("alphas_cumprod", "final_alpha_cumprod", "one"):
            if hasattr(scheduler, attribute):
                setattr(scheduler, attribute, getattr(scheduler, attribute).double())
    return scheduler


def fake_unet(x: np.ndarray, t: float) -> np.ndarray:
    """Deterministic, nonlinear in x, different at every timestep."""
    return np.tanh(x * (0.3 + t / 1500.0)) + 0.2 * np.cos(t / 97.0) * x + 0.05 * np.sin(t / 50.0)


def denoise(plan, latents: np.ndarray, noises=()) -> np.ndarray:
    """The numpy Denoiser over fake_unet; `noises` are consumed where the plan adds noise."""
    queue = iter(noises)
    noise = [next(queue, None) if needed else None for needed in plan.needs_noise]
    job = DenoiseJob(plan, latents, {}, None, noise)
    return NumpyDenoiser(lambda feeds: fake_unet(feeds["sample"], float(feeds["timestep"][0])))(job).latents


@pytest.fixture
def feed_noise(monkeypatch):
    """Make diffusers draw noises[state['i']] where it would call randn_tensor."""
    state = {"i": 0, "noises": None}

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        noise = state["noises"][state["i"]]
        assert tuple(shape) == noise.shape
        return torch.from_numpy(noise).to(dtype)

    for module in _NOISE_MODULES:
        monkeypatch.setattr(getattr(diffusers.schedulers, module), "randn_tensor", fake_randn)
    return state


def run_diffusers(scheduler, timesteps, latents, noises, state, **step_kwargs) -> np.ndarray:
    state["noises"] = noises
    x = torch.from_numpy(latents)
    for i, t in enumerate(timesteps):
        state["i"] = i
        model_input = scheduler.scale_model_input(x, t)
        model_output = torch.from_numpy(fake_unet(model_input.numpy(), float(t)))
        x = scheduler.step(model_output, t, x, **step_kwargs).prev_sample
    return x.numpy()


def run_ours(plan, latents, noises) -> np.ndarray:
    history = History(plan)
    x = latents
    for i in range(plan.num_evaluations):
        model_output = fake_unet(x * plan.input_scale[i], float(plan.timesteps[i]))
        x = step(plan, i, x, model_output, history, noises[i] if plan.needs_noise[i] else None)
    return x


def rel_err(ours: np.ndarray, reference: np.ndarray) -> float:
    assert np.all(np.isfinite(ours)), "non-finite latents"
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def draws(seed: int, count: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE), [rng.standard_normal(SHAPE) for _ in range(count)]


def compare_txt2img(name, config, num_steps, state, *, eta=0.0, promote=True, seed=0, rtol=None,
                    reference=None):
    """Full text-to-image trajectory, ours vs diffusers (`reference`, else oracle(name, config));
    returns our final latents."""
    scheduler = oracle(name, config, promote=promote) if reference is None else \
        (promoted(name, reference) if promote else reference)
    scheduler.set_timesteps(num_steps)
    if promote and name.startswith(("euler", "dpmpp")):
        scheduler.sigmas = scheduler.sigmas.double()
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)   # (diffusers' timestep lookup trips over repeated timesteps)
    plan = make_plan(name, config, num_steps, eta=eta)
    np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps.numpy().astype(np.float32))
    np.testing.assert_allclose(plan.init_noise_sigma, float(scheduler.init_noise_sigma), rtol=1e-6)
    noise, step_noises = draws(seed, plan.num_evaluations)
    kwargs = {"eta": eta} if name == "ddim" else {}
    expected = run_diffusers(scheduler, scheduler.timesteps, noise * float(scheduler.init_noise_sigma),
                             step_noises, state, **kwargs)
    ours = run_ours(plan, plan.initial_latents(noise), step_noises)
    assert rel_err(ours, expected) <= (rtol or (RTOL if promote else RTOL_STOCK))
    return ours


# --- trajectories -------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", list(TimestepSpacing), ids=lambda s: s.value)
@pytest.mark.parametrize("prediction", list(PredictionType), ids=lambda p: p.value)
@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_trajectory_matches_diffusers(name, prediction, spacing, feed_noise):
    config = SchedulerConfig(prediction_type=prediction, timestep_spacing=spacing)
    compare_txt2img(name, config, 13, feed_noise)


@pytest.mark.parametrize("schedule", list(BetaSchedule), ids=lambda b: b.value)
@pytest.mark.parametrize("prediction", list(PredictionType), ids=lambda p: p.value)
@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_beta_schedules_match_diffusers(name, prediction, schedule, feed_noise):
    config = SchedulerConfig(beta_schedule=schedule, beta_start=0.0001, beta_end=0.02,
                             prediction_type=prediction, timestep_spacing=TimestepSpacing.LINSPACE)
    compare_txt2img(name, config, 10, feed_noise, seed=1)


@pytest.mark.parametrize("num_steps", [1, 2, 4, 50])
@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_step_counts_match_diffusers(name, num_steps, feed_noise):
    compare_txt2img(name, SchedulerConfig(), num_steps, feed_noise, seed=num_steps)


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_stock_diffusers_within_float32_rounding(name, feed_noise):
    """Unmodified schedulers, as a pipeline runs them, on the SD 2.x-style v-prediction config."""
    config = SchedulerConfig(prediction_type=PredictionType.V_PREDICTION,
                             timestep_spacing=TimestepSpacing.TRAILING)
    compare_txt2img(name, config, 20, feed_noise, promote=False, seed=2)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("prediction", list(PredictionType), ids=lambda p: p.value)
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_matches_diffusers(eta, prediction, set_alpha_to_one, feed_noise):
    config = SchedulerConfig(prediction_type=prediction, set_alpha_to_one=set_alpha_to_one)
    plan = make_plan("ddim", config, 12, eta=eta)
    assert plan.needs_noise[:-1].all()
    assert plan.needs_noise[-1] != set_alpha_to_one     # alpha_prev = 1 leaves no variance
    compare_txt2img("ddim", config, 12, feed_noise, eta=eta, seed=3)


@pytest.mark.parametrize("name", ["plms", "ddim"])
def test_set_alpha_to_one_matches_diffusers(name, feed_noise):
    compare_txt2img(name, SchedulerConfig(set_alpha_to_one=True), 9, feed_noise, seed=4)


@pytest.mark.parametrize("prediction", list(PredictionType), ids=lambda p: p.value)
@pytest.mark.parametrize("name", ["ddim", "ddpm", "lcm"])
def test_clip_sample_matches_diffusers(name, prediction, feed_noise):
    config = SchedulerConfig(prediction_type=prediction, clip_sample=True)
    clipped = compare_txt2img(name, config, 8, feed_noise, seed=5)
    plan = make_plan(name, dataclasses.replace(config, clip_sample=False), 8)
    noise, step_noises = draws(5, plan.num_evaluations)
    unclipped = run_ours(plan, plan.initial_latents(noise), step_noises)
    assert rel_err(clipped, unclipped) > 1e-3, "the fake UNet never drives x0 out of [-1, 1]"


@pytest.mark.parametrize("schedule", list(BetaSchedule), ids=lambda b: b.value)
def test_alphas_cumprod_match_diffusers(schedule):
    config = SchedulerConfig(beta_schedule=schedule, beta_start=0.0001, beta_end=0.02)
    reference = diffusers.DDPMScheduler(beta_schedule=schedule.value, beta_start=0.0001,
                                        beta_end=0.02).alphas_cumprod.numpy()
    ours = samplers.training_alphas_cumprod(config)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, rtol=1e-6)


# --- img2img ------------------------------------------------------------------------------------

@pytest.mark.parametrize("strength", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_img2img_matches_diffusers(name, strength, feed_noise):
    config = SchedulerConfig(prediction_type=PredictionType.V_PREDICTION)
    num_steps = 10
    scheduler = oracle(name, config)
    if name == "lcm":       # LatentConsistencyModelImg2ImgPipeline: strength shapes the schedule
        scheduler.set_timesteps(num_steps, strength=strength)
        timesteps = scheduler.timesteps
    else:                   # StableDiffusionImg2ImgPipeline: keep the last steps
        scheduler.set_timesteps(num_steps)
        if name.startswith(("euler", "dpmpp")):
            scheduler.sigmas = scheduler.sigmas.double()
        timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
            types.SimpleNamespace(scheduler=scheduler), num_steps, strength, "cpu")
    plan = make_plan(name, config, num_steps, strength=strength)
    np.testing.assert_array_equal(plan.timesteps, timesteps.numpy().astype(np.float32))

    rng = np.random.default_rng(6)
    image_latents, noise = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    start = scheduler.add_noise(torch.from_numpy(image_latents), torch.from_numpy(noise),
                                timesteps[:1]).numpy()
    ours_start = plan.initial_latents(noise, image_latents)
    assert rel_err(ours_start, start) <= 1e-6

    _, step_noises = draws(7, plan.num_evaluations)
    expected = run_diffusers(scheduler, timesteps, start, step_noises, feed_noise)
    assert rel_err(run_ours(plan, ours_start, step_noises), expected) <= RTOL


def test_img2img_keeps_the_last_steps():
    full = make_plan("ddim", SchedulerConfig(), 20)
    part = make_plan("ddim", SchedulerConfig(), 20, strength=0.6)
    assert part.start_step == 8 and part.num_evaluations == 12
    np.testing.assert_array_equal(part.timesteps, full.timesteps[8:])


# --- the loop helper, dtypes, structure ---------------------------------------------------------

@pytest.mark.parametrize("name", ["euler-a", "dpmpp-2m", "plms"])
def test_denoise_matches_diffusers(name, feed_noise):
    config = SchedulerConfig()
    scheduler = oracle(name, config)
    scheduler.set_timesteps(15)
    if name.startswith(("euler", "dpmpp")):
        scheduler.sigmas = scheduler.sigmas.double()
    plan = make_plan(name, config, 15)
    noise, step_noises = draws(8, plan.num_evaluations)
    expected = run_diffusers(scheduler, scheduler.timesteps, noise * float(scheduler.init_noise_sigma),
                             step_noises, feed_noise)
    ours = denoise(plan, plan.initial_latents(noise), step_noises)     # noise only where needed
    assert rel_err(ours, expected) <= RTOL


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_float32_latents_stay_float32(name):
    plan = make_plan(name, SchedulerConfig(), 8)
    noise, step_noises = draws(9, plan.num_evaluations)
    reference = run_ours(plan, plan.initial_latents(noise), step_noises)
    single = run_ours(plan, plan.initial_latents(noise.astype(np.float32)),
                      [n.astype(np.float32) for n in step_noises])
    assert single.dtype == np.float32
    assert rel_err(single, reference) <= 1e-5


def test_plan_shape_and_immutability():
    histories = {name: make_plan(name, SchedulerConfig(), 10).history for name in samplers.SAMPLERS}
    assert histories == {"ddim": 1, "ddpm": 1, "plms": 5, "euler": 1, "euler-a": 1,
                         "dpmpp-2m": 2, "dpmpp-2m-karras": 2, "lcm": 1}
    plan = make_plan("plms", SchedulerConfig(), 10)
    assert plan.num_evaluations == 11      # PNDM's warm-up evaluates one timestep twice
    with pytest.raises(ValueError):
        plan.sample_coefs[0, 0] = 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.eta = 1.0
    euler = make_plan("euler", SchedulerConfig(), 10)
    assert np.all(euler.input_scale < 1.0) and euler.init_noise_sigma > 1.0


def test_runtime_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None\n"
            "from ldmrt import sampling as samplers\n"
            "from ldmrt.config import SchedulerConfig\n"
            "samplers.make_plan('dpmpp-2m-karras', SchedulerConfig(), 4)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- bad input ----------------------------------------------------------------------------------

def test_unknown_sampler_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown sampler 'heun'.*dpmpp-2m-karras"):
        make_plan("heun", SchedulerConfig(), 10)


@pytest.mark.parametrize("kwargs", [
    dict(num_steps=0), dict(num_steps=-3), dict(num_steps=2.5), dict(num_steps=True),
    dict(num_steps=1001),
    dict(eta=-0.1), dict(eta=1.5), dict(eta=float("nan")), dict(eta=float("inf")), dict(eta="1"),
    dict(strength=0.0), dict(strength=-0.5), dict(strength=1.5), dict(strength=float("nan")),
    dict(strength=0.05),                         # int(10 * 0.05) = 0 steps left
])
def test_bad_request_values(kwargs):
    args = {"num_steps": 10, **kwargs}
    with pytest.raises(GenerationError):
        make_plan("ddim", SchedulerConfig(), args.pop("num_steps"), **args)


@pytest.mark.parametrize("name", [n for n in samplers.SAMPLERS if n != "ddim"])
def test_eta_only_for_ddim(name):
    with pytest.raises(GenerationError, match="only the ddim sampler has an eta"):
        make_plan(name, SchedulerConfig(), 10, eta=0.5)


def test_lcm_limits():
    with pytest.raises(GenerationError, match="original_inference_steps"):
        make_plan("lcm", SchedulerConfig(), 51)
    with pytest.raises(GenerationError, match="original_inference_steps"):
        make_plan("lcm", SchedulerConfig(), 8, strength=0.15)      # int(50 * 0.15) = 7 < 8
    with pytest.raises(GenerationError, match="lcm sampler only"):
        make_plan("ddim", SchedulerConfig(), 8, original_inference_steps=25)
    assert make_plan("lcm", SchedulerConfig(), 8, original_inference_steps=25).timesteps[0] == 999


def test_bad_scheduler_configs():
    with pytest.raises(ConfigError, match="SchedulerConfig"):
        make_plan("ddim", {"num_train_timesteps": 1000}, 10)
    with pytest.raises(ConfigError, match="prediction_type"):
        make_plan("ddim", SchedulerConfig(prediction_type="sample"), 10)
    with pytest.raises(GenerationError, match="steps 10: .*at most 4 steps.*steps_offset 200"):
        make_plan("ddim", SchedulerConfig(steps_offset=200), 10)     # 900 + 200 >= 1000
    with pytest.raises(GenerationError, match="steps 999: .*at most 998 steps.*steps \\+ 1 points"):
        make_plan("dpmpp-2m", SchedulerConfig(), 999)               # 999 * 1 + 1 = 1000


def test_step_rejects_bad_calls():
    plan = make_plan("euler-a", SchedulerConfig(), 5)
    x = np.zeros(SHAPE)
    with pytest.raises(GenerationError, match="adds noise"):
        step(plan, 0, x, x, History(plan))
    with pytest.raises(ShapeError, match="noise shape"):
        step(plan, 0, x, x, History(plan), np.zeros((1, 4, 8, 8)))
    with pytest.raises(ShapeError, match="model_output shape"):
        step(plan, 0, x, np.zeros((2, 4, 8, 9)), History(plan), x)
    with pytest.raises(GenerationError, match="outside"):
        step(plan, 5, x, x, None, x)
    with pytest.raises(GenerationError, match="in order"):
        step(plan, 1, x, x, History(plan), x)
    multistep = make_plan("dpmpp-2m", SchedulerConfig(), 5)
    with pytest.raises(GenerationError, match="History"):
        step(multistep, 0, x, x)
    with pytest.raises(ShapeError, match=r"noise\[0\]: sampler 'euler-a' adds noise"):
        denoise(plan, x)


def test_initial_latents_rejects_bad_calls():
    plan = make_plan("ddim", SchedulerConfig(), 10, strength=0.5)
    with pytest.raises(GenerationError, match="image_latents"):
        plan.initial_latents(np.zeros(SHAPE))
    with pytest.raises(ShapeError, match="image_latents shape"):
        plan.initial_latents(np.zeros(SHAPE), np.zeros((1, 4, 8, 8)))
