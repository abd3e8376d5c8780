"""An original CompVis inference YAML (v1-inference.yaml, v2-inference-v.yaml, the LDM configs)
or an SGM one (sd_xl_base.yaml, sd_xl_refiner.yaml: ldmrt.checkpoints.yaml_sgm) -> ModelConfig. Text-encoder sizes are not in these YAMLs (they name a pretrained model); they
come from the checkpoint's tensor shapes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch

from ldmrt.config import (AutoencoderConfig, AutoencoderKind, BertConfig, ClassEmbedderConfig,
                          ClipTextConfig, Family, LayerChoice, ModelConfig, SDXL_REFINER_TIME_IDS,
                          SDXL_TIME_IDS, UNetConfig, unet_from_levels)
from ldmrt.errors import CheckpointError, ConfigError
from ldmrt.layout import LayoutTokenizerConfig
from ldmrt.checkpoints.original import Detection, infer_conditioner
from ldmrt.checkpoints.schedule import scheduler_from_compvis
from ldmrt.checkpoints.yaml_spatial import cond_stage_target, is_concat_stage, spatial_from_yaml

# openaimodel.UNetModel options we implement only at their default
_UNET_FIXED = {"dims": 2, "use_scale_shift_norm": False,
               "use_new_attention_order": False, "n_embed": None, "num_attention_blocks": None,
               "conv_resample": True, "disable_middle_self_attn": False, "disable_middle_transformer": False}
_UNET_IGNORED = {"use_checkpoint", "use_fp16", "image_size", "legacy", "dropout", "num_heads_upsample",
                 "spatial_transformer_attn_type", "transformer_depth_middle", "adm_in_channels"}
SGM_ENGINE = "DiffusionEngine"       # Stability's generative-models (SDXL): read by ldmrt.checkpoints.yaml_sgm
_MODELS = ("LatentDiffusion", "LatentInpaintDiffusion", "LatentUpscaleDiffusion", "LatentUpscaleFinetuneDiffusion")


def read_yaml(path: Path) -> dict[str, Any]:
    """The parsed YAML, or a CheckpointError naming the file and the problem."""
    try:
        import yaml
    except ImportError:
        raise CheckpointError(f"{path}: reading a YAML config needs pyyaml: pip install pyyaml "
                              f"(or ldmrt[export])") from None
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: YAML config not found")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping with a top-level `model:` key, found "
                              f"{type(data).__name__}")
    return data


def config_from_yaml(path: Path, data: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                     detection: Detection, ids: Mapping[str, int], name: str) -> tuple[ModelConfig, list[str]]:
    """ModelConfig from a CompVis YAML; `state`/`detection` supply the text encoder's sizes."""
    notes: list[str] = []
    model = _section(data, "model", path)
    target = str(model.get("target", ""))
    if not target.endswith(_MODELS):
        raise CheckpointError(f"{path}: model.target {target!r} is not supported; expected "
                              f"ldm.models.diffusion.ddpm.{' / '.join(_MODELS)} or sgm.models.diffusion.{SGM_ENGINE}")
    params = _section(model, "params", path, "model.params")
    unet_section = _section(params, "unet_config", path, "model.params.unet_config")
    unet_params = _section(unet_section, "params", path, "model.params.unet_config.params")
    first_stage = _section(params, "first_stage_config", path, "model.params.first_stage_config")
    cond_stage = params.get("cond_stage_config")
    if cond_stage is None:
        raise CheckpointError(f"{path}: model.params.cond_stage_config missing (use "
                              f"__is_unconditional__ for unconditional models)")

    spatial = spatial_from_yaml(target, params, path)
    conditioner, family = _conditioner(cond_stage, state, detection, ids, path)
    layout = _layout(cond_stage, params, data.get("data"), path)
    unet = unet_from_params(unet_params, family, f"{path}: model.params.unet_config.params", notes)
    autoencoder = autoencoder_from_section(first_stage, path)
    scheduler = scheduler_from_compvis(params, f"{path}: model.params")
    image_size = unet_params.get("image_size") or params.get("image_size")
    try:
        config = ModelConfig(
            name=name, family=family, unet=unet, autoencoder=autoencoder, conditioner=conditioner,
            scheduler=scheduler, scale_factor=float(params.get("scale_factor", 1.0)),
            default_image_size=int(image_size) * autoencoder.downsampling_factor if image_size else 512,
            spatial=spatial, layout=layout)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the YAML does not describe a consistent model: {exc}") from None
    return config, notes


def _conditioner(section: Any, state: Mapping[str, torch.Tensor], detection: Detection,
                 ids: Mapping[str, int], path: Path):
    if not isinstance(section, str):
        _mapping(section, path, "model.params.cond_stage_config")
    target = cond_stage_target(section)
    params = {} if isinstance(section, str) else dict(section.get("params") or {})
    where = f"{path}: model.params.cond_stage_config"
    if target == "__is_unconditional__" or is_concat_stage(target):
        return None, Family.LDM          # a concatenated stage: read by yaml_spatial
    if target.endswith(("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder")):
        openclip = target.endswith("FrozenOpenCLIPEmbedder")
        if detection.conditioner not in ("clip", "openclip"):
            raise CheckpointError(f"{where}: {target} names a CLIP text encoder, but the checkpoint has no "
                                  f"CLIP text weights ({detection.evidence})")
        layer = params.get("layer", "last")
        if layer not in ("last", "penultimate"):
            raise CheckpointError(f"{where}: layer {layer!r} is not supported; expected 'last' or "
                                  f"'penultimate' (both followed by the final LayerNorm)")
        shaped = Detection(detection.family, "openclip" if openclip else "clip", detection.autoencoder, "")
        clip, _ = infer_conditioner(state, shaped, ids, str(path))
        assert isinstance(clip, ClipTextConfig)
        choice = LayerChoice.PENULTIMATE if layer == "penultimate" else LayerChoice.LAST
        return dataclasses.replace(clip, layer=choice), Family.SD2 if openclip else Family.SD1
    if target.endswith("BERTEmbedder"):
        try:
            return BertConfig(n_embed=int(params["n_embed"]), n_layer=int(params["n_layer"]),
                              vocab_size=int(params.get("vocab_size", 30522)),
                              max_seq_len=int(params.get("max_seq_len", 77))), Family.LDM
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}.params: BERTEmbedder needs n_embed and n_layer ({exc!r})") from None
    if target.endswith("ClassEmbedder"):
        try:
            return ClassEmbedderConfig(n_classes=int(params.get("n_classes", 1000)),
                                       embed_dim=int(params["embed_dim"])), Family.LDM
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}.params: ClassEmbedder needs embed_dim ({exc!r})") from None
    raise CheckpointError(f"{where}: target {target!r} is not supported; expected FrozenCLIPEmbedder, "
                          f"FrozenOpenCLIPEmbedder, BERTEmbedder, ClassEmbedder or __is_unconditional__")


_LAYOUT_KEYS = ("coordinates_bbox", "objects_bbox")


def _layout(section: Any, params: Mapping[str, Any], data: Any, path: Path) -> LayoutTokenizerConfig | None:
    """A BERTEmbedder with `use_tokenizer: false` over a bounding-box key is the paper's layout
    conditioner: its vocabulary and length fix the tokens' constants (ldmrt.layout); the class
    count is the data section's `no_object_classes` (taming's builder) where it names one, else
    the released model's 352."""
    cond = dict(section.get("params") or {}) if isinstance(section, Mapping) else {}
    if not cond_stage_target(section).endswith("BERTEmbedder") or cond.get("use_tokenizer", True):
        return None
    where = f"{path}: model.params.cond_stage_config"
    key = params.get("cond_stage_key")
    if key not in _LAYOUT_KEYS:
        raise CheckpointError(f"{where}: a BERTEmbedder without its tokenizer over cond_stage_key {key!r}; "
                              f"ldmrt reads token inputs as layouts only ({' or '.join(_LAYOUT_KEYS)})")
    vocab, length = int(cond.get("vocab_size", 30522)), int(cond.get("max_seq_len", 77))
    crop = (length - 2) % 3 == 0            # taming's builder: 3 tokens per object, 2 for the crop
    if length % 3 and not crop:
        raise CheckpointError(f"{where}.params: max_seq_len {length} is neither 3 x objects nor 3 x objects "
                              f"+ 2 crop tokens")
    try:
        return LayoutTokenizerConfig(vocab_size=vocab, max_objects=(length - 2) // 3 if crop else length // 3,
                                     n_classes=_layout_classes(data, min(352, vocab - 1), path), encode_crop=crop)
    except ConfigError as exc:
        raise CheckpointError(f"{where}.params: {exc}") from None


def _layout_classes(data: Any, default: int, path: Path) -> int:
    """`no_object_classes` of data.params.{train,validation}.params, the same in both where both say."""
    found = set()
    splits = data.get("params") if isinstance(data, Mapping) else None
    for split in ("train", "validation"):
        section = splits.get(split) if isinstance(splits, Mapping) else None
        builder = section.get("params") if isinstance(section, Mapping) else None
        if isinstance(builder, Mapping) and "no_object_classes" in builder:
            value = builder["no_object_classes"]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{path}: data.params.{split}.params.no_object_classes {value!r}: expected "
                                      f"a positive integer")
            found.add(value)
    if len(found) > 1:
        raise CheckpointError(f"{path}: data.params: train and validation disagree on no_object_classes "
                              f"{sorted(found)}")
    return found.pop() if found else default


def unet_from_params(params: Mapping[str, Any], family: Family, where: str, notes: list[str],
                     time_id_dim: int = 256, spatial_transformer: bool = False) -> UNetConfig:
    """openaimodel.UNetModel's params (CompVis' unet_config, SGM's network_config) -> UNetConfig;
    `where` names the section in errors; `spatial_transformer`: use_spatial_transformer's default
    (SGM's sd_xl_refiner.yaml leaves it out and has transformers)."""
    for key, expected in _UNET_FIXED.items():
        if params.get(key, expected) != expected:
            raise CheckpointError(f"{where}: {key}={params[key]!r} is not supported (only {expected!r})")
    cross_only = params.get("disable_self_attentions") or []
    if not isinstance(cross_only, list) or not all(isinstance(flag, bool) for flag in cross_only):
        raise CheckpointError(f"{where}: disable_self_attentions {cross_only!r}: expected one bool per level")
    known = {f for f in UNetConfig.__dataclass_fields__} | set(_UNET_FIXED) | _UNET_IGNORED
    unknown = sorted(set(params) - known)
    if unknown:
        notes.append(f"{where}: ignored unknown UNet options {unknown}")
    num_head_channels = int(params.get("num_head_channels", -1))
    num_heads = int(params.get("num_heads", -1))
    if num_heads == -1 and num_head_channels == -1:
        raise CheckpointError(f"{where}: set num_heads or num_head_channels (CompVis requires one)")
    try:
        mult = [int(m) for m in _need(params, "channel_mult", where)]
        model_channels = int(_need(params, "model_channels", where))
        res_blocks = _levels(_need(params, "num_res_blocks", where), len(mult), "num_res_blocks", where)
        depths = _levels(params.get("transformer_depth", 1), len(mult), "transformer_depth", where)
        middle = int(params.get("transformer_depth_middle", depths[-1]))
        return unet_from_levels(
            widths=[model_channels * m for m in mult], res_blocks=res_blocks,
            depths=(tuple((d,) * n for d, n in zip(depths, res_blocks)),
                    tuple((d,) * (n + 1) for d, n in zip(depths, res_blocks)), middle),
            in_channels=int(_need(params, "in_channels", where)),
            out_channels=int(_need(params, "out_channels", where)), model_channels=model_channels,
            attention_resolutions=tuple(int(r) for r in _need(params, "attention_resolutions", where)),
            num_heads=num_heads if num_heads != -1 else 8, num_head_channels=num_head_channels,
            context_dim=_context_dim(params.get("context_dim"), where),
            use_spatial_transformer=bool(params.get("use_spatial_transformer", spatial_transformer)),
            use_linear_in_transformer=bool(params.get("use_linear_in_transformer", False)),
            # CompVis' SD 2.x code runs attention softmax in fp32 (ATTN_PRECISION="fp32")
            upcast_attention=family == Family.SD2, disable_self_attentions=tuple(cross_only) if any(cross_only) else (),
            resblock_updown=bool(params.get("resblock_updown", False)),
            **_class_fields(params, family, where, time_id_dim))
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def _levels(value: Any, levels: int, key: str, where: str) -> list[int]:
    """An int or SGM's list of one int per level."""
    values = list(value) if isinstance(value, list) else [value] * levels
    if len(values) != levels:
        raise CheckpointError(f"{where}: {key} {value}: expected one value per level ({levels})")
    return [int(v) for v in values]


def _context_dim(value: Any, where: str) -> int | None:
    """context_dim: an int, or SGM's list of one per transformer block (all equal)."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"{where}: context_dim {value}: expected one width for every transformer block")
        value = value[0]
    return None if value is None else int(value)


def _class_fields(params: Mapping[str, Any], family: Family, where: str, time_id_dim: int) -> dict[str, Any]:
    """num_classes: a class count, or SGM's "sequential" vector (SDXL's text_time: adm_in_channels)."""
    classes = params.get("num_classes")
    if classes != "sequential":
        if params.get("adm_in_channels") is not None:
            raise CheckpointError(f"{where}: adm_in_channels without num_classes 'sequential' is not supported")
        return {"num_classes": classes}
    if family not in (Family.SDXL, Family.SDXL_REFINER):
        raise CheckpointError(f"{where}: num_classes 'sequential' is supported for SDXL's text_time vector "
                              f"(a CLIP + OpenCLIP bigG conditioner); this model is {family.value}")
    time_ids = SDXL_REFINER_TIME_IDS if family == Family.SDXL_REFINER else SDXL_TIME_IDS
    width = int(_need(params, "adm_in_channels", where))
    return {"text_embeds_dim": width - time_ids * time_id_dim, "time_ids": time_ids, "time_id_dim": time_id_dim}


def autoencoder_from_section(section: Mapping[str, Any], path: Path) -> AutoencoderConfig:
    """model.params.first_stage_config (CompVis' or SGM's) -> AutoencoderConfig."""
    where = f"{path}: model.params.first_stage_config"
    target = str(section.get("target", ""))
    if target.endswith(("AutoencoderKL", "AutoencoderKLInferenceWrapper")):     # the latter: SGM's
        kind = AutoencoderKind.KL
    elif target.endswith(("VQModelInterface", "VQModel")):
        kind = AutoencoderKind.VQ
    else:
        raise CheckpointError(f"{where}: target {target!r} is not supported; expected AutoencoderKL or "
                              f"VQModelInterface")
    params = _section(section, "params", path, "model.params.first_stage_config.params")
    dd = _section(params, "ddconfig", path, "model.params.first_stage_config.params.ddconfig")
    attn_type = dd.get("attn_type", "vanilla")
    if attn_type == "vanilla-xformers":      # the same attention, another kernel
        attn_type = "vanilla"
    if attn_type not in ("vanilla", "none"):
        raise CheckpointError(f"{where}: ddconfig.attn_type {attn_type!r} is not supported; expected "
                              f"'vanilla', 'vanilla-xformers' or 'none'")
    if bool(dd.get("double_z", True)) != (kind == AutoencoderKind.KL):
        raise CheckpointError(f"{where}: double_z={dd.get('double_z')} does not fit a {kind.value} autoencoder")
    try:
        ch_mult = tuple(int(m) for m in _need(dd, "ch_mult", where))
        resolution = int(dd.get("resolution", 256))
        attn = {int(r) for r in dd.get("attn_resolutions", [])}
        return AutoencoderConfig(
            kind=kind, embed_dim=int(_need(params, "embed_dim", where)),
            z_channels=int(_need(dd, "z_channels", where)), in_channels=int(dd.get("in_channels", 3)),
            out_ch=int(dd.get("out_ch", 3)), ch=int(_need(dd, "ch", where)),
            ch_mult=ch_mult, num_res_blocks=int(_need(dd, "num_res_blocks", where)),
            # CompVis adds attention where the current resolution (resolution / 2**level) is listed
            attn_levels=() if attn_type == "none" else
            tuple(i for i in range(len(ch_mult)) if resolution // 2 ** i in attn),
            n_embed=int(params.get("n_embed", 0)), mid_attention=attn_type != "none")
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def _section(data: Mapping[str, Any], key: str, path: Path, dotted: str | None = None) -> Mapping[str, Any]:
    value = data.get(key) if isinstance(data, Mapping) else None
    return _mapping(value, path, dotted or key)


def _mapping(value: Any, path: Path, dotted: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        found = "nothing" if value is None else type(value).__name__
        raise CheckpointError(f"{path}: expected a mapping at {dotted}, found {found}; is this a CompVis "
                              f"inference YAML (model: target/params)?")
    return value


def _need(params: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in params:
        raise CheckpointError(f"{where}: {key} missing")
    return params[key]

