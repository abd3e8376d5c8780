"""Pipeline.load verifies each graph once: on an ONNX Runtime cache hit through the cache entry's own
sha256 (the entry is bound to the manifest's digest), on a miss by the source graph's sha256 before
ONNX Runtime reads it; other backends and uncached components verify every graph first."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import ldmrt.engines.base as engines_base
import ldmrt.runtime.pipeline as pipeline_module
from ldmrt.engines import ort_cache
from ldmrt.errors import BundleError
from ldmrt.manifest import TOKENIZER_DIR, load_manifest, verify_bundle
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline

ort = pytest.importorskip("onnxruntime")

GRAPHS = ("text_encoder", "unet", "vae_decoder")
REQUEST = GenerationRequest(prompt="a red fox", steps=2, height=32, width=32, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
    from ldmrt.iospec import ShapeRanges

    out = tmp_path_factory.mktemp("verify") / "tiny"
    export_bundle(preset_source("tiny"), out, ExportOptions(
        components=GRAPHS, validate=False,
        shape_ranges=ShapeRanges(min_size=32, opt_size=32, max_size=64, max_batch=2)))
    return out


@pytest.fixture
def bundle(tiny, tmp_path) -> Path:
    """A private copy without an ORT cache (its cache goes to <copy>/ort_cache)."""
    return Path(shutil.copytree(tiny, tmp_path / "bundle", ignore=shutil.ignore_patterns(ort_cache.BUNDLE_CACHE_DIR)))


@pytest.fixture
def checks(monkeypatch) -> list[tuple[tuple[str, ...], bool]]:
    """Every verify_bundle call of Pipeline.load and the backends: (components, tokenizer too?)."""
    calls = []

    def spy(bundle_dir, manifest, components=None):
        calls.append((tuple(manifest.components if components is None else components), manifest.tokenizer is not None))
        return verify_bundle(bundle_dir, manifest, components)

    monkeypatch.setattr(pipeline_module, "verify_bundle", spy)
    monkeypatch.setattr(engines_base, "verify_bundle", spy)
    return calls


def graphs_checked(calls) -> list[str]:
    return sorted(name for components, _ in calls for name in components)


def tokenizer_checks(calls) -> int:
    return sum(tokenizer for _, tokenizer in calls)


@pytest.fixture
def sessions(monkeypatch) -> list[Path]:
    """The path of every InferenceSession created."""
    created = []
    real = ort.InferenceSession

    def spy(path, options=None, providers=None, **kwargs):
        created.append(Path(path))
        return real(path, options, providers=providers, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    return created


def entry(bundle: Path, component: str) -> Path:
    (folder,) = [p for p in (bundle / ort_cache.BUNDLE_CACHE_DIR).iterdir() if p.name.startswith(f"{component}-")]
    return folder


def damage(folder: Path) -> None:
    """Flip one byte of the entry's largest file (same size: only its sha256 tells)."""
    path = max((p for p in folder.iterdir() if p.name != ort_cache.RECORD), key=lambda p: p.stat().st_size)
    flip_byte(path)


def flip_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))


def reweigh(path: Path) -> None:
    """Another valid graph in place of `path`: one weight changed (ONNX Runtime loads it fine)."""
    model = onnx.load(str(path))
    weight = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1)
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(path))


def image(bundle: Path, **load) -> np.ndarray:
    return Pipeline.load(bundle, **load).generate(REQUEST).images


def cached(bundle: Path, component: str) -> list[str]:
    """What the cache folder holds for `component`: its entry and any staging folder."""
    cache = bundle / ort_cache.BUNDLE_CACHE_DIR
    return [p.name for p in cache.iterdir() if component in p.name] if cache.exists() else []


def cache_tree(bundle: Path) -> dict[str, bytes]:
    cache = bundle / ort_cache.BUNDLE_CACHE_DIR
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def test_a_warm_load_hashes_no_source_graph_and_a_miss_hashes_only_its_own(bundle, checks) -> None:
    cold = Pipeline.load(bundle)
    assert graphs_checked(checks) == sorted(GRAPHS) and tokenizer_checks(checks) == 1
    assert not any(runner.cache_hit for runner in cold.runners.values())

    checks.clear()
    warm = Pipeline.load(bundle)
    assert graphs_checked(checks) == [] and tokenizer_checks(checks) == 1, checks
    assert all(runner.cache_hit for runner in warm.runners.values())

    damage(entry(bundle, "unet"))
    checks.clear()
    mixed = Pipeline.load(bundle)
    assert graphs_checked(checks) == ["unet"] and tokenizer_checks(checks) == 1, checks
    assert {name: runner.cache_hit for name, runner in mixed.runners.items()} == \
        {"text_encoder": True, "unet": False, "vae_decoder": True}


@pytest.mark.parametrize("edit", ["flip", "reweigh", "delete"])
def test_a_tampered_source_with_a_sound_entry_loads_the_entry_and_gives_the_same_image(
        bundle, checks, sessions, edit) -> None:
    expected = image(bundle)
    source = bundle / "unet.onnx"
    {"flip": flip_byte, "reweigh": reweigh, "delete": Path.unlink}[edit](source)
    sessions.clear()
    checks.clear()
    np.testing.assert_array_equal(image(bundle), expected)
    assert source not in sessions and graphs_checked(checks) == []


@pytest.mark.parametrize("cache", ["no entry", "damaged entry"])
def test_a_tampered_source_without_a_sound_entry_is_refused_before_onnxruntime_reads_it(
        bundle, checks, sessions, cache) -> None:
    if cache == "damaged entry":
        Pipeline.load(bundle)
        damage(entry(bundle, "unet"))
    before = cache_tree(bundle) if cache == "damaged entry" else None
    flip_byte(bundle / "unet.onnx")
    sessions.clear()
    checks.clear()
    with pytest.raises(BundleError, match=r"file unet\.onnx does not match components\.unet\.sha256"):
        Pipeline.load(bundle)
    assert bundle / "unet.onnx" not in sessions, sessions
    assert "unet" in graphs_checked(checks)
    if cache == "no entry":    # every uncached graph is checked before any is loaded: nothing written
        assert sessions == [] and not (bundle / ort_cache.BUNDLE_CACHE_DIR).exists()
    else:                      # the damaged entry is not replaced by a rewrite of the tampered graph
        assert cache_tree(bundle) == before


def test_an_unverified_load_never_caches_a_source_that_differs_from_the_manifest(bundle, caplog) -> None:
    reweigh(bundle / "unet.onnx")
    with caplog.at_level(logging.WARNING, logger="ldmrt.engines.ort_cache"):
        loaded = Pipeline.load(bundle, verify=False)          # the caller's choice: it runs as it is
    loaded.generate(REQUEST)
    assert "unet: not caching the optimized graph of a source that differs from the manifest" in caplog.text
    assert "unet.onnx does not match components.unet.sha256" in caplog.text
    names = sorted(p.name.split("-")[0] for p in (bundle / ort_cache.BUNDLE_CACHE_DIR).iterdir())
    assert names == ["text_encoder", "vae_decoder"], names    # the sound graphs are cached
    # So a later verified load cannot hit a rewrite of the tampered graph: it refuses the source.
    with pytest.raises(BundleError, match=r"file unet\.onnx does not match"):
        Pipeline.load(bundle)


def test_an_unverified_warm_load_hashes_only_the_entries(bundle, checks) -> None:
    Pipeline.load(bundle)
    checks.clear()
    warm = Pipeline.load(bundle, verify=False)
    assert checks == [] and all(runner.cache_hit for runner in warm.runners.values())


def test_build_refuses_a_tampered_source_and_caches_nothing(bundle, sessions) -> None:
    from ldmrt.engines.onnxruntime import prepare_cache

    flip_byte(bundle / "unet.onnx")
    with pytest.raises(BundleError, match=r"file unet\.onnx does not match components\.unet\.sha256"):
        prepare_cache(bundle, load_manifest(bundle), ("unet",))
    assert sessions == [] and cached(bundle, "unet") == []


def test_without_a_cache_every_graph_is_verified_before_any_is_read(bundle, checks, sessions) -> None:
    Pipeline.load(bundle, cache_dir="off")
    assert graphs_checked(checks) == sorted(GRAPHS) and tokenizer_checks(checks) == 1
    Pipeline.load(bundle)           # a sound cache exists now; cache off still checks every graph
    flip_byte(bundle / "vae_decoder.onnx")
    sessions.clear()
    checks.clear()
    with pytest.raises(BundleError, match=r"file vae_decoder\.onnx does not match"):
        Pipeline.load(bundle, cache_dir="off")
    assert sessions == [], sessions             # refused before the first graph was read


def test_the_torch_backend_still_verifies_every_graph(bundle, checks) -> None:
    pytest.importorskip("torch")
    Pipeline.load(bundle)                       # a sound ORT cache does not excuse torch
    checks.clear()
    Pipeline.load(bundle, "torch", device="cpu", cuda_graphs=False)
    assert graphs_checked(checks) == sorted(GRAPHS) and tokenizer_checks(checks) == 1
    flip_byte(bundle / "unet.onnx")
    with pytest.raises(BundleError, match=r"file unet\.onnx does not match components\.unet\.sha256"):
        Pipeline.load(bundle, "torch", device="cpu", cuda_graphs=False)


def test_the_tokenizer_is_still_verified_on_a_warm_load(bundle) -> None:
    Pipeline.load(bundle)
    flip_byte(bundle / TOKENIZER_DIR / "tokenizer.json")
    with pytest.raises(BundleError, match=r"tokenizer/tokenizer\.json does not match tokenizer\.files"):
        Pipeline.load(bundle)
