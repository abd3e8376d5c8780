"""The ONNX Runtime optimized-graph cache: hits, misses, stale and corrupt entries, opt-out."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ldmrt.engines import ort_cache
from ldmrt.engines.onnxruntime import open_onnxruntime
from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
from ldmrt.iospec import example_inputs
from ldmrt.manifest import load_manifest

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "tiny"
    export_bundle(preset_source("tiny"), out, ExportOptions(components=("unet",), validate=False))
    return out


@pytest.fixture
def sessions(monkeypatch):
    """Every InferenceSession created: (path it loaded, optimization level)."""
    created = []
    real = ort.InferenceSession

    def spy(path, options=None, providers=None, **kwargs):
        created.append((Path(path), options.graph_optimization_level if options else None))
        return real(path, options, providers=providers, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    return created


def run_unet(bundle: Path, cache_dir) -> np.ndarray:
    manifest = load_manifest(bundle)
    runner = open_onnxruntime(bundle, manifest, ("unet",), cache_dir=cache_dir)["unet"]
    feeds = example_inputs(manifest.config, runner.spec, {"batch": 2, "latent_height": 8, "latent_width": 10}, 7)
    return runner(feeds)


def entry(cache: Path) -> Path:
    (folder,) = [p for p in cache.iterdir() if p.name.startswith("unet-")]
    return folder


def test_miss_writes_then_hit_loads_the_optimized_graph(bundle, tmp_path, sessions):
    cache = tmp_path / "c"
    expected = run_unet(bundle, "off")
    first = run_unet(bundle, cache)
    folder = entry(cache)
    record = json.loads((folder / ort_cache.RECORD).read_text())
    assert record["component"] == "unet" and record["key"]["onnxruntime"] == ort.__version__
    assert set(record["files"]) >= {ort_cache.GRAPH}
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]      # no staging left
    second = run_unet(bundle, cache)
    assert [(p.name, level) for p, level in sessions] == [
        ("unet.onnx", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),          # cache off
        ("unet.onnx", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),          # miss: optimize, store
        (ort_cache.GRAPH, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)]     # hit
    assert sessions[2][0].parent == folder
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)


def test_default_folder_is_inside_the_bundle_and_off_disables(bundle, tmp_path, monkeypatch):
    monkeypatch.delenv(ort_cache.CACHE_ENV, raising=False)
    assert ort_cache.cache_folder(bundle) == bundle / ort_cache.BUNDLE_CACHE_DIR
    monkeypatch.setattr(ort_cache.os, "access", lambda path, mode: False)   # a read-only bundle
    assert ort_cache.cache_folder(bundle) is None
    monkeypatch.setenv(ort_cache.CACHE_ENV, str(tmp_path / "env"))
    assert ort_cache.cache_folder(bundle) == tmp_path / "env"
    monkeypatch.setenv(ort_cache.CACHE_ENV, "off")
    assert ort_cache.cache_folder(bundle) is None
    assert ort_cache.cache_folder(bundle, tmp_path / "arg") == tmp_path / "arg"
    run_unet(bundle, None)
    assert not (tmp_path / "env").exists()


@pytest.mark.parametrize("damage", ["other onnxruntime", "truncated", "corrupt", "no record"])
def test_damaged_entries_are_ignored_and_rebuilt(bundle, tmp_path, sessions, damage):
    cache = tmp_path / "c"
    expected = run_unet(bundle, cache)
    folder = entry(cache)
    graph = folder / ort_cache.GRAPH
    if damage == "other onnxruntime":
        record = json.loads((folder / ort_cache.RECORD).read_text())
        record["key"]["onnxruntime"] = "0.0.1"
        (folder / ort_cache.RECORD).write_text(json.dumps(record))
    elif damage == "truncated":
        graph.write_bytes(graph.read_bytes()[:-10])
    elif damage == "corrupt":               # same size, garbage bytes: only loading can tell
        graph.write_bytes(b"\x00" * graph.stat().st_size)
    else:
        (folder / ort_cache.RECORD).unlink()
    sessions.clear()
    found = run_unet(bundle, cache)
    np.testing.assert_array_equal(found, expected)
    assert sessions[-1] == (bundle / "unet.onnx", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert ort_cache.lookup(cache, "unet", ort_cache.GraphCache.for_graph(
        cache, "unet", load_manifest(bundle).component("unet").digest).key) == graph  # rebuilt


def test_key_follows_graph_version_and_cpu():
    key = ort_cache.cache_key("a" * 64)
    assert key.onnxruntime == ort.__version__ and key.isa == ort_cache.cpu_isa()
    assert key.digest != ort_cache.cache_key("b" * 64).digest
    other_cpu = ort_cache.CacheKey(key.graph_sha256, key.onnxruntime, key.machine, ("avx2",))
    assert other_cpu.digest != key.digest


def invoke(*args: str):
    from typer.testing import CliRunner

    from ldmrt.cli import app
    return CliRunner().invoke(app, list(args))


def test_build_onnxruntime_prepares_the_cache_the_first_load_then_hits(bundle, tmp_path, monkeypatch, sessions):
    cache = tmp_path / "prepared"
    monkeypatch.setenv(ort_cache.CACHE_ENV, str(cache))
    result = invoke("build", str(bundle), "--backend", "onnxruntime")
    assert result.exit_code == 0, result.output
    folder = entry(cache)
    assert "optimized graphs for this CPU" in result.output and str(folder.name)[:12] in result.output
    assert sessions == [(bundle / "unet.onnx", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)]
    sessions.clear()
    expected = run_unet(bundle, "off")
    assert np.array_equal(run_unet(bundle, None), expected)                   # env cache: a hit
    assert sessions[-1] == (folder / ort_cache.GRAPH, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)

    from ldmrt.engines.onnxruntime import prepare_cache
    again = prepare_cache(bundle, load_manifest(bundle), ("unet",), cache_dir=cache)
    assert [(r.component, r.reused) for r in again] == [("unet", True)]
    assert again[0].size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    forced = prepare_cache(bundle, load_manifest(bundle), ("unet",), cache_dir=cache, force=True)
    assert [(r.component, r.reused) for r in forced] == [("unet", False)]
    (folder / ort_cache.GRAPH).write_bytes(b"\x00" * (folder / ort_cache.GRAPH).stat().st_size)
    rebuilt = prepare_cache(bundle, load_manifest(bundle), ("unet",), cache_dir=cache)
    assert [(r.component, r.reused) for r in rebuilt] == [("unet", False)]    # a corrupt entry is rebuilt
    assert np.array_equal(run_unet(bundle, cache), expected)


@pytest.mark.parametrize("args, message", [
    (("--static-size", "64"), "--static-size: TensorRT options"),
    (("--components", "vae_decoder"), "--components 'vae_decoder': ['vae_decoder'] not in this bundle"),
])
def test_build_onnxruntime_refuses_tensorrt_options_and_unknown_components(bundle, tmp_path, monkeypatch,
                                                                           args, message):
    monkeypatch.setenv(ort_cache.CACHE_ENV, str(tmp_path / "c"))
    result = invoke("build", str(bundle), "--backend", "onnxruntime", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "c").exists()


def test_build_onnxruntime_with_nowhere_to_cache_says_so(bundle, monkeypatch):
    monkeypatch.setenv(ort_cache.CACHE_ENV, "off")
    result = invoke("build", str(bundle), "--backend", "onnxruntime")
    assert result.exit_code == 2 and "LDMRT_ORT_CACHE" in result.output, result.output
