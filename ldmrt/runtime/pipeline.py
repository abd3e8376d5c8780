"""The lean pipeline: tokenizer -> text encoder -> denoising loop with guidance -> VAE decode.

Torch-free: numpy plus one backend. Load once, call `generate` from many threads: all
per-call state is local, and backends keep one session or execution context per worker.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ldmrt.config import ClassEmbedderConfig, ModelConfig
from ldmrt.engines.base import ComponentRunner, open_runners
from ldmrt.errors import GenerationError, ShapeError
from ldmrt.manifest import Manifest, load_manifest, verify_bundle
from ldmrt.runtime.samplers import SAMPLERS, History, make_plan, step
from ldmrt.runtime.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]   # (evaluations done, total)


IMG2IMG_STRENGTH = 0.8     # how much of the schedule img2img runs unless told


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | Sequence[str] = ""
    negative_prompt: str | Sequence[str] = ""
    steps: int = 20
    guidance: float = 7.5
    sampler: str = "ddim"
    eta: float = 0.0
    seed: int = 0
    height: int | None = None          # pixels; None: the bundle's optimal size
    width: int | None = None
    batch: int = 1
    latents: np.ndarray | None = None  # unit-variance initial noise [B, C, h, w] (diffusers' `latents=`)
    init_image: np.ndarray | None = None   # img2img: float [B or 1, H, W, 3] in [0, 1]
    strength: float | None = None    # img2img only; None -> IMG2IMG_STRENGTH
    class_labels: Sequence[int] | None = None


@dataclass
class GenerationResult:
    images: np.ndarray                  # float32 [B, H, W, 3] in [0, 1]
    latents: np.ndarray                 # final latents [B, C, h, w] (scaled, before decode)
    timings: dict[str, float] = field(default_factory=dict)   # seconds per stage
    warnings: list[str] = field(default_factory=list)


class Pipeline:
    """A loaded bundle on one backend."""

    def __init__(self, bundle: Path, manifest: Manifest, runners: dict[str, ComponentRunner], backend: str):
        self.bundle, self.manifest, self.runners, self.backend = bundle, manifest, runners, backend
        self.config: ModelConfig = manifest.config
        self.tokenizer = None
        if self.config.is_text_conditioned and manifest.tokenizer is not None:
            self.tokenizer = load_tokenizer(bundle / "tokenizer", self.config.conditioner)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, bundle: str | Path, backend: str = "onnxruntime", *, verify: bool = True,
             components: tuple[str, ...] | None = None, **backend_options) -> "Pipeline":
        """Open a bundle: check the manifest (and files' sha256 unless verify=False), load runners."""
        bundle = Path(bundle)
        manifest = load_manifest(bundle)
        wanted = components or tuple(n for n in ("text_encoder", "unet", "vae_decoder", "vae_encoder")
                                     if n in manifest.components)
        if verify:
            verify_bundle(bundle, manifest, components=list(wanted))
        runners = open_runners(backend, bundle, manifest, wanted, **backend_options)
        return cls(bundle, manifest, runners, backend)

    # --- the public call -------------------------------------------------------------------

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None) -> GenerationResult:
        timings: dict[str, float] = {}
        warnings: list[str] = []
        shape = self._latent_shape(request)
        batch = shape[0]
        plan = self._plan(request)
        rng = np.random.default_rng(request.seed)

        start = time.perf_counter()
        context, guided = self._conditioning(request, batch, warnings)
        timings["conditioning"] = time.perf_counter() - start

        noise = self._initial_noise(request, shape, rng)
        image_latents = None
        if request.init_image is not None:
            start = time.perf_counter()
            image_latents = self._encode_image(request.init_image, shape, rng)
            timings["vae_encoder"] = time.perf_counter() - start
        x = plan.initial_latents(noise, image_latents).astype(np.float32)
        step_noise = [rng.standard_normal(shape).astype(np.float32) if need else None
                      for need in plan.needs_noise]

        start = time.perf_counter()
        fused = getattr(self.runners["unet"], "fused_denoise", None)
        if fused is not None:
            x = fused(plan, x, context, request.guidance if guided else 1.0, step_noise, on_step)
            timings["denoise"] = time.perf_counter() - start
            # The on-device loop never syncs per step; the numpy loop checks every step itself.
            _check_finite(x, "latents after the last denoising step")
        else:
            x, timings["unet"] = self._denoise(plan, x, context, request, guided, step_noise, on_step)
            timings["denoise"] = time.perf_counter() - start

        start = time.perf_counter()
        images = self._decode(x)
        timings["vae_decoder"] = time.perf_counter() - start
        for message in warnings:
            log.warning("%s", message)
        return GenerationResult(images=images, latents=x, timings=timings, warnings=warnings)

    # --- stages ----------------------------------------------------------------------------

    def _latent_shape(self, request: GenerationRequest) -> tuple[int, int, int, int]:
        spec = self.manifest.component("unet").spec
        f = self.config.downsampling_factor
        opt = spec.ranges["latent_height"][1] * f
        height, width = request.height or opt, request.width or opt
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % f:
                raise GenerationError(f"--{name} {value}: expected a positive multiple of the latent "
                                      f"factor {f}")
        if not isinstance(request.batch, int) or request.batch < 1:
            raise GenerationError(f"--batch {request.batch}: expected an integer >= 1")
        max_batch = self.manifest.shape_ranges.max_batch
        if request.batch > max_batch:
            raise GenerationError(f"--batch {request.batch}: the bundle was exported for at most "
                                  f"{max_batch} images per call; re-export with --max-batch")
        for symbol, value in (("latent_height", height // f), ("latent_width", width // f)):
            lo, _, hi = spec.ranges[symbol]
            if not lo <= value <= hi:
                side = "height" if symbol.endswith("height") else "width"
                raise GenerationError(f"--{side} {value * f}: outside the exported range "
                                      f"[{lo * f}, {hi * f}] pixels; re-export with --min-size/--max-size")
        return request.batch, self.config.latent_channels, height // f, width // f

    def _plan(self, request: GenerationRequest):
        if request.sampler not in SAMPLERS:
            raise GenerationError(f"--sampler {request.sampler!r}: expected one of {list(SAMPLERS)}")
        if not isinstance(request.steps, int) or request.steps < 1:
            raise GenerationError(f"--steps {request.steps}: expected an integer >= 1")
        if isinstance(request.guidance, bool) or not isinstance(request.guidance, (int, float)):
            raise GenerationError(f"--guidance {request.guidance!r}: expected a number, found "
                                  f"{type(request.guidance).__name__}")
        if not math.isfinite(request.guidance):
            raise GenerationError(f"--guidance {request.guidance}: expected a finite number")
        if not isinstance(request.seed, (int, np.integer)) or request.seed < 0:
            raise GenerationError(f"--seed {request.seed}: expected an integer >= 0")
        if request.init_image is None:
            if request.strength is not None:
                raise GenerationError("--strength applies to img2img only: pass --init-image too")
            strength = 1.0
        else:
            strength = IMG2IMG_STRENGTH if request.strength is None else request.strength
        return make_plan(request.sampler, self.config.scheduler, request.steps, eta=request.eta,
                         strength=strength)

    def _conditioning(self, request: GenerationRequest, batch: int, warnings: list[str]):
        """Context for the UNet: (2B, L, D) [uncond; cond] when guided, else (B, L, D); or labels."""
        config = self.config
        if config.is_text_conditioned:
            guided = request.guidance != 1.0
            prompts = _expand(request.prompt, batch, "prompt")
            texts = (_expand(request.negative_prompt, batch, "negative_prompt") + prompts) if guided else prompts
            if self.tokenizer is None:
                raise GenerationError("this bundle has no tokenizer/ folder; re-export it")
            tokens = self.tokenizer.encode(texts)
            for text, cut in zip(texts, tokens.truncated):
                if cut:
                    warnings.append(f"prompt truncated to {self.tokenizer.max_length} tokens: "
                                    f"{text[:60]!r}...")
            runner = self.runners["text_encoder"]
            embeddings = runner({"input_ids": tokens.input_ids})
            _check_finite(embeddings, "text embeddings")
            return embeddings, guided
        if isinstance(config.conditioner, ClassEmbedderConfig) or config.unet.num_classes:
            n = config.conditioner.n_classes if config.conditioner else config.unet.num_classes
            labels = list(request.class_labels or [0] * batch)
            if len(labels) == 1:
                labels = labels * batch
            if len(labels) != batch or any(not 0 <= int(c) < n for c in labels):
                raise GenerationError(f"class labels {labels}: expected {batch} labels in [0, {n})")
            guided = request.guidance != 1.0 and config.conditioner is not None
            # The LDM ImageNet models learned the last class as "no class" for guidance.
            full = ([n - 1] * batch + labels) if guided else labels
            return np.asarray(full, dtype=np.int32), guided
        return None, False

    def _initial_noise(self, request: GenerationRequest, shape, rng: np.random.Generator) -> np.ndarray:
        # Always drawn, then replaced: the per-step noise of stochastic samplers continues the same
        # stream, so passing a seed's own initial noise as `latents` reproduces that seed's run.
        drawn = rng.standard_normal(shape).astype(np.float32)
        if request.latents is None:
            return drawn
        latents = np.asarray(request.latents)
        if latents.shape != tuple(shape):
            raise ShapeError(f"--latents: expected shape {list(shape)} (batch, channels, height/f, "
                             f"width/f), found {list(latents.shape)}")
        if latents.dtype.kind != "f":
            raise ShapeError(f"--latents: expected a float array, found dtype {latents.dtype}")
        _check_finite(latents, "--latents", given=True)
        return latents.astype(np.float32)

    def _encode_image(self, image: np.ndarray, shape, rng: np.random.Generator) -> np.ndarray:
        if "vae_encoder" not in self.runners:
            raise GenerationError("img2img needs the vae_encoder component; export it too")
        image = np.asarray(image, dtype=np.float32)
        _check_finite(image, "--init-image", given=True)
        batch, _, h, w = shape
        f = self.config.downsampling_factor
        if image.ndim != 4 or image.shape[1:] != (h * f, w * f, 3) or image.shape[0] not in (1, batch):
            raise ShapeError(f"--init-image: expected [1 or {batch}, {h * f}, {w * f}, 3], found {list(image.shape)}")
        pixels = np.broadcast_to(image, (batch, h * f, w * f, 3)).transpose(0, 3, 1, 2) * 2.0 - 1.0
        runner = self.runners["vae_encoder"]
        moments = runner({"images": np.ascontiguousarray(pixels).astype(runner.spec.inputs[0].dtype)})
        moments = moments.astype(np.float32)
        if moments.shape[1] == 2 * self.config.latent_channels:          # KL: sample the posterior
            mean, logvar = np.split(moments, 2, axis=1)
            latent = mean + np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) * rng.standard_normal(mean.shape)
        else:                                                             # VQ: the pre-quantization latent
            latent = moments
        return (latent * self.config.scale_factor).astype(np.float32)

    def _denoise(self, plan, x: np.ndarray, context, request: GenerationRequest, guided: bool,
                 step_noise, on_step: StepCallback | None):
        """The numpy loop: the UNet through the backend, guidance and the update on the host."""
        runner = self.runners["unet"]
        spec = runner.spec
        dtype = spec.input("sample").dtype
        batch = x.shape[0]
        feeds: dict[str, np.ndarray] = {}
        if context is not None:
            key = "class_labels" if context.dtype.kind == "i" else "encoder_hidden_states"
            feeds[key] = context if key == "class_labels" else context.astype(spec.input(key).dtype, copy=False)
        n = batch * (2 if guided else 1)
        timestep = np.empty((n,), np.float32)
        history = History(plan)
        unet_seconds = 0.0
        for i in range(plan.num_evaluations):
            scaled = x * plan.input_scale[i] if plan.input_scale[i] != 1.0 else x
            sample = np.concatenate([scaled, scaled]) if guided else scaled
            feeds["sample"] = sample.astype(dtype, copy=False)
            timestep.fill(plan.timesteps[i])
            feeds["timestep"] = timestep
            start = time.perf_counter()
            output = runner(feeds)
            unet_seconds += time.perf_counter() - start
            output = output.astype(np.float32, copy=False)
            if guided:
                uncond, cond = output[:batch], output[batch:]
                output = uncond + request.guidance * (cond - uncond)
            x = step(plan, i, x, output, history, step_noise[i])
            if not np.isfinite(x).all():
                raise GenerationError(
                    f"non-finite latents after denoising step {i + 1} of {plan.num_evaluations} "
                    f"(sampler {plan.name}, precision {self.manifest.precision.value}); try an fp32 "
                    f"export or --fp32-vae-decoder, or a lower --guidance")
            if on_step is not None:
                on_step(i + 1, plan.num_evaluations)
        return x, unet_seconds

    def _decode(self, x: np.ndarray) -> np.ndarray:
        runner = self.runners["vae_decoder"]
        latent = (x / self.config.scale_factor).astype(runner.spec.inputs[0].dtype)
        images = runner({"latent": latent}).astype(np.float32)
        if not np.isfinite(images).all():
            raise GenerationError(f"the VAE decoder produced non-finite pixels "
                                  f"(precision {self.manifest.precision.value}); export with "
                                  f"--fp32-vae-decoder")
        return np.clip(images / 2.0 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def _expand(prompt: str | Sequence[str], batch: int, name: str) -> list[str]:
    if not isinstance(prompt, (str, list, tuple)):
        raise GenerationError(f"--{name.replace('_', '-')}: expected a string or a list of strings, "
                              f"found {type(prompt).__name__}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if len(prompts) == 1:
        prompts = prompts * batch
    if len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
        raise GenerationError(f"--{name.replace('_', '-')}: expected 1 or {batch} strings, found {len(prompts)}")
    return prompts


def _check_finite(array: np.ndarray, what: str, given: bool = False) -> None:
    """`given`: the caller's input (say how many values are bad); else a model output (say what helps)."""
    finite = np.isfinite(array)
    if finite.all():
        return
    if given:
        raise GenerationError(f"{what}: expected finite values, found {int(finite.size - finite.sum())} NaN/Inf")
    raise GenerationError(f"non-finite values in {what}; try an fp32 export or --fp32-vae-decoder")
