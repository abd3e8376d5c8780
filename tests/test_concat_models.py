"""Concatenation-conditioned LDMs (inpainting, super-resolution, semantic synthesis): the test of record.

Each family of tests/families.py CONCAT_FAMILIES holds the same random weights in ldmrt's model and
in independent reference modules (diffusers' UNet2DConditionModel / UNet2DModel, AutoencoderKL /
VQModel, transformers' CLIPTextModel). The exported graphs run on ONNX Runtime (fp32) against:
- the reference UNet on the concatenation written here, at shapes the export never traced;
- diffusers' StableDiffusionInpaintPipeline, StableDiffusionUpscalePipeline and
  LDMSuperResolutionPipeline end to end, same latents (and the same low-res noise);
- for the paper's inpainting and semantic synthesis (no diffusers pipeline), a loop written here
  from the paper: diffusers' DDIM scheduler, its own one-hot spatial rescaler, mask and paste-back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldmrt.checkpoints.diffusers_folder import legacy_attention_from_diffusers
from ldmrt.config import ClipTextConfig, ConcatKind, ModelConfig
from ldmrt.errors import GenerationError, ShapeError
from ldmrt.export.bundle import ExportOptions, ModelSource, export_bundle, synthetic_tokenizer_writer
from ldmrt.iospec import Component, ShapeRanges, example_inputs
from ldmrt.models import LatentDiffusion, build_model
from ldmrt.models.convert import autoencoder_from_diffusers, unet_from_diffusers
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
from tests.families import CONCAT_FAMILIES
from tests.pipeline_reference import clip_tokenizer, diffusers_scheduler, golden_model
from tests.reference import diffusers_autoencoder, diffusers_plain_unet, perturb_, rel_l2

RANGES = ShapeRanges(min_size=16, opt_size=32, max_size=48, max_batch=2, opt_batch=1)
IMAGE_TOL = 1e-3        # mean abs on [0, 1] images, ldmrt vs the reference
UNET_TOL = 1e-5         # relative L2, fp32


@dataclass
class Golden:
    """One family: its config, our model, the reference modules with the same weights, the bundle."""
    config: ModelConfig
    ours: LatentDiffusion
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module | None
    bundle: Path
    pipeline: Pipeline


def _build(family: str) -> tuple[ModelConfig, LatentDiffusion, torch.nn.Module, torch.nn.Module, torch.nn.Module | None]:
    config = CONCAT_FAMILIES[family]
    if isinstance(config.conditioner, ClipTextConfig):
        golden = golden_model(config, seed=0)
        return config, golden.ours, golden.unet, golden.vae, golden.text_encoder
    torch.manual_seed(0)
    unet = perturb_(diffusers_plain_unet(config.unet), seed=0)
    vae = perturb_(diffusers_autoencoder(config.autoencoder), seed=1)
    ours = perturb_(build_model(config, seed=0), seed=2)         # the rescaler's weights stay ours
    ours.unet.load_state_dict(unet_from_diffusers(legacy_attention_from_diffusers(unet.state_dict(), config.unet),
                                                  config.unet), strict=True)
    ours.first_stage_model.load_state_dict(autoencoder_from_diffusers(vae.state_dict(), config.autoencoder),
                                           strict=True)
    return config, ours.eval(), unet, vae, None


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    cache: dict[str, Golden] = {}

    def get(family: str) -> Golden:
        if family not in cache:
            config, ours, unet, vae, text = _build(family)
            source = ModelSource(model=ours, source=f"test:{config.name}", random_weights=True,
                                 write_tokenizer=synthetic_tokenizer_writer(config.conditioner))
            bundle = export_bundle(source, tmp_path_factory.mktemp(family) / "bundle",
                                   ExportOptions(shape_ranges=RANGES)).path
            cache[family] = Golden(config, ours, unet, vae, text, bundle, Pipeline.load(bundle, threads=1))
        return cache[family]
    return get


def _images(rng: np.random.Generator, batch: int, height: int, width: int) -> np.ndarray:
    """Smooth images in [0, 1] (a random field upsampled), [B, H, W, 3]."""
    coarse = torch.from_numpy(rng.random((batch, 3, height // 4, width // 4)).astype(np.float32))
    return F.interpolate(coarse, size=(height, width), mode="bilinear").permute(0, 2, 3, 1).numpy()


def _mask(batch: int, height: int, width: int) -> np.ndarray:
    """A rectangle off the 4-pixel grid plus the right third: [B, H, W] in {0, 1}."""
    mask = np.zeros((batch, height, width), np.float32)
    mask[:, 5:height - 9, 3:width // 2 + 1] = 1.0
    mask[:, :, 2 * width // 3:] = 1.0
    return mask


# --- the UNet graph vs the reference UNet on the concatenation ---------------------------------

@pytest.mark.parametrize("family", ["sd-inpaint", "sd-upscale", "ldm-sr", "ldm-inpaint"])
def test_unet_graph_matches_diffusers_at_untraced_shapes(golden, family, record_property):
    g = golden(family)
    spec = g.pipeline.manifest.component(Component.UNET).spec
    runner = g.pipeline.runners[Component.UNET]
    for values in ({"batch": 2, "latent_height": 6, "latent_width": 10},
                   {"batch": 1, "latent_height": 12, "latent_width": 4}):
        arrays = example_inputs(g.config, spec, values, seed=values["batch"])
        found = runner(arrays)
        t = {k: torch.from_numpy(v) for k, v in arrays.items()}
        x = torch.cat([t["sample"], *(t[kind.value] for kind in g.config.spatial.inputs)], dim=1)
        with torch.no_grad():
            if g.text_encoder is not None:
                labels = t["class_labels"].long() if "class_labels" in t else None
                expected = g.unet(x, t["timestep"], encoder_hidden_states=t["encoder_hidden_states"],
                                  class_labels=labels).sample
            else:
                expected = g.unet(x, t["timestep"]).sample
        record_property(f"rel_l2 {values}", rel_l2(torch.from_numpy(found), expected))
        assert rel_l2(torch.from_numpy(found), expected) <= UNET_TOL, (family, values)


def test_spatial_rescaler_is_the_one_hot_rescaler(golden):
    """SpatialRescaler on class indices == CompVis' on the one-hot map (resize twice, 1x1 conv),
    in the exported UNet graph too."""
    g = golden("ldm-semantic")
    rescaler = g.config.spatial.rescaler
    weight = g.ours.conditioner.channel_mapper.weight.detach()            # (out, n_classes, 1, 1)
    segmentation = torch.from_numpy(np.random.default_rng(3).integers(0, rescaler.n_classes, (2, 24, 40)))

    def one_hot_rescaler(seg: torch.Tensor) -> torch.Tensor:
        x = F.one_hot(seg.long(), rescaler.n_classes).permute(0, 3, 1, 2).float()   # (B, K, H, W)
        for _ in range(rescaler.n_stages):
            x = F.interpolate(x, scale_factor=rescaler.multiplier, mode="bilinear")
        return F.conv2d(x, weight)

    with torch.no_grad():
        expected = one_hot_rescaler(segmentation)
        assert rel_l2(g.ours.conditioner(segmentation), expected) <= 1e-6
        spec = g.pipeline.manifest.component(Component.UNET).spec
        arrays = example_inputs(g.config, spec, {"batch": 2, "latent_height": 6, "latent_width": 10}, seed=4)
        arrays["segmentation"] = segmentation.numpy().astype(np.int32)
        found = g.pipeline.runners[Component.UNET](arrays)
        x = torch.cat([torch.from_numpy(arrays["sample"]), one_hot_rescaler(segmentation)], dim=1)
        reference = g.unet(x, torch.from_numpy(arrays["timestep"])).sample
    assert rel_l2(torch.from_numpy(found), reference) <= UNET_TOL


# --- end to end vs diffusers' pipelines ---------------------------------------------------------

def _no_progress(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler, batch, strength", [("ddim", 1, None), ("euler", 2, None),
                                                      ("dpmpp-2m", 1, None), ("ddim", 1, 0.6)])
def test_sd_inpainting_matches_diffusers(golden, record_property, sampler, batch, strength):
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    g = golden("sd-inpaint")
    rng = np.random.default_rng(11)
    height, width = 32, 48
    image, mask = _images(rng, batch, height, width), _mask(batch, height, width)
    latents = rng.standard_normal((batch, 4, height // 4, width // 4)).astype(np.float32)
    prompts = ["a red fox in snow", "a blue house"][:batch]
    request = GenerationRequest(prompt=prompts, negative_prompt="blurry", steps=6, guidance=7.5,
                                sampler=sampler, batch=batch, latents=latents, image=image, mask=mask,
                                strength=strength)
    ours = g.pipeline.generate(request).images

    pipe = _no_progress(StableDiffusionInpaintPipeline(
        vae=g.vae, text_encoder=g.text_encoder, tokenizer=clip_tokenizer(g.bundle / "tokenizer", g.config.conditioner),
        unet=g.unet, scheduler=diffusers_scheduler(sampler, g.config.scheduler), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False))
    common = dict(prompt=prompts, negative_prompt=["blurry"] * batch,
                  image=torch.from_numpy(image.transpose(0, 3, 1, 2).copy()),
                  mask_image=torch.from_numpy(mask[:, None].copy()), height=height, width=width,
                  num_inference_steps=6, guidance_scale=7.5, output_type="np")
    with torch.no_grad():
        if strength is None:
            reference = pipe(latents=torch.from_numpy(latents), **common).images
        else:      # diffusers ignores the image when given latents: feed ours as its own draw
            with mock.patch.object(module, "randn_tensor", lambda shape, **_: torch.from_numpy(latents)):
                reference = pipe(strength=strength, **common).images
    record_property("mean_abs", float(np.abs(ours - reference).mean()))
    assert np.abs(ours - reference).mean() <= IMAGE_TOL, np.abs(ours - reference).mean()


@pytest.mark.parametrize("sampler, noise_level, guidance", [("ddim", 20, 7.5), ("euler", 100, 7.5),
                                                            ("dpmpp-2m", 0, 1.0)])
def test_sd_upscaler_matches_diffusers(golden, record_property, sampler, noise_level, guidance):
    from diffusers import DDPMScheduler, StableDiffusionUpscalePipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_upscale as module

    g = golden("sd-upscale")
    rng = np.random.default_rng(5)
    low_res = _images(rng, 1, 8, 12)                                  # -> 32 x 48
    seed = 9
    # ldmrt's draws from the seed: the initial noise, then the low-res image's noise
    draws = np.random.default_rng(seed)
    latents = draws.standard_normal((1, 4, 8, 12)).astype(np.float32)
    low_res_noise = draws.standard_normal((1, 3, 8, 12)).astype(np.float32)
    request = GenerationRequest(prompt="a castle", steps=5, guidance=guidance, sampler=sampler, seed=seed,
                                image=low_res, noise_level=noise_level)
    ours = g.pipeline.generate(request).images
    assert ours.shape == (1, 32, 48, 3)

    schedule = g.config.spatial.low_res_noise.schedule
    pipe = _no_progress(StableDiffusionUpscalePipeline(
        vae=g.vae, text_encoder=g.text_encoder, tokenizer=clip_tokenizer(g.bundle / "tokenizer", g.config.conditioner),
        unet=g.unet, low_res_scheduler=DDPMScheduler(beta_start=schedule.beta_start, beta_end=schedule.beta_end,
                                                     beta_schedule=schedule.beta_schedule.value),
        scheduler=diffusers_scheduler(sampler, g.config.scheduler), max_noise_level=350))
    with torch.no_grad(), mock.patch.object(module, "randn_tensor",
                                            lambda shape, **_: torch.from_numpy(low_res_noise)):
        reference = pipe(prompt="a castle", image=torch.from_numpy(low_res.transpose(0, 3, 1, 2).copy()),
                         num_inference_steps=5, guidance_scale=guidance, noise_level=noise_level,
                         latents=torch.from_numpy(latents), output_type="np").images
    record_property("mean_abs", float(np.abs(ours - reference).mean()))
    assert np.abs(ours - reference).mean() <= IMAGE_TOL, np.abs(ours - reference).mean()


@pytest.mark.parametrize("sampler, batch", [("ddim", 1), ("plms", 2), ("dpmpp-2m", 1)])
def test_ldm_super_resolution_matches_diffusers(golden, record_property, sampler, batch):
    from diffusers import LDMSuperResolutionPipeline
    from diffusers.pipelines.latent_diffusion import pipeline_latent_diffusion_superresolution as module

    g = golden("ldm-sr")
    rng = np.random.default_rng(2)
    low_res = _images(rng, batch, 12, 8)                              # -> 48 x 32
    latents = rng.standard_normal((batch, 3, 12, 8)).astype(np.float32)
    ours = g.pipeline.generate(GenerationRequest(steps=6, sampler=sampler, batch=batch, latents=latents,
                                                 image=low_res)).images
    # diffusers' pipeline scales the whole concatenation with scale_model_input: the samplers here
    # leave it as is (Euler would scale the low-res image too, a diffusers quirk ldmrt does not copy)
    pipe = _no_progress(LDMSuperResolutionPipeline(vqvae=g.vae, unet=g.unet,
                                                   scheduler=diffusers_scheduler(sampler, g.config.scheduler)))
    with torch.no_grad(), mock.patch.object(module, "randn_tensor", lambda shape, **_: torch.from_numpy(latents)):
        reference = pipe(image=torch.from_numpy(low_res.transpose(0, 3, 1, 2) * 2 - 1), num_inference_steps=6,
                         output_type="np").images
    record_property("mean_abs", float(np.abs(ours - reference).mean()))
    assert np.abs(ours - reference).mean() <= IMAGE_TOL, np.abs(ours - reference).mean()


# --- the paper's models, against a loop written from the paper ---------------------------------

def _ddim_reference(g: Golden, concat: torch.Tensor, latents: np.ndarray, steps: int) -> torch.Tensor:
    """DDIM (eta 0) over [z_t, concat] with the reference UNet; the decoded images in [-1, 1]."""
    scheduler = diffusers_scheduler("ddim", g.config.scheduler)
    scheduler.set_timesteps(steps)
    z = torch.from_numpy(latents) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = g.unet(torch.cat([z, concat], dim=1), t).sample
            z = scheduler.step(eps, t, z).prev_sample
        return g.vae.decode(z).sample.clamp(-1, 1)


def test_ldm_inpainting_matches_the_paper_loop(golden, record_property):
    """scripts/inpaint.py of the LDM paper: masked image (repainted pixels black) encoded by the VQ
    encoder before quantization, the mask in {-1, +1} downsampled (nearest), [z, c, mask], DDIM,
    decode, and the kept pixels pasted back."""
    g = golden("ldm-inpaint")
    rng = np.random.default_rng(8)
    height, width = 48, 32
    image, mask = _images(rng, 1, height, width), _mask(1, height, width)
    latents = rng.standard_normal((1, 3, height // 4, width // 4)).astype(np.float32)
    ours = g.pipeline.generate(GenerationRequest(steps=5, sampler="ddim", latents=latents, image=image,
                                                 mask=mask)).images

    img = torch.from_numpy(image.transpose(0, 3, 1, 2).copy())
    m = torch.from_numpy(mask[:, None].copy())
    masked = (1 - m) * img
    batch = {"image": img * 2 - 1, "mask": m * 2 - 1, "masked_image": masked * 2 - 1}
    with torch.no_grad():
        c = g.vae.encode(batch["masked_image"]).latents                     # before quantization
    cc = F.interpolate(batch["mask"], size=c.shape[-2:])
    predicted = (_ddim_reference(g, torch.cat([c, cc], dim=1), latents, 5) + 1) / 2
    inpainted = (1 - m) * img + m * predicted
    expected = inpainted.permute(0, 2, 3, 1).numpy()
    record_property("mean_abs", float(np.abs(ours - expected).mean()))
    assert np.abs(ours - expected).mean() <= IMAGE_TOL
    kept = mask[0] == 0
    assert np.array_equal(ours[0][kept], image[0][kept]), "kept pixels are the input's exactly"


def test_semantic_synthesis_matches_the_paper_loop(golden, record_property):
    g = golden("ldm-semantic")
    rescaler = g.config.spatial.rescaler
    rng = np.random.default_rng(4)
    segmentation = np.zeros((1, 32, 48), np.int64)
    segmentation[:, 10:, :] = 3
    segmentation[:, 20:, 17:40] = rng.integers(0, rescaler.n_classes)
    segmentation[:, :6, :] = rescaler.n_classes - 1
    latents = rng.standard_normal((1, 3, 8, 12)).astype(np.float32)
    ours = g.pipeline.generate(GenerationRequest(steps=5, sampler="ddim", latents=latents,
                                                 segmentation=segmentation)).images
    x = F.one_hot(torch.from_numpy(segmentation), rescaler.n_classes).permute(0, 3, 1, 2).float()
    for _ in range(rescaler.n_stages):
        x = F.interpolate(x, scale_factor=0.5, mode="bilinear")
    with torch.no_grad():
        c = F.conv2d(x, g.ours.conditioner.channel_mapper.weight)
    expected = ((_ddim_reference(g, c, latents, 5) + 1) / 2).permute(0, 2, 3, 1).numpy()
    record_property("mean_abs", float(np.abs(ours - expected).mean()))
    assert np.abs(ours - expected).mean() <= IMAGE_TOL


# --- requests: every bad input named before any work ---------------------------------------------

@pytest.mark.parametrize("family, change, field, words", [
    ("sd-inpaint", {"mask": None}, "mask", "needs mask"),
    ("sd-inpaint", {"mask": np.zeros((1, 32, 40), np.float32)}, "mask", "expected shape [1, 32, 48]"),
    ("sd-inpaint", {"mask": np.full((1, 32, 48), 2.0, np.float32)}, "mask", "[0, 1]"),
    ("sd-inpaint", {"image": np.zeros((1, 32, 48, 4), np.float32)}, "image", "expected shape"),
    ("sd-inpaint", {"noise_level": 3}, "noise_level", "it takes image, mask"),
    ("sd-inpaint", {"init_image": np.zeros((1, 32, 48, 3), np.float32)}, "init_image", "as `image`"),
    ("sd-inpaint", {"height": 40}, "image", "expected shape [1, 40, 48, 3]"),
    ("sd-upscale", {"noise_level": 351}, "noise_level", "[0, 350]"),
    ("sd-upscale", {"noise_level": 2.5}, "noise_level", "expected an integer"),
    ("sd-upscale", {"strength": 0.5}, "strength", "inpainting and img2img only"),
    ("sd-upscale", {"image": np.zeros((1, 20, 12, 3), np.float32)}, "height", "outside the exported range"),
    ("ldm-semantic", {"segmentation": np.zeros((1, 32, 48), np.float32)}, "segmentation", "integer array"),
    ("ldm-semantic", {"segmentation": np.full((1, 32, 48), 12)}, "segmentation", "[0, 12)"),
    ("ldm-semantic", {"segmentation": np.zeros((2, 32, 48), np.int64)}, "segmentation", "expected shape [1, 32, 48]"),
    ("ldm-semantic", {"mask": np.zeros((1, 32, 48), np.float32)}, "mask", "takes segmentation"),
])
def test_bad_map_inputs_are_refused_by_name(golden, family, change, field, words):
    g = golden(family)
    good = {"sd-inpaint": dict(image=np.zeros((1, 32, 48, 3), np.float32), mask=np.zeros((1, 32, 48), np.float32),
                               prompt="x"),
            "sd-upscale": dict(image=np.zeros((1, 8, 12, 3), np.float32), prompt="x"),
            "ldm-semantic": dict(segmentation=np.zeros((1, 32, 48), np.int64))}[family]
    request = GenerationRequest(steps=2, **{**good, **change})
    with mock.patch.object(g.pipeline, "denoiser", side_effect=AssertionError("work started")):
        with pytest.raises((GenerationError, ShapeError)) as caught:
            g.pipeline.generate(request)
    assert caught.value.field == field and words in str(caught.value), str(caught.value)


def test_map_fields_are_refused_by_a_text_to_image_bundle(tmp_path):
    from tests.families import FAMILIES, model_source

    config = FAMILIES["sd1"]
    bundle = export_bundle(model_source(config), tmp_path / "b", ExportOptions(
        shape_ranges=RANGES, components=("text_encoder", "unet", "vae_decoder"), validate=False)).path
    pipeline = Pipeline.load(bundle)
    for field, value in (("image", np.zeros((1, 32, 32, 3), np.float32)), ("noise_level", 20),
                         ("segmentation", np.zeros((1, 32, 32), np.int64))):
        with pytest.raises(GenerationError) as caught:
            pipeline.generate(GenerationRequest(prompt="x", steps=2, **{field: value}))
        assert caught.value.field == field and "not concat-conditioned" in str(caught.value)


def test_the_maps_are_the_same_in_both_guidance_halves(golden):
    """The mask and masked latents the UNet sees: identical rows for the uncond and cond halves."""
    g = golden("sd-inpaint")
    seen = []
    runner = g.pipeline.runners[Component.UNET]

    def spy(feeds):
        seen.append({k: np.array(v) for k, v in feeds.items()})
        return runner(feeds)
    with mock.patch.dict(g.pipeline.runners, {Component.UNET: spy}), \
            mock.patch.object(g.pipeline.denoiser, "unet", spy):
        g.pipeline.generate(GenerationRequest(prompt="x", steps=2, guidance=5.0, image=_images(
            np.random.default_rng(0), 1, 32, 48), mask=_mask(1, 32, 48)))
    assert seen
    for feeds in seen:
        for name in (ConcatKind.MASK.value, ConcatKind.MASKED_IMAGE_LATENTS.value):
            assert feeds[name].shape[0] == 2 and np.array_equal(feeds[name][0], feeds[name][1])
        assert set(np.unique(feeds["mask"])) == {0.0, 1.0}


def test_strength_below_one_starts_from_the_image(golden):
    g = golden("sd-inpaint")
    rng = np.random.default_rng(1)
    request = GenerationRequest(prompt="x", steps=10, image=_images(rng, 1, 32, 48), mask=_mask(1, 32, 48))
    full = g.pipeline.generate(request).images
    partial = g.pipeline.generate(dataclasses.replace(request, strength=0.3)).images
    assert np.abs(full - partial).mean() > 1e-3          # strength changes where sampling starts
