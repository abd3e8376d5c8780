"""Stability's generative-models inference YAMLs (sd_xl_base.yaml, sd_xl_refiner.yaml; model.target
sgm.models.diffusion.DiffusionEngine) -> ModelConfig.

The UNet (network_config) and the VAE (first_stage_config) are read as CompVis' sections are. The
conditioner's emb_models must be SDXL's: the text embedders (base: CLIP-L at layer "hidden",
layer_idx = layers - 2, then bigG; the refiner: bigG alone) on `txt`, then one 256-wide
ConcatTimestepEmbedderND per size id, in SDXL's order. The text encoders' sizes are not in the YAML
(it names pretrained models): they come from the checkpoint's shapes, as for a file without a
YAML. The noise schedule comes from denoiser_config (DiscreteDenoiser, LegacyDDPMDiscretization;
EpsScaling or VScaling); the sampler settings are SDXL's Euler scheduler, as diffusers'
single-file loader gives them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch

from ldmrt.checkpoints.original import Detection, infer_conditioner, infer_second_conditioner
from ldmrt.checkpoints.schedule import scheduler_from_compvis
from ldmrt.checkpoints.yaml_config import SGM_ENGINE, autoencoder_from_section, unet_from_params
from ldmrt.config import Family, ModelConfig
from ldmrt.errors import CheckpointError, ConfigError

TEXT_KEY = "txt"
# the embedders' input keys, in order, and how many ids each size embedder takes
_SIZE_IDS = {"original_size_as_tuple": 2, "crop_coords_top_left": 2, "target_size_as_tuple": 2, "aesthetic_score": 1}
_EXPECTED = {Family.SDXL: (TEXT_KEY, TEXT_KEY, "original_size_as_tuple", "crop_coords_top_left",
                           "target_size_as_tuple"),
             Family.SDXL_REFINER: (TEXT_KEY, "original_size_as_tuple", "crop_coords_top_left", "aesthetic_score")}
_SCALINGS = {"EpsScaling": "eps", "VScaling": "v"}


def is_sgm(data: Mapping[str, Any]) -> bool:
    """Whether a parsed YAML is an SGM DiffusionEngine one."""
    model = data.get("model") if isinstance(data, Mapping) else None
    return isinstance(model, Mapping) and str(model.get("target", "")).endswith(SGM_ENGINE)


def config_from_sgm(path: Path, data: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                    detection: Detection, ids: Mapping[str, int], name: str) -> tuple[ModelConfig, list[str]]:
    """ModelConfig of an SGM DiffusionEngine YAML; the checkpoint's shapes give the text encoders'
    sizes. CheckpointError naming the YAML field that does not fit."""
    where = f"{path}: model.params"
    params = _mapping(data["model"].get("params"), where)
    family = detection.family
    if family not in _EXPECTED:
        raise CheckpointError(f"{where}: an SGM DiffusionEngine YAML; ldmrt reads SDXL base and refiner ones, "
                              f"but the checkpoint's keys say {detection.evidence}")
    notes: list[str] = []
    time_id_dim = _check_embedders(params, family, state, where)
    network = _mapping(params.get("network_config"), f"{where}.network_config")
    if not str(network.get("target", "")).endswith("openaimodel.UNetModel"):
        raise CheckpointError(f"{where}.network_config: target {network.get('target')!r} is not supported; "
                              f"expected sgm.modules.diffusionmodules.openaimodel.UNetModel")
    unet = unet_from_params(_mapping(network.get("params"), f"{where}.network_config.params"), family,
                            f"{where}.network_config.params", notes, time_id_dim, spatial_transformer=True)
    autoencoder = autoencoder_from_section(_mapping(params.get("first_stage_config"),
                                                    f"{where}.first_stage_config"), path)
    conditioner, _ = infer_conditioner(state, detection, ids, str(path))
    from ldmrt.presets import PRESETS

    scheduler = scheduler_from_compvis(_schedule(params, where), f"{where}.denoiser_config", PRESETS["sdxl"].scheduler)
    try:
        config = ModelConfig(
            name=name, family=family, unet=unet, autoencoder=autoencoder, conditioner=conditioner,
            conditioner_2=infer_second_conditioner(state, detection, ids, str(path)), scheduler=scheduler,
            scale_factor=float(params.get("scale_factor", 1.0)), default_image_size=PRESETS["sdxl"].default_image_size,
            force_zeros_for_empty_prompt=family == Family.SDXL)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the YAML does not describe a consistent model: {exc}") from None
    return config, notes


def _check_embedders(params: Mapping[str, Any], family: Family, state: Mapping[str, torch.Tensor], where: str) -> int:
    """The emb_models are SDXL's (see the module's docstring); the size embedders' width."""
    section = f"{where}.conditioner_config"
    conditioner = _mapping(params.get("conditioner_config"), section)
    models = _mapping(conditioner.get("params"), f"{section}.params").get("emb_models")
    if not isinstance(models, list) or not all(isinstance(m, Mapping) for m in models):
        raise CheckpointError(f"{section}.params.emb_models: expected a list of embedders, found {models!r}")
    keys = tuple(m.get("input_key", m.get("input_keys")) for m in models)
    if keys != _EXPECTED[family]:
        raise CheckpointError(f"{section}.params.emb_models: input keys {list(keys)}: expected "
                              f"{list(_EXPECTED[family])} (SDXL {'base' if family == Family.SDXL else 'refiner'})")
    widths = set()
    for i, model in enumerate(models):
        field, target = f"{section}.params.emb_models[{i}]", str(model.get("target", ""))
        options = model.get("params") or {}
        if not isinstance(options, Mapping):
            raise CheckpointError(f"{field}.params: expected a mapping, found {type(options).__name__}")
        if model["input_key"] != TEXT_KEY:
            if not target.endswith("ConcatTimestepEmbedderND"):
                raise CheckpointError(f"{field}: target {target!r} is not supported for {model['input_key']}; "
                                      f"expected ConcatTimestepEmbedderND")
            widths.add(options.get("outdim"))
        elif i == 0 and family == Family.SDXL:
            _check_clip_l(options, target, field, state)
        else:
            _check_bigg(options, target, field)
    if len(widths) != 1 or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
        raise CheckpointError(f"{section}.params.emb_models: outdim {sorted(map(str, widths))}: expected one "
                              f"positive width for every size embedder")
    return widths.pop()


def _check_clip_l(options: Mapping[str, Any], target: str, field: str, state: Mapping[str, torch.Tensor]) -> None:
    """CLIP-L's penultimate hidden state: layer "hidden" at layer_idx = layers - 2."""
    if not target.endswith("FrozenCLIPEmbedder"):
        raise CheckpointError(f"{field}: target {target!r} is not supported; expected FrozenCLIPEmbedder")
    layers = sum(1 for k in state if k.startswith("cond_stage_model.transformer.text_model.encoder.layers.")
                 and k.endswith(".self_attn.q_proj.weight"))
    layer, index = options.get("layer", "last"), options.get("layer_idx")
    if layer != "hidden" or index not in (layers - 2, -2):
        raise CheckpointError(f"{field}.params: layer {layer!r}, layer_idx {index!r}: expected 'hidden' at "
                              f"{layers - 2} (the penultimate of the checkpoint's {layers} layers, as SDXL)")


def _check_bigg(options: Mapping[str, Any], target: str, field: str) -> None:
    """bigG's penultimate layer without the final norm, and its pooled projection."""
    if not target.endswith("FrozenOpenCLIPEmbedder2"):
        raise CheckpointError(f"{field}: target {target!r} is not supported; expected FrozenOpenCLIPEmbedder2")
    # (key, SDXL's value, SGM's default)
    for key, expected, default in (("layer", "penultimate", "last"), ("always_return_pooled", True, False),
                                   ("legacy", False, True)):
        value = options.get(key, default)
        if value != expected:
            shown = f"{value!r}" + ("" if key in options else " (SGM's default)")
            raise CheckpointError(f"{field}.params: {key} {shown}: expected {expected!r} (SDXL's "
                                  f"penultimate hidden state and pooled projection)")


def _schedule(params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """denoiser_config -> CompVis' schedule keys (timesteps, linear_start/end, parameterization)."""
    section = f"{where}.denoiser_config"
    denoiser = _mapping(params.get("denoiser_config"), section)
    if not str(denoiser.get("target", "")).endswith("DiscreteDenoiser"):
        raise CheckpointError(f"{section}: target {denoiser.get('target')!r} is not supported; expected "
                              f"sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser")
    options = _mapping(denoiser.get("params"), f"{section}.params")
    scaling = str(_mapping(options.get("scaling_config"), f"{section}.params.scaling_config").get("target", ""))
    kind = next((v for k, v in _SCALINGS.items() if scaling.endswith(k)), None)
    if kind is None:
        raise CheckpointError(f"{section}.params.scaling_config: target {scaling!r} is not supported; expected "
                              f"{' or '.join(_SCALINGS)}")
    discretization = _mapping(options.get("discretization_config"), f"{section}.params.discretization_config")
    if not str(discretization.get("target", "")).endswith("LegacyDDPMDiscretization"):
        raise CheckpointError(f"{section}.params.discretization_config: target {discretization.get('target')!r} "
                              f"is not supported; expected LegacyDDPMDiscretization")
    steps = dict(discretization.get("params") or {})
    num_idx = options.get("num_idx", 1000)
    if steps.get("num_timesteps", 1000) != num_idx:
        raise CheckpointError(f"{section}.params: num_idx {num_idx!r} differs from the discretization's "
                              f"num_timesteps {steps.get('num_timesteps', 1000)!r}")
    # LegacyDDPMDiscretization's defaults; its "linear" is CompVis' (diffusers' scaled_linear)
    return {"timesteps": num_idx, "linear_start": steps.get("linear_start", 0.00085),
            "linear_end": steps.get("linear_end", 0.012), "beta_schedule": "linear", "parameterization": kind}


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{field}: expected a mapping, found {'nothing' if value is None else type(value).__name__}")
    return value
