"""The maps a CompVis / Stability inference YAML concatenates to the latents -> SpatialConditioning.

The YAMLs say it in several ways, all read here:
- LDM (CompVis `LatentDiffusion`): `conditioning_key: concat` (or `concat_mode: true`) with the
  conditioning stage naming what is concatenated: `__is_first_stage__` with cond_stage_key
  masked_image (the paper's inpainting: [masked latents, mask in {-1, +1}], black fill, paste-back),
  `torch.nn.Identity` (super-resolution: the low-res image) or `SpatialRescaler` (semantic maps);
- Stability's subclasses with `conditioning_key: hybrid` (text + concat): `LatentInpaintDiffusion`
  ([mask {0, 1}, masked latents]), `LatentUpscaleDiffusion` (the x4 upscaler: low-res image with
  `low_scale_config` noise augmentation, the level as class label, `hybrid-adm`) and
  `LatentUpscaleFinetuneDiffusion` (`concat_keys: [lr]`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ldmrt.config import (BetaSchedule, ConcatKind, LowResNoise, ResizeMethod, SchedulerConfig,
                          SpatialConditioning, SpatialRescalerConfig)
from ldmrt.errors import CheckpointError, ConfigError

# conditioning_key -> whether the UNet input concatenates maps (None: as the model class says)
_CONCAT_KEYS = {None: False, "crossattn": False, "adm": False, "concat": True, "hybrid": True,
                "hybrid-adm": True}
# cond_stage_config targets that are no text/class encoder: what the concat model takes instead
CONCAT_STAGES = ("__is_first_stage__", "torch.nn.Identity", "SpatialRescaler")
_STABILITY = ("LatentInpaintDiffusion", "LatentUpscaleDiffusion", "LatentUpscaleFinetuneDiffusion")


def conditioning_key(params: Mapping[str, Any], path: Path) -> str | None:
    """The YAML's conditioning key as CompVis' LatentDiffusion resolves it: without one,
    `concat_mode` (default true) decides; a text or class stage without either is cross-attention
    (what such a file can only mean)."""
    key = params.get("conditioning_key")
    if key is None and "concat_mode" in params:
        key = "concat" if params["concat_mode"] else "crossattn"
    elif key is None and is_concat_stage(cond_stage_target(params.get("cond_stage_config"))):
        key = "concat"
    if key not in _CONCAT_KEYS:
        raise CheckpointError(f"{path}: model.params.conditioning_key {key!r} is not supported; expected one "
                              f"of {sorted(k for k in _CONCAT_KEYS if k)}")
    return key


def is_concat_stage(target: str) -> bool:
    return target in CONCAT_STAGES or target.endswith("SpatialRescaler")


def cond_stage_target(section: Any) -> str:
    if isinstance(section, str):
        return section
    return str(section.get("target", "")) if isinstance(section, Mapping) else ""


def spatial_from_yaml(target: str, params: Mapping[str, Any], path: Path) -> SpatialConditioning | None:
    """None for a model whose UNet takes the latents alone."""
    where = f"{path}: model.params"
    key = conditioning_key(params, path)
    model_class = target.rsplit(".", 1)[-1]
    stage = cond_stage_target(params.get("cond_stage_config"))
    if not _CONCAT_KEYS[key]:
        if model_class in _STABILITY:
            raise CheckpointError(f"{where}: {model_class} concatenates maps, but conditioning_key is {key!r}; "
                                  f"expected 'hybrid'")
        if is_concat_stage(stage):
            raise CheckpointError(f"{where}: cond_stage_config {stage!r} is concatenated, but conditioning_key "
                                  f"is {key!r}; expected 'concat'")
        return None
    try:
        if model_class == "LatentInpaintDiffusion":
            keys = list(params.get("concat_keys", ["mask", "masked_image"]))
            if keys != ["mask", "masked_image"]:
                raise CheckpointError(f"{where}: concat_keys {keys}: ldmrt reads LatentInpaintDiffusion's "
                                      f"[mask, masked_image] only")
            return SpatialConditioning(inputs=(ConcatKind.MASK, ConcatKind.MASKED_IMAGE_LATENTS))
        if model_class in ("LatentUpscaleDiffusion", "LatentUpscaleFinetuneDiffusion"):
            return SpatialConditioning(inputs=(ConcatKind.LOW_RES_IMAGE,),
                                       low_res_noise=_low_res_noise(params.get("low_scale_config"), path))
        return _ldm_spatial(params, stage, path)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def _ldm_spatial(params: Mapping[str, Any], stage: str, path: Path) -> SpatialConditioning:
    where = f"{path}: model.params.cond_stage_config"
    if stage == "__is_first_stage__":
        if params.get("cond_stage_key") not in (None, "masked_image"):
            raise CheckpointError(f"{where}: __is_first_stage__ with cond_stage_key "
                                  f"{params.get('cond_stage_key')!r}: ldmrt reads the paper's inpainting "
                                  f"(cond_stage_key masked_image) only")
        # scripts/inpaint.py: masked image in [0, 1] * 2 - 1 (repainted pixels -1), mask in {-1, +1}
        return SpatialConditioning(inputs=(ConcatKind.MASKED_IMAGE_LATENTS, ConcatKind.MASK), mask_keep=-1.0,
                                   mask_repaint=1.0, masked_pixel=-1.0, paste_back=True)
    if stage == "torch.nn.Identity":
        return SpatialConditioning(inputs=(ConcatKind.LOW_RES_IMAGE,))
    if stage.endswith("SpatialRescaler"):
        section = params["cond_stage_config"]
        rescaler = dict(section.get("params") or {}) if isinstance(section, Mapping) else {}
        if rescaler.get("out_channels") is None:
            raise CheckpointError(f"{where}.params: SpatialRescaler without out_channels (no 1x1 conv) is not "
                                  f"supported; ldmrt feeds class indices, which the learned projection maps")
        method = str(rescaler.get("method", "bilinear"))
        try:
            resize = ResizeMethod(method)
        except ValueError:
            raise CheckpointError(f"{where}.params: method {method!r}: expected one of "
                                  f"{[m.value for m in ResizeMethod]}") from None
        try:
            config = SpatialRescalerConfig(n_stages=int(rescaler.get("n_stages", 1)),
                                           n_classes=int(rescaler.get("in_channels", 3)),
                                           out_channels=int(rescaler["out_channels"]),
                                           multiplier=float(rescaler.get("multiplier", 0.5)), method=resize,
                                           bias=bool(rescaler.get("bias", False)))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}.params: {exc}") from None
        return SpatialConditioning(inputs=(ConcatKind.SEGMENTATION,), rescaler=config)
    raise CheckpointError(f"{where}: target {stage!r} with a concat conditioning_key is not supported; "
                          f"expected __is_first_stage__ (inpainting), torch.nn.Identity (super-resolution) "
                          f"or SpatialRescaler (semantic maps)")


def spatial_from_shapes(unet_in: int, latent: int, has_text: bool, has_labels: bool, downsampling: int,
                        rescaler_weight: tuple[int, ...] | None, rescaler_bias: bool) -> SpatialConditioning | None:
    """A single file without a YAML: the maps from the UNet's input channels beyond the latents, by
    the known models' layouts (diffusers' single-file detection reads the same conv_in width).
    CheckpointError where the width fits none of them."""
    extra = unet_in - latent
    if extra == 0:
        return None
    if has_text and extra == latent + 1:                      # SD inpainting
        return SpatialConditioning(inputs=(ConcatKind.MASK, ConcatKind.MASKED_IMAGE_LATENTS))
    if has_text and extra == 3 and has_labels:                # the SD x4 upscaler
        raise CheckpointError("the UNet reads as the SD x4 upscaler's (3 low-res channels, noise-level labels), "
                              "whose attention heads, cross-attention-only levels and noise schedule are not "
                              "in the weights; pass its YAML (x4-upscaling.yaml) or use the diffusers folder")
    if not has_text and rescaler_weight is not None and extra == rescaler_weight[0]:   # semantic synthesis
        stages = max(downsampling.bit_length() - 1, 1)
        return SpatialConditioning(inputs=(ConcatKind.SEGMENTATION,), rescaler=SpatialRescalerConfig(
            n_stages=stages, n_classes=rescaler_weight[1], out_channels=rescaler_weight[0], bias=rescaler_bias))
    if not has_text and extra == 3:                           # LDM super-resolution
        return SpatialConditioning(inputs=(ConcatKind.LOW_RES_IMAGE,))
    if not has_text and extra == latent + 1:                  # the paper's inpainting
        return SpatialConditioning(inputs=(ConcatKind.MASKED_IMAGE_LATENTS, ConcatKind.MASK), mask_keep=-1.0,
                                   masked_pixel=-1.0, paste_back=True)
    raise CheckpointError(f"the UNet takes {unet_in} input channels, {extra} channels beyond the {latent} latent "
                          f"ones, in no layout ldmrt reads from shapes (SD inpainting {2 * latent + 1} with text, "
                          f"LDM super-resolution {latent + 3} and LDM inpainting {2 * latent + 1} without); an "
                          f"original checkpoint's YAML can say what it concatenates")


def _low_res_noise(section: Any, path: Path) -> LowResNoise | None:
    """`low_scale_config: ImageConcatWithNoiseAugmentation` -> LowResNoise (None: no noise augmentation)."""
    if section is None:
        return None
    where = f"{path}: model.params.low_scale_config"
    target = cond_stage_target(section)
    if not target.endswith("ImageConcatWithNoiseAugmentation"):
        raise CheckpointError(f"{where}: target {target!r} is not supported; expected "
                              f"ImageConcatWithNoiseAugmentation")
    params = dict(section.get("params") or {})
    schedule = dict(params.get("noise_schedule_config") or {})
    try:
        timesteps = int(schedule.get("timesteps", 1000))
        # training drew levels in [0, max_noise_level); diffusers' bound is inclusive
        level = min(int(params.get("max_noise_level", 1000)), timesteps - 1)
        # AbstractLowScaleModel.register_schedule: CompVis "linear" = diffusers' scaled_linear
        noise_schedule = SchedulerConfig(num_train_timesteps=timesteps,
                                         beta_start=float(schedule.get("linear_start", 1e-4)),
                                         beta_end=float(schedule.get("linear_end", 2e-2)),
                                         beta_schedule=BetaSchedule.SCALED_LINEAR)
        return LowResNoise(schedule=noise_schedule, max_noise_level=level, default_noise_level=min(20, level))
    except (TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None
