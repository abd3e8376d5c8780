"""Concat models through the user's doors: `ldmrt generate --image/--mask/--noise-level/--segmentation`,
the Triton pipeline model's map inputs, and TensorRT-RTX builds of every new UNet graph with its
profiles (the maps' shapes follow the latent's). Parity with diffusers: tests/test_concat_models.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ldmrt.cli import app
from ldmrt.engines import trt_api
from ldmrt.export.bundle import ExportOptions, export_bundle
from ldmrt.iospec import Component, ShapeRanges
from ldmrt.runtime.images import read_image, read_mask, read_segmentation
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
from tests.families import CONCAT_FAMILIES, model_source

RANGES = ShapeRanges(min_size=16, opt_size=32, max_size=48, max_batch=2, opt_batch=1)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(family) / "bundle"
            cache[family] = export_bundle(model_source(CONCAT_FAMILIES[family]), out,
                                          ExportOptions(shape_ranges=RANGES, validate=False)).path
        return cache[family]
    return get


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    from PIL import Image
    Image.fromarray(array, mode=mode).save(path)
    return path


def _rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_cli_inpaints_as_the_api_does(bundles, tmp_path):
    bundle = bundles("sd-inpaint")
    image = _png(tmp_path / "in.png", _rgb(32, 48, 0))
    mask = np.zeros((32, 48), np.uint8)
    mask[8:24, 10:30] = 255
    mask_path = _png(tmp_path / "mask.png", mask)
    out = tmp_path / "out.npy"
    result = CliRunner().invoke(app, ["generate", str(bundle), "-p", "a cat", "--steps", "3", "--image", str(image),
                                      "--mask", str(mask_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = Pipeline.load(bundle).generate(GenerationRequest(
        prompt="a cat", steps=3, image=read_image(image)[None], mask=read_mask(mask_path)[None])).images
    assert np.abs(np.load(out) - expected).max() <= 1e-6
    assert set(np.unique(read_mask(mask_path))) == {0.0, 1.0}


def test_cli_resizes_the_image_and_mask_to_height_and_width(bundles, tmp_path):
    bundle = bundles("sd-inpaint")
    image = _png(tmp_path / "in.png", _rgb(50, 70, 1))
    mask = _png(tmp_path / "m.png", np.full((50, 70), 255, np.uint8))
    out = tmp_path / "out.npy"
    result = CliRunner().invoke(app, ["generate", str(bundle), "--steps", "2", "--image", str(image), "--mask",
                                      str(mask), "--height", "32", "--width", "48", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (1, 32, 48, 3)


@pytest.mark.parametrize("args, words", [
    (["--image", "{image}"], "--mask: this bundle's model (fam-sd-inpaint) is an inpainting model; it needs mask"),
    (["--image", "{image}", "--mask", "{image}", "--noise-level", "5"], "--noise-level"),
    (["--image", "{odd}", "--mask", "{odd}"], "--image: its height makes a 30-pixel image"),
    (["--image", "{image}", "--mask", "{missing}"], "--mask"),
])
def test_cli_map_errors_are_one_line_naming_the_flag(bundles, tmp_path, args, words):
    bundle = bundles("sd-inpaint")
    files = {"image": _png(tmp_path / "in.png", _rgb(32, 48, 2)), "odd": _png(tmp_path / "odd.png", _rgb(30, 48, 2)),
             "missing": tmp_path / "nope.png"}
    args = [a.format(**files) for a in args]
    out = tmp_path / "out.png"
    result = CliRunner().invoke(app, ["generate", str(bundle), "--steps", "2", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split()), result.output
    assert not out.exists()


def test_cli_upscales_and_reads_a_palette_segmentation(bundles, tmp_path):
    low = _png(tmp_path / "low.png", _rgb(8, 12, 3))
    out = tmp_path / "up.npy"
    result = CliRunner().invoke(app, ["generate", str(bundles("sd-upscale")), "-p", "x", "--steps", "2",
                                      "--image", str(low), "--noise-level", "50", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (1, 32, 48, 3)

    labels = np.random.default_rng(0).integers(0, 12, (32, 48)).astype(np.uint8)
    palette = _png(tmp_path / "seg.png", labels, mode="L").with_suffix(".png")
    from PIL import Image
    Image.fromarray(labels, mode="L").convert("P").save(tmp_path / "seg-p.png")
    assert np.array_equal(read_segmentation(palette), labels)
    np.save(tmp_path / "seg.npy", labels.astype(np.int64))
    for path in (palette, tmp_path / "seg.npy"):
        out = tmp_path / f"sem-{path.suffix[1:]}.npy"
        result = CliRunner().invoke(app, ["generate", str(bundles("ldm-semantic")), "--steps", "2",
                                          "--segmentation", str(path), "--out", str(out)])
        assert result.exit_code == 0, result.output
    assert np.array_equal(np.load(tmp_path / "sem-png.npy"), np.load(tmp_path / "sem-npy.npy"))
    bad = _png(tmp_path / "rgb-seg.png", _rgb(32, 48, 4))
    result = CliRunner().invoke(app, ["generate", str(bundles("ldm-semantic")), "--steps", "2",
                                      "--segmentation", str(bad), "--out", str(tmp_path / "x.npy")])
    assert result.exit_code == 2 and "--segmentation" in result.output and "mode RGB" in result.output


def test_triton_pipeline_model_takes_the_maps(bundles, tmp_path, monkeypatch):
    from ldmrt.triton.repository import PipelineModelOptions, RepositoryOptions, write_repository
    from tests.test_triton import CPU, _Tensor, load_pipeline_model

    bundle = bundles("sd-inpaint")
    repo = tmp_path / "repo"
    write_repository(bundle, repo, RepositoryOptions(instances=CPU, pipeline=PipelineModelOptions(instances=CPU)))
    text = (repo / "pipeline" / "config.pbtxt").read_text()
    assert 'name: "image"' in text and 'name: "mask"' in text and "noise_level" not in text
    model = load_pipeline_model(repo, monkeypatch, "ldmrt_triton_concat_under_test")
    image = np.random.default_rng(5).random((1, 32, 48, 3)).astype(np.float32)
    mask = np.zeros((1, 32, 48), np.float32)
    mask[:, :, 20:] = 1.0
    request = {"prompt": _Tensor("prompt", np.array([b"a dog"], dtype=np.object_)),
               "steps": _Tensor("steps", np.array([3], np.int32)),
               "image": _Tensor("image", image), "mask": _Tensor("mask", mask)}
    good, missing = model.execute([request, {k: v for k, v in request.items() if k != "mask"}])
    expected = Pipeline.load(bundle).generate(GenerationRequest(prompt="a dog", steps=3, image=image, mask=mask)).images
    assert np.abs(good.output_tensors[0].as_numpy() - expected).max() <= 1e-6
    assert missing.error is not None and "needs mask" in missing.error


needs_rtx = pytest.mark.skipif(not trt_api.available(trt_api.TENSORRT_RTX), reason="TensorRT-RTX is not installed: "
                               "pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs")


@needs_rtx
@pytest.mark.parametrize("family", list(CONCAT_FAMILIES))
def test_tensorrt_rtx_builds_every_concat_unet_with_its_profiles(bundles, family):
    from ldmrt.export.engines import BundleBuildOptions, build_bundle
    from ldmrt.manifest import load_manifest

    bundle = bundles(family)
    wanted = [Component.UNET, *([Component.VAE_ENCODER] if CONCAT_FAMILIES[family].spatial.is_inpainting else [])]
    records = build_bundle(bundle, BundleBuildOptions(components=tuple(wanted)), lambda event: None)
    manifest = load_manifest(bundle)
    unet = next(r for r in records if r.component == Component.UNET)
    spec = manifest.component(Component.UNET).spec
    assert unet.profiles == (spec.profile(),)
    names = {t.name for t in spec.inputs}
    for kind in CONCAT_FAMILIES[family].spatial.inputs:
        assert kind.value in names and kind.value in unet.profiles[0]
    assert (bundle / "engines" / unet.key / unet.file).is_file()


@pytest.mark.parametrize("family, precision", [("sd-inpaint", "fp16"), ("ldm-semantic", "fp16"),
                                               ("sd-inpaint", "int8")])
def test_reduced_precision_exports_validate_with_their_maps(tmp_path, family, precision):
    """fp16 graphs pass export's ONNX Runtime parity check; int8 calibrates the UNet on DDIM runs
    fed its concatenated maps (and the x4-style noise level where it has one), within its bounds."""
    from ldmrt.iospec import Precision
    from ldmrt.runtime.spatial import example_fields

    config = CONCAT_FAMILIES[family]
    result = export_bundle(model_source(config), tmp_path / "b",
                           ExportOptions(shape_ranges=RANGES, precision=Precision(precision)))
    unet = result.manifest.component(Component.UNET)
    assert unet.parity is not None and unet.parity.passed, unet.parity
    fields = example_fields(config, 32, 48)
    images = Pipeline.load(result.path).generate(GenerationRequest(
        prompt="x" if config.conditioner else "", steps=3, **fields)).images
    assert images.shape == (1, 32, 48, 3) and np.isfinite(images).all()
