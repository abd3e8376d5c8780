"""Concatenation conditioning at run time: a request's image, mask, noise level or segmentation
map -> the maps the UNet concatenates to the latents (ldmrt.config.SpatialConditioning).

Torch-free. `check_fields` and `check_arrays` run before any model does; `concat_maps` builds
the (B, ...) maps once per call (the loop stacks them for both halves of guidance) and
`paste_back` puts the kept pixels back where the model says so.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ldmrt.config import ConcatKind, ModelConfig
from ldmrt.errors import GenerationError
from ldmrt.runtime.checks import check_array, integer

FIELDS = ("image", "mask", "noise_level", "segmentation")
Encode = Callable[[np.ndarray, np.random.Generator], np.ndarray]   # pixels (B, 3, H, W) in [-1, 1] -> latents


def model_kind(config: ModelConfig) -> str:
    """What kind of concat model it is, as a message names it (\"an inpainting model\")."""
    spatial = config.spatial
    if spatial is None:
        return "not concat-conditioned"
    if spatial.is_inpainting:
        return "an inpainting model"
    if spatial.is_super_resolution:
        return "a super-resolution model"
    return "a semantic-synthesis model"


def needed_fields(config: ModelConfig) -> tuple[set[str], set[str]]:
    """(fields a request must give, fields it may give) for this model's concatenated maps."""
    spatial = config.spatial
    if spatial is None:
        return set(), set()
    needed = set()
    if spatial.is_inpainting or spatial.is_super_resolution:
        needed.add("image")
    if spatial.is_inpainting:
        needed.add("mask")
    if ConcatKind.SEGMENTATION in spatial.inputs:
        needed.add("segmentation")
    return needed, needed | ({"noise_level"} if spatial.low_res_noise is not None else set())


def encodes_image(config: ModelConfig) -> bool:
    """Whether the maps need the VAE encoder (a masked image's latents)."""
    return config.spatial is not None and ConcatKind.MASKED_IMAGE_LATENTS in config.spatial.inputs


def check_fields(config: ModelConfig, request) -> None:
    """Refuse a map field the model does not take and a missing one it needs; img2img's init_image
    is not how a concat model takes its image."""
    needed, allowed = needed_fields(config)
    what = f"this bundle's model ({config.name}) is {model_kind(config)}"
    for name in FIELDS:
        if getattr(request, name) is not None and name not in allowed:
            takes = f"it takes {', '.join(sorted(allowed))}" if allowed else "it takes none of " + ", ".join(FIELDS)
            raise GenerationError(f"{name}: {what}; {takes}", field=name)
    for name in sorted(needed):
        if getattr(request, name) is None:
            raise GenerationError(f"{name}: {what}; it needs {name}", field=name)
    if config.spatial is not None and request.init_image is not None:
        advice = ("pass the image to inpaint as `image` (strength applies to it)" if config.spatial.is_inpainting
                  else "it has no img2img mode")
        raise GenerationError(f"init_image: {what}; {advice}", field="init_image")
    if request.strength is not None and config.spatial is not None and not config.spatial.is_inpainting:
        raise GenerationError(f"strength: {what}; strength applies to inpainting and img2img only",
                              field="strength")


def map_size(config: ModelConfig, request) -> tuple[int, int, str] | None:
    """(height, width, field) in pixels the request's maps fix (None: they fix none): the image to
    inpaint, the segmentation map, or f times the low-resolution image (its latents are its size)."""
    spatial = config.spatial
    if spatial is None:
        return None
    f = config.downsampling_factor
    for name, scale in (("segmentation", 1), ("image", f if spatial.is_super_resolution else 1)):
        array = getattr(request, name)
        if isinstance(array, np.ndarray) and array.ndim >= 3:
            return array.shape[1] * scale, array.shape[2] * scale, name
    return None


def check_arrays(config: ModelConfig, request, shape: tuple[int, int, int, int]) -> int | None:
    """The maps' shapes, dtypes and ranges against the latent `shape`; the noise level (or None)."""
    spatial = config.spatial
    if spatial is None:
        return None
    batch, _, h, w = shape
    f = config.downsampling_factor
    if request.image is not None:
        side = (h, w) if spatial.is_super_resolution else (h * f, w * f)
        check_array("image", request.image, (batch, *side, 3), first_axis_one=True, unit_range=True)
    if request.mask is not None:
        check_array("mask", request.mask, (batch, h * f, w * f), first_axis_one=True, unit_range=True)
    if request.segmentation is not None:
        check_array("segmentation", request.segmentation, (batch, h * f, w * f), first_axis_one=True,
                    classes=spatial.rescaler.n_classes)
    noise = spatial.low_res_noise
    if noise is None:
        return None
    if request.noise_level is None:
        return noise.default_noise_level
    level = integer("noise_level", request.noise_level)
    if not 0 <= level <= noise.max_noise_level:
        raise GenerationError(f"noise_level {level}: expected an integer in [0, {noise.max_noise_level}]",
                              field="noise_level")
    return level


def example_fields(config: ModelConfig, height: int, width: int, seed: int = 0) -> dict:
    """Request fields a concat model needs, made up (benchmarks): a random image (at the latent
    size for super-resolution), its right half repainted, or vertical bands of classes."""
    spatial = config.spatial
    if spatial is None:
        return {}
    rng = np.random.default_rng(seed)
    f = config.downsampling_factor
    fields: dict = {}
    if spatial.is_inpainting or spatial.is_super_resolution:
        side = (height // f, width // f) if spatial.is_super_resolution else (height, width)
        fields["image"] = rng.random((1, *side, 3)).astype(np.float32)
    if spatial.is_inpainting:
        mask = np.zeros((1, height, width), np.float32)
        mask[:, :, width // 2:] = 1.0
        fields["mask"] = mask
    if spatial.rescaler is not None:
        bands = np.arange(width) * spatial.rescaler.n_classes // max(width, 1)
        fields["segmentation"] = np.broadcast_to(bands, (1, height, width)).astype(np.int64)
    return fields


def repaint_mask(request, batch: int) -> np.ndarray:
    """(B, H, W) float32: 1 where the image is repainted (mask >= 0.5: white, as diffusers), else 0."""
    return np.broadcast_to(np.asarray(request.mask) >= 0.5, (batch, *request.mask.shape[1:])).astype(np.float32)


def concat_maps(config: ModelConfig, request, shape: tuple[int, int, int, int], encode: Encode,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The UNet's concatenated maps (B rows each) and, for the x4 upscaler, its class labels
    (the request checked by `check_arrays`, its noise level filled in)."""
    spatial, noise_level = config.spatial, request.noise_level
    batch, _, h, w = shape
    f = config.downsampling_factor
    maps: dict[str, np.ndarray] = {}
    repaint = repaint_mask(request, batch) if spatial.is_inpainting else None
    for kind in spatial.inputs:
        if kind == ConcatKind.MASK:
            # nearest downsampling to the latent grid, as diffusers' F.interpolate(mask, size)
            latent_mask = repaint[:, None, ::f, ::f]                           # (B, 1, h, w)
            maps[kind.value] = np.where(latent_mask > 0, spatial.mask_repaint, spatial.mask_keep).astype(np.float32)
        elif kind == ConcatKind.MASKED_IMAGE_LATENTS:
            pixels = to_pixels(request.image, batch)                             # (B, 3, H, W)
            pixels = np.where(repaint[:, None] > 0, np.float32(spatial.masked_pixel), pixels)
            maps[kind.value] = encode(pixels.astype(np.float32), rng)
        elif kind == ConcatKind.LOW_RES_IMAGE:
            low_res = to_pixels(request.image, batch)                            # (B, 3, h, w)
            if spatial.low_res_noise is not None:
                low_res = _noised(config, low_res, noise_level, rng)
            maps[kind.value] = low_res.astype(np.float32)
        else:
            maps[kind.value] = np.ascontiguousarray(np.broadcast_to(
                request.segmentation, (batch, h * f, w * f))).astype(np.int32)
    if spatial.low_res_noise is not None:
        maps["class_labels"] = np.full((batch,), noise_level, np.int32)
    return maps


def to_pixels(image: np.ndarray, batch: int) -> np.ndarray:
    """[B or 1, H, W, 3] in [0, 1] -> (B, 3, H, W) float32 in [-1, 1]."""
    image = np.broadcast_to(np.asarray(image, np.float32), (batch, *image.shape[1:]))
    return np.ascontiguousarray(image.transpose(0, 3, 1, 2)) * 2.0 - 1.0


def _noised(config: ModelConfig, low_res: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """The x4 upscaler's noise augmentation: q_sample of the low-res schedule at `level`."""
    from ldmrt.sampling import training_alphas_cumprod

    alpha_bar = float(training_alphas_cumprod(config.spatial.low_res_noise.schedule)[level])
    noise = rng.standard_normal(low_res.shape).astype(np.float32)
    return np.float32(np.sqrt(alpha_bar)) * low_res + np.float32(np.sqrt(1.0 - alpha_bar)) * noise


def paste_back(config: ModelConfig, request, images: np.ndarray) -> np.ndarray:
    """Inpainting with paste-back (the paper's script): the input image's pixels outside the mask."""
    spatial = config.spatial
    if spatial is None or not spatial.paste_back:
        return images
    repaint = repaint_mask(request, len(images))[..., None]                  # (B, H, W, 1)
    image = np.broadcast_to(np.asarray(request.image, np.float32), images.shape)
    return (repaint * images + (1.0 - repaint) * image).astype(np.float32)


__all__ = ["FIELDS", "check_fields", "check_arrays", "concat_maps", "encodes_image", "example_fields",
           "map_size", "paste_back", "to_pixels"]
