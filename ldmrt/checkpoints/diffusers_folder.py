"""A diffusers pipeline folder (model_index.json + one folder per component) -> config + CompVis weights.

Each component's config.json maps onto ldmrt's dataclasses field by field; options our CompVis
modules do not implement fail by name instead of being ignored.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ldmrt.config import (AutoencoderConfig, AutoencoderKind, BertConfig, BetaSchedule, ClipTextConfig,
                          ConcatKind, Family, LayerChoice, LowResNoise, ModelConfig, SchedulerConfig,
                          SpatialConditioning, UNetConfig)
from ldmrt.errors import CheckpointError, ConfigError
from ldmrt.models import convert
from ldmrt.checkpoints.files import read_weights
from ldmrt.checkpoints.schedule import scheduler_from_diffusers
from ldmrt.checkpoints.state import Assembly, StateDict, cast_to_float32, dtype_counts
from ldmrt.checkpoints.tokenizer_assets import read_tokenizer_folder
from ldmrt.checkpoints.yaml_spatial import spatial_from_shapes

MODEL_INDEX = "model_index.json"
_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")
_IGNORED = {"safety_checker", "feature_extractor", "image_encoder", "image_processor"}
_UNETS = ("UNet2DConditionModel", "UNet2DModel")

# diffusers options our CompVis UNet/autoencoder implement only at these values
_UNET_FIXED = {"center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
               "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
               "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
               "time_embedding_dim": None, "class_embed_type": None}
_UNET_COND_FIXED = {"mid_block_type": "UNetMidBlock2DCrossAttn",
                    "encoder_hid_dim": None, "dual_cross_attention": False, "addition_embed_type": None,
                    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
                    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
                    "conv_in_kernel": 3, "conv_out_kernel": 3, "projection_class_embeddings_input_dim": None,
                    "attention_type": "default", "class_embeddings_concat": False,
                    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
                    "reverse_transformer_layers_per_block": None}
_UNET_PLAIN_FIXED = {"mid_block_type": "UNetMidBlock2D", "add_attention": True}
_VAE_FIXED = {"act_fn": "silu", "mid_block_add_attention": True, "use_quant_conv": True,
              "use_post_quant_conv": True, "shift_factor": None, "latents_mean": None, "latents_std": None,
              "norm_type": "group"}


def read_diffusers_folder(folder: Path) -> Assembly:
    """Every component of the pipeline in `folder`, under CompVis names, with its ModelConfig."""
    index = read_json(folder / MODEL_INDEX)
    components = {name: spec for name, spec in index.items()
                  if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[1]}
    notes = [f"{name}: {spec[1]} not used by ldmrt" for name, spec in components.items() if name in _IGNORED]
    unknown = sorted(set(components) - _IGNORED - {"unet", "vae", "vqvae", "text_encoder", "bert",
                                                    "tokenizer", "scheduler", "low_res_scheduler"})
    if unknown:
        raise CheckpointError(f"{folder / MODEL_INDEX}: components {unknown} are not supported; ldmrt "
                              f"loads unet, vae/vqvae, text_encoder/bert, tokenizer and scheduler "
                              f"(Stable Diffusion 1.x/2.x and LDM pipelines)")
    vae_name = "vae" if "vae" in components else "vqvae" if "vqvae" in components else None
    for required in ("unet", "scheduler"):
        if required not in components:
            raise CheckpointError(f"{folder / MODEL_INDEX}: no {required!r} component; expected a "
                                  f"Stable Diffusion or LDM pipeline")
    if vae_name is None:
        raise CheckpointError(f"{folder / MODEL_INDEX}: no 'vae' or 'vqvae' component")

    unet_cfg = _component_config(folder, "unet")
    vae_cfg = _component_config(folder, vae_name)
    unet_config = unet_config_from_diffusers(unet_cfg, f"{folder}/unet/config.json")
    autoencoder, scale = autoencoder_config_from_diffusers(vae_cfg, f"{folder}/{vae_name}/config.json")
    schedule_path = folder / "scheduler" / "scheduler_config.json"
    scheduler, schedule_notes = scheduler_from_diffusers(read_json(schedule_path), str(schedule_path))
    notes += schedule_notes

    encoder_name = "text_encoder" if "text_encoder" in components else "bert" if "bert" in components else None
    conditioner, tokenizer_dir, family, detected = None, None, Family.LDM, "LDM: no text encoder"
    if encoder_name is not None:
        encoder_cfg = _component_config(folder, encoder_name)
        tokenizer_dir = folder / "tokenizer" if "tokenizer" in components else None
        if tokenizer_dir is None:
            notes.append("no tokenizer component: export will need tokenizer assets")
        conditioner, family, detected = _text_config(encoder_cfg, tokenizer_dir, f"{folder}/{encoder_name}")

    sample = unet_cfg.get("sample_size")
    image_size = sample * autoencoder.downsampling_factor if isinstance(sample, int) else \
        (768 if scheduler.prediction_type.value == "v_prediction" else 512)
    spatial = spatial_from_pipeline(index, folder, unet_config, autoencoder, conditioner is not None)
    if spatial is not None:
        detected += f"; {spatial.describe()} (UNet in_channels {unet_config.in_channels})"
    try:
        config = ModelConfig(name=folder.name, family=family, unet=unet_config, autoencoder=autoencoder,
                             conditioner=conditioner, scheduler=scheduler, scale_factor=scale,
                             default_image_size=image_size, spatial=spatial)
    except ConfigError as exc:
        raise CheckpointError(f"{folder}: the component configs do not fit together: {exc}") from None

    state: StateDict = {}
    unet_state = _component_weights(folder, "unet", notes)
    if unet_cfg.get("_class_name") == "UNet2DModel":
        unet_state = legacy_attention_from_diffusers(unet_state, unet_config)
    state.update(_prefixed("model.diffusion_model.", convert.unet_from_diffusers(unet_state, unet_config)))
    vae_state = _component_weights(folder, vae_name, notes)
    state.update(_prefixed("first_stage_model.", convert.autoencoder_from_diffusers(vae_state, autoencoder)))
    if isinstance(conditioner, ClipTextConfig):
        text_state = _component_weights(folder, encoder_name, notes)
        if any(k.endswith("position_ids") for k in text_state):
            notes.append("text_encoder: dropped the position_ids buffer (positions are computed)")
        state.update(_prefixed("cond_stage_model.", convert.clip_from_transformers(text_state)))
    elif isinstance(conditioner, BertConfig):
        bert_state = convert.bert_from_diffusers(_component_weights(folder, encoder_name, notes), conditioner)
        if not any(k.startswith("transformer.to_logits.") for k in bert_state):
            # LDMBertModel has no token-prediction head; text_embeddings never use it.
            bert_state["transformer.to_logits.weight"] = torch.zeros(conditioner.vocab_size, conditioner.n_embed)
            bert_state["transformer.to_logits.bias"] = torch.zeros(conditioner.vocab_size)
            notes.append("bert: LDMBertModel has no to_logits head (unused by text_embeddings); "
                         "filled with zeros")
        state.update(_prefixed("cond_stage_model.", bert_state))
    dtypes = dtype_counts(state)
    state, cast_note = cast_to_float32(state, str(folder))
    notes += [cast_note] if cast_note else []
    return Assembly(format="diffusers", config=config, state=state,
                    config_source=f"the diffusers configs in {folder}", detected=detected,
                    notes=notes, tokenizer_dir=tokenizer_dir, dtypes=dtypes)


def spatial_from_pipeline(index: Mapping[str, Any], folder: Path, unet: UNetConfig,
                          autoencoder: AutoencoderConfig, has_text: bool) -> SpatialConditioning | None:
    """The maps a diffusers pipeline concatenates to the latents: the UNet's extra input channels
    read as single files' are (yaml_spatial.spatial_from_shapes), except the x4 upscaler, whose
    noise schedule and level the pipeline's own files give (low_res_scheduler, max_noise_level)."""
    pipeline = str(index.get("_class_name", ""))
    if pipeline == "StableDiffusionUpscalePipeline" and unet.in_channels == autoencoder.embed_dim + autoencoder.in_channels:
        path = folder / "low_res_scheduler" / "scheduler_config.json"
        level = index.get("max_noise_level", 350)
        if not isinstance(level, int) or isinstance(level, bool):
            raise CheckpointError(f"{folder / MODEL_INDEX}: max_noise_level {level!r}: expected an integer")
        try:
            noise = LowResNoise(schedule=_training_schedule(read_json(path), str(path)),
                                max_noise_level=level, default_noise_level=min(20, level))
        except ConfigError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        return SpatialConditioning(inputs=(ConcatKind.LOW_RES_IMAGE,), low_res_noise=noise)
    try:
        return spatial_from_shapes(unet.in_channels, autoencoder.embed_dim, has_text, unet.num_classes is not None,
                                   autoencoder.downsampling_factor, None, False)
    except CheckpointError as exc:
        raise CheckpointError(f"{folder / MODEL_INDEX}: {pipeline or 'a pipeline'}: {exc}") from None


def _training_schedule(cfg: Mapping[str, Any], where: str) -> SchedulerConfig:
    """Only the betas of a scheduler whose add_noise alone is used (the x4 upscaler's low-res one)."""
    try:
        return SchedulerConfig(num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                               beta_start=float(cfg.get("beta_start", 0.0001)),
                               beta_end=float(cfg.get("beta_end", 0.02)),
                               beta_schedule=BetaSchedule(cfg.get("beta_schedule", "linear")))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def _text_config(cfg: Mapping[str, Any], tokenizer_dir: Path | None,
                 where: str) -> tuple[ClipTextConfig | BertConfig, Family, str]:
    kind = _class_name(cfg)
    if kind == "LDMBertModel":
        return bert_config_from_diffusers(cfg, f"{where}/config.json"), Family.LDM, \
            "LDM: text encoder LDMBertModel (the paper's BERT-like transformer)"
    if kind != "CLIPTextModel":
        raise CheckpointError(f"{where}/config.json: text encoder {kind!r} is not supported; "
                              f"expected CLIPTextModel or LDMBertModel")
    ids = {}
    if tokenizer_dir is not None:
        ids = read_tokenizer_folder(tokenizer_dir).clip_ids()
    clip = clip_config_from_transformers(cfg, ids, f"{where}/config.json")
    if clip.hidden_act == "gelu":
        detected = (f"sd2: CLIP text encoder with hidden_act=gelu (OpenCLIP ViT); its "
                    f"{clip.num_hidden_layers} layers are already the penultimate cut, so the last is used")
        return clip, Family.SD2, detected
    return clip, Family.SD1, "sd1: CLIP text encoder with hidden_act=quick_gelu (OpenAI CLIP)"


# --- config.json -> dataclasses -----------------------------------------------------------

def unet_config_from_diffusers(cfg: Mapping[str, Any], where: str) -> UNetConfig:
    """UNet2DConditionModel (spatial transformers) or UNet2DModel (plain attention) -> UNetConfig."""
    kind = _class_name(cfg) or "UNet2DConditionModel"
    if kind not in _UNETS:
        raise CheckpointError(f"{where}: UNet class {kind!r} is not supported; expected one of {list(_UNETS)}")
    conditional = kind == "UNet2DConditionModel"
    _require_defaults(cfg, {**_UNET_FIXED, **(_UNET_COND_FIXED if conditional else _UNET_PLAIN_FIXED)}, where)
    if not conditional and cfg.get("attn_norm_num_groups") not in (None, cfg.get("norm_num_groups", 32)):
        raise CheckpointError(f"{where}: attn_norm_num_groups differs from norm_num_groups; not supported")
    channels = list(_get(cfg, "block_out_channels", where, list))
    down = list(_get(cfg, "down_block_types", where, list))
    up = list(_get(cfg, "up_block_types", where, list))
    attention_down = {"CrossAttnDownBlock2D" if conditional else "AttnDownBlock2D": True, "DownBlock2D": False}
    attention_up = {"CrossAttnUpBlock2D" if conditional else "AttnUpBlock2D": True, "UpBlock2D": False}
    if not (len(channels) == len(down) == len(up)) or any(t not in attention_down for t in down) \
            or any(t not in attention_up for t in up):
        raise CheckpointError(f"{where}: block types {down} / {up} for {len(channels)} levels are not "
                              f"supported; expected {sorted(attention_down)} down and the mirror up")
    attention = [attention_down[t] for t in down]
    if [attention_up[t] for t in reversed(up)] != attention:
        raise CheckpointError(f"{where}: up_block_types {up} do not mirror down_block_types {down}")
    base = channels[0]
    if any(c % base for c in channels):
        raise CheckpointError(f"{where}: block_out_channels {channels} are not multiples of the first")
    levels = [i for i, a in enumerate(attention) if a] + [len(channels) - 1]   # + the middle block
    heads, head_dim = _heads(cfg, channels, levels, conditional, where)
    cross_only = cfg.get("only_cross_attention", False) if conditional else False
    if cross_only is True:      # a bool also makes the middle block cross-attention-only in diffusers
        raise CheckpointError(f"{where}: only_cross_attention true (every level and the middle block) is "
                              f"not supported; CompVis' disable_self_attentions is per level")
    if isinstance(cross_only, bool):
        cross_only = [cross_only] * len(channels)
    if not isinstance(cross_only, list) or len(cross_only) != len(channels) \
            or not all(isinstance(flag, bool) for flag in cross_only):
        raise CheckpointError(f"{where}: only_cross_attention {cross_only!r}: expected a bool or one per level")
    resample = {(cfg.get("downsample_type", "conv"), cfg.get("upsample_type", "conv"))}
    if resample - {("conv", "conv"), ("resnet", "resnet")}:
        raise CheckpointError(f"{where}: downsample_type / upsample_type {sorted(resample)[0]}: expected both "
                              f"'conv' or both 'resnet'")
    resnet_resample = resample == {("resnet", "resnet")}
    # DownBlock2D (no attention) keeps a conv downsampler whatever downsample_type says
    if resnet_resample and not all(attention[:-1]):
        raise CheckpointError(f"{where}: downsample_type 'resnet' with attention-free levels (DownBlock2D "
                              f"keeps a conv there); CompVis' resblock_updown resamples every level by ResBlocks")
    try:
        return UNetConfig(
            in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)),
            model_channels=base, channel_mult=tuple(c // base for c in channels),
            num_res_blocks=_uniform(cfg.get("layers_per_block", 2), "layers_per_block", where),
            attention_resolutions=tuple(2 ** i for i, a in reversed(list(enumerate(attention))) if a),
            num_heads=heads, num_head_channels=head_dim,
            transformer_depth=_uniform(cfg.get("transformer_layers_per_block", 1),
                                       "transformer_layers_per_block", where),
            context_dim=int(_get(cfg, "cross_attention_dim", where, int)) if conditional else None,
            use_spatial_transformer=conditional,
            use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
            upcast_attention=bool(cfg.get("upcast_attention", False)),
            num_classes=cfg.get("num_class_embeds"), norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            disable_self_attentions=tuple(cross_only) if any(cross_only) else (),
            resblock_updown=resnet_resample)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def _heads(cfg: Mapping[str, Any], channels: list[int], levels: list[int], conditional: bool,
           where: str) -> tuple[int, int]:
    """(num_heads, num_head_channels) of CompVis from diffusers' per-level head settings."""
    if not conditional:   # UNet2DModel: attention_head_dim really is the head size
        dim = cfg.get("attention_head_dim", 8)
        return (1, -1) if dim is None else (8, int(dim))
    # UNet2DConditionModel: `attention_head_dim` is historically the number of heads
    per_level = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    if isinstance(per_level, int):
        return per_level, -1
    if len(per_level) != len(channels):
        raise CheckpointError(f"{where}: {len(per_level)} head counts for {len(channels)} levels")
    counts = {per_level[i] for i in levels}
    if len(counts) == 1:
        return counts.pop(), -1
    dims = {channels[i] // per_level[i] for i in levels}
    if len(dims) == 1 and all(channels[i] % per_level[i] == 0 for i in levels):
        return 8, dims.pop()
    raise CheckpointError(f"{where}: head counts {per_level} give neither a fixed head count nor a "
                          f"fixed head size; CompVis' UNet has one of the two")


def autoencoder_config_from_diffusers(cfg: Mapping[str, Any], where: str) -> tuple[AutoencoderConfig, float]:
    """AutoencoderKL / VQModel -> (AutoencoderConfig, latent scale factor)."""
    kind = _class_name(cfg) or "AutoencoderKL"
    if kind not in ("AutoencoderKL", "VQModel"):
        raise CheckpointError(f"{where}: autoencoder class {kind!r} is not supported; expected "
                              f"AutoencoderKL or VQModel")
    _require_defaults(cfg, _VAE_FIXED, where)
    channels = list(_get(cfg, "block_out_channels", where, list))
    down, up = cfg.get("down_block_types", []), cfg.get("up_block_types", [])
    if any(t != "DownEncoderBlock2D" for t in down) or any(t != "UpDecoderBlock2D" for t in up) \
            or len(down) != len(channels) or len(up) != len(channels):
        raise CheckpointError(f"{where}: block types {down} / {up} are not supported; expected "
                              f"DownEncoderBlock2D / UpDecoderBlock2D per level")
    if any(c % channels[0] for c in channels):
        raise CheckpointError(f"{where}: block_out_channels {channels} are not multiples of the first")
    latent = int(cfg.get("latent_channels", 4 if kind == "AutoencoderKL" else 3))
    vq = kind == "VQModel"
    try:
        config = AutoencoderConfig(
            kind=AutoencoderKind.VQ if vq else AutoencoderKind.KL,
            embed_dim=int(cfg.get("vq_embed_dim") or latent) if vq else latent, z_channels=latent,
            in_channels=int(cfg.get("in_channels", 3)), out_ch=int(cfg.get("out_channels", 3)),
            ch=channels[0], ch_mult=tuple(c // channels[0] for c in channels),
            num_res_blocks=_uniform(cfg.get("layers_per_block", 1), "layers_per_block", where),
            n_embed=int(cfg.get("num_vq_embeddings", 256)) if vq else 0,
            norm_num_groups=int(cfg.get("norm_num_groups", 32)))
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return config, float(cfg.get("scaling_factor", 0.18215))


def clip_config_from_transformers(cfg: Mapping[str, Any], ids: Mapping[str, int], where: str) -> ClipTextConfig:
    """CLIPTextConfig -> ClipTextConfig; always the last layer of the layers stored.

    Token ids come from the tokenizer (`ids`): the text encoder's own bos/eos/pad fields are
    transformers defaults in the released SD configs. Without a tokenizer, CLIP's layout
    (bos = vocab_size - 2, eos = vocab_size - 1) is assumed.
    """
    if cfg.get("layer_norm_eps", 1e-5) != 1e-5:
        raise CheckpointError(f"{where}: layer_norm_eps={cfg['layer_norm_eps']} is not supported (1e-5)")
    vocab = int(_get(cfg, "vocab_size", where, int))
    act = cfg.get("hidden_act", "quick_gelu")
    defaults = {"bos_token_id": vocab - 2, "eos_token_id": vocab - 1,
                "pad_token_id": 0 if act == "gelu" else vocab - 1}
    try:
        return ClipTextConfig(
            vocab_size=vocab, hidden_size=int(_get(cfg, "hidden_size", where, int)),
            intermediate_size=int(_get(cfg, "intermediate_size", where, int)),
            num_hidden_layers=int(_get(cfg, "num_hidden_layers", where, int)),
            num_attention_heads=int(_get(cfg, "num_attention_heads", where, int)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 77)), hidden_act=act,
            layer=LayerChoice.LAST, **{**defaults, **ids})
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def bert_config_from_diffusers(cfg: Mapping[str, Any], where: str) -> BertConfig:
    """LDMBertConfig -> BertConfig."""
    if cfg.get("activation_function", "gelu") != "gelu":
        raise CheckpointError(f"{where}: activation_function={cfg['activation_function']!r} is not "
                              f"supported (gelu)")
    d_model = int(_get(cfg, "d_model", where, int))
    ffn = int(cfg.get("encoder_ffn_dim", 4 * d_model))
    if ffn % d_model:
        raise CheckpointError(f"{where}: encoder_ffn_dim={ffn} is not a multiple of d_model={d_model}")
    return BertConfig(vocab_size=int(_get(cfg, "vocab_size", where, int)), n_embed=d_model,
                      n_layer=int(_get(cfg, "encoder_layers", where, int)),
                      heads=int(cfg.get("encoder_attention_heads", 8)), dim_head=int(cfg.get("head_dim", 64)),
                      ff_mult=ffn // d_model, max_seq_len=int(cfg.get("max_position_embeddings", 77)),
                      pad_token_id=int(cfg.get("pad_token_id", 0)))


# --- weights ------------------------------------------------------------------------------

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
            heads = config.heads_and_dim(channels)[0]
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


def _component_weights(folder: Path, name: str, notes: list[str]) -> StateDict:
    sub = folder / name
    for stem in _WEIGHT_NAMES:
        index = sub / f"{stem}.safetensors.index.json"
        if not index.is_file():
            index = sub / f"{stem}.bin.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            if not shards:
                raise CheckpointError(f"{index}: no weight_map")
            state: StateDict = {}
            for shard in shards:
                state.update(read_weights(sub / shard).tensors)
            return state
        for suffix in (".safetensors", ".bin"):
            if (sub / f"{stem}{suffix}").is_file():
                return read_weights(sub / f"{stem}{suffix}").tensors
    variants = sorted(p.name for p in sub.glob("*.safetensors")) or sorted(p.name for p in sub.glob("*.bin"))
    if len(variants) == 1:
        notes.append(f"{name}: only the variant {variants[0]} is present; loaded it")
        return read_weights(sub / variants[0]).tensors
    found = sorted(p.name for p in sub.iterdir()) if sub.is_dir() else "no folder"
    raise CheckpointError(f"{sub}: expected diffusion_pytorch_model.safetensors, model.safetensors or a "
                          f".bin of the same name; found {found}")


def _component_config(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; model_index.json lists {name!r} but its folder has no "
                              f"config.json")
    return read_json(path)


def _prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> StateDict:
    return {prefix + k: v for k, v in state.items()}


# --- small helpers ------------------------------------------------------------------------

def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _class_name(cfg: Mapping[str, Any]) -> str | None:
    if cfg.get("_class_name"):
        return str(cfg["_class_name"])
    architectures = cfg.get("architectures")
    return str(architectures[0]) if isinstance(architectures, list) and architectures else None


def _get(cfg: Mapping[str, Any], key: str, where: str, kind: type) -> Any:
    value = cfg.get(key)
    kinds = (list, tuple) if kind is list else (kind,)
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise CheckpointError(f"{where}: expected {key} to be a {kind.__name__}, found {value!r}")
    return value


def _uniform(value: Any, key: str, where: str) -> int:
    """An int, or a per-level list whose entries are all equal (CompVis has one value)."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"{where}: per-level {key}={list(value)} is not supported; "
                                  f"CompVis' modules use one value for every level")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{where}: expected {key} to be an integer, found {value!r}")
    return value


def _require_defaults(cfg: Mapping[str, Any], fixed: Mapping[str, Any], where: str) -> None:
    for key, expected in fixed.items():
        value = cfg.get(key, expected)
        values = value if isinstance(value, list) else [value]
        if any(v != expected for v in values):
            raise CheckpointError(f"{where}: {key}={value!r} is not supported; ldmrt's CompVis modules "
                                  f"implement only {key}={expected!r}")
