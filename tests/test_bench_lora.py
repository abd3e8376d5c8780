"""`ldmrt bench --lora`: the adapter switch timed on each loaded pipeline, next to a full re-export."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldmrt.bench import BenchCase, BenchOptions, run_bench, validate_report
from ldmrt.bench_lora import check_lora_options, merge_switch
from ldmrt.lora.choice import LoraChoice
from tests.test_lora import write_kohya


def invoke(*args):
    from typer.testing import CliRunner

    from ldmrt.cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny bundle (not validated: test_export.py covers parity) and two random kohya adapters."""
    from ldmrt.export.bundle import preset_source
    from tests.families import export_small_tiny

    root = tmp_path_factory.mktemp("bench-lora")
    model = preset_source("tiny").model
    files = [write_kohya(model, root / f"{name}.safetensors", seed) for name, seed in (("a", 1), ("b", 2))]
    return export_small_tiny(root / "tiny"), files


CASE = BenchCase(size=32, batch=1, steps=2)


def test_bench_times_the_switch_on_each_pipeline_and_shows_it_happened(setup) -> None:
    bundle, (a, b) = setup
    choices = (LoraChoice(a, 0.8), LoraChoice(b))
    options = BenchOptions(contenders=("onnxruntime", "torch-eager"), cases=(CASE,), warmup=0, repeat=2,
                           loras=choices)
    report = run_bench(bundle, options)
    assert validate_report(report) == [] and report["failed"] == [] and report["switch_failed"] == []
    for result in report["results"]:
        entry = result["lora_switch"]
        assert entry["status"] == "ok", entry
        for key in ("to_adapters", "to_none"):
            assert entry[key]["n"] == 2 and entry[key]["min_ms"] > 0 and entry[key]["median_ms"] > 0
        assert entry["first_to_adapters_ms"] > 0 and entry["first_to_none_ms"] > 0
        assert entry["first_to_adapters_ms"] in entry["to_adapters"]["samples_ms"]
        # what was switched: each file's digest and scale, active during the switch, none after
        assert [(r["path"], r["sha256"], r["scale"]) for r in entry["adapters"]] == [
            (str(p.absolute()), hashlib.sha256(p.read_bytes()).hexdigest(), s) for p, s in ((a, 0.8), (b, 1.0))]
        assert entry["active"] == [{"path": str(a), "scale": 0.8}, {"path": str(b), "scale": 1.0}]
        assert entry["active_after"] == []
        # the switch happened (the image changed) and was undone (bit for bit)
        assert entry["image_change_max_abs"] > 1e-3, result["contender"]
        assert entry["restored_max_abs"] == 0.0, result["contender"]
        assert entry["peak_rss_mib"] >= result["peak_rss_mib"] > 50
    assert report["lora"]["adapters"] == [{"path": str(a), "scale": 0.8}, {"path": str(b), "scale": 1.0}]
    assert report["lora"]["reexport"] == {"basis": "not measured", "engine_builds_recorded": [],
                                          "why": "the manifest records no export time; pass --lora-reexport "
                                                 "to time one"}
    assert report["options"]["loras"] == report["lora"]["adapters"]


def test_cli_bench_lora_prints_the_switch_and_a_timed_reexport(setup, tmp_path) -> None:
    bundle, (a, _) = setup
    out = tmp_path / "bench.json"
    result = invoke("bench", bundle, "--compare", "", "--sizes", "32", "--steps", "2", "--warmup", "0",
                    "--repeat", "2", "--lora", f"{a}:0.5", "--lora-reexport", "--json", out)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "LoRA switch on the loaded pipeline" in text and "instead: a full re-export:" in text
    report = json.loads(out.read_text())
    assert validate_report(report) == []
    (entry,) = [r["lora_switch"] for r in report["results"]]
    assert entry["status"] == "ok" and entry["adapters"][0]["scale"] == 0.5 and entry["image_change_max_abs"] > 0
    reexport = report["lora"]["reexport"]
    assert reexport["basis"] == "timed" and reexport["status"] == "ok", reexport
    assert reexport["seconds"] >= sum(reexport["component_seconds"].values()) > 0
    assert list(reexport["component_seconds"]) == ["text_encoder", "unet", "vae_decoder"]
    assert reexport["options"] == {"precision": "fp32", "components": ["text_encoder", "unet", "vae_decoder"],
                                   "opset": reexport["options"]["opset"], "validate": False,
                                   "adapters": [str(a)]}
    assert f"{reexport['seconds']:.1f} s (timed once" in text


@pytest.fixture
def no_bench_work(monkeypatch):
    """Every contender runs in a spawned process: a usage error must come before the first."""
    import ldmrt.bench as bench

    def work(*args, **kwargs):
        raise AssertionError("the bench started a contender before refusing a bad option")

    monkeypatch.setattr(bench.multiprocessing, "get_context", work)


def test_cli_bench_refuses_bad_lora_before_any_work(setup, no_bench_work, tmp_path) -> None:
    bundle, (a, _) = setup
    pickled = tmp_path / "style.ckpt"
    pickled.write_bytes(b"not read")
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "model.weight": torch.zeros(4, 4)}, str(foreign))
    cases = [([f"{a}:nan"], "--lora", "scale nan: expected a finite number"),
             ([f"{a}:inf"], "--lora", "scale inf: expected a finite number"),
             ([str(tmp_path / "missing.safetensors")], "--lora", "missing.safetensors"),
             ([str(pickled)], "--lora", "expected a .safetensors LoRA file"),
             ([str(empty)], "--lora", "holds no tensors"),
             ([str(foreign)], "--lora", "model.weight"),
             ([], "--lora-reexport", "none was given: add --lora FILE[:SCALE]")]
    for loras, flag, message in cases:
        args = [item for path in loras for item in ("--lora", path)] + ["--lora-reexport"]
        result = invoke("bench", bundle, "--compare", "torch-eager", "--sizes", "32", "--steps", "1", *args)
        assert result.exit_code == 2, result.output
        error = " ".join(result.stderr.split())
        assert re.match(rf"error: \w+Error: {flag}[ :]", error) and message in error, error
        assert "----lora" not in error


def test_a_switch_that_fails_keeps_the_latency_and_exits_3(setup, tmp_path) -> None:
    """A file that reads but fits no module of the model: the switch's error is recorded, not raised."""
    bundle, _ = setup
    stray = tmp_path / "stray.safetensors"
    save_file({"lora_unet_no_such_block.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_no_such_block.lora_up.weight": torch.zeros(8, 2)}, str(stray))
    out = tmp_path / "bench.json"
    result = invoke("bench", bundle, "--backend", "torch", "--compare", "", "--sizes", "32", "--steps", "1",
                    "--warmup", "0", "--repeat", "1", "--lora", stray, "--json", out)
    assert result.exit_code == 3, result.output
    assert "the LoRA switch or re-export failed: torch" in " ".join(result.stderr.split())
    report = json.loads(out.read_text())
    (torch_result,) = report["results"]
    assert torch_result["status"] == "ok" and torch_result["cases"][0]["end_to_end"]["median_ms"] > 0
    assert torch_result["lora_switch"]["status"] == "error"
    assert "no_such_block" in torch_result["lora_switch"]["error"]
    assert report["switch_failed"] == ["torch"] and report["failed"] == []


def test_merge_switch_takes_medians_over_rounds_and_the_worst_checks() -> None:
    def entry(to_ms: float, first_ms: float, change: float, restored: float) -> dict:
        stats = {"median_ms": to_ms, "p90_ms": to_ms, "min_ms": to_ms, "max_ms": to_ms, "n": 1, "samples_ms": [to_ms]}
        return {"status": "ok", "cycles": 1, "adapters": [], "to_adapters": stats, "to_none": stats,
                "first_to_adapters_ms": first_ms, "first_to_none_ms": first_ms,
                "image_change_max_abs": change, "restored_max_abs": restored, "peak_rss_mib": to_ms}
    merged = merge_switch([entry(1.0, 10.0, 0.5, 0.0), entry(3.0, 30.0, 0.2, 0.0), entry(2.0, 20.0, 0.4, 1e-7)])
    assert merged["rounds"] == 3 and merged["to_adapters"]["median_ms"] == 2.0
    assert merged["to_adapters"]["round_medians_ms"] == [1.0, 3.0, 2.0] and merged["to_none"]["n"] == 3
    assert merged["first_to_adapters_ms"] == 20.0 and merged["first_to_adapters_ms_per_round"] == [10.0, 30.0, 20.0]
    assert merged["image_change_max_abs"] == 0.2 and merged["restored_max_abs"] == 1e-7
    assert merged["peak_rss_mib"] == 3.0
    failed = merge_switch([entry(1.0, 1.0, 0.5, 0.0), {"status": "error", "error": "LoraError: x"}])
    assert failed == {"status": "error", "error": "round 2 of 2: LoraError: x"}


def test_switch_rounds_merge_in_a_bench_run(setup) -> None:
    bundle, (a, _) = setup
    options = BenchOptions(contenders=("torch",), cases=(CASE,), warmup=0, repeat=1, rounds=2,
                           loras=(LoraChoice(a),))
    (result,) = run_bench(bundle, options)["results"]
    entry = result["lora_switch"]
    assert entry["status"] == "ok" and entry["rounds"] == 2 and len(entry["to_adapters"]["round_medians_ms"]) == 2
    assert len(entry["first_to_adapters_ms_per_round"]) == 2 and entry["image_change_max_abs"] > 0


def test_reexport_needs_the_recorded_source(setup, tmp_path) -> None:
    """--lora-reexport on a bundle whose recorded adapters are gone: refused before any work."""
    import shutil

    from ldmrt.errors import ConfigError
    from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
    from ldmrt.manifest import load_manifest

    _, (a, _) = setup
    gone = Path(shutil.copy(a, tmp_path / "gone.safetensors"))
    fused = tmp_path / "fused"
    export_bundle(preset_source("tiny"), fused, ExportOptions(components=("unet",), validate=False,
                                                              loras=(LoraChoice(gone),)))
    gone.unlink()
    manifest = load_manifest(fused)
    check_lora_options((LoraChoice(a),), False, manifest)              # the switch alone needs no source
    with pytest.raises(ConfigError, match=r"lora_reexport: the bundle's recorded source needs .*gone.safetensors"):
        check_lora_options((LoraChoice(a),), True, manifest)
