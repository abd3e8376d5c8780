"""ModelConfig -> the CompVis inference YAML its LatentDiffusion would take: what the built-in
models ship beside their weights, and the inverse of ldmrt.checkpoints.yaml_config (which reads it back)."""
from __future__ import annotations

from ldmrt.config import AutoencoderKind, BertConfig, ConcatKind, ModelConfig

_DDPM = "ldm.models.diffusion.ddpm."
_BUILDER = "taming.data.conditional_builder.objects_bbox.ObjectsBoundingBoxConditionalBuilder"


def _concat_form(config: ModelConfig) -> tuple[str, str, dict]:
    """(model target, conditioning_key, extra model.params) for the model's concatenated maps, in the
    forms of Stability's code: LatentInpaintDiffusion (mask + masked image), LatentUpscaleFinetuneDiffusion
    (a low-res image at latent size)."""
    spatial = config.spatial
    if spatial is None:
        return _DDPM + "LatentDiffusion", "crossattn", {}
    if list(spatial.inputs) == [ConcatKind.MASK, ConcatKind.MASKED_IMAGE_LATENTS] and spatial.mask_keep == 0.0:
        return _DDPM + "LatentInpaintDiffusion", "hybrid", {"concat_keys": ["mask", "masked_image"],
                                                           "masked_image_key": "masked_image"}
    if list(spatial.inputs) == [ConcatKind.LOW_RES_IMAGE] and spatial.low_res_noise is None:
        return _DDPM + "LatentUpscaleFinetuneDiffusion", "hybrid", {"concat_keys": ["lr"]}
    raise ValueError(f"compvis_yaml: no YAML form written for {config.name!r}'s maps {spatial}")


def compvis_yaml(config: ModelConfig) -> dict:
    """The inference YAML CompVis' LatentDiffusion would take for `config` (ldmrt reads it back)."""
    unet, ae, cond = config.unet, config.autoencoder, config.conditioner
    latent_size = config.default_image_size // config.downsampling_factor
    target, conditioning_key, extra = _concat_form(config)
    if isinstance(cond, BertConfig):
        cond_stage = {"target": "ldm.modules.encoders.modules.BERTEmbedder",
                      "params": {"n_embed": cond.n_embed, "n_layer": cond.n_layer, "vocab_size": cond.vocab_size,
                                 "max_seq_len": cond.max_seq_len}}
        key = "caption"
        if config.layout is not None:     # the paper's layout2img form: tokens straight into the transformer
            cond_stage["params"]["use_tokenizer"] = False
            key = "coordinates_bbox"
    else:
        cond_stage = {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                      "params": {"n_classes": cond.n_classes, "embed_dim": cond.embed_dim, "key": "class_label"}}
        key = "class_label"
    ae_target = "ldm.models.autoencoder.AutoencoderKL" if ae.kind == AutoencoderKind.KL else \
        "ldm.models.autoencoder.VQModelInterface"
    ae_params = {"embed_dim": ae.embed_dim, "ddconfig": {
        "double_z": ae.double_z, "z_channels": ae.z_channels, "resolution": config.default_image_size,
        "in_channels": ae.in_channels, "out_ch": ae.out_ch, "ch": ae.ch, "ch_mult": list(ae.ch_mult),
        "num_res_blocks": ae.num_res_blocks,
        "attn_resolutions": [config.default_image_size // 2 ** level for level in ae.attn_levels], "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}
    if ae.kind == AutoencoderKind.VQ:
        ae_params["n_embed"] = ae.n_embed
    return {"model": {
        "base_learning_rate": 5.0e-4, "target": target,
        "params": {
            "linear_start": config.scheduler.beta_start, "linear_end": config.scheduler.beta_end,
            "timesteps": config.scheduler.num_train_timesteps, "beta_schedule": "linear",
            "parameterization": "eps", "first_stage_key": "image", "cond_stage_key": key,
            "image_size": latent_size, "channels": ae.embed_dim, "cond_stage_trainable": True,
            "conditioning_key": conditioning_key, "scale_factor": float(config.scale_factor), "use_ema": False,
            **extra,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
                "image_size": latent_size, "in_channels": unet.in_channels, "out_channels": unet.out_channels,
                "model_channels": unet.model_channels, "attention_resolutions": list(unet.attention_resolutions),
                "num_res_blocks": unet.num_res_blocks, "channel_mult": list(unet.channel_mult),
                "num_heads": unet.num_heads, **({"num_head_channels": unet.num_head_channels}
                                               if unet.num_head_channels != -1 else {}),
                "use_spatial_transformer": unet.use_spatial_transformer,
                "transformer_depth": unet.transformer_depth, "context_dim": unet.context_dim}},
            "first_stage_config": {"target": ae_target, "params": ae_params},
            "cond_stage_config": cond_stage}}, **_layout_data(config)}


def _layout_data(config: ModelConfig) -> dict:
    """A layout model's `data` section: the token builder, taming's ObjectsBoundingBoxConditionalBuilder,
    with its constructor's arguments (the YAML reader takes the class count from it)."""
    layout = config.layout
    if layout is None:
        return {}
    builder = {"no_object_classes": layout.n_classes, "no_max_objects": layout.max_objects,
               "no_tokens": layout.vocab_size, "encode_crop": layout.encode_crop,
               "use_group_parameter": False, "use_additional_parameters": False}
    return {"data": {"params": {"train": {"target": _BUILDER, "params": builder}}}}
