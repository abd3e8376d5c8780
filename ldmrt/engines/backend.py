"""The one list of backends: commands, option classes and messages take their names from here.

Torch-free (standard library only). Names are accepted in any case and with surrounding space
(`ONNXRUNTIME` is onnxruntime): they are identifiers, not paths, and refusing a capital letter
helps nobody; anything else is refused with every choice listed.
"""
from __future__ import annotations

import enum
from typing import Iterable

from ldmrt.errors import ConfigError


class Backend(str, enum.Enum):
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    TENSORRT_RTX = "tensorrt-rtx"
    TORCH = "torch"

    @classmethod
    def parse(cls, value: object, *, field: str = "backend",
              choices: Iterable["Backend"] | None = None) -> "Backend":
        """`value` as one of `choices` (default: every backend), case and surrounding space
        ignored; ConfigError naming `field`, what was found and every choice otherwise."""
        allowed = tuple(cls) if choices is None else tuple(choices)
        text = value.value if isinstance(value, Backend) else value
        if isinstance(text, str):
            for backend in allowed:
                if backend.value == text.strip().lower():
                    return backend
        raise ConfigError(f"{field} {text!r}: expected one of {names(allowed)} (any case)",
                          field=field)


# What `ldmrt build` builds for: engines (TensorRT, TensorRT-RTX) or ONNX Runtime's graph cache.
ENGINE_BACKENDS = (Backend.TENSORRT, Backend.TENSORRT_RTX)
BUILD_BACKENDS = ENGINE_BACKENDS + (Backend.ONNXRUNTIME,)


def names(backends: Iterable[Backend]) -> str:
    """'onnxruntime, tensorrt' — the form every message lists choices in."""
    return ", ".join(b.value for b in backends)
