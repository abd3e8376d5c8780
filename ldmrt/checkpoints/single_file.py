"""An original single file (+ a preset, a YAML, or neither) -> config + CompVis weights.

Where the config comes from, in order: an explicit YAML, a YAML with the checkpoint's stem next
to it (the AUTOMATIC1111 convention), a preset, else the tensor shapes with the family's
conventions. The noise schedule: the YAML or preset; else the `betas` buffer; else the family's.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import torch

from ldmrt.config import AutoencoderKind, Family, ModelConfig, PredictionType, SchedulerConfig
from ldmrt.presets import PRESETS, preset as get_preset
from ldmrt.errors import CheckpointError, ConfigError, LdmrtError
from ldmrt.models import LatentDiffusion
from ldmrt.weight_files import read_weights
from ldmrt.checkpoints.original import (UNET, clean_keys, detect, ema_as_model, infer_autoencoder,
                                        infer_conditioner, infer_second_conditioner, infer_unet)
from ldmrt.checkpoints.schedule import describe_schedule, schedule_from_betas
from ldmrt.checkpoints.state import Assembly, cast_to_float32, dtype_counts
from ldmrt.checkpoints.tokenizer_assets import read_tokenizer_folder
from ldmrt.checkpoints.yaml_config import config_from_yaml, read_yaml
from ldmrt.checkpoints.yaml_sgm import config_from_sgm, is_sgm
from ldmrt.checkpoints.yaml_spatial import spatial_from_shapes

_LDM_SCHEDULE = SchedulerConfig(beta_start=0.0015, beta_end=0.0195)


def sidecar_yaml(path: Path) -> Path | None:
    candidate = path.with_suffix(".yaml")
    return candidate if candidate.is_file() else None


def read_single_file(path: Path, *, preset_name: str | None, yaml_path: Path | None,
                     tokenizer_dir: Path | None, ema: bool | None = None) -> Assembly:
    """Weights of an original checkpoint and the config that describes them. `ema`: which UNet
    weights a file with both sets gives (None: the non-EMA set, as diffusers' extract_ema=False;
    a file with one set gives that one, and asking for the other is refused)."""
    where = str(path)
    if ema is not None and not isinstance(ema, bool):
        raise ConfigError(f"ema {ema!r}: expected True (the EMA UNet weights), False (the non-EMA ones) or "
                          f"None (the non-EMA ones when the file has both)", field="ema")
    weights = read_weights(path)
    cleaned = clean_keys(weights.tensors, where)
    use_ema, unet_weights = choose_unet_weights(cleaned.state, cleaned.ema_state, ema, where)
    notes, warnings = list(cleaned.notes), []
    if weights.extras:
        shown = ", ".join(f"{k}={v}" for k, v in list(weights.extras.items())[:6])
        notes.append(f"ignored non-tensor entries: {shown}")
    detection = detect(cleaned.state, cleaned.openclip, where, cleaned.xl)
    ids = {}
    if tokenizer_dir is not None and detection.conditioner in ("clip", "openclip", "sdxl", "sdxl_refiner"):
        ids = read_tokenizer_folder(tokenizer_dir).clip_ids()

    if yaml_path is None and preset_name is None:
        yaml_path = sidecar_yaml(path)
        if yaml_path is not None:
            notes.append(f"using {yaml_path.name} found next to the checkpoint")
    if yaml_path is not None and preset_name is not None:
        raise ConfigError("pass either a preset or a YAML config, not both")
    inferred = False
    if yaml_path is not None:
        data = read_yaml(yaml_path)
        read = config_from_sgm if is_sgm(data) else config_from_yaml
        config, yaml_notes = read(yaml_path, data, cleaned.state, detection, ids, path.stem)
        notes += yaml_notes
        source = f"the YAML {yaml_path}"
    elif preset_name is not None:
        config = dataclasses.replace(get_preset(preset_name), name=path.stem)
        source = f"preset {preset_name!r}"
        if config.family != detection.family:
            warnings.append(f"preset {preset_name!r} is a {config.family.value} model but the keys say "
                            f"{detection.evidence}")
    else:
        config, assumptions = infer_config(cleaned.state, detection, ids, path.stem, where)
        warnings += assumptions
        source, inferred = "the tensor shapes (no preset or YAML given)", True

    config, schedule_notes, schedule_warnings = _schedule_and_scale(
        config, cleaned.betas, cleaned.scale_factor, inferred, source, where)
    notes += schedule_notes
    warnings += schedule_warnings
    state = cleaned.state
    if use_ema:
        with torch.device("meta"):
            expected = [k for k in LatentDiffusion(config).state_dict() if k.startswith(UNET)]
        state = {**{k: v for k, v in state.items() if not k.startswith(UNET)},
                 **ema_as_model(cleaned.ema_state, expected)}
    notes.append(f"UNet weights: {unet_weights}")
    explain = None if yaml_path is None else functools.partial(yaml_unet_hint, config.unet, state, detection, where)
    dtypes = dtype_counts(state)
    state, cast_note = cast_to_float32(state, where)
    notes += [cast_note] if cast_note else []
    return Assembly(format=weights.format, config=config, state=state, config_source=source,
                    detected=detection.evidence, notes=notes, warnings=warnings, tokenizer_dir=tokenizer_dir,
                    dtypes=dtypes, ema_tensors=len(cleaned.ema_state), unet_weights=unet_weights,
                    explain_mismatch=explain)


# UNetConfig fields the weights' shapes show, under the CompVis YAML's own names
_SHAPE_FIELDS = ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                 "attention_resolutions", "context_dim", "use_spatial_transformer", "use_linear_in_transformer",
                 "num_classes")


def yaml_unet_hint(unet, state, detection, where: str) -> str | None:
    """For weights that do not fit the model a YAML describes: which of the YAML's UNet fields differ
    from what the shapes say, by their YAML path (None when none does, or the shapes cannot be read)."""
    try:
        inferred, _ = infer_unet(state, detection, where)
    except LdmrtError:
        return None
    wrong = [f"model.params.unet_config.params.{name} is {_yaml_value(getattr(unet, name))}, the weights say "
             f"{_yaml_value(getattr(inferred, name))}" for name in _SHAPE_FIELDS
             if getattr(unet, name) != getattr(inferred, name)]
    return "; ".join(wrong) or None


def _yaml_value(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else \
        str(list(value)) if isinstance(value, tuple) else str(value)


def choose_unet_weights(state, ema_state, ema: bool | None, where: str) -> tuple[bool, str]:
    """(load the EMA set?, how to say which set loaded) for a file's plain and EMA UNet weights."""
    plain, averaged = any(k.startswith(UNET) for k in state), bool(ema_state)
    if ema is True and not averaged:
        raise CheckpointError(f"{where}: ema=True (--ema) asks for the EMA UNet weights, but the file holds "
                              f"none (no model_ema.* tensors); drop --ema", field="ema")
    if ema is False and not plain:
        raise CheckpointError(f"{where}: ema=False (--no-ema) asks for the non-EMA UNet weights, but the file "
                              f"holds only EMA ones (model_ema.*); drop --no-ema", field="ema")
    if not averaged:
        return False, "non-EMA (model.diffusion_model.*; the file holds no EMA set)"
    if not plain:
        return True, "EMA (model_ema.*; the file holds only EMA weights)"
    if ema:
        return True, "EMA (model_ema.*, asked by --ema; the file's non-EMA set is not used)"
    chosen = "asked by --no-ema" if ema is False else "the default; --ema loads the EMA set"
    return False, f"non-EMA (model.diffusion_model.*, {chosen}; the file's {len(ema_state)} EMA tensors are not used)"


def infer_config(state, detection, ids, name: str, where: str) -> tuple[ModelConfig, list[str]]:
    """The whole ModelConfig from shapes; the assumptions it had to make, to warn about."""
    if not any(k.startswith(UNET) for k in state):
        raise CheckpointError(f"{where}: only EMA weights (model_ema.*) and no preset or YAML: the "
                              f"architecture cannot be read from EMA names; pass a preset or YAML")
    unet, heads = infer_unet(state, detection, where)
    autoencoder = infer_autoencoder(state, detection.autoencoder, where)
    conditioner, text = infer_conditioner(state, detection, ids, where)
    conditioner_2 = infer_second_conditioner(state, detection, ids, where)
    assumptions = [a for a in (heads, text) if a]
    match = next((p for p in PRESETS.values() if (p.unet, p.autoencoder, p.conditioner, p.conditioner_2) ==
                  (unet, autoencoder, conditioner, conditioner_2)), None)
    rescaler = state.get("cond_stage_model.channel_mapper.weight")
    try:
        spatial = match.spatial if match is not None else spatial_from_shapes(
            unet.in_channels, autoencoder.embed_dim, conditioner is not None, unet.num_classes is not None,
            autoencoder.downsampling_factor, None if rescaler is None else tuple(rescaler.shape),
            "cond_stage_model.channel_mapper.bias" in state)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if spatial is not None and match is None:
        assumptions.append(f"UNet in_channels {unet.in_channels}: read as a model that {spatial.describe()} "
                           f"(pass the model's YAML if not)")
    if match is not None:
        scheduler, scale, size = match.scheduler, match.scale_factor, match.default_image_size
        assumptions = [f"architecture matches preset {match.name!r}; its scheduler and latent scale are used"]
    else:
        xl = detection.family in (Family.SDXL, Family.SDXL_REFINER)
        scheduler = {Family.SD1: SchedulerConfig(),
                     Family.SD2: SchedulerConfig(prediction_type=PredictionType.V_PREDICTION),
                     Family.SDXL: PRESETS["sdxl"].scheduler, Family.SDXL_REFINER: PRESETS["sdxl"].scheduler}.get(
            detection.family, SchedulerConfig() if detection.conditioner == "bert" else _LDM_SCHEDULE)
        scale = 1.0 if detection.autoencoder == AutoencoderKind.VQ else PRESETS["sdxl"].scale_factor if xl else 0.18215
        size = {Family.SD1: 512, Family.SD2: 768, Family.SDXL: 1024, Family.SDXL_REFINER: 1024}.get(detection.family, 256)
    if detection.family == Family.SD2:
        assumptions.append("SD 2.x files do not record the prediction type: v_prediction assumed (the "
                           "768-v models); 512-base models predict epsilon: pass the model's YAML "
                           "(v2-inference.yaml) or a preset")
    try:
        config = ModelConfig(name=name, family=detection.family, unet=unet, autoencoder=autoencoder,
                             conditioner=conditioner, scheduler=scheduler, scale_factor=scale,
                             default_image_size=size, spatial=spatial, conditioner_2=conditioner_2,
                             force_zeros_for_empty_prompt=detection.family == Family.SDXL)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: the inferred components do not fit together: {exc}") from None
    return config, assumptions


def _schedule_and_scale(config: ModelConfig, betas: torch.Tensor | None, scale: float | None,
                        inferred: bool, source: str, where: str) -> tuple[ModelConfig, list[str], list[str]]:
    """The schedule from the betas buffer (when nothing explicit was given) and the scale buffer."""
    notes, warnings = [], []
    if betas is not None:
        found = schedule_from_betas(betas.double().numpy(), config.scheduler)
        if found is None:
            warnings.append(f"the betas buffer matches none of ldmrt's schedules (linear, scaled_linear, "
                            f"squaredcos_cap_v2); kept {describe_schedule(config.scheduler)}")
        elif inferred:
            config = dataclasses.replace(config, scheduler=found)
            notes.append(f"noise schedule read from the betas buffer: {describe_schedule(found)}")
        elif _schedule_key(found) != _schedule_key(config.scheduler):
            raise CheckpointError(f"{where}: the betas buffer ({describe_schedule(found)}) contradicts "
                                  f"{source} ({describe_schedule(config.scheduler)}); check the config")
    if scale is not None and not math.isclose(scale, config.scale_factor, rel_tol=1e-6):
        # CompVis registers `scale_factor` as a buffer only with scale_by_std: the measured value wins.
        notes.append(f"latent scale factor {scale:g} from the checkpoint's scale_factor buffer "
                     f"(replaces {config.scale_factor:g})")
        config = dataclasses.replace(config, scale_factor=scale)
    return config, notes, warnings


def _schedule_key(config: SchedulerConfig) -> tuple:
    if config.beta_schedule.value == "squaredcos_cap_v2":
        return config.beta_schedule, config.num_train_timesteps
    return (config.beta_schedule, config.num_train_timesteps, round(config.beta_start, 9),
            round(config.beta_end, 9))
