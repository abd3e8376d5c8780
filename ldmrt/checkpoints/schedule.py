"""The training noise schedule of a checkpoint -> SchedulerConfig, from a diffusers scheduler config,
a CompVis YAML, or the `betas` buffer an original checkpoint carries.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Mapping

import numpy as np

from ldmrt.config import SAMPLER_FIELDS, BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing
from ldmrt.errors import CheckpointError, ConfigError
from ldmrt.sampling import CLASS_SAMPLER_DEFAULTS, SAMPLER_CLASSES

_LOG = logging.getLogger(__name__)

# The training schedule: the model's, whatever sampler runs it. A field the checkpoint's config
# lacks takes its own class's default (diffusers' __init__ defaults, 0.3x-0.4x).
_TRAINING_DEFAULTS: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                                      "beta_schedule": "linear", "prediction_type": "epsilon",
                                      "trained_betas": None}
_TRAINING_OVERRIDES: dict[str, dict[str, Any]] = {
    "LCMScheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},
    **{name: {"beta_start": 0.00085, "beta_end": 0.012} for name in
       ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")},
}
# Options of the classes ldmrt has a sampler of, beyond the training schedule and SAMPLER_FIELDS,
# with their diffusers defaults (tests compare this table with the installed diffusers).
_THRESHOLDING = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_SIGMA_CHOICES = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_OPTIONS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {**_THRESHOLDING, "rescale_betas_zero_snr": False},
    "DDPMScheduler": {**_THRESHOLDING, "variance_type": "fixed_small", "rescale_betas_zero_snr": False},
    "PNDMScheduler": {"skip_prk_steps": False},
    "EulerDiscreteScheduler": {**_SIGMA_CHOICES, "interpolation_type": "linear", "sigma_min": None,
                               "sigma_max": None, "timestep_type": "discrete",
                               "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"},
    "EulerAncestralDiscreteScheduler": {"rescale_betas_zero_snr": False},
    "DPMSolverMultistepScheduler": {
        **_THRESHOLDING, **_SIGMA_CHOICES, "solver_order": 2, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
        "use_lu_lambdas": False, "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf, "variance_type": None, "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False, "time_shift_type": "exponential"},
    "LCMScheduler": {**_THRESHOLDING, "rescale_betas_zero_snr": False},
}
# What ldmrt's samplers run, for options that change the result: field -> (the values ldmrt
# honours, what the other values would need). A field at another value fails the export.
_RUNS_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "thresholding": ((False,), "dynamic thresholding (a per-sample quantile clip, not an affine step)"),
    "rescale_betas_zero_snr": ((False,), "zero-terminal-SNR rescaling of the betas"),
    "use_exponential_sigmas": ((False,), "an exponential sigma schedule"),
    "use_beta_sigmas": ((False,), "a beta-distribution sigma schedule"),
    "use_flow_sigmas": ((False,), "flow-matching sigmas"),
    "use_dynamic_shifting": ((False,), "resolution-dependent timestep shifting"),
    "use_lu_lambdas": ((False,), "Lu's uniform-lambda step spacing"),
    "variance_type": ((None, "fixed_small"), "another variance (learned ones need twice the UNet channels)"),
    "interpolation_type": (("linear",), "log-linear sigma interpolation"),
    "timestep_type": (("discrete",), "continuous timesteps"),
    "final_sigmas_type": (("zero",), "a last step to sigma_min instead of 0"),
    "algorithm_type": (("dpmsolver++",), "another DPM-Solver variant (dpmpp-2m is dpmsolver++)"),
    "solver_order": ((2,), "another solver order (dpmpp-2m is second order)"),
    "solver_type": (("midpoint",), "the heun solver type (dpmpp-2m uses midpoint)"),
    "lambda_min_clipped": ((-math.inf,), "clipping lambda (cuts the last timesteps)"),
    "skip_prk_steps": ((True,), "PNDM's Runge-Kutta warm-up steps"),
    "use_karras_sigmas": ((False,), "Karras sigmas, which ldmrt runs only as dpmpp-2m-karras "
                                    "(DPMSolverMultistepScheduler)"),
}
# Options read only together with a value _RUNS_ONLY refuses (or, for DPM-Solver's final-step
# options, only when final_sigmas_type is not "zero": its last step is first order anyway).
_INERT = {"dynamic_thresholding_ratio", "sample_max_value", "sigma_min", "sigma_max", "flow_shift",
          "time_shift_type", "lower_order_final", "euler_at_final"}
# Refused for every class, also those ldmrt has no sampler of: they change the noise levels.
_EVERY_CLASS = ("thresholding", "rescale_betas_zero_snr", "use_exponential_sigmas", "use_beta_sigmas",
                "use_flow_sigmas", "use_dynamic_shifting", "variance_type")
# DDPM-schedule classes ldmrt has no sampler of -> the nearest ldmrt sampler (same kind of
# solver), used as the bundle's default with a warning; their own options are not run.
_NEAREST: dict[str, str] = {
    "LMSDiscreteScheduler": "euler", "HeunDiscreteScheduler": "euler", "KDPM2DiscreteScheduler": "euler",
    "KDPM2AncestralDiscreteScheduler": "euler-a", "DPMSolverSinglestepScheduler": "dpmpp-2m",
    "UniPCMultistepScheduler": "dpmpp-2m", "DEISMultistepScheduler": "dpmpp-2m"}
_OWN_SAMPLER = {class_name: sampler for sampler, class_name in SAMPLER_CLASSES.items()
                if sampler != "dpmpp-2m-karras"}
_KARRAS = {"dpmpp-2m": "dpmpp-2m-karras"}
_PLAIN = SchedulerConfig()      # values for sampler fields the default sampler's class lacks
# CompVis `ddpm.py` names -> diffusers names ("linear" in CompVis is linear in sqrt(beta)).
_COMPVIS_SCHEDULES = {"linear": BetaSchedule.SCALED_LINEAR, "sqrt_linear": BetaSchedule.LINEAR,
                      "cosine": BetaSchedule.SQUAREDCOS_CAP_V2}
_COMPVIS_PARAMETERIZATION = {"eps": PredictionType.EPSILON, "v": PredictionType.V_PREDICTION}


def scheduler_from_diffusers(config: Mapping[str, Any], where: str) -> tuple[SchedulerConfig, list[str]]:
    """A diffusers scheduler_config.json -> (SchedulerConfig, notes), every field honoured or refused.

    The class decides the default sampler; a DDPM-schedule class ldmrt has no sampler of gets the
    nearest one with a warning; any other class is refused by name.
    """
    class_name = config.get("_class_name")
    if class_name in _OWN_SAMPLER:
        sampler, options = _OWN_SAMPLER[class_name], _OPTIONS[class_name]
    elif class_name in _NEAREST:
        sampler, options = _NEAREST[class_name], {}
    else:
        raise CheckpointError(
            f"{where}: scheduler class {class_name!r} is not supported; ldmrt runs DDPM-schedule "
            f"schedulers: {sorted(_OWN_SAMPLER)} (own samplers) and {sorted(_NEAREST)} (nearest sampler)")
    # diffusers' from_config treats the keys listed in _use_default_values as unset
    unset = set(config.get("_use_default_values") or ())
    given = {key: value for key, value in config.items() if not key.startswith("_") and key not in unset}
    if given.get("use_karras_sigmas") is True and sampler in _KARRAS:
        sampler = _KARRAS[sampler]
    checked = options if class_name in _OWN_SAMPLER else \
        {key: _RUNS_ONLY[key][0][0] for key in (*_EVERY_CLASS, "use_karras_sigmas")}
    for key, default in checked.items():
        if key in _INERT or (key == "use_karras_sigmas" and sampler in _KARRAS.values()):
            continue
        value, (honoured, needs) = given.get(key, default), _RUNS_ONLY[key]
        if not any(type(value) is type(h) and value == h for h in honoured):
            raise CheckpointError(
                f"{where}: {key}={json.dumps(value)} is not supported: it needs {needs}, and ldmrt's "
                f"{sampler} sampler runs {class_name} with {key}={json.dumps(honoured[0])} only. Run "
                f"this checkpoint with diffusers, or set {key} to {json.dumps(honoured[0])} there if "
                f"the difference is acceptable")
    training = {**_TRAINING_DEFAULTS, **_TRAINING_OVERRIDES.get(class_name, {})}
    values = {key: given.get(key, default) for key, default in training.items()}
    sampler_defaults = CLASS_SAMPLER_DEFAULTS[SAMPLER_CLASSES[sampler]]
    defaulted = tuple(key for key in SAMPLER_FIELDS if key not in given)
    for key in SAMPLER_FIELDS:
        values[key] = given.get(key, sampler_defaults.get(key, getattr(_PLAIN, key)))
    ignored = sorted(set(given) - set(training) - set(SAMPLER_FIELDS) - set(checked))
    notes: list[str] = []
    if class_name in _NEAREST:
        notes.append(f"{where}: ldmrt has no sampler of {class_name}; the bundle's default sampler is "
                     f"{sampler!r}, the nearest (its own options {ignored} are not run); choose another "
                     f"with --sampler")
        _LOG.warning("%s", notes[-1])
    elif ignored:
        notes.append(f"{where}: {ignored} are not options of {class_name}; ignored, as diffusers does")
    missing = [key for key in training if key not in given and key != "trained_betas"]
    missing += [key for key in defaulted if key in sampler_defaults]
    if missing:
        notes.append(f"{where}: {', '.join(missing)} not set; {class_name}'s defaults used")
    schedule = _scheduler_config(values, where, default_sampler=sampler, scheduler_class=class_name,
                                 defaulted_fields=defaulted)
    if values["trained_betas"] is not None:
        schedule = _from_trained_betas(values["trained_betas"], schedule, where)
        notes.append(f"{where}: trained_betas are {describe_schedule(schedule)}")
    return schedule, notes


def _scheduler_config(values: Mapping[str, Any], where: str, **record: Any) -> SchedulerConfig:
    """The typed SchedulerConfig of checked JSON values; a wrong type or range names the file."""
    def typed(key: str, kind: type) -> Any:
        value = values[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise ConfigError(f"{key}: expected {kind.__name__}, found {value!r}")
        return value
    try:
        return SchedulerConfig(
            num_train_timesteps=typed("num_train_timesteps", int),
            beta_start=typed("beta_start", float), beta_end=typed("beta_end", float),
            beta_schedule=BetaSchedule(values["beta_schedule"]),
            prediction_type=PredictionType(values["prediction_type"]),
            timestep_spacing=TimestepSpacing(values["timestep_spacing"]),
            steps_offset=typed("steps_offset", int), clip_sample=typed("clip_sample", bool),
            set_alpha_to_one=typed("set_alpha_to_one", bool),
            clip_sample_range=typed("clip_sample_range", float),
            original_inference_steps=typed("original_inference_steps", int),
            timestep_scaling=typed("timestep_scaling", float), **record)
    except (ValueError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{where}: unsupported scheduler setting ({exc}); ldmrt supports "
                              f"beta_schedule {[b.value for b in BetaSchedule]}, prediction_type "
                              f"{[p.value for p in PredictionType]}, timestep_spacing "
                              f"{[t.value for t in TimestepSpacing]}") from None


def _from_trained_betas(betas: Any, schedule: SchedulerConfig, where: str) -> SchedulerConfig:
    """An explicit beta list is honoured when it is one of the schedules ldmrt computes."""
    try:
        array = np.asarray(betas, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.zeros(0)
    found = schedule_from_betas(array, schedule) if array.ndim == 1 else None
    if found is None or found.num_train_timesteps != schedule.num_train_timesteps:
        raise CheckpointError(
            f"{where}: trained_betas (an explicit list of {array.size} betas) is not supported: it "
            f"matches none of the schedules ldmrt computes ({[b.value for b in BetaSchedule]} over "
            f"num_train_timesteps={schedule.num_train_timesteps}); ldmrt's samplers take "
            f"beta_start/beta_end/beta_schedule")
    return found


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
    origin = f"{config.scheduler_class}, " if config.scheduler_class else ""
    return (f"{origin}{config.beta_schedule.value} {config.beta_start:g}..{config.beta_end:g}, "
            f"{config.num_train_timesteps} steps, {config.prediction_type.value}, "
            f"{config.timestep_spacing.value} spacing, steps_offset {config.steps_offset}, "
            f"default sampler {config.default_sampler}")
