"""SDXL in reduced precision: the VAE that overflows in fp16 (force_upcast) stays fp32, as
diffusers' SDXL pipelines upcast it; fp16 images against the fp32 bundle of the same weights.

References: diffusers' rule (StableDiffusionXLPipeline upcasts the VAE when its dtype is float16
and vae.config.force_upcast; StableDiffusionPipeline never reads the flag), the fp32 bundle of the
same weights for the images, and the graphs' own declared dtypes read back with onnx.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from ldmrt.checkpoints.diffusers_folder import autoencoder_config_from_diffusers
from ldmrt.errors import CheckpointError
from ldmrt.export.bundle import ExportOptions, export_bundle, fp32_components
from ldmrt.export.quantize import psnr
from ldmrt.iospec import Precision
from ldmrt.manifest import load_manifest
from ldmrt.presets import PRESETS
from tests.families import FAMILIES, SDXL_FAMILY, model_source, shape_ranges

ort = pytest.importorskip("onnxruntime")
VAE = ("vae_decoder", "vae_encoder")
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", *VAE)      # the update graph: test_step_graph.py
FP16_PSNR_DB = 50.0       # fp16 UNet and text encoders vs fp32, 8 guided steps (measured: 72.7 dB; another seed: 9.8)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """The tiny SDXL model exported fp16 (validated: every graph against torch) and fp32."""
    root, source = tmp_path_factory.mktemp("sdxl-precision"), model_source(SDXL_FAMILY)
    for precision in (Precision.FP16, Precision.FP32):
        export_bundle(source, root / precision.value, ExportOptions(
            shape_ranges=shape_ranges(SDXL_FAMILY), precision=precision, validate=precision == Precision.FP16,
            components=COMPONENTS, optimize=False))
    return {p.value: root / p.value for p in (Precision.FP16, Precision.FP32)}


def _graph_float_types(path: Path) -> set[int]:
    model = onnx.load(str(path))
    io = [*model.graph.input, *model.graph.output]
    return {v.type.tensor_type.elem_type for v in io} | {t.data_type for t in model.graph.initializer}


def test_fp16_export_keeps_the_force_upcast_vae_in_fp32(bundles):
    manifest = load_manifest(bundles["fp16"])
    assert manifest.precision == Precision.FP16
    dtypes = {name: entry.dtype for name, entry in manifest.components.items()}
    assert dtypes == {"text_encoder": "float16", "text_encoder_2": "float16", "unet": "float16",
                      "vae_decoder": "float32", "vae_encoder": "float32"}
    for name in VAE:       # the graphs themselves: no half tensor anywhere
        assert TensorProto.FLOAT16 not in _graph_float_types(bundles["fp16"] / manifest.component(name).file)
    assert TensorProto.FLOAT16 in _graph_float_types(bundles["fp16"] / manifest.component("unet").file)
    assert all(entry.parity.passed for entry in manifest.components.values())


def test_fp16_images_match_the_fp32_bundle(bundles):
    """Guided, with size ids and a negative prompt, at a size that was not traced."""
    from ldmrt.runtime.pipeline import GenerationRequest, Pipeline

    request = GenerationRequest(prompt="a red fox in the snow", negative_prompt="blurry", steps=8, seed=4,
                                height=40, width=24, guidance=5.0, crops_coords_top_left=(8, 0))
    images = {name: Pipeline.load(path, "onnxruntime").generate(request).images for name, path in bundles.items()}
    assert images["fp16"].shape == images["fp32"].shape == (1, 40, 24, 3)
    assert psnr(images["fp16"], images["fp32"]) >= FP16_PSNR_DB
    other = Pipeline.load(bundles["fp32"], "onnxruntime").generate(dataclasses.replace(request, seed=5)).images
    assert psnr(other, images["fp32"]) < FP16_PSNR_DB        # the comparison can fail


def test_no_fp32_vae_decoder_exports_the_vae_in_fp16(tmp_path):
    out = tmp_path / "bundle"
    result = export_bundle(model_source(SDXL_FAMILY), out, ExportOptions(
        shape_ranges=shape_ranges(SDXL_FAMILY), precision=Precision.FP16, components=VAE, validate=False,
        fp32_vae_decoder=False, optimize=False))
    assert {load_manifest(out).component(name).dtype for name in VAE} == {"float16"}
    assert result.notes == ()


@pytest.mark.parametrize("case, config, options, expected", [
    ("sdxl fp16", SDXL_FAMILY, ExportOptions(precision=Precision.FP16), set(VAE)),
    ("preset sdxl", PRESETS["sdxl"], ExportOptions(precision=Precision.FP16), set(VAE)),
    ("preset refiner", PRESETS["sdxl-refiner"], ExportOptions(precision=Precision.FP16), set(VAE)),
    # bf16 has fp32's range: diffusers upcasts float16 only
    ("sdxl bf16", SDXL_FAMILY, ExportOptions(precision=Precision.BF16), set()),
    ("sdxl fp32", SDXL_FAMILY, ExportOptions(precision=Precision.FP32), set()),
    ("fixed vae", dataclasses.replace(SDXL_FAMILY, autoencoder=dataclasses.replace(
        SDXL_FAMILY.autoencoder, force_upcast=False)), ExportOptions(precision=Precision.FP16), set()),
    # StableDiffusionPipeline ignores the flag (SD 1.x VAE configs say true)
    ("sd1", FAMILIES["sd1"], ExportOptions(precision=Precision.FP16), set()),
    ("asked", FAMILIES["sd1"], ExportOptions(precision=Precision.FP16, fp32_vae_decoder=True), {"vae_decoder"}),
    ("refused", SDXL_FAMILY, ExportOptions(precision=Precision.FP16, fp32_vae_decoder=False), set()),
])
def test_which_components_stay_fp32(case, config, options, expected):
    fp32, notes = fp32_components(config, options)
    assert set(fp32) == expected, case
    assert bool(notes) == (expected == set(VAE)), case


@pytest.mark.parametrize("value, expected", [(None, True), (True, True), (False, False)])
def test_force_upcast_is_read_from_the_vae_config(value, expected):
    cfg = {"_class_name": "AutoencoderKL", "block_out_channels": [32, 64], "latent_channels": 4,
           "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    if value is not None:
        cfg["force_upcast"] = value
    config, _ = autoencoder_config_from_diffusers(cfg, "vae/config.json")
    assert config.force_upcast is expected       # diffusers' AutoencoderKL default: true


def test_a_bad_force_upcast_is_refused_by_name():
    cfg = {"_class_name": "AutoencoderKL", "block_out_channels": [32], "force_upcast": "yes",
           "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"]}
    with pytest.raises(CheckpointError, match="force_upcast"):
        autoencoder_config_from_diffusers(cfg, "vae/config.json")
