"""The prompts of the digits data set: templates that name a digit (numeral or word) and,
optionally, the colours of its ink and background; and `parse_prompt`, their inverse.

    prompt_for(7)                       -> "a handwritten 7"
    prompt_for(3, "red", "blue", rng)   -> e.g. "the digit three in red on blue"
    parse_prompt("a red 3 on a blue background") -> (3, "red", "blue")
"""
from __future__ import annotations

import re

import numpy as np

from ldmrt.digits.palette import COLOUR_NAMES, COLOURS
from ldmrt.errors import ConfigError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMERALS = tuple(str(d) for d in range(10))

# Per kind of prompt, its templates; the first of each is the canonical one (`rng=None`).
# `{digit}` is the numeral or the word; an "a" before a vowel sound becomes "an" ("an 8").
# A colour is the background when "background" follows it or "on" (or "on a") precedes it;
# any other colour is the ink (`parse_prompt` relies on this).
PLAIN_TEMPLATES = (
    "a handwritten {digit}",
    "the digit {digit}",
    "a {digit}",
    "number {digit}",
    "a picture of the number {digit}",
    "a drawing of a {digit}",
)
INK_AND_BACKGROUND_TEMPLATES = (
    "a {ink} {digit} on a {background} background",
    "a handwritten {ink} {digit} on a {background} background",
    "the digit {digit} in {ink} on {background}",
    "a {ink} number {digit} on {background}",
)
INK_TEMPLATES = (
    "a {ink} {digit}",
    "the digit {digit} in {ink}",
    "a handwritten {digit} written in {ink}",
)
BACKGROUND_TEMPLATES = (
    "a {digit} on a {background} background",
    "the digit {digit} on {background}",
    "a handwritten {digit} on a {background} background",
)
TEMPLATES: tuple[str, ...] = (PLAIN_TEMPLATES + INK_AND_BACKGROUND_TEMPLATES + INK_TEMPLATES
                              + BACKGROUND_TEMPLATES)

_WORD = re.compile(r"[a-z0-9]+")
_DIGIT_OF = {**{w: d for d, w in enumerate(DIGIT_WORDS)}, **{n: d for d, n in enumerate(NUMERALS)}}


def templates_for(ink: str | None, background: str | None) -> tuple[str, ...]:
    """The templates that name exactly the colours given (None: that colour is not named)."""
    if ink is not None and background is not None:
        return INK_AND_BACKGROUND_TEMPLATES
    if ink is not None:
        return INK_TEMPLATES
    if background is not None:
        return BACKGROUND_TEMPLATES
    return PLAIN_TEMPLATES


def fill(template: str, digit: int, ink: str | None = None, background: str | None = None, *,
         spelled: bool = False) -> str:
    """One template filled in: the digit as a word when `spelled`, else as a numeral."""
    _check(digit, ink, background)
    if template not in templates_for(ink, background):
        raise ConfigError(f"template {template!r} does not name exactly ink={ink!r}, "
                          f"background={background!r}; expected one of {list(templates_for(ink, background))}",
                          field="template")
    text = template.format(digit=DIGIT_WORDS[digit] if spelled else NUMERALS[digit],
                           ink=ink, background=background)
    return _articles(text.split())


def prompt_for(digit: int, ink: str | None = None, background: str | None = None,
               rng: np.random.Generator | None = None) -> str:
    """A prompt for `digit` in `ink` on `background` (None: not named); with `rng`, a random
    template and numeral or word, else the canonical template with the numeral."""
    _check(digit, ink, background)
    templates = templates_for(ink, background)
    if rng is None:
        return fill(templates[0], digit, ink, background)
    template = templates[int(rng.integers(len(templates)))]
    return fill(template, digit, ink, background, spelled=bool(rng.integers(2)))


def parse_prompt(prompt: str) -> tuple[int | None, str | None, str | None]:
    """(digit, ink, background) a prompt names, None for each it does not name."""
    if not isinstance(prompt, str):
        raise ConfigError(f"prompt: expected a string, found {type(prompt).__name__}", field="prompt")
    words = _WORD.findall(prompt.lower())
    digits = {_DIGIT_OF[w] for w in words if w in _DIGIT_OF}
    inks, backgrounds = set(), set()
    for i, word in enumerate(words):
        if word not in COLOURS:
            continue
        before = words[max(0, i - 2):i]
        after = words[i + 1:i + 2]
        is_background = after == ["background"] or before[-1:] == ["on"] or before in (["on", "a"], ["on", "an"])
        (backgrounds if is_background else inks).add(word)
    for kind, found in (("digit", digits), ("ink", inks), ("background", backgrounds)):
        if len(found) > 1:
            raise ConfigError(f"prompt {prompt!r} names more than one {kind}: {sorted(found, key=str)}; "
                              f"expected at most one", field="prompt")
    return (next(iter(digits), None), next(iter(inks), None), next(iter(backgrounds), None))


def _check(digit: int, ink: str | None, background: str | None) -> None:
    if isinstance(digit, bool) or not isinstance(digit, (int, np.integer)) or not 0 <= digit <= 9:
        raise ConfigError(f"digit {digit!r}: expected an integer from 0 to 9", field="digit")
    for field, name in (("ink", ink), ("background", background)):
        if name is not None and name not in COLOURS:
            raise ConfigError(f"{field} {name!r}: expected one of {list(COLOUR_NAMES)} or None", field=field)
    if ink is not None and ink == background:
        raise ConfigError(f"ink and background are both {ink!r}: the digit would be invisible; "
                          f"expected two different colours", field="ink")


def _articles(words: list[str]) -> str:
    """'a' before a vowel sound becomes 'an' ('an 8', 'an eight')."""
    fixed = [("an" if word == "a" and i + 1 < len(words) and _vowel_sound(words[i + 1]) else word)
             for i, word in enumerate(words)]
    return " ".join(fixed)


def _vowel_sound(word: str) -> bool:
    return word[0] in "aeiou" or word == "8"


def _vocabulary() -> tuple[str, ...]:
    """Every word any template produces, for any digit and colours (plus numerals and digit words)."""
    words = set(NUMERALS) | set(DIGIT_WORDS) | set(COLOUR_NAMES)
    for template in TEMPLATES:
        ink = "{ink}" in template
        background = "{background}" in template
        for digit in range(10):
            for spelled in (False, True):
                # Colour names are all in `words` already; any two distinct ones fill the slots.
                text = fill(template, digit, COLOUR_NAMES[0] if ink else None,
                            COLOUR_NAMES[1] if background else None, spelled=spelled)
                words.update(text.split())
    return tuple(sorted(words))


VOCABULARY: tuple[str, ...] = _vocabulary()
