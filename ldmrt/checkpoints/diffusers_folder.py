"""A diffusers pipeline folder (model_index.json + one folder per component) -> config + CompVis weights.

Each component's config.json maps onto ldmrt's dataclasses field by field; options our CompVis
modules do not implement fail by name instead of being ignored.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch

from ldmrt.config import (SDXL_REFINER_TIME_IDS, SDXL_TIME_IDS, AutoencoderConfig, AutoencoderKind, BertConfig,
                          BetaSchedule, ClipTextConfig, ConcatKind, Family, LayerChoice, LowResNoise, ModelConfig,
                          SchedulerConfig, SpatialConditioning, UNetConfig)
from ldmrt.errors import CheckpointError, ConfigError
from ldmrt.models import convert
from ldmrt.checkpoints.diffusers_json import class_name, get_value, read_json, require_defaults, uniform
from ldmrt.checkpoints.diffusers_unet import legacy_attention_from_diffusers, unet_config_from_diffusers
from ldmrt.weight_files import read_weights
from ldmrt.checkpoints.schedule import scheduler_from_diffusers
from ldmrt.checkpoints.state import Assembly, StateDict, cast_to_float32, dtype_counts
from ldmrt.checkpoints.tokenizer_assets import read_tokenizer_folder
from ldmrt.checkpoints.yaml_spatial import spatial_from_shapes

MODEL_INDEX = "model_index.json"
_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")
_IGNORED = {"safety_checker", "feature_extractor", "image_encoder", "image_processor"}

# diffusers options ldmrt's autoencoder implements only at these values
_VAE_FIXED = {"act_fn": "silu", "mid_block_add_attention": True, "use_quant_conv": True,
              "use_post_quant_conv": True, "shift_factor": None, "latents_mean": None, "latents_std": None,
              "norm_type": "group"}


def read_diffusers_folder(folder: Path) -> Assembly:
    """Every component of the pipeline in `folder`, under CompVis names, with its ModelConfig."""
    index = read_json(folder / MODEL_INDEX)
    components = {name: spec for name, spec in index.items()
                  if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[1]}
    notes = [f"{name}: {spec[1]} not used by ldmrt" for name, spec in components.items() if name in _IGNORED]
    unknown = sorted(set(components) - _IGNORED - {"unet", "vae", "vqvae", "text_encoder", "bert", "tokenizer",
                                                    "text_encoder_2", "tokenizer_2", "scheduler", "low_res_scheduler"})
    if unknown:
        raise CheckpointError(f"{folder / MODEL_INDEX}: components {unknown} are not supported; ldmrt "
                              f"loads unet, vae/vqvae, text_encoder(_2)/bert, tokenizer(_2) and scheduler "
                              f"(Stable Diffusion 1.x/2.x/XL and LDM pipelines)")
    vae_name = "vae" if "vae" in components else "vqvae" if "vqvae" in components else None
    for required in ("unet", "scheduler"):
        if required not in components:
            raise CheckpointError(f"{folder / MODEL_INDEX}: no {required!r} component; expected a "
                                  f"Stable Diffusion or LDM pipeline")
    if vae_name is None:
        raise CheckpointError(f"{folder / MODEL_INDEX}: no 'vae' or 'vqvae' component")

    unet_cfg = _component_config(folder, "unet")
    vae_cfg = _component_config(folder, vae_name)
    xl = _xl_options(index, folder)
    unet_config = unet_config_from_diffusers(unet_cfg, f"{folder}/unet/config.json",
                                             SDXL_REFINER_TIME_IDS if xl.get("requires_aesthetics_score") else SDXL_TIME_IDS)
    autoencoder, scale = autoencoder_config_from_diffusers(vae_cfg, f"{folder}/{vae_name}/config.json")
    schedule_path = folder / "scheduler" / "scheduler_config.json"
    scheduler, schedule_notes = scheduler_from_diffusers(read_json(schedule_path), str(schedule_path))
    notes += schedule_notes

    encoder_name = "text_encoder" if "text_encoder" in components else "bert" if "bert" in components else None
    conditioner, tokenizer_dir, family, detected = None, None, Family.LDM, "LDM: no text encoder"
    conditioner_2 = None
    if "text_encoder_2" in components or xl:
        conditioner, conditioner_2, tokenizer_dir, family, detected = _xl_text_configs(folder, components)
        encoder_name = "text_encoder" if conditioner_2 is not None else "text_encoder_2"
    elif encoder_name is not None:
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
                             default_image_size=image_size, spatial=spatial, conditioner_2=conditioner_2,
                             force_zeros_for_empty_prompt=bool(xl.get("force_zeros_for_empty_prompt", False)))
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
        second = (("text_encoder_2", "cond_stage_model_2."),) if conditioner_2 is not None else ()
        for name, prefix in ((encoder_name, "cond_stage_model."),) + second:
            text_state = _component_weights(folder, name, notes)
            if any(k.endswith("position_ids") for k in text_state):
                notes.append(f"{name}: dropped the position_ids buffer (positions are computed)")
            state.update(_prefixed(prefix, convert.clip_from_transformers(text_state)))
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


_XL_PIPELINES = {"StableDiffusionXLPipeline": {"force_zeros_for_empty_prompt": True},
                 "StableDiffusionXLImg2ImgPipeline": {"force_zeros_for_empty_prompt": True,
                                                      "requires_aesthetics_score": False}}


def _xl_options(index: Mapping[str, Any], folder: Path) -> dict[str, bool]:
    """An SDXL pipeline's options from model_index.json, with diffusers' defaults ({} otherwise)."""
    pipeline = str(index.get("_class_name", ""))
    if pipeline not in _XL_PIPELINES:
        return {}
    options = dict(_XL_PIPELINES[pipeline])
    for key in options:
        value = index.get(key, options[key])
        if not isinstance(value, bool):
            raise CheckpointError(f"{folder / MODEL_INDEX}: {key} {value!r}: expected true or false")
        options[key] = value
    return options


def _xl_text_configs(folder: Path, components: Mapping[str, Any]):
    """SDXL's text encoders: (conditioner, conditioner_2, tokenizer folder, family, detected). The
    base has CLIP ViT-L (text_encoder) and OpenCLIP bigG (text_encoder_2); the refiner bigG alone,
    which is then ldmrt's only conditioner. Both read hidden_states[-2], without the final norm.
    One tokenizer serves both (each pads with its own encoder's pad token): tokenizer_2 must hold
    the same vocabulary, merges and added tokens as tokenizer."""
    if "text_encoder_2" not in components:
        raise CheckpointError(f"{folder / MODEL_INDEX}: an SDXL pipeline without text_encoder_2 (OpenCLIP bigG)")
    names = [n for n in ("text_encoder", "text_encoder_2") if n in components]
    tokenizers = {n: folder / f"tokenizer{n[len('text_encoder'):]}" for n in names
                  if f"tokenizer{n[len('text_encoder'):]}" in components}
    if len(tokenizers) != len(names):
        missing = sorted(f"tokenizer{n[len('text_encoder'):]}" for n in names if n not in tokenizers)
        raise CheckpointError(f"{folder / MODEL_INDEX}: no {missing} component for the SDXL text encoders")
    read = {n: read_tokenizer_folder(path) for n, path in tokenizers.items()}
    if len(read) == 2:
        first, second = read["text_encoder"], read["text_encoder_2"]
        pads = {first.pad_token, second.pad_token}
        same = lambda t: (t.kind, t.base_vocab, t.merges, _added_except(t.added, pads))  # noqa: E731
        if same(first) != same(second):
            raise CheckpointError(f"{folder}/tokenizer_2: differs from tokenizer/ beyond its pad token; ldmrt "
                                  f"runs both SDXL text encoders on one tokenizer")
    configs = []
    for name in names:
        cfg = _component_config(folder, name)
        kind = class_name(cfg)
        if kind not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            raise CheckpointError(f"{folder}/{name}/config.json: text encoder {kind!r} is not supported; expected "
                                  f"CLIPTextModel or CLIPTextModelWithProjection")
        clip = clip_config_from_transformers(cfg, read[name].clip_ids(), f"{folder}/{name}/config.json")
        projection = int(get_value(cfg, "projection_dim", f"{folder}/{name}/config.json", int)) \
            if kind == "CLIPTextModelWithProjection" else 0
        configs.append(dataclasses.replace(clip, layer=LayerChoice.PENULTIMATE_HIDDEN, projection_dim=projection))
    base = len(configs) == 2
    family = Family.SDXL if base else Family.SDXL_REFINER
    detected = (f"{family.value}: " + " + ".join(f"CLIP text {c.num_hidden_layers}x{c.hidden_size}" for c in configs)
                + " (penultimate hidden states" + (", the second's pooled projection)" if base else ", pooled projection)"))
    return configs[0], configs[1] if base else None, tokenizers[names[0]], family, detected


def _added_except(added, pads) -> tuple:
    """Added tokens other than pad tokens, comparable between two tokenizer folders."""
    return tuple(sorted((t.content, t.id) for t in added if t.content not in pads))


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
    kind = class_name(cfg)
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

def autoencoder_config_from_diffusers(cfg: Mapping[str, Any], where: str) -> tuple[AutoencoderConfig, float]:
    """AutoencoderKL / VQModel -> (AutoencoderConfig, latent scale factor)."""
    kind = class_name(cfg) or "AutoencoderKL"
    if kind not in ("AutoencoderKL", "VQModel"):
        raise CheckpointError(f"{where}: autoencoder class {kind!r} is not supported; expected "
                              f"AutoencoderKL or VQModel")
    require_defaults(cfg, _VAE_FIXED, where)
    channels = list(get_value(cfg, "block_out_channels", where, list))
    down, up = cfg.get("down_block_types", []), cfg.get("up_block_types", [])
    if any(t != "DownEncoderBlock2D" for t in down) or any(t != "UpDecoderBlock2D" for t in up) \
            or len(down) != len(channels) or len(up) != len(channels):
        raise CheckpointError(f"{where}: block types {down} / {up} are not supported; expected "
                              f"DownEncoderBlock2D / UpDecoderBlock2D per level")
    if any(c % channels[0] for c in channels):
        raise CheckpointError(f"{where}: block_out_channels {channels} are not multiples of the first")
    latent = int(cfg.get("latent_channels", 4 if kind == "AutoencoderKL" else 3))
    vq = kind == "VQModel"
    force_upcast = cfg.get("force_upcast", True) if not vq else True     # SDXL's flag: KL only
    if not isinstance(force_upcast, bool):
        raise CheckpointError(f"{where}: expected force_upcast to be true or false, found {force_upcast!r}")
    try:
        config = AutoencoderConfig(
            kind=AutoencoderKind.VQ if vq else AutoencoderKind.KL,
            embed_dim=int(cfg.get("vq_embed_dim") or latent) if vq else latent, z_channels=latent,
            in_channels=int(cfg.get("in_channels", 3)), out_ch=int(cfg.get("out_channels", 3)),
            ch=channels[0], ch_mult=tuple(c // channels[0] for c in channels),
            num_res_blocks=uniform(cfg.get("layers_per_block", 1), "layers_per_block", where),
            n_embed=int(cfg.get("num_vq_embeddings", 256)) if vq else 0,
            norm_num_groups=int(cfg.get("norm_num_groups", 32)), force_upcast=force_upcast)
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
    vocab = int(get_value(cfg, "vocab_size", where, int))
    act = cfg.get("hidden_act", "quick_gelu")
    defaults = {"bos_token_id": vocab - 2, "eos_token_id": vocab - 1,
                "pad_token_id": 0 if act == "gelu" else vocab - 1}
    try:
        return ClipTextConfig(
            vocab_size=vocab, hidden_size=int(get_value(cfg, "hidden_size", where, int)),
            intermediate_size=int(get_value(cfg, "intermediate_size", where, int)),
            num_hidden_layers=int(get_value(cfg, "num_hidden_layers", where, int)),
            num_attention_heads=int(get_value(cfg, "num_attention_heads", where, int)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 77)), hidden_act=act,
            layer=LayerChoice.LAST, **{**defaults, **ids})
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def bert_config_from_diffusers(cfg: Mapping[str, Any], where: str) -> BertConfig:
    """LDMBertConfig -> BertConfig."""
    if cfg.get("activation_function", "gelu") != "gelu":
        raise CheckpointError(f"{where}: activation_function={cfg['activation_function']!r} is not "
                              f"supported (gelu)")
    d_model = int(get_value(cfg, "d_model", where, int))
    ffn = int(cfg.get("encoder_ffn_dim", 4 * d_model))
    if ffn % d_model:
        raise CheckpointError(f"{where}: encoder_ffn_dim={ffn} is not a multiple of d_model={d_model}")
    return BertConfig(vocab_size=int(get_value(cfg, "vocab_size", where, int)), n_embed=d_model,
                      n_layer=int(get_value(cfg, "encoder_layers", where, int)),
                      heads=int(cfg.get("encoder_attention_heads", 8)), dim_head=int(cfg.get("head_dim", 64)),
                      ff_mult=ffn // d_model, max_seq_len=int(cfg.get("max_position_embeddings", 77)),
                      pad_token_id=int(cfg.get("pad_token_id", 0)))


# --- weights ------------------------------------------------------------------------------

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


