"""One function per sampler: the rows of its coefficient table, one model evaluation at a time.

Every builder has the signature `builder(inputs: SamplerInputs, table: Table) -> None`, works out
its per-evaluation coefficients with the formulas of its paper (the same numbers as the diffusers
scheduler named in ldmrt.sampling.plan) and appends one row per model evaluation i:

    x_{i+1} = sum_k (a[k] x_{i-k} + b[k] m_{i-k}) + E clip(P x_i + Q m_i) + c noise_i

x are latents, m model outputs (epsilon or v, as the schedule's prediction_type says). The x0
estimate P x_i + Q m_i with weight E is kept apart only where clip_sample clips it; the table
otherwise folds it into a[0], b[0]. Estimates are written as (coef on x, coef on m) pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ldmrt.config import BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing
from ldmrt.errors import ConfigError, GenerationError

__all__ = ["BUILDERS", "SamplerInputs", "Table", "x0_and_eps"]

_LCM_SIGMA_DATA = 0.5
_KARRAS_RHO = 7.0

Pair = tuple[float, float]        # (coef on x, coef on m) of an estimate


@dataclass(frozen=True)
class SamplerInputs:
    """What a builder reads: the sampler's settings, the request, the training schedule."""
    scheduler: SchedulerConfig
    num_steps: int
    eta: float
    strength: float
    alphas_cumprod: np.ndarray     # (T,) float32 values, as diffusers holds them

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


@dataclass
class Table:
    """The rows of a SamplerPlan, appended by a builder; ldmrt.sampling.tables assembles them."""
    clip: bool                     # clip_sample: keep the x0 term apart (P, Q, E), clipped
    timesteps: list = field(default_factory=list)
    input_scale: list = field(default_factory=list)
    alpha_bars: list = field(default_factory=list)       # the UNet input's signal power (VP alpha^2)
    sample_coefs: list = field(default_factory=list)     # A rows: [weight of x_i, of x_{i-1}, ...]
    output_coefs: list = field(default_factory=list)     # B rows: [weight of m_i, of m_{i-1}, ...]
    noise_coefs: list = field(default_factory=list)      # C
    x0_terms: list = field(default_factory=list)         # (P, Q, E)
    init_noise_sigma: float = 1.0  # txt2img: x_0 = noise * init_noise_sigma
    init_latent_coef: float = 0.0  # img2img: x_0 = init_latent_coef * image_latents
    init_noise_coef: float = 1.0   #                + init_noise_coef * noise
    start_step: int = 0

    def add(self, timestep, a: list[float], b: list[float], *, alpha_bar: float, c: float = 0.0,
            x0_term: tuple[float, float, float] | None = None, input_scale: float = 1.0) -> None:
        """One evaluation (the row of the module docstring); x0_term is (P, Q, E) or None;
        alpha_bar: the UNet input is sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps."""
        a, b = list(a), list(b)
        if x0_term is None:
            x0_term = (0.0, 0.0, 0.0)
        elif not self.clip:                                    # unclipped: E x0 is linear in x_i, m_i
            p, q, e = x0_term
            a[0], b[0], x0_term = a[0] + p * e, b[0] + q * e, (0.0, 0.0, 0.0)
        self.timesteps.append(timestep)
        self.input_scale.append(input_scale)
        self.alpha_bars.append(alpha_bar)
        self.sample_coefs.append(a)
        self.output_coefs.append(b)
        self.noise_coefs.append(c)
        self.x0_terms.append(x0_term)

    def start_from_alpha_bar(self, alpha_bar: float) -> None:
        """img2img starts from diffusers' add_noise at the first kept timestep."""
        self.init_latent_coef, self.init_noise_coef = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)


def x0_and_eps(prediction: PredictionType, alpha: float, sigma: float,
               input_scale: float = 1.0) -> tuple[Pair, Pair]:
    """x0 and eps as (coef on x, coef on m), where the UNet sees input_scale * x = alpha x0 + sigma eps."""
    if prediction == PredictionType.EPSILON:     # m = eps: x0 = (input - sigma m) / alpha
        return (input_scale / alpha, -sigma / alpha), (0.0, 1.0)
    # m = v = alpha eps - sigma x0 (Salimans & Ho 2022):
    # x0 = alpha input - sigma v, eps = sigma input + alpha v
    return (input_scale * alpha, -sigma), (input_scale * sigma, alpha)


# --- timesteps and sigmas ---------------------------------------------------------------------

def spaced_timesteps(scheduler: SchedulerConfig, num_steps: int) -> np.ndarray:
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


def _training_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Variance-exploding sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), in float32 like diffusers."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


def _vp(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of x = alpha_t x0 + sigma_t eps for a variance-exploding sigma."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def _final_alpha_bar(inputs: SamplerInputs) -> float:
    """alpha_bar after the last step of DDIM and PNDM: 1, or alpha_bar_0 (set_alpha_to_one)."""
    return 1.0 if inputs.scheduler.set_alpha_to_one else inputs.alpha_bar(0)


# --- the samplers -----------------------------------------------------------------------------

def ddim(inputs: SamplerInputs, table: Table) -> None:
    """DDIM (Song et al. 2020), eta = 0 deterministic, eta = 1 DDPM-like noise."""
    timesteps = spaced_timesteps(inputs.scheduler, inputs.num_steps)
    stride = inputs.scheduler.num_train_timesteps // inputs.num_steps
    final = _final_alpha_bar(inputs)
    table.start_step = inputs.first_step()
    timesteps = timesteps[table.start_step:]
    for t in timesteps:
        a = inputs.alpha_bar(t)
        a_prev = inputs.alpha_bar(t - stride) if t - stride >= 0 else final
        std = inputs.eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))     # eq. (16)
        (x0_x, x0_m), (eps_x, eps_m) = x0_and_eps(inputs.prediction, math.sqrt(a), math.sqrt(1 - a))
        # eq. (12): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps + std z
        direction = math.sqrt(1 - a_prev - std * std)
        table.add(t, [eps_x * direction], [eps_m * direction], alpha_bar=a, c=std,
                  x0_term=(x0_x, x0_m, math.sqrt(a_prev)))
    table.start_from_alpha_bar(inputs.alpha_bar(timesteps[0]))


def ddpm(inputs: SamplerInputs, table: Table) -> None:
    """DDPM ancestral sampling (Ho et al. 2020) on a strided schedule, posterior variance."""
    full = spaced_timesteps(inputs.scheduler, inputs.num_steps)
    table.start_step = inputs.first_step()
    for j in range(table.start_step, len(full)):
        t = full[j]
        a = inputs.alpha_bar(t)
        a_prev = inputs.alpha_bar(full[j + 1]) if j + 1 < len(full) else 1.0
        beta = 1 - a / a_prev                                   # of the strided step t -> t_prev
        (x0_x, x0_m), _ = x0_and_eps(inputs.prediction, math.sqrt(a), math.sqrt(1 - a))
        # eq. (7): the posterior q(x_prev | x, x0), mean
        #   sqrt(a_prev) beta / (1 - a) x0 + sqrt(a / a_prev) (1 - a_prev) / (1 - a) x, variance
        #   (1 - a_prev) / (1 - a) beta (none at t = 0)
        std = math.sqrt((1 - a_prev) / (1 - a) * beta) if t > 0 else 0.0
        table.add(t, [math.sqrt(a / a_prev) * (1 - a_prev) / (1 - a)], [0.0], alpha_bar=a, c=std,
                  x0_term=(x0_x, x0_m, math.sqrt(a_prev) * beta / (1 - a)))
    table.start_from_alpha_bar(inputs.alpha_bar(full[table.start_step]))


# PLMS's linear multistep (Adams-Bashforth) weights by how many outputs it has, newest output first.
_PLMS_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def plms(inputs: SamplerInputs, table: Table) -> None:
    """PLMS, the linear multistep part of PNDM (Liu et al. 2022), with diffusers' warm-up."""
    stride = inputs.scheduler.num_train_timesteps // inputs.num_steps
    final = _final_alpha_bar(inputs)
    spaced = spaced_timesteps(inputs.scheduler, inputs.num_steps)
    # The first step's successor is evaluated twice: once as a predictor, once at the corrector.
    timesteps = np.concatenate([spaced[:1], spaced[1:2], spaced[1:]]) if len(spaced) > 1 else spaced
    table.start_step = inputs.first_step()
    timesteps = timesteps[table.start_step:]
    combined: list[int] = []       # the evaluations whose model outputs PLMS combines, oldest first
    for i, t in enumerate(timesteps):
        if i == 1:                 # the corrector: redo the first interval from the first latents
            t_from, t_to, sample_lag = t + stride, t, 1
            output_lags, weights = (0, 1), (0.5, 0.5)           # the mean of both model outputs
        else:
            t_from, t_to, sample_lag = t, t - stride, 0
            combined = combined[-3:] + [i]
            output_lags, weights = [i - j for j in reversed(combined)], _PLMS_WEIGHTS[len(combined)]
        a = inputs.alpha_bar(t_from)
        a_prev = inputs.alpha_bar(t_to) if t_to >= 0 else final
        # eps = eps_x sample + eps_m sum_k weights[k] m_{i - output_lags[k]}
        _, (eps_x, eps_m) = x0_and_eps(inputs.prediction, math.sqrt(a), math.sqrt(1 - a))
        # eq. (9), the transfer from t_from to t_to: x_prev = sqrt(a_prev / a) sample - transfer eps
        transfer = (a_prev - a) / (a * math.sqrt(1 - a_prev) + math.sqrt(a * (1 - a) * a_prev))
        sample_row = [0.0] * (sample_lag + 1)
        sample_row[sample_lag] = math.sqrt(a_prev / a) - eps_x * transfer
        output_row = [0.0] * (max(output_lags) + 1)
        for lag, weight in zip(output_lags, weights):
            output_row[lag] -= weight * eps_m * transfer
        table.add(t, sample_row, output_row, alpha_bar=inputs.alpha_bar(t))
    table.start_from_alpha_bar(inputs.alpha_bar(timesteps[0]))


def euler(inputs: SamplerInputs, table: Table, *, ancestral: bool = False) -> None:
    """Euler's method in sigma (Karras et al. 2022), optionally ancestral (k-diffusion's euler_a)."""
    n = inputs.scheduler.num_train_timesteps
    if inputs.scheduler.timestep_spacing == TimestepSpacing.LINSPACE:
        timesteps = np.linspace(0, n - 1, inputs.num_steps, dtype=np.float32)[::-1]
    else:
        timesteps = spaced_timesteps(inputs.scheduler, inputs.num_steps).astype(np.float32)
    sigmas = np.interp(timesteps, np.arange(n), _training_sigmas(inputs.alphas_cumprod))
    sigmas = np.append(sigmas, 0.0).astype(np.float32).tolist()
    table.start_step = inputs.first_step()
    for j in range(table.start_step, len(timesteps)):
        sigma, sigma_next = sigmas[j], sigmas[j + 1]
        alpha, sigma_vp = _vp(sigma)
        # Latents here are x_vp / alpha (variance exploding); the UNet sees x_vp = alpha x.
        (x0_x, x0_m), _ = x0_and_eps(inputs.prediction, alpha, sigma_vp, input_scale=alpha)
        sigma_up, sigma_down = 0.0, sigma_next
        if ancestral:          # step down to sigma_down, then add noise of sigma_up back
            sigma_up = math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
            sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
        # x_next = x + (sigma_down - sigma) d, d = (x - x0) / sigma
        ratio = (sigma_down - sigma) / sigma
        table.add(timesteps[j], [1 + (1 - x0_x) * ratio], [-x0_m * ratio], alpha_bar=alpha * alpha, c=sigma_up,
                  input_scale=alpha)
    sigma_max = max(sigmas)
    table.init_noise_sigma = (math.sqrt(sigma_max ** 2 + 1)
                              if inputs.scheduler.timestep_spacing == TimestepSpacing.LEADING else sigma_max)
    table.init_latent_coef, table.init_noise_coef = 1.0, sigmas[table.start_step]


def euler_ancestral(inputs: SamplerInputs, table: Table) -> None:
    """Euler ancestral (k-diffusion's sample_euler_ancestral, eta 1)."""
    euler(inputs, table, ancestral=True)


def _dpm_schedule(inputs: SamplerInputs, karras: bool) -> tuple[np.ndarray, list[float]]:
    """(integer timesteps, float32 sigmas + final 0) of DPMSolverMultistepScheduler."""
    sched, n, steps = inputs.scheduler, inputs.scheduler.num_train_timesteps, inputs.num_steps
    if sched.timestep_spacing == TimestepSpacing.LINSPACE:
        timesteps = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1]
    elif sched.timestep_spacing == TimestepSpacing.LEADING:
        timesteps = (np.arange(steps + 1) * (n // (steps + 1)))[::-1][:-1] + sched.steps_offset
    else:
        timesteps = _trailing(n, steps).round() - 1
    train_sigmas = _training_sigmas(inputs.alphas_cumprod)
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


def dpmpp_2m(inputs: SamplerInputs, table: Table, *, karras: bool = False) -> None:
    """DPM-Solver++(2M) (Lu et al. 2022), first order at the first and the last step."""
    timesteps, sigmas = _dpm_schedule(inputs, karras)
    table.start_step = inputs.first_step()
    last = len(timesteps) - 1
    x0_prev: Pair = (0.0, 0.0)     # the previous evaluation's x0 estimate, on x_{i-1} and m_{i-1}
    for i, j in enumerate(range(table.start_step, len(timesteps))):
        alpha_s, sigma_s = _vp(sigmas[j])
        alpha_t, sigma_t = _vp(sigmas[j + 1])
        (x0_x, x0_m), _ = x0_and_eps(inputs.prediction, alpha_s, sigma_s)
        exp_neg_h = sigmas[j + 1] / sigmas[j]            # h = lambda_t - lambda_s, lambda = -log sigma
        # first order (DPM-Solver++ 1, DDIM): x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) x0
        first = alpha_t * (exp_neg_h - 1)
        sample_row, output_row = [sigma_t / sigma_s - x0_x * first], [-x0_m * first]
        if i > 0 and j < last:
            # second order: - 0.5 alpha_t (e^-h - 1) / r (x0 - x0_prev), r = h_prev / h
            r = math.log(sigmas[j - 1] / sigmas[j]) / math.log(sigmas[j] / sigmas[j + 1])
            second = 0.5 * alpha_t * (exp_neg_h - 1) / r
            sample_row = [sample_row[0] - x0_x * second, x0_prev[0] * second]
            output_row = [output_row[0] - x0_m * second, x0_prev[1] * second]
        table.add(timesteps[j], sample_row, output_row, alpha_bar=alpha_s * alpha_s)
        x0_prev = (x0_x, x0_m)
    alpha, sigma = _vp(sigmas[table.start_step])
    table.init_latent_coef, table.init_noise_coef = alpha, sigma


def dpmpp_2m_karras(inputs: SamplerInputs, table: Table) -> None:
    """DPM-Solver++(2M) on Karras et al.'s sigmas (2022, eq. 5, rho = 7)."""
    dpmpp_2m(inputs, table, karras=True)


def lcm(inputs: SamplerInputs, table: Table) -> None:
    """Latent Consistency Model multistep sampling (Luo et al. 2023)."""
    n, steps = inputs.scheduler.num_train_timesteps, inputs.num_steps
    original = inputs.scheduler.original_inference_steps
    available = int(original * inputs.strength)      # >= steps: make_plan checked the limit
    origin = (np.arange(1, available + 1) * (n // original) - 1)[::-1]
    timesteps = origin[np.floor(np.linspace(0, len(origin), steps, endpoint=False)).astype(np.int64)]
    for i, t in enumerate(timesteps):
        a = inputs.alpha_bar(t)
        # the consistency function f(x, t) = c_skip x + c_out x0, with c_skip(0) = 1, c_out(0) = 0
        scaled_t = t * inputs.scheduler.timestep_scaling
        c_skip = _LCM_SIGMA_DATA ** 2 / (scaled_t ** 2 + _LCM_SIGMA_DATA ** 2)
        c_out = scaled_t / math.sqrt(scaled_t ** 2 + _LCM_SIGMA_DATA ** 2)
        (x0_x, x0_m), _ = x0_and_eps(inputs.prediction, math.sqrt(a), math.sqrt(1 - a))
        if i + 1 < len(timesteps):     # re-noise the denoised estimate to the next timestep
            a_next = inputs.alpha_bar(timesteps[i + 1])
            keep, noise = math.sqrt(a_next), math.sqrt(1 - a_next)
        else:                          # the last step returns the denoised estimate
            keep, noise = 1.0, 0.0
        table.add(t, [keep * c_skip], [0.0], alpha_bar=a, c=noise, x0_term=(x0_x, x0_m, keep * c_out))
    table.start_from_alpha_bar(inputs.alpha_bar(timesteps[0]))


BUILDERS: dict[str, Callable[[SamplerInputs, Table], None]] = {
    "ddim": ddim, "ddpm": ddpm, "plms": plms, "euler": euler, "euler-a": euler_ancestral,
    "dpmpp-2m": dpmpp_2m, "dpmpp-2m-karras": dpmpp_2m_karras, "lcm": lcm,
}
