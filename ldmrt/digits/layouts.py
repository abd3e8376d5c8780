"""Layouts of digits: several digits placed by boxes on one canvas, what the built-in
`digits-layout` model trains on (scripts/train_digits_layout.py), and the crops the judge reads.

    random_boxes(rng, count)        non-overlapping square boxes (pixels) anywhere on the 64x64 canvas
    cell_boxes(rng, count)          square boxes in distinct cells of its 2x2 grid, placed freely in the cell
    render_canvas(sources, boxes)   the digits drawn into their boxes, black on white
    layout_of(digits, boxes)        the request form: [{"class": digit, "box": [x0, y0, x1, y1]}] in [0, 1]
    box_crops(images, layouts)      each box of each image, resized to the judge's 32x32
    layout_samples(count, seed)     a deterministic list of (canvas, layout)
    two_digit_layouts(count, seed)  request layouts of two distinct random digits (the trained proof's)
    small_digits(count, seed, side) real digits bicubic-downsampled: image guidance's targets

A box is the frame of a rendered digit (data.render draws the digit over the middle 3/4 of its
frame), so the digit's strokes stay inside the box it is asked for.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ldmrt.digits.data import IMAGE_SIZE, SPLITS, batches, digit_images, render, split_indices
from ldmrt.digits.palette import PLAIN_BACKGROUND, PLAIN_INK
from ldmrt.errors import ConfigError

__all__ = ["CANVAS", "MAX_DIGITS", "BOX_SIDES", "PLACEMENTS", "random_boxes", "cell_boxes", "render_canvas",
           "two_digit_layouts", "other_box_classes", "small_digits", "layout_of", "box_crops",
           "layout_samples"]

CANVAS = 64
MAX_DIGITS = 3                # the layout model's max_objects
BOX_SIDES = (26, 36)          # a box's side in pixels, drawn uniformly (the frame of a 32x32 render)
_CROWDED_SIDES = (22, 30)     # three digits: smaller boxes, or they rarely fit
_COUNT_SHARES = (0.15, 0.7, 0.15)   # one, two, three digits per training canvas
_ATTEMPTS = 500


def random_boxes(rng: np.random.Generator, count: int, sides: tuple[int, int] | None = None
                 ) -> list[tuple[int, int, int, int]]:
    """`count` square boxes (x0, y0, x1, y1) in pixels, inside the canvas and not overlapping, of
    sides in `sides` (default: BOX_SIDES, smaller for three); ConfigError when they do not fit
    after a bounded number of draws."""
    if not 1 <= count <= MAX_DIGITS:
        raise ConfigError(f"count {count}: expected 1 to {MAX_DIGITS} digits per canvas", field="count")
    sides = sides or (BOX_SIDES if count < 3 else _CROWDED_SIDES)
    for _ in range(_ATTEMPTS):
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(count):
            side = int(rng.integers(sides[0], sides[1] + 1))
            x0, y0 = (int(v) for v in rng.integers(0, CANVAS - side + 1, size=2))
            box = (x0, y0, x0 + side, y0 + side)
            if any(_overlap(box, other) for other in boxes):
                break
            boxes.append(box)
        if len(boxes) == count:
            return boxes
    raise ConfigError(f"count {count}: {count} boxes of sides {sides} found no room on the {CANVAS}x{CANVAS} "
                      f"canvas in {_ATTEMPTS} draws", field="count")


def cell_boxes(rng: np.random.Generator, count: int, sides: tuple[int, int] = (26, CANVAS // 2)
               ) -> list[tuple[int, int, int, int]]:
    """`count` square boxes (x0, y0, x1, y1) in pixels, each inside its own cell of the canvas' 2x2
    grid (cells drawn without repeats), its side in `sides` and its place in the cell drawn uniformly."""
    if not 1 <= count <= MAX_DIGITS:
        raise ConfigError(f"count {count}: expected 1 to {MAX_DIGITS} digits per canvas", field="count")
    half = CANVAS // 2
    boxes = []
    for cell in rng.choice(4, size=count, replace=False):
        side = int(rng.integers(sides[0], sides[1] + 1))
        x0, y0 = (int(cell) % 2) * half + int(rng.integers(0, half - side + 1)), \
            (int(cell) // 2) * half + int(rng.integers(0, half - side + 1))
        boxes.append((x0, y0, x0 + side, y0 + side))
    return boxes


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def render_canvas(sources: Sequence[np.ndarray], boxes: Sequence[tuple[int, int, int, int]],
                  rng: np.random.Generator | None = None, augment: bool = False) -> np.ndarray:
    """(64, 64, 3) float32 in [0, 1]: white, each (8, 8) digit of `sources` rendered (data.render)
    and resized into its pixel box; where strokes meet, the darker wins."""
    if len(sources) != len(boxes):
        raise ConfigError(f"boxes: {len(boxes)} boxes for {len(sources)} digits", field="boxes")
    canvas = np.ones((CANVAS, CANVAS, 3), np.float32)
    for source, (x0, y0, x1, y1) in zip(sources, boxes):
        if not (0 <= x0 < x1 <= CANVAS and 0 <= y0 < y1 <= CANVAS):
            raise ConfigError(f"boxes: {(x0, y0, x1, y1)} is not inside the {CANVAS}x{CANVAS} canvas", field="boxes")
        digit = render(source, PLAIN_INK, PLAIN_BACKGROUND, rng, augment)
        resized = np.asarray(Image.fromarray(digit[..., 0]).resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC))
        region = canvas[y0:y1, x0:x1]
        np.minimum(region, np.clip(resized, 0.0, 1.0)[..., None], out=region)
    return canvas


def layout_of(digits: Sequence[int], boxes: Sequence[tuple[int, int, int, int]]) -> list[dict]:
    """The request form of digits in pixel boxes: [{"class": digit, "box": [x0, y0, x1, y1]}], in [0, 1]."""
    return [{"class": int(d), "box": [b / CANVAS for b in box]} for d, box in zip(digits, boxes)]


def box_crops(images: np.ndarray, layouts: Sequence[Sequence[dict]]) -> tuple[np.ndarray, np.ndarray]:
    """(crops (N, 32, 32, 3), classes (N,)): every box of every image (B, H, W, 3), in order,
    resized (bicubic) to the judge's input size."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) != len(layouts):
        raise ConfigError(f"images: expected (B, H, W, 3) with one image per layout ({len(layouts)}), found "
                          f"{images.shape}", field="images")
    crops, classes = [], []
    height, width = images.shape[1:3]
    for image, layout in zip(images, layouts):
        for item in layout:
            x0, y0, x1, y1 = item["box"]
            left, top = int(round(x0 * width)), int(round(y0 * height))
            right, bottom = max(left + 1, int(round(x1 * width))), max(top + 1, int(round(y1 * height)))
            channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[top:bottom, left:right, c]))
                                   .resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)) for c in range(3)]
            crops.append(np.clip(np.stack(channels, axis=-1), 0.0, 1.0))
            classes.append(int(item["class"]))
    return np.stack(crops).astype(np.float32), np.array(classes, np.int64)


PLACEMENTS = {"free": random_boxes, "cells": cell_boxes}


def layout_samples(count: int, seed: int, split: str = "train", augment: bool = True,
                   digits_per_canvas: int | None = None, placement: str = "free") -> list[tuple[np.ndarray, list[dict]]]:
    """`count` (canvas (64, 64, 3), layout) pairs from `split`'s digits, the same for the same
    arguments on every machine; 1-3 digits per canvas (mostly 2) unless `digits_per_canvas`; boxes
    anywhere ("free") or one per cell of the 2x2 grid ("cells")."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement {placement!r}: expected one of {list(PLACEMENTS)}", field="placement")
    if digits_per_canvas is not None and (isinstance(digits_per_canvas, bool) or not isinstance(digits_per_canvas, int)
                                          or not 1 <= digits_per_canvas <= MAX_DIGITS):
        raise ConfigError(f"digits_per_canvas {digits_per_canvas!r}: expected None (1 to {MAX_DIGITS}, mostly 2) "
                          f"or an integer from 1 to {MAX_DIGITS}", field="digits_per_canvas")
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {list(SPLITS)}", field="split")
    images, targets = digit_images()
    pool = split_indices()[SPLITS.index(split)]
    rng = np.random.default_rng([seed, 0x1A70, SPLITS.index(split)])
    out = []
    for _ in range(count):
        n = digits_per_canvas if digits_per_canvas is not None else \
            1 + int(rng.choice(len(_COUNT_SHARES), p=_COUNT_SHARES))
        chosen = pool[rng.choice(len(pool), size=n, replace=False)]
        boxes = PLACEMENTS[placement](rng, n)
        out.append((render_canvas([images[i] for i in chosen], boxes, rng, augment),
                    layout_of(targets[chosen], boxes)))
    return out


def two_digit_layouts(count: int, seed: int, placement: str = "cells") -> list[list[dict]]:
    """`count` request layouts of two distinct random digits, boxes placed as PLACEMENTS[placement]."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement {placement!r}: expected one of {list(PLACEMENTS)}", field="placement")
    rng = np.random.default_rng([seed, 0x2D16])
    return [layout_of(rng.choice(10, size=2, replace=False), PLACEMENTS[placement](rng, 2)) for _ in range(count)]


def other_box_classes(classes: np.ndarray) -> np.ndarray:
    """Of two-box layouts' classes in box_crops' order: each box's other box's class."""
    return np.asarray(classes).reshape(-1, 2)[:, ::-1].reshape(-1)


def small_digits(count: int, seed: int, side: int, split: str = "train") -> tuple[np.ndarray, list[int]]:
    """`count` real digits of `split` (black on white, unaugmented) bicubic-downsampled to side x
    side: (N, side, side, 3) float32 in [0, 1], and their digits. The default split is the one the
    judge never saw, so reading a guided image as its target's digit owes nothing to the judge
    having seen the target."""
    images, _, digits = next(batches(count, seed=seed, split=split, augment=False, coloured_share=0.0))
    small = [np.asarray(Image.fromarray((im * 255).round().astype(np.uint8)).resize((side, side),
                                                                                  Image.Resampling.BICUBIC),
                        np.float32) / 255 for im in images]
    return np.stack(small), [int(d) for d in digits]
