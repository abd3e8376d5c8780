"""What the built-in digits models draw, read by an independent classifier (ldmrt.digits.judge).

    .venv/bin/python benchmarks/digits_accuracy.py [--seeds 5] [--steps 20] [--sampler ddim]

Exports `digits` and `digits-vq` (the shipped checkpoints), generates every digit 0-9 x seeds for
plain, worded and coloured prompts (digits) and for class labels (digits-vq), at guidance 7.5 and
1, on onnxruntime fp32, and records the judge's accuracy in benchmarks/results/digits_accuracy.json
with the machine; writes the contact sheet docs/digits-sheet.png (rows: digits 0-9; columns: seeds;
"a handwritten D" at guidance 7.5).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ldmrt.checkpoints.builtin import builtin_source
from ldmrt.digits import DIGIT_WORDS, DigitJudge, accuracy
from ldmrt.export.bundle import ExportOptions, export_bundle
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline

ROOT = Path(__file__).resolve().parent.parent
COLOUR_PAIRS = (("red", "white"), ("blue", "yellow"), ("white", "black"), ("green", "white"))


def cpu_flags() -> list[str]:
    wanted = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile"}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return sorted(wanted & set(line.split(":", 1)[1].split()))
    return []


def prompt_sets(seeds: int) -> dict[str, list[tuple[int, str, str | None, str | None, int]]]:
    """kind -> [(digit, prompt, ink, background, seed)]."""
    plain, word, coloured = [], [], []
    for digit in range(10):
        for seed in range(seeds):
            plain.append((digit, f"a handwritten {digit}", None, None, seed))
            word.append((digit, f"the digit {DIGIT_WORDS[digit]}", None, None, seed))
            ink, background = COLOUR_PAIRS[(digit + seed) % len(COLOUR_PAIRS)]
            coloured.append((digit, f"a {ink} {digit} on a {background} background", ink, background, seed))
    return {"plain": plain, "word": word, "coloured": coloured}


def read(judge: DigitJudge, images: np.ndarray, cases) -> dict:
    inks = [c[2] for c in cases]
    backgrounds = [c[3] for c in cases]
    result = accuracy(judge.read(images), [c[0] for c in cases],
                      inks if any(inks) else None, backgrounds if any(backgrounds) else None)
    return {k: result[k] for k in ("images", "digit", "ink", "background", "all", "mean_confidence")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "digits_accuracy.json")
    parser.add_argument("--sheet", type=Path, default=ROOT / "docs" / "digits-sheet.png")
    args = parser.parse_args()
    judge = DigitJudge.train(seed=0)
    work = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cpu": platform.processor() or platform.machine(), "flags": cpu_flags()},
              "judge_heldout_accuracy": judge.heldout_accuracy, "backend": "onnxruntime", "precision": "fp32",
              "sampler": args.sampler, "steps": args.steps, "seeds": args.seeds, "results": {}}
    text = Pipeline.load(export_bundle(builtin_source("digits"), work / "digits", ExportOptions()).path,
                         "onnxruntime")
    classes = Pipeline.load(export_bundle(builtin_source("digits-vq"), work / "digits-vq", ExportOptions()).path,
                            "onnxruntime")
    sheet = None
    for guidance in (7.5, 1.0):
        rows = {}
        for kind, cases in prompt_sets(args.seeds).items():
            images = np.concatenate([text.generate(GenerationRequest(
                prompt=prompt, seed=seed, steps=args.steps, guidance=guidance, sampler=args.sampler)).images
                for _, prompt, _, _, seed in cases])
            rows[f"digits: {kind}"] = read(judge, images, cases)
            if kind == "plain" and guidance == 7.5:
                sheet = images
        labels = [(d, None, None, None, s) for d in range(10) for s in range(args.seeds)]
        images = np.concatenate([classes.generate(GenerationRequest(
            class_labels=[d], seed=s, steps=args.steps, guidance=guidance, sampler=args.sampler)).images
            for d, _, _, _, s in labels])
        rows["digits-vq: class labels"] = read(judge, images, labels)
        report["results"][f"guidance {guidance:g}"] = rows
        for name, row in rows.items():
            print(f"guidance {guidance:g}  {name:24s} digit {row['digit']:.2f}  ink {row['ink']}  "
                  f"background {row['background']}", flush=True)
    report["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    grid = sheet.reshape(10, args.seeds, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(320, args.seeds * 32, 3)
    Image.fromarray((grid * 255).round().clip(0, 255).astype(np.uint8)).resize(
        (args.seeds * 64, 640), Image.NEAREST).save(args.sheet)
    print(f"wrote {args.out} and {args.sheet}")


if __name__ == "__main__":
    main()
