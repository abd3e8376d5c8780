"""The LDM paper's layout tokens (sec. 4.3.1): boxes -> the integer sequence its layout-to-image
model's tau_theta (an unmasked BERT-like transformer) reads.

The scheme is taming-transformers' ObjectsBoundingBoxConditionalBuilder, as the paper's
layout2img model was trained with it (docs/research/layout-and-guidance.md): every box is a
triple (c, l, b) — its class id, then its top-left and bottom-right corners as cells of a
G x G grid (G = floor(sqrt(vocab_size)), cell = round(y (G-1)) G + round(x (G-1)), rounding half
to even as Python's round does) — in the order given, padded with (pad, pad, pad) triples to
`max_objects` (pad = vocab_size - 1), then the crop window's two corner cells (the whole image:
0 and G^2 - 1). Class ids and cells share the vocabulary without offsets: a token's meaning is its
position. Every constant is in `LayoutTokenizerConfig`, which a bundle's manifest records, so a
C++ or Triton client can reproduce the tokens. Torch-free. The model that reads them:
ModelConfig.layout (presets `ldm-layout`, built-in `digits-layout`; docs/layout-and-guidance.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ldmrt.errors import ConfigError, GenerationError

TOKENS_PER_OBJECT = 3        # (class, top-left, bottom-right)
CROP_TOKENS = 2              # the crop window's corners, after the objects


@dataclass(frozen=True)
class LayoutTokenizerConfig:
    """The layout tokens' constants (the released model: 8192 tokens, 30 objects, crop encoded)."""
    kind: ClassVar[str] = "layout"
    vocab_size: int = 8192
    max_objects: int = 30
    n_classes: int = 352               # class ids in [0, n_classes)
    encode_crop: bool = True
    classes: tuple[str, ...] = ()      # names of ids 0, 1, ... (a request may name a class)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_objects", "n_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"LayoutTokenizerConfig.{name}: expected a positive integer, found {value!r}")
        if self.grid < 2:
            raise ConfigError(f"LayoutTokenizerConfig.vocab_size {self.vocab_size}: expected at least 4 "
                              f"(a 2 x 2 grid)")
        if self.grid ** 2 == self.vocab_size:
            raise ConfigError(f"LayoutTokenizerConfig.vocab_size {self.vocab_size}: a perfect square makes the "
                              f"last grid cell the pad token; expected a vocabulary larger than grid^2")
        if self.n_classes > self.pad_token:
            raise ConfigError(f"LayoutTokenizerConfig.n_classes {self.n_classes}: expected at most "
                              f"{self.pad_token} (the last token, {self.pad_token}, pads)")
        if len(self.classes) > self.n_classes or len(set(self.classes)) != len(self.classes) \
                or not all(isinstance(c, str) and c for c in self.classes):
            raise ConfigError(f"LayoutTokenizerConfig.classes: expected at most {self.n_classes} distinct "
                              f"non-empty names, found {len(self.classes)}")

    @property
    def grid(self) -> int:
        """Cells per side: the largest G with G^2 <= vocab_size."""
        return math.isqrt(self.vocab_size)

    @property
    def pad_token(self) -> int:
        return self.vocab_size - 1

    @property
    def max_length(self) -> int:
        return self.max_objects * TOKENS_PER_OBJECT + (CROP_TOKENS if self.encode_crop else 0)


def cell(config: LayoutTokenizerConfig, x: float, y: float) -> int:
    """The grid cell of a point (x, y) in [0, 1]^2: row-major, y first; halves round to even."""
    last = config.grid - 1
    return int(round(y * last)) * config.grid + int(round(x * last))


def encode_layout(config: LayoutTokenizerConfig, objects: Sequence[Mapping[str, Any]],
                  where: str = "layout") -> np.ndarray:
    """(max_length,) int32 tokens of a list of {"class": id or name, "box": [x0, y0, x1, y1]}
    (relative to the image, 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1), in the order given.
    GenerationError (field `layout`) naming `where[i]` for anything else."""
    field = "layout"
    if isinstance(objects, (str, bytes, Mapping)) or not isinstance(objects, Sequence):
        raise GenerationError(f"{where}: expected a list of objects {{\"class\": ..., \"box\": [x0, y0, x1, y1]}}, "
                              f"found {type(objects).__name__}", field=field)
    if len(objects) > config.max_objects:
        raise GenerationError(f"{where}: {len(objects)} objects, expected at most {config.max_objects} (the "
                              f"model's {config.max_length} layout tokens)", field=field)
    tokens = []
    for i, item in enumerate(objects):
        at = f"{where}[{i}]"
        if not isinstance(item, Mapping) or set(item) != {"class", "box"}:
            found = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise GenerationError(f"{at}: expected exactly the keys 'class' and 'box', found {found}", field=field)
        x0, y0, x1, y1 = _box(item["box"], f"{at}.box", field)
        tokens += [_class_id(config, item["class"], f"{at}.class", field), cell(config, x0, y0), cell(config, x1, y1)]
    tokens += [config.pad_token] * (TOKENS_PER_OBJECT * (config.max_objects - len(objects)))
    if config.encode_crop:
        tokens += [cell(config, 0.0, 0.0), cell(config, 1.0, 1.0)]      # the whole image
    return np.asarray(tokens, np.int32)


def _box(value: Any, where: str, field: str) -> tuple[float, float, float, float]:
    numbers = list(value) if isinstance(value, (list, tuple)) else None
    if numbers is None or len(numbers) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        raise GenerationError(f"{where} {value!r}: expected four numbers [x0, y0, x1, y1]", field=field)
    x0, y0, x1, y1 = (float(v) for v in numbers)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise GenerationError(f"{where} {numbers}: expected 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (relative "
                              f"to the image; an empty or inverted box has no area)", field=field)
    return x0, y0, x1, y1


def _class_id(config: LayoutTokenizerConfig, value: Any, where: str, field: str) -> int:
    if isinstance(value, str):
        if value not in config.classes:
            known = f"one of {list(config.classes[:8])}{' ...' if len(config.classes) > 8 else ''}" \
                if config.classes else "an integer id (this model names no classes)"
            raise GenerationError(f"{where} {value!r}: unknown class; expected {known}", field=field)
        return config.classes.index(value)
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) \
            or not 0 <= int(value) < config.n_classes:
        raise GenerationError(f"{where} {value!r}: expected a class id in [0, {config.n_classes}) or a class "
                              f"name", field=field)
    return int(value)
