"""The manifest's `postprocess` expressions as code: what turns a decoder's output into images.

A bundle declares, per output, the expression the runtime applies (manifest `postprocess`,
checked when the manifest is read); this table is the one place each expression is implemented.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from ldmrt.errors import BundleError


def _unit_range(x: np.ndarray) -> np.ndarray:
    """Decoder pixels in [-1, 1] -> [0, 1], clamped."""
    return np.clip(x / 2.0 + 0.5, 0.0, 1.0)


POSTPROCESSORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"clamp(x / 2 + 0.5, 0, 1)": _unit_range}


def postprocessor(declared: Mapping[str, str], output: str = "images") -> Callable[[np.ndarray], np.ndarray]:
    """The function for `declared[output]` (a manifest's postprocess); BundleError naming it if unknown."""
    expression = declared.get(output)
    if expression not in POSTPROCESSORS:
        raise BundleError(f"postprocess.{output}: expected one of {list(POSTPROCESSORS)}, found "
                          f"{expression!r}; re-export the bundle with this ldmrt", field=f"postprocess.{output}")
    return POSTPROCESSORS[expression]
