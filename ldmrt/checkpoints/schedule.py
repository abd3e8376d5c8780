"""The training noise schedule of a checkpoint -> SchedulerConfig, from a diffusers scheduler config,
a CompVis YAML, or the `betas` buffer an original checkpoint carries.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from ldmrt.config import BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing
from ldmrt.errors import CheckpointError, ConfigError

# What a diffusers scheduler class uses for a field its saved config lacks (older configs omit
# timestep_spacing and steps_offset). Fields a class does not have are False/0 for it.
_COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
    "clip_sample": False, "set_alpha_to_one": False}
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {"clip_sample": True, "set_alpha_to_one": True, "timestep_spacing": "leading"},
    "DDPMScheduler": {"clip_sample": True, "timestep_spacing": "leading"},
    "PNDMScheduler": {"timestep_spacing": "leading"},
    "LCMScheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                     "set_alpha_to_one": True, "timestep_spacing": "leading"},
    "HeunDiscreteScheduler": {"beta_start": 0.00085, "beta_end": 0.012},
    **{name: {} for name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                             "LMSDiscreteScheduler", "DPMSolverMultistepScheduler",
                             "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
                             "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                             "DEISMultistepScheduler")},
}
# (field, class) pairs where the class has no such option (nothing to report when it is absent)
_NOT_A_FIELD = {("clip_sample", name) for name in _CLASS_DEFAULTS
                if name not in ("DDIMScheduler", "DDPMScheduler", "LCMScheduler", "HeunDiscreteScheduler")} | \
               {("set_alpha_to_one", name) for name in _CLASS_DEFAULTS
                if name not in ("DDIMScheduler", "PNDMScheduler", "LCMScheduler")}
# CompVis `ddpm.py` names -> diffusers names ("linear" in CompVis is linear in sqrt(beta)).
_COMPVIS_SCHEDULES = {"linear": BetaSchedule.SCALED_LINEAR, "sqrt_linear": BetaSchedule.LINEAR,
                      "cosine": BetaSchedule.SQUAREDCOS_CAP_V2}
_COMPVIS_PARAMETERIZATION = {"eps": PredictionType.EPSILON, "v": PredictionType.V_PREDICTION}


def scheduler_from_diffusers(config: Mapping[str, Any], where: str) -> tuple[SchedulerConfig, list[str]]:
    """A diffusers scheduler_config.json -> (SchedulerConfig, notes on defaults filled in)."""
    class_name = str(config.get("_class_name", ""))
    defaults = {**_COMMON_DEFAULTS, **_CLASS_DEFAULTS.get(class_name, {})}
    notes = []
    if class_name not in _CLASS_DEFAULTS:
        notes.append(f"{where}: unknown scheduler class {class_name!r}; fields it lacks take the "
                     f"common diffusers defaults")
    if config.get("trained_betas") is not None:
        raise CheckpointError(f"{where}: trained_betas (an explicit beta list) is not supported; "
                              f"ldmrt's samplers take beta_start/beta_end/beta_schedule")
    for flag in ("rescale_betas_zero_snr", "thresholding"):
        if config.get(flag):
            raise CheckpointError(f"{where}: {flag}=true is not supported by ldmrt's samplers")
    missing = [key for key in defaults if key not in config and (key, class_name) not in _NOT_A_FIELD]
    if missing and class_name in _CLASS_DEFAULTS:
        notes.append(f"{where}: {', '.join(missing)} not set; {class_name}'s defaults used")
    values = {key: config.get(key, default) for key, default in defaults.items()}
    try:
        schedule = SchedulerConfig(
            num_train_timesteps=int(values["num_train_timesteps"]),
            beta_start=float(values["beta_start"]), beta_end=float(values["beta_end"]),
            beta_schedule=BetaSchedule(values["beta_schedule"]),
            prediction_type=PredictionType(values["prediction_type"]),
            timestep_spacing=TimestepSpacing(values["timestep_spacing"]),
            steps_offset=int(values["steps_offset"]), clip_sample=bool(values["clip_sample"]),
            set_alpha_to_one=bool(values["set_alpha_to_one"]))
    except (ValueError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{where}: unsupported scheduler setting ({exc}); ldmrt supports "
                              f"beta_schedule {[b.value for b in BetaSchedule]}, prediction_type "
                              f"{[p.value for p in PredictionType]}, timestep_spacing "
                              f"{[t.value for t in TimestepSpacing]}") from None
    return schedule, notes


def scheduler_from_compvis(params: Mapping[str, Any], where: str,
                           base: SchedulerConfig = SchedulerConfig()) -> SchedulerConfig:
    """CompVis LatentDiffusion params (timesteps, linear_start/end, beta_schedule, parameterization).

    Missing keys take the CompVis DDPM class defaults; the sampler-side fields (spacing, offset)
    come from `base`, which CompVis YAMLs do not describe.
    """
    schedule_name = params.get("beta_schedule", "linear")
    parameterization = params.get("parameterization", "eps")
    if schedule_name not in _COMPVIS_SCHEDULES:
        raise CheckpointError(f"{where}: beta_schedule {schedule_name!r} is not supported; expected "
                              f"one of {sorted(_COMPVIS_SCHEDULES)}")
    if parameterization not in _COMPVIS_PARAMETERIZATION:
        raise CheckpointError(f"{where}: parameterization {parameterization!r} is not supported; "
                              f"expected one of {sorted(_COMPVIS_PARAMETERIZATION)}")
    if schedule_name == "cosine" and not math.isclose(float(params.get("cosine_s", 8e-3)), 8e-3):
        raise CheckpointError(f"{where}: cosine_s={params['cosine_s']} is not supported (only 0.008)")
    try:
        return dataclasses.replace(
            base, num_train_timesteps=int(params.get("timesteps", 1000)),
            beta_start=float(params.get("linear_start", 1e-4)), beta_end=float(params.get("linear_end", 2e-2)),
            beta_schedule=_COMPVIS_SCHEDULES[schedule_name],
            prediction_type=_COMPVIS_PARAMETERIZATION[parameterization])
    except (ValueError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{where}: invalid noise schedule ({exc})") from None


def betas_of(config: SchedulerConfig) -> np.ndarray:
    """The float64 betas diffusers computes for this schedule."""
    steps = config.num_train_timesteps
    if config.beta_schedule == BetaSchedule.LINEAR:
        return np.linspace(config.beta_start, config.beta_end, steps, dtype=np.float64)
    if config.beta_schedule == BetaSchedule.SCALED_LINEAR:
        return np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, steps, dtype=np.float64) ** 2
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                     for i in range(steps)], dtype=np.float64)


def schedule_from_betas(betas: np.ndarray, base: SchedulerConfig) -> SchedulerConfig | None:
    """The schedule whose betas these are (fp32 precision), or None when none of ours fits."""
    betas = np.asarray(betas, dtype=np.float64).reshape(-1)
    if betas.size < 2 or not np.all(np.isfinite(betas)) or not 0 < betas[0] < betas[-1] < 1:
        return None
    start, end = (float(f"{b:.6g}") for b in (betas[0], betas[-1]))
    for schedule in (BetaSchedule.SCALED_LINEAR, BetaSchedule.LINEAR, BetaSchedule.SQUAREDCOS_CAP_V2):
        fields = {"beta_schedule": schedule, "num_train_timesteps": int(betas.size)}
        if schedule != BetaSchedule.SQUAREDCOS_CAP_V2:
            fields.update(beta_start=start, beta_end=end)
        try:
            candidate = dataclasses.replace(base, **fields)
        except ConfigError:
            continue
        if np.max(np.abs(betas_of(candidate) - betas)) <= 1e-6 * np.max(betas):
            return candidate
    return None


def describe_schedule(config: SchedulerConfig) -> str:
    return (f"{config.beta_schedule.value} {config.beta_start:g}..{config.beta_end:g}, "
            f"{config.num_train_timesteps} steps, {config.prediction_type.value}, "
            f"{config.timestep_spacing.value} spacing, steps_offset {config.steps_offset}")
