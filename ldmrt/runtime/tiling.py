"""Tiled VAE decoding and encoding: images larger than the VAE graphs' exported range.

The latent (or image) is cut into overlapping tiles no larger than the graph's range; each tile
runs through the graph on its own and the results are blended with linear ramps over the
overlaps (weights that sum to one everywhere), so a pointwise graph gives back exactly the untiled
result. A real decoder differs from its untiled self by more than seams: each tile normalizes
with its own GroupNorm statistics and attends within itself only. Larger tiles and overlaps shrink
that; the error on the trained digits decoder and a random SD-shaped one is measured in
tests/test_tiling.py and docs/concat-models.md. Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

Run = Callable[[np.ndarray], np.ndarray]    # (B, C, h, w) tile -> (B, C', h * scale, w * scale)


@dataclass(frozen=True)
class Tiling:
    """Tiles of at most `tile` (height, width) input pixels, overlapping by at least `overlap`."""
    tile: tuple[int, int]
    overlap: int

    def starts(self, size: int, axis: int) -> list[int]:
        """Tile origins along one axis: evenly spread, the last flush with the end."""
        tile = min(self.tile[axis], size)
        if tile >= size:
            return [0]
        stride = max(tile - self.overlap, 1)
        count = -(-(size - tile) // stride) + 1                   # ceil: the last tile reaches the end
        return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _ramp(length: int, before: int, after: int) -> np.ndarray:
    """1 inside, rising linearly over `before` samples at the start and falling over `after` at the end."""
    weight = np.ones(length, np.float64)
    if before:
        weight[:before] = (np.arange(before) + 0.5) / before
    if after:
        weight[length - after:] = np.minimum(weight[length - after:], (np.arange(after, 0, -1) - 0.5) / after)
    return weight


def run_tiled(run: Run, array: np.ndarray, tiling: Tiling, scale: float, out_channels: int,
              multiple: int = 1) -> np.ndarray:
    """`run` over tiles of `array` (B, C, H, W), blended into (B, out_channels, H * scale, W * scale).
    `scale` is the output size per input pixel (f to decode, 1/f to encode); `multiple` what every
    tile origin and side must be a multiple of (the encoder's factor; H and W are multiples of it)."""
    batch, _, height, width = array.shape
    out_h, out_w = round(height * scale), round(width * scale)
    tile_h = min(tiling.tile[0] // multiple * multiple, height)
    tile_w = min(tiling.tile[1] // multiple * multiple, width)
    ys = sorted({min(y // multiple * multiple, height - tile_h) for y in tiling.starts(height, 0)})
    xs = sorted({min(x // multiple * multiple, width - tile_w) for x in tiling.starts(width, 1)})
    total = np.zeros((batch, out_channels, out_h, out_w), np.float64)
    weights = np.zeros((out_h, out_w), np.float64)
    span_h, span_w = round(tile_h * scale), round(tile_w * scale)          # a tile's output size
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            piece = np.asarray(run(np.ascontiguousarray(array[:, :, y:y + tile_h, x:x + tile_w])), np.float64)
            oy, ox = round(y * scale), round(x * scale)
            # ramps only over the overlap with a neighbour: the image's own borders keep full weight
            window = np.outer(
                _ramp(span_h, round(ys[iy - 1] * scale) + span_h - oy if iy else 0,
                      oy + span_h - round(ys[iy + 1] * scale) if iy + 1 < len(ys) else 0),
                _ramp(span_w, round(xs[ix - 1] * scale) + span_w - ox if ix else 0,
                      ox + span_w - round(xs[ix + 1] * scale) if ix + 1 < len(xs) else 0))
            total[:, :, oy:oy + span_h, ox:ox + span_w] += piece * window
            weights[oy:oy + span_h, ox:ox + span_w] += window
    return (total / weights).astype(np.float32)
