"""The layout tokens (ldmrt.layout) against the paper's (l, b, c) definition as taming's builder
implements it, written here independently, with hand-computed golden values for the released
model's constants (8192 tokens: a 90 x 90 grid, 30 objects, crop encoded, pad 8191)."""
from __future__ import annotations

import numpy as np
import pytest

from ldmrt.errors import ConfigError, GenerationError
from ldmrt.layout import LayoutTokenizerConfig, cell, encode_layout

RELEASED = LayoutTokenizerConfig()


def reference_tokens(objects, vocab=8192, max_objects=30, crop=True):
    """The definition, step by step: grid G = floor(sqrt(vocab)); a point is the cell
    round(y (G-1)) * G + round(x (G-1)) (Python's round: halves to even); an object is
    (class, cell(top-left), cell(bottom-right)); pad triples of vocab - 1; crop corners last."""
    grid = int(vocab ** 0.5)
    while (grid + 1) ** 2 <= vocab:
        grid += 1
    while grid ** 2 > vocab:
        grid -= 1
    out = []
    for label, (x0, y0, x1, y1) in objects:
        out += [label, round(y0 * (grid - 1)) * grid + round(x0 * (grid - 1)),
                round(y1 * (grid - 1)) * grid + round(x1 * (grid - 1))]
    out += [vocab - 1] * (3 * (max_objects - len(objects)))
    return out + ([0, grid * grid - 1] if crop else [])


def test_golden_values_of_the_released_constants():
    assert (RELEASED.grid, RELEASED.pad_token, RELEASED.max_length) == (90, 8191, 92)
    tokens = encode_layout(RELEASED, [{"class": 5, "box": [0.1, 0.2, 0.5, 0.7]}])
    # 0.2*89 = 17.8 -> 18, 0.1*89 = 8.9 -> 9: 18*90 + 9; 0.7*89 = 62.3 -> 62, 0.5*89 = 44.5 -> 44 (to even)
    assert list(tokens[:3]) == [5, 1629, 5624]
    assert list(tokens[3:90]) == [8191] * 87 and list(tokens[90:]) == [0, 8099]
    assert tokens.dtype == np.int32 and tokens.shape == (92,)
    assert cell(RELEASED, 0.5, 0.5) == 4004 and cell(RELEASED, 1.0, 1.0) == 8099


@pytest.mark.parametrize("seed", range(5))
def test_random_layouts_match_the_definition(seed):
    rng = np.random.default_rng(seed)
    objects = []
    for _ in range(int(rng.integers(0, 31))):
        x = np.sort(rng.random(2))
        y = np.sort(rng.random(2))
        if x[0] == x[1] or y[0] == y[1]:
            continue
        objects.append((int(rng.integers(0, 352)), (float(x[0]), float(y[0]), float(x[1]), float(y[1]))))
    found = encode_layout(RELEASED, [{"class": c, "box": list(b)} for c, b in objects])
    assert list(found) == reference_tokens(objects)


def test_small_configs_names_and_no_crop():
    config = LayoutTokenizerConfig(vocab_size=20, max_objects=2, n_classes=3, encode_crop=False,
                                   classes=("zero", "one", "two"))
    assert (config.grid, config.pad_token, config.max_length) == (4, 19, 6)
    found = encode_layout(config, [{"class": "two", "box": [0, 0, 1, 1]}])
    assert list(found) == reference_tokens([(2, (0, 0, 1, 1))], vocab=20, max_objects=2, crop=False) \
        == [2, 0, 15, 19, 19, 19]


@pytest.mark.parametrize("layout, words", [
    ([{"class": 999, "box": [0, 0, 1, 1]}], "layout[0].class 999: expected a class id in [0, 352)"),
    ([{"class": "cat", "box": [0, 0, 1, 1]}], "unknown class"),
    ([{"class": 1, "box": [0.5, 0, 0.5, 1]}], "layout[0].box [0.5, 0, 0.5, 1]: expected 0 <= x0 < x1"),
    ([{"class": 1, "box": [0.6, 0.1, 0.2, 0.9]}], "inverted box"),
    ([{"class": 1, "box": [0, 0, 1.5, 1]}], "expected 0 <= x0 < x1 <= 1"),
    ([{"class": 1, "box": [0, 0, 1]}], "expected four numbers"),
    ([{"class": 1, "box": [0, 0, float("nan"), 1]}], "expected four numbers"),
    ([{"class": True, "box": [0, 0, 1, 1]}], "expected a class id"),
    ([{"class": 1, "box": [0, 0, 1, 1], "extra": 2}], "exactly the keys 'class' and 'box'"),
    ([{"class": 1, "box": [0, 0, 1, 1]}] * 31, "31 objects, expected at most 30"),
    ({"class": 1, "box": [0, 0, 1, 1]}, "expected a list of objects"),
])
def test_bad_layouts_are_refused_by_name(layout, words):
    with pytest.raises(GenerationError) as caught:
        encode_layout(RELEASED, layout)
    assert words in str(caught.value) and caught.value.field == "layout", str(caught.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(vocab_size=16), "perfect square"), (dict(vocab_size=3), "at least 4"),
    (dict(n_classes=8192), "at most 8191"), (dict(classes=("a", "a")), "distinct"),
    (dict(max_objects=0), "positive integer"),
])
def test_inconsistent_tokenizer_configs_are_refused(kwargs, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        LayoutTokenizerConfig(**kwargs)
