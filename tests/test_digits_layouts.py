"""ldmrt.digits.layouts, what digits-layout trains on and how its images are judged: boxes inside
the canvas and apart, ink only inside the boxes, and the judge reading real canvases' crops."""
from __future__ import annotations

import numpy as np
import pytest

from ldmrt.digits import DigitJudge
from ldmrt.digits.layouts import CANVAS, MAX_DIGITS, PLACEMENTS, box_crops, cell_boxes, layout_samples, random_boxes
from ldmrt.errors import ConfigError


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_boxes_stay_inside_the_canvas_and_apart(placement):
    rng = np.random.default_rng(0)
    for _ in range(300):
        count = int(rng.integers(1, MAX_DIGITS + 1))
        boxes = PLACEMENTS[placement](rng, count)
        assert len(boxes) == count
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert 0 <= x0 < x1 <= CANVAS and 0 <= y0 < y1 <= CANVAS and x1 - x0 == y1 - y0 >= 22
            for a0, b0, a1, b1 in boxes[i + 1:]:
                assert x1 <= a0 or a1 <= x0 or y1 <= b0 or b1 <= y0          # no overlap
    cells = [{(x0 // 32, y0 // 32) for x0, y0, _, _ in cell_boxes(rng, 3)} for _ in range(20)]
    assert all(len(c) == 3 for c in cells)


def test_ink_is_only_inside_its_boxes():
    for canvas, layout in layout_samples(20, seed=1, placement="free"):
        outside = np.ones(canvas.shape[:2], bool)
        for item in layout:
            x0, y0, x1, y1 = (round(v * CANVAS) for v in item["box"])
            outside[y0:y1, x0:x1] = False
        assert canvas[outside].min() >= 0.999 and canvas[~outside].min() < 0.5


def test_the_judge_reads_real_canvases_crops():
    """The evaluation itself: digits the judge never saw (the train split), drawn into boxes and cropped back."""
    samples = layout_samples(30, seed=2, split="train", augment=False, digits_per_canvas=2, placement="cells")
    crops, classes = box_crops(np.stack([c for c, _ in samples]), [layout for _, layout in samples])
    read = np.array([r.digit for r in DigitJudge.train(seed=0).read(crops)])
    assert len(classes) == 60 and (read == classes).mean() >= 0.9


@pytest.mark.parametrize("call, words", [
    (lambda rng: random_boxes(rng, 0), "count 0: expected 1 to 3"),
    (lambda rng: cell_boxes(rng, 4), "count 4: expected 1 to 3"),
    (lambda rng: random_boxes(rng, 3, sides=(40, 40)), "found no room"),
    (lambda rng: layout_samples(1, 0, placement="grid"), "placement 'grid'"),
    (lambda rng: layout_samples(1, 0, split="test"), "split 'test'"),
])
def test_bad_arguments_are_refused_by_name(call, words):
    with pytest.raises(ConfigError, match=words):
        call(np.random.default_rng(0))
