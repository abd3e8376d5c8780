"""SDXL's base -> refiner hand-off (denoising_end / denoising_start) against diffusers' own pipelines.

The oracle is StableDiffusionXLPipeline (the base, `denoising_end`, output_type="latent") and
StableDiffusionXLImg2ImgPipeline (the refiner, `denoising_start`, the base's latents as `image`),
run for real with a stand-in UNet (tests.test_samplers.fake_unet, float64) and no text encoders or
VAE: their own cutoff, get_timesteps, set_begin_index and scheduler loop. Schedulers are configured
as in tests/test_samplers.py (float64 schedule tensors, same values) and draw our noise.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from ldmrt.config import PredictionType, SchedulerConfig, TimestepSpacing
from ldmrt.errors import GenerationError
from ldmrt.sampling import SAMPLERS, make_plan

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline  # noqa: E402
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.models.modeling_utils import ModelMixin  # noqa: E402
from diffusers.pipelines.stable_diffusion_xl import (  # noqa: E402
    pipeline_stable_diffusion_xl_img2img as xl_img2img)

from tests.test_samplers import (RTOL, SHAPE, draws, fake_unet, feed_noise, oracle,  # noqa: E402,F401
                                 rel_err, run_ours)

SDXL = SchedulerConfig()                       # SDXL's EulerDiscreteScheduler: leading, steps_offset 1
TRAILING_V = SchedulerConfig(prediction_type=PredictionType.V_PREDICTION,
                             timestep_spacing=TimestepSpacing.TRAILING, steps_offset=0)
LINSPACE = SchedulerConfig(timestep_spacing=TimestepSpacing.LINSPACE, steps_offset=0)
# (schedule, steps, fraction): the SDXL default, other spacings, a cutoff that round() decides
# (1000 - 1000/3 -> 667, not int()'s 666, a timestep of linspace's 4), and the fractions that leave the
# refiner only the last evaluation and the base only the first (resolved per sampler: `resolve_fraction`)
CASES = [(SDXL, 40, 0.8), (TRAILING_V, 25, 0.7), (LINSPACE, 13, 0.55), (LINSPACE, 4, 1 / 3),
         (SDXL, 9, "last"), (SDXL, 10, "first")]
CASE_IDS = ["sdxl-40-0.8", "trailing-v-25-0.7", "linspace-13-0.55", "linspace-4-1/3", "sdxl-9-last",
            "sdxl-10-first"]
HAND_OFF_SAMPLERS = ["ddim", "ddpm", "euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras", "lcm"]


# --- diffusers' SDXL pipelines around a stand-in UNet ------------------------------------------

class FakeUNet(ModelMixin, ConfigMixin):
    """SDXL's UNet as the pipelines see it: fake_unet of its input; records the timesteps and
    points feed_noise at the current evaluation."""

    @register_to_config
    def __init__(self, in_channels: int = 4, sample_size: int = 8, addition_time_embed_dim: int = 2,
                 time_cond_proj_dim: int | None = None, pooled: int = 3):
        super().__init__()
        self.add_embedding = torch.nn.Module()      # the pipelines check its input width: 6 time ids + pooled
        self.add_embedding.linear_1 = torch.nn.Linear(6 * addition_time_embed_dim + pooled, 1,
                                                      dtype=torch.float64)
        self.timesteps: list[float] = []
        self.noise_state: dict | None = None

    def forward(self, sample, timestep, **_):
        if self.noise_state is not None:
            self.noise_state["i"] = len(self.timesteps)
        self.timesteps.append(float(timestep))
        return (torch.from_numpy(fake_unet(sample.numpy(), float(timestep))),)


class FakeVAE(ModelMixin, ConfigMixin):
    """The VAE config the img2img pipeline reads; latents in and out, it never runs."""

    @register_to_config
    def __init__(self, block_out_channels=(1, 1, 1, 1), latent_channels: int = 4,
                 scaling_factor: float = 0.13025, force_upcast: bool = False):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))


def sdxl_scheduler(name: str, config: SchedulerConfig):
    """oracle(name, config), whose sigmas stay float64 after every set_timesteps the pipeline calls."""
    scheduler = oracle(name, config)
    if name.startswith(("euler", "dpmpp")):
        set_timesteps = scheduler.set_timesteps

        def set_float64_timesteps(*args, **kwargs):
            set_timesteps(*args, **kwargs)
            scheduler.sigmas = scheduler.sigmas.double()

        scheduler.set_timesteps = set_float64_timesteps
    return scheduler


def run_pipeline(pipeline_class, name, config, steps, noises, state,
                 **call) -> tuple[np.ndarray, np.ndarray]:
    """(latents, the UNet's timesteps) of one SDXL pipeline call, output_type="latent"."""
    unet = FakeUNet()
    unet.noise_state = state
    state["noises"] = noises
    extra = {"vae": FakeVAE()} if pipeline_class is StableDiffusionXLImg2ImgPipeline else {"vae": None}
    pipe = pipeline_class(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                          unet=unet, scheduler=sdxl_scheduler(name, config), add_watermarker=False, **extra)
    pipe.set_progress_bar_config(disable=True)
    batch = SHAPE[0]
    images = pipe(prompt_embeds=torch.zeros(batch, 5, 7, dtype=torch.float64),
                  pooled_prompt_embeds=torch.zeros(batch, 3, dtype=torch.float64), guidance_scale=1.0,
                  num_inference_steps=steps, output_type="latent", **call).images
    return images.numpy(), np.asarray(unet.timesteps, dtype=np.float32)


def diffusers_base(name, config, steps, noise, noises, state, *, end=None, eta=0.0):
    """StableDiffusionXLPipeline from unit noise (`latents=`), to denoising_end."""
    height, width = SHAPE[2] * 8, SHAPE[3] * 8
    return run_pipeline(StableDiffusionXLPipeline, name, config, steps, noises, state,
                        latents=torch.from_numpy(noise), denoising_end=end, height=height, width=width,
                        eta=eta)


def diffusers_refiner(name, config, steps, latents, noises, state, *, start, end=None, eta=0.0):
    """StableDiffusionXLImg2ImgPipeline continuing `latents` from denoising_start."""
    return run_pipeline(StableDiffusionXLImg2ImgPipeline, name, config, steps, noises, state,
                        image=torch.from_numpy(latents), denoising_start=start, denoising_end=end, eta=eta)


def resolve_fraction(name: str, config: SchedulerConfig, steps: int, value: float | str) -> float:
    """`value`, or the fraction whose cutoff round(T - f T) is just above the last timestep
    ("last": the refiner runs one evaluation) or at the first ("first": the base runs one)."""
    if not isinstance(value, str):
        return value
    timesteps, n = make_plan(name, config, steps).timesteps, config.num_train_timesteps
    cutoff = float(timesteps[-1]) + 1 if value == "last" else float(timesteps[0])
    return (n - cutoff) / n


def chained(plans, noise, noises) -> list[np.ndarray]:
    """Our plans run one after another, each from the latents the previous one ended with."""
    outputs, latents, used = [], None, 0
    for plan in plans:
        start = plan.initial_latents(noise) if latents is None else plan.initial_latents(noise, latents)
        latents = run_ours(plan, start, noises[used:used + plan.num_evaluations])
        used += plan.num_evaluations
        outputs.append(latents)
    return outputs


# --- the hand-off -------------------------------------------------------------------------------

def test_worked_example(feed_noise):
    """Euler, leading, steps_offset 1, 40 steps, 0.8: cutoff 200, base 976 .. 201, refiner 176 .. 1."""
    base = make_plan("euler", SDXL, 40, denoising_end=0.8)
    refiner = make_plan("euler", SDXL, 40, denoising_start=0.8)
    np.testing.assert_array_equal(base.timesteps, np.arange(976, 200, -25))
    np.testing.assert_array_equal(refiner.timesteps, np.arange(176, 0, -25))
    assert (base.num_evaluations, refiner.num_evaluations, refiner.start_step) == (32, 8, 32)
    noise, noises = draws(0, 40)
    handed_over, base_timesteps = diffusers_base("euler", SDXL, 40, noise, [], feed_noise, end=0.8)
    refined, refiner_timesteps = diffusers_refiner("euler", SDXL, 40, handed_over, [], feed_noise, start=0.8)
    np.testing.assert_array_equal(base_timesteps, base.timesteps)
    np.testing.assert_array_equal(refiner_timesteps, refiner.timesteps)
    ours_base, ours = chained([base, refiner], noise, noises)
    assert rel_err(ours_base, handed_over) <= RTOL and rel_err(ours, refined) <= RTOL


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", HAND_OFF_SAMPLERS)
def test_hand_off_matches_sdxl_pipelines(name, case, feed_noise):
    config, steps, value = case
    fraction = resolve_fraction(name, config, steps, value)
    base = make_plan(name, config, steps, denoising_end=fraction)
    refiner = make_plan(name, config, steps, denoising_start=fraction)
    assert base.num_evaluations + refiner.num_evaluations == make_plan(name, config, steps).num_evaluations
    if value == "last":
        assert refiner.num_evaluations == 1
    if value == "first":
        assert base.num_evaluations == 1
    noise, noises = draws(steps, base.num_evaluations + refiner.num_evaluations)
    base_noises, refiner_noises = noises[:base.num_evaluations], noises[base.num_evaluations:]

    handed_over, base_timesteps = diffusers_base(name, config, steps, noise, base_noises, feed_noise,
                                                 end=fraction)
    np.testing.assert_array_equal(base.timesteps, base_timesteps)
    ours_base = run_ours(base, base.initial_latents(noise), base_noises)
    assert rel_err(ours_base, handed_over) <= RTOL

    # each side continues its own base's latents: the refiner's error includes the base's
    refined, refiner_timesteps = diffusers_refiner(name, config, steps, handed_over, refiner_noises,
                                                   feed_noise, start=fraction)
    np.testing.assert_array_equal(refiner.timesteps, refiner_timesteps)
    ours = run_ours(refiner, refiner.initial_latents(noise, ours_base), refiner_noises)
    assert rel_err(ours, refined) <= RTOL


def test_ddim_eta_hand_off(feed_noise):
    """DDIM with eta: both stages draw noise at every evaluation that has variance."""
    steps, fraction, eta = 20, 0.75, 0.5
    base = make_plan("ddim", SDXL, steps, eta=eta, denoising_end=fraction)
    refiner = make_plan("ddim", SDXL, steps, eta=eta, denoising_start=fraction)
    assert base.needs_noise.all() and refiner.needs_noise[:-1].all()
    noise, noises = draws(18, base.num_evaluations + refiner.num_evaluations)
    ours_base, ours = chained([base, refiner], noise, noises)
    handed_over, _ = diffusers_base("ddim", SDXL, steps, noise, noises[:base.num_evaluations], feed_noise,
                                    end=fraction, eta=eta)
    refined, _ = diffusers_refiner("ddim", SDXL, steps, handed_over, noises[base.num_evaluations:],
                                   feed_noise, start=fraction, eta=eta)
    assert rel_err(ours_base, handed_over) <= RTOL and rel_err(ours, refined) <= RTOL


@pytest.mark.parametrize("name", ["ddim", "euler", "euler-a", "ddpm", "lcm"])
def test_chain_equals_one_run(name, feed_noise):
    """One-step samplers: base then refiner is the uninterrupted run, bit for bit, in diffusers
    and here (the stochastic ones with the same noise at the same evaluations)."""
    steps, fraction = 30, 0.6
    plans = [make_plan(name, SDXL, steps, denoising_end=fraction),
             make_plan(name, SDXL, steps, denoising_start=fraction)]
    full = make_plan(name, SDXL, steps)
    noise, noises = draws(11, full.num_evaluations)
    np.testing.assert_array_equal(chained(plans, noise, noises)[-1],
                                  run_ours(full, full.initial_latents(noise), noises))
    split = plans[0].num_evaluations
    handed_over, _ = diffusers_base(name, SDXL, steps, noise, noises[:split], feed_noise, end=fraction)
    refined, _ = diffusers_refiner(name, SDXL, steps, handed_over, noises[split:], feed_noise, start=fraction)
    uninterrupted, _ = diffusers_base(name, SDXL, steps, noise, noises, feed_noise)
    np.testing.assert_array_equal(refined, uninterrupted)


@pytest.mark.parametrize("name", ["dpmpp-2m", "dpmpp-2m-karras"])
def test_dpm_refiner_restarts_first_order(name, feed_noise):
    """DPMSolverMultistepScheduler.step after set_timesteps + set_begin_index: lower_order_nums is 0,
    so the refiner's first update is first order; the chain is not the uninterrupted run."""
    steps, fraction = 20, 0.7
    full = make_plan(name, SDXL, steps)
    refiner = make_plan(name, SDXL, steps, denoising_start=fraction)
    begin = refiner.start_step
    assert np.any(full.sample_coefs[begin, 1:]) and np.any(full.output_coefs[begin, 1:])
    assert not np.any(refiner.sample_coefs[0, 1:]) and not np.any(refiner.output_coefs[0, 1:])
    np.testing.assert_array_equal(refiner.sample_coefs[1:], full.sample_coefs[begin + 1:])
    plans = [make_plan(name, SDXL, steps, denoising_end=fraction), refiner]
    noise, _ = draws(12, 0)
    ours = chained(plans, noise, [])[-1]
    assert rel_err(ours, run_ours(full, full.initial_latents(noise), [])) > 1e-4
    handed_over, _ = diffusers_base(name, SDXL, steps, noise, [], feed_noise, end=fraction)
    refined, _ = diffusers_refiner(name, SDXL, steps, handed_over, [], feed_noise, start=fraction)
    uninterrupted, _ = diffusers_base(name, SDXL, steps, noise, [], feed_noise)
    assert rel_err(refined, uninterrupted) > 1e-4
    assert rel_err(ours, refined) <= RTOL


@pytest.mark.parametrize("name", ["ddim", "euler-a", "dpmpp-2m-karras", "lcm"])
def test_three_stages(name, feed_noise):
    """base to 0.3, img2img from 0.3 to 0.7 (both fractions: get_timesteps, then the end cut), refiner."""
    steps = 30
    plans = [make_plan(name, SDXL, steps, denoising_end=0.3),
             make_plan(name, SDXL, steps, denoising_start=0.3, denoising_end=0.7),
             make_plan(name, SDXL, steps, denoising_start=0.7)]
    assert plans[1].start_step == plans[0].num_evaluations
    assert plans[2].start_step == plans[0].num_evaluations + plans[1].num_evaluations
    noise, noises = draws(13, sum(plan.num_evaluations for plan in plans))
    ours = chained(plans, noise, noises)
    cuts = np.cumsum([0] + [plan.num_evaluations for plan in plans])
    stage_noises = [noises[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    latents, timesteps = diffusers_base(name, SDXL, steps, noise, stage_noises[0], feed_noise, end=0.3)
    expected, called = [latents], [timesteps]
    for (start, end), stage_noise in zip([(0.3, 0.7), (0.7, None)], stage_noises[1:]):
        latents, timesteps = diffusers_refiner(name, SDXL, steps, latents, stage_noise, feed_noise,
                                               start=start, end=end)
        expected.append(latents)
        called.append(timesteps)
    for plan, timesteps, mine, theirs in zip(plans, called, ours, expected):
        np.testing.assert_array_equal(plan.timesteps, timesteps)
        assert rel_err(mine, theirs) <= RTOL


@pytest.mark.parametrize("name", ["ddim", "ddpm", "plms", "euler", "euler-a", "dpmpp-2m"])
def test_img2img_base_with_strength(name, feed_noise, monkeypatch):
    """StableDiffusionXLImg2ImgPipeline with strength and denoising_end (no denoising_start): the
    strength schedule, noised as img2img, cut at the end. (lcm's strength follows
    LatentConsistencyModelImg2ImgPipeline instead, whose timesteps differ; not compared.)"""
    steps, strength, fraction = 20, 0.75, 0.5
    plan = make_plan(name, SDXL, steps, strength=strength, denoising_end=fraction)
    rng = np.random.default_rng(14)
    image_latents, start_noise = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    monkeypatch.setattr(xl_img2img, "randn_tensor", lambda shape, **_: torch.from_numpy(start_noise))
    _, noises = draws(15, plan.num_evaluations)
    expected, timesteps = run_pipeline(StableDiffusionXLImg2ImgPipeline, name, SDXL, steps, noises,
                                       feed_noise, image=torch.from_numpy(image_latents),
                                       strength=strength, denoising_end=fraction)
    np.testing.assert_array_equal(plan.timesteps, timesteps)
    assert plan.num_evaluations < make_plan(name, SDXL, steps, strength=strength).num_evaluations
    ours = run_ours(plan, plan.initial_latents(start_noise, image_latents), noises)
    assert rel_err(ours, expected) <= RTOL


def test_plms_base_matches_sdxl_pipeline(feed_noise):
    """The base alone works with PNDM: its evaluations (the warm-up's repeated timestep counted
    twice, as diffusers counts scheduler.timesteps) up to the cutoff."""
    plan = make_plan("plms", SDXL, 10, denoising_end=0.5)
    assert plan.timesteps.tolist() == [901, 801, 801, 701, 601, 501]
    noise, _ = draws(16, 0)
    expected, timesteps = diffusers_base("plms", SDXL, 10, noise, [], feed_noise, end=0.5)
    np.testing.assert_array_equal(plan.timesteps, timesteps)
    assert rel_err(run_ours(plan, plan.initial_latents(noise), []), expected) <= RTOL


def test_diffusers_plms_refiner_skips_an_interval():
    """Why plms refuses denoising_start: PNDMScheduler after get_timesteps(denoising_start) starts
    its warm-up mid-schedule, corrects 401 -> 301 at the second evaluation and never runs 301 -> 201."""
    scheduler = oracle("plms", SDXL)
    scheduler.set_timesteps(10)
    timesteps, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(
        types.SimpleNamespace(scheduler=scheduler), 10, 0.3, "cpu", denoising_start=0.5)
    assert timesteps.tolist() == [401, 301, 201, 101, 1]
    transfers = []
    get_prev_sample = scheduler._get_prev_sample
    scheduler._get_prev_sample = lambda sample, t, prev, output: (
        transfers.append((int(t), int(prev))) or get_prev_sample(sample, t, prev, output))
    x = torch.zeros(1)
    for t in timesteps:
        x = scheduler.step(torch.zeros(1), t, x).prev_sample
    assert transfers == [(401, 301), (401, 301), (201, 101), (101, 1), (1, -99)]


def test_refiner_starts_from_the_latents_as_they_are():
    refiner = make_plan("ddim", SDXL, 20, denoising_start=0.8)
    assert (refiner.init_latent_coef, refiner.init_noise_coef) == (1.0, 0.0)
    assert (refiner.denoising_start, refiner.denoising_end) == (0.8, None)
    noise, (latents,) = draws(17, 1)
    np.testing.assert_array_equal(refiner.initial_latents(noise, latents), latents)
    with pytest.raises(GenerationError, match="denoising_start=0.8 continues the base's latents"):
        refiner.initial_latents(noise)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_oracle_scheduler_is_first_order(name):
    """get_timesteps adds one evaluation for schedulers of order 2 with an even count; make_plan
    relies on no ldmrt sampler's diffusers scheduler being one."""
    assert oracle(name, SDXL).order == 1


# --- refusals -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0.0, 1.0, 0, 1, -0.2, 1.2, float("nan"), float("inf"), True, False,
                                   "0.8"], ids=repr)
@pytest.mark.parametrize("field", ["denoising_end", "denoising_start"])
def test_bad_fractions(field, value):
    with pytest.raises(GenerationError, match=f"^{field} .*strictly between 0 and 1") as caught:
        make_plan("euler", SDXL, 20, **{field: value})
    assert caught.value.field == field


@pytest.mark.parametrize("start, end", [(0.8, 0.8), (0.8, 0.5)])
def test_start_must_precede_end(start, end):
    with pytest.raises(GenerationError, match="denoising_end .*expected more than denoising_start") as caught:
        make_plan("ddim", SDXL, 20, denoising_start=start, denoising_end=end)
    assert caught.value.field == "denoising_end"


def test_refiner_refuses_strength():
    with pytest.raises(GenerationError, match="denoising_start 0.8 with strength 0.5.*strength=1.0") \
            as caught:
        make_plan("euler", SDXL, 20, strength=0.5, denoising_start=0.8)
    assert caught.value.field == "denoising_start"


def test_plms_refuses_denoising_start():
    with pytest.raises(GenerationError, match="'plms' sampler cannot continue a hand-off") as caught:
        make_plan("plms", SDXL, 20, denoising_start=0.8)
    assert caught.value.field == "denoising_start"


@pytest.mark.parametrize("kwargs, field", [
    (dict(denoising_end=0.001), "denoising_end"),                      # cutoff 999, above t = 901
    (dict(denoising_start=0.9999), "denoising_start"),                 # cutoff 0: no t < 0
    (dict(denoising_start=0.5, denoising_end=0.51), "denoising_end"),  # between 500 and 490 lies none
], ids=["end-before-first", "start-after-last", "empty-window"])
def test_empty_stages_are_refused(kwargs, field):
    with pytest.raises(GenerationError, match=f"^{field} ") as caught:
        make_plan("euler", SDXL, 10, **kwargs)
    assert caught.value.field == field
