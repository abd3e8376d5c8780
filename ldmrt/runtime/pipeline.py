"""The lean pipeline: tokenizer -> text encoder -> denoising loop with guidance -> VAE decode.

Torch-free: numpy plus one backend. Load once, call `generate` from many threads: all
per-call state is local, and backends keep one session or execution context per worker.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ldmrt.config import ClassEmbedderConfig, ModelConfig
from ldmrt.engines.backend import Backend
from ldmrt.engines.base import BackendRunners, ComponentRunner
from ldmrt.engines.dispatch import open_runners
from ldmrt.errors import ConfigError, GenerationCancelled, GenerationError, ShapeError
from ldmrt.iospec import Component, Precision
from ldmrt.layout import encode_layout
from ldmrt.lora.slot import AdapterSlot
from ldmrt.manifest import Manifest, load_manifest, verify_bundle
from ldmrt.runtime.checks import check_array, check_handoff, integer, is_integer, real, show
from ldmrt.runtime import spatial
from ldmrt.runtime.postprocess import postprocessor
from ldmrt.runtime.tiling import Tiling, run_tiled
from ldmrt.sampling import SAMPLERS, DenoiseJob, StepCallback, make_plan
from ldmrt.sampling.image_guide import ImageGuide
from ldmrt.runtime.text import (AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE, SizeConditioning, TextEncoders,
                                check_sizes, expand)

log = logging.getLogger(__name__)

CancelCheck = Callable[[], bool]             # True: stop at the next check


# What generate runs, of what a bundle holds (denoise_step is a device backend's, not the pipeline's).
PIPELINE_COMPONENTS = (Component.TEXT_ENCODER, Component.TEXT_ENCODER_2, Component.UNET, Component.VAE_DECODER,
                       Component.VAE_ENCODER)
IMG2IMG_STRENGTH = 0.8     # how much of the schedule img2img runs unless told
# image guidance (ldmrt.sampling.image_guide): what steers the built-in digits to 8x8 targets
# (docs/layout-and-guidance.md)
DEFAULT_GUIDE_SCALE = 10.0
DEFAULT_GUIDE_UNCERTAINTY = 0.003
GUIDED_STEP_COST = 5       # a guided step (UNet + decoder forward and backward) in plain steps: 2.7-4.4 measured


@dataclass(frozen=True)
class GenerationRequest:
    """One call's inputs. Numbers may be Python or numpy scalars (never bools); `Pipeline.generate`
    checks every field before any model runs and names the field at fault (`LdmrtError.field`)."""
    prompt: str | Sequence[str] = ""
    # None: "" (as diffusers), or zero embeddings where the model says force_zeros_for_empty_prompt (SDXL)
    negative_prompt: str | Sequence[str] | None = None
    steps: int = 20
    guidance: float = 7.5     # > 1: classifier-free guidance; <= 1: the prompt's prediction only (diffusers)
    sampler: str | None = None          # None: the bundle's default (its checkpoint's scheduler class)
    eta: float = 0.0
    seed: int = 0
    height: int | None = None          # pixels; None: the bundle's optimal size
    width: int | None = None
    batch: int = 1
    latents: np.ndarray | None = None  # unit-variance initial noise [B, C, h, w] (diffusers' `latents=`)
    init_image: np.ndarray | None = None   # img2img: float [B or 1, H, W, 3] in [0, 1]
    strength: float | None = None    # img2img only; None -> IMG2IMG_STRENGTH
    class_labels: Sequence[int] | None = None   # class-conditional models only
    # concat-conditioned models (ldmrt.runtime.spatial); each is refused by the models without it
    image: np.ndarray | None = None    # inpainting: the image [B or 1, H, W, 3] in [0, 1];
                                       # super-resolution: the low-res image [B or 1, H/f, W/f, 3]
    mask: np.ndarray | None = None     # inpainting: [B or 1, H, W] in [0, 1]; >= 0.5 is repainted (white)
    noise_level: int | None = None     # SD x4 upscaler: the low-res noise augmentation (None: 20)
    segmentation: np.ndarray | None = None   # semantic synthesis: class indices [B or 1, H, W]
    tile: bool | None = None           # VAE in tiles: None when the image exceeds the VAE's range; False never
    # layout-to-image models (ldmrt.layout): [{"class": id or name, "box": [x0, y0, x1, y1]}, ...] in
    # [0, 1], one layout for every image, or a list of such lists, one per image
    layout: Sequence | None = None
    # post-hoc image guidance (ldmrt.sampling.image_guide): a target [B or 1, h, w, 3] in [0, 1] that
    # the image, downsampled (bicubic) to h x w, is steered towards; h, w at most the image's size
    guide_image: np.ndarray | None = None
    guide_scale: float | None = None   # 1 / the guide's fixed variance; None: DEFAULT_GUIDE_SCALE
    guide_uncertainty: float | None = None   # the x0 estimate's error variance; 0: the paper's guide;
                                             # None: DEFAULT_GUIDE_UNCERTAINTY
    # SDXL's size ids (ldmrt.runtime.text), (height, width) in pixels; None: the image's size
    original_size: Sequence[int] | None = None
    crops_coords_top_left: Sequence[int] = (0, 0)
    target_size: Sequence[int] | None = None          # the base only
    aesthetic_score: float = AESTHETIC_SCORE          # the refiner only
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE
    # SDXL's base -> refiner hand-off (diffusers denoising_end / denoising_start; same sampler and
    # steps on both sides): the base stops at this fraction of the schedule and returns latents
    # (no image); the refiner continues from the base's `latents` given as `init_latents`
    denoising_end: float | None = None
    denoising_start: float | None = None
    init_latents: np.ndarray | None = None


@dataclass
class GenerationResult:
    images: np.ndarray | None           # float32 [B, H, W, 3] in [0, 1]; None: denoising_end (latents only)
    latents: np.ndarray                 # final latents [B, C, h, w] (scaled, before decode)
    timings: dict[str, float] = field(default_factory=dict)   # seconds per stage
    warnings: list[str] = field(default_factory=list)


def _guide_pulls(request: GenerationRequest) -> bool:
    """Whether the request's image guide pulls (and so needs the decoder's gradient every step):
    a guide image with a scale other than 0 (None: DEFAULT_GUIDE_SCALE)."""
    return request.guide_image is not None and (request.guide_scale is None or request.guide_scale != 0)


class Pipeline:
    """A loaded bundle on one backend."""

    def __init__(self, bundle: Path, manifest: Manifest, opened: BackendRunners, backend: str,
                 max_cost: float = 0.0):
        if isinstance(max_cost, bool) or not isinstance(max_cost, (int, float)) \
                or not 0 <= max_cost < float("inf"):
            raise ConfigError(f"max_cost {max_cost!r}: expected a finite number >= 0 (steps x images x "
                              f"megapixels; 0: no limit)", field="max_cost")
        self.bundle, self.manifest, self.backend = bundle, manifest, backend
        self.runners: dict[str, ComponentRunner] = opened.runners
        self.denoiser = opened.denoiser      # the loop on this backend (ldmrt.sampling.denoise)
        self.image_gradient = opened.image_gradient    # image guidance's gradient; None: not on this backend
        self.max_cost = float(max_cost)     # per-request limit on steps x images x megapixels; 0: none
        self.config: ModelConfig = manifest.config
        self._to_images = postprocessor(manifest.postprocess, "images")     # as the bundle declares
        self.text = None
        if self.config.is_text_conditioned and manifest.tokenizer is not None:
            self.text = TextEncoders.from_folder(self.config, bundle / "tokenizer")
        self.loras = AdapterSlot(opened.weights, backend)      # .set([...]) switches LoRA adapters

    @property
    def tokenizer(self):
        """The (first) text encoder's PromptTokenizer; None without one."""
        return self.text.tokenizers[0] if self.text is not None else None

    @classmethod
    def load(cls, bundle: str | Path, backend: str = "onnxruntime", *, verify: bool = True,
             components: tuple[str, ...] | None = None, max_cost: float = 0.0,
             **backend_options) -> "Pipeline":
        """Open a bundle: check the manifest (and files' sha256 unless verify=False), load runners.
        The tokenizer is checked here; each graph where its backend reads it (open_runners)."""
        backend = Backend.parse(backend).value     # any case; ConfigError naming `backend` otherwise
        bundle = Path(bundle)
        manifest = load_manifest(bundle)
        wanted = components or tuple(n for n in PIPELINE_COMPONENTS if n in manifest.components)
        if verify:
            verify_bundle(bundle, manifest, components=[])
        opened = open_runners(backend, bundle, manifest, wanted, verify=verify, **backend_options)
        return cls(bundle, manifest, opened, backend, max_cost)

    # --- the public call -------------------------------------------------------------------

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None,
                 cancel: CancelCheck | None = None) -> GenerationResult:
        """Images for `request`. `on_step(done, total)` after each denoising step; `cancel()` is
        asked before the text encoder, between steps and before the decoder: True raises
        GenerationCancelled there (the Triton model passes its request's is_cancelled). The whole
        request runs on one set of LoRA adapters (a switch waits for it)."""
        with self.loras.in_use():
            return self._generate(request, on_step, cancel)

    def _generate(self, request: GenerationRequest, on_step: StepCallback | None,
                  cancel: CancelCheck | None) -> GenerationResult:
        for name, callback in (("on_step", on_step), ("cancel", cancel)):
            if callback is not None and not callable(callback):
                raise GenerationError(f"{name}: expected a callable or None, found "
                                      f"{type(callback).__name__}", field=name)
        request, shape, plan = self.checked(request)
        timings: dict[str, float] = {}
        warnings: list[str] = []
        batch = shape[0]
        rng = np.random.default_rng(request.seed)

        _cancel_point(cancel, "before the text encoder" if self.text is not None else "before denoising")
        start = time.perf_counter()
        conditioning, guided = self._conditioning(request, shape, warnings)
        timings["conditioning"] = time.perf_counter() - start

        noise = self._initial_noise(request, shape, rng)
        image_latents = None
        start_image = request.init_image if request.init_image is not None else \
            (request.image if plan.strength < 1.0 else None)           # inpainting at strength < 1
        if request.init_latents is not None:                          # the refiner: the base's latents as they are
            image_latents = np.asarray(request.init_latents, dtype=np.float32)
        elif start_image is not None:
            start = time.perf_counter()
            image_latents = self._encode_pixels(spatial.to_pixels(start_image, batch), rng, request.tile)
            timings[Component.VAE_ENCODER] = time.perf_counter() - start
        if self.config.spatial is not None:
            start = time.perf_counter()
            maps = spatial.concat_maps(self.config, request, shape,
                                       lambda pixels, r: self._encode_pixels(pixels, r, request.tile), rng)
            conditioning = {**conditioning, **{name: np.concatenate([m, m]) if guided else m
                                               for name, m in maps.items()}}   # the same in both halves
            timings["spatial_conditioning"] = time.perf_counter() - start
        x = plan.initial_latents(noise, image_latents).astype(np.float32)
        step_noise = [rng.standard_normal(shape).astype(np.float32) if need else None
                      for need in plan.needs_noise]

        def after_step(done: int, total: int) -> None:
            if on_step is not None:
                on_step(done, total)
            if done < total:
                _cancel_point(cancel, f"after denoising step {done} of {total}")

        start = time.perf_counter()
        image_guide = None
        if _guide_pulls(request):
            target = np.broadcast_to(request.guide_image, (batch, *request.guide_image.shape[1:]))
            image_guide = ImageGuide(self.image_gradient(target.transpose(0, 3, 1, 2).astype(np.float32)),
                                     request.guide_scale, request.guide_uncertainty)
        job = DenoiseJob(plan, x, conditioning, request.guidance if guided else None, step_noise, image_guide)
        denoised = self.denoiser(job, after_step)
        timings["denoise"] = time.perf_counter() - start
        if denoised.unet_seconds is not None:
            timings[Component.UNET] = denoised.unet_seconds
        x = denoised.latents
        if not np.isfinite(x).all():
            raise self._non_finite_latents(plan, denoised.evaluations, request.guidance)

        images = None
        if request.denoising_end is None:        # the base of a hand-off returns its latents alone
            _cancel_point(cancel, f"after denoising step {plan.num_evaluations} of {plan.num_evaluations}, "
                                  f"before the VAE decoder")
            start = time.perf_counter()
            images = spatial.paste_back(self.config, request, self._decode(x, request.tile))
            timings[Component.VAE_DECODER] = time.perf_counter() - start
        for message in warnings:
            log.warning("%s", message)
        return GenerationResult(images=images, latents=x, timings=timings, warnings=warnings)

    # --- the request, checked field by field before any model runs -------------------------

    def checked(self, request: GenerationRequest):
        """(request with Python scalars and defaults filled in, latent shape, sampler plan)."""
        if not isinstance(request, GenerationRequest):
            raise GenerationError(f"request: expected a GenerationRequest, found {type(request).__name__}",
                                  field="request")
        config = self.config
        sampler = config.scheduler.default_sampler if request.sampler is None else request.sampler
        if not isinstance(sampler, str) or sampler not in SAMPLERS:
            raise GenerationError(f"sampler {show(sampler)}: expected one of {list(SAMPLERS)}", field="sampler")
        negative = request.negative_prompt
        if negative is None and not config.force_zeros_for_empty_prompt:
            negative = ""
        sizes = check_sizes(config, SizeConditioning.of(request))
        request = dataclasses.replace(
            request, sampler=sampler, negative_prompt=negative, **dataclasses.asdict(sizes),
            steps=integer("steps", request.steps, 1),
            guidance=real("guidance", request.guidance),
            eta=real("eta", request.eta, finite=False),            # range: make_plan
            strength=None if request.strength is None else real("strength", request.strength, finite=False),
            seed=integer("seed", request.seed, 0, 2 ** 64),
            batch=integer("batch", request.batch, 1),
            height=None if request.height is None else integer("height", request.height),
            width=None if request.width is None else integer("width", request.width))
        if abs(request.guidance) > float(np.finfo(np.float32).max):     # the loop's arithmetic is float32
            raise GenerationError(f"guidance {request.guidance}: expected a finite number in float32 "
                                  f"(|guidance| <= 3.4e38)", field="guidance")
        spatial.check_fields(config, request)
        shape = self._latent_shape(request)
        self._check_cost(request.steps, shape, guided=_guide_pulls(request))
        self._check_conditioning_fields(request, shape[0])
        request = dataclasses.replace(request, noise_level=spatial.check_arrays(config, request, shape))
        if request.tile is not None and not isinstance(request.tile, (bool, np.bool_)):
            raise GenerationError(f"tile {show(request.tile)}: expected True, False or None (tiles where the "
                                  f"image exceeds the VAE's range)", field="tile")
        if request.tile is False and Component.VAE_DECODER in self.runners \
                and not self._fits(Component.VAE_DECODER, *shape[2:]):
            f = config.downsampling_factor
            hi = self.runners[Component.VAE_DECODER].spec.ranges["latent_height"][2]
            raise GenerationError(f"tile False: the image ({shape[2] * f}x{shape[3] * f}) exceeds the "
                                  f"vae_decoder's range (sides up to {hi * f} pixels); allow tiling or "
                                  f"re-export with a larger --vae-max-size", field="tile")
        if request.latents is not None:
            check_array("latents", request.latents, shape)
        check_handoff(request, shape)
        request = self._check_guide(request, shape)
        if spatial.encodes_image(config) and Component.VAE_ENCODER not in self.runners:
            raise GenerationError(f"image: {spatial.model_kind(config)} needs the vae_encoder component to "
                                  f"encode the masked image; export it too", field="image")
        if request.init_image is not None:
            if Component.VAE_ENCODER not in self.runners:
                raise GenerationError("init_image: img2img needs the vae_encoder component; export it too",
                                      field="init_image")
            f = config.downsampling_factor
            check_array("init_image", request.init_image, (shape[0], shape[2] * f, shape[3] * f, 3),
                         first_axis_one=True, unit_range=True)
        return request, shape, self._plan(request)

    def _check_guide(self, request: GenerationRequest, shape: tuple[int, int, int, int]) -> GenerationRequest:
        """The request with its image guide's numbers filled in, after checking its three fields."""
        if request.guide_image is None:
            for name in ("guide_scale", "guide_uncertainty"):
                if getattr(request, name) is not None:
                    raise GenerationError(f"{name}: applies to image guidance only; pass a guide image too",
                                          field=name)
            return request
        numbers = {}
        for name, default, meaning in (("guide_scale", DEFAULT_GUIDE_SCALE, "1 / the guide's fixed variance"),
                                       ("guide_uncertainty", DEFAULT_GUIDE_UNCERTAINTY,
                                        "the x0 estimate's error variance")):
            value = getattr(request, name)
            numbers[name] = default if value is None else real(name, value)
            if not 0.0 <= numbers[name] <= 1e6:
                raise GenerationError(f"{name} {numbers[name]:g}: expected a number in [0, 1e6] ({meaning})",
                                      field=name)
        if self.image_gradient is None:
            why = (f"which the {self.backend} backend cannot take; use --backend torch" if self.backend != "torch"
                   else "and this pipeline was loaded without the vae_decoder component")
            raise GenerationError(f"guide_image: post-hoc image guidance needs the gradient of the VAE decoder, "
                                  f"{why}", field="guide_image")
        guide, f = request.guide_image, self.config.downsampling_factor
        height, width = shape[2] * f, shape[3] * f
        if not isinstance(guide, np.ndarray) or guide.ndim != 4 or guide.shape[-1] != 3 \
                or guide.shape[0] not in (1, shape[0]) or not (1 <= guide.shape[1] <= height) \
                or not (1 <= guide.shape[2] <= width):
            found = list(guide.shape) if isinstance(guide, np.ndarray) else type(guide).__name__
            images = "1" if shape[0] == 1 else f"1 or {shape[0]}"
            raise ShapeError(f"guide_image: expected an RGB array [{images}, h, w, 3] with h <= {height} and "
                             f"w <= {width} (the image, downsampled to the guide's size, is compared with it), "
                             f"found {found}", field="guide_image")
        check_array("guide_image", guide, guide.shape, unit_range=True)
        return dataclasses.replace(request, **numbers)

    def _check_cost(self, steps: int, shape: tuple[int, int, int, int], guided: bool = False) -> None:
        """Refuse a request over `max_cost` (steps x images x megapixels, x GUIDED_STEP_COST with an
        image guide) before any work: what a server sets so that no single request can hold an
        instance for long."""
        if self.max_cost <= 0:
            return
        batch, _, latent_height, latent_width = shape
        f = self.config.downsampling_factor
        megapixels = latent_height * f * latent_width * f / 1e6
        cost = steps * batch * megapixels * (GUIDED_STEP_COST if guided else 1)
        if cost > self.max_cost:
            extra = f" x {GUIDED_STEP_COST} (image guidance)" if guided else ""
            raise GenerationError(f"request: costs {cost:.4g} (steps {steps} x {batch} images x "
                                  f"{megapixels:.4g} megapixels{extra}), over this model's limit max_cost "
                                  f"{self.max_cost:g}; ask for fewer steps, images or pixels", field="request")

    def _check_conditioning_fields(self, request: GenerationRequest, batch: int) -> None:
        config = self.config
        expand(request.prompt, batch, "prompt")
        if request.negative_prompt is not None:
            expand(request.negative_prompt, batch, "negative_prompt")
        kind = self._conditioning_kind()
        if kind != "text-conditioned":
            for name in ("prompt", "negative_prompt"):
                value = getattr(request, name)
                if value is not None and any(expand(value, batch, name)):
                    takes = {"class-conditional": "class_labels, not prompts",
                             "layout-conditioned": "a layout, not prompts"}.get(kind, "no prompt")
                    raise GenerationError(f"{name} {show(value)}: this bundle's model is {kind} "
                                          f"({config.name}); it takes {takes}", field=name)
        if kind == "layout-conditioned" or request.layout is not None:
            self._layout_tokens(request, batch)                  # checked here, used by _conditioning
        labels = request.class_labels
        if labels is None:
            return
        if kind != "class-conditional":
            raise GenerationError(f"class_labels {show(labels)}: this bundle's model is {kind} "
                                  f"({config.name}); it takes no class labels", field="class_labels")
        n = self._num_classes()
        values = list(labels) if isinstance(labels, (list, tuple, np.ndarray)) else None
        if values is None or not all(is_integer(c) for c in values) or len(values) not in (1, batch) \
                or any(not 0 <= int(c) < n for c in values):
            shown = [int(c) if is_integer(c) else c for c in values] if values is not None else labels
            count = "1" if batch == 1 else f"1 or {batch}"
            raise GenerationError(f"class_labels {show(shown)}: expected {count} integer labels in "
                                  f"[0, {n})", field="class_labels")

    def _conditioning_kind(self) -> str:
        """How the UNet is conditioned: "layout-conditioned", "text-conditioned", "class-conditional"
        or "unconditional"."""
        if self.config.is_layout_conditioned:
            return "layout-conditioned"
        if self.config.is_text_conditioned:
            return "text-conditioned"
        if isinstance(self.config.conditioner, ClassEmbedderConfig) or self.config.unet.num_classes:
            return "class-conditional"
        return "unconditional"

    def _layout_tokens(self, request: GenerationRequest, batch: int) -> np.ndarray:
        """(B, L) int32 layout tokens of request.layout; GenerationError naming `layout`."""
        if not self.config.is_layout_conditioned:
            raise GenerationError(f"layout: this bundle's model is {self._conditioning_kind()} "
                                  f"({self.config.name}); it takes no layout", field="layout")
        layout = request.layout
        if layout is None:
            raise GenerationError(f"layout: this bundle's model ({self.config.name}) is layout-conditioned; it "
                                  f"needs a layout [{{\"class\": ..., \"box\": [x0, y0, x1, y1]}}, ...]",
                                  field="layout")
        per_image = isinstance(layout, (list, tuple)) and bool(layout) and all(
            isinstance(item, (list, tuple)) for item in layout)
        layouts = list(layout) if per_image else [layout]
        if len(layouts) not in (1, batch):
            raise GenerationError(f"layout: {len(layouts)} layouts for {batch} images; expected 1 or {batch}",
                                  field="layout")
        tokens = [encode_layout(self.config.layout, one, "layout" if len(layouts) == 1 else f"layout[{i}]")
                  for i, one in enumerate(layouts)]
        return np.stack(tokens * (batch if len(tokens) == 1 else 1)).astype(np.int32)

    def _num_classes(self) -> int:
        config = self.config
        return config.conditioner.n_classes if config.conditioner else config.unet.num_classes

    # --- stages ----------------------------------------------------------------------------

    def _latent_shape(self, request: GenerationRequest) -> tuple[int, int, int, int]:
        spec = self.manifest.component(Component.UNET).spec
        f = self.config.downsampling_factor
        opt = spec.ranges["latent_height"][1] * f
        fixed = spatial.map_size(self.config, request)       # an inpainting / low-res image fixes the size
        height = (opt if fixed is None else fixed[0]) if request.height is None else request.height
        width = (opt if fixed is None else fixed[1]) if request.width is None else request.width
        for name, value, given in (("height", height, request.height), ("width", width, request.width)):
            if value <= 0 or value % f:
                if given is None and fixed is not None:      # the size came from a map: name the map
                    raise GenerationError(f"{fixed[2]}: its {name} makes a {value}-pixel image, expected a "
                                          f"multiple of the latent factor {f}; crop or resize it (the CLI "
                                          f"resizes to --height/--width)", field=fixed[2])
                raise GenerationError(f"{name} {value}: expected a positive multiple of the latent "
                                      f"factor {f}", field=name)
        max_batch = self.manifest.shape_ranges.max_batch
        if request.batch > max_batch:
            raise GenerationError(f"batch {request.batch}: the bundle was exported for at most "
                                  f"{max_batch} images per call; re-export with --max-batch", field="batch")
        for symbol, value in (("latent_height", height // f), ("latent_width", width // f)):
            lo, _, hi = spec.ranges[symbol]
            if not lo <= value <= hi:
                side = "height" if symbol.endswith("height") else "width"
                raise GenerationError(f"{side} {value * f}: outside the exported range "
                                      f"[{lo * f}, {hi * f}] pixels; re-export with --min-size/--max-size",
                                      field=side)
        return request.batch, self.config.latent_channels, height // f, width // f

    def _plan(self, request: GenerationRequest):
        if request.init_image is not None:
            strength = IMG2IMG_STRENGTH if request.strength is None else request.strength
        elif request.image is not None and self.config.spatial.is_inpainting:
            strength = 1.0 if request.strength is None else request.strength    # diffusers' default
        elif request.strength is not None:
            raise GenerationError("strength applies to img2img only: pass init_image too", field="strength")
        else:
            strength = 1.0
        return make_plan(request.sampler, self.config.scheduler, request.steps, eta=request.eta,
                         strength=strength, denoising_end=request.denoising_end,
                         denoising_start=request.denoising_start)

    def _conditioning(self, request: GenerationRequest, shape: tuple[int, int, int, int], warnings: list[str]):
        """The UNet's conditioning inputs and whether guided: encoder_hidden_states (2B, L, D)
        [uncond; cond] when guided, else (B, L, D) (SDXL: and text_embeds, time_ids; see
        ldmrt.runtime.text); or class_labels; {} when unconditional.

        Guidance <= 1 runs the conditional prediction alone, as diffusers does
        (`do_classifier_free_guidance = guidance_scale > 1`): one UNet batch, half the work."""
        config, batch = self.config, shape[0]
        guided = request.guidance > 1.0
        kind = self._conditioning_kind()
        if kind == "layout-conditioned":
            ids = self._layout_tokens(request, batch)                                  # (B, L)
            if guided:    # the unconditional half: an empty layout (padding and the crop only)
                ids = np.concatenate([np.broadcast_to(encode_layout(config.layout, []), ids.shape), ids])
            embeddings = self.runners[Component.TEXT_ENCODER]({"input_ids": np.ascontiguousarray(ids, np.int32)})
            self._check_model_output(embeddings, Component.TEXT_ENCODER, "layout embeddings")
            return {"encoder_hidden_states": embeddings}, guided
        if kind == "text-conditioned":
            if self.text is None:
                raise GenerationError("this bundle has no tokenizer/ folder; re-export it")
            negative = request.negative_prompt
            f = config.downsampling_factor
            unet = self.manifest.component(Component.UNET).spec
            negatives = None if negative is None else expand(negative, batch, "negative_prompt")
            return self.text.conditioning(
                self.runners, expand(request.prompt, batch, "prompt"), negatives, guided, SizeConditioning.of(request),
                (shape[2] * f, shape[3] * f), warnings, self._check_model_output,
                {t.name: t.dtype for t in unet.inputs}), guided
        if kind == "class-conditional":
            n = self._num_classes()
            labels = [int(c) for c in (request.class_labels if request.class_labels is not None else [0])]
            if len(labels) == 1:
                labels = labels * batch
            guided = guided and config.conditioner is not None
            # The LDM ImageNet models learned the last class as "no class" for guidance.
            full = ([n - 1] * batch + labels) if guided else labels
            return {"class_labels": np.asarray(full, dtype=np.int32)}, guided
        return {}, False

    def _initial_noise(self, request: GenerationRequest, shape, rng: np.random.Generator) -> np.ndarray:
        # Always drawn, then replaced: the per-step noise of stochastic samplers continues the same
        # stream, so passing a seed's own initial noise as `latents` reproduces that seed's run.
        drawn = rng.standard_normal(shape).astype(np.float32)
        if request.latents is None:
            return drawn
        return np.asarray(request.latents).astype(np.float32)     # checked by `checked`

    def _encode_pixels(self, pixels: np.ndarray, rng: np.random.Generator, tile: bool | None = None) -> np.ndarray:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, h, w): a posterior sample (KL) or the
        pre-quantization latent (VQ), as CompVis' get_first_stage_encoding; in tiles where the
        image exceeds the encoder's range (or `tile` asks)."""
        runner = self.runners[Component.VAE_ENCODER]
        f = self.config.downsampling_factor

        def encode(part: np.ndarray) -> np.ndarray:
            return runner({"images": np.ascontiguousarray(part).astype(runner.spec.inputs[0].dtype)}).astype(np.float32)
        tiling = self._tiling(Component.VAE_ENCODER, pixels.shape[2] // f, pixels.shape[3] // f, tile)
        if tiling is None:
            moments = encode(pixels)
        else:
            tiles = Tiling((tiling.tile[0] * f, tiling.tile[1] * f), tiling.overlap * f)
            outputs = runner.spec.outputs[0].shape[1]
            moments = run_tiled(encode, pixels, tiles, 1 / f, outputs, multiple=f)
        if moments.shape[1] == 2 * self.config.latent_channels:          # KL: sample the posterior
            mean, logvar = np.split(moments, 2, axis=1)
            latent = mean + np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) * rng.standard_normal(mean.shape)
        else:                                                             # VQ: the pre-quantization latent
            latent = moments
        return (latent * self.config.scale_factor).astype(np.float32)

    def _decode(self, x: np.ndarray, tile: bool | None = None) -> np.ndarray:
        runner = self.runners[Component.VAE_DECODER]
        latent = x / self.manifest.latent_scale

        def decode(part: np.ndarray) -> np.ndarray:
            return runner({"latent": np.ascontiguousarray(part).astype(runner.spec.inputs[0].dtype)}).astype(np.float32)
        tiling = self._tiling(Component.VAE_DECODER, x.shape[2], x.shape[3], tile)
        if tiling is None:
            images = decode(latent)
        else:
            images = run_tiled(decode, latent, tiling, self.config.downsampling_factor, 3)
        self._check_model_output(images, Component.VAE_DECODER, "the decoded pixels")
        return self._to_images(images).transpose(0, 2, 3, 1)

    def _tiling(self, component: str, height: int, width: int, tile: bool | None) -> Tiling | None:
        """Latent tiles for a VAE graph: None where the latent fits its range and tiles were not
        asked for; the range's largest tiles where it does not fit, its optimal ones when asked."""
        fits = self._fits(component, height, width)
        if tile is False or (tile is None and fits):
            return None
        ranges = self.runners[component].spec.ranges
        (_, opt, hi), (_, opt_w, hi_w) = ranges["latent_height"], ranges["latent_width"]
        side = (hi, hi_w) if not fits else (opt, opt_w)
        return Tiling(side, overlap=max(min(side) // 4, 1))

    def _fits(self, component: str, height: int, width: int) -> bool:
        """Whether a latent of this size is inside the VAE graph's exported range."""
        ranges = self.runners[component].spec.ranges
        (lo, _, hi), (lo_w, _, hi_w) = ranges["latent_height"], ranges["latent_width"]
        return lo <= height <= hi and lo_w <= width <= hi_w

    # --- model outputs: non-finite values, with advice that fits the bundle ----------------

    def _reduced_precision(self, component: str) -> bool:
        if component == Component.UNET:
            return self.manifest.precision != Precision.FP32
        return self.manifest.component(component).dtype != "float32"

    def _non_finite_latents(self, plan, done: int, guidance: float) -> GenerationError:
        advice = "try an fp32 export or a lower guidance" if self._reduced_precision(Component.UNET) \
            else "the UNet runs in fp32 already: try a lower guidance"
        return GenerationError(
            f"non-finite latents after denoising step {done} of {plan.num_evaluations} "
            f"(sampler {plan.name}, precision {self.manifest.precision.value}, guidance {guidance:g}); {advice}")

    def _check_model_output(self, array: np.ndarray, component: str, what: str) -> None:
        if np.isfinite(array).all():
            return
        if not self._reduced_precision(component):
            advice = (f"the {component} graph runs in fp32 and its inputs were finite: the weights "
                      f"or the graph are faulty, or the latents far off (try a lower guidance)")
        elif component == Component.VAE_DECODER:
            advice = "export with --fp32-vae-decoder (or an fp32 export)"
        else:
            advice = "try an fp32 export"
        raise GenerationError(f"non-finite values in {what} from the {component} "
                              f"(precision {self.manifest.precision.value}); {advice}")


def max_image_size(manifest: Manifest) -> tuple[int, int]:
    """(height, width): the largest image, in pixels, the bundle was exported for."""
    spec = manifest.component(Component.UNET).spec
    f = manifest.config.downsampling_factor
    return spec.ranges["latent_height"][2] * f, spec.ranges["latent_width"][2] * f


def _cancel_point(cancel: CancelCheck | None, where: str) -> None:
    if cancel is not None and cancel():
        raise GenerationCancelled(f"generation cancelled by the caller {where}; no image was made")



