"""The trained built-in models that ship with ldmrt (ldmrt/builtin/, made by scripts/train_digits.py
and scripts/train_digits_concat.py).

Each is a real checkpoint layout — `<name>.safetensors` + its CompVis `<name>.yaml` (+ a
`tokenizer/` folder) — exported through exactly the path a user's checkpoint takes; the name is
only a shortcut for its files. Their training records sit beside them (`<name>-training.json`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ldmrt.checkpoints.source import ModelSource, checkpoint_source
from ldmrt.errors import CheckpointError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin" / "digits"
# digits-sr / digits-inpaint: digits fine-tuned with concatenated maps (scripts/train_digits_concat.py);
# digits-layout: digits fine-tuned on layouts of digits (scripts/train_digits_layout.py)
BUILTIN_NAMES = ("digits", "digits-vq", "digits-sr", "digits-inpaint", "digits-layout")


def builtin_files(name: str) -> tuple[Path, Path, Path | None]:
    """(checkpoint, yaml, tokenizer folder or None) of built-in model `name`."""
    if name not in BUILTIN_NAMES:
        raise CheckpointError(f"built-in model {name!r}: expected one of {list(BUILTIN_NAMES)}", field="source")
    checkpoint, yaml = BUILTIN_DIR / f"{name}.safetensors", BUILTIN_DIR / f"{name}.yaml"
    if not checkpoint.is_file() or not yaml.is_file():
        raise CheckpointError(f"built-in model {name!r}: {checkpoint.name} and {yaml.name} are missing from "
                              f"{BUILTIN_DIR} (an incomplete install?); reinstall ldmrt, or train it with "
                              f"scripts/train_digits.py --model {name}", field="source")
    # The model's own training record says which files are its (a class-conditional one has no tokenizer).
    record = BUILTIN_DIR / f"{name}-training.json"
    try:
        tokenizer = json.loads(record.read_text())["checkpoint"]["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"built-in model {name!r}: {record} is missing or unreadable ({exc}); reinstall "
                              f"ldmrt, or train it with scripts/train_digits.py --model {name}",
                              field="source") from None
    return checkpoint, yaml, None if tokenizer is None else BUILTIN_DIR / tokenizer


def available_builtins() -> tuple[str, ...]:
    """The built-in names whose files are installed here (builtin_files finds them all)."""
    found = []
    for name in BUILTIN_NAMES:
        try:
            builtin_files(name)
        except CheckpointError:
            continue
        found.append(name)
    return tuple(found)


def builtin_source(name: str) -> ModelSource:
    """What `ldmrt export NAME` exports for a built-in name: its checkpoint, loaded strictly, with
    prompts of its own data set for int8 calibration (text-conditioned models)."""
    checkpoint, yaml, tokenizer = builtin_files(name)
    source = checkpoint_source(checkpoint, yaml=yaml, tokenizer=tokenizer)
    if tokenizer is None:
        return source
    return dataclasses.replace(source, prompts=domain_prompts())


def domain_prompts() -> tuple[str, ...]:
    """Calibration prompts from the digits data set's templates (plain, worded, light ink on dark
    and dark on light), then one held out for the parity run."""
    from ldmrt.digits.prompts import DIGIT_WORDS, prompt_for

    return (prompt_for(3), f"the digit {DIGIT_WORDS[7]} in white on black", prompt_for(5, "yellow", "blue"),
            prompt_for(0, "red", "white"), prompt_for(8, "green", "white"))
