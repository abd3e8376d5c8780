"""Tiny ModelConfigs, one per preset family, that export in seconds on a CPU.

Each mirrors the structural choices of a built-in preset (conditioner kind, CLIP layer and
activation, attention layout, autoencoder kind, prediction type) at toy widths, so the export
tests exercise every code path the real presets take.
"""
from __future__ import annotations

import dataclasses

from ldmrt.config import (AutoencoderConfig, AutoencoderKind, BertConfig, ClassEmbedderConfig,
                          ClipTextConfig, ConcatKind, Family, LayerChoice, LowResNoise, ModelConfig,
                          PredictionType, SchedulerConfig, SpatialConditioning, SpatialRescalerConfig,
                          UNetConfig, unet_from_levels)
from ldmrt.export.bundle import ModelSource, synthetic_tokenizer_writer
from ldmrt.iospec import ShapeRanges
from ldmrt.layout import LayoutTokenizerConfig
from ldmrt.models import build_model
from tests.reference import perturb_

GROUPS = 8          # norm_num_groups: every channel count below is a multiple of it
VOCAB = 1000        # >= what the synthetic CLIP (514) and WordPiece builders need

_UNET = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(2,), num_heads=2, context_dim=32, norm_num_groups=GROUPS)
_KL_F4 = AutoencoderConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_num_groups=GROUPS)
_KL_F8 = dataclasses.replace(_KL_F4, ch_mult=(1, 1, 2, 2))
_VQ_F4 = AutoencoderConfig(kind=AutoencoderKind.VQ, embed_dim=3, z_channels=3, ch=16, ch_mult=(1, 2, 2),
                           num_res_blocks=1, attn_levels=(2,), n_embed=64, norm_num_groups=GROUPS)
_CLIP = ClipTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, pad_token_id=VOCAB - 1, bos_token_id=VOCAB - 2,
                       eos_token_id=VOCAB - 1)
_LDM_SCHEDULER = SchedulerConfig(beta_start=0.0015, beta_end=0.0195)

FAMILIES: dict[str, ModelConfig] = {
    # SD 1.x: CLIP last layer + quick_gelu, heads by count, conv proj-in, KL, epsilon.
    "sd1": ModelConfig(name="fam-sd1", family=Family.SD1, unet=_UNET, autoencoder=_KL_F4,
                       conditioner=_CLIP, default_image_size=32),
    # SD 2.x: CLIP penultimate + gelu, pad id 0, fixed head dim, linear proj-in, upcast, v-prediction.
    "sd2": ModelConfig(
        name="fam-sd2", family=Family.SD2,
        unet=dataclasses.replace(_UNET, num_head_channels=8, use_linear_in_transformer=True,
                                 upcast_attention=True),
        autoencoder=_KL_F4,
        conditioner=dataclasses.replace(_CLIP, num_hidden_layers=3, hidden_act="gelu",
                                        layer=LayerChoice.PENULTIMATE, pad_token_id=0),
        scheduler=SchedulerConfig(prediction_type=PredictionType.V_PREDICTION), default_image_size=32),
    # LDM text-to-image: the BERT-like conditioner, KL f8.
    "ldm-text": ModelConfig(
        name="fam-ldm-text", family=Family.LDM, unet=_UNET, autoencoder=_KL_F8,
        conditioner=BertConfig(vocab_size=VOCAB, n_embed=32, n_layer=2, heads=2, dim_head=16),
        scheduler=_LDM_SCHEDULER, default_image_size=64),
    # LDM unconditional: no conditioner, the paper's plain self-attention blocks, VQ f4.
    "ldm-uncond-vq": ModelConfig(
        name="fam-ldm-uncond-vq", family=Family.LDM,
        unet=dataclasses.replace(_UNET, in_channels=3, out_channels=3, num_head_channels=8,
                                 context_dim=None, use_spatial_transformer=False),
        autoencoder=_VQ_F4, conditioner=None, scheduler=_LDM_SCHEDULER, scale_factor=1.0,
        default_image_size=32),
    # LDM class-conditional: the class embedder's one-token context, VQ f4.
    "ldm-class": ModelConfig(
        name="fam-ldm-class", family=Family.LDM,
        unet=dataclasses.replace(_UNET, in_channels=3, out_channels=3, num_head_channels=8),
        autoencoder=_VQ_F4, conditioner=ClassEmbedderConfig(n_classes=10, embed_dim=32),
        scheduler=_LDM_SCHEDULER, scale_factor=1.0, default_image_size=32),
    # A UNet with its own label embedding (num_classes) added to the timestep embedding.
    "unet-labels": ModelConfig(
        name="fam-unet-labels", family=Family.LDM,
        unet=dataclasses.replace(_UNET, num_classes=7, context_dim=None, use_spatial_transformer=False),
        autoencoder=_KL_F4, conditioner=None, scheduler=_LDM_SCHEDULER, default_image_size=32),
}


# SDXL: two CLIP encoders (penultimate hidden states; the second, gelu / pad 0, with the pooled
# projection), an attention-free first level, per-level ResBlocks and per-block depths, linear
# projections, the text_time vector (pooled 16 + 6 size ids), zero negatives, Euler. Not in
# FAMILIES (the int8 calibration and the runtime checks there are SD-1/2 shaped): the export
# tests add it (EXPORT_FAMILIES).
SDXL_FAMILY = ModelConfig(
    name="fam-sdxl", family=Family.SDXL,
    unet=unet_from_levels(widths=(16, 32), res_blocks=(1, 2), depths=(((1,), (1, 2)), ((1, 1), (2, 1, 2)), 2),
                          level_heads=(1, 4), model_channels=16, attention_resolutions=(2,), context_dim=56,
                          use_linear_in_transformer=True, norm_num_groups=GROUPS, text_embeds_dim=16,
                          time_ids=6, time_id_dim=8),
    autoencoder=_KL_F4, conditioner=dataclasses.replace(_CLIP, layer=LayerChoice.PENULTIMATE_HIDDEN),
    conditioner_2=dataclasses.replace(_CLIP, hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                                      hidden_act="gelu", pad_token_id=0, layer=LayerChoice.PENULTIMATE_HIDDEN,
                                      projection_dim=16),
    scheduler=SchedulerConfig(default_sampler="euler", scheduler_class="EulerDiscreteScheduler"),
    force_zeros_for_empty_prompt=True, default_image_size=32)
EXPORT_FAMILIES: dict[str, ModelConfig] = {**FAMILIES, "sdxl": SDXL_FAMILY}


_VQ_F4_PLAIN = dataclasses.replace(_VQ_F4, attn_levels=())     # as diffusers' VQModel can hold it
_PLAIN_UNET = dataclasses.replace(_UNET, out_channels=3, num_head_channels=8, context_dim=None,
                                  use_spatial_transformer=False)
# Concatenation-conditioned models (ldmrt.config.SpatialConditioning), one per preset kind.
CONCAT_FAMILIES: dict[str, ModelConfig] = {
    # SD inpainting: text + [z, mask {0,1}, masked-image latents], KL.
    "sd-inpaint": dataclasses.replace(
        FAMILIES["sd1"], name="fam-sd-inpaint", unet=dataclasses.replace(_UNET, in_channels=9),
        spatial=SpatialConditioning(inputs=(ConcatKind.MASK, ConcatKind.MASKED_IMAGE_LATENTS))),
    # SD x4 upscaler: text + [z, noised low-res image], noise level as class label, cross-attention
    # only at level 0, v-prediction, KL.
    "sd-upscale": dataclasses.replace(
        FAMILIES["sd2"], name="fam-sd-upscale",
        unet=dataclasses.replace(FAMILIES["sd2"].unet, in_channels=7, num_classes=360,
                                 disable_self_attentions=(True, False), attention_resolutions=(1, 2)),
        scale_factor=0.08333, spatial=SpatialConditioning(inputs=(ConcatKind.LOW_RES_IMAGE,),
                                                          low_res_noise=LowResNoise())),
    # LDM super-resolution: [z, low-res image], no text, VQ.
    "ldm-sr": ModelConfig(
        name="fam-ldm-sr", family=Family.LDM, unet=dataclasses.replace(_PLAIN_UNET, in_channels=6),
        autoencoder=_VQ_F4_PLAIN, conditioner=None, scheduler=_LDM_SCHEDULER, scale_factor=1.0,
        default_image_size=32, spatial=SpatialConditioning(inputs=(ConcatKind.LOW_RES_IMAGE,))),
    # The paper's inpainting: [z, masked-image latents, mask {-1,+1}], ResBlock resampling, VQ
    # without attention, paste-back.
    "ldm-inpaint": ModelConfig(
        name="fam-ldm-inpaint", family=Family.LDM,
        unet=dataclasses.replace(_PLAIN_UNET, in_channels=7, resblock_updown=True, attention_resolutions=(1, 2)),
        autoencoder=dataclasses.replace(_VQ_F4_PLAIN, mid_attention=False), conditioner=None,
        scheduler=_LDM_SCHEDULER, scale_factor=1.0, default_image_size=32,
        spatial=SpatialConditioning(inputs=(ConcatKind.MASKED_IMAGE_LATENTS, ConcatKind.MASK), mask_keep=-1.0,
                                    masked_pixel=-1.0, paste_back=True)),
    # Semantic synthesis: [z, SpatialRescaler(one-hot map)], VQ.
    "ldm-semantic": ModelConfig(
        name="fam-ldm-semantic", family=Family.LDM, unet=dataclasses.replace(_PLAIN_UNET, in_channels=6),
        autoencoder=_VQ_F4_PLAIN, conditioner=None, scheduler=_LDM_SCHEDULER, scale_factor=1.0,
        default_image_size=32,
        spatial=SpatialConditioning(inputs=(ConcatKind.SEGMENTATION,),
                                    rescaler=SpatialRescalerConfig(n_classes=12))),
}


# The paper's layout-to-image model at toy widths: a BERT over 4 boxes' layout tokens (a 14 x 14
# grid of a 200-token vocabulary, 10 named classes, crop encoded: 14 tokens), VQ f4.
_LAYOUT = LayoutTokenizerConfig(vocab_size=200, max_objects=4, n_classes=10,
                                classes=tuple(f"digit {d}" for d in range(10)))
LAYOUT_FAMILY = ModelConfig(
    name="fam-ldm-layout", family=Family.LDM,
    unet=dataclasses.replace(_UNET, in_channels=3, out_channels=3, attention_resolutions=(1, 2)),
    autoencoder=_VQ_F4_PLAIN, conditioner=BertConfig(vocab_size=200, n_embed=32, n_layer=2, heads=2, dim_head=16,
                                                     max_seq_len=_LAYOUT.max_length),
    scheduler=_LDM_SCHEDULER, scale_factor=1.0, default_image_size=32, layout=_LAYOUT)


def shape_ranges(config: ModelConfig) -> ShapeRanges:
    """Latent sides 4..12 (opt 8), up to 3 images per call (6 for the guided UNet)."""
    f = config.downsampling_factor
    return ShapeRanges(min_size=4 * f, opt_size=8 * f, max_size=12 * f, max_batch=3, opt_batch=1)


def model_source(config: ModelConfig, seed: int = 0) -> ModelSource:
    """`config` with random weights (norm affines perturbed off 1/0) and synthetic tokenizer assets."""
    model = perturb_(build_model(config, seed=seed), seed=seed, scale=0.05)
    return ModelSource(model=model, source=f"test:{config.name}", random_weights=True,
                       write_tokenizer=None if config.is_layout_conditioned else
                       synthetic_tokenizer_writer(config.conditioner))


def export_small_tiny(out):
    """The `tiny` preset as many tests use it: text encoder, UNet, VAE decoder, 32..64 px, at most
    2 images per call, not validated (test_export.py covers parity). Returns the bundle folder."""
    from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source

    export_bundle(preset_source("tiny"), out, ExportOptions(
        components=("text_encoder", "unet", "vae_decoder"), validate=False,
        shape_ranges=ShapeRanges(min_size=32, opt_size=32, max_size=64, max_batch=2)))
    return out
