"""The independent reader of generated digits: which digit an image shows, in which colours.

`DigitJudge.train()` fits a Platt-scaled scikit-learn SVC on the *held-out* split only (digits no
LDM trained on), rendered with random colours and augmentation, plus images of no digit (noise,
blank), and measures its accuracy on the train split's real digits, which it never saw
(`heldout_accuracy`). Its features are colour-invariant: per image, each pixel's distance from the
image's estimated background colour, normalised, blurred, centred on its centre of mass and sampled
at 16x16. So the same reader judges black-on-white and yellow-on-blue digits, real or generated;
noise reads as some digit with a low confidence.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ldmrt.digits.data import IMAGE_SIZE, SPLITS, digit_images, render, split_indices
from ldmrt.digits.palette import COLOUR_NAMES, COLOURS, nearest_colours
from ldmrt.errors import ConfigError, ShapeError

__all__ = ["Reading", "DigitJudge", "NOT_A_DIGIT", "FEATURE_SIZE", "features", "estimate_colours",
           "accuracy", "rendered_split", "non_digit_images"]

log = logging.getLogger(__name__)

FEATURE_SIZE = 16
_COPIES = 8                 # rendered copies of each held-out digit the judge trains on
_PIXEL_NOISE = 0.03         # std of the noise added to its training images (generated ones are not clean)
_INK_SHARE = 0.05           # the pixels farthest from the background whose median is the ink
_NON_DIGIT_SHARE = 0.25     # images of no digit (noise, blank) per digit image the judge trains on
NOT_A_DIGIT = -1            # the label of those images: their probability lowers every reading's confidence


@dataclass(frozen=True)
class Reading:
    """What the judge reads in one image."""
    digit: int              # 0..9: the most probable digit, even when the image shows none
    confidence: float       # the classifier's probability of `digit`, in [0, 1] (low for noise)
    ink: str
    background: str


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < 8 or images.shape[0] < 1:
        raise ShapeError(f"images: expected (B, H, W, 3) RGB with B >= 1 and H, W >= 8, found {images.shape}",
                         field="images")
    if not np.issubdtype(images.dtype, np.floating):
        raise ShapeError(f"images: expected floats in [0, 1], found dtype {images.dtype}", field="images")
    images = images.astype(np.float64)
    if not np.isfinite(images).all():
        raise ShapeError("images: hold NaN or infinite values", field="images")
    return images


def estimate_colours(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Robust RGB estimates (B, 3) of each image's background (the median of its border pixels)
    and ink (the median of the 5% of pixels farthest from that background)."""
    images = _check_images(images)
    background = np.median(_border(images), axis=1)                           # (B, 3)
    distance = np.linalg.norm(images - background[:, None, None, :], axis=-1)  # (B, H, W)
    flat_images = images.reshape(len(images), -1, 3)
    flat_distance = distance.reshape(len(images), -1)
    count = max(1, int(round(_INK_SHARE * flat_distance.shape[1])))
    farthest = np.argpartition(-flat_distance, count - 1, axis=1)[:, :count]  # (B, count)
    ink = np.median(np.take_along_axis(flat_images, farthest[..., None], axis=1), axis=1)
    return background, ink


def features(images: np.ndarray) -> np.ndarray:
    """The judge's colour-invariant input (B, 16*16): each pixel's distance from the image's
    background colour over the image's 99th-percentile distance, blurred (sigma: 1/32 of the size),
    centred on its centre of mass and sampled on a 16x16 grid over the whole image."""
    images = _check_images(images)
    count, height, width = images.shape[:3]
    background = np.median(_border(images), axis=1)                           # (B, 3)
    distance = np.linalg.norm(images - background[:, None, None, :], axis=-1)  # (B, H, W)
    scale = np.percentile(distance.reshape(count, -1), 99, axis=1)
    distance = np.clip(distance / np.maximum(scale, 1e-3)[:, None, None], 0.0, 1.0)
    # Blur before sampling: the 16x16 grid must not alias, and a blurred stroke is a smaller
    # target for the shift and stroke-width differences between generated and real digits.
    distance = _blur_matrix(height) @ distance @ _blur_matrix(width).T        # (B, H, W)
    y, x = np.mgrid[0:height, 0:width] + 0.5
    mass = distance.sum(axis=(1, 2)) + 1e-6
    centre_y = (distance * y).sum(axis=(1, 2)) / mass
    centre_x = (distance * x).sum(axis=(1, 2)) / mass
    step_y, step_x = height / FEATURE_SIZE, width / FEATURE_SIZE
    rows = []
    for d, cy, cx in zip(distance, centre_y, centre_x):
        # Output pixel u -> source point centre + step * (u - 8): the centre of mass lands mid-grid.
        matrix = (step_x, 0.0, cx - step_x * FEATURE_SIZE / 2, 0.0, step_y, cy - step_y * FEATURE_SIZE / 2)
        grid = Image.fromarray(d.astype(np.float32)).transform(
            (FEATURE_SIZE, FEATURE_SIZE), Image.Transform.AFFINE, matrix,
            resample=Image.Resampling.BILINEAR, fillcolor=0.0)
        rows.append(np.asarray(grid, dtype=np.float32).ravel())
    return np.stack(rows)


@functools.cache
def _blur_matrix(size: int) -> np.ndarray:
    """(size, size): a Gaussian blur of sigma size/32 along one axis, zero outside the image."""
    sigma = size / 32.0
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :]
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2) * (np.abs(offsets) <= 3 * sigma)
    return kernel / np.exp(-0.5 * (np.arange(-int(3 * sigma), int(3 * sigma) + 1) / sigma) ** 2).sum()


def _border(images: np.ndarray) -> np.ndarray:
    """The one-pixel frame of each image (B, 2H + 2W - 4, 3)."""
    top, bottom = images[:, 0, :, :], images[:, -1, :, :]
    left, right = images[:, 1:-1, 0, :], images[:, 1:-1, -1, :]
    return np.concatenate([top, bottom, left, right], axis=1)


def rendered_split(split: str, seed: int, copies: int = 1, *, noise: float = 0.0
                   ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Every real digit of `split` rendered `copies` times with random distinct colours and
    augmentation: (images (N, 32, 32, 3), digits (N,), inks, backgrounds), fixed by `seed`."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {list(SPLITS)}", field="split")
    images, targets = digit_images()
    index = split_indices()[SPLITS.index(split)]
    rng = np.random.default_rng([seed, 0x1D6E])
    out, digits, inks, backgrounds = [], [], [], []
    for _ in range(copies):
        for i in index:
            ink, background = (COLOUR_NAMES[k] for k in rng.choice(len(COLOUR_NAMES), size=2, replace=False))
            image = render(images[i], ink, background, rng, augment=True)
            if noise:
                image = np.clip(image + rng.normal(0.0, noise, image.shape), 0.0, 1.0).astype(np.float32)
            out.append(image)
            digits.append(int(targets[i]))
            inks.append(ink)
            backgrounds.append(background)
    return np.stack(out), np.array(digits, dtype=np.int64), inks, backgrounds


def non_digit_images(count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, 32, 32, 3) images that show no digit: uniform noise, noise around a random colour,
    a blank palette colour, a coarse random field between two colours."""
    out = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    for n in range(count):
        kind = n % 4
        first, second = (np.asarray(COLOURS[COLOUR_NAMES[k]])
                         for k in rng.choice(len(COLOUR_NAMES), size=2, replace=False))
        if kind == 0:
            image = rng.random(shape)
        elif kind == 1:
            image = rng.random(3) + rng.normal(0.0, rng.uniform(0.1, 0.5), shape)
        elif kind == 2:
            image = first + rng.normal(0.0, _PIXEL_NOISE, shape)
        else:
            field = np.kron(rng.random((8, 8)), np.ones((IMAGE_SIZE // 8, IMAGE_SIZE // 8)))[..., None]
            image = first + field * (second - first)
        out[n] = np.clip(image, 0.0, 1.0)
    return out


class DigitJudge:
    """A digit classifier on colour-invariant features, and the palette colours of ink and background."""

    def __init__(self, classifier, heldout_accuracy: float | None = None) -> None:
        self._classifier = classifier
        self._heldout_accuracy = heldout_accuracy

    @classmethod
    def train(cls, seed: int = 0) -> DigitJudge:
        """The judge for `seed`, trained once per process (cached): fit on the held-out split,
        its accuracy measured on the train split."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed {seed!r}: expected a non-negative integer", field="seed")
        return _trained(int(seed))

    @classmethod
    def fit(cls, images: np.ndarray, digits: np.ndarray) -> DigitJudge:
        """A judge fitted on these images and labels 0..9 (NOT_A_DIGIT: an image of no digit);
        no accuracy recorded."""
        # Imported here: the package loads without scikit-learn.
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import SVC

        digits = np.asarray(digits)
        x = features(images)
        if digits.shape != (len(x),):
            raise ShapeError(f"digits: expected shape ({len(x)},) to match the images, found {digits.shape}",
                             field="digits")
        # Platt-scaled SVC: its probability of the digit read is the reading's confidence.
        classifier = CalibratedClassifierCV(SVC(C=10.0, gamma="scale"), method="sigmoid", cv=3,
                                            ensemble=False)
        classifier.fit(x, digits)
        return cls(classifier)

    @property
    def heldout_accuracy(self) -> float:
        """Accuracy on real digits it did not train on (the train split, coloured and augmented)."""
        if self._heldout_accuracy is None:
            raise ConfigError("heldout_accuracy: this judge was fitted directly, not by DigitJudge.train; "
                              "no accuracy was measured", field="heldout_accuracy")
        return self._heldout_accuracy

    def read(self, images: np.ndarray) -> list[Reading]:
        """What each image (B, H, W, 3) float in [0, 1] shows."""
        images = _check_images(images)
        probabilities = self._classifier.predict_proba(features(images))     # (B, classes)
        classes = self._classifier.classes_
        # The best digit class; a NOT_A_DIGIT column only takes probability away from it.
        best = np.where(classes == NOT_A_DIGIT, -np.inf, probabilities).argmax(axis=1)
        background, ink = estimate_colours(images)
        return [Reading(int(classes[b]), float(p[b]), i, g)
                for b, p, i, g in zip(best, probabilities, nearest_colours(ink), nearest_colours(background))]


@functools.cache
def _trained(seed: int) -> DigitJudge:
    images, digits, _, _ = rendered_split("heldout", seed, _COPIES, noise=_PIXEL_NOISE)
    count = int(round(_NON_DIGIT_SHARE * len(images)))
    non_digits = non_digit_images(count, np.random.default_rng([seed, 0xBAD]))
    judge = DigitJudge.fit(np.concatenate([images, non_digits]),
                           np.concatenate([digits, np.full(count, NOT_A_DIGIT)]))
    test_images, test_digits, _, _ = rendered_split("train", seed + 1)
    score = accuracy(judge.read(test_images), test_digits)["digit"]
    log.info("digit judge (seed %d): trained on %d rendered held-out digits, accuracy %.4f on %d "
             "train-split digits", seed, len(images), score, len(test_images))
    return DigitJudge(judge._classifier, score)


def accuracy(readings: Sequence[Reading], expected_digits: Sequence[int],
             expected_ink: str | Sequence[str | None] | None = None,
             expected_background: str | Sequence[str | None] | None = None) -> dict:
    """How often the readings match: `digit`, `ink`, `background` (each over the images where it was
    asked: a colour None or a None entry is not asked; the key is None when never asked), `all` (every
    asked attribute right), `mean_confidence`, `per_digit` {"0": accuracy, ...} and `images`."""
    count = len(readings)
    if count == 0:
        raise ConfigError("readings: expected at least one reading, found none", field="readings")
    digits = [int(d) for d in expected_digits]
    if len(digits) != count:
        raise ShapeError(f"expected_digits: expected {count} digits, one per reading, found {len(digits)}",
                         field="expected_digits")
    inks = _per_image(expected_ink, count, "expected_ink")
    backgrounds = _per_image(expected_background, count, "expected_background")
    digit_right = [r.digit == d for r, d in zip(readings, digits)]
    ink_right = [None if i is None else r.ink == i for r, i in zip(readings, inks)]
    background_right = [None if g is None else r.background == g for r, g in zip(readings, backgrounds)]
    every = [d and i is not False and g is not False for d, i, g in zip(digit_right, ink_right, background_right)]
    per_digit = {str(d): _mean([ok for ok, e in zip(digit_right, digits) if e == d]) for d in sorted(set(digits))}
    return {"images": count, "digit": _mean(digit_right), "ink": _mean(ink_right),
            "background": _mean(background_right), "all": _mean(every),
            "mean_confidence": float(np.mean([r.confidence for r in readings])), "per_digit": per_digit}


def _per_image(expected: str | Sequence[str | None] | None, count: int, field: str) -> list[str | None]:
    if expected is None or isinstance(expected, str):
        return [expected] * count
    values = list(expected)
    if len(values) != count:
        raise ShapeError(f"{field}: expected {count} colours, one per reading, found {len(values)}", field=field)
    return values


def _mean(values: Sequence[bool | None]) -> float | None:
    asked = [v for v in values if v is not None]
    return float(np.mean(asked)) if asked else None
