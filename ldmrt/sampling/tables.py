"""The coefficient tables of every sampler: `make_plan` (the format: ldmrt.sampling.plan)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ldmrt.config import SAMPLERS, BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing
from ldmrt.errors import ConfigError, GenerationError, LdmrtError
from ldmrt.sampling.plan import SamplerPlan
from ldmrt.sampling.settings import is_integer, is_real, scheduler_for, step_limit

__all__ = ["make_plan", "training_alphas_cumprod"]

_CLIPPING_SAMPLERS = ("ddim", "ddpm", "lcm")   # those whose diffusers scheduler has clip_sample
_LCM_SIGMA_DATA = 0.5
_KARRAS_RHO = 7.0


# --- the training schedule -------------------------------------------------------------------

def training_alphas_cumprod(scheduler: SchedulerConfig) -> np.ndarray:
    """alpha_bar_t, t = 0 .. T-1, as diffusers holds it: float32 betas, float64 product, float32."""
    n = scheduler.num_train_timesteps
    if scheduler.beta_schedule == BetaSchedule.LINEAR:
        betas = np.linspace(scheduler.beta_start, scheduler.beta_end, n).astype(np.float32)
    elif scheduler.beta_schedule == BetaSchedule.SCALED_LINEAR:   # squared in float32, as diffusers
        betas = np.linspace(scheduler.beta_start ** 0.5, scheduler.beta_end ** 0.5, n).astype(np.float32) ** 2
    elif scheduler.beta_schedule == BetaSchedule.SQUAREDCOS_CAP_V2:
        # Nichol & Dhariwal's cosine schedule; beta_start and beta_end are unused.
        alpha_bar = np.cos((np.arange(n + 1) / n + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    else:
        raise ConfigError(f"SchedulerConfig.beta_schedule: expected one of "
                          f"{[b.value for b in BetaSchedule]}, found {scheduler.beta_schedule!r}")
    alphas = np.float32(1.0) - betas.astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _training_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Variance-exploding sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), in float32 like diffusers."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


def _spaced_timesteps(scheduler: SchedulerConfig, num_steps: int) -> np.ndarray:
    """Descending integer timesteps (DDIM, DDPM, PNDM, Euler) for the config's timestep_spacing."""
    n = scheduler.num_train_timesteps
    if scheduler.timestep_spacing == TimestepSpacing.LINSPACE:
        timesteps = np.linspace(0, n - 1, num_steps).round()[::-1]
    elif scheduler.timestep_spacing == TimestepSpacing.LEADING:
        timesteps = (np.arange(num_steps) * (n // num_steps))[::-1] + scheduler.steps_offset
    else:
        timesteps = np.round(_trailing(n, num_steps)) - 1
    return timesteps.astype(np.int64)


def _trailing(n: int, num_steps: int) -> np.ndarray:
    """diffusers' trailing points n, n - n/N, ...: exactly N of them. (diffusers' float arange
    yields an (N+1)-th point near 0, timestep -1, for 62 of the counts 1..1000 at n = 1000.)"""
    return np.arange(n, 0, -n / num_steps)[:num_steps]


def _vp(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of x = alpha_t x0 + sigma_t eps for a variance-exploding sigma."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


# --- linear forms over latents and model outputs ---------------------------------------------

class _Form(dict):
    """A linear combination of x_j and m_j, keyed by ("x" | "m", evaluation index j)."""

    def __add__(self, other: "_Form") -> "_Form":
        out = _Form(self)
        for key, coef in other.items():
            out[key] = out.get(key, 0.0) + coef
        return out

    def __mul__(self, coef: float) -> "_Form":
        return _Form({key: value * coef for key, value in self.items()})

    def __truediv__(self, coef: float) -> "_Form":
        return _Form({key: value / coef for key, value in self.items()})

    def __sub__(self, other: "_Form") -> "_Form":
        return self + other * -1.0


def _x(j: int) -> _Form:
    return _Form({("x", j): 1.0})


def _m(j: int) -> _Form:
    return _Form({("m", j): 1.0})


def _x0_and_eps(prediction: PredictionType, x: _Form, m: _Form, alpha: float,
                sigma: float) -> tuple[_Form, _Form]:
    """x0 and epsilon estimates for x = alpha x0 + sigma eps from a model output m."""
    if prediction == PredictionType.EPSILON:
        return (x - m * sigma) / alpha, m
    return x * alpha - m * sigma, m * alpha + x * sigma          # v = alpha eps - sigma x0


# --- one builder per sampler ------------------------------------------------------------------

@dataclass(frozen=True)
class _Context:
    scheduler: SchedulerConfig
    num_steps: int
    eta: float
    strength: float
    alphas_cumprod: np.ndarray     # float32 values

    @property
    def prediction(self) -> PredictionType:
        return self.scheduler.prediction_type

    def alpha_bar(self, t: int) -> float:
        if not 0 <= t < len(self.alphas_cumprod):
            raise ConfigError(f"SchedulerConfig: the schedule reaches timestep {t}, outside "
                              f"[0, {len(self.alphas_cumprod)}); check steps_offset and num_steps")
        return float(self.alphas_cumprod[t])

    def first_step(self) -> int:
        """StableDiffusionImg2ImgPipeline.get_timesteps: the last int(steps * strength) steps run."""
        kept = min(int(self.num_steps * self.strength), self.num_steps)
        if kept < 1:
            raise GenerationError(f"strength {self.strength}: with {self.num_steps} steps it keeps no "
                                  f"step (img2img runs the last int(steps * strength)); use strength >= "
                                  f"1/steps or more steps", field="strength")
        return self.num_steps - kept

    def vp_start(self, draft: "_Draft", t: int) -> None:
        a = self.alpha_bar(t)
        draft.init_latent_coef, draft.init_noise_coef = math.sqrt(a), math.sqrt(1.0 - a)


@dataclass
class _Draft:
    clip: bool
    timesteps: list = field(default_factory=list)
    input_scale: list = field(default_factory=list)
    updates: list = field(default_factory=list)
    noise: list = field(default_factory=list)
    clipped: list = field(default_factory=list)      # (E, x0 form) per evaluation
    init_noise_sigma: float = 1.0
    init_latent_coef: float = 0.0
    init_noise_coef: float = 1.0
    start_step: int = 0

    def add(self, timestep: float, update: _Form, *, noise: float = 0.0, input_scale: float = 1.0,
            x0_term: tuple[float, _Form] | None = None) -> None:
        """Record one evaluation; x0_term is (coef, x0 estimate), clipped when clip_sample is on."""
        if x0_term is not None and not self.clip:
            update, x0_term = update + x0_term[1] * x0_term[0], None
        self.timesteps.append(timestep)
        self.input_scale.append(input_scale)
        self.updates.append(update)
        self.noise.append(noise)
        self.clipped.append(x0_term or (0.0, _Form()))


def _ddim(ctx: _Context, draft: _Draft) -> None:
    """DDIM (Song et al. 2020), eta = 0 deterministic, eta = 1 DDPM-like noise."""
    timesteps = _spaced_timesteps(ctx.scheduler, ctx.num_steps)
    stride = ctx.scheduler.num_train_timesteps // ctx.num_steps
    final = 1.0 if ctx.scheduler.set_alpha_to_one else ctx.alpha_bar(0)
    draft.start_step = ctx.first_step()
    timesteps = timesteps[draft.start_step:]
    for i, t in enumerate(timesteps):
        a = ctx.alpha_bar(t)
        a_prev = ctx.alpha_bar(t - stride) if t - stride >= 0 else final
        std = ctx.eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x0, eps = _x0_and_eps(ctx.prediction, _x(i), _m(i), math.sqrt(a), math.sqrt(1 - a))
        draft.add(t, eps * math.sqrt(1 - a_prev - std * std), noise=std,
                  x0_term=(math.sqrt(a_prev), x0))
    ctx.vp_start(draft, timesteps[0])


def _ddpm(ctx: _Context, draft: _Draft) -> None:
    """DDPM ancestral sampling (Ho et al. 2020) on a strided schedule, posterior variance."""
    full = _spaced_timesteps(ctx.scheduler, ctx.num_steps)
    draft.start_step = ctx.first_step()
    for i, j in enumerate(range(draft.start_step, len(full))):
        t = full[j]
        a = ctx.alpha_bar(t)
        a_prev = ctx.alpha_bar(full[j + 1]) if j + 1 < len(full) else 1.0
        beta = 1 - a / a_prev
        x0, _ = _x0_and_eps(ctx.prediction, _x(i), _m(i), math.sqrt(a), math.sqrt(1 - a))
        std = math.sqrt((1 - a_prev) / (1 - a) * beta) if t > 0 else 0.0
        draft.add(t, _x(i) * (math.sqrt(a / a_prev) * (1 - a_prev) / (1 - a)), noise=std,
                  x0_term=(math.sqrt(a_prev) * beta / (1 - a), x0))
    ctx.vp_start(draft, full[draft.start_step])


def _plms(ctx: _Context, draft: _Draft) -> None:
    """PLMS, the linear multistep part of PNDM (Liu et al. 2022), with diffusers' warm-up."""
    stride = ctx.scheduler.num_train_timesteps // ctx.num_steps
    final = 1.0 if ctx.scheduler.set_alpha_to_one else ctx.alpha_bar(0)
    spaced = _spaced_timesteps(ctx.scheduler, ctx.num_steps)
    # The first step's successor is evaluated twice: once as a predictor, once at the corrector.
    timesteps = np.concatenate([spaced[:1], spaced[1:2], spaced[1:]]) if len(spaced) > 1 else spaced
    draft.start_step = ctx.first_step()
    timesteps = timesteps[draft.start_step:]
    outputs: list[_Form] = []
    warm_up_sample = _Form()
    for i, t in enumerate(timesteps):
        t_from, t_to, sample = t, t - stride, _x(i)
        if i == 1:      # the corrector: redo the first interval from the first latents
            t_from, t_to = t + stride, t
        else:
            outputs = outputs[-3:] + [_m(i)]
        if i == 0:
            combined, warm_up_sample = _m(0), _x(0)
        elif i == 1:
            combined, sample = (_m(1) + outputs[-1]) * 0.5, warm_up_sample
        elif len(outputs) == 2:
            combined = (outputs[-1] * 3 - outputs[-2]) / 2
        elif len(outputs) == 3:
            combined = (outputs[-1] * 23 - outputs[-2] * 16 + outputs[-3] * 5) / 12
        else:
            combined = (outputs[-1] * 55 - outputs[-2] * 59 + outputs[-3] * 37 - outputs[-4] * 9) / 24
        a = ctx.alpha_bar(t_from)
        a_prev = ctx.alpha_bar(t_to) if t_to >= 0 else final
        _, eps = _x0_and_eps(ctx.prediction, sample, combined, math.sqrt(a), math.sqrt(1 - a))
        # Formula (9) of the PNDM paper: the transfer from t_from to t_to along eps.
        denominator = a * math.sqrt(1 - a_prev) + math.sqrt(a * (1 - a) * a_prev)
        draft.add(t, sample * math.sqrt(a_prev / a) - eps * ((a_prev - a) / denominator))
    ctx.vp_start(draft, timesteps[0])


def _euler(ctx: _Context, draft: _Draft, ancestral: bool) -> None:
    """Euler's method in sigma (Karras et al. 2022), optionally ancestral (k-diffusion's euler_a)."""
    n = ctx.scheduler.num_train_timesteps
    if ctx.scheduler.timestep_spacing == TimestepSpacing.LINSPACE:
        timesteps = np.linspace(0, n - 1, ctx.num_steps, dtype=np.float32)[::-1]
    else:
        timesteps = _spaced_timesteps(ctx.scheduler, ctx.num_steps).astype(np.float32)
    sigmas = np.interp(timesteps, np.arange(n), _training_sigmas(ctx.alphas_cumprod))
    sigmas = np.append(sigmas, 0.0).astype(np.float32).tolist()
    draft.start_step = ctx.first_step()
    for i, j in enumerate(range(draft.start_step, len(timesteps))):
        sigma, sigma_next = sigmas[j], sigmas[j + 1]
        alpha, sigma_vp = _vp(sigma)
        # Latents here are x_vp / alpha; the UNet sees x_vp.
        x0, _ = _x0_and_eps(ctx.prediction, _x(i) * alpha, _m(i), alpha, sigma_vp)
        sigma_up = 0.0
        sigma_down = sigma_next
        if ancestral:
            sigma_up = math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
            sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
        update = _x(i) + (_x(i) - x0) * ((sigma_down - sigma) / sigma)
        draft.add(timesteps[j], update, noise=sigma_up, input_scale=alpha)
    sigma_max = max(sigmas)
    draft.init_noise_sigma = (math.sqrt(sigma_max ** 2 + 1)
                              if ctx.scheduler.timestep_spacing == TimestepSpacing.LEADING else sigma_max)
    draft.init_latent_coef, draft.init_noise_coef = 1.0, sigmas[draft.start_step]


def _dpm_schedule(ctx: _Context, karras: bool) -> tuple[np.ndarray, list[float]]:
    """(integer timesteps, float32 sigmas + final 0) of DPMSolverMultistepScheduler."""
    sched, n, steps = ctx.scheduler, ctx.scheduler.num_train_timesteps, ctx.num_steps
    if sched.timestep_spacing == TimestepSpacing.LINSPACE:
        timesteps = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1]
    elif sched.timestep_spacing == TimestepSpacing.LEADING:
        timesteps = (np.arange(steps + 1) * (n // (steps + 1)))[::-1][:-1] + sched.steps_offset
    else:
        timesteps = _trailing(n, steps).round() - 1
    train_sigmas = _training_sigmas(ctx.alphas_cumprod)
    if karras:
        # Karras et al. 2022 eq. (5) between the training sigmas' ends, rho = 7.
        lo, hi = float(train_sigmas[0]) ** (1 / _KARRAS_RHO), float(train_sigmas[-1]) ** (1 / _KARRAS_RHO)
        sigmas = (hi + np.linspace(0, 1, steps) * (lo - hi)) ** _KARRAS_RHO
        timesteps = _sigma_to_timestep(sigmas, np.log(train_sigmas))
        if sched.beta_schedule != BetaSchedule.SQUAREDCOS_CAP_V2:
            timesteps = timesteps.round()     # (diffusers truncates instead for the cosine schedule)
    else:
        sigmas = np.interp(timesteps, np.arange(n), train_sigmas)
    return timesteps.astype(np.int64), np.append(sigmas, 0.0).astype(np.float32).tolist()


def _sigma_to_timestep(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating linearly in log sigma."""
    log_sigmas = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_train_sigmas, log_sigmas, side="right") - 1,
                  0, len(log_train_sigmas) - 2)
    log_low, log_high = log_train_sigmas[low], log_train_sigmas[low + 1]
    weight = np.clip((log_low - log_sigmas) / (log_low - log_high), 0, 1)
    return (1 - weight) * low + weight * (low + 1)


def _dpmpp_2m(ctx: _Context, draft: _Draft, karras: bool) -> None:
    """DPM-Solver++(2M) (Lu et al. 2022), first order at the first and the last step."""
    timesteps, sigmas = _dpm_schedule(ctx, karras)
    draft.start_step = ctx.first_step()
    last = len(timesteps) - 1
    x0_prev = _Form()
    for i, j in enumerate(range(draft.start_step, len(timesteps))):
        alpha_s, sigma_s = _vp(sigmas[j])
        alpha_t, sigma_t = _vp(sigmas[j + 1])
        x0, _ = _x0_and_eps(ctx.prediction, _x(i), _m(i), alpha_s, sigma_s)
        exp_neg_h = sigmas[j + 1] / sigmas[j]            # h = lambda_t - lambda_s, lambda = -log sigma
        update = _x(i) * (sigma_t / sigma_s) - x0 * (alpha_t * (exp_neg_h - 1))
        if i > 0 and j < last:
            r = math.log(sigmas[j - 1] / sigmas[j]) / math.log(sigmas[j] / sigmas[j + 1])
            update = update - (x0 - x0_prev) * (0.5 * alpha_t * (exp_neg_h - 1) / r)
        draft.add(timesteps[j], update)
        x0_prev = x0
    alpha, sigma = _vp(sigmas[draft.start_step])
    draft.init_latent_coef, draft.init_noise_coef = alpha, sigma


def _lcm(ctx: _Context, draft: _Draft) -> None:
    """Latent Consistency Model multistep sampling (Luo et al. 2023)."""
    n, steps, original = ctx.scheduler.num_train_timesteps, ctx.num_steps, ctx.scheduler.original_inference_steps
    available = int(original * ctx.strength)         # >= steps: make_plan checked the limit
    origin = (np.arange(1, available + 1) * (n // original) - 1)[::-1]
    timesteps = origin[np.floor(np.linspace(0, len(origin), steps, endpoint=False)).astype(np.int64)]
    for i, t in enumerate(timesteps):
        a = ctx.alpha_bar(t)
        scaled_t = t * ctx.scheduler.timestep_scaling     # boundary conditions c_skip(0)=1, c_out(0)=0
        c_skip = _LCM_SIGMA_DATA ** 2 / (scaled_t ** 2 + _LCM_SIGMA_DATA ** 2)
        c_out = scaled_t / math.sqrt(scaled_t ** 2 + _LCM_SIGMA_DATA ** 2)
        x0, _ = _x0_and_eps(ctx.prediction, _x(i), _m(i), math.sqrt(a), math.sqrt(1 - a))
        if i + 1 < len(timesteps):     # re-noise the denoised estimate to the next timestep
            a_next = ctx.alpha_bar(timesteps[i + 1])
            keep, noise = math.sqrt(a_next), math.sqrt(1 - a_next)
        else:                          # the last step returns the denoised estimate
            keep, noise = 1.0, 0.0
        draft.add(t, _x(i) * (keep * c_skip), noise=noise, x0_term=(keep * c_out, x0))
    ctx.vp_start(draft, timesteps[0])


_BUILDERS: dict[str, Callable[[_Context, _Draft], None]] = {
    "ddim": _ddim,
    "ddpm": _ddpm,
    "plms": _plms,
    "euler": lambda ctx, draft: _euler(ctx, draft, ancestral=False),
    "euler-a": lambda ctx, draft: _euler(ctx, draft, ancestral=True),
    "dpmpp-2m": lambda ctx, draft: _dpmpp_2m(ctx, draft, karras=False),
    "dpmpp-2m-karras": lambda ctx, draft: _dpmpp_2m(ctx, draft, karras=True),
    "lcm": _lcm,
}
assert tuple(_BUILDERS) == SAMPLERS


# --- the plan ---------------------------------------------------------------------------------

def make_plan(name: str, scheduler: SchedulerConfig, num_steps: int, *, eta: float = 0.0,
              strength: float = 1.0, original_inference_steps: int | None = None) -> SamplerPlan:
    """The coefficient tables of sampler `name` for `num_steps` steps (img2img when strength < 1).

    Runs `name` with `scheduler_for(name, scheduler)`; num_steps at most `max_steps` (else a
    GenerationError with field "steps" that states the rule).
    """
    config = scheduler_for(name, scheduler)
    n = config.num_train_timesteps
    if not is_integer(num_steps) or num_steps < 1:
        raise GenerationError(f"steps {num_steps!r}: expected an integer >= 1", field="steps")
    if not is_real(eta) or not 0.0 <= eta <= 1.0:
        raise GenerationError(f"eta {eta!r}: expected a number in [0, 1] (0: DDIM, 1: DDPM-like "
                              f"noise)", field="eta")
    if eta and name != "ddim":
        raise GenerationError(f"eta {eta}: only the ddim sampler has an eta; sampler {name!r} "
                              f"takes eta=0 (use euler-a or ddpm for ancestral sampling)", field="eta")
    if not is_real(strength) or not 0.0 < strength <= 1.0:
        raise GenerationError(f"strength {strength!r}: expected a number in (0, 1]", field="strength")
    if original_inference_steps is not None:
        if name != "lcm":
            raise GenerationError(f"original_inference_steps applies to the lcm sampler only, not "
                                  f"{name!r}", field="original_inference_steps")
        if not is_integer(original_inference_steps) or not 1 <= original_inference_steps <= n:
            raise GenerationError(f"original_inference_steps {original_inference_steps!r}: expected "
                                  f"an integer in [1, {n}] (num_train_timesteps)",
                                  field="original_inference_steps")
        config = dataclasses.replace(config, original_inference_steps=int(original_inference_steps))
    limit, rule = step_limit(name, config, float(strength))
    if limit < 1:              # lcm img2img: original_inference_steps * strength is below one step
        raise GenerationError(f"strength {strength:g}: the {name!r} sampler has no step to run here "
                              f"({rule}); raise strength", field="strength")
    if num_steps > limit:
        raise GenerationError(f"steps {num_steps}: the {name!r} sampler takes at most {limit} steps "
                              f"here ({rule}); use at most {limit} steps", field="steps")
    ctx = _Context(config, int(num_steps), float(eta), float(strength),
                   training_alphas_cumprod(config))
    draft = _Draft(clip=config.clip_sample and name in _CLIPPING_SAMPLERS)
    try:
        _BUILDERS[name](ctx, draft)
    except (ArithmeticError, ValueError) as exc:
        if isinstance(exc, LdmrtError):
            raise
        raise _degenerate(name, ctx) from exc
    return _assemble(name, ctx, draft)


def _degenerate(name: str, ctx: _Context) -> ConfigError:
    spacing = TimestepSpacing(ctx.scheduler.timestep_spacing).value
    return ConfigError(f"sampler {name!r}: the {spacing!r} schedule for "
                       f"{ctx.num_steps} steps repeats timesteps, which leaves non-finite "
                       f"coefficients; use fewer steps or another timestep_spacing")


def _assemble(name: str, ctx: _Context, draft: _Draft) -> SamplerPlan:
    """Absolute-index forms -> lag tables A, B (N, K); check that every number is finite."""
    count = len(draft.updates)
    depth = 1 + max((i - j for i, form in enumerate(draft.updates) for _, j in form), default=0)
    sample_coefs, output_coefs = np.zeros((count, depth)), np.zeros((count, depth))
    clip_sample_coefs, clip_output_coefs = np.zeros(count), np.zeros(count)
    for i, form in enumerate(draft.updates):
        for (kind, j), coef in form.items():
            assert 0 <= i - j, "a step may only read the present and the past"
            (sample_coefs if kind == "x" else output_coefs)[i, i - j] += coef
    for i, (_, x0) in enumerate(draft.clipped):
        for (kind, j), coef in x0.items():
            assert i == j, "the clipped x0 estimate reads the present step only"
            (clip_sample_coefs if kind == "x" else clip_output_coefs)[i] = coef
    noise_coefs = np.asarray(draft.noise, dtype=np.float64)
    tables = dict(
        timesteps=np.asarray(draft.timesteps, dtype=np.float32),
        input_scale=np.asarray(draft.input_scale, dtype=np.float64),
        sample_coefs=sample_coefs, output_coefs=output_coefs, noise_coefs=noise_coefs,
        needs_noise=noise_coefs != 0.0,
        clip_sample_coefs=clip_sample_coefs, clip_output_coefs=clip_output_coefs,
        clip_coefs=np.asarray([coef for coef, _ in draft.clipped], dtype=np.float64))
    scalars = (draft.init_noise_sigma, draft.init_latent_coef, draft.init_noise_coef)
    if not all(np.all(np.isfinite(t)) for t in tables.values()) or not np.all(np.isfinite(scalars)):
        raise _degenerate(name, ctx)
    for table in tables.values():
        table.flags.writeable = False
    return SamplerPlan(
        name=name, prediction_type=PredictionType(ctx.prediction), num_steps=ctx.num_steps,
        strength=ctx.strength, eta=ctx.eta, start_step=draft.start_step,
        clip_range=float(ctx.scheduler.clip_sample_range) if draft.clip else None,
        init_noise_sigma=float(draft.init_noise_sigma), init_latent_coef=float(draft.init_latent_coef),
        init_noise_coef=float(draft.init_noise_coef), **tables)
