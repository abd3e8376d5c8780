"""Original (CompVis) single-file checkpoints: recognise the keys, detect the family, convert
OpenCLIP names, drop the known training-only entries, and infer the architecture from shapes.

Attention head counts are not stored in the weights: inference takes the values of the released
models of the detected family and says so; a preset or the original YAML overrides them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import torch

from ldmrt.config import (AutoencoderConfig, AutoencoderKind, BertConfig, ClassEmbedderConfig,
                          ClipTextConfig, Family, LayerChoice, SDXL_REFINER_TIME_IDS, SDXL_TIME_IDS,
                          UNetConfig, unet_from_levels)
from ldmrt.errors import CheckpointError, ConfigError
from ldmrt.checkpoints.openclip import openclip_text_to_transformers
from ldmrt.checkpoints.state import StateDict, names, plural

UNET = "model.diffusion_model."
VAE = "first_stage_model."
COND = "cond_stage_model."
CLIP = COND + "transformer.text_model."
OPENCLIP = COND + "model."
BERT = COND + "transformer."
EMA = "model_ema."
SGM = "conditioner.embedders."      # Stability's generative-models (SDXL) conditioner
CLIP_2 = "cond_stage_model_2.transformer.text_model."   # SDXL base's bigG, under ldmrt's own prefix

# LatentDiffusion's noise-schedule buffers (recomputed from the schedule; `betas` is read to detect it)
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights", "scale_factor",
    "cond_ids", "shift_factor"})


@dataclass(frozen=True)
class Detection:
    family: Family
    # "clip", "openclip", "sdxl", "sdxl_refiner", "bert", "class", "rescaler" or None (unconditional)
    conditioner: str | None
    autoencoder: AutoencoderKind
    evidence: str


@dataclass
class Cleaned:
    state: StateDict                 # model weights only, CompVis/ldmrt names
    betas: torch.Tensor | None
    scale_factor: float | None
    ema_state: StateDict             # model_ema.* (which UNet set loads: single_file.choose_unet_weights)
    openclip: bool                   # the text encoder came with OpenCLIP names (SD 2.x)
    notes: list[str]
    xl: str | None = None            # "sdxl" / "sdxl_refiner": SGM conditioner.embedders.* names converted


def clean_keys(tensors: Mapping[str, torch.Tensor], where: str) -> Cleaned:
    """Split off buffers and EMA weights, convert OpenCLIP names; drop nothing silently."""
    if not any(k.startswith((UNET, EMA)) for k in tensors):
        raise CheckpointError(f"{where}: no model.diffusion_model.* keys, so not an original (CompVis) "
                              f"LDM checkpoint; {_kind_hint(tensors)}")
    notes: list[str] = []
    state: StateDict = {}
    ema: StateDict = {}
    buffers: dict[str, torch.Tensor] = {}
    dropped: dict[str, list[str]] = {}
    for key, value in tensors.items():
        if key in SCHEDULE_BUFFERS:
            buffers[key] = value
        elif key.startswith(EMA):
            ema[key] = value
        elif key.endswith(".position_ids") or key.endswith(".attn_mask"):
            dropped.setdefault("position_ids/attn_mask buffers (computed, not learned)", []).append(key)
        elif key.startswith(VAE + "loss."):
            dropped.setdefault("first_stage_model.loss.* (training-only loss networks)", []).append(key)
        else:
            state[key] = value
    if buffers:
        notes.append(f"dropped {plural(len(buffers), 'noise-schedule buffer')} ({', '.join(sorted(buffers))}); "
                     f"the schedule is recomputed from the scheduler config")
    for reason, keys in dropped.items():
        notes.append(f"dropped {plural(len(keys), 'key')}: {reason}")
    openclip = any(k.startswith(OPENCLIP + "transformer.resblocks.") for k in state)
    if openclip:
        state, openclip_notes = openclip_text_to_transformers(state, OPENCLIP, CLIP, keep_projection=False)
        notes += openclip_notes
    legacy = COND + "transformer.embeddings."           # old transformers CLIP layout, no text_model.
    if any(k.startswith(legacy) or k.startswith(COND + "transformer.encoder.") for k in state) \
            and not any(k.startswith(CLIP) for k in state):
        state = {(CLIP + k[len(COND + "transformer."):] if k.startswith(COND + "transformer.") else k): v
                 for k, v in state.items()}
        notes.append("old transformers CLIP names (no text_model.) renamed")
    xl = _sdxl_kind(state)
    if xl is not None:
        state, xl_notes = sdxl_text_to_ldmrt(state, xl)
        notes += xl_notes
    betas = buffers.get("betas")
    scale = buffers.get("scale_factor")
    scale_factor = float(scale) if scale is not None and scale.numel() == 1 else None
    return Cleaned(state, betas, scale_factor, ema, openclip, notes, xl)


def _sdxl_kind(state: Mapping[str, torch.Tensor]) -> str | None:
    """SDXL's SGM text encoders (diffusers' is_open_clip_sdxl(_refiner)_model keys): the base has CLIP
    ViT-L at embedders.0 and bigG at embedders.1; the refiner bigG alone at embedders.0."""
    if any(k.startswith(SGM + "1.model.transformer.resblocks.") for k in state):
        return "sdxl"
    if any(k.startswith(SGM + "0.model.transformer.resblocks.") for k in state):
        return "sdxl_refiner"
    return None


def sdxl_text_to_ldmrt(state: Mapping[str, torch.Tensor], kind: str) -> tuple[StateDict, list[str]]:
    """SGM's conditioner.embedders.* -> cond_stage_model(_2).transformer.*: CLIP-L as it is (HF
    names), bigG through the OpenCLIP converter keeping its projection (the pooled embedding)."""
    if kind == "sdxl":
        clip = SGM + "0.transformer.text_model."
        state = {(CLIP + k[len(clip):] if k.startswith(clip) else k): v for k, v in state.items()}
        state, notes = openclip_text_to_transformers(state, SGM + "1.model.", CLIP_2, keep_projection=True)
    else:
        state, notes = openclip_text_to_transformers(state, SGM + "0.model.", CLIP, keep_projection=True)
    return state, [f"SDXL{' refiner' if kind == 'sdxl_refiner' else ''}: conditioner.embedders.* renamed"] + notes


def detect(state: Mapping[str, torch.Tensor], openclip: bool, where: str, xl: str | None = None) -> Detection:
    """The family from the conditioner's keys (and the UNet's proj_in), the autoencoder kind."""
    has = lambda prefix: any(k.startswith(prefix) for k in state)  # noqa: E731
    vq = VAE + "quantize.embedding.weight" in state
    autoencoder = AutoencoderKind.VQ if vq else AutoencoderKind.KL
    linear = any(k.startswith(UNET) and k.endswith(".proj_in.weight") and state[k].ndim == 2 for k in state)
    proj = "linear proj_in (2.x style)" if linear else "conv proj_in" if has(UNET) and any(
        k.endswith(".proj_in.weight") for k in state) else "no spatial transformers"
    ae = "VQ autoencoder (first_stage_model.quantize.*)" if vq else "KL autoencoder"
    if xl is not None:
        conditioner = xl
    elif has(CLIP) and any("encoder.layers." in k for k in state if k.startswith(CLIP)):
        conditioner = "openclip" if openclip else "clip"
    elif has(BERT + "attn_layers."):
        conditioner = "bert"
    elif COND + "embedding.weight" in state:
        conditioner = "class"
    elif COND + "channel_mapper.weight" in state:
        conditioner = "rescaler"        # the semantic-synthesis tau_theta: concatenated, not attended to
    elif has(COND):
        unknown = names(sorted(k for k in state if k.startswith(COND)))
        raise CheckpointError(f"{where}: unknown conditioner keys ({unknown}); ldmrt knows CLIP, OpenCLIP, "
                              f"the LDM BERT and the class embedder")
    else:
        conditioner = None
    if conditioner is None and any(k.startswith(UNET) and ".attn2." in k for k in state):
        raise CheckpointError(f"{where}: the UNet has cross-attention but the file has no cond_stage_model.* "
                              f"weights (its text encoder is missing); use a full checkpoint")
    family, what = {
        "clip": (Family.SD1, "sd1: OpenAI CLIP text encoder keys (cond_stage_model.transformer.text_model.*)"),
        "openclip": (Family.SD2,
                     "sd2: OpenCLIP text encoder keys (cond_stage_model.model.transformer.resblocks.*)"),
        "sdxl": (Family.SDXL, "sdxl: CLIP ViT-L + OpenCLIP bigG text encoder keys (conditioner.embedders.0/1.*)"),
        "sdxl_refiner": (Family.SDXL_REFINER, "sdxl_refiner: OpenCLIP bigG text encoder keys alone "
                                              "(conditioner.embedders.0.model.*)"),
        "bert": (Family.LDM, "ldm: BERT-like text encoder keys (cond_stage_model.transformer.attn_layers.*)"),
        "class": (Family.LDM, "ldm: class-conditional (cond_stage_model.embedding.weight)"),
        "rescaler": (Family.LDM, "ldm: spatial rescaler of semantic maps (cond_stage_model.channel_mapper.weight)"),
        None: (Family.LDM, "ldm: unconditional (no cond_stage_model.* keys)"),
    }[conditioner]
    return Detection(family, conditioner, autoencoder, f"{what}, {proj}, {ae}")


def _kind_hint(tensors: Mapping[str, torch.Tensor]) -> str:
    keys = list(tensors)
    if any(k.startswith(("down_blocks.", "up_blocks.", "encoder.down_blocks.", "text_model.")) for k in keys) \
            or any(k.startswith(("conv_in.", "time_embedding.")) for k in keys):
        return "its names are diffusers/transformers component names: pass the diffusers folder instead"
    if any("lora" in k.lower() for k in keys[:200]):
        return "it looks like a LoRA or adapter, which is not a whole model"
    return f"its first keys are {names(keys, 3)}"


# --- architecture from tensor shapes --------------------------------------------------------

class _Shapes:
    def __init__(self, state: Mapping[str, torch.Tensor], where: str):
        self.state, self.where = state, where

    def __call__(self, key: str) -> tuple[int, ...]:
        if key not in self.state:
            raise CheckpointError(f"{self.where}: cannot infer the architecture: {key} is missing; "
                                  f"pass a preset or the model's YAML")
        return tuple(self.state[key].shape)

    def has(self, key: str) -> bool:
        return key in self.state

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.state)

    def count(self, pattern: str) -> int:
        """How many consecutive i from 0 make `pattern.format(i)` a key."""
        i = 0
        while pattern.format(i) in self.state:
            i += 1
        return i


def infer_unet(state: Mapping[str, torch.Tensor], detection: Detection, where: str) -> tuple[UNetConfig, str]:
    """UNetConfig from `model.diffusion_model.*` shapes; the heads from the family's convention."""
    s = _Shapes(state, where)
    model_channels, in_channels = s(UNET + "input_blocks.0.0.weight")[:2]
    depth = lambda prefix: s.count(prefix + "1.transformer_blocks.{}.attn1.to_q.weight")  # noqa: E731
    widths, down_depths, attention_levels = [], [[]], set()
    block, current = 1, model_channels
    while s.has_prefix(f"{UNET}input_blocks.{block}."):
        if s.has(f"{UNET}input_blocks.{block}.0.op.weight"):
            widths.append(current)
            down_depths.append([])
        else:
            current = s(f"{UNET}input_blocks.{block}.0.in_layers.2.weight")[0]
            down_depths[-1].append(depth(f"{UNET}input_blocks.{block}."))
            if s.has_prefix(f"{UNET}input_blocks.{block}.1."):
                attention_levels.add(len(widths))
        block += 1
    widths.append(current)
    res_blocks = [len(d) for d in down_depths]
    up_depths, block = [], 0
    for level in reversed(range(len(widths))):
        up_depths.insert(0, [depth(f"{UNET}output_blocks.{block + j}.") for j in range(res_blocks[level] + 1)])
        block += res_blocks[level] + 1
    middle = s.has_prefix(UNET + "middle_block.")
    spatial = s.has_prefix(UNET + "middle_block.1.transformer_blocks.") or any(
        k.startswith(UNET) and ".transformer_blocks." in k for k in state)
    attn2 = next((k for k in state if k.startswith(UNET) and k.endswith("transformer_blocks.0.attn2.to_k.weight")), None)
    proj_in = next((k for k in state if k.startswith(UNET) and k.endswith(".1.proj_in.weight")), None)
    if detection.conditioner in ("clip", "bert"):
        heads, head_channels, rule = 8, -1, "8 heads"
    elif detection.conditioner in ("openclip", "sdxl", "sdxl_refiner"):
        heads, head_channels, rule = 8, 64, "64 channels per head"
    else:
        heads, head_channels, rule = 8, 32, "32 channels per head"
    vector = s(UNET + "label_emb.0.0.weight")[1] if s.has(UNET + "label_emb.0.0.weight") else 0
    time_ids = SDXL_REFINER_TIME_IDS if detection.conditioner == "sdxl_refiner" else SDXL_TIME_IDS
    try:
        config = unet_from_levels(
            widths=widths, res_blocks=res_blocks,
            depths=(down_depths, up_depths, depth(UNET + "middle_block.") if middle else 1) if spatial else None,
            in_channels=in_channels, out_channels=s(UNET + "out.2.weight")[0], model_channels=model_channels,
            attention_resolutions=tuple(sorted((2 ** level for level in attention_levels), reverse=True)),
            # spatial transformers: per level, as a diffusers UNet2DConditionModel folder reads; the
            # plain attention of UNet2DModel keeps its one head size, as that folder reads too
            **({"level_heads": _level_heads(widths, attention_levels, heads, head_channels)} if spatial
               else {"num_heads": heads, "num_head_channels": head_channels}), middle_block=middle,
            context_dim=s(attn2)[1] if spatial and attn2 else None, use_spatial_transformer=spatial,
            use_linear_in_transformer=spatial and proj_in is not None and len(s(proj_in)) == 2,
            upcast_attention=detection.family == Family.SD2,
            num_classes=s(UNET + "label_emb.weight")[0] if s.has(UNET + "label_emb.weight") else None,
            **({"text_embeds_dim": vector - time_ids * 256, "time_ids": time_ids} if vector else {}))
    except ConfigError as exc:
        raise CheckpointError(f"{where}: the UNet's layout does not fit a UNetConfig (the attention heads "
                              f"are not stored in the weights: the {detection.family.value} convention is "
                              f"{rule}): {exc}; pass the model's YAML") from None
    return config, f"UNet attention heads assumed: {rule} ({detection.family.value} convention)"


def _level_heads(widths: list[int], attention_levels: set[int], heads: int, head_channels: int) -> list[int]:
    """Head counts per level by a convention (a count, or a head size); 0 where a size does not
    divide a level that attends (refused by UNetConfig), 1 where the level has no attention. Given
    per level, so that unet_from_levels writes the form a diffusers folder of the model gets."""
    used = attention_levels | {len(widths) - 1}
    if head_channels == -1:
        return [heads] * len(widths)
    return [(w // head_channels if w % head_channels == 0 else 0) if i in used else 1 for i, w in enumerate(widths)]


def infer_autoencoder(state: Mapping[str, torch.Tensor], kind: AutoencoderKind, where: str) -> AutoencoderConfig:
    s = _Shapes(state, where)
    ch, in_channels = s(VAE + "encoder.conv_in.weight")[:2]
    levels = s.count(VAE + "encoder.down.{}.block.0.conv1.weight")
    mults = [s(f"{VAE}encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)]
    quant = s(VAE + "quant_conv.weight")[0]
    vq = kind == AutoencoderKind.VQ
    try:
        return AutoencoderConfig(
            kind=kind, embed_dim=quant if vq else quant // 2, z_channels=s(VAE + "decoder.conv_in.weight")[1],
            in_channels=in_channels, out_ch=s(VAE + "decoder.conv_out.weight")[0], ch=ch,
            ch_mult=tuple(m // ch for m in mults),
            num_res_blocks=s.count(VAE + "encoder.down.0.block.{}.conv1.weight"),
            attn_levels=tuple(i for i in range(levels) if s.has(f"{VAE}encoder.down.{i}.attn.0.q.weight")),
            n_embed=s(VAE + "quantize.embedding.weight")[0] if vq else 0)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: unusual autoencoder layout ({exc}); pass the model's YAML") from None


Conditioner = Union[ClipTextConfig, BertConfig, ClassEmbedderConfig, None]


def infer_conditioner(state: Mapping[str, torch.Tensor], detection: Detection, ids: Mapping[str, int],
                      where: str) -> tuple[Conditioner, str]:
    """The conditioner config from shapes; CLIP heads = width / 64 (every CLIP text tower)."""
    s = _Shapes(state, where)
    if detection.conditioner in ("clip", "openclip", "sdxl", "sdxl_refiner"):
        openclip = detection.conditioner in ("openclip", "sdxl_refiner")
        xl = detection.conditioner in ("sdxl", "sdxl_refiner")
        layer = LayerChoice.PENULTIMATE_HIDDEN if xl else LayerChoice.PENULTIMATE if openclip else LayerChoice.LAST
        config = _clip_from_shapes(s, CLIP, openclip, layer, ids, where)
        shown = "penultimate hidden state" if xl else "penultimate layer" if openclip else "last layer"
        return config, (f"text encoder assumed: {config.num_attention_heads} heads of 64, {shown}, "
                        f"{config.hidden_act} ({detection.family.value} convention)")
    if detection.conditioner == "bert":
        vocab, width = s(BERT + "token_emb.weight")
        inner = s(BERT + "attn_layers.layers.0.1.to_q.weight")[0]
        if inner % 64:
            raise CheckpointError(f"{where}: BERT attention width {inner} is not a multiple of 64; pass the YAML")
        config = BertConfig(vocab_size=vocab, n_embed=width,
                            n_layer=s.count(BERT + "attn_layers.layers.{}.0.weight") // 2,
                            heads=inner // 64, dim_head=64,
                            ff_mult=s(BERT + "attn_layers.layers.1.1.net.0.0.weight")[0] // width,
                            max_seq_len=s(BERT + "pos_emb.emb.weight")[0])
        return config, f"BERT attention assumed: {inner // 64} heads of 64 (x-transformers' head size)"
    if detection.conditioner == "class":
        n_classes, width = s(COND + "embedding.weight")
        return ClassEmbedderConfig(n_classes=n_classes, embed_dim=width), ""
    return None, ""


def infer_second_conditioner(state: Mapping[str, torch.Tensor], detection: Detection, ids: Mapping[str, int],
                             where: str) -> ClipTextConfig | None:
    """SDXL base's second text encoder (OpenCLIP bigG, pads with 0 whatever the tokenizer's pad)."""
    if detection.conditioner != "sdxl":
        return None
    ids = {k: v for k, v in ids.items() if k != "pad_token_id"}
    return _clip_from_shapes(_Shapes(state, where), CLIP_2, True, LayerChoice.PENULTIMATE_HIDDEN, ids, where)


def _clip_from_shapes(s: "_Shapes", prefix: str, openclip: bool, layer: LayerChoice, ids: Mapping[str, int],
                      where: str) -> ClipTextConfig:
    """A CLIP text tower's config from its shapes: heads of 64 (every CLIP text tower), OpenCLIP's
    gelu and pad 0 or OpenAI's quick_gelu and pad eos; the projection where the weights hold one."""
    vocab, width = s(prefix + "embeddings.token_embedding.weight")
    if width % 64:
        raise CheckpointError(f"{where}: text width {width} is not a multiple of CLIP's 64-wide heads; "
                              f"pass the model's YAML or a preset")
    projection = prefix.removesuffix("text_model.") + "text_projection.weight"
    defaults = {"bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": 0 if openclip else vocab - 1}
    return ClipTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=s(prefix + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=s.count(prefix + "encoder.layers.{}.self_attn.q_proj.weight"),
        num_attention_heads=width // 64, max_position_embeddings=s(prefix + "embeddings.position_embedding.weight")[0],
        hidden_act="gelu" if openclip else "quick_gelu", layer=layer,
        projection_dim=s(projection)[0] if s.has(projection) else 0, **{**defaults, **ids})


def ema_as_model(ema: Mapping[str, torch.Tensor], expected_unet_keys: list[str]) -> StateDict:
    """model_ema.* (LitEma: dots removed) -> model.diffusion_model.* for the keys a model expects."""
    out = {}
    for key in expected_unet_keys:
        ema_key = EMA + key[len("model."):].replace(".", "")
        if ema_key in ema:
            out[key] = ema[ema_key]
    return out
