"""The denoising loop, written once: the `Denoiser` contract and its numpy reference.

A `Denoiser` runs every model evaluation of a `DenoiseJob` (the sampler plan, start latents,
the UNet's conditioning inputs, the guidance scale and the per-step noise) and returns the final
latents. `NumpyDenoiser` is the reference and the default: the UNet through any
`ComponentRunner`, classifier-free guidance (`guide`) and the sampler update
(`ldmrt.sampling.plan.step`) on the host. Backends that keep the state on the device implement
the same contract (engines/torch.py: one fused, graph-captured step; engines/tensorrt_denoise.py:
the UNet engine and the exported update graph on device buffers); none writes the loop again.

`step_table` is the plan as device code reads it: one float32 row per evaluation (columns
`STEP_TABLE_COLUMNS`), multistep coefficients padded to `MAX_HISTORY`, so one update graph
serves every sampler.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from ldmrt.errors import GenerationError, ShapeError
from ldmrt.sampling.image_guide import ImageGuide, guided_output
from ldmrt.sampling.plan import History, SamplerPlan, step

__all__ = ["DenoiseJob", "DenoiseResult", "Denoiser", "NumpyDenoiser", "StepCallback", "guide",
           "MAX_HISTORY", "STEP_TABLE_COLUMNS", "step_table"]

StepCallback = Callable[[int, int], None]   # (evaluations done, total); may raise to stop the loop

MAX_HISTORY = 5        # the deepest plan (PLMS): x_i .. x_{i-4} and m_i .. m_{i-4}
STEP_TABLE_COLUMNS = ("timestep", "input_scale",
                      *(f"sample_coef_{k}" for k in range(MAX_HISTORY)),
                      *(f"output_coef_{k}" for k in range(MAX_HISTORY)),
                      "noise_coef", "clip_sample_coef", "clip_output_coef", "clip_coef", "clip_range")


def guide(model_output, scale):
    """Classifier-free guidance (Ho & Salimans 2022) of a stacked [uncond; cond] batch:
    uncond + scale * (cond - uncond). numpy arrays and torch tensors alike; (2B, ...) -> (B, ...)."""
    half = model_output.shape[0] // 2
    uncond, cond = model_output[:half], model_output[half:]
    return uncond + scale * (cond - uncond)


@dataclass(frozen=True)
class DenoiseJob:
    """One trajectory's inputs, checked against each other on construction."""
    plan: SamplerPlan
    latents: np.ndarray                      # (B, C, h, w) float32 start latents (plan.initial_latents);
                                             # float64 runs the numpy loop in float64 (tests)
    conditioning: Mapping[str, np.ndarray]   # the UNet's other inputs (encoder_hidden_states (G*B, L, D)
                                             # or class_labels (G*B,)), rows [uncond; cond] when guided
    guidance: float | None                   # None: one unguided batch (G = 1); else G = 2
    noise: Sequence[np.ndarray | None]       # per evaluation: (B, C, h, w) standard normal, None where
                                             # the plan adds none
    image_guide: ImageGuide | None = None    # post-hoc image guidance (ldmrt.sampling.image_guide)

    def __post_init__(self) -> None:
        x = self.latents
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype not in (np.float32, np.float64):
            found = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
            raise ShapeError(f"latents: expected a float32 (or float64) array [B, C, h, w], found {found}",
                             field="latents")
        if len(self.noise) != self.plan.num_evaluations:
            raise ShapeError(f"noise: expected one entry per evaluation ({self.plan.num_evaluations}), "
                             f"found {len(self.noise)}", field="noise")
        for i, (noise, needed) in enumerate(zip(self.noise, self.plan.needs_noise)):
            if needed and (noise is None or noise.shape != x.shape):
                found = "None" if noise is None else list(noise.shape)
                raise ShapeError(f"noise[{i}]: sampler {self.plan.name!r} adds noise at evaluation {i}: "
                                 f"expected shape {list(x.shape)}, found {found}", field="noise")
        rows = self.unet_batch
        for name, value in self.conditioning.items():
            if value.shape[0] != rows:
                raise ShapeError(f"{name}: expected {rows} rows ({'[uncond; cond] for ' if self.guided else ''}"
                                 f"{x.shape[0]} latents), found {value.shape[0]}", field=name)

    @property
    def guided(self) -> bool:
        return self.guidance is not None

    @property
    def unet_batch(self) -> int:
        """Rows the UNet sees per evaluation: 2B guided, B otherwise."""
        return self.latents.shape[0] * (2 if self.guided else 1)

    def stacked_noise(self) -> np.ndarray:
        """(N, B, C, h, w) float32, zeros where the plan adds no noise: what device code uploads once."""
        out = np.zeros((self.plan.num_evaluations, *self.latents.shape), np.float32)
        for i, noise in enumerate(self.noise):
            if noise is not None and self.plan.needs_noise[i]:
                out[i] = noise
        return out


@dataclass(frozen=True)
class DenoiseResult:
    latents: np.ndarray            # (B, C, h, w) float32 after the last evaluation done
    evaluations: int               # evaluations run: fewer than the plan's when latents went non-finite
    unet_seconds: float | None     # host-measured UNet time, where the loop can separate it


class InputSpec(Protocol):
    """What the loop reads of a UNet's ComponentSpec (ldmrt.iospec): each input's dtype."""

    def input(self, name: str) -> Any: ...


class Denoiser(Protocol):
    """What every backend offers for the loop: run `job` to its end (or its first non-finite
    latents), calling `on_step(done, total)` after each evaluation."""

    def __call__(self, job: DenoiseJob, on_step: StepCallback | None = None) -> DenoiseResult: ...


class NumpyDenoiser:
    """The reference loop: `unet(feeds) -> model_output` on spec-named numpy feeds (any
    ComponentRunner: ONNX Runtime, a TensorRT engine, an int8 calibration probe), guidance and the
    update in numpy, in the latents' dtype. `spec` gives the UNet inputs' dtypes (None: as given).
    Stops at the first non-finite latents."""

    def __init__(self, unet: Callable[[Mapping[str, np.ndarray]], np.ndarray],
                 spec: InputSpec | None = None):
        self.unet, self.spec = unet, spec

    def _dtype(self, name: str, value: np.ndarray):
        return value.dtype if self.spec is None else self.spec.input(name).dtype

    def __call__(self, job: DenoiseJob, on_step: StepCallback | None = None) -> DenoiseResult:
        plan = job.plan
        sample_dtype = self._dtype("sample", job.latents)
        feeds = {name: value.astype(self._dtype(name, value), copy=False)
                 for name, value in job.conditioning.items()}
        timestep = np.empty((job.unet_batch,), np.float32)
        history = History(plan)
        x = job.latents
        unet_seconds = 0.0
        for i in range(plan.num_evaluations):
            scale = plan.input_scale[i]
            scaled = x * scale if scale != 1.0 else x
            sample = np.concatenate([scaled, scaled]) if job.guided else scaled
            feeds["sample"] = sample.astype(sample_dtype, copy=False)
            timestep.fill(plan.timesteps[i])
            feeds["timestep"] = timestep
            start = time.perf_counter()
            model_output = self.unet(feeds)
            unet_seconds += time.perf_counter() - start
            model_output = np.asarray(model_output).astype(x.dtype, copy=False)
            if job.guided:
                model_output = guide(model_output, job.guidance)
            if job.image_guide is not None:
                model_output = guided_output(plan, i, x, model_output, job.image_guide)
            x = step(plan, i, x, model_output, history, job.noise[i] if plan.needs_noise[i] else None)
            if not np.isfinite(x).all():
                return DenoiseResult(x, i + 1, unet_seconds)
            if on_step is not None:
                on_step(i + 1, plan.num_evaluations)
        return DenoiseResult(x, plan.num_evaluations, unet_seconds)


def step_table(plan: SamplerPlan) -> np.ndarray:
    """(N, len(STEP_TABLE_COLUMNS)) float32: row i holds every number evaluation i needs."""
    if plan.history > MAX_HISTORY:
        raise GenerationError(f"sampler {plan.name!r}: history {plan.history} exceeds the update "
                              f"graph's {MAX_HISTORY}")
    n, k = plan.num_evaluations, plan.history
    table = np.zeros((n, len(STEP_TABLE_COLUMNS)), np.float64)
    table[:, 0] = plan.timesteps
    table[:, 1] = plan.input_scale
    table[:, 2:2 + k] = plan.sample_coefs
    table[:, 2 + MAX_HISTORY:2 + MAX_HISTORY + k] = plan.output_coefs
    base = 2 + 2 * MAX_HISTORY
    table[:, base] = plan.noise_coefs
    if plan.clip_range is not None:
        table[:, base + 1] = plan.clip_sample_coefs
        table[:, base + 2] = plan.clip_output_coefs
        table[:, base + 3] = plan.clip_coefs
        table[:, base + 4] = plan.clip_range
    else:      # E = 0 drops the clip term; the range stays finite so 0 * clip(...) is 0
        table[:, base + 4] = float(np.finfo(np.float32).max)
    return table.astype(np.float32)
