"""The paper's layout-to-image and post-hoc image guidance rows on the trained digits (issue 18):
accuracy read by the independent classifier, the cost of a guided step, and the README's pictures.

    .venv/bin/python benchmarks/layout_guidance.py [--canvases 50] [--targets 50] [--rounds 3]

- layout: `digits-layout` (ONNX Runtime) draws two distinct random digits in random boxes of a
  64x64 canvas, each in its own cell of the 2x2 grid ("cells", as the last training stage) or
  anywhere ("free"); the judge reads each box's crop (share showing its own digit, the other box's,
  either: per CFG scale);
- guidance: the unprompted `digits` model (torch backend, DDIM 20) with and without an 8x8 target
  (a real digit the judge never saw, bicubic-downsampled), per guide setting: share read as the
  target's digit;
- cost: seconds per denoising step, guided and unguided, at 32x32 and 64x64 (twice the trained
  size), medians over `--rounds` interleaved rounds, each in a fresh process;
- pictures: docs/layout-sheet.png (layouts with their boxes drawn) and docs/guided-upsampling.png
  (8x8 / 16x16 targets, unguided and guided samples at 64x64, twice the trained size).

Writes benchmarks/results/layout_guidance.json with the machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ldmrt.bench import machine_info, write_report
from ldmrt.checkpoints.builtin import builtin_source
from ldmrt.digits import DigitJudge
from ldmrt.digits.layouts import CANVAS, PLACEMENTS, box_crops, other_box_classes, small_digits, two_digit_layouts
from ldmrt.export.bundle import ExportOptions, export_bundle
from ldmrt.iospec import ShapeRanges
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "ldmrt.layout_guidance/1"
CFG_SCALES = (1.0, 3.0, 5.0)
GUIDES = ((0.0, 0.0), (0.1, 0.0), (10.0, 0.0), (10.0, 0.003), (3.0, 0.003), (30.0, 0.003))   # (scale, uncertainty)


def export(name: str, work: Path, max_size: int | None = None) -> Path:
    """The built-in model's bundle (its default sizes, or up to `max_size` pixels)."""
    out = work / name
    if not out.exists():
        source = builtin_source(name)
        ranges = ShapeRanges.for_model(source.model.config)
        if max_size:
            ranges = dataclasses.replace(ranges, max_size=max_size)
        export_bundle(source, out, ExportOptions(shape_ranges=ranges, validate=False))
    return out


def generate(pipeline: Pipeline, request: GenerationRequest, per_image: dict[str, list]) -> np.ndarray:
    """Images for one request per chunk of the bundle's batch limit: `per_image` fields sliced,
    the seed advanced per chunk."""
    count = len(next(iter(per_image.values())))
    step = pipeline.manifest.shape_ranges.max_batch
    chunks = [pipeline.generate(dataclasses.replace(
        request, batch=min(step, count - start), seed=request.seed + start,
        **{name: values[start:start + step] for name, values in per_image.items()})).images
        for start in range(0, count, step)]
    return np.concatenate(chunks)


def layout_rows(pipeline: Pipeline, judge: DigitJudge, count: int) -> list[dict]:
    rows = []
    for placement in PLACEMENTS:
        layouts = two_digit_layouts(count, seed=7, placement=placement)
        for cfg in CFG_SCALES:
            images = generate(pipeline, GenerationRequest(steps=20, sampler="ddim", guidance=cfg, seed=3),
                              {"layout": layouts})
            crops, classes = box_crops(images, layouts)
            other = other_box_classes(classes)
            read = np.array([r.digit for r in judge.read(crops)])
            rows.append({"placement": placement, "guidance": cfg, "boxes": len(classes),
                         "box_accuracy": float((read == classes).mean()),            # its own digit
                         "other_box_digit": float((read == other).mean()),           # the other box's
                         "in_layout": float(((read == classes) | (read == other)).mean())})
    return rows


def guidance_rows(pipeline: Pipeline, judge: DigitJudge, count: int) -> list[dict]:
    small, digits = small_digits(count, seed=5, side=8)
    rows = []
    for scale, uncertainty in GUIDES:
        request = GenerationRequest(prompt="", guidance=1.0, steps=20, sampler="ddim", seed=1)
        fields = {"guide_image": small} if scale > 0 else {}
        if scale > 0:
            request = dataclasses.replace(request, guide_scale=scale, guide_uncertainty=uncertainty)
        images = generate(pipeline, request, fields or {"prompt": [""] * count})
        share = float(np.mean([r.digit == d for r, d in zip(judge.read(images), digits)]))
        rows.append({"guide_scale": scale, "guide_uncertainty": uncertainty, "targets": count,
                     "read_as_target": share})
    return rows


def measure_once(bundle: Path) -> dict:
    """One fresh process's seconds per step: guided and unguided, at 32 and 64 pixels (DDIM 10)."""
    import torch

    torch.set_num_threads(2)
    pipeline = Pipeline.load(bundle, "torch")
    out = {}
    for side in (32, 64):
        guide = small_digits(1, seed=5, side=side // 4)[0]
        for guided in (False, True):
            extra = {"guide_image": guide} if guided else {}
            request = GenerationRequest(prompt="", guidance=1.0, steps=10, sampler="ddim", height=side,
                                        width=side, **extra)
            pipeline.generate(request)                       # warm-up
            times = []
            for _ in range(3):
                result = pipeline.generate(request)
                times.append(result.timings["denoise"] / 10)
            out[f"{side}px_{'guided' if guided else 'plain'}"] = statistics.median(times)
    return out


def cost_rows(bundle: Path, rounds: int) -> dict:
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        run = subprocess.run([sys.executable, __file__, "--measure-once", str(bundle)], capture_output=True,
                             text=True, check=True)
        for key, value in json.loads(run.stdout.strip().splitlines()[-1]).items():
            samples.setdefault(key, []).append(value)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    return {"seconds_per_step": medians, "rounds": rounds, "samples": samples,
            "guided_over_plain": {side: medians[f"{side}_guided"] / medians[f"{side}_plain"]
                                  for side in ("32px", "64px")}}


def layout_sheet(pipeline: Pipeline, path: Path) -> None:
    """Six layouts at 4x, boxes drawn in red with their digit."""
    layouts = two_digit_layouts(6, seed=21)
    images = generate(pipeline, GenerationRequest(steps=20, sampler="ddim", guidance=3.0, seed=2), {"layout": layouts})
    zoom = 4
    sheet = Image.new("RGB", (6 * CANVAS * zoom + 5 * 8, CANVAS * zoom), "white")
    for i, (image, layout) in enumerate(zip(images, layouts)):
        tile = Image.fromarray((image * 255).round().astype(np.uint8)).resize((CANVAS * zoom,) * 2, Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        for item in layout:
            box = [v * CANVAS * zoom for v in item["box"]]
            draw.rectangle(box, outline=(220, 30, 30), width=2)
            draw.text((box[0] + 4, box[1] + 2), str(item["class"]), fill=(220, 30, 30))
        sheet.paste(tile, (i * (CANVAS * zoom + 8), 0))
    sheet.save(path)


def upsampling_sheet(pipeline: Pipeline, path: Path) -> None:
    """Rows: the 16x16 target (nearest), unguided and guided 64x64 samples (twice the trained size)."""
    small, _ = small_digits(6, seed=9, side=16)
    request = GenerationRequest(prompt="", guidance=1.0, steps=20, sampler="ddim", seed=4, height=64, width=64)
    plain = generate(pipeline, request, {"prompt": [""] * len(small)})
    guided = generate(pipeline, request, {"guide_image": small})
    rows = [np.stack([np.asarray(Image.fromarray((s * 255).round().astype(np.uint8)).resize((64, 64), Image.NEAREST),
                                 np.float32) / 255 for s in small]), plain, guided]
    zoom = 3
    sheet = Image.new("RGB", (6 * 64 * zoom + 5 * 6, 3 * 64 * zoom + 2 * 6), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).resize((64 * zoom,) * 2,
                                                                                                 Image.NEAREST)
            sheet.paste(tile, (c * (64 * zoom + 6), r * (64 * zoom + 6)))
    sheet.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--canvases", type=int, default=50)
    parser.add_argument("--targets", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "layout_guidance.json")
    parser.add_argument("--no-pictures", action="store_true")
    parser.add_argument("--measure-once", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_once:
        print(json.dumps(measure_once(args.measure_once)))
        return 0
    started = time.perf_counter()
    judge = DigitJudge.train(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        layout, digits = Pipeline.load(export("digits-layout", work)), export("digits", work, max_size=64)
        guided = Pipeline.load(digits, "torch")
        report = {"schema": SCHEMA, "machine": machine_info(),
                  "layout": layout_rows(layout, judge, args.canvases),
                  "guidance": guidance_rows(guided, judge, args.targets),
                  "cost": cost_rows(digits, args.rounds)}
        if not args.no_pictures:
            layout_sheet(layout, ROOT / "docs" / "layout-sheet.png")
            upsampling_sheet(guided, ROOT / "docs" / "guided-upsampling.png")
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_report(report, args.json, "--json")
    print(json.dumps({k: report[k] for k in ("layout", "guidance", "cost")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
