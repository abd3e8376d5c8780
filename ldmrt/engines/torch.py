"""The torch backend: ldmrt's PyTorch modules as the reference runtime, eager or CUDA graphs.

The only engine module that imports torch. On a GPU the whole denoising step — UNet,
classifier-free guidance and the sampler's affine update — runs on the device with the
per-step coefficients gathered from device tables by a step counter that lives on the device
too, so one captured CUDA graph serves every step and the loop has no host round trip.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ldmrt.engines.base import BackendRunners
from ldmrt.errors import ShapeError
from ldmrt.iospec import FP32_INPUTS, Component
from ldmrt.models import TORCH_DTYPES
from ldmrt.sampling import DenoiseJob, DenoiseResult, SamplerPlan, guide
from ldmrt.sampling.image_guide import guided_output



@dataclass(frozen=True)
class DenoiseShape:
    """What one captured graph is specialised for."""
    batch: int
    channels: int
    height: int
    width: int
    guided: bool
    num_evaluations: int
    history: int
    clip_range: float | None


class FusedDenoiser:
    """The `Denoiser` of the torch backend: a SamplerPlan's whole loop on one device, optionally
    as one replayed CUDA graph per step.

    `unet(sample, timestep, conditioning)` is any callable module; `conditioning` is the job's
    conditioning inputs as tensors by name (encoder_hidden_states, class_labels, concatenated
    maps; rows [uncond; cond] when guided). `on_step(done, total)` runs between steps; an exception it raises (the
    pipeline's cancellation) stops the loop there. The job's noise is uploaded once, so every
    backend reproduces the same trajectory from the same seed.
    """

    def __init__(self, unet, device: torch.device, dtype: torch.dtype, use_cuda_graph: bool = True):
        self.unet, self.device, self.dtype = unet, torch.device(device), dtype
        self.use_cuda_graph = use_cuda_graph and self.device.type == "cuda"
        self._graphs: dict[DenoiseShape, _CapturedStep] = {}
        self._lock = threading.Lock()

    def __call__(self, job: DenoiseJob, on_step=None) -> DenoiseResult:
        plan = job.plan
        context = {}
        for name, value in job.conditioning.items():
            tensor = torch.as_tensor(value, device=self.device)       # numpy, or a tensor already there
            context[name] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        x0 = torch.as_tensor(job.latents, device=self.device, dtype=torch.float32)
        shape = DenoiseShape(*x0.shape, guided=job.guided, num_evaluations=plan.num_evaluations,
                             history=plan.history, clip_range=plan.clip_range)
        tables = _Tables.from_plan(plan, self.device)
        # image guidance differentiates through the decoder every step: eager, host-indexed
        step = self._step_for(shape) if self.use_cuda_graph and job.image_guide is None else None
        state = _State.create(shape, self.device, job.stacked_noise())
        state.x.copy_(x0)
        guidance = 1.0 if job.guidance is None else job.guidance
        with torch.no_grad():
            if step is None:
                for i in range(plan.num_evaluations):
                    correct = None if job.image_guide is None else functools.partial(
                        guided_output, plan, i, image_guide=job.image_guide)
                    _denoise_step(self.unet, state, tables, context, guidance, self.dtype, job.guided, correct)
                    if on_step is not None:
                        on_step(i + 1, plan.num_evaluations)
                latents = state.x
            else:
                latents = step.run(state, tables, context, guidance, on_step)
            # The on-device loop never syncs per step: non-finite latents show at the end only.
            return DenoiseResult(latents.float().cpu().numpy(), plan.num_evaluations, None)

    def _step_for(self, shape: DenoiseShape) -> "_CapturedStep":
        with self._lock:
            if shape not in self._graphs:
                self._graphs[shape] = _CapturedStep(self, shape)
            return self._graphs[shape]


@dataclass
class _Tables:
    """The plan's coefficient tables on the device (fp32), indexed by the on-device step counter."""
    timesteps: torch.Tensor     # (N,)
    input_scale: torch.Tensor   # (N,)
    a: torch.Tensor             # (N, K)
    b: torch.Tensor             # (N, K)
    c: torch.Tensor             # (N,)
    clip_p: torch.Tensor        # (N,)
    clip_q: torch.Tensor        # (N,)
    clip_e: torch.Tensor        # (N,)
    clip_range: float | None

    @classmethod
    def from_plan(cls, plan: SamplerPlan, device: torch.device) -> "_Tables":
        def t(a: np.ndarray) -> torch.Tensor:
            return torch.tensor(np.asarray(a, dtype=np.float32), device=device)
        return cls(t(plan.timesteps), t(plan.input_scale), t(plan.sample_coefs), t(plan.output_coefs),
                   t(plan.noise_coefs), t(plan.clip_sample_coefs), t(plan.clip_output_coefs),
                   t(plan.clip_coefs), plan.clip_range)


@dataclass
class _State:
    x: torch.Tensor            # (B, C, h, w) fp32 latents
    past_x: torch.Tensor       # (K-1, B, C, h, w): x_{i-1}, x_{i-2}, ...
    past_m: torch.Tensor       # (K-1, B, C, h, w)
    noise: torch.Tensor        # (N, B, C, h, w)
    index: torch.Tensor        # () int64 step counter on the device

    @classmethod
    def create(cls, shape: DenoiseShape, device: torch.device, noise=None) -> "_State":
        dims = (shape.batch, shape.channels, shape.height, shape.width)
        lag = max(shape.history - 1, 0)
        all_noise = torch.zeros((shape.num_evaluations, *dims), device=device)
        if noise is not None:
            all_noise.copy_(torch.as_tensor(noise, dtype=torch.float32))
        return cls(x=torch.zeros(dims, device=device), past_x=torch.zeros((lag, *dims), device=device),
                   past_m=torch.zeros((lag, *dims), device=device), noise=all_noise,
                   index=torch.zeros((), dtype=torch.int64, device=device))


def _denoise_step(unet, state: _State, tables: _Tables, context: dict[str, torch.Tensor], guidance,
                  dtype: torch.dtype, guided: bool, correct=None) -> None:
    """One evaluation: UNet (+ guidance, + `correct(x, output)`: image guidance) then
    x <- sum A x_past + B m_past (+ clip term) + C noise."""
    i = state.index.view(1)          # gathers with index_select: no host sync, capturable
    x = state.x
    scaled = (x * tables.input_scale.index_select(0, i)).to(dtype)
    if guided:
        scaled = torch.cat([scaled, scaled])
    timestep = tables.timesteps.index_select(0, i).expand(scaled.shape[0])
    output = unet(scaled, timestep, context).float()
    if guided:
        output = guide(output, guidance)
    if correct is not None:
        output = correct(x, output)
    a, b = tables.a.index_select(0, i)[0], tables.b.index_select(0, i)[0]   # (K,)
    noise = state.noise.index_select(0, i)[0]
    x_next = a[0] * x + b[0] * output + tables.c.index_select(0, i) * noise
    if state.past_x.shape[0]:
        k = state.past_x.shape[0]
        x_next = x_next + (a[1:, None, None, None, None] * state.past_x).sum(0) \
            + (b[1:, None, None, None, None] * state.past_m).sum(0)
        if k > 1:
            state.past_x[1:] = state.past_x[:-1].clone()
            state.past_m[1:] = state.past_m[:-1].clone()
        state.past_x[0] = x
        state.past_m[0] = output
    if tables.clip_range is not None:
        x0 = (tables.clip_p.index_select(0, i) * x + tables.clip_q.index_select(0, i) * output)
        x_next = x_next + tables.clip_e.index_select(0, i) * x0.clamp(-tables.clip_range, tables.clip_range)
    state.x.copy_(x_next)
    # Wraps after the last evaluation, so a replayed graph can never index past the tables.
    state.index.add_(1).remainder_(tables.timesteps.shape[0])


class _CapturedStep:
    """One CUDA graph of `_denoise_step` for a shape; static buffers refreshed before each run."""

    def __init__(self, owner: FusedDenoiser, shape: DenoiseShape):
        self.owner, self.shape = owner, shape
        self.graph: torch.cuda.CUDAGraph | None = None
        self.state: _State | None = None
        self.tables: _Tables | None = None
        self.context: dict[str, torch.Tensor] = {}
        self.guidance = torch.ones((), device=owner.device)

    def run(self, state: _State, tables: _Tables, context: dict[str, torch.Tensor], guidance: float,
            on_step=None) -> torch.Tensor:
        if self.graph is None:
            self._capture(state, tables, context)
        _copy_into(self.state, state)
        _copy_tables(self.tables, tables)
        for name, value in context.items():
            self.context[name].copy_(value)
        self.guidance.fill_(guidance)
        for i in range(self.shape.num_evaluations):
            self.graph.replay()     # asynchronous: progress reports enqueued steps
            if on_step is not None:
                on_step(i + 1, self.shape.num_evaluations)
        return self.state.x.clone()

    def _capture(self, state: _State, tables: _Tables, context: dict[str, torch.Tensor]) -> None:
        owner = self.owner
        self.state = _State(**{k: v.clone() for k, v in vars(state).items()})
        self.tables = _Tables(**{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                 for k, v in vars(tables).items()})
        self.context = {name: value.clone() for name, value in context.items()}
        warm = torch.cuda.Stream(device=owner.device)
        warm.wait_stream(torch.cuda.current_stream(owner.device))
        with torch.cuda.stream(warm), torch.no_grad():
            for _ in range(2):    # warm-up: cuDNN/cuBLAS autotuning and lazy init happen here
                _denoise_step(owner.unet, self.state, self.tables, self.context, self.guidance,
                              owner.dtype, self.shape.guided)
        torch.cuda.current_stream(owner.device).wait_stream(warm)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            _denoise_step(owner.unet, self.state, self.tables, self.context, self.guidance,
                          owner.dtype, self.shape.guided)


def _copy_into(dst: _State, src: _State) -> None:
    for name, value in vars(src).items():
        getattr(dst, name).copy_(value)


def _copy_tables(dst: _Tables, src: _Tables) -> None:
    for name, value in vars(src).items():
        if isinstance(value, torch.Tensor):
            getattr(dst, name).copy_(value)


# --- runners over a bundle (the reference backend) ---------------------------------------------

class TorchRunner:
    """A component's PyTorch module behind the numpy runner interface."""

    def __init__(self, graph: torch.nn.Module, spec, device: torch.device, dtype: torch.dtype):
        self.graph, self.spec, self.device, self.dtype = graph, spec, device, dtype

    def __call__(self, inputs) -> np.ndarray:
        return self.run_all(inputs)[self.spec.outputs[0].name]

    def run_all(self, inputs) -> dict[str, np.ndarray]:
        self.spec.bind(inputs)
        tensors = []
        for tensor in self.spec.inputs:
            value = torch.from_numpy(np.ascontiguousarray(inputs[tensor.name])).to(self.device)
            if value.is_floating_point() and tensor.name not in FP32_INPUTS:
                value = value.to(self.dtype)
            tensors.append(value)
        with torch.no_grad():
            outputs = self.graph(*tensors)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return {t.name: o.float().cpu().numpy() for t, o in zip(self.spec.outputs, outputs)}


def _unet_call(graph, spec):
    """The UNet module as FusedDenoiser calls it: (sample, timestep, conditioning by name),
    the conditioning in the spec's input order."""
    names = [t.name for t in spec.inputs if t.name not in ("sample", "timestep")]

    def call(sample: torch.Tensor, timestep: torch.Tensor, conditioning) -> torch.Tensor:
        try:                # every step: a lookup, no check on the hot path unless one is missing
            inputs = [conditioning[name] for name in names]
        except KeyError:
            raise ShapeError(f"conditioning: the {spec.name} takes {names or 'no conditioning inputs'}, "
                             f"found {sorted(conditioning)}", field="conditioning") from None
        return graph(sample, timestep, *inputs)
    return call


def downsample(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The guide's T: (B, C, H, W) -> (B, C, *size) by antialiased bicubic resampling (Pillow's
    BICUBIC resize, a = -0.5); the identity at the same size."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    return torch.nn.functional.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)


class DecoderGradient:
    """The image guide's gradient on this backend (ldmrt.sampling.image_guide): autograd through
    the bundle's decoder module, d/dx0 of 1/2 ||T(D(x0 / latent_scale) / 2 + 1/2) - y||^2 summed
    over the target's pixels and channels, T the antialiased bicubic downsampling to y's size
    (the identity at the image's own size). numpy in, numpy out; a tensor in, a tensor out."""

    def __init__(self, decoder: torch.nn.Module, latent_scale: float, device: torch.device, dtype: torch.dtype,
                 target: np.ndarray):
        self.decoder, self.latent_scale, self.device, self.dtype = decoder, float(latent_scale), device, dtype
        self.target = torch.as_tensor(np.ascontiguousarray(target), dtype=torch.float32, device=device)

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        pixels = self.decoder((x0 / self.latent_scale).to(self.dtype)).float() / 2 + 0.5
        return 0.5 * (downsample(pixels, tuple(self.target.shape[-2:])) - self.target).pow(2).sum()

    def __call__(self, x0):
        given_numpy = isinstance(x0, np.ndarray)
        with torch.enable_grad():
            z = torch.as_tensor(x0, device=self.device, dtype=torch.float32).detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.loss(z), z)
        return grad.cpu().numpy().astype(x0.dtype) if given_numpy else grad


def load_reference_model(manifest, device: torch.device, dtype: torch.dtype, bundle=None):
    """The PyTorch model a bundle was exported from, rebuilt from its recorded source (a seeded
    preset or a checkpoint with its loading options) and refused unless its weights digest is the
    manifest's (ldmrt.checkpoints.source.rebuild_model)."""
    from ldmrt.checkpoints.source import rebuild_model

    return rebuild_model(manifest, bundle).to(device=device, dtype=dtype).eval()


def open_torch(bundle, manifest, components, *, device: str | None = None, dtype: str | None = None,
               cuda_graphs: bool = True) -> BackendRunners:
    from ldmrt.models.components import ComponentGraph

    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unet_dtype = manifest.component(Component.UNET).dtype
    graph_dtype = TORCH_DTYPES[dtype or (unet_dtype if device_.type == "cuda" else "float32")]
    model = load_reference_model(manifest, device_, graph_dtype, bundle)
    runners, denoiser, image_gradient = {}, None, None
    for name in components:
        spec = manifest.component(name).spec
        graph = ComponentGraph(model, spec).eval()
        runners[name] = TorchRunner(graph, spec, device_, graph_dtype)
        if name == Component.UNET:
            denoiser = FusedDenoiser(_unet_call(graph, spec), device_, graph_dtype, cuda_graphs)
        if name == Component.VAE_DECODER:
            image_gradient = functools.partial(DecoderGradient, graph, manifest.latent_scale, device_, graph_dtype)
    from ldmrt.lora.switch import WeightSwitch

    return BackendRunners(runners, denoiser, image_gradient, WeightSwitch(model))
