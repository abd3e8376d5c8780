"""Concat-conditioned checkpoints: presets at full size against diffusers' parameter counts, the
published CompVis / Stability YAMLs read as the presets, diffusers folders and single files (with
and without a YAML) loading to the same weights, and every unreadable form refused by name."""
from __future__ import annotations

import dataclasses
import pytest
import torch
from safetensors import torch as safetensors_torch

from ldmrt.checkpoints.loading import load_checkpoint
from ldmrt.checkpoints.original import Detection, clean_keys, detect
from ldmrt.checkpoints.single_file import infer_config
from ldmrt.checkpoints.yaml_config import config_from_yaml
from ldmrt.config import ConcatKind, LowResNoise, ModelConfig, SpatialConditioning, SpatialRescalerConfig
from ldmrt.presets import preset
from ldmrt.errors import CheckpointError, ConfigError
from ldmrt.models import LatentDiffusion
from tests.families import CONCAT_FAMILIES
from tests.reference import perturb_

# --- full-size presets: parameter counts of diffusers' models built from the hub configs -------

_SD_UNET = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
_VQ_F4 = dict(block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
              up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, latent_channels=3,
              num_vq_embeddings=8192, vq_embed_dim=3)


def _diffusers_count(cls: str, **config) -> int:
    import diffusers
    with torch.device("meta"):
        return sum(p.numel() for p in getattr(diffusers, cls)(**config).parameters())


def _plain(channels, attention, in_channels, **extra):
    return dict(in_channels=in_channels, out_channels=3, block_out_channels=channels, layers_per_block=2,
                down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
                up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)), **extra)


@pytest.mark.parametrize("name, part, expected", [
    ("sd15-inpaint", "unet", lambda: _diffusers_count("UNet2DConditionModel", in_channels=9, **_SD_UNET)),
    ("sd2-inpaint", "unet", lambda: _diffusers_count(
        "UNet2DConditionModel", in_channels=9, **{**_SD_UNET, "cross_attention_dim": 1024},
        attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)),
    ("sd-x4-upscaler", "unet", lambda: _diffusers_count(
        "UNet2DConditionModel", in_channels=7, out_channels=4, block_out_channels=(256, 512, 512, 1024),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), cross_attention_dim=1024,
        attention_head_dim=8, num_class_embeds=1000, only_cross_attention=(True, True, True, False),
        use_linear_projection=True, layers_per_block=2)),
    ("sd-x4-upscaler", "first_stage_model", lambda: _diffusers_count(
        "AutoencoderKL", block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, latent_channels=4)),
    ("ldm-sr-4x", "unet", lambda: _diffusers_count(
        "UNet2DModel", **_plain((160, 320, 320, 640), (False, False, False, True), 6))),
    ("ldm-sr-4x", "first_stage_model", lambda: _diffusers_count("VQModel", **_VQ_F4)),
    # diffusers' DownBlock2D keeps a conv downsampler whatever downsample_type says; CompVis'
    # resblock_updown resamples level 0 by a ResBlock too: one 256-channel ResBlock in place of a conv
    ("ldm-inpaint", "unet", lambda: _diffusers_count(
        "UNet2DModel", **_plain((256, 512, 768, 1024), (False, True, True, True), 7, downsample_type="resnet",
                                upsample_type="resnet")) - (256 * 256 * 9 + 256)
        + (2 * (256 * 2 + 256 * 256 * 9 + 256) + 1024 * 256 + 256)),
    ("ldm-inpaint", "first_stage_model", lambda: _diffusers_count("VQModel", **_VQ_F4,
                                                                  mid_block_add_attention=False)),
    ("ldm-semantic", "unet", lambda: _diffusers_count("UNet2DModel", **_plain((128, 512, 1024), (False,) * 3, 6))),
    ("ldm-semantic", "cond_stage_model", lambda: 182 * 3),          # the rescaler's 1x1 conv, no bias
])
def test_presets_have_the_published_parameter_counts(name, part, expected):
    with torch.device("meta"):
        model = LatentDiffusion(preset(name))
    module = model.unet if part == "unet" else getattr(model, part)
    assert sum(p.numel() for p in module.parameters()) == expected()


def test_presets_round_trip_through_the_manifest_form():
    for name in ("sd15-inpaint", "sd2-inpaint", "sd-x4-upscaler", "ldm-sr-4x", "ldm-inpaint", "ldm-semantic"):
        config = preset(name)
        assert ModelConfig.from_dict(config.to_dict()) == config, name


@pytest.mark.parametrize("inputs, extra, words", [
    (("mask", "masked_image_latents"), dict(unet_in=8), "expected the 4 latent channels + 1 mask + 4 masked_image_latents"),
    (("masked_image_latents", "masked_image_latents"), {}, "distinct"),
    (("masked_image_latents",), {}, "needs a 'mask'"),
    (("low_res_image",), dict(paste_back=True), "paste_back"),
    (("mask",), dict(mask_keep=1.0), "both 1.0"),
    (("mask",), dict(masked_pixel=2.0), "[-1, 1]"),
    ((), {}, "distinct"),
])
def test_inconsistent_spatial_configs_are_refused(inputs, extra, words):
    base = preset("sd15-inpaint")
    unet_in = extra.pop("unet_in", None)
    with pytest.raises(ConfigError) as caught:
        spatial = SpatialConditioning(inputs=tuple(ConcatKind(k) for k in inputs), **extra)
        unet = dataclasses.replace(base.unet, in_channels=unet_in or 4 + sum(map(base.concat_channels, spatial.inputs)))
        dataclasses.replace(base, unet=unet, spatial=spatial)
    assert words in str(caught.value)


def test_rescaler_and_noise_configs_are_checked():
    config = preset("ldm-semantic")
    with pytest.raises(ConfigError, match="expected 1/4"):
        dataclasses.replace(config, spatial=dataclasses.replace(
            config.spatial, rescaler=SpatialRescalerConfig(n_stages=1)))
    with pytest.raises(ConfigError, match="multiplier"):
        SpatialRescalerConfig(multiplier=1.5)
    upscaler = preset("sd-x4-upscaler")
    with pytest.raises(ConfigError, match="num_classes > 350"):
        dataclasses.replace(upscaler, unet=dataclasses.replace(upscaler.unet, num_classes=300))
    with pytest.raises(ConfigError, match="default_noise_level"):
        LowResNoise(default_noise_level=400)


# --- the published YAMLs ----------------------------------------------------------------------

_VQ_STAGE = """
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 8192
        ddconfig: {{double_z: false, z_channels: 3, resolution: 256, in_channels: 3, out_ch: 3, ch: 128,
                   ch_mult: [1, 2, 4], num_res_blocks: 2, attn_resolutions: [], dropout: 0.0{attn}}}
        lossconfig: {{target: torch.nn.Identity}}"""
YAMLS = {
    # CompVis/latent-diffusion models/ldm/bsr_sr/config.yaml
    "ldm-sr-4x": """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0155
    timesteps: 1000
    first_stage_key: image
    cond_stage_key: LR_image
    image_size: 64
    channels: 3
    concat_mode: true
    cond_stage_trainable: false
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {image_size: 64, in_channels: 6, out_channels: 3, model_channels: 160,
               attention_resolutions: [16, 8], num_res_blocks: 2, channel_mult: [1, 2, 2, 4], num_head_channels: 32}
""" + _VQ_STAGE.format(attn="") + """
    cond_stage_config: {target: torch.nn.Identity}
""",
    # models/ldm/inpainting_big/config.yaml
    "ldm-inpaint": """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0205
    timesteps: 1000
    loss_type: l1
    first_stage_key: image
    cond_stage_key: masked_image
    image_size: 64
    channels: 3
    concat_mode: true
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {image_size: 64, in_channels: 7, out_channels: 3, model_channels: 256,
               attention_resolutions: [8, 4, 2], num_res_blocks: 2, channel_mult: [1, 2, 3, 4], num_heads: 8,
               resblock_updown: true}
""" + _VQ_STAGE.format(attn=", attn_type: none") + """
    cond_stage_config: __is_first_stage__
""",
    # models/ldm/semantic_synthesis256/config.yaml
    "ldm-semantic": """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0205
    timesteps: 1000
    loss_type: l1
    first_stage_key: image
    cond_stage_key: segmentation
    image_size: 64
    channels: 3
    concat_mode: true
    cond_stage_trainable: true
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {image_size: 64, in_channels: 6, out_channels: 3, model_channels: 128,
               attention_resolutions: [32, 16, 8], num_res_blocks: 2, channel_mult: [1, 4, 8], num_heads: 8}
""" + _VQ_STAGE.format(attn="") + """
    cond_stage_config:
      target: ldm.modules.encoders.modules.SpatialRescaler
      params: {n_stages: 2, in_channels: 182, out_channels: 3}
""",
    # Stability-AI/stablediffusion configs/stable-diffusion/x4-upscaling.yaml
    "sd-x4-upscaler": """
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentUpscaleDiffusion
  params:
    parameterization: "v"
    low_scale_key: "lr"
    linear_start: 0.0001
    linear_end: 0.02
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 128
    channels: 4
    cond_stage_trainable: false
    conditioning_key: "hybrid-adm"
    monitor: val/loss_simple_ema
    scale_factor: 0.08333
    use_ema: False
    low_scale_config:
      target: ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation
      params:
        noise_schedule_config: {linear_start: 0.0001, linear_end: 0.02}
        max_noise_level: 350
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        num_classes: 1000
        image_size: 128
        in_channels: 7
        out_channels: 4
        model_channels: 256
        attention_resolutions: [2, 4, 8]
        num_res_blocks: 2
        channel_mult: [1, 2, 2, 4]
        disable_self_attentions: [True, True, True, False]
        disable_middle_self_attn: False
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False
        use_linear_in_transformer: True
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig: {double_z: True, z_channels: 4, resolution: 256, in_channels: 3, out_ch: 3, ch: 128,
                   ch_mult: [1, 2, 4], num_res_blocks: 2, attn_resolutions: [], dropout: 0.0}
        lossconfig: {target: torch.nn.Identity}
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params: {freeze: True, layer: "penultimate"}
""",
}


def _full_size_state(config: ModelConfig) -> dict:
    with torch.device("meta"):
        return LatentDiffusion(config).state_dict()


@pytest.mark.parametrize("name", list(YAMLS))
def test_published_yamls_read_as_the_presets(name, tmp_path):
    import yaml

    expected = preset(name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(YAMLS[name])
    detection = Detection(expected.family, "openclip" if expected.conditioner else None,
                          expected.autoencoder.kind, "")
    config, _ = config_from_yaml(path, yaml.safe_load(YAMLS[name]), _full_size_state(expected), detection,
                                 {}, name)
    assert (config.unet, config.autoencoder, config.spatial) == \
        (dataclasses.replace(expected.unet, upcast_attention=config.unet.upcast_attention), expected.autoencoder,
         expected.spatial)
    assert (config.scale_factor, config.default_image_size) == (expected.scale_factor, expected.default_image_size)
    assert (config.scheduler.beta_start, config.scheduler.beta_end, config.scheduler.prediction_type) == \
        (expected.scheduler.beta_start, expected.scheduler.beta_end, expected.scheduler.prediction_type)


@pytest.mark.parametrize("name, edit, words", [
    ("ldm-sr-4x", ("concat_mode: true", "concat_mode: false"), "is concatenated, but conditioning_key is 'crossattn'"),
    ("ldm-semantic", ("{n_stages: 2, in_channels: 182, out_channels: 3}", "{n_stages: 2, in_channels: 182}"),
     "without out_channels"),
    ("ldm-semantic", ("{n_stages: 2,", "{n_stages: 2, method: lanczos,"), "method 'lanczos'"),
    ("ldm-semantic", ("n_stages: 2", "n_stages: 3"), "expected 1/4"),
    ("ldm-inpaint", ("cond_stage_key: masked_image", "cond_stage_key: depth"), "cond_stage_key 'depth'"),
    ("ldm-inpaint", ("in_channels: 7", "in_channels: 8"), "in_channels=8"),
    ("sd-x4-upscaler", ('conditioning_key: "hybrid-adm"', 'conditioning_key: "crossattn"'), "expected 'hybrid'"),
    ("sd-x4-upscaler", ("ImageConcatWithNoiseAugmentation", "Blur"), "target"),
    ("sd-x4-upscaler", ("num_classes: 1000", "num_classes: 100"), "num_classes > 350"),
])
def test_wrong_concat_yamls_are_refused_by_name(name, edit, words, tmp_path):
    import yaml

    text = YAMLS[name].replace(*edit)
    assert text != YAMLS[name]
    expected = preset(name)
    path = tmp_path / "m.yaml"
    path.write_text(text)
    detection = Detection(expected.family, "openclip" if expected.conditioner else None, expected.autoencoder.kind, "")
    with pytest.raises(CheckpointError) as caught:
        config_from_yaml(path, yaml.safe_load(text), _full_size_state(expected), detection, {}, name)
    assert words in str(caught.value) and str(path) in str(caught.value)


# --- single files: shapes alone, and a YAML beside the weights ----------------------------------

@pytest.mark.parametrize("name", ["sd15-inpaint", "ldm-sr-4x", "ldm-semantic"])
def test_concat_single_files_are_read_from_shapes(name):
    expected = preset(name)
    cleaned = clean_keys(_full_size_state(expected), name)
    detection = detect(cleaned.state, cleaned.openclip, name)
    config, assumptions = infer_config(cleaned.state, detection, {}, name, name)
    assert config.spatial == expected.spatial
    assert (config.unet.in_channels, config.autoencoder) == (expected.unet.in_channels, expected.autoencoder)


def test_an_x4_single_file_without_its_yaml_is_refused():
    cleaned = clean_keys(_full_size_state(preset("sd-x4-upscaler")), "x4")
    detection = detect(cleaned.state, cleaned.openclip, "x4")
    with pytest.raises(CheckpointError, match="x4-upscaling.yaml"):
        infer_config(cleaned.state, detection, {}, "x4", "x4")


@pytest.mark.parametrize("family", ["ldm-inpaint", "ldm-semantic"])
def test_tiny_single_file_with_its_yaml_loads_the_same_weights(family, tmp_path):
    """The paper's forms end to end: our model saved under CompVis names + its YAML -> the same model."""
    import yaml as pyyaml

    family_config = CONCAT_FAMILIES[family]       # CompVis YAMLs fix GroupNorm at 32 groups
    config = dataclasses.replace(
        family_config, unet=dataclasses.replace(family_config.unet, model_channels=32, norm_num_groups=32),
        autoencoder=dataclasses.replace(family_config.autoencoder, ch=32, norm_num_groups=32))
    model = perturb_(LatentDiffusion(config), seed=4)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(state, tmp_path / "m.safetensors")
    ae, unet = config.autoencoder, config.unet
    cond_stage = "__is_first_stage__" if family == "ldm-inpaint" else {
        "target": "ldm.modules.encoders.modules.SpatialRescaler",
        "params": {"n_stages": 2, "in_channels": config.spatial.rescaler.n_classes, "out_channels": 3}}
    document = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": config.scheduler.beta_start, "linear_end": config.scheduler.beta_end,
        "image_size": 8, "channels": 3, "concat_mode": True,
        "cond_stage_key": "masked_image" if family == "ldm-inpaint" else "segmentation",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "in_channels": unet.in_channels, "out_channels": 3, "model_channels": unet.model_channels,
            "attention_resolutions": list(unet.attention_resolutions), "num_res_blocks": unet.num_res_blocks,
            "channel_mult": list(unet.channel_mult), "num_head_channels": unet.num_head_channels,
            "num_heads": unet.num_heads,
            "resblock_updown": unet.resblock_updown}},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
            "embed_dim": 3, "n_embed": ae.n_embed, "ddconfig": {
                "double_z": False, "z_channels": 3, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": ae.ch,
                "ch_mult": list(ae.ch_mult), "num_res_blocks": ae.num_res_blocks, "attn_resolutions": [],
                **({"attn_type": "none"} if not ae.mid_attention else {})}}},
        "cond_stage_config": cond_stage}}}
    (tmp_path / "m.yaml").write_text(pyyaml.safe_dump(document))
    loaded = load_checkpoint(tmp_path / "m.safetensors", yaml=tmp_path / "m.yaml")
    assert loaded.config.spatial == config.spatial
    assert (loaded.config.unet, loaded.config.autoencoder) == (config.unet, config.autoencoder)
    for key, value in state.items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


# --- diffusers folders --------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd-inpaint", "sd-upscale", "ldm-sr"])
def test_diffusers_pipelines_save_and_load_as_the_family(family, tmp_path):
    import diffusers

    from tests.pipeline_reference import clip_tokenizer, golden_model
    from tests.reference import diffusers_autoencoder, diffusers_plain_unet
    from ldmrt.synthetic_tokenizer import write_synthetic_clip_assets

    config = CONCAT_FAMILIES[family]
    scheduler = diffusers.DDIMScheduler(beta_start=config.scheduler.beta_start, beta_end=config.scheduler.beta_end,
                                        beta_schedule="scaled_linear",
                                        prediction_type=config.scheduler.prediction_type.value)
    if family == "ldm-sr":
        unet, vae = perturb_(diffusers_plain_unet(config.unet)), perturb_(diffusers_autoencoder(config.autoencoder))
        diffusers.LDMSuperResolutionPipeline(vqvae=vae, unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "p")
        x = torch.randn(1, 6, 8, 12)
        expected = unet(x, torch.tensor([500.0])).sample
        run = lambda model: model.unet(x, torch.tensor([500.0]))        # noqa: E731
    else:
        golden = golden_model(config, seed=5)
        write_synthetic_clip_assets(tmp_path / "tok", config.conditioner.vocab_size)
        tokenizer = clip_tokenizer(tmp_path / "tok", config.conditioner)
        parts = dict(vae=golden.vae, text_encoder=golden.text_encoder, tokenizer=tokenizer, unet=golden.unet,
                     scheduler=scheduler)
        if family == "sd-inpaint":
            diffusers.StableDiffusionInpaintPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                     requires_safety_checker=False).save_pretrained(tmp_path / "p")
        else:
            low = diffusers.DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="scaled_linear")
            diffusers.StableDiffusionUpscalePipeline(**parts, low_res_scheduler=low,
                                                     max_noise_level=350).save_pretrained(tmp_path / "p")
        x = torch.randn(1, config.unet.in_channels, 8, 12)
        context = torch.randn(1, 77, config.unet.context_dim)
        labels = torch.tensor([17]) if config.unet.num_classes else None
        expected = golden.unet(x, torch.tensor([500.0]), encoder_hidden_states=context, class_labels=labels).sample
        run = lambda model: model.unet(x, torch.tensor([500.0]), context, labels)   # noqa: E731
    loaded = load_checkpoint(tmp_path / "p")
    assert loaded.config.spatial == config.spatial, loaded.config.spatial
    assert loaded.config.unet.disable_self_attentions == config.unet.disable_self_attentions
    with torch.no_grad():
        found = run(loaded.model)
    assert torch.allclose(found, expected.detach(), rtol=1e-4, atol=1e-5)


def test_a_diffusers_unet_wider_than_any_known_layout_is_refused(tmp_path):
    import diffusers

    from tests.reference import diffusers_autoencoder, diffusers_plain_unet

    config = dataclasses.replace(CONCAT_FAMILIES["ldm-sr"].unet, in_channels=5)
    unet, vae = diffusers_plain_unet(config), diffusers_autoencoder(CONCAT_FAMILIES["ldm-sr"].autoencoder)
    diffusers.LDMPipeline(vqvae=vae, unet=unet, scheduler=diffusers.DDIMScheduler()).save_pretrained(tmp_path / "p")
    with pytest.raises(CheckpointError, match="2 channels beyond the 3 latent ones"):
        load_checkpoint(tmp_path / "p")


def test_a_concat_stage_without_a_conditioning_key_is_concat_as_compvis_defaults(tmp_path):
    """LatentDiffusion's concat_mode defaults to true: a YAML naming neither key is a concat model."""
    import yaml

    text = YAMLS["ldm-sr-4x"].replace("    concat_mode: true\n", "")
    assert "concat_mode" not in text
    path = tmp_path / "sr.yaml"
    path.write_text(text)
    config, _ = config_from_yaml(path, yaml.safe_load(text), {}, Detection(preset("ldm-sr-4x").family, None,
                                                                          preset("ldm-sr-4x").autoencoder.kind, ""),
                                 {}, "sr")
    assert config.spatial == preset("ldm-sr-4x").spatial
