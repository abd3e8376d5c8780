"""The digits data set (split, rendering, samples), its prompts, and the judge that reads images.

References are independent of the code under test: the split is checked by counting labels, the
render against block means of the 8x8 source and the mixing formula, prompts against their
templates, and the judge on real digits it never saw (and against a judge trained on shuffled
labels, which must fail the same bar).
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from ldmrt.digits import (COLOUR_NAMES, COLOURS, DIGIT_WORDS, IMAGE_SIZE, NOT_A_DIGIT, PLAIN_BACKGROUND,
                          PLAIN_INK, TEMPLATES, VOCABULARY, DigitJudge, Reading, accuracy, batches,
                          digit_images, fill, parse_prompt, prompt_for, render, split_indices,
                          templates_for, training_samples)
from ldmrt.digits.judge import estimate_colours, rendered_split
from ldmrt.errors import ConfigError, LdmrtError, ShapeError

COLOUR_PAIRS = [(ink, background) for ink in COLOUR_NAMES for background in COLOUR_NAMES if ink != background]


# --- the split -------------------------------------------------------------------------------

def test_split_is_disjoint_complete_stratified_and_fixed():
    _, targets = digit_images()
    train, heldout = split_indices()
    assert len(targets) == 1797
    assert np.intersect1d(train, heldout).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, heldout])), np.arange(len(targets)))
    for digit in range(10):
        members = np.count_nonzero(targets == digit)
        assert abs(np.count_nonzero(targets[heldout] == digit) - 0.2 * members) <= 1, digit
    again_train, again_heldout = split_indices(0)
    assert np.array_equal(train, again_train) and np.array_equal(heldout, again_heldout)
    other_train, _ = split_indices(1)
    assert not np.array_equal(train, other_train)
    with pytest.raises(ConfigError) as error:
        split_indices(-1)
    assert error.value.field == "seed"


# --- rendering -------------------------------------------------------------------------------

def test_render_without_augmentation_is_the_source_upsampled_in_place():
    """The 8x8 grid covers the central 24x24 pixels: 3x3 block means there come back to source/16,
    and far better than the transposed or flipped source (so orientation is right)."""
    images, _ = digit_images()
    errors, transposed, flipped = [], [], []
    for source in images[:50]:
        alpha = render(source, "white", "black")[..., 0]                         # (32, 32)
        blocks = alpha[4:28, 4:28].reshape(8, 3, 8, 3).mean(axis=(1, 3))          # (8, 8)
        errors.append(np.abs(blocks - source / 16).mean())
        transposed.append(np.abs(blocks - source.T / 16).mean())
        flipped.append(np.abs(blocks - source[::-1] / 16).mean())
    assert np.mean(errors) < 0.08
    assert np.mean(errors) < 0.5 * np.mean(transposed) and np.mean(errors) < 0.5 * np.mean(flipped)
    # The margin is background.
    alpha = np.stack([render(s, "white", "black")[..., 0] for s in images[:50]])
    assert alpha[:, :2, :].max() < 0.05 and alpha[:, :, -2:].max() < 0.05


@pytest.mark.parametrize("augment", [False, True])
def test_render_is_deterministic_in_range_and_mixes_ink_and_background(augment):
    images, _ = digit_images()
    source = images[17]
    rng = np.random.default_rng
    image = render(source, "red", "blue", rng(3), augment)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert np.array_equal(image, render(source, "red", "blue", rng(3), augment))
    # pixel = background + alpha * (ink - background), alpha read from a white-on-black render.
    alpha = render(source, "white", "black", rng(3), augment)[..., :1].astype(np.float64)
    ink, background = np.array(COLOURS["red"]), np.array(COLOURS["blue"])
    np.testing.assert_allclose(image, background + alpha * (ink - background), atol=1e-6)
    assert alpha.max() > 0.9 and alpha.min() < 0.01
    if augment:
        assert not np.array_equal(image, render(source, "red", "blue", rng(4), augment))


@pytest.mark.parametrize("ink, background", COLOUR_PAIRS[::3])
def test_colours_land_where_asked(ink, background):
    images, _ = digit_images()
    rng = np.random.default_rng(5)
    for source in images[:10]:
        image = render(source, ink, background, rng, augment=True).astype(np.float64)
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert np.abs(border - COLOURS[background]).max() < 0.05
        # The strokes (the 3% of pixels farthest from the background) are the ink colour.
        distance = np.linalg.norm(image - COLOURS[background], axis=-1)
        strongest = image[distance >= np.quantile(distance, 0.97)]
        assert np.abs(np.median(strongest, axis=0) - COLOURS[ink]).max() < 0.1


def test_render_refuses_bad_inputs():
    images, _ = digit_images()
    cases = [((images[0], "purple", "white"), {}, "ink"),
             ((images[0], "black", "grey"), {}, "background"),
             ((np.zeros((8, 9)), "black", "white"), {}, "digit_8x8"),
             ((np.full((8, 8), np.nan), "black", "white"), {}, "digit_8x8"),
             ((images[0], "black", "white"), {"augment": True}, "rng")]
    for args, kwargs, field in cases:
        with pytest.raises(ConfigError) as error:
            render(*args, **kwargs)
        assert error.value.field == field
        assert field in str(error.value)


# --- samples ---------------------------------------------------------------------------------

def test_training_samples_are_deterministic_and_say_what_they_show():
    samples = training_samples(400, seed=2)
    again = training_samples(400, seed=2)
    assert [s.prompt for s in samples] == [s.prompt for s in again]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(samples, again))
    assert [s.prompt for s in training_samples(50, seed=3)] != [s.prompt for s in samples[:50]]
    coloured = 0
    for sample in samples:
        assert sample.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and sample.image.dtype == np.float32
        assert sample.ink != sample.background
        digit, ink, background = parse_prompt(sample.prompt)
        assert digit == sample.digit
        assert ink in (None, sample.ink) and background in (None, sample.background)
        if ink is None and background is None:
            assert (sample.ink, sample.background) == (PLAIN_INK, PLAIN_BACKGROUND), sample.prompt
        else:
            coloured += 1
    assert 0.35 < coloured / len(samples) < 0.65
    # Every digit is drawn, in proportion: the first pass over the split is a permutation of it.
    counts = np.bincount([s.digit for s in samples], minlength=10)
    assert counts.min() > 20


def test_samples_come_from_their_split_only():
    images, targets = digit_images()
    train, heldout = split_indices()
    for split, pool, other in (("train", train, heldout), ("heldout", heldout, train)):
        plain = {render(images[i], PLAIN_INK, PLAIN_BACKGROUND).tobytes(): i for i in range(len(images))}
        for sample in training_samples(60, seed=0, split=split, augment=False, coloured_share=0.0):
            index = plain[sample.image.tobytes()]
            assert index in pool and index not in other
            assert targets[index] == sample.digit


def test_batches_cut_the_same_stream():
    samples = training_samples(10, seed=4)
    stream = batches(4, seed=4)
    images, prompts, digits = (np.concatenate(parts) if isinstance(parts[0], np.ndarray) else sum(parts, [])
                               for parts in zip(*(next(stream) for _ in range(3))))
    assert images.shape == (12, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.float32
    assert prompts[:10] == [s.prompt for s in samples]
    assert np.array_equal(digits[:10], [s.digit for s in samples])
    assert np.array_equal(images[:10], np.stack([s.image for s in samples]))


@pytest.mark.parametrize("kwargs, field", [({"count": 0, "seed": 0}, "count"),
                                           ({"count": 2, "seed": 0, "split": "test"}, "split"),
                                           ({"count": 2, "seed": -3}, "seed"),
                                           ({"count": 2, "seed": 0, "coloured_share": 1.5}, "coloured_share")])
def test_training_samples_refuse_bad_arguments(kwargs, field):
    with pytest.raises(ConfigError) as error:
        training_samples(**kwargs)
    assert error.value.field == field


# --- prompts ---------------------------------------------------------------------------------

def test_parse_prompt_inverts_every_template_digit_and_colour_pair():
    checked = 0
    for template in TEMPLATES:
        names_ink, names_background = "{ink}" in template, "{background}" in template
        pairs = COLOUR_PAIRS if names_ink or names_background else [(None, None)]
        for digit in range(10):
            for ink, background in pairs:
                ink = ink if names_ink else None
                background = background if names_background else None
                for spelled in (False, True):
                    prompt = fill(template, digit, ink, background, spelled=spelled)
                    assert parse_prompt(prompt) == (digit, ink, background), prompt
                    assert (DIGIT_WORDS[digit] if spelled else str(digit)) in prompt.split()
                    assert set(prompt.split()) <= set(VOCABULARY), prompt
                    checked += 1
    assert checked > 1000


def test_prompt_for_draws_templates_and_its_words_are_in_the_vocabulary():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(600):
        digit = int(rng.integers(10))
        ink, background = (rng.choice([None, *COLOUR_NAMES]) for _ in range(2))
        if ink is not None and ink == background:
            continue
        prompt = prompt_for(digit, ink, background, rng)
        assert set(prompt.split()) <= set(VOCABULARY), prompt
        assert parse_prompt(prompt) == (digit, ink, background), prompt
        seen.add(prompt.replace(str(digit), "#").replace(DIGIT_WORDS[digit], "#"))
    assert len(seen) > 30     # many templates x colours, numerals and words
    assert prompt_for(7) == "a handwritten 7"
    assert prompt_for(3, "red", "blue") == "a red 3 on a blue background"
    assert prompt_for(8) == "a handwritten 8" and fill("a {digit}", 8) == "an 8"
    assert fill("a {digit}", 8, spelled=True) == "an eight" and fill("a {digit}", 7) == "a 7"
    assert all(prompt_for(d, rng=np.random.default_rng(1)) == prompt_for(d, rng=np.random.default_rng(1))
               for d in range(10))
    assert templates_for(None, None)[0] == "a handwritten {digit}"


def test_parse_prompt_reads_user_text_and_refuses_ambiguity():
    assert parse_prompt("A red 7 on a White background.") == (7, "red", "white")
    assert parse_prompt("a beautiful painting") == (None, None, None)
    assert parse_prompt("something on a green background") == (None, None, "green")
    for prompt in ("a 7 and a 3", "a red blue 3", "a 3 on a red background on blue"):
        with pytest.raises(ConfigError) as error:
            parse_prompt(prompt)
        assert error.value.field == "prompt"


@pytest.mark.parametrize("args, field", [((10,), "digit"), ((True,), "digit"), ((3, "mauve"), "ink"),
                                         ((3, None, "mauve"), "background"), ((3, "red", "red"), "ink")])
def test_prompt_for_refuses_bad_arguments(args, field):
    with pytest.raises(ConfigError) as error:
        prompt_for(*args)
    assert error.value.field == field


# --- the judge -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def judge():
    start = time.perf_counter()
    trained = DigitJudge.train()
    seconds = time.perf_counter() - start
    assert seconds < 30, f"training the judge took {seconds:.1f} s (budget 10 s on 2 idle cores)"
    assert DigitJudge.train() is trained        # cached in memory
    return trained


@pytest.fixture(scope="module")
def unseen():
    """The train split's real digits (the judge trains on the held-out split), coloured and
    augmented with another seed than the judge's own accuracy check."""
    return rendered_split("train", seed=11)


def test_judge_reads_real_digits_it_never_saw(judge, unseen):
    images, digits, inks, backgrounds = unseen
    assert judge.heldout_accuracy >= 0.95
    result = accuracy(judge.read(images), digits, inks, backgrounds)
    assert result["images"] == len(images) == len(split_indices()[0])
    assert result["digit"] >= 0.95, result
    assert result["ink"] >= 0.98 and result["background"] >= 0.98, result
    assert min(result["per_digit"].values()) >= 0.8, result["per_digit"]
    assert result["mean_confidence"] > 0.8


def test_judge_reads_larger_images(judge, unseen):
    images, digits, inks, backgrounds = unseen
    bigger = np.repeat(np.repeat(images[:300], 2, axis=1), 2, axis=2)           # (300, 64, 64, 3)
    result = accuracy(judge.read(bigger), digits[:300], inks[:300], backgrounds[:300])
    assert result["digit"] >= 0.93 and result["ink"] >= 0.98 and result["background"] >= 0.98, result


def test_judge_is_not_confident_about_noise(judge):
    rng = np.random.default_rng(9)
    noise = rng.random((100, IMAGE_SIZE, IMAGE_SIZE, 3))
    dim = np.clip(rng.random((100, 1, 1, 3)) + rng.normal(0, 0.2, (100, IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 1)
    for images in (noise, dim):
        readings = judge.read(images)
        assert all(0 <= r.digit <= 9 for r in readings)
        assert np.mean([r.confidence for r in readings]) < 0.2
        assert accuracy(readings, rng.integers(0, 10, len(images)))["digit"] < 0.35


def test_a_judge_trained_on_shuffled_labels_fails_the_bar(unseen):
    images, digits, _, _ = rendered_split("heldout", seed=0, copies=2)
    shuffled = np.random.default_rng(0).permutation(digits)
    wrong = DigitJudge.fit(images, shuffled)
    test_images, test_digits, _, _ = unseen
    assert accuracy(wrong.read(test_images[:500]), test_digits[:500])["digit"] < 0.3
    with pytest.raises(ConfigError) as error:
        wrong.heldout_accuracy
    assert error.value.field == "heldout_accuracy"


def test_colour_estimates_are_the_rendered_colours(unseen):
    images, _, inks, backgrounds = unseen
    background, ink = estimate_colours(images[:200])
    np.testing.assert_allclose(background, [COLOURS[b] for b in backgrounds[:200]], atol=0.02)
    assert np.abs(ink - np.array([COLOURS[i] for i in inks[:200]])).max(axis=1).mean() < 0.1


def test_accuracy_counts_what_was_asked():
    readings = [Reading(3, 0.9, "red", "blue"), Reading(3, 0.5, "red", "white"),
                Reading(5, 0.7, "black", "white"), Reading(1, 0.3, "green", "black")]
    result = accuracy(readings, [3, 3, 4, 1], ["red", None, "black", "red"], "white")
    # digits: 3 of 4; ink asked on 3 (right, right, wrong); background on all 4 (wrong, right, right, wrong)
    assert result["images"] == 4
    assert result["digit"] == pytest.approx(0.75)
    assert result["ink"] == pytest.approx(2 / 3)
    assert result["background"] == pytest.approx(0.5)
    assert result["all"] == pytest.approx(0.25)                 # only the second image is right in all asked
    assert result["mean_confidence"] == pytest.approx(0.6)
    assert result["per_digit"] == {"1": 1.0, "3": 1.0, "4": 0.0}
    plain = accuracy(readings, [3, 3, 5, 1])
    assert plain["ink"] is None and plain["background"] is None and plain["all"] == 1.0
    with pytest.raises(ShapeError) as error:
        accuracy(readings, [3, 3])
    assert error.value.field == "expected_digits"
    with pytest.raises(ShapeError):
        accuracy(readings, [3, 3, 4, 1], ["red"])
    with pytest.raises(ConfigError):
        accuracy([], [])


@pytest.mark.parametrize("images", [np.zeros((2, 32, 32)), np.zeros((2, 32, 32, 4)), np.zeros((0, 32, 32, 3)),
                                    np.zeros((2, 32, 32, 3), dtype=np.uint8), np.full((1, 32, 32, 3), np.nan)])
def test_judge_refuses_bad_images(judge, images):
    with pytest.raises(ShapeError) as error:
        judge.read(images)
    assert error.value.field == "images"


def test_fit_refuses_mismatched_labels():
    images = np.zeros((4, 32, 32, 3))
    with pytest.raises(ShapeError) as error:
        DigitJudge.fit(images, [1, 2, 3])
    assert error.value.field == "digits"
    assert NOT_A_DIGIT not in range(10) and issubclass(ShapeError, LdmrtError)
