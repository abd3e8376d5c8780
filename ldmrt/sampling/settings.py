"""Which settings and how many steps each sampler runs with, from a checkpoint's SchedulerConfig.

`scheduler_for` applies diffusers' `from_config` rule (a field the checkpoint left unset takes the
running sampler's class default); `max_steps` is the one step limit of each sampler, which
`make_plan` checks and servers advertise.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ldmrt.config import SAMPLERS, BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing
from ldmrt.errors import ConfigError, GenerationError

# The diffusers class each sampler reproduces.
SAMPLER_CLASSES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "plms": "PNDMScheduler",
                   "euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
                   "dpmpp-2m": "DPMSolverMultistepScheduler",
                   "dpmpp-2m-karras": "DPMSolverMultistepScheduler", "lcm": "LCMScheduler"}
# Those classes' __init__ defaults for the SAMPLER_FIELDS they have (tests compare them with the
# installed diffusers); a field a class lacks does not affect its sampler.
_SPACED = {"timestep_spacing": TimestepSpacing.LEADING, "steps_offset": 0}
_SIGMA_SPACED = {"timestep_spacing": TimestepSpacing.LINSPACE, "steps_offset": 0}
CLASS_SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {**_SPACED, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True},
    "DDPMScheduler": {**_SPACED, "clip_sample": True, "clip_sample_range": 1.0},
    "PNDMScheduler": {**_SPACED, "set_alpha_to_one": False},
    "EulerDiscreteScheduler": _SIGMA_SPACED,
    "EulerAncestralDiscreteScheduler": _SIGMA_SPACED,
    "DPMSolverMultistepScheduler": _SIGMA_SPACED,
    "LCMScheduler": {**_SPACED, "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": True,
                     "original_inference_steps": 50, "timestep_scaling": 10.0},
}


def scheduler_for(name: str, scheduler: SchedulerConfig) -> SchedulerConfig:
    """The settings sampler `name` runs with: the checkpoint's, except that the fields the
    checkpoint left unset (`defaulted_fields`) take the defaults of the sampler's own diffusers
    class, as diffusers' `SamplerClass.from_config(checkpoint_scheduler.config)` does."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; expected one of {list(SAMPLERS)}")
    if not isinstance(scheduler, SchedulerConfig):
        raise ConfigError(f"make_plan: expected a SchedulerConfig, found {type(scheduler).__name__}")
    _check_enums(scheduler)
    defaults = CLASS_SAMPLER_DEFAULTS[SAMPLER_CLASSES[name]]
    changes = {key: defaults[key] for key in scheduler.defaulted_fields if key in defaults}
    return dataclasses.replace(scheduler, **changes) if changes else scheduler


def max_steps(name: str, scheduler: SchedulerConfig, *, strength: float = 1.0) -> int:
    """The most steps sampler `name` takes with this schedule; every count from 1 to it works."""
    if not is_real(strength) or not 0.0 < strength <= 1.0:
        raise GenerationError(f"strength {strength!r}: expected a number in (0, 1]", field="strength")
    return step_limit(name, scheduler_for(name, scheduler), float(strength))[0]


def step_limit(name: str, config: SchedulerConfig, strength: float) -> tuple[int, str]:
    """(the step limit of `name` with `config`, the rule behind it, for messages).

    The rule: the UNet sees only training timesteps 0 .. n-1 and no step repeats a noise level
    (a repeated one divides by zero in DDIM, PLMS and DPM-Solver, and is a wasted step in Euler),
    and never more steps than training timesteps. LCM: what diffusers' LCMScheduler allows.
    """
    n = config.num_train_timesteps
    if name == "lcm":
        return (int(config.original_inference_steps * strength),
                f"lcm draws its steps from original_inference_steps * strength = "
                f"{config.original_inference_steps} * {strength:g} timesteps")
    whole = (n, f"at most one step per training timestep: num_train_timesteps {n}")
    spacing = TimestepSpacing(config.timestep_spacing)
    if name == "dpmpp-2m-karras":          # Karras sigmas never repeat; timestep_spacing is unused
        return whole
    # DPM-Solver places steps + 1 points (then drops the last) with linspace and leading spacing
    extra = int(name == "dpmpp-2m" and spacing != TimestepSpacing.TRAILING)
    points = np.arange(1, n + 1) + extra                              # (n,) for 1 .. n steps
    if spacing == TimestepSpacing.LEADING:   # points 0, s, 2s, ... + steps_offset with s = n // points
        stride = n // points
        valid = (stride >= 1) & ((points - 1) * stride + config.steps_offset <= n - 1)
    else:                                    # linspace, trailing: distinct while points <= n
        valid = points <= n
    if valid.all():
        return whole
    limit = int(np.argmin(valid))            # the first count that fails, minus one
    dpm = "DPM-Solver places steps + 1 points; " if extra else ""
    return limit, (f"{dpm}{spacing.value!r} spacing with steps_offset {config.steps_offset} on "
                   f"{n} training timesteps: more steps would put a timestep outside 0..{n - 1} "
                   f"or repeat one")


def _check_enums(scheduler: SchedulerConfig) -> None:
    for name, enum_type in (("beta_schedule", BetaSchedule), ("prediction_type", PredictionType),
                            ("timestep_spacing", TimestepSpacing)):
        value = getattr(scheduler, name)
        if value not in set(enum_type):
            raise ConfigError(f"SchedulerConfig.{name}: expected one of "
                              f"{[e.value for e in enum_type]}, found {value!r}")


def is_integer(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and not math.isnan(value)


