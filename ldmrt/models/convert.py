"""Diffusers / transformers state dicts -> original (CompVis) names, which our modules use.

Each function builds a name map from the config, walking the CompVis construction order,
then renames (and, where the layouts differ, reshapes) tensors. Keys left unmapped are kept
under their original names so a strict load reports them instead of dropping them silently.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from ldmrt.config import AutoencoderConfig, BertConfig, UNetConfig

StateDict = dict[str, torch.Tensor]

_RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_VAE = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
_ATTN_VAE = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             # older diffusers names
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def _rename(state: Mapping[str, torch.Tensor], prefixes: dict[str, str],
            inner: dict[str, str] | None = None) -> StateDict:
    """Rename keys whose prefix is in `prefixes`; `inner` renames the next component(s)."""
    out: StateDict = {}
    for key, value in state.items():
        new = key
        for src in sorted(prefixes, key=len, reverse=True):
            if key.startswith(src + "."):
                rest = key[len(src) + 1:]
                for a, b in sorted((inner or {}).items(), key=lambda kv: -len(kv[0])):
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
                new = f"{prefixes[src]}.{rest}"
                break
        out[new] = value
    return out


def _unet_maps(config: UNetConfig) -> tuple[dict[str, str], dict[str, str]]:
    """(diffusers ResNet prefixes -> CompVis', other diffusers module prefixes -> CompVis')."""
    levels = config.levels
    resnets: dict[str, str] = {"mid_block.resnets.0": "middle_block.0",
                               "mid_block.resnets.1": "middle_block.2"}
    others: dict[str, str] = {"time_embedding.linear_1": "time_embed.0",
                              "time_embedding.linear_2": "time_embed.2",
                              "class_embedding": "label_emb", "conv_in": "input_blocks.0.0",
                              "add_embedding.linear_1": "label_emb.0.0",     # SDXL text_time
                              "add_embedding.linear_2": "label_emb.0.2",
                              "conv_norm_out": "out.0", "conv_out": "out.2",
                              "mid_block.attentions.0": "middle_block.1"}
    block = 1
    for level in range(levels):
        for j in range(config.res_blocks(level)):
            resnets[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{block}.0"
            others[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{block}.1"
            block += 1
        if level != levels - 1 and config.resblock_updown:      # diffusers downsample_type "resnet"
            resnets[f"down_blocks.{level}.downsamplers.0"] = f"input_blocks.{block}.0"
        elif level != levels - 1:
            others[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{block}.0.op"
        block += level != levels - 1
    block = 0
    for up in range(levels):
        level = levels - 1 - up
        for j in range(config.res_blocks(level) + 1):
            resnets[f"up_blocks.{up}.resnets.{j}"] = f"output_blocks.{block}.0"
            others[f"up_blocks.{up}.attentions.{j}"] = f"output_blocks.{block}.1"
            block += 1
        position = f"output_blocks.{block - 1}.{2 if config.has_attention(level) else 1}"
        if level and config.resblock_updown:                     # diffusers upsample_type "resnet"
            resnets[f"up_blocks.{up}.upsamplers.0"] = position
        elif level:
            others[f"up_blocks.{up}.upsamplers.0.conv"] = f"{position}.conv"
    return resnets, others


def unet_from_diffusers(state: Mapping[str, torch.Tensor], config: UNetConfig) -> StateDict:
    """diffusers UNet2DConditionModel -> CompVis UNetModel names."""
    resnets, others = _unet_maps(config)
    state = _rename(state, resnets, _RESNET_UNET)
    return _rename(state, others)


def unet_diffusers_names(keys, config: UNetConfig) -> dict[str, str]:
    """The diffusers name of each CompVis UNet key (the inverse of unet_from_diffusers); keys
    diffusers has no module for are left out."""
    resnets, others = _unet_maps(config)
    inner = sorted(((ours, theirs) for theirs, ours in _RESNET_UNET.items()), key=lambda pair: -len(pair[0]))
    resnets_by_length = sorted(resnets.items(), key=lambda pair: -len(pair[1]))
    others_by_length = sorted(others.items(), key=lambda pair: -len(pair[1]))

    def name(key: str) -> str | None:
        for theirs, ours in resnets_by_length:
            if key.startswith(ours + "."):
                rest = key[len(ours) + 1:]
                part = next(((a, b) for a, b in inner if rest.startswith(a + ".")), None)
                return f"{theirs}.{rest}" if part is None else f"{theirs}.{part[1]}{rest[len(part[0]):]}"
        for theirs, ours in others_by_length:
            if key.startswith(ours + "."):
                return f"{theirs}{key[len(ours):]}"
        return None
    return {key: found for key in keys if (found := name(key)) is not None}


def autoencoder_from_diffusers(state: Mapping[str, torch.Tensor], config: AutoencoderConfig) -> StateDict:
    """diffusers AutoencoderKL / VQModel -> CompVis names (1x1 attention convs from linears)."""
    levels = len(config.ch_mult)
    resnets: dict[str, str] = {}
    attns: dict[str, str] = {}
    others: dict[str, str] = {}
    for part in ("encoder", "decoder"):
        resnets[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        resnets[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        attns[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
        others[f"{part}.conv_norm_out"] = f"{part}.norm_out"
    for level in range(levels):
        for j in range(config.num_res_blocks):
            resnets[f"encoder.down_blocks.{level}.resnets.{j}"] = f"encoder.down.{level}.block.{j}"
            attns[f"encoder.down_blocks.{level}.attentions.{j}"] = f"encoder.down.{level}.attn.{j}"
        others[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = f"encoder.down.{level}.downsample.conv"
        up = levels - 1 - level
        for j in range(config.num_res_blocks + 1):
            resnets[f"decoder.up_blocks.{up}.resnets.{j}"] = f"decoder.up.{level}.block.{j}"
            attns[f"decoder.up_blocks.{up}.attentions.{j}"] = f"decoder.up.{level}.attn.{j}"
        others[f"decoder.up_blocks.{up}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"
    state = _rename(state, resnets, _RESNET_VAE)
    state = _rename(state, attns, _ATTN_VAE)
    state = _rename(state, others)
    # diffusers stores the attention projections as linears (C, C); CompVis as 1x1 convs.
    attn_keys = (".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")
    return {k: (v[:, :, None, None] if k.endswith(attn_keys) and v.ndim == 2 else v)
            for k, v in state.items()}


def clip_from_transformers(state: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers CLIPTextModel(WithProjection) (4.x `text_model.*` or 5.x flat) -> `transformer.*`."""
    out: StateDict = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue  # a buffer some versions saved; positions are computed, not stored
        if key == "text_projection.weight":      # CLIPTextModelWithProjection's pooled projection
            out["transformer.text_projection.weight"] = value
            continue
        rest = key.removeprefix("text_model.")
        out[f"transformer.text_model.{rest}"] = value
    return out


def bert_from_diffusers(state: Mapping[str, torch.Tensor], config: BertConfig) -> StateDict:
    """diffusers LDMBertModel -> the x-transformers names of the CompVis BERTEmbedder."""
    names = {"model.embed_tokens": "transformer.token_emb",
             "model.embed_positions": "transformer.pos_emb.emb",
             "model.layer_norm": "transformer.norm", "to_logits": "transformer.to_logits"}
    for i in range(config.n_layer):
        src, attn, ff = f"model.layers.{i}", f"transformer.attn_layers.layers.{2 * i}", \
            f"transformer.attn_layers.layers.{2 * i + 1}"
        names.update({f"{src}.self_attn_layer_norm": f"{attn}.0",
                      f"{src}.self_attn.q_proj": f"{attn}.1.to_q",
                      f"{src}.self_attn.k_proj": f"{attn}.1.to_k",
                      f"{src}.self_attn.v_proj": f"{attn}.1.to_v",
                      f"{src}.self_attn.out_proj": f"{attn}.1.to_out",
                      f"{src}.final_layer_norm": f"{ff}.0",
                      f"{src}.fc1": f"{ff}.1.net.0.0", f"{src}.fc2": f"{ff}.1.net.2"})
    return _rename(state, names)


def to_diffusers(ours: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor],
                 forward: "Callable[[Mapping[str, torch.Tensor]], StateDict]") -> StateDict:
    """Inverse of a `*_from_diffusers` map: our tensors under the names (and shapes) of `template`.

    `template` is a reference model's state dict (e.g. a freshly built diffusers model) and
    `forward` the function mapping its names onto ours; every template key must be covered.
    """
    names = forward({key: torch.empty(0) for key in template})
    # forward() preserves insertion order, so the i-th output key is the i-th template key's name.
    mapping = dict(zip(template, names))
    missing = [ours_key for ours_key in mapping.values() if ours_key not in ours]
    if missing:
        raise KeyError(f"to_diffusers: {len(missing)} names have no tensor, e.g. {missing[:3]}")
    return {key: ours[name].reshape(template[key].shape).clone() for key, name in mapping.items()}
