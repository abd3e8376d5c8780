"""The coefficient tables of every sampler: `make_plan` checks the request, runs the sampler's
builder (ldmrt.sampling.builders) on the training schedule, cuts it to the part an SDXL base or
refiner runs, and assembles its rows into a `SamplerPlan` (the format: ldmrt.sampling.plan)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ldmrt.config import SAMPLERS, BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing
from ldmrt.errors import ConfigError, GenerationError, LdmrtError
from ldmrt.sampling.builders import BUILDERS, SamplerInputs, Table
from ldmrt.sampling.plan import SamplerPlan
from ldmrt.sampling.settings import is_integer, is_real, scheduler_for, step_limit

__all__ = ["make_plan", "training_alphas_cumprod"]

_CLIPPING_SAMPLERS = ("ddim", "ddpm", "lcm")   # those whose diffusers scheduler has clip_sample
assert tuple(BUILDERS) == SAMPLERS


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


# --- the plan ---------------------------------------------------------------------------------

def make_plan(name: str, scheduler: SchedulerConfig, num_steps: int, *, eta: float = 0.0,
              strength: float = 1.0, original_inference_steps: int | None = None,
              denoising_end: float | None = None, denoising_start: float | None = None) -> SamplerPlan:
    """The coefficient tables of sampler `name` for `num_steps` steps (img2img when strength < 1).

    Runs `name` with `scheduler_for(name, scheduler)`; num_steps at most `max_steps` (else a
    GenerationError with field "steps" that states the rule). denoising_end / denoising_start in
    (0, 1): only the part of the schedule an SDXL base / refiner runs (`_hand_off`); both: the
    part between them.
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
    _check_hand_off(name, float(strength), denoising_end, denoising_start)
    limit, rule = step_limit(name, config, float(strength))
    if limit < 1:              # lcm img2img: original_inference_steps * strength is below one step
        raise GenerationError(f"strength {strength:g}: the {name!r} sampler has no step to run here "
                              f"({rule}); raise strength", field="strength")
    if num_steps > limit:
        raise GenerationError(f"steps {num_steps}: the {name!r} sampler takes at most {limit} steps "
                              f"here ({rule}); use at most {limit} steps", field="steps")
    inputs = SamplerInputs(config, int(num_steps), float(eta), float(strength),
                           training_alphas_cumprod(config))
    table = _build(name, inputs)
    if denoising_start is not None or denoising_end is not None:
        table = _hand_off(name, inputs, table, denoising_start, denoising_end)
    return _assemble(name, inputs, table,
                     denoising_end=None if denoising_end is None else float(denoising_end),
                     denoising_start=None if denoising_start is None else float(denoising_start))


def _build(name: str, inputs: SamplerInputs) -> Table:
    """The builder's rows for evaluations inputs.first_step() .. (lcm: its whole schedule)."""
    table = Table(clip=inputs.scheduler.clip_sample and name in _CLIPPING_SAMPLERS)
    try:
        BUILDERS[name](inputs, table)
    except (ArithmeticError, ValueError) as exc:
        if isinstance(exc, LdmrtError):
            raise
        raise _degenerate(name, inputs) from exc
    return table


# --- the SDXL base -> refiner hand-off ----------------------------------------------------------
#
# diffusers' arithmetic (StableDiffusionXLPipeline.__call__ "8.1 Apply denoising_end",
# StableDiffusionXLImg2ImgPipeline.get_timesteps and "9.1 Apply denoising_end"): with
# cutoff = int(round(T - fraction * T)), the base keeps its first count(t >= cutoff) evaluations;
# the refiner keeps the last count(t < cutoff) of the whole schedule (strength ignored), begins
# its scheduler there (set_begin_index: Euler's sigma index there, DPM-Solver's history empty)
# and adds no noise to the latents it is given. Its "+1 for an even count" applies to schedulers
# of order 2, and every sampler here is order 1 in diffusers.

def _check_hand_off(name: str, strength: float, denoising_end: object, denoising_start: object) -> None:
    for field, value in (("denoising_end", denoising_end), ("denoising_start", denoising_start)):
        if value is not None and (not is_real(value) or not 0.0 < value < 1.0):
            raise GenerationError(f"{field} {value!r}: expected a number strictly between 0 and 1 (the "
                                  f"fraction of the schedule where the base hands over to the refiner)",
                                  field=field)
    if denoising_start is None:
        return
    if denoising_end is not None and denoising_start >= denoising_end:
        raise GenerationError(f"denoising_end {denoising_end}: expected more than denoising_start "
                              f"{denoising_start} (a stage runs from its start to its end)",
                              field="denoising_end")
    if strength < 1.0:
        raise GenerationError(f"denoising_start {denoising_start} with strength {strength:g}: the refiner "
                              f"continues the base's latents and adds no noise, so strength has no "
                              f"part in it (diffusers ignores it); pass strength=1.0",
                              field="denoising_start")
    if name == "plms":
        raise GenerationError(
            "denoising_start: the 'plms' sampler cannot continue a hand-off: PNDM's warm-up corrects "
            "its first step at the second timestep, so diffusers' refiner, starting mid-schedule, "
            "re-does that step instead of the next one and runs every later step one noise level "
            "off; use ddim (or dpmpp-2m for a multistep sampler)", field="denoising_start")


@dataclass(frozen=True)
class _Resumed(SamplerInputs):
    """SamplerInputs whose builder starts at evaluation `begin` (diffusers' set_begin_index), not
    at strength's first step."""
    begin: int

    def first_step(self) -> int:
        return self.begin


def _cutoff(inputs: SamplerInputs, fraction: float) -> int:
    """diffusers' discrete_timestep_cutoff: the training timestep `fraction` of the way down."""
    n = inputs.scheduler.num_train_timesteps
    return int(round(n - float(fraction) * n))


def _hand_off(name: str, inputs: SamplerInputs, table: Table, denoising_start: float | None,
              denoising_end: float | None) -> Table:
    """The evaluations of `table` that an SDXL refiner (from denoising_start) and base (to
    denoising_end) run, with the refiner's sampler state fresh at its first one."""
    if denoising_start is not None:          # strength is 1 (checked): table holds the whole schedule
        cutoff = _cutoff(inputs, denoising_start)
        kept = sum(1 for t in table.timesteps if t < cutoff)
        if kept == 0:
            raise GenerationError(f"denoising_start {denoising_start}: the refiner keeps the timesteps "
                                  f"below {cutoff}, and {inputs.num_steps} steps end at "
                                  f"{table.timesteps[-1]:g}; lower denoising_start", field="denoising_start")
        begin = len(table.timesteps) - kept
        table = _build(name, _Resumed(*(getattr(inputs, f.name) for f in dataclasses.fields(inputs)), begin))
        # lcm builds its whole schedule whatever the first step (its rows read no history)
        table = _keep_rows(table, slice(begin - table.start_step, None))
        table.start_step = begin
        table.init_latent_coef, table.init_noise_coef = 1.0, 0.0
    if denoising_end is not None:
        cutoff = _cutoff(inputs, denoising_end)
        kept = sum(1 for t in table.timesteps if t >= cutoff)
        if kept == 0:
            advice = "raise denoising_end" + ("" if denoising_start is None else " or lower denoising_start")
            raise GenerationError(f"denoising_end {denoising_end}: the base keeps the timesteps at or "
                                  f"above {cutoff}, and this plan starts at {table.timesteps[0]:g}; "
                                  f"{advice}", field="denoising_end")
        table = _keep_rows(table, slice(0, kept))
    return table


def _keep_rows(table: Table, rows: slice) -> Table:
    """`table` with only the evaluations in `rows`; its scalars as they were."""
    values = {f.name: getattr(table, f.name) for f in dataclasses.fields(table)}
    return dataclasses.replace(table, **{name: column[rows] for name, column in values.items()
                                         if isinstance(column, list)})     # the per-evaluation columns


def _degenerate(name: str, inputs: SamplerInputs) -> ConfigError:
    spacing = TimestepSpacing(inputs.scheduler.timestep_spacing).value
    return ConfigError(f"sampler {name!r}: the {spacing!r} schedule for "
                       f"{inputs.num_steps} steps repeats timesteps, which leaves non-finite "
                       f"coefficients; use fewer steps or another timestep_spacing")


def _assemble(name: str, inputs: SamplerInputs, table: Table, *, denoising_end: float | None,
              denoising_start: float | None) -> SamplerPlan:
    """The builder's rows -> the plan's arrays (A, B padded to the deepest lag K); all finite."""
    count = len(table.sample_coefs)
    depth = max(len(row) for row in table.sample_coefs + table.output_coefs)
    sample_coefs, output_coefs = np.zeros((count, depth)), np.zeros((count, depth))
    for i, (a_row, b_row) in enumerate(zip(table.sample_coefs, table.output_coefs)):
        sample_coefs[i, :len(a_row)] = a_row
        output_coefs[i, :len(b_row)] = b_row
    clip_sample_coefs, clip_output_coefs, clip_coefs = (np.array(column, dtype=np.float64)
                                                        for column in zip(*table.x0_terms))   # P, Q, E
    noise_coefs = np.asarray(table.noise_coefs, dtype=np.float64)
    tables = dict(
        timesteps=np.asarray(table.timesteps, dtype=np.float32),
        input_scale=np.asarray(table.input_scale, dtype=np.float64),
        alpha_bars=np.asarray(table.alpha_bars, dtype=np.float64),
        sample_coefs=sample_coefs, output_coefs=output_coefs, noise_coefs=noise_coefs,
        needs_noise=noise_coefs != 0.0, clip_sample_coefs=clip_sample_coefs,
        clip_output_coefs=clip_output_coefs, clip_coefs=clip_coefs)
    scalars = (table.init_noise_sigma, table.init_latent_coef, table.init_noise_coef)
    if not all(np.all(np.isfinite(t)) for t in tables.values()) or not np.all(np.isfinite(scalars)):
        raise _degenerate(name, inputs)
    for array in tables.values():
        array.flags.writeable = False
    return SamplerPlan(
        name=name, prediction_type=PredictionType(inputs.prediction), num_steps=inputs.num_steps,
        strength=inputs.strength, eta=inputs.eta, start_step=table.start_step,
        clip_range=float(inputs.scheduler.clip_sample_range) if table.clip else None,
        init_noise_sigma=float(table.init_noise_sigma), init_latent_coef=float(table.init_latent_coef),
        init_noise_coef=float(table.init_noise_coef), denoising_end=denoising_end,
        denoising_start=denoising_start, **tables)
