"""The bench harness's correctness (statistics, ratios, report schema) on `tiny` — not speed."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ldmrt.bench import (SCHEMA, BenchCase, BenchOptions, bench_request, check_options, merge_contender, merge_rounds,
                         ratios, run_bench, run_contender, summarize, validate_report, write_report)
from tests.families import SDXL_FAMILY, shape_ranges


def test_summarize_matches_numpy() -> None:
    samples = [0.010, 0.030, 0.020, 0.050, 0.040, 0.015, 0.025, 0.035, 0.045, 0.012]
    stats = summarize(samples)
    ms = np.array(samples) * 1e3
    assert stats["median_ms"] == pytest.approx(np.median(ms))
    assert stats["p90_ms"] == pytest.approx(np.sort(ms)[int(np.ceil(0.9 * len(ms))) - 1])
    assert stats["min_ms"] == pytest.approx(ms.min()) and stats["max_ms"] == pytest.approx(ms.max())
    assert stats["n"] == 10
    with pytest.raises(ValueError):
        summarize([])


def test_ratios_are_baseline_over_contender() -> None:
    case = {"size": 64, "batch": 1}
    results = [
        {"contender": "torch-eager", "status": "ok", "cases": [
            {"case": case, "end_to_end": {"median_ms": 300.0}, "components": {"unet": {"median_ms": 30.0}}}]},
        {"contender": "onnxruntime", "status": "ok", "cases": [
            {"case": case, "end_to_end": {"median_ms": 100.0}, "components": {"unet": {"median_ms": 10.0}}}]},
        {"contender": "diffusers", "status": "error", "error": "x"},
    ]
    rows = {r["contender"]: r for r in ratios(results, "torch-eager")}
    assert rows["onnxruntime"]["end_to_end_speedup"] == pytest.approx(3.0)
    assert rows["onnxruntime"]["unet_speedup"] == pytest.approx(3.0)
    assert rows["torch-eager"]["end_to_end_speedup"] == pytest.approx(1.0)
    assert "diffusers" not in rows
    assert ratios(results[1:], "torch-eager") == []


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
    from ldmrt.iospec import ShapeRanges

    out = tmp_path_factory.mktemp("bench") / "tiny"
    export_bundle(preset_source("tiny"), out, ExportOptions(
        components=("text_encoder", "unet", "vae_decoder"),
        shape_ranges=ShapeRanges(min_size=32, opt_size=32, max_size=64, max_batch=2)))
    return out


def test_run_bench_report_on_tiny(tiny_bundle, tmp_path) -> None:
    options = BenchOptions(contenders=("onnxruntime", "torch-eager"),
                           cases=(BenchCase(size=32, batch=1, steps=2), BenchCase(size=32, batch=2, steps=2)),
                           warmup=0, repeat=2)
    report = run_bench(tiny_bundle, options)
    assert validate_report(report) == []
    assert report["schema"] == SCHEMA
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    by_name = {r["contender"]: r for r in report["results"]}
    assert set(by_name) == {"onnxruntime", "torch-eager"}
    for result in by_name.values():
        assert result["status"] == "ok", result
        assert result["peak_rss_mib"] > 50
        assert [c["case"]["batch"] for c in result["cases"]] == [1, 2]
        for row in result["cases"]:
            assert row["end_to_end"]["n"] == 2
            assert row["images_per_s"] == pytest.approx(row["case"]["batch"] * 1e3 / row["end_to_end"]["median_ms"])
            assert set(row["components"]) == {"text_encoder", "unet", "vae_decoder"}
            assert row["denoise_ms"] > 0
    assert [c["loop_overhead_basis"] for c in by_name["onnxruntime"]["cases"]] == ["timed", "timed"]
    assert [c["loop_overhead_basis"] for c in by_name["torch-eager"]["cases"]] == ["estimated", "estimated"]
    onnx_case = by_name["onnxruntime"]["cases"][0]
    # The numpy loop measures UNet time directly: overhead is the rest of the loop, and small.
    assert onnx_case["loop_overhead_ms_per_step"] < onnx_case["denoise_ms"] / 2
    assert len(report["ratios"]) == 4
    path = tmp_path / "r.json"
    write_report(report, path)
    assert json.loads(path.read_text())["schema"] == SCHEMA


def test_validate_report_catches_problems() -> None:
    assert "missing results" in validate_report({"schema": SCHEMA})
    bad = {"schema": SCHEMA, "created": "", "bundle": {}, "machine": {}, "options": {}, "ratios": [],
           "results": [{"contender": "x", "status": "ok", "cases": [
               {"case": {}, "images_per_s": 1.0,
                "end_to_end": {"min_ms": 5.0, "median_ms": 4.0, "p90_ms": 6.0, "max_ms": 7.0}}]}]}
    assert any("out of order" in p for p in validate_report(bad))


def test_failed_contender_is_recorded_not_raised(tiny_bundle) -> None:
    from ldmrt.engines import trt_api
    if not trt_api.available(trt_api.TENSORRT_RTX):
        pytest.skip("needs TensorRT-RTX installed (a contender that passes the option checks, then fails)")
    # No engines in the bundle (and no GPU): the contender fails in its own process.
    options = BenchOptions(contenders=("tensorrt-rtx",), cases=(BenchCase(size=32, batch=1, steps=1),),
                           warmup=0, repeat=1)
    report = run_bench(tiny_bundle, options)
    (result,) = report["results"]
    assert result["status"] == "error" and "tensorrt-rtx" in result["error"]
    assert report["failed"] == ["tensorrt-rtx"] and report["ratios"] == []


def test_merge_rounds_is_the_median_of_round_medians_over_pooled_samples() -> None:
    rng = np.random.default_rng(3)
    rounds = [rng.uniform(0.5, 1.5, 5) * scale for scale in (1.0, 1.3, 0.9)]   # one slow process
    merged = merge_rounds([summarize(list(r)) for r in rounds])
    medians = [float(np.median(r) * 1e3) for r in rounds]
    pooled = np.sort(np.concatenate(rounds)) * 1e3
    assert merged["round_medians_ms"] == pytest.approx(medians)
    assert merged["median_ms"] == pytest.approx(np.median(medians))
    assert merged["n"] == 15 and merged["min_ms"] == pytest.approx(pooled[0])
    assert merged["max_ms"] == pytest.approx(pooled[-1])
    assert merged["p90_ms"] == pytest.approx(pooled[int(np.ceil(0.9 * 15)) - 1])
    assert merged["min_ms"] <= merged["median_ms"] <= merged["p90_ms"] <= merged["max_ms"]


def test_merge_contender_keeps_the_first_failed_round() -> None:
    ok = {"contender": "x", "status": "ok", "load_seconds": 1.0, "cases": [], "peak_rss_mib": 10.0}
    failed = {"contender": "x", "status": "error", "error": "RuntimeError: boom", "peak_rss_mib": 5.0}
    merged = merge_contender([ok, failed, ok])
    assert merged["status"] == "error" and merged["error"] == "round 2 of 3: RuntimeError: boom"


def test_rounds_interleave_fresh_processes(tiny_bundle) -> None:
    import ldmrt.bench as bench

    options = BenchOptions(contenders=("onnxruntime", "torch-eager"), cases=(BenchCase(size=32, batch=1, steps=2),),
                           warmup=0, repeat=2, rounds=2)
    order = []
    report = run_bench(tiny_bundle, options, progress=order.append)
    assert order == ["onnxruntime (round 1/2)", "torch-eager (round 1/2)",
                     "onnxruntime (round 2/2)", "torch-eager (round 2/2)"]
    assert validate_report(report) == [] and report["options"]["rounds"] == 2
    for result in report["results"]:
        assert result["status"] == "ok" and result["rounds"] == 2 and len(result["load_seconds_per_round"]) == 2
        (case,) = result["cases"]
        e2e = case["end_to_end"]
        assert e2e["n"] == 4 and len(e2e["round_medians_ms"]) == 2
        assert e2e["median_ms"] == pytest.approx(np.median(e2e["round_medians_ms"]))
        assert set(case["components"]) == {"text_encoder", "unet", "vae_decoder"}
        assert case["images_per_s"] == pytest.approx(1e3 / e2e["median_ms"])
    with pytest.raises(bench.ConfigError, match="rounds 0"):
        run_bench(tiny_bundle, BenchOptions(rounds=0))


def test_cli_bench_with_rounds_writes_the_merged_report(tiny_bundle, tmp_path) -> None:
    from typer.testing import CliRunner

    from ldmrt.cli import app
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(tiny_bundle), "--compare", "torch-eager", "--sizes", "32",
                                      "--steps", "2", "--warmup", "0", "--repeat", "1", "--rounds", "2",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "x 2 rounds" in result.stdout
    report = json.loads(out.read_text())
    assert validate_report(report) == [] and [r["rounds"] for r in report["results"]] == [2, 2]
    (eager,) = [r for r in report["ratios"] if r["contender"] == "torch-eager"]
    assert eager["end_to_end_speedup"] == 1.0 and eager["unet_speedup"] == 1.0
    bad = CliRunner().invoke(app, ["bench", str(tiny_bundle), "--rounds", "0"])
    assert bad.exit_code == 2 and "--rounds 0" in bad.output


@pytest.mark.parametrize("family", ["ldm-class", "ldm-uncond-vq"])
def test_bench_runs_models_that_take_no_prompt(family, tmp_path) -> None:
    """Class-conditional and unconditional bundles are benched without a prompt (they refuse one)."""
    from ldmrt.export.bundle import ExportOptions, export_bundle
    from tests.families import FAMILIES, model_source, shape_ranges

    config = FAMILIES[family]
    out = tmp_path / family
    export_bundle(model_source(config), out, ExportOptions(components=("unet", "vae_decoder"), validate=False,
                                                           shape_ranges=shape_ranges(config)))
    size = shape_ranges(config).min_size
    report = run_bench(out, BenchOptions(contenders=("onnxruntime",), cases=(BenchCase(size=size, batch=1, steps=1),),
                                         warmup=0, repeat=1))
    result = report["results"][0]
    assert result["status"] == "ok", result
    assert report["failed"] == []


# --- the diffusers contender on SDXL: StableDiffusionXLPipeline over the bundle's weights ---------

TOL = 1e-3          # mean abs over [0, 1] images, fp32, same weights and initial noise
# SDXL_FAMILY with its middle block at the last level's first depth (1): diffusers'
# UNet2DConditionModel builds no other (SDXL_FAMILY's own 2 is refused, below)
XL = dataclasses.replace(SDXL_FAMILY, name="fam-sdxl-bench", unet=dataclasses.replace(SDXL_FAMILY.unet, middle_depth=1))


@pytest.fixture(scope="module")
def xl_bundle(tmp_path_factory):
    """XL's seed-0 weights recorded as a preset's are, so that the torch rebuild the contender
    starts from can prove them (tests.families.model_source records no source); ONNX unoptimized."""
    from ldmrt.export.bundle import ExportOptions, ModelSource, export_bundle, synthetic_tokenizer_writer
    from ldmrt.models import build_model
    from ldmrt.source_record import SourceRecord

    out = tmp_path_factory.mktemp("bench-sdxl") / "xl"
    source = ModelSource(model=build_model(XL, seed=0), source=f"test:{XL.name}", random_weights=True,
                         write_tokenizer=synthetic_tokenizer_writer(XL.conditioner),
                         record=SourceRecord(kind="preset", location=XL.name, seed=0))
    export_bundle(source, out, ExportOptions(components=("text_encoder", "text_encoder_2", "unet", "vae_decoder"),
                                             validate=False, optimize=False, shape_ranges=shape_ranges(XL)))
    return out


def test_diffusers_contender_images_match_ldmrt_on_sdxl(xl_bundle) -> None:
    """The bench's request (its prompt, no negative prompt: force_zeros_for_empty_prompt's zeros,
    default size ids, seed 0's noise) through StableDiffusionXLPipeline and through ldmrt."""
    from diffusers import StableDiffusionXLPipeline

    from ldmrt.bench_reference import DiffusersContender
    from ldmrt.runtime.pipeline import Pipeline

    contender = DiffusersContender(xl_bundle)
    assert isinstance(contender.pipe, StableDiffusionXLPipeline)
    ours = Pipeline.load(xl_bundle, "onnxruntime", threads=1)
    for sampler in ("ddim", "euler"):      # the bench's default, SDXL's
        request = bench_request(ours.config, BenchCase(size=32, batch=2, steps=3, sampler=sampler, guidance=5.0))
        theirs = contender.generate(request)
        expected = ours.generate(request).images
        assert theirs.shape == expected.shape == (2, 32, 32, 3)
        assert float(np.abs(theirs - expected).mean()) <= TOL, sampler
        assert float(np.abs(expected - expected.mean()).mean()) > 10 * TOL, "images too flat to compare"
    # The comparison sees the seed, the prompt and the zero negatives (an encoded "" differs).
    for change in ({"seed": 1}, {"prompt": "a red fox in the snow"}, {"negative_prompt": ""}):
        other = ours.generate(dataclasses.replace(request, **change)).images
        assert float(np.abs(theirs - other).mean()) > 3 * TOL, change


def test_bench_measures_the_sdxl_diffusers_contender(xl_bundle) -> None:
    from ldmrt.manifest import load_manifest

    options = BenchOptions(contenders=("diffusers",), cases=(BenchCase(size=32, batch=1, steps=1),),
                           warmup=0, repeat=1)
    check_options(options, load_manifest(xl_bundle))          # SDXL bases are no longer refused
    result = run_contender(str(xl_bundle), "diffusers", options)     # in this process: no spawn
    assert result["status"] == "ok", result
    (case,) = result["cases"]
    assert case["end_to_end"]["n"] == 1 and case["unet"]["median_ms"] > 0


def test_diffusers_refuses_the_refiner_and_unets_it_cannot_build_by_name() -> None:
    from ldmrt.bench_reference import diffusers_coverage, diffusers_modules
    from ldmrt.errors import BackendUnavailableError
    from ldmrt.models import build_model
    from ldmrt.presets import PRESETS

    assert diffusers_coverage(PRESETS["sdxl"]) == ""
    refiner = PRESETS["sdxl-refiner"]
    assert diffusers_coverage(refiner).startswith(f"the diffusers comparison generates from noise; {refiner.name!r} "
                                                  f"is an SDXL refiner")
    with pytest.raises(BackendUnavailableError, match="'fam-sdxl' has no diffusers UNet2DConditionModel: .*middle"):
        diffusers_modules(build_model(SDXL_FAMILY, seed=0), SDXL_FAMILY)
