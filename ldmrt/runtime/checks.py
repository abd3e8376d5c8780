"""Checks of one request value: the numbers and arrays a GenerationRequest carries, each error
naming its field (`LdmrtError.field`)."""
from __future__ import annotations

import math

import numpy as np

from ldmrt.errors import GenerationError, ShapeError


def show(value) -> str:
    """A value as a message shows it: strings quoted, numpy scalars as plain numbers."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, np.generic):
        return str(value.item())
    return str(value)


def is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def integer(name: str, value, least: int | None = None, below: int | None = None) -> int:
    """A Python or numpy integer (never a bool) as int, in [least, below)."""
    if not is_integer(value):
        raise GenerationError(f"{name} {show(value)}: expected an integer, found {type(value).__name__}",
                              field=name)
    value = int(value)
    if (least is not None and value < least) or (below is not None and value >= below):
        bound = f">= {least}" + (f" and < 2**{below.bit_length() - 1}" if below is not None else "")
        raise GenerationError(f"{name} {value}: expected an integer {bound}", field=name)
    return value


def real(name: str, value, finite: bool = True) -> float:
    """A Python or numpy real number (never a bool) as float; finite unless told."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise GenerationError(f"{name} {show(value)}: expected a number, found {type(value).__name__}",
                              field=name)
    value = float(value)
    if finite and not math.isfinite(value):
        raise GenerationError(f"{name} {value}: expected a finite number", field=name)
    return value


def check_array(name: str, array, shape: tuple[int, ...], first_axis_one: bool = False,
                unit_range: bool = False, classes: int | None = None) -> None:
    """A float numpy array of `shape` (first axis 1 allowed too), finite, in [0, 1] when told; with
    `classes`, an integer array of class indices in [0, classes) instead."""
    if not isinstance(array, np.ndarray):
        raise ShapeError(f"{name}: expected a numpy array, found {type(array).__name__}", field=name)
    wanted = list(shape)
    if first_axis_one:
        ok = array.ndim == len(shape) and array.shape[1:] == tuple(shape[1:]) and array.shape[0] in (1, shape[0])
        wanted = [shape[0] if shape[0] == 1 else f"1 or {shape[0]}", *shape[1:]]
    else:
        ok = array.shape == tuple(shape)
    if not ok:
        expected = "[" + ", ".join(map(str, wanted)) + "]"
        raise ShapeError(f"{name}: expected shape {expected}, found {list(array.shape)}", field=name)
    if classes is not None:
        if array.dtype.kind not in "iu":
            raise GenerationError(f"{name}: expected an integer array of class indices, found dtype "
                                  f"{array.dtype}", field=name)
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= classes:
            raise GenerationError(f"{name}: expected class indices in [0, {classes}), found values in "
                                  f"[{low}, {high}]", field=name)
        return
    if array.dtype.kind != "f":
        raise ShapeError(f"{name}: expected a float array, found dtype {array.dtype}", field=name)
    finite = np.isfinite(array)
    if not finite.all():
        raise GenerationError(f"{name}: expected finite values, found {int(finite.size - finite.sum())} "
                              f"NaN/Inf", field=name)
    if unit_range and (array.min() < 0.0 or array.max() > 1.0):
        raise GenerationError(f"{name}: expected values in [0, 1], found values in "
                              f"[{float(array.min()):g}, {float(array.max()):g}]", field=name)


def check_handoff(request, shape: tuple[int, ...]) -> None:
    """A GenerationRequest's SDXL hand-off fields: denoising_start continues `init_latents` (the
    base's latents, of the latent `shape`) and takes no image or strength; the fractions' values
    are make_plan's to check."""
    if request.denoising_start is None:
        if request.init_latents is not None:
            raise GenerationError("init_latents: the base's latents continue a hand-off; pass "
                                  "denoising_start too", field="init_latents")
        return
    for name in ("init_image", "strength"):
        if getattr(request, name) is not None:
            raise GenerationError(f"{name}: denoising_start continues the base's latents (init_latents) "
                                  f"with the rest of the schedule; it takes no {name}", field=name)
    if request.init_latents is None:
        raise GenerationError("init_latents: denoising_start needs the latents the base returned with "
                              "denoising_end (GenerationResult.latents)", field="init_latents")
    check_array("init_latents", request.init_latents, shape)
