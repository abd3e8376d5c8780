"""The built-in model configurations by name: the released architectures at full size (random
weights unless a checkpoint is loaded into them) and `tiny` for tests and quick runs."""
from __future__ import annotations

import dataclasses

from ldmrt.config import (AutoencoderConfig, AutoencoderKind, BertConfig, ClipTextConfig, ConcatKind, ClassEmbedderConfig,
                          Family, LayerChoice, LowResNoise, ModelConfig, PredictionType, SchedulerConfig,
                          SDXL_REFINER_TIME_IDS, SDXL_TIME_IDS, SpatialConditioning, SpatialRescalerConfig,
                          UNetConfig)
from ldmrt.errors import ConfigError
from ldmrt.layout import LayoutTokenizerConfig

_SD_SCHEDULER = SchedulerConfig()
_LDM_VQ_F4 = AutoencoderConfig(kind=AutoencoderKind.VQ, embed_dim=3, z_channels=3, ch=128,
                               ch_mult=(1, 2, 4), num_res_blocks=2, n_embed=8192)
_KL_F8 = AutoencoderConfig()
_LDM_SCHEDULER = SchedulerConfig(beta_start=0.0015, beta_end=0.0195)

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny", family=Family.SD1,
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(1, 2), num_heads=2, context_dim=32),
        autoencoder=AutoencoderConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1),
        conditioner=ClipTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   pad_token_id=999, bos_token_id=998, eos_token_id=999),
        scheduler=_SD_SCHEDULER, default_image_size=64),
    "sd15": ModelConfig(
        name="sd15", family=Family.SD1, unet=UNetConfig(), autoencoder=_KL_F8,
        conditioner=ClipTextConfig(), scheduler=_SD_SCHEDULER),
    "sd21": ModelConfig(
        name="sd21", family=Family.SD2,
        unet=UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True,
                        upcast_attention=True),
        autoencoder=_KL_F8,
        conditioner=ClipTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, hidden_act="gelu",
                                   layer=LayerChoice.PENULTIMATE, pad_token_id=0),
        scheduler=SchedulerConfig(prediction_type=PredictionType.V_PREDICTION),
        default_image_size=768),
    "ldm-txt2img": ModelConfig(
        name="ldm-txt2img", family=Family.LDM, unet=UNetConfig(context_dim=1280),
        autoencoder=_KL_F8, conditioner=BertConfig(), scheduler=_SD_SCHEDULER, default_image_size=256),
    "ldm-uncond-vq": ModelConfig(
        name="ldm-uncond-vq", family=Family.LDM,
        unet=UNetConfig(in_channels=3, out_channels=3, model_channels=224, channel_mult=(1, 2, 3, 4),
                        attention_resolutions=(8, 4, 2), num_head_channels=32, context_dim=None,
                        use_spatial_transformer=False),
        autoencoder=_LDM_VQ_F4, conditioner=None, scheduler=_LDM_SCHEDULER, scale_factor=1.0,
        default_image_size=256),
    "ldm-class": ModelConfig(
        name="ldm-class", family=Family.LDM,
        unet=UNetConfig(in_channels=3, out_channels=3, model_channels=192, channel_mult=(1, 2, 3, 5),
                        attention_resolutions=(8, 4, 2), num_head_channels=32, context_dim=512),
        autoencoder=_LDM_VQ_F4, conditioner=ClassEmbedderConfig(), scheduler=_LDM_SCHEDULER,
        scale_factor=1.0, default_image_size=256),
}


_OPENCLIP_H = PRESETS["sd21"].conditioner
_SD_INPAINT = SpatialConditioning(inputs=(ConcatKind.MASK, ConcatKind.MASKED_IMAGE_LATENTS))
# The paper's concat-conditioned models (VQ-f4, no text) and SD's inpainting and x4 descendants.
PRESETS.update({
    "sd15-inpaint": dataclasses.replace(
        PRESETS["sd15"], name="sd15-inpaint", unet=dataclasses.replace(PRESETS["sd15"].unet, in_channels=9),
        spatial=_SD_INPAINT),
    # stabilityai/stable-diffusion-2-inpainting: fine-tuned from 2-base (512 px, epsilon, no upcast)
    "sd2-inpaint": dataclasses.replace(
        PRESETS["sd21"], name="sd2-inpaint",
        unet=dataclasses.replace(PRESETS["sd21"].unet, in_channels=9, upcast_attention=False),
        scheduler=_SD_SCHEDULER, default_image_size=512, spatial=_SD_INPAINT),
    # stabilityai/stable-diffusion-x4-upscaler (configs/stable-diffusion/x4-upscaling.yaml)
    "sd-x4-upscaler": ModelConfig(
        name="sd-x4-upscaler", family=Family.SD2,
        unet=UNetConfig(in_channels=7, out_channels=4, model_channels=256, channel_mult=(1, 2, 2, 4),
                        attention_resolutions=(2, 4, 8), num_heads=8, context_dim=1024,
                        use_linear_in_transformer=True, num_classes=1000,
                        disable_self_attentions=(True, True, True, False)),
        autoencoder=AutoencoderConfig(ch_mult=(1, 2, 4)), conditioner=_OPENCLIP_H,
        scheduler=SchedulerConfig(beta_start=0.0001, beta_end=0.02,
                                  prediction_type=PredictionType.V_PREDICTION),
        scale_factor=0.08333, default_image_size=512,
        spatial=SpatialConditioning(inputs=(ConcatKind.LOW_RES_IMAGE,), low_res_noise=LowResNoise())),
    # CompVis/ldm-super-resolution-4x-openimages (models/ldm/bsr_sr/config.yaml)
    "ldm-sr-4x": ModelConfig(
        name="ldm-sr-4x", family=Family.LDM,
        unet=UNetConfig(in_channels=6, out_channels=3, model_channels=160, channel_mult=(1, 2, 2, 4),
                        attention_resolutions=(16, 8), num_head_channels=32, context_dim=None,
                        use_spatial_transformer=False),
        autoencoder=_LDM_VQ_F4, conditioner=None,
        scheduler=SchedulerConfig(beta_start=0.0015, beta_end=0.0155), scale_factor=1.0,
        default_image_size=256, spatial=SpatialConditioning(inputs=(ConcatKind.LOW_RES_IMAGE,))),
    # the paper's inpainting model (models/ldm/inpainting_big/config.yaml, scripts/inpaint.py)
    "ldm-inpaint": ModelConfig(
        name="ldm-inpaint", family=Family.LDM,
        unet=UNetConfig(in_channels=7, out_channels=3, model_channels=256, channel_mult=(1, 2, 3, 4),
                        attention_resolutions=(8, 4, 2), num_heads=8, context_dim=None,
                        use_spatial_transformer=False, resblock_updown=True),
        autoencoder=dataclasses.replace(_LDM_VQ_F4, mid_attention=False), conditioner=None,
        scheduler=SchedulerConfig(beta_start=0.0015, beta_end=0.0205), scale_factor=1.0,
        default_image_size=256,
        spatial=SpatialConditioning(inputs=(ConcatKind.MASKED_IMAGE_LATENTS, ConcatKind.MASK),
                                    mask_keep=-1.0, mask_repaint=1.0, masked_pixel=-1.0, paste_back=True)),
    # the paper's semantic synthesis (models/ldm/semantic_synthesis256/config.yaml)
    "ldm-semantic": ModelConfig(
        name="ldm-semantic", family=Family.LDM,
        unet=UNetConfig(in_channels=6, out_channels=3, model_channels=128, channel_mult=(1, 4, 8),
                        attention_resolutions=(32, 16, 8), num_heads=8, context_dim=None,
                        use_spatial_transformer=False),
        autoencoder=_LDM_VQ_F4, conditioner=None,
        scheduler=SchedulerConfig(beta_start=0.0015, beta_end=0.0205), scale_factor=1.0,
        default_image_size=256,
        spatial=SpatialConditioning(inputs=(ConcatKind.SEGMENTATION,), rescaler=SpatialRescalerConfig())),
})


# the paper's layout-to-image model (models/ldm/layout2img-openimages256/config.yaml): a 16-layer
# BERT over 92 layout tokens (ldmrt.layout), cross-attention UNet with depth-3 transformers, VQ-f4
PRESETS["ldm-layout"] = ModelConfig(
    name="ldm-layout", family=Family.LDM,
    unet=UNetConfig(in_channels=3, out_channels=3, model_channels=128, channel_mult=(1, 2, 3, 4),
                    attention_resolutions=(8, 4, 2), num_head_channels=32, transformer_depth=3, context_dim=512),
    autoencoder=_LDM_VQ_F4, conditioner=BertConfig(vocab_size=8192, n_embed=512, n_layer=16, max_seq_len=92),
    scheduler=SchedulerConfig(beta_start=0.0015, beta_end=0.0205), scale_factor=1.0, default_image_size=256,
    layout=LayoutTokenizerConfig())


# Stable Diffusion XL 1.0 (stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0; SGM
# configs/inference/sd_xl_base.yaml, sd_xl_refiner.yaml). Both text encoders feed the UNet their
# penultimate layer without the final LayerNorm; the bigG encoder's pooled projection goes into the
# text_time vector with the size ids. The VAE is SD's architecture with another latent scale.
_CLIP_L_XL = ClipTextConfig(layer=LayerChoice.PENULTIMATE_HIDDEN)
_OPENCLIP_BIGG = ClipTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                num_attention_heads=20, hidden_act="gelu", layer=LayerChoice.PENULTIMATE_HIDDEN,
                                pad_token_id=0, projection_dim=1280)
# as the hub's scheduler_config.json reads: the sampler fields it leaves unset are marked defaulted
_SDXL_SCHEDULER = SchedulerConfig(default_sampler="euler", scheduler_class="EulerDiscreteScheduler",
                                  defaulted_fields=("clip_sample_range", "original_inference_steps",
                                                    "timestep_scaling"))
# transformer blocks per level (diffusers transformer_layers_per_block); the first level has no
# attention, its 1 is kept so that the config equals the one read from diffusers' config.json
_SDXL_DEPTHS = (1, 2, 10)
PRESETS.update({
    "sdxl": ModelConfig(
        name="sdxl", family=Family.SDXL,
        unet=UNetConfig(model_channels=320, channel_mult=(1, 2, 4), attention_resolutions=(4, 2),
                        num_head_channels=64, context_dim=768 + 1280, use_linear_in_transformer=True,
                        down_depths=tuple((depth,) * 2 for depth in _SDXL_DEPTHS),
                        up_depths=tuple((depth,) * 3 for depth in _SDXL_DEPTHS), middle_depth=_SDXL_DEPTHS[-1],
                        text_embeds_dim=1280, time_ids=SDXL_TIME_IDS),
        autoencoder=_KL_F8, conditioner=_CLIP_L_XL, conditioner_2=_OPENCLIP_BIGG, scheduler=_SDXL_SCHEDULER,
        scale_factor=0.13025, default_image_size=1024, force_zeros_for_empty_prompt=True),
    # the refiner: bigG alone, wider levels (384 x [1, 2, 4, 4]), depth 4, aesthetic-score time ids
    "sdxl-refiner": ModelConfig(
        name="sdxl-refiner", family=Family.SDXL_REFINER,
        unet=UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2),
                        num_head_channels=64, transformer_depth=4, context_dim=1280,
                        use_linear_in_transformer=True, text_embeds_dim=1280, time_ids=SDXL_REFINER_TIME_IDS),
        autoencoder=_KL_F8, conditioner=_OPENCLIP_BIGG, scheduler=_SDXL_SCHEDULER,
        scale_factor=0.13025, default_image_size=1024),
})


def preset(name: str) -> ModelConfig:
    """The built-in configuration called `name`."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None
