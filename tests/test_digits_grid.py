"""The accuracy grid of the built-in digits models (benchmarks/digits_accuracy.py): what an
independent classifier reads in their images on every backend, precision and sampler, with
batches, img2img and class labels. The whole grid is slow (`pytest -m slow`, ~15 min); its last
result is benchmarks/results/digits_accuracy.json and the README's table. The default run checks
the grid's own pieces: which images each row asks for, and how it scores them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.modules import load_file

pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "digits_accuracy.py"


@pytest.fixture(scope="module")
def grid():
    return load_file(SCRIPT, "ldmrt_digits_grid")


def test_the_grid_covers_what_issue_16_asks_for(grid) -> None:
    rows = grid.GRID
    assert len({r.name for r in rows}) == len(rows)
    bounded = [r for r in rows if r.bounded]
    from ldmrt.engines.backend import Backend
    from ldmrt.iospec import Precision
    assert {r.precision for r in bounded if r.model == "digits"} == {Precision.FP32, Precision.FP16, Precision.INT8}
    assert {r.backend for r in bounded} == {Backend.ONNXRUNTIME, Backend.TORCH}
    from ldmrt.config import SAMPLERS
    assert {r.sampler for r in bounded} == set(SAMPLERS)          # every sampler
    assert any(r.batch > 1 for r in bounded) and any(r.prompts == "img2img" for r in bounded)
    assert any(r.model == "digits-vq" and r.prompts == "labels" for r in bounded)
    for kind in ("plain", "coloured", "labels"):                  # guidance 1 beside 7.5
        assert {r.guidance for r in rows if r.prompts == kind and r.precision == Precision.FP32
                and r.backend == Backend.ONNXRUNTIME and r.batch == 1} == {1.0, 7.5}


def test_cases_ask_for_every_digit_and_img2img_starts_from_another(grid) -> None:
    for kind in ("plain", "word", "coloured", "labels", "img2img"):
        cases = grid.cases_for(kind, 3)
        assert len(cases) == 30
        assert sorted(c.digit for c in cases) == sorted(list(range(10)) * 3)
    coloured = grid.cases_for("coloured", 4)
    assert all(c.ink in c.prompt and c.background in c.prompt and c.ink != c.background for c in coloured)
    assert {(c.ink, c.background) for c in coloured} == set(grid.COLOUR_PAIRS)
    from ldmrt.digits import parse_prompt
    assert all(parse_prompt(c.prompt) == (c.digit, c.ink, c.background) for c in coloured)
    img2img = grid.cases_for("img2img", 10)
    assert all(c.init_digit is not None and c.init_digit != c.digit for c in img2img)
    from ldmrt.digits import DigitJudge
    judge = DigitJudge.train(seed=0)
    starts = np.stack([grid.dataset_digit(c.init_digit, c.seed) for c in img2img[:20]])
    # the starting images really are those dataset digits (so reading the prompted one means something)
    assert np.mean([r.digit == c.init_digit for r, c in zip(judge.read(starts), img2img)]) >= 0.9


def test_a_row_is_scored_against_its_bounds(grid) -> None:
    from ldmrt.digits import DigitJudge
    from ldmrt.digits.judge import rendered_split
    judge = DigitJudge.train(seed=0)
    images, digits, inks, backgrounds = rendered_split("heldout", seed=7)
    cases = [grid.Case(int(d), 0, "", i, b) for d, i, b in zip(digits[:40], inks, backgrounds)]
    row = grid.Row("real digits", prompts="coloured")
    scored = grid.judge_row(judge, row, cases, images[:40])
    assert scored["meets_bounds"] is True and scored["ink"] >= 0.95
    wrong = [grid.Case((c.digit + 1) % 10, 0, "", c.ink, c.background) for c in cases]
    assert grid.judge_row(judge, row, wrong, images[:40])["meets_bounds"] is False
    assert grid.judge_row(judge, grid.Row("g1", guidance=1.0), wrong, images[:40])["meets_bounds"] is None
    same = grid.psnr(images[:3], images[:3])
    assert same == [float("inf")] * 3
    noisy = np.clip(images[:3] + 0.01, 0, 1)
    assert all(35 < p <= 40.1 for p in grid.psnr(noisy, images[:3]))


@pytest.mark.slow
def test_the_whole_grid_meets_its_bounds(grid, tmp_path) -> None:
    report = grid.run_grid(grid.GRID, seeds=10, work=tmp_path)
    below = [(r["name"], r["digit"], r["ink"], r["background"]) for r in report["rows"] if r["meets_bounds"] is False]
    assert not below, below
    rows = {r["name"]: r for r in report["rows"]}
    # guidance helps: the unguided rows read the prompt less often
    for name in ("fp32 plain", "fp32 coloured", "vq labels"):
        assert rows[name]["all"] > rows[name + ", guidance 1"]["all"], name
    for name, reduced in report["reduced_precision_vs_fp32"].items():
        assert reduced["psnr_median_db"] >= 20, (name, reduced)
