"""Image files in and out: PNG via Pillow, float32 [B, H, W, 3] in [0, 1] as .npy."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ldmrt.atomic import atomic_write
from ldmrt.errors import GenerationError


def write_images(images: np.ndarray, out: Path) -> list[Path]:
    """`.npy`: one array; `.png`: one file per image (name-0.png, name-1.png for a batch). Atomic."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npy":
        atomic_write(out, lambda f: np.save(f, images.astype(np.float32)))
        return [out]
    from PIL import Image

    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for path, image in zip(paths, images):
        pixels = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        atomic_write(path, lambda f, p=pixels: Image.fromarray(p).save(f, format="PNG"))
    return paths


def read_image(path: Path) -> np.ndarray:
    """An image file as float32 [H, W, 3] in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise GenerationError(f"--init-image {path}: cannot read an image ({exc})") from None


