"""diffusers' UNet configs <-> UNetConfig, both ways, and UNet2DModel's attention weights.

Every UNet2DConditionModel config that diffusers' SD / SDXL pipelines run maps onto UNetConfig's
per-level form; options ldmrt's modules do not implement fail by the field's name (the list:
docs/checkpoints.md).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ldmrt.config import SDXL_TIME_IDS, UNetConfig, unet_from_levels
from ldmrt.errors import CheckpointError, ConfigError
from ldmrt.checkpoints.diffusers_json import class_name, get_value, integer, per_level, require_defaults
from ldmrt.checkpoints.state import StateDict

UNETS = ("UNet2DConditionModel", "UNet2DModel")

# diffusers options ldmrt's UNet implements only at these values
_UNET_FIXED = {"center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
               "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
               "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
               "time_embedding_dim": None, "class_embed_type": None}
_UNET_COND_FIXED = {"encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
                    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
                    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
                    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
                    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
                    "cross_attention_norm": None}
_UNET_PLAIN_FIXED = {"mid_block_type": "UNetMidBlock2D", "add_attention": True}
_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)
_ADDITIONS = (None, "text_time")


def unet_config_from_diffusers(cfg: Mapping[str, Any], where: str, time_ids: int = SDXL_TIME_IDS) -> UNetConfig:
    """UNet2DConditionModel (spatial transformers) or UNet2DModel (plain attention) -> UNetConfig.

    `time_ids`: how many SDXL time ids the pipeline passes with `addition_embed_type` "text_time"
    (6; the refiner's img2img pipeline with requires_aesthetics_score: 5); the rest of the
    vector is the pooled text embedding."""
    kind = class_name(cfg) or "UNet2DConditionModel"
    if kind not in UNETS:
        raise CheckpointError(f"{where}: UNet class {kind!r} is not supported; expected one of {list(UNETS)}")
    conditional = kind == "UNet2DConditionModel"
    require_defaults(cfg, {**_UNET_FIXED, **(_UNET_COND_FIXED if conditional else _UNET_PLAIN_FIXED)}, where)
    if not conditional and cfg.get("attn_norm_num_groups") not in (None, cfg.get("norm_num_groups", 32)):
        raise CheckpointError(f"{where}: attn_norm_num_groups differs from norm_num_groups; not supported")
    channels = [integer(c, "block_out_channels", where, 1) for c in get_value(cfg, "block_out_channels", where, list)]
    attention = _attention_levels(cfg, len(channels), conditional, where)
    levels = len(channels)
    res_blocks = per_level(cfg.get("layers_per_block", 2), levels, "layers_per_block", where, minimum=1)
    resnet_resample = _resnet_resampling(cfg, attention, where)
    fields: dict[str, Any] = dict(
        in_channels=integer(cfg.get("in_channels", 4), "in_channels", where, 1),
        out_channels=integer(cfg.get("out_channels", 4), "out_channels", where, 1),
        attention_resolutions=tuple(2 ** i for i, a in reversed(list(enumerate(attention))) if a),
        use_spatial_transformer=conditional, norm_num_groups=cfg.get("norm_num_groups", 32),
        num_classes=cfg.get("num_class_embeds"), resblock_updown=resnet_resample)
    if conditional:
        fields.update(_conditional_fields(cfg, levels, res_blocks, attention, time_ids, where))
        key = "num_attention_heads" if cfg.get("num_attention_heads") else "attention_head_dim"
        # `attention_head_dim` is historically the number of heads per level here
        fields["level_heads"] = per_level(cfg.get(key, 8), levels, key, where, minimum=1)
    else:   # UNet2DModel: attention_head_dim really is the head size
        dim = cfg.get("attention_head_dim", 8)
        fields["context_dim"] = None
        fields.update({"num_heads": 1, "num_head_channels": -1} if dim is None else
                      {"num_heads": 8, "num_head_channels": integer(dim, "attention_head_dim", where, 1)})
    try:
        return unet_from_levels(widths=channels, res_blocks=res_blocks, **fields)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def _attention_levels(cfg: Mapping[str, Any], levels: int, conditional: bool, where: str) -> list[bool]:
    down = list(get_value(cfg, "down_block_types", where, list))
    up = list(get_value(cfg, "up_block_types", where, list))
    attention_down = {"CrossAttnDownBlock2D" if conditional else "AttnDownBlock2D": True, "DownBlock2D": False}
    attention_up = {"CrossAttnUpBlock2D" if conditional else "AttnUpBlock2D": True, "UpBlock2D": False}
    if not (levels == len(down) == len(up)) or any(t not in attention_down for t in down) \
            or any(t not in attention_up for t in up):
        raise CheckpointError(f"{where}: down_block_types {down} / up_block_types {up} for {levels} levels "
                              f"are not supported; expected {sorted(attention_down)} down and the mirror up")
    attention = [attention_down[t] for t in down]
    if [attention_up[t] for t in reversed(up)] != attention:
        raise CheckpointError(f"{where}: up_block_types {up} do not mirror down_block_types {down}")
    return attention


def _resnet_resampling(cfg: Mapping[str, Any], attention: list[bool], where: str) -> bool:
    resample = {(cfg.get("downsample_type", "conv"), cfg.get("upsample_type", "conv"))}
    if resample - {("conv", "conv"), ("resnet", "resnet")}:
        raise CheckpointError(f"{where}: downsample_type / upsample_type {sorted(resample)[0]}: expected both "
                              f"'conv' or both 'resnet'")
    resnet = resample == {("resnet", "resnet")}
    # DownBlock2D (no attention) keeps a conv downsampler whatever downsample_type says
    if resnet and not all(attention[:-1]):
        raise CheckpointError(f"{where}: downsample_type 'resnet' with attention-free levels (DownBlock2D "
                              f"keeps a conv there); CompVis' resblock_updown resamples every level by ResBlocks")
    return resnet


def _conditional_fields(cfg: Mapping[str, Any], levels: int, res_blocks: list[int], attention: list[bool],
                        time_ids: int, where: str) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        context_dim=_context_dim(cfg, levels, where),
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
        upcast_attention=bool(cfg.get("upcast_attention", False)))
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in _MID_BLOCKS:
        raise CheckpointError(f"{where}: mid_block_type={mid!r} is not supported; expected one of {list(_MID_BLOCKS)}")
    fields["middle_block"] = mid is not None
    cross_only = cfg.get("only_cross_attention", False)
    # a bool also reaches diffusers' middle block only as mid_block_only_cross_attention, which
    # UNetMidBlock2DCrossAttn does not take: the middle block keeps its self-attention
    flags = [cross_only] * levels if isinstance(cross_only, bool) else cross_only
    if not isinstance(flags, list) or len(flags) != levels or not all(isinstance(f, bool) for f in flags):
        raise CheckpointError(f"{where}: only_cross_attention={cross_only!r}: expected a bool or one per level")
    if any(flags[i] for i in range(levels) if attention[i]):
        fields["disable_self_attentions"] = tuple(flags)
    fields.update(_depths(cfg, res_blocks, attention, where))
    fields.update(_addition(cfg, time_ids, where))
    return fields


def _context_dim(cfg: Mapping[str, Any], levels: int, where: str) -> int:
    value = cfg.get("cross_attention_dim", 1280)
    if isinstance(value, (list, tuple)):
        values = per_level(value, levels, "cross_attention_dim", where, minimum=1)
        if len(set(values)) != 1:
            raise CheckpointError(f"{where}: cross_attention_dim={values}: a context width per level is not "
                                  f"supported (one text encoder feeds every level)")
        value = values[0]
    return integer(value, "cross_attention_dim", where, 1)


def _depths(cfg: Mapping[str, Any], res_blocks: list[int], attention: list[bool], where: str) -> dict[str, Any]:
    """transformer_layers_per_block (int, per level, or per level and ResNet) and its up-path
    mirror reverse_transformer_layers_per_block -> UNetConfig's depth fields. Attention-free
    levels ignore their entries, as diffusers' DownBlock2D / UpBlock2D do (depth 1 recorded)."""
    levels = len(res_blocks)
    key, value = "transformer_layers_per_block", cfg.get("transformer_layers_per_block", 1)
    entries = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(entries) != levels:
        raise CheckpointError(f"{where}: {key}={value!r}: expected one entry per level ({levels})")
    down = tuple(_blocks(e, res_blocks[i], key, where) if attention[i] else (1,) * res_blocks[i]
                 for i, e in enumerate(entries))
    reverse = cfg.get("reverse_transformer_layers_per_block")
    if reverse is None:
        if any(isinstance(e, (list, tuple)) for e in entries):
            raise CheckpointError(f"{where}: {key}={value!r} lists depths per ResNet; diffusers then needs "
                                  f"reverse_transformer_layers_per_block for the up blocks, found none")
        up = tuple(_blocks(e, res_blocks[i] + 1, key, where) if attention[i] else (1,) * (res_blocks[i] + 1)
                   for i, e in enumerate(entries))
    else:
        if not isinstance(reverse, (list, tuple)) or len(reverse) != levels:
            raise CheckpointError(f"{where}: reverse_transformer_layers_per_block={reverse!r}: expected one "
                                  f"entry per up block ({levels})")
        up = tuple(_blocks(reverse[levels - 1 - i], res_blocks[i] + 1, "reverse_transformer_layers_per_block",
                           where) if attention[i] else (1,) * (res_blocks[i] + 1) for i in range(levels))
    middle = entries[-1][0] if isinstance(entries[-1], (list, tuple)) else entries[-1]
    return {"depths": (down, up, middle)}


def _blocks(entry: Any, count: int, key: str, where: str) -> tuple[int, ...]:
    if isinstance(entry, (list, tuple)):
        if len(entry) != count:
            raise CheckpointError(f"{where}: {key} entry {list(entry)}: expected {count} depths (one per ResNet)")
        return tuple(integer(d, key, where) for d in entry)
    return (integer(entry, key, where),) * count


def _addition(cfg: Mapping[str, Any], time_ids: int, where: str) -> dict[str, Any]:
    addition = cfg.get("addition_embed_type")
    if addition not in _ADDITIONS:
        raise CheckpointError(f"{where}: addition_embed_type={addition!r} is not supported; expected one of "
                              f"{list(_ADDITIONS)}")
    projection = cfg.get("projection_class_embeddings_input_dim")
    if addition is not None and cfg.get("num_class_embeds") is not None:
        raise CheckpointError(f"{where}: num_class_embeds with addition_embed_type {addition!r}: not supported "
                              f"(no diffusers pipeline passes both class labels and SDXL's added conditioning)")
    if addition is None:
        if projection is not None:
            raise CheckpointError(f"{where}: projection_class_embeddings_input_dim={projection!r} without "
                                  f"addition_embed_type 'text_time' or class_embed_type: not supported")
        return {}
    width = integer(projection, "projection_class_embeddings_input_dim", where, 1)
    id_dim = integer(cfg.get("addition_time_embed_dim"), "addition_time_embed_dim", where, 1)
    text = width - time_ids * id_dim
    if text < 1:
        raise CheckpointError(f"{where}: projection_class_embeddings_input_dim={width} leaves no pooled text "
                              f"embedding after {time_ids} time ids of addition_time_embed_dim={id_dim}")
    return {"text_embeds_dim": text, "time_ids": time_ids, "time_id_dim": id_dim}


def diffusers_unet_config(config: UNetConfig) -> dict[str, Any]:
    """The UNet2DConditionModel keyword arguments of the same model (the inverse of
    unet_config_from_diffusers), in the plainest form diffusers writes (an int where every level
    agrees): diffusers' reference for tests and `ldmrt bench`."""
    levels = range(config.levels)
    attention = [config.has_attention(level) for level in levels]
    heads = [config.heads_and_dim(level)[0] if attention[level] or level == levels[-1] else 1
             for level in levels]
    down = [tuple(config.depth(level, block) for block in range(config.res_blocks(level))) for level in levels]
    up = [tuple(config.depth(level, block, up=True) for block in range(config.res_blocks(level) + 1))
          for level in levels]
    if config.middle_block and config.depth(None) != (down[-1] or (0,))[0]:
        raise ValueError("diffusers_unet_config: diffusers' middle block takes the last level's depth; "
                         f"this config's is {config.depth(None)}")
    kwargs: dict[str, Any] = dict(
        in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        block_out_channels=tuple(config.width(level) for level in levels),
        layers_per_block=_plain([config.res_blocks(level) for level in levels]),
        cross_attention_dim=config.context_dim, attention_head_dim=_plain(heads),
        use_linear_projection=config.use_linear_in_transformer, upcast_attention=config.upcast_attention,
        num_class_embeds=config.num_classes, only_cross_attention=tuple(config.disable_self_attentions) or False,
        norm_num_groups=config.norm_num_groups,
        mid_block_type="UNetMidBlock2DCrossAttn" if config.middle_block else None)
    per_level = [d[0] if d else 0 for d in down]
    if all(len(set(d + u)) == 1 and d[0] == u[0] for d, u in zip(down, up) if d):
        kwargs["transformer_layers_per_block"] = _plain(per_level)
    else:
        kwargs.update(transformer_layers_per_block=tuple(down),
                      reverse_transformer_layers_per_block=tuple(reversed(up)))
    if config.time_ids:
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=config.time_id_dim,
                      projection_class_embeddings_input_dim=config.adm_in_channels)
    return kwargs


def _plain(values: list[int]) -> int | tuple[int, ...]:
    return values[0] if len(set(values)) == 1 else tuple(values)


def legacy_attention_from_diffusers(state: Mapping[str, torch.Tensor], config: UNetConfig) -> StateDict:
    """UNet2DModel attention (to_q/to_k/to_v/to_out.0, group_norm) -> CompVis AttentionBlock
    (norm, qkv and proj_out as 1x1 Conv1d; qkv channels ordered [head][q|k|v][d])."""
    out = dict(state)
    names = {"to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v", "value": "v"}
    prefixes = {k.rsplit(".", 2)[0] for k in state
                if k.count(".") >= 2 and k.rsplit(".", 2)[1] in ("to_q", "query")}
    for prefix in sorted(prefixes):
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for src, dst in names.items():
            for param in ("weight", "bias"):
                key = f"{prefix}.{src}.{param}"
                if key in out:
                    parts.setdefault(param, {})[dst] = out.pop(key)
        for param, qkv in parts.items():
            if set(qkv) != {"q", "k", "v"}:
                raise CheckpointError(f"unet: attention {prefix} lacks some of q/k/v {param}s")
            channels = qkv["q"].shape[0]
            heads = config.heads_and_dim(_level(prefix, config))[0]
            stacked = torch.stack([qkv[n].reshape(heads, channels // heads, -1) for n in "qkv"], dim=1)
            out[f"{prefix}.qkv.{param}"] = (stacked.reshape(3 * channels, channels, 1) if param == "weight"
                                            else stacked.reshape(3 * channels))
        for src, dst in (("to_out.0", "proj_out"), ("proj_attn", "proj_out"), ("group_norm", "norm")):
            for param in ("weight", "bias"):
                key = f"{prefix}.{src}.{param}"
                if key in out:
                    value = out.pop(key)
                    if dst == "proj_out" and value.ndim == 2:
                        value = value[:, :, None]                  # linear (C, C) -> Conv1d (C, C, 1)
                    out[f"{prefix}.{dst}.{param}"] = value
    return out


def _level(prefix: str, config: UNetConfig) -> int | None:
    """The level of a diffusers attention module's name (None: the middle block)."""
    part, index = prefix.split(".")[:2]
    if part == "down_blocks":
        return int(index)
    if part == "up_blocks":
        return config.levels - 1 - int(index)
    return None
