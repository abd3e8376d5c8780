"""The digits data set, its prompts, and the judge that reads generated images.

scikit-learn's 1,797 handwritten 8x8 digits (shipped inside the package, no download), rendered
as coloured 32x32 RGB images with prompts such as "a handwritten 7", "the digit seven" or
"a red 3 on a blue background": what the built-in `digits` LDMs train on, and the independent
classifier that proves what they draw. numpy, Pillow and scikit-learn only (no torch); nothing in
the lean runtime imports this package.

    palette.py   COLOURS, the named ink and background colours; the nearest name to a colour
    prompts.py   the prompt templates, prompt_for, parse_prompt, VOCABULARY
    data.py      split_indices, render, Sample, training_samples, batches
    judge.py     DigitJudge (train, read, heldout_accuracy), Reading, accuracy
"""
from ldmrt.digits.data import (COLOURED_SHARE, IMAGE_SIZE, SPLITS, Sample, batches, digit_images, render,
                               split_indices, training_samples)
from ldmrt.digits.judge import NOT_A_DIGIT, DigitJudge, Reading, accuracy, features, non_digit_images
from ldmrt.digits.palette import COLOUR_NAMES, COLOURS, PLAIN_BACKGROUND, PLAIN_INK, nearest_colours
from ldmrt.digits.prompts import DIGIT_WORDS, TEMPLATES, VOCABULARY, fill, parse_prompt, prompt_for, templates_for

__all__ = ["IMAGE_SIZE", "COLOURS", "COLOUR_NAMES", "PLAIN_INK", "PLAIN_BACKGROUND", "COLOURED_SHARE", "SPLITS",
           "Sample", "digit_images", "split_indices", "render", "training_samples", "batches",
           "nearest_colours", "DIGIT_WORDS", "TEMPLATES", "VOCABULARY", "fill", "prompt_for", "templates_for",
           "parse_prompt", "DigitJudge", "Reading", "NOT_A_DIGIT", "accuracy", "features", "non_digit_images"]
