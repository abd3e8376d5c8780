"""The trained built-in `digits` model (ldmrt/builtin/digits/, scripts/train_digits.py): exported by
name through the checkpoint path, and proven by what it draws — an independent classifier trained
on held-out real digits (ldmrt.digits.judge) reads the digit each prompt asked for."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ldmrt.checkpoints.builtin import BUILTIN_DIR, available_builtins, builtin_files, builtin_source
from ldmrt.cli import app
from ldmrt.digits import DigitJudge, accuracy, prompt_for
from ldmrt.errors import CheckpointError
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline

SEEDS = (0, 1)
BOUND = 0.9          # issue 16: the prompted digit is recognized in >= 90% of images


@pytest.fixture(scope="module")
def digits_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("builtin") / "digits"
    result = CliRunner().invoke(app, ["export", "digits", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def judge() -> DigitJudge:
    return DigitJudge.train(seed=0)


def draw(pipeline: Pipeline, prompts: list[str], seed: int) -> np.ndarray:
    request = GenerationRequest(prompt=prompts, negative_prompt="", steps=20, guidance=7.5, seed=seed,
                                batch=len(prompts), height=32, width=32)
    return pipeline.generate(request).images


def test_digits_ships_and_exports_by_name_through_the_checkpoint_path(digits_bundle) -> None:
    assert "digits" in available_builtins()
    checkpoint, yaml, tokenizer = builtin_files("digits")
    assert checkpoint.stat().st_size <= 10 * 2 ** 20 and tokenizer is not None
    record = json.loads((BUILTIN_DIR / "digits-training.json").read_text())
    assert record["seed"] == 0 and record["diffusion"]["steps"] > 0 and record["wall_seconds"] <= 30 * 60
    manifest = json.loads((digits_bundle / "manifest.json").read_text())
    assert manifest["model_source"]["kind"] == "checkpoint"
    assert Path(manifest["model_source"]["location"]) == checkpoint
    assert manifest["random_weights"] is False
    assert builtin_source("digits").model.config.name == "digits"


def test_the_prompted_digit_is_what_an_independent_classifier_reads(digits_bundle, judge) -> None:
    pipeline = Pipeline.load(digits_bundle, "onnxruntime", threads=2)
    images, expected = [], []
    for seed in SEEDS:
        for first in (0, 4, 8):            # batches of at most 4 prompts (the bundle's max batch)
            digits = [d for d in range(first, min(first + 4, 10))]
            images.append(draw(pipeline, [prompt_for(d) for d in digits], seed))
            expected += digits
    found = accuracy(judge.read(np.concatenate(images)), expected)
    assert found["digit"] >= BOUND, found
    # the prompt matters: the same seeds asked for other digits are read as those digits
    shuffled = [(d + 3) % 10 for d in expected[:4]]
    other = accuracy(judge.read(draw(pipeline, [prompt_for(d) for d in shuffled], SEEDS[0])), shuffled)
    assert other["digit"] >= 0.75, other


COLOUR_PAIRS = (("red", "white"), ("blue", "yellow"), ("white", "black"), ("green", "white"))


def test_coloured_prompts_get_their_digit_ink_and_background(digits_bundle, judge) -> None:
    # the default run's slice of the grid (benchmarks/digits_accuracy.py): each digit once, in one of
    # four colour pairs, light ink on dark backgrounds among them
    pipeline = Pipeline.load(digits_bundle, "onnxruntime", threads=2)
    cases = [(d, *COLOUR_PAIRS[d % 4]) for d in range(10)]
    images = np.concatenate([draw(pipeline, [f"a {ink} {d} on a {background} background" for d, ink, background
                                              in cases[i:i + 4]], seed=5) for i in range(0, 10, 4)])
    found = accuracy(judge.read(images), [c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases])
    assert found["digit"] >= BOUND and found["ink"] >= 0.95 and found["background"] >= 0.95, found


def test_the_torch_backend_draws_the_same_digits(digits_bundle) -> None:
    prompts = [prompt_for(d) for d in (1, 7)]
    reference = draw(Pipeline.load(digits_bundle, "onnxruntime", threads=2), prompts, seed=3)
    found = draw(Pipeline.load(digits_bundle, "torch", device="cpu"), prompts, seed=3)
    assert float(np.abs(found - reference).mean()) <= 1 / 255


def test_an_unknown_or_missing_builtin_is_refused_by_name(monkeypatch, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="built-in model 'digits-xl': expected one of") as raised:
        builtin_files("digits-xl")
    assert raised.value.field == "source"
    monkeypatch.setattr("ldmrt.checkpoints.builtin.BUILTIN_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="digits.safetensors and digits.yaml are missing"):
        builtin_files("digits")
    assert available_builtins() == ()


@pytest.fixture(scope="module")
def digits_vq_bundle(tmp_path_factory) -> Path:
    from ldmrt.export.bundle import ExportOptions, export_bundle

    return export_bundle(builtin_source("digits-vq"), tmp_path_factory.mktemp("builtin") / "digits-vq",
                         ExportOptions()).path


def test_digits_vq_draws_the_class_it_is_given(digits_vq_bundle, judge) -> None:
    pipeline = Pipeline.load(digits_vq_bundle, "onnxruntime", threads=2)
    labels = [2, 5, 6, 9]
    request = GenerationRequest(class_labels=labels, steps=20, guidance=3.0, seed=0, batch=4, height=32, width=32)
    found = accuracy(judge.read(pipeline.generate(request).images), labels)
    assert found["digit"] >= 0.75, found


@pytest.mark.parametrize("name", ["digits", "digits-vq"])
def test_tensorrt_rtx_builds_every_component_of_both_models(name, digits_bundle, digits_vq_bundle) -> None:
    from ldmrt.engine_record import engine_plan_path
    from ldmrt.engines import trt_api
    from ldmrt.manifest import load_manifest

    if not trt_api.available(trt_api.TENSORRT_RTX):
        pytest.skip("needs TensorRT-RTX (CI installs it)")
    bundle = digits_bundle if name == "digits" else digits_vq_bundle
    result = CliRunner().invoke(app, ["build", str(bundle), "--backend", "tensorrt-rtx"])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(bundle)
    built = {record.component for record in manifest.engines if record.builder == "tensorrt-rtx"}
    assert built == set(manifest.components), (built, set(manifest.components))
    for record in manifest.engines:
        assert engine_plan_path(bundle, record).stat().st_size == record.size


def test_int8_calibrates_digits_on_its_own_prompts_at_its_own_size(tmp_path) -> None:
    from ldmrt.checkpoints.builtin import domain_prompts
    from ldmrt.errors import ConfigError
    from ldmrt.export.bundle import ExportOptions, export_bundle
    from ldmrt.export.quantize import read_report
    from ldmrt.iospec import Precision

    result = export_bundle(builtin_source("digits"), tmp_path / "int8", ExportOptions(precision=Precision.INT8))
    calibration = read_report(result.path / "unet.onnx").calibration
    prompts = domain_prompts()
    assert calibration["prompts"] == list(prompts[:2]) and calibration["parity_prompt"] == prompts[-1]
    assert calibration["parity_prompt"] not in prompts[:-1]
    ranges = result.manifest.shape_ranges
    assert calibration["latent_size"] == [ranges.opt_size // 4] * 2     # the size generation runs at
    import dataclasses
    for bad in ("a 3", ("only one",), ("a 3", 3)):          # refused before any work, naming the field
        with pytest.raises(ConfigError, match="prompts") as raised:
            export_bundle(dataclasses.replace(builtin_source("digits"), prompts=bad), tmp_path / "bad",
                          ExportOptions(precision=Precision.INT8))
        assert raised.value.field == "prompts" and not (tmp_path / "bad").exists()


def test_int8_calibration_size_can_be_the_smallest(tmp_path) -> None:
    from ldmrt.errors import ConfigError
    from ldmrt.export.quantize import Int8Options, read_report

    out = tmp_path / "int8-min"
    result = CliRunner().invoke(app, ["export", "digits", "--out", str(out), "--precision", "int8",
                                      "--int8-calibration-size", "min"])
    assert result.exit_code == 0, result.output
    calibration = read_report(out / "unet.onnx").calibration
    ranges = json.loads((out / "manifest.json").read_text())["shape_ranges"]
    assert calibration["size"] == "min" and calibration["latent_size"] == [ranges["min_size"] // 4] * 2
    refused = CliRunner().invoke(app, ["export", "digits", "--out", str(tmp_path / "x"), "--precision", "int8",
                                       "--int8-calibration-size", "huge"])
    assert refused.exit_code == 2 and "--int8-calibration-size 'huge': expected one of" in refused.output
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="calibration_size") as raised:
        Int8Options(calibration_size="huge")
    assert raised.value.field == "calibration_size"
