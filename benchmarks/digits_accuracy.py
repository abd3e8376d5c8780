"""What the built-in digits models draw, read by an independent classifier (ldmrt.digits.judge):
the accuracy grid (backend x precision x sampler, batch, img2img, class labels, guidance 7.5 vs 1).

    .venv/bin/python benchmarks/digits_accuracy.py [--seeds 10] [--rows NAME ...] [--markdown]

Exports `digits` (fp32, fp16, int8) and `digits-vq` (fp32, int8) from the shipped checkpoints,
generates every digit 0-9 x seeds for each row of GRID and records what the judge reads in
benchmarks/results/digits_accuracy.json with the machine: per row the share of images showing
the prompted digit (and the asked ink and background colours), whether the row meets the bounds
(digit >= 90%, each asked colour >= 95%; guidance-1 rows are measured, not bounded), and for the
fp16 and int8 bundles the image PSNR against fp32 on the same prompts and seeds (int8: with the
export's own per-call figures). Writes the contact sheet docs/digits-sheet.png (rows: digits 0-9;
columns: two seeds of "a handwritten D", then "a red D on a white background" and three more
colour pairs, guidance 7.5, DDIM 20). tests/test_digits_grid.py (slow) runs the same grid.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ldmrt.bench import check_report_path, machine_info, write_report
from ldmrt.checkpoints.builtin import builtin_source
from ldmrt.iospec import Precision
from ldmrt.errors import ConfigError
from ldmrt.digits import DIGIT_WORDS, DigitJudge, accuracy
from ldmrt.digits.data import digit_images, render, split_indices
from ldmrt.engines.backend import Backend
from ldmrt.export.bundle import ExportOptions, export_bundle
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline

ROOT = Path(__file__).resolve().parent.parent
DIGIT_BOUND, COLOUR_BOUND = 0.90, 0.95
COLOUR_PAIRS = (("red", "white"), ("blue", "yellow"), ("white", "black"), ("green", "white"))
IMG2IMG_STRENGTH = 0.8
SCHEMA = "ldmrt.digits_accuracy/1"


@dataclass(frozen=True)
class Row:
    """One line of the grid: which bundle, how it samples, which prompts."""
    name: str
    model: str = "digits"                  # or "digits-vq" (class labels)
    backend: Backend = Backend.ONNXRUNTIME
    precision: Precision = Precision.FP32
    sampler: str = "ddim"
    steps: int = 20
    guidance: float = 7.5
    prompts: str = "plain"                 # plain | word | coloured | labels | img2img
    batch: int = 1

    @property
    def bounded(self) -> bool:
        return self.guidance > 1


# Every sampler at a step count it is meant for: the deterministic ones at 20, the ancestral ones
# (fresh noise each step) at 30 and DDPM at 50; LCM at 8 (it is made for consistency-distilled
# models; on this eps model each step re-noises the predicted image, so it is DDPM-like).
SAMPLER_STEPS = {"ddim": 20, "plms": 20, "euler": 20, "dpmpp-2m": 20, "dpmpp-2m-karras": 20,
                 "euler-a": 30, "ddpm": 50, "lcm": 8}

GRID: tuple[Row, ...] = (
    Row("fp32 plain"), Row("fp32 word", prompts="word"), Row("fp32 coloured", prompts="coloured"),
    Row("fp32 plain, guidance 1", guidance=1.0), Row("fp32 word, guidance 1", prompts="word", guidance=1.0),
    Row("fp32 coloured, guidance 1", prompts="coloured", guidance=1.0),
    Row("fp16 plain", precision=Precision.FP16), Row("fp16 coloured", precision=Precision.FP16, prompts="coloured"),
    Row("int8 plain", precision=Precision.INT8), Row("int8 coloured", precision=Precision.INT8, prompts="coloured"),
    Row("torch plain", backend=Backend.TORCH), Row("torch coloured", backend=Backend.TORCH, prompts="coloured"),
    *(Row(f"sampler {s}", sampler=s, steps=n) for s, n in SAMPLER_STEPS.items() if s != "ddim"),
    Row("batch 4", batch=4), Row("batch 4 coloured", batch=4, prompts="coloured"),
    Row("img2img 0.8", prompts="img2img"),
    Row("vq labels", model="digits-vq", prompts="labels"),
    Row("vq labels, guidance 1", model="digits-vq", prompts="labels", guidance=1.0),
    Row("vq int8 labels", model="digits-vq", precision=Precision.INT8, prompts="labels"),
    Row("vq torch labels", model="digits-vq", backend=Backend.TORCH, prompts="labels"),
)
ROW_NAMES = tuple(row.name for row in GRID)


@dataclass(frozen=True)
class Case:
    """One image to draw: what it should show, and how it is asked for."""
    digit: int
    seed: int
    prompt: str = ""
    ink: str | None = None
    background: str | None = None
    init_digit: int | None = None          # img2img: the dataset digit it starts from


def cases_for(kind: str, seeds: int) -> list[Case]:
    """Digits 0-9 x `seeds` for one kind of prompt (digit fastest, so a batch mixes digits)."""
    out = []
    for seed in range(seeds):
        for digit in range(10):
            if kind == "plain":
                out.append(Case(digit, seed, f"a handwritten {digit}"))
            elif kind == "word":
                out.append(Case(digit, seed, f"the digit {DIGIT_WORDS[digit]}"))
            elif kind == "coloured":
                ink, background = COLOUR_PAIRS[(digit + seed) % len(COLOUR_PAIRS)]
                out.append(Case(digit, seed, f"a {ink} {digit} on a {background} background", ink, background))
            elif kind == "labels":
                out.append(Case(digit, seed))
            elif kind == "img2img":
                out.append(Case(digit, seed, f"a handwritten {digit}", init_digit=(digit + 1 + seed % 9) % 10))
            else:
                raise ValueError(f"prompts {kind!r}: expected plain, word, coloured, labels or img2img")
    return out


def dataset_digit(digit: int, index: int) -> np.ndarray:
    """The `index`-th held-out dataset image of `digit`, black on white, (32, 32, 3)."""
    images, targets = digit_images()
    members = [i for i in split_indices()[1] if targets[i] == digit]
    return render(images[members[index % len(members)]], "black", "white")


def generate(pipeline: Pipeline, row: Row, cases: list[Case]) -> np.ndarray:
    """The row's images (N, 32, 32, 3), in the order of `cases`."""
    images = []
    for start in range(0, len(cases), row.batch):
        chunk = cases[start:start + row.batch]
        fields = dict(seed=chunk[0].seed * 1000 + start, steps=row.steps, guidance=row.guidance,
                      sampler=row.sampler, batch=len(chunk))
        if row.prompts == "labels":
            fields["class_labels"] = [c.digit for c in chunk]
        else:
            fields["prompt"] = [c.prompt for c in chunk]
        if row.prompts == "img2img":
            fields["init_image"] = np.stack([dataset_digit(c.init_digit, c.seed) for c in chunk])
            fields["strength"] = IMG2IMG_STRENGTH
        if row.batch == 1:      # one image per call: the seed of the case itself (the contact sheet's)
            fields["seed"] = chunk[0].seed
        images.append(pipeline.generate(GenerationRequest(**fields)).images)
    return np.concatenate(images)


def judge_row(judge: DigitJudge, row: Row, cases: list[Case], images: np.ndarray) -> dict:
    inks = [c.ink for c in cases]
    backgrounds = [c.background for c in cases]
    result = accuracy(judge.read(images), [c.digit for c in cases],
                      inks if any(inks) else None, backgrounds if any(backgrounds) else None)
    colours = [v for v in (result["ink"], result["background"]) if v is not None]
    meets = result["digit"] >= DIGIT_BOUND and all(v >= COLOUR_BOUND for v in colours)
    fields = {k: getattr(v, "value", v) for k, v in asdict(row).items()}     # enums as their names on disk
    return {**fields, **{k: result[k] for k in ("images", "digit", "ink", "background", "all",
                                                     "mean_confidence", "per_digit")},
            "meets_bounds": meets if row.bounded else None}


def psnr(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Per-image PSNR (dB) of images in [0, 1]."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return [float("inf") if m == 0 else float(10 * math.log10(1.0 / m)) for m in mse]


class Bundles:
    """Each (model, precision) exported once into `work`, each (model, precision, backend) loaded once."""

    def __init__(self, work: Path, log: Callable[[str], None]):
        self.work, self.log = work, log
        self._paths: dict[tuple[str, Precision], Path] = {}
        self._pipelines: dict[tuple[str, Precision, Backend], Pipeline] = {}
        self.int8_reports: dict[str, dict] = {}

    def pipeline(self, model: str, precision: Precision, backend: Backend) -> Pipeline:
        key = (model, precision, backend)
        if key not in self._pipelines:
            self._pipelines[key] = Pipeline.load(self.path(model, precision), backend.value)
        return self._pipelines[key]

    def path(self, model: str, precision: Precision) -> Path:
        if (model, precision) not in self._paths:
            start = time.perf_counter()
            result = export_bundle(builtin_source(model), self.work / f"{model}-{precision.value}",
                                   ExportOptions(precision=precision))
            self.log(f"exported {model} {precision.value} in {time.perf_counter() - start:.1f} s")
            if precision == Precision.INT8:
                from ldmrt.export.quantize import read_report
                report = read_report(result.path / "unet.onnx")
                self.int8_reports[model] = asdict(report)
            self._paths[(model, precision)] = result.path
        return self._paths[(model, precision)]


def run_grid(rows: tuple[Row, ...], seeds: int, work: Path,
             log: Callable[[str], None] = lambda line: print(line, flush=True)) -> dict:
    """Every row measured; the report (see the module docstring). Images stay in memory for the
    fp16/int8 PSNR against the fp32 row of the same prompts."""
    judge = DigitJudge.train(seed=0)
    bundles = Bundles(work, log)
    start = time.perf_counter()
    measured, images_of = [], {}
    for row in rows:
        cases = cases_for(row.prompts, seeds)
        began = time.perf_counter()
        images = generate(bundles.pipeline(row.model, row.precision, row.backend), row, cases)
        result = judge_row(judge, row, cases, images) | {"seconds": round(time.perf_counter() - began, 1)}
        images_of[row] = images
        measured.append(result)
        colours = "" if result["ink"] is None else f"  ink {result['ink']:.2f}  background {result['background']:.2f}"
        log(f"{row.name:28s} digit {result['digit']:.2f}{colours}  "
            f"{'ok' if result['meets_bounds'] else 'BELOW' if result['meets_bounds'] is False else '(unbounded)'}")
    reduced = {}
    for row, images in images_of.items():
        if row.precision == Precision.FP32 or row.backend != Backend.ONNXRUNTIME:
            continue
        reference = next((r for r in images_of if r.precision == Precision.FP32 and r.backend == Backend.ONNXRUNTIME
                          and (r.model, r.prompts, r.sampler, r.steps, r.guidance, r.batch)
                          == (row.model, row.prompts, row.sampler, row.steps, row.guidance, row.batch)), None)
        if reference is None:
            continue
        values = psnr(images, images_of[reference])
        reduced[row.name] = {"vs": reference.name, "psnr_median_db": float(np.median(values)),
                             "psnr_min_db": float(np.min(values)),
                             "digit_fp32": next(m["digit"] for m in measured if m["name"] == reference.name),
                             "digit": next(m["digit"] for m in measured if m["name"] == row.name)}
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine_info(),
            "judge_heldout_accuracy": judge.heldout_accuracy, "seeds": seeds,
            "bounds": {"digit": DIGIT_BOUND, "colour": COLOUR_BOUND, "unbounded": "rows at guidance 1"},
            "rows": measured, "reduced_precision_vs_fp32": reduced, "int8_export_reports": bundles.int8_reports,
            "all_bounded_rows_meet_bounds": all(m["meets_bounds"] is not False for m in measured),
            "seconds": round(time.perf_counter() - start, 1)}


def contact_sheet(pipeline: Pipeline, path: Path) -> None:
    """Rows: digits 0-9; columns: "a handwritten D" at seeds 0 and 1, then each colour pair (seed 0)."""
    columns = [("a handwritten {d}", 0), ("a handwritten {d}", 1)]
    columns += [(f"a {ink} {{d}} on a {background} background", 0) for ink, background in COLOUR_PAIRS]
    tiles = [[pipeline.generate(GenerationRequest(prompt=text.format(d=d), seed=seed, steps=20)).images[0]
              for text, seed in columns] for d in range(10)]
    grid = np.concatenate([np.concatenate(row, axis=1) for row in tiles], axis=0)
    picture = Image.fromarray((grid * 255).round().clip(0, 255).astype(np.uint8))
    picture.resize((picture.width * 2, picture.height * 2), Image.NEAREST).save(path)


def markdown(report: dict) -> str:
    """The README's table: one line per row."""
    lines = ["| row | model | backend | precision | sampler, steps | guidance | batch | images | digit | ink | "
             "background | bounds |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in report["rows"]:
        ink = "" if m["ink"] is None else f"{m['ink']:.0%}"
        background = "" if m["background"] is None else f"{m['background']:.0%}"
        bounds = {True: "met", False: "**below**", None: "(measured)"}[m["meets_bounds"]]
        lines.append(f"| {m['name']} | {m['model']} | {m['backend']} | {m['precision']} | {m['sampler']} "
                     f"{m['steps']} | {m['guidance']:g} | {m['batch']} | {m['images']} | {m['digit']:.0%} | {ink} | "
                     f"{background} | {bounds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds per digit (images per row: 10 x seeds)")
    parser.add_argument("--rows", nargs="+", choices=ROW_NAMES, metavar="ROW", help="a subset of the grid's rows")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "digits_accuracy.json")
    parser.add_argument("--sheet", type=Path, default=ROOT / "docs" / "digits-sheet.png")
    parser.add_argument("--no-sheet", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: expected at least 1")
    rows = tuple(r for r in GRID if not args.rows or r.name in args.rows)
    try:
        check_report_path(args.out, "--out")      # before minutes of work, and again when written
    except ConfigError as exc:
        parser.error(str(exc))
    with tempfile.TemporaryDirectory(prefix="ldmrt-digits-grid-") as work:
        report = run_grid(rows, args.seeds, Path(work))
        if not args.no_sheet:
            bundle = Path(work) / f"digits-{Precision.FP32.value}"
            contact_sheet(Pipeline.load(bundle if bundle.exists() else export_bundle(
                builtin_source("digits"), bundle, ExportOptions()).path, Backend.ONNXRUNTIME.value), args.sheet)
    write_report(report, args.out, "--out")
    print(f"wrote {args.out}" + ("" if args.no_sheet else f" and {args.sheet}"))
    if args.markdown:
        print(markdown(report))
    return 0 if report["all_bounded_rows_meet_bounds"] else 1


if __name__ == "__main__":
    sys.exit(main())
