"""Samplers as coefficient tables: coefficients on the host, arithmetic generic.

`make_plan` turns (sampler name, `SchedulerConfig`, steps, eta, strength) into an immutable
`SamplerPlan`, computed once in numpy float64 from the training schedule as diffusers stores
it (betas and alphas_cumprod rounded to float32; Euler and DPM sigmas rounded to float32).
One generic `step` then applies model evaluation i = 0 .. N-1:

    x_{i+1} = sum_{k<K} (A[i,k] * x_{i-k} + B[i,k] * m_{i-k})     multistep terms
              + E[i] * clip(P[i] * x_i + Q[i] * m_i, -r, r)         only with clip_sample
              + C[i] * noise_i                                      noise_i ~ N(0, I)

x are latents and m the (guided) model output for input `x_i * input_scale[i]` at
`timesteps[i]`; terms before evaluation 0 are zero; r is `SchedulerConfig.clip_sample_range`.
`plan.history` is K: 1 for DDIM, DDPM, Euler, Euler ancestral and LCM, 2 for DPM++ 2M, 5 for PLMS. The P/Q/E path carries the x0
estimate when `SchedulerConfig.clip_sample` clips it (DDIM, DDPM, LCM); otherwise it is folded
into A and B. The whole loop (ldmrt.sampling.denoise.NumpyDenoiser does exactly this):

    plan = make_plan("dpmpp-2m", scheduler, 20)
    x = plan.initial_latents(noise)               # img2img: plan.initial_latents(noise, image_latents)
    history = History(plan)
    for i in range(plan.num_evaluations):
        m = unet(x * plan.input_scale[i], plan.timesteps[i], ...)   # + classifier-free guidance
        x = step(plan, i, x, m, history, rng.standard_normal(x.shape) if plan.needs_noise[i] else None)

A sampler runs with `scheduler_for(name, scheduler)` (the checkpoint's settings; fields it left
unset take the sampler's own class defaults, as diffusers' from_config) and at most
`max_steps(name, scheduler)` steps (ldmrt.sampling.settings).

Samplers and their diffusers oracle (configured from the same `SchedulerConfig`): ddim
(DDIMScheduler, 0 <= eta <= 1), ddpm (DDPMScheduler, fixed_small), plms (PNDMScheduler with
skip_prk_steps: steps + 1 evaluations, PNDM's warm-up evaluates the second timestep twice), euler
(EulerDiscreteScheduler), euler-a (EulerAncestralDiscreteScheduler), dpmpp-2m
(DPMSolverMultistepScheduler: dpmsolver++, order 2, midpoint, lower_order_final; the last update
returns the x0 estimate), dpmpp-2m-karras (the same with Karras sigmas; timestep_spacing unused),
lcm (LCMScheduler with the config's original_inference_steps and timestep_scaling; the last
update returns the denoised estimate; timestep_spacing unused).

img2img follows diffusers' StableDiffusionImg2ImgPipeline: of `num_steps` steps the last
int(num_steps * strength) run (LCM instead draws its steps from the first
int(original_inference_steps * strength) of its original schedule), and the start latents are
`init_latent_coef * image_latents + init_noise_coef * noise` (diffusers' `add_noise` at the
first kept timestep). txt2img starts from `noise * init_noise_sigma`.

SDXL's base -> refiner hand-off follows StableDiffusionXLPipeline's `denoising_end` and
StableDiffusionXLImg2ImgPipeline's `denoising_start` (make_plan(..., denoising_end=f) and
make_plan(..., denoising_start=f), same sampler, schedule and steps on both sides): the base plan
keeps the evaluations at timesteps >= round(T - f * T) and its final latents are the hand-off;
the refiner plan runs the rest, its sampler state fresh at that index (DPM++ 2M takes a first
order step there), from those latents as they are (`initial_latents(noise, base_latents)`).

Where this differs from diffusers: DDPM draws no noise where the posterior variance is exactly
0 (diffusers clamps it to 1e-20 and adds 1e-10 * noise); scalar coefficients are evaluated in
float64 where diffusers evaluates some in float32 (Euler and DPM also round the sample to float32
in each step), so trajectories agree to about 1e-6 relative, not bit for bit; betas come from a
float64 linspace rounded to float32, one ulp off torch's float32 linspace here and there;
trailing spacing has exactly num_steps timesteps (diffusers' float arange adds a timestep -1 for
62 of the counts 1..1000). Not supported (refused at export, ldmrt/checkpoints/schedule.py):
thresholding, zero-terminal-SNR rescaling, learned variances, Karras sigmas outside
dpmpp-2m-karras, Euler churn.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ldmrt.config import PredictionType
from ldmrt.errors import GenerationError, ShapeError

__all__ = ["SamplerPlan", "History", "step"]


@dataclass(frozen=True, eq=False)
class SamplerPlan:
    """Every number a sampler needs, per model evaluation i (N evaluations, history K)."""
    name: str
    prediction_type: PredictionType
    num_steps: int                 # as requested; PLMS evaluates the model num_steps + 1 times
    strength: float
    eta: float
    start_step: int                # img2img: index of the first kept step of the full schedule
    timesteps: np.ndarray          # (N,) float32: the UNet's `timestep` input
    input_scale: np.ndarray        # (N,) the UNet sees x * input_scale[i]
    alpha_bars: np.ndarray         # (N,) ... which is sqrt(a) x0 + sqrt(1 - a) eps (post-hoc image guidance)
    sample_coefs: np.ndarray       # A (N, K): weight of x_{i-k}
    output_coefs: np.ndarray       # B (N, K): weight of m_{i-k}
    noise_coefs: np.ndarray        # C (N,)
    needs_noise: np.ndarray        # (N,) bool: C[i] != 0, draw noise only there
    clip_range: float | None       # None: no clipped x0 term
    clip_sample_coefs: np.ndarray  # P (N,)
    clip_output_coefs: np.ndarray  # Q (N,)
    clip_coefs: np.ndarray         # E (N,)
    init_noise_sigma: float        # txt2img: x_0 = noise * init_noise_sigma
    init_latent_coef: float        # img2img: x_0 = init_latent_coef * image_latents
    init_noise_coef: float         #                + init_noise_coef * noise
    denoising_end: float | None = None     # SDXL base: stops at this fraction of the schedule
    denoising_start: float | None = None   # SDXL refiner: continues from it (latents as handed over)

    @property
    def num_evaluations(self) -> int:
        return len(self.timesteps)

    @property
    def history(self) -> int:
        return self.sample_coefs.shape[1]

    def initial_latents(self, noise: np.ndarray, image_latents: np.ndarray | None = None) -> np.ndarray:
        """Start latents: scaled noise (txt2img), image latents noised to the first step (img2img),
        or the base's latents unchanged (refiner: init_latent_coef 1, init_noise_coef 0)."""
        noise = np.asarray(noise)
        if image_latents is None:
            if self.denoising_start is not None:
                raise GenerationError(
                    f"sampler {self.name!r}: denoising_start={self.denoising_start} continues the "
                    f"base's latents; pass the latents its denoising_end plan ended with as image_latents")
            if self.strength < 1.0:
                raise GenerationError(
                    f"sampler {self.name!r}: strength={self.strength} needs image_latents to start "
                    f"from; pass them, or use strength=1.0 for text-to-image")
            return noise * self.init_noise_sigma
        image_latents = np.asarray(image_latents)
        if image_latents.shape != noise.shape:
            raise ShapeError(f"initial_latents: image_latents shape {image_latents.shape} differs "
                             f"from noise shape {noise.shape}; pass noise of the latents' shape")
        return image_latents * self.init_latent_coef + noise * self.init_noise_coef


class History:
    """Copies of the earlier latents and model outputs that a multistep plan reads (ring buffers)."""

    def __init__(self, plan: SamplerPlan) -> None:
        self.steps_taken = 0
        self._rings: tuple[list, list] = tuple([None] * _deepest_lag(coefs)
                                               for coefs in (plan.sample_coefs, plan.output_coefs))

    def push(self, x: np.ndarray, model_output: np.ndarray) -> None:
        for ring, array in zip(self._rings, (x, model_output)):
            if ring:
                slot = self.steps_taken % len(ring)
                held = ring[slot]
                if held is None or held.shape != array.shape or held.dtype != array.dtype:
                    ring[slot] = np.array(array, copy=True)
                else:
                    np.copyto(held, array)
        self.steps_taken += 1

    def sample(self, lag: int) -> np.ndarray:
        """x_{i-lag}, for 1 <= lag <= the plan's deepest lag of latents."""
        return self._rings[0][(self.steps_taken - lag) % len(self._rings[0])]

    def output(self, lag: int) -> np.ndarray:
        """m_{i-lag}, for 1 <= lag <= the plan's deepest lag of model outputs."""
        return self._rings[1][(self.steps_taken - lag) % len(self._rings[1])]


def _deepest_lag(coefs: np.ndarray) -> int:
    lags = np.nonzero(np.any(coefs != 0.0, axis=0))[0]
    return int(lags.max()) if lags.size else 0


def step(plan: SamplerPlan, i: int, x: np.ndarray, model_output: np.ndarray,
         history: History | None = None, noise: np.ndarray | None = None) -> np.ndarray:
    """Latents after evaluation i; computes in x's dtype (float32 at least) and records x, m in history."""
    if not 0 <= i < plan.num_evaluations:
        raise GenerationError(f"step: index {i} outside the plan's {plan.num_evaluations} evaluations")
    x = np.asarray(x)
    model_output = np.asarray(model_output)
    if model_output.shape != x.shape:
        raise ShapeError(f"step {i}: model_output shape {model_output.shape} differs from latents "
                         f"shape {x.shape}; the UNet must return one prediction per latent")
    if history is None:
        if plan.history > 1:
            raise GenerationError(f"sampler {plan.name!r} is multistep (history {plan.history}): "
                                  f"pass the same History(plan) to every step")
    elif history.steps_taken != i:
        raise GenerationError(f"step {i} called after {history.steps_taken} steps: run the steps "
                              f"in order with one History per trajectory")
    dtype = np.result_type(x.dtype, np.float32)
    a_row, b_row = plan.sample_coefs[i], plan.output_coefs[i]
    out = np.multiply(x, float(a_row[0]), dtype=dtype)
    scratch = np.empty(x.shape, dtype)
    _axpy(out, model_output, b_row[0], scratch)
    for lag in range(1, plan.history):
        if a_row[lag]:
            _axpy(out, history.sample(lag), a_row[lag], scratch)
        if b_row[lag]:
            _axpy(out, history.output(lag), b_row[lag], scratch)
    if plan.clip_range is not None and plan.clip_coefs[i]:
        x0 = np.multiply(x, float(plan.clip_sample_coefs[i]), dtype=dtype)
        _axpy(x0, model_output, plan.clip_output_coefs[i], scratch)
        np.clip(x0, -plan.clip_range, plan.clip_range, out=x0)
        _axpy(out, x0, plan.clip_coefs[i], scratch)
    if plan.needs_noise[i]:
        if noise is None:
            raise GenerationError(f"sampler {plan.name!r} step {i} adds noise: pass standard normal "
                                  f"noise of shape {x.shape} (plan.needs_noise[{i}] is True)")
        noise = np.asarray(noise)
        if noise.shape != x.shape:
            raise ShapeError(f"step {i}: noise shape {noise.shape} differs from latents shape {x.shape}")
        _axpy(out, noise, plan.noise_coefs[i], scratch)
    if history is not None:
        history.push(x, model_output)
    return out


def _axpy(out: np.ndarray, array: np.ndarray, coef: float, scratch: np.ndarray) -> None:
    """out += coef * array, in out's dtype, without allocating."""
    if coef:
        np.multiply(array, float(coef), out=scratch, dtype=out.dtype)
        out += scratch
