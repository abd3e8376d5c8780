"""The named colours of ink and background, and the nearest name to a measured colour.

A leaf of the digits package (numpy and errors only): the prompts, the renderer and the judge all
name colours through this one palette.
"""
from __future__ import annotations

import numpy as np

from ldmrt.errors import ConfigError

# Far apart in RGB (the closest pair, yellow and white, differ by 0.8 in blue), so that the nearest
# palette colour to a rendered or generated pixel is never in doubt.
COLOURS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.7, 0.2),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.95, 0.85, 0.2),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
# A plain sample: dark ink on a light background, its prompt names no colour.
PLAIN_INK, PLAIN_BACKGROUND = "black", "white"

_RGB = np.array([COLOURS[name] for name in COLOUR_NAMES], dtype=np.float64)     # (K, 3)


def colour_rgb(name: str, *, field: str = "colour") -> np.ndarray:
    """The palette colour `name` as float32 RGB (3,)."""
    if name not in COLOURS:
        raise ConfigError(f"{field} {name!r}: expected one of the palette's colours {list(COLOUR_NAMES)}",
                          field=field)
    return np.asarray(COLOURS[name], dtype=np.float32)


def nearest_colours(rgb: np.ndarray) -> list[str]:
    """The palette name nearest (Euclidean in RGB) to each colour of `rgb` (N, 3)."""
    rgb = np.asarray(rgb, dtype=np.float64).reshape(-1, 3)
    distance = np.linalg.norm(rgb[:, None, :] - _RGB[None, :, :], axis=-1)     # (N, K)
    return [COLOUR_NAMES[k] for k in distance.argmin(axis=1)]
