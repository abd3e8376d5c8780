"""Image files in and out: PNG via Pillow, float32 [B, H, W, 3] in [0, 1] as .npy.

Reading checks the size the file declares before a single pixel is decoded (Pillow parses the
header lazily), and converts every mode Pillow opens to float RGB on its own scale (16-bit
grayscale is /65535, not clipped to 8 bits). Writing never replaces a file ldmrt did not write:
an existing PNG is overwritten only when it carries ldmrt's marker (its `Software` text chunk).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ldmrt.atomic import atomic_write
from ldmrt.config import ModelConfig
from ldmrt.errors import GenerationError
from ldmrt.writable import check_folder_writable

# Without a bundle's own limit: 4096 x 4096 pixels (a float32 RGB copy of it is 200 MB).
MAX_IMAGE_PIXELS = 4096 * 4096
MARKER_KEY = "Software"
MARKER = "ldmrt"          # PNG text chunk value prefix: "ldmrt <version>"

_EIGHT_BIT = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def image_paths(images: int, out: Path) -> list[Path]:
    """The files `write_images` writes for `images` images: out itself, or name-0.png, name-1.png, ..."""
    out = Path(out)
    if out.suffix.lower() == ".npy" or images == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(images)]


def check_out(out: Path, images: int) -> None:
    """Refuse, before any work, an --out that cannot be written or would replace a file ldmrt did not write."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".npy"):
        raise GenerationError(f"out {out}: expected a .png or .npy file name", field="out")
    if out.is_dir():
        raise GenerationError(f"out {out}: is a folder; expected a .png or .npy file name", field="out")
    check_folder_writable(out.parent, f"out {out}", GenerationError, field="out")
    for path in image_paths(images, out):
        _check_replaceable(path)


def write_images(images: np.ndarray, out: Path) -> list[Path]:
    """`.npy`: one array; `.png`: one file per image (name-0.png, name-1.png for a batch). Atomic."""
    out = Path(out)
    paths = image_paths(len(images), out)
    check_out(out, len(images))             # again: the folder may have changed during the job
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npy":
        atomic_write(out, lambda f: np.save(f, images.astype(np.float32)))
        return [out]
    for path, image in zip(paths, images):
        atomic_write(path, png_bytes(to_pixels(image)))
    return paths


def to_pixels(images: np.ndarray) -> np.ndarray:
    """float [..., H, W, 3] in [0, 1] -> the uint8 pixels a PNG holds (rounded, clipped)."""
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> a PNG file's bytes, with ldmrt's marker (so ldmrt may replace it later)."""
    import io

    from PIL import Image, PngImagePlugin

    from ldmrt.manifest import LDMRT_VERSION

    info = PngImagePlugin.PngInfo()
    info.add_text(MARKER_KEY, f"{MARKER} {LDMRT_VERSION}")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_image(path: Path, max_size: tuple[int, int] | None = None, field: str = "init_image") -> np.ndarray:
    """An image file as float32 [H, W, 3] in [0, 1]; alpha is dropped (as diffusers' load_image does).

    `max_size` (height, width): the largest image the caller can use (a bundle's exported maximum);
    without it, MAX_IMAGE_PIXELS. Larger files are refused from their header, before decoding.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            _check_declared_size(path, image.size, max_size, field)
            return _float_rgb(path, image, field)
    except GenerationError:
        raise
    except Image.DecompressionBombError as exc:     # Pillow's own, larger limit, raised by open()
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        found = f"{int(declared.group(1)):,} pixels" if declared else "more pixels than Pillow allows"
        raise _too_large(path, found, max_size, field) from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError) as exc:
        raise GenerationError(f"{field} {path}: cannot read an image ({exc})", field=field) from None


def read_maps(config: ModelConfig, image: Path | None, mask: Path | None, segmentation: Path | None,
              max_size: tuple[int, int], height: int | None, width: int | None) -> dict:
    """The CLI's map files as GenerationRequest fields ([1, ...] arrays). Where --height and --width
    are both given, an inpainting image and its mask, or a segmentation map, are resized to them
    (Lanczos; class indices nearest), as diffusers resizes its inputs; a low-res input is not."""
    fields: dict = {}
    spatial = config.spatial
    resize = height is not None and width is not None and not (spatial is not None and spatial.is_super_resolution)
    if resize:
        max_size = None     # resized anyway: any file up to MAX_IMAGE_PIXELS
    if image is not None:
        fields["image"] = _fit(read_image(image, max_size, field="image"), height, width, resize, "lanczos")[None]
    if mask is not None:
        # not clipped: a .npy mask outside [0, 1] is the pipeline's to refuse (Lanczos overshoot is clipped by _fit)
        fields["mask"] = _fit(read_mask(mask, max_size), height, width, resize, "lanczos")[None]
    if segmentation is not None:
        fields["segmentation"] = _fit(read_segmentation(segmentation, max_size), height, width, resize,
                                      "nearest")[None]
    return fields


def _fit(array: np.ndarray, height: int | None, width: int | None, resize: bool, method: str) -> np.ndarray:
    """[H, W] or [H, W, 3] resized to (height, width) when asked and different."""
    if not resize or array.shape[:2] == (height, width) or height <= 0 or width <= 0:
        return array
    from PIL import Image

    if method == "nearest":
        resized = Image.fromarray(array.astype(np.int32)).resize((width, height), Image.Resampling.NEAREST)
        return np.asarray(resized).astype(array.dtype)
    channels = [array] if array.ndim == 2 else [array[..., c] for c in range(array.shape[-1])]
    out = [np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((width, height),
                                                                             Image.Resampling.LANCZOS))
           for c in channels]
    result = out[0] if array.ndim == 2 else np.stack(out, axis=-1)
    return np.clip(result, 0.0, 1.0).astype(np.float32)


MAX_LAYOUT_BYTES = 1 << 20     # a layout file is a few hundred bytes; refuse anything near a megabyte


def read_layout(path: Path) -> list:
    """A layout JSON file (a list of {"class", "box"} objects, or one such list per image), its
    size checked before it is read; its contents are checked by the pipeline (ldmrt.layout)."""
    import json

    try:
        size = Path(path).stat().st_size
        if size > MAX_LAYOUT_BYTES:
            raise GenerationError(f"layout {path}: {size:,} bytes, expected a JSON layout of at most "
                                  f"{MAX_LAYOUT_BYTES:,}", field="layout")
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except GenerationError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GenerationError(f"layout {path}: cannot read a JSON layout ({exc})", field="layout") from None
    if not isinstance(data, list):
        raise GenerationError(f"layout {path}: expected a JSON list of objects, found {type(data).__name__}",
                              field="layout")
    return data


def read_mask(path: Path, max_size: tuple[int, int] | None = None) -> np.ndarray:
    """A repaint mask as float32 [H, W] in [0, 1] (white = repaint, as diffusers): an image file's
    luminance (ITU-R 601, Pillow's "L"), or a 2-D .npy array of floats in [0, 1] or booleans."""
    if Path(path).suffix.lower() == ".npy":
        array = _read_npy(path, "mask", max_size)
        if array.dtype == np.bool_:
            array = array.astype(np.float32)
        if array.dtype.kind != "f":
            raise GenerationError(f"mask {path}: expected a float or bool array, found dtype {array.dtype}",
                                  field="mask")
        return array.astype(np.float32)
    rgb = read_image(path, max_size, field="mask")
    return (rgb @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.float32)


def read_segmentation(path: Path, max_size: tuple[int, int] | None = None) -> np.ndarray:
    """Class indices as int64 [H, W]: a single-channel PNG's values (mode L, P or I, not converted
    to RGB: a palette image's indices are its classes) or a 2-D integer .npy array."""
    if Path(path).suffix.lower() == ".npy":
        array = _read_npy(path, "segmentation", max_size)
        if array.dtype.kind not in "iu":
            raise GenerationError(f"segmentation {path}: expected an integer array of class indices, found "
                                  f"dtype {array.dtype}", field="segmentation")
        return array.astype(np.int64)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            _check_declared_size(path, image.size, max_size, "segmentation")
            if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise GenerationError(f"segmentation {path}: mode {image.mode}: expected a single-channel "
                                      f"image of class indices (L, P or 16-bit grayscale)", field="segmentation")
            return np.asarray(image).astype(np.int64)
    except GenerationError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise GenerationError(f"segmentation {path}: cannot read an image ({exc})", field="segmentation") from None


def _read_npy(path: Path, field: str, max_size: tuple[int, int] | None) -> np.ndarray:
    """A 2-D array from a .npy file, its size checked from the header before the data is read."""
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)      # the header only, no data read
        if mapped.ndim != 2:
            raise GenerationError(f"{field} {path}: expected a 2-D array [H, W], found shape {list(mapped.shape)}",
                                  field=field)
        _check_declared_size(path, (mapped.shape[1], mapped.shape[0]), max_size, field)
        return np.array(mapped)
    except GenerationError:
        raise
    except (OSError, ValueError) as exc:
        raise GenerationError(f"{field} {path}: cannot read a .npy array ({exc})", field=field) from None


def _check_declared_size(path: Path, size: tuple[int, int], max_size: tuple[int, int] | None,
                         field: str) -> None:
    width, height = size
    found = f"{width}x{height} pixels ({width * height:,} pixels)"
    if max_size is None:
        if width * height > MAX_IMAGE_PIXELS:
            raise _too_large(path, found, None, field)
    elif height > max_size[0] or width > max_size[1]:
        raise _too_large(path, found, max_size, field)


def _too_large(path: Path, found: str, max_size: tuple[int, int] | None, field: str) -> GenerationError:
    limit = f"at most {max_size[1]}x{max_size[0]} (width x height, the bundle's exported maximum)" \
        if max_size is not None else f"at most {MAX_IMAGE_PIXELS:,} pixels"
    return GenerationError(f"{field} {path}: the file declares {found}: expected {limit}; "
                           f"refused before decoding (resize the image)", field=field)


def _float_rgb(path: Path, image, field: str) -> np.ndarray:
    """Every Pillow mode on its own scale -> float32 [H, W, 3] in [0, 1]."""
    mode = image.mode
    if mode in _EIGHT_BIT:          # 8 bits per channel (CMYK/YCbCr/LAB/HSV by Pillow's conversion)
        if mode in ("P", "PA"):     # through RGBA: Pillow warns when a palette's transparency goes to RGB
            image = image.convert("RGBA")
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if mode.startswith("I;16") or mode == "I":     # 16-bit grayscale (mode I: 16-bit PNG/TIFF data)
        gray, scale = np.asarray(image).astype(np.float64), 65535.0
    elif mode == "F":
        gray, scale = np.asarray(image).astype(np.float64), 1.0
    else:
        raise GenerationError(f"{field} {path}: mode {mode} is not supported: expected an RGB, "
                              f"grayscale, palette or CMYK image", field=field)
    with np.errstate(invalid="ignore"):
        low, high = float(np.min(gray)), float(np.max(gray))
    if not (np.isfinite(gray).all() and 0.0 <= low and high <= scale):
        raise GenerationError(f"{field} {path}: mode {mode} pixels: expected values in [0, {scale:g}], "
                              f"found values in [{low:g}, {high:g}]", field=field)
    return np.repeat((gray / scale).astype(np.float32)[..., None], 3, axis=-1)


def _check_replaceable(path: Path) -> None:
    if path.is_symlink():
        raise GenerationError(f"out {path}: is a symbolic link; ldmrt replaces only files it wrote: "
                              f"remove it or choose another name", field="out")
    if not path.exists():
        return
    if path.is_dir():
        raise GenerationError(f"out {path}: is a folder; expected a .png or .npy file name", field="out")
    if path.suffix.lower() == ".png" and _written_by_ldmrt(path):
        return
    why = "a .npy file cannot carry ldmrt's marker" if path.suffix.lower() == ".npy" \
        else f"not written by ldmrt (no '{MARKER_KEY}: {MARKER}' text chunk)"
    raise GenerationError(f"out {path}: exists and {why}; ldmrt overwrites only images it wrote: "
                          f"remove it or choose another name", field="out")


def _written_by_ldmrt(path: Path) -> bool:
    """The marker is a text chunk before the pixels: read from the header, nothing decoded."""
    from PIL import Image

    try:
        with Image.open(path, formats=["PNG"]) as image:
            return str(image.info.get(MARKER_KEY, "")).split(" ")[0] == MARKER
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return False          # an unreadable file (a bomb included) is simply not ours
