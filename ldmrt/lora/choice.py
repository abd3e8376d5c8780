"""Which adapter, at which scale: `FILE[:SCALE]` as the command line and requests write it. Torch-free."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ldmrt.errors import LoraError


@dataclass(frozen=True)
class LoraChoice:
    """One adapter to apply: its file and scale (`FILE[:SCALE]` on the command line)."""
    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str, field_name: str = "lora") -> "LoraChoice":
        """`FILE` or `FILE:SCALE` (a path may itself hold ':'; the scale is what follows the last)."""
        head, sep, tail = str(text).rpartition(":")
        if sep and head and _is_number(tail):
            return cls.of(head, float(tail), field_name)
        return cls.of(text, 1.0, field_name)

    @classmethod
    def of(cls, path, scale, field_name: str = "lora") -> "LoraChoice":
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise LoraError(f"{field_name} {path}: scale {scale!r}: expected a finite number", field=field_name)
        return cls(Path(path), float(scale))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
