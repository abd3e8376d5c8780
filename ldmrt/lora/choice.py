"""Which adapter, at which scale: `FILE[:SCALE]` as the command line and requests write it; and what
was applied (a file's digest with its scale). Torch-free."""
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

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, Path)):
            raise LoraError(f"lora: expected a file path, found {type(self.path).__name__}", field="lora")
        object.__setattr__(self, "path", Path(self.path))
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise LoraError(f"lora {self.path}: scale {self.scale!r}: expected a finite number", field="lora")
        object.__setattr__(self, "scale", float(self.scale))

    @classmethod
    def parse(cls, text: str, field_name: str = "lora") -> "LoraChoice":
        """`FILE` or `FILE:SCALE` (a path may itself hold ':'; the scale is what follows the last)."""
        head, sep, tail = str(text).rpartition(":")
        if sep and head and _is_number(tail):
            return cls.of(head, float(tail), field_name)
        return cls.of(text, 1.0, field_name)

    @classmethod
    def of(cls, path, scale, field_name: str = "lora") -> "LoraChoice":
        try:
            return cls(path, scale)
        except LoraError as exc:
            raise LoraError(str(exc).replace("lora", field_name, 1), field=field_name) from None


@dataclass(frozen=True)
class LoraRecord:
    """An adapter as a bundle records it (manifest model_source.loras)."""
    path: str              # absolute, as given at export
    sha256: str
    scale: float

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "scale": self.scale}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
