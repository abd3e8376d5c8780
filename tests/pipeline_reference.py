"""The end-to-end oracle: diffusers' StableDiffusionPipeline with the same weights as an ldmrt bundle.

`golden_model` builds the diffusers UNet2DConditionModel + AutoencoderKL and the transformers
CLIPTextModel from an ldmrt ModelConfig (random weights, perturbed off the 1/0 defaults), and
loads the same weights into ldmrt's LatentDiffusion through ldmrt.models.convert. An SD 2.x-like
config (LayerChoice.PENULTIMATE) gets a reference CLIPTextModel with one layer fewer, as the
diffusers SD 2.x checkpoints do: its last hidden state + final norm is our penultimate + final norm.
The encoder's posterior is made numerically deterministic (see golden_model).

`reference_pipeline` wires a StableDiffusionPipeline from those modules, the bundle's tokenizer/
folder (transformers' CLIPTokenizer) and the diffusers scheduler of a sampler; `run_reference`
runs an ldmrt GenerationRequest through it (img2img through StableDiffusionImg2ImgPipeline on
the same modules) with ldmrt's initial noise and, for stochastic samplers, ldmrt's step noise.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from ldmrt.config import ClipTextConfig, LayerChoice, ModelConfig, SchedulerConfig
from ldmrt.iospec import ShapeRanges
from ldmrt.models import LatentDiffusion, build_model
from ldmrt.models.convert import autoencoder_from_diffusers, clip_from_transformers, unet_from_diffusers
from ldmrt.runtime.pipeline import GenerationRequest
from ldmrt.sampling import scheduler_for
from tests.families import FAMILIES
from tests.reference import (DIFFUSERS_SCHEDULERS, diffusers_autoencoder, diffusers_unet, perturb_,
                             transformers_clip)

def _golden(family: str) -> ModelConfig:
    """The export tests' family config, with attention at both UNet levels (the diffusers
    pipeline is compared at every sampler, so every attention path should be in it)."""
    config = FAMILIES[family]
    return dataclasses.replace(config, name=f"golden-{family}",
                               unet=dataclasses.replace(config.unet, attention_resolutions=(1, 2)))


# SD 1.x at toy widths (CLIP last layer + quick_gelu, pad = eos, heads by count, conv proj-in,
# KL f4, epsilon) and SD 2.x (CLIP penultimate + gelu, pad "!" (id 0), fixed head dim, linear
# proj-in, upcast attention, v-prediction): tests/families.py.
GOLDEN_CONFIGS: dict[str, ModelConfig] = {family: _golden(family) for family in ("sd1", "sd2")}
# Image sides 16..48 px (latent 4..12; diffusers wants multiples of 8 px), two images per call.
GOLDEN_RANGES = ShapeRanges(min_size=16, opt_size=32, max_size=48, max_batch=2, opt_batch=1)

SCHEDULERS = DIFFUSERS_SCHEDULERS
# The modules whose randn_tensor draws a stochastic scheduler's step noise.
_NOISE_MODULES = ("scheduling_ddim", "scheduling_ddpm", "scheduling_euler_ancestral_discrete", "scheduling_lcm")


@dataclass
class GoldenModel:
    """Our LatentDiffusion and the independent reference modules, holding the same weights."""
    ours: LatentDiffusion
    unet: torch.nn.Module            # diffusers UNet2DConditionModel
    vae: torch.nn.Module             # diffusers AutoencoderKL
    text_encoder: torch.nn.Module    # transformers CLIPTextModel


def golden_model(config: ModelConfig, seed: int = 0) -> GoldenModel:
    """Reference modules with perturbed random weights from `seed`, and ours loaded from them."""
    if not isinstance(config.conditioner, ClipTextConfig):
        raise ValueError("the StableDiffusionPipeline oracle needs a CLIP text conditioner")
    torch.manual_seed(seed)
    unet = perturb_(diffusers_unet(config.unet), seed=seed)
    vae = perturb_(diffusers_autoencoder(config.autoencoder), seed=seed + 1)
    vae.register_to_config(scaling_factor=config.scale_factor)
    with torch.no_grad():
        # Log-variance far below both sides' clamp (-30): a posterior sample is its mean to ~3e-7,
        # so img2img compares without sharing the encoder's random draw.
        vae.quant_conv.bias[config.latent_channels:] = -60.0
    clip = config.conditioner
    penultimate = clip.layer == LayerChoice.PENULTIMATE
    reference_clip = dataclasses.replace(clip, num_hidden_layers=clip.num_hidden_layers - 1) \
        if penultimate else clip
    text_encoder = perturb_(transformers_clip(reference_clip), seed=seed + 2)

    ours = build_model(config, seed=seed)
    ours.unet.load_state_dict(unet_from_diffusers(unet.state_dict(), config.unet), strict=True)
    ours.first_stage_model.load_state_dict(
        autoencoder_from_diffusers(vae.state_dict(), config.autoencoder), strict=True)
    result = ours.conditioner.load_state_dict(clip_from_transformers(text_encoder.state_dict()),
                                              strict=not penultimate)
    if penultimate:   # only our last layer, which the penultimate choice never runs, stays random
        last = f"transformer.text_model.encoder.layers.{clip.num_hidden_layers - 1}."
        assert not result.unexpected_keys, result.unexpected_keys
        assert result.missing_keys and all(k.startswith(last) for k in result.missing_keys), \
            result.missing_keys
    return GoldenModel(ours=ours.eval(), unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval())


def diffusers_scheduler(name: str, config: SchedulerConfig):
    """The diffusers scheduler of sampler `name`, configured from the bundle's SchedulerConfig."""
    import diffusers

    class_name, extra = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    config = scheduler_for(name, config)       # the settings ldmrt's sampler runs with
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    fields = {k: (v.value if hasattr(v, "value") else v) for k, v in fields.items() if k in accepted}
    return cls(**fields, **extra)


def clip_tokenizer(folder: Path, config: ClipTextConfig):
    """transformers' CLIPTokenizer from a bundle's tokenizer/ folder, padded as `config` says."""
    from transformers import CLIPTokenizer

    # A bare vocab.json + merges.txt folder has no tokenizer_config.json: say the model length,
    # and SD 2.x's pad token ("!", id 0) where the config pads with something other than eos.
    extra = {} if config.pad_token_id == config.eos_token_id else {"pad_token": "!"}
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=config.max_length, **extra)
    assert tokenizer.pad_token_id == config.pad_token_id, (tokenizer.pad_token_id, config.pad_token_id)
    assert tokenizer.bos_token_id == config.bos_token_id and tokenizer.eos_token_id == config.eos_token_id
    return tokenizer


def reference_pipeline(golden: GoldenModel, bundle: Path, config: ModelConfig, sampler: str):
    """StableDiffusionPipeline on the reference modules, the bundle's tokenizer, `sampler`'s scheduler."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=golden.vae, text_encoder=golden.text_encoder,
        tokenizer=clip_tokenizer(bundle / "tokenizer", config.conditioner),
        unet=golden.unet, scheduler=diffusers_scheduler(sampler, config.scheduler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StepNoiseRecorder:
    """Records the noise ldmrt's numpy loop adds at each evaluation (None where it adds none)."""

    def __init__(self) -> None:
        self.noises: list[np.ndarray | None] = []
        self._patch = None

    def __enter__(self) -> "StepNoiseRecorder":
        from ldmrt.sampling import denoise as loop_module

        original = loop_module.step

        def recording_step(plan, i, x, model_output, history=None, step_noise=None):
            self.noises.append(None if step_noise is None else np.array(step_noise, copy=True))
            return original(plan, i, x, model_output, history, step_noise)
        self._patch = mock.patch.object(loop_module, "step", recording_step)
        self._patch.start()
        return self

    def __exit__(self, *exc) -> None:
        self._patch.stop()


@contextlib.contextmanager
def feed_step_noise(scheduler, noises: list[np.ndarray | None]):
    """Make `scheduler` add noises[i] at its i-th step where it draws randn (zeros where we add none)."""
    import diffusers

    if all(n is None for n in noises):
        yield
        return
    state = {"i": 0}
    original_step = scheduler.step

    @functools.wraps(original_step)      # the pipeline reads step's signature to pass `eta`
    def counted_step(*args, **kwargs):
        try:
            return original_step(*args, **kwargs)
        finally:
            state["i"] += 1

    def fed_randn(shape, generator=None, device=None, dtype=None, layout=None):
        step_noise = noises[state["i"]]
        if step_noise is None:     # ldmrt adds none where the variance is exactly 0 (diffusers: ~1e-10)
            return torch.zeros(tuple(shape), dtype=dtype)
        assert tuple(shape) == step_noise.shape, (shape, step_noise.shape)
        return torch.from_numpy(step_noise).to(dtype)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(scheduler, "step", counted_step))
        for module in _NOISE_MODULES:
            stack.enter_context(mock.patch.object(getattr(diffusers.schedulers, module), "randn_tensor",
                                                  fed_randn))
        yield


def run_reference(pipe, request: GenerationRequest, step_noise: list[np.ndarray | None] = ()) -> np.ndarray:
    """ldmrt's `request` through diffusers: float32 images [B, H, W, 3] in [0, 1].

    request.latents (required) is diffusers' `latents=` for text-to-image, and the noise mixed
    into the image latents for img2img (drawn inside diffusers' prepare_latents otherwise);
    `step_noise` is what a stochastic sampler adds at each step (see StepNoiseRecorder).
    """
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module

    assert request.latents is not None, "the oracle needs the initial latents"
    latents = torch.from_numpy(np.ascontiguousarray(request.latents, dtype=np.float32))
    batch = len(latents)
    prompts = [request.prompt] * batch if isinstance(request.prompt, str) else list(request.prompt)
    negatives = [request.negative_prompt] * batch if isinstance(request.negative_prompt, str) \
        else list(request.negative_prompt)
    common = dict(prompt=prompts, negative_prompt=negatives, num_inference_steps=request.steps,
                  guidance_scale=request.guidance, output_type="np", **({"eta": request.eta} if request.eta else {}))

    def initial_noise(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(latents.shape), (shape, latents.shape)
        return latents.to(dtype)

    with torch.no_grad(), feed_step_noise(pipe.scheduler, list(step_noise)), contextlib.ExitStack() as stack:
        if request.init_image is None:
            images = pipe(height=request.height, width=request.width, latents=latents, **common).images
        else:
            img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
            img2img.set_progress_bar_config(disable=True)
            stack.enter_context(mock.patch.object(img2img_module, "randn_tensor", initial_noise))
            image = np.asarray(request.init_image, dtype=np.float32)
            image = np.broadcast_to(image, (batch, *image.shape[1:])).copy()    # one per prompt
            images = img2img(image=image, strength=request.strength, **common).images
    return np.asarray(images, dtype=np.float32)
