"""The paper's last two systems on the trained digits (issue 18): `digits-layout` draws the layout's
digits in its boxes on a 64x64 canvas, each in its own box, and post-hoc
image guidance steers the unprompted `digits` model to the digit of an 8x8 target; the independent
classifier (ldmrt.digits.judge) reads each box's crop and each guided image."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ldmrt.checkpoints.builtin import builtin_files
from ldmrt.cli import app
from ldmrt.digits import DigitJudge
from ldmrt.digits.layouts import CANVAS, box_crops, other_box_classes, small_digits, two_digit_layouts
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline

BOUND = 0.85         # issue 18: >= 85% per box, and of guided images
CANVASES = 20        # two boxes each
TARGETS = 20         # 8x8 guides
LAYOUT_GUIDANCE = 3.0


@pytest.fixture(scope="module")
def judge() -> DigitJudge:
    return DigitJudge.train(seed=0)


def _export(name: str, root, max_batch: int) -> str:
    out = root / name
    result = CliRunner().invoke(app, ["export", name, "--out", str(out), "--no-validate", "--max-batch", str(max_batch)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def layout_pipeline(tmp_path_factory) -> Pipeline:
    return Pipeline.load(_export("digits-layout", tmp_path_factory.mktemp("builtin"), CANVASES), threads=2)


def test_the_layout_model_ships_in_compvis_layout2img_form():
    checkpoint, yaml, tokenizer = builtin_files("digits-layout")
    text = yaml.read_text()
    assert checkpoint.stat().st_size <= 10 * 2 ** 20 and tokenizer is None
    assert "coordinates_bbox" in text and "use_tokenizer: false" in text and "no_object_classes: 10" in text


@pytest.fixture(scope="module")
def layout_readings(layout_pipeline, judge):
    """(what the judge reads in each box, each box's digit, the other box's digit) over CANVASES layouts."""
    layouts = two_digit_layouts(CANVASES, seed=7)
    images = layout_pipeline.generate(GenerationRequest(layout=layouts, batch=len(layouts), steps=20, sampler="ddim",
                                                        guidance=LAYOUT_GUIDANCE, seed=3)).images
    assert images.shape == (CANVASES, CANVAS, CANVAS, 3)
    crops, classes = box_crops(images, layouts)
    other = other_box_classes(classes)
    return np.array([r.digit for r in judge.read(crops)]), classes, other


def test_the_boxes_show_the_layouts_digits(layout_readings, record_property):
    """A digit in each box, and one of the layout's two (chance: 20%)."""
    read, classes, other = layout_readings
    in_layout = ((read == classes) | (read == other)).mean()
    record_property("in_layout", float(in_layout))
    record_property("own_box", float((read == classes).mean()))
    assert in_layout >= BOUND, (read, classes)


def test_each_box_shows_its_own_digit(layout_readings):
    """Issue 18's bound: the judge reads each box's own digit (>= 85%), rarely the other box's."""
    read, classes, other = layout_readings
    assert (read == classes).mean() >= BOUND and (read == other).mean() <= 0.1, (read, classes)


@pytest.fixture(scope="module")
def digits_bundle(tmp_path_factory):
    return _export("digits", tmp_path_factory.mktemp("builtin"), TARGETS)


def test_guidance_steers_the_unprompted_digits_model_to_an_8x8_target(digits_bundle, judge):
    pipeline = Pipeline.load(digits_bundle, "torch")
    targets, digits = small_digits(TARGETS, seed=5, side=8)                  # digits the judge never saw
    request = GenerationRequest(prompt="", guidance=1.0, steps=20, sampler="ddim", batch=len(targets), seed=1)
    guided = pipeline.generate(dataclasses.replace(request, guide_image=targets)).images
    unguided = pipeline.generate(request).images
    guided_share = np.mean([r.digit == d for r, d in zip(judge.read(guided), digits)])
    unguided_share = np.mean([r.digit == d for r, d in zip(judge.read(unguided), digits)])
    assert guided_share >= BOUND and unguided_share <= 0.35, (guided_share, unguided_share)


def test_the_training_script_writes_a_layout_checkpoint_the_loader_reads(tmp_path):
    """scripts/train_digits_layout.py for a few steps: its YAML and weights load back as a layout
    model with the script's token constants, and its layout tokens reach the conditioner."""
    import torch

    from ldmrt.checkpoints.builtin import BUILTIN_DIR
    from ldmrt.checkpoints.source import checkpoint_source
    from ldmrt.layout import encode_layout
    from tests.modules import load_file

    script = load_file(Path(__file__).resolve().parents[1] / "scripts" / "train_digits_layout.py",
                       "ldmrt_train_digits_layout")
    settings = script.base.Settings(batch=4, steps=3, warmup_steps=1)
    record = script.train(tmp_path, settings, pool_size=8, placement="cells", resume=False, show_progress=False,
                          attention_weight=0.1)
    assert record["diffusion"]["steps"] == 3 and record["stages"][0]["placement"] == "cells"
    assert record["stages"][0]["attention_loss_mean100"] > 0
    loaded = checkpoint_source(tmp_path / "digits-layout.safetensors", yaml=tmp_path / "digits-layout.yaml").model
    assert loaded.config.layout == script.LAYOUT and loaded.config.default_image_size == CANVAS
    tokens = torch.from_numpy(encode_layout(loaded.config.layout, [{"class": 3, "box": [0, 0, 0.5, 0.5]}])[None])
    with torch.no_grad():
        assert loaded.conditioner(tokens.long()).shape == (1, script.LAYOUT.max_length, 64)
    # a further stage from the shipped model keeps the shipped record's stages
    shipped = json.loads((BUILTIN_DIR / "digits-layout-training.json").read_text())["stages"]
    again = script.train(tmp_path / "more", settings, pool_size=8, placement="cells", resume=True, show_progress=False)
    assert again["stages"][:-1] == shipped and again["stages"][-1]["from"] == "digits-layout"


def test_the_cli_guides_with_an_image_file_and_refuses_backends_without_gradients(digits_bundle, judge, tmp_path):
    targets, digits = small_digits(2, seed=8, side=8)
    guide = tmp_path / "target.png"
    Image.fromarray((targets[0] * 255).round().astype(np.uint8)).save(guide)
    out = tmp_path / "guided.png"
    result = CliRunner().invoke(app, ["generate", str(digits_bundle), "--backend", "torch", "--guidance", "1",
                                      "--guide-image", str(guide), "--out", str(out)])
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(out).convert("RGB"), np.float32)[None] / 255
    assert judge.read(image)[0].digit == digits[0]
    refused = CliRunner().invoke(app, ["generate", str(digits_bundle), "--guide-image", str(guide),
                                       "--out", str(tmp_path / "no.png")])
    assert refused.exit_code == 2 and "--guide-image" in refused.output and "--backend torch" in refused.output
    assert not (tmp_path / "no.png").exists()


def test_the_attention_supervision_loss_matches_its_definition():
    """train_digits_layout's binding loss, against numpy in float64 from the layers' weights: the mean
    over attention layers of -log(the share of each head's attention, at each pixel inside box k,
    on object k's three tokens), dropped rows and pixels outside every box left out."""
    import torch

    from ldmrt.checkpoints.builtin import builtin_source
    from tests.modules import load_file

    script = load_file(Path(__file__).resolve().parents[1] / "scripts" / "train_digits_layout.py",
                       "ldmrt_train_digits_layout")
    layouts = [[{"class": 1, "box": [0.0, 0.0, 0.5, 0.5]}, {"class": 7, "box": [0.5, 0.5, 1.0, 0.75]}],
               [{"class": 3, "box": [0.25, 0.0, 0.75, 1.0]}], [{"class": 2, "box": [0, 0, 1, 1]}]]
    maps = script.object_maps(layouts, 8).numpy().reshape(3, 8, 8)
    for n, layout in enumerate(layouts):
        for y in range(8):
            for x in range(8):
                inside = [k for k, o in enumerate(layout) if o["box"][0] * 8 <= x + 0.5 < o["box"][2] * 8
                          and o["box"][1] * 8 <= y + 0.5 < o["box"][3] * 8]
                assert maps[n, y, x] == (inside[0] if inside else -1)
    model = builtin_source("digits-layout").model
    supervision = script.AttentionSupervision(model, layouts, weight=0.5)
    from ldmrt.layout import encode_layout
    tokens = torch.from_numpy(np.stack([encode_layout(script.LAYOUT, o) for o in layouts]).astype(np.int64))
    rows, drop = torch.tensor([0, 1, 2]), torch.tensor([False, False, True])
    model.unet.train()
    with torch.no_grad():
        model.unet(torch.randn(3, 4, 16, 16), torch.tensor([10.0, 500.0, 900.0]), model.conditioner(tokens))
        seen = [(layer, x.double().numpy(), c.double().numpy()) for layer, x, c in supervision.seen]
        loss = supervision(rows, drop).item()
    model.unet.eval()
    assert len(seen) == len(supervision.layers) > 0
    terms = []
    for layer, x, context in seen:
        side = int(round(x.shape[1] ** 0.5))
        where = script.object_maps(layouts, side).numpy()
        q = x @ layer.to_q.weight.double().numpy().T
        k = context @ layer.to_k.weight.double().numpy().T
        d = q.shape[-1] // layer.heads
        values = []
        for b in (0, 1):                                   # row 2 is dropped
            for h in range(layer.heads):
                logits = q[b, :, h * d:(h + 1) * d] @ k[b, :, h * d:(h + 1) * d].T / np.sqrt(d)
                weights = np.exp(logits - logits.max(-1, keepdims=True))
                weights /= weights.sum(-1, keepdims=True)
                for p in np.flatnonzero(where[b] >= 0):
                    j = 3 * where[b, p]
                    values.append(-np.log(weights[p, j:j + 3].sum()))
        terms.append(np.mean(values))
    assert loss == pytest.approx(0.5 * np.mean(terms), rel=1e-5)
    assert supervision.values[-1] == pytest.approx(np.mean(terms), rel=1e-5)
