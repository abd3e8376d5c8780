"""benchmarks/cpu_speed.py (issue 9's recorded CPU run) on tiny bundles: the contenders really run
the bundle they name, and the report's ratios and cold-start arithmetic follow from its samples."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
from ldmrt.iospec import Precision
from tests.modules import load_file

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow        # a benchmark script's own check (~30 s: an int8 export); pytest -m slow
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "cpu_speed.py"


def load_script():
    return load_file(SCRIPT, "ldmrt_cpu_speed")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    components = ("text_encoder", "unet", "vae_decoder")
    export_bundle(preset_source("tiny"), root / "fp32", ExportOptions(components=components, validate=False))
    export_bundle(preset_source("tiny"), root / "int8", ExportOptions(components=components, precision=Precision.INT8))
    return root / "fp32", root / "int8"


def test_contenders_and_cold_start_in_process(bundles, monkeypatch):
    monkeypatch.delenv("LDMRT_ORT_CACHE", raising=False)
    speed = load_script()
    fp32, int8 = bundles
    for contender in speed.CONTENDERS:
        bundle = int8 if contender == "ldmrt-int8" else fp32
        row = speed.measure_unet(contender, str(bundle), 64, 2, warmup=0, repeat=3)
        assert row["contender"] == contender and row["bundle"] == str(bundle) and row["n"] == 3
        assert row["output_finite"] and 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
    cold = speed.measure_cold_start(str(int8), steps=2, size=64, cache_cold=True)
    assert cold["cold_start_overhead_s"] == pytest.approx(cold["load_s"] + cold["first_image_s"]
                                                          - cold["second_image_s"])
    assert (int8 / "ort_cache").is_dir()                       # the cold load wrote the cache
    warm = speed.measure_cold_start(str(int8), steps=2, size=64, cache_cold=False)
    timings = warm["timings_second_image_s"]
    assert warm["loop_overhead_fraction"] == pytest.approx((timings["denoise"] - timings["unet"]) / timings["unet"])
    assert 0 <= warm["loop_overhead_fraction"] < 1


def test_report_ratios_follow_the_round_medians(bundles, tmp_path):
    fp32, int8 = bundles
    out = tmp_path / "speed.json"
    subprocess.run([sys.executable, str(SCRIPT), "--fp32", str(fp32), "--int8", str(int8), "--size", "64",
                    "--contenders", "ort-fp32-plain,ldmrt-int8", "--rounds", "2", "--repeat", "2",
                    "--skip-cold-start", "--json", str(out)], check=True, capture_output=True, cwd=tmp_path)
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1 and report["case"]["size"] == 64
    unet = report["unet"]
    for row in unet.values():
        assert len(row["rounds"]) == 2 and row["round_medians_ms"] == [r["median_ms"] for r in row["rounds"]]
    plain, ours = unet["ort-fp32-plain"]["median_ms"], unet["ldmrt-int8"]["median_ms"]
    assert report["ratios"]["ldmrt-int8"]["unet_speedup_vs_ort_fp32_plain"] == pytest.approx(plain / ours)
    assert "unet_speedup_vs_torch_eager" not in report["ratios"]["ldmrt-int8"] and report["cold_start"] == []
    parity = report["parity"]["int8"]
    assert parity["precision"] == "int8" and parity["int8_report"]["quantized"]["Conv"] > 0
    assert parity["manifest_unet_parity"]["rel_l2"] == parity["int8_report"]["unet_rel_l2"]
    assert report["parity"]["fp32"]["int8_report"] is None
