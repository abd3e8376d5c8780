"""The digits data set: scikit-learn's 1,797 handwritten 8x8 digits (they ship inside the package,
no download), rendered as coloured 32x32 RGB images with the prompts that describe them.

    split_indices()            the fixed stratified split: the LDMs train on `train`, the judge on `heldout`
    render(digit_8x8, ...)     one digit -> (32, 32, 3) float32 in [0, 1]
    training_samples(...)      a deterministic list of Samples (image, digit, ink, background, prompt)
    batches(...)               the same, as endless batches for a training loop
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ldmrt.digits.palette import COLOUR_NAMES, COLOURS, PLAIN_BACKGROUND, PLAIN_INK, colour_rgb
from ldmrt.digits.prompts import prompt_for
from ldmrt.errors import ConfigError

__all__ = ["IMAGE_SIZE", "COLOURS", "HELDOUT_SHARE", "COLOURED_SHARE", "SPLITS", "Sample", "digit_images",
           "split_indices", "render", "training_samples", "batches"]

IMAGE_SIZE = 32
HELDOUT_SHARE = 0.2
# Share of samples whose colours the prompt names (the rest: black ink on white, no colour named);
# of those, half name ink and background, a quarter only the ink, a quarter only the background.
COLOURED_SHARE = 0.5
SPLITS = ("train", "heldout")

_SOURCE_SIZE = 8
_DIGIT_SPAN = 24.0          # the 8x8 grid covers 24x24 pixels: a 4-pixel margin of background
# Augmentation: small enough that every digit stays itself (a 6 never turns into a 9).
_MAX_SHIFT = 2.0            # pixels
_MAX_ROTATION = 10.0        # degrees
_SCALE_RANGE = (0.9, 1.1)
_STROKE_GAMMA = (0.6, 1.5)  # alpha ** gamma: below 1 thickens strokes, above 1 thins them


@dataclass(frozen=True, eq=False)
class Sample:
    """One rendered digit and the prompt that describes it."""
    image: np.ndarray       # (32, 32, 3) float32 in [0, 1]
    digit: int
    ink: str
    background: str
    prompt: str


@functools.cache
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: intensities (1797, 8, 8) float32 in 0..16 and labels (1797,) int64,
    both read-only."""
    from sklearn.datasets import load_digits     # imported here: the package loads without scikit-learn

    data = load_digits()
    images = np.asarray(data.images, dtype=np.float32)
    targets = np.asarray(data.target, dtype=np.int64)
    images.flags.writeable = False
    targets.flags.writeable = False
    return images, targets


@functools.cache
def _split(seed: int) -> tuple[np.ndarray, np.ndarray]:
    _, targets = digit_images()
    rng = np.random.default_rng([seed, 0x5D161])
    train, heldout = [], []
    for digit in range(10):
        members = np.flatnonzero(targets == digit)
        members = members[rng.permutation(len(members))]
        count = int(round(HELDOUT_SHARE * len(members)))
        heldout.append(members[:count])
        train.append(members[count:])
    train_idx, heldout_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(heldout))
    train_idx.flags.writeable = False
    heldout_idx.flags.writeable = False
    return train_idx, heldout_idx


def split_indices(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, heldout_idx): a stratified 80/20 split of the 1,797 digits, fixed by `seed`
    (numpy's PCG64 stream, the same on every machine); sorted, read-only."""
    return _split(_seed(seed))


def render(digit_8x8: np.ndarray, ink: str, background: str, rng: np.random.Generator | None = None,
           augment: bool = False) -> np.ndarray:
    """One digit (8, 8) of intensities 0..16 as a (32, 32, 3) float32 image in [0, 1]:
    bicubic upsampling (with a small random shift, scale, rotation and stroke width when `augment`),
    then pixel = background + alpha * (ink - background)."""
    source = np.asarray(digit_8x8, dtype=np.float32)
    if source.shape != (_SOURCE_SIZE, _SOURCE_SIZE):
        raise ConfigError(f"digit_8x8: expected shape (8, 8), found {source.shape}", field="digit_8x8")
    if not np.isfinite(source).all():
        raise ConfigError("digit_8x8: holds NaN or infinite values", field="digit_8x8")
    ink_rgb, background_rgb = colour_rgb(ink, field="ink"), colour_rgb(background, field="background")
    if augment and rng is None:
        raise ConfigError("rng: augment=True needs a numpy Generator to draw the augmentation from",
                          field="rng")
    if augment:
        shift = rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, size=2)
        rotation = math.radians(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION))
        scale = rng.uniform(*_SCALE_RANGE)
        gamma = math.exp(rng.uniform(math.log(_STROKE_GAMMA[0]), math.log(_STROKE_GAMMA[1])))
    else:
        shift, rotation, scale, gamma = np.zeros(2), 0.0, 1.0, 1.0
    alpha = _resample(np.clip(source / 16.0, 0.0, 1.0), shift, rotation, scale)
    alpha = np.clip(alpha, 0.0, 1.0) ** gamma                              # (32, 32)
    image = background_rgb + alpha[..., None] * (ink_rgb - background_rgb)  # (32, 32, 3)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _resample(alpha: np.ndarray, shift: np.ndarray, rotation: float, scale: float) -> np.ndarray:
    """The (8, 8) alpha map on the 32x32 grid in one bicubic pass (Pillow's affine transform, which
    maps each output pixel centre to a source point; outside the source is 0)."""
    # Output point p (pixels) -> source point q = centre_in + M^-1 (p - centre_out - shift),
    # M = rotation * scale * (span / 8). Pillow takes the 2x3 matrix of that map.
    factor = scale * _DIGIT_SPAN / _SOURCE_SIZE
    cos, sin = math.cos(rotation) / factor, math.sin(rotation) / factor
    inverse = np.array([[cos, sin], [-sin, cos]])
    centre_out = np.full(2, IMAGE_SIZE / 2.0) + shift
    offset = np.full(2, _SOURCE_SIZE / 2.0) - inverse @ centre_out
    matrix = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    source = Image.fromarray(np.ascontiguousarray(alpha, dtype=np.float32))
    out = source.transform((IMAGE_SIZE, IMAGE_SIZE), Image.Transform.AFFINE, matrix,
                           resample=Image.Resampling.BICUBIC, fillcolor=0.0)
    return np.asarray(out, dtype=np.float32)


def training_samples(count: int, seed: int, split: str = "train", augment: bool = True, *,
                     coloured_share: float = COLOURED_SHARE) -> list[Sample]:
    """`count` samples drawn from `split`, the same for the same arguments on every machine: each
    pass over the split in a fresh random order, colours and prompt templates drawn per sample."""
    _check_count(count, "count")
    stream = _sample_stream(_seed(seed), _check_split(split), bool(augment), _share(coloured_share))
    return [next(stream) for _ in range(count)]


def batches(batch_size: int, seed: int, split: str = "train", augment: bool = True, *,
            coloured_share: float = COLOURED_SHARE) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
    """Endless batches (images (B, 32, 32, 3) float32, prompts [B], digits (B,) int64): the same
    sample stream as `training_samples` with the same arguments, cut into batches."""
    _check_count(batch_size, "batch_size")
    stream = _sample_stream(_seed(seed), _check_split(split), bool(augment), _share(coloured_share))
    while True:
        samples = [next(stream) for _ in range(batch_size)]
        yield (np.stack([s.image for s in samples]), [s.prompt for s in samples],
               np.array([s.digit for s in samples], dtype=np.int64))


def _sample_stream(seed: int, split: str, augment: bool, coloured_share: float) -> Iterator[Sample]:
    images, targets = digit_images()
    pool = split_indices()[SPLITS.index(split)]
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    while True:
        for index in pool[rng.permutation(len(pool))]:
            yield _sample(images[index], int(targets[index]), rng, augment, coloured_share)


def _sample(source: np.ndarray, digit: int, rng: np.random.Generator, augment: bool,
            coloured_share: float) -> Sample:
    """One sample: its colours (plain, or named in the prompt), its prompt, its image."""
    named_ink = named_background = None
    ink, background = PLAIN_INK, PLAIN_BACKGROUND
    if rng.random() < coloured_share:
        ink, background = (COLOUR_NAMES[i] for i in rng.choice(len(COLOUR_NAMES), size=2, replace=False))
        kind = rng.random()     # both named (1/2), only the ink (1/4), only the background (1/4)
        named_ink = ink if kind < 0.75 else None
        named_background = background if kind < 0.5 or kind >= 0.75 else None
    prompt = prompt_for(digit, named_ink, named_background, rng)
    return Sample(render(source, ink, background, rng, augment), digit, ink, background, prompt)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {list(SPLITS)}", field="split")
    return split


def _check_count(value: int, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{field} {value!r}: expected a positive integer", field=field)


def _seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed {seed!r}: expected a non-negative integer", field="seed")
    return int(seed)


def _share(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"coloured_share {value!r}: expected a number in [0, 1]", field="coloured_share")
    return float(value)
