"""`--precision int8`: the int8 UNet (static QDQ) against fp32 references, and its building blocks.

Golden references: the torch fp32 model (per UNet call and the whole 20-step pipeline, through
the torch backend on the same bundle), and numpy in float64 simulating the quantization
arithmetic for the QDQ rewrite. Tiny sizes: the whole module runs in well under two minutes.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ldmrt.errors import ParityError
from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
from ldmrt.models.components import ComponentGraph, example_inputs, to_torch
from ldmrt.export.quantize import (METADATA_KEY, WEIGHT_MAX, Int8Bounds, Int8Options, QuantTarget,
                                   TrajectoryMaker, _activation_qparams, _weight_qparams, collect_ranges,
                                   insert_qdq, psnr, read_report, select_targets)
from ldmrt.iospec import Precision
from ldmrt.manifest import load_manifest
from ldmrt.models import build_model
from ldmrt.tokenizer import load_tokenizer

ort = pytest.importorskip("onnxruntime")
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
BOUNDS = Int8Bounds()
RANDOM_INPUT_BOUND = 0.2


def rel_l2(found: np.ndarray, expected: np.ndarray) -> float:
    found64, expected64 = np.asarray(found, np.float64), np.asarray(expected, np.float64)
    assert found64.shape == expected64.shape
    if not np.isfinite(found64).all():
        return float("inf")
    return float(np.linalg.norm(found64 - expected64) / np.linalg.norm(expected64))


def optimized_ops(path: Path, tmp: Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs (after its QDQ fusions)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for node in onnx.load(str(tmp / "optimized.onnx")).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny"
    export_bundle(preset_source("tiny"), out, ExportOptions(precision=Precision.INT8, components=COMPONENTS))
    return out


# --- the exported bundle -----------------------------------------------------------------------

def test_manifest_records_int8_and_its_parity(int8_bundle):
    manifest = load_manifest(int8_bundle)
    assert manifest.precision == Precision.INT8
    unet = manifest.component("unet")
    assert unet.dtype == "float32" and all(t.dtype in ("float32", "int32") for t in unet.spec.inputs)
    parity = unet.parity
    assert parity is not None and parity.passed and 0 < parity.rel_l2 <= BOUNDS.unet_rel_l2
    assert parity.tolerance == BOUNDS.unet_rel_l2
    assert "PSNR" in parity.reference and "held-out" in parity.reference
    # Only the UNet is quantized: the other graphs keep the fp32 gate against torch.
    for name in ("text_encoder", "vae_decoder"):
        assert manifest.component(name).parity.reference == "torch-fp32"
        assert manifest.component(name).parity.rel_l2 < 1e-4


def test_graph_metadata_holds_the_report(int8_bundle):
    report = read_report(int8_bundle / "unet.onnx")
    assert report is not None
    assert report.quantized["Conv"] > 0 and report.quantized["MatMul"] > 0
    assert report.image_psnr_db >= BOUNDS.image_psnr_db and report.unet_rel_l2 <= BOUNDS.unet_rel_l2
    assert report.calibration["parity_steps"] == 20
    assert any(name.endswith("/out/out.2/Conv") for name in report.kept_fp32)
    assert any("skip_connection" in name for name in report.kept_fp32)
    assert read_report(int8_bundle / "text_encoder.onnx") is None


def test_onnxruntime_runs_integer_kernels(int8_bundle, tmp_path):
    """The point of the QDQ form: ONNX Runtime fuses it into integer kernels (VNNI on x86)."""
    ops = optimized_ops(int8_bundle / "unet.onnx", tmp_path)
    report = read_report(int8_bundle / "unet.onnx")
    assert ops.get("QLinearConv", 0) == report.quantized["Conv"]
    assert ops.get("MatMulIntegerToFloat", 0) == report.quantized["MatMul"]
    weights = onnx.load(str(int8_bundle / "unet.onnx")).graph.initializer
    int8_bytes = sum(numpy_helper.to_array(w).nbytes for w in weights if w.data_type == TensorProto.INT8)
    float_bytes = sum(numpy_helper.to_array(w).nbytes for w in weights if w.data_type == TensorProto.FLOAT)
    assert int8_bytes > float_bytes    # most weights are now one byte each


def test_unet_calls_vs_torch_fp32_at_untraced_shapes(int8_bundle):
    """Every call of a guided run at a shape neither traced nor calibrated, vs the torch model."""
    manifest = load_manifest(int8_bundle)
    spec = manifest.component("unet").spec
    model = build_model(manifest.config, seed=0)
    reference = ComponentGraph(model, spec).eval()
    session = ort.InferenceSession(str(int8_bundle / "unet.onnx"), providers=["CPUExecutionProvider"])

    def torch_unet(feeds):
        with torch.no_grad():
            return reference(*to_torch(feeds, spec)).numpy()

    tokenizer = load_tokenizer(int8_bundle / "tokenizer", manifest.config.conditioner)
    for latent_hw, seed in (((8, 6), 7), ((6, 10), 8)):
        run = TrajectoryMaker(model, spec, latent_hw, 7.5, tokenizer).run(torch_unet, 10, seed, "a red fox")
        errors = [rel_l2(session.run(None, feeds)[0], expected) for feeds, expected in zip(run.feeds, run.outputs)]
        assert max(errors) <= BOUNDS.unet_rel_l2, (latent_hw, errors)
    # Off the sampler's distribution (N(0, 1) samples at random timesteps, random contexts) the
    # error is larger (tiny: median 0.09, max 0.12 over 16 draws); still far from broken (~1).
    for seed, values in ((5, {"batch": 2, "latent_height": 8, "latent_width": 6}),
                         (6, {"batch": 1, "latent_height": 6, "latent_width": 10})):
        arrays = example_inputs(manifest.config, spec, values, seed)
        assert rel_l2(session.run(None, arrays)[0], torch_unet(arrays)) <= RANDOM_INPUT_BOUND, values


def test_whole_pipeline_vs_torch_fp32(int8_bundle):
    """20 guided steps on ONNX Runtime with the int8 UNet vs the fp32 torch backend, same noise."""
    from ldmrt.runtime.pipeline import GenerationRequest, Pipeline

    request = GenerationRequest(prompt="a red fox in the snow", steps=20, seed=3, height=64, width=48)
    int8 = Pipeline.load(int8_bundle, "onnxruntime").generate(request).images
    fp32 = Pipeline.load(int8_bundle, "torch", device="cpu").generate(request).images
    assert int8.shape == fp32.shape == (1, 64, 48, 3)
    assert psnr(int8, fp32) >= BOUNDS.image_psnr_db


def test_out_of_bounds_fails_the_export_and_writes_nothing(tmp_path):
    out = tmp_path / "strict"
    options = ExportOptions(precision=Precision.INT8, components=("unet",),
                            int8=Int8Options(calibration_trajectories=1, calibration_steps=2, parity_steps=3,
                                             bounds=Int8Bounds(unet_rel_l2=1e-6)))
    with pytest.raises(ParityError, match=r"relative L2 <= 1e-06.*tried conv\+matmul: per-call relative L2 "
                                          r"[0-9.e-]+, image PSNR [0-9.]+ dB; matmul: per-call relative L2"):
        export_bundle(preset_source("tiny"), out, options)
    assert not out.exists()
    assert not any(tmp_path.iterdir())


def test_matmul_only_fallback_when_the_convs_miss_the_bound(int8_bundle, tmp_path):
    """A bound between the two levels' errors: the convs+matmuls attempt fails, the matmul-only one
    is kept, recorded as such, and ONNX Runtime runs integer matmuls and no integer convs."""
    out = tmp_path / "fallback"
    bound = 0.03                   # tiny: conv+matmul ~0.07, matmul-only ~0.01 (measured)
    options = ExportOptions(precision=Precision.INT8, components=("text_encoder", "unet"),
                            int8=Int8Options(bounds=Int8Bounds(unet_rel_l2=bound, image_psnr_db=30.0)))
    export_bundle(preset_source("tiny"), out, options)
    report = read_report(out / "unet.onnx")
    assert [a["level"] for a in report.attempts] == ["conv+matmul", "matmul"] and report.level == "matmul"
    assert report.attempts[0]["unet_rel_l2"] > bound >= report.attempts[1]["unet_rel_l2"] == report.unet_rel_l2
    assert set(report.quantized) == {"MatMul"}
    default = read_report(int8_bundle / "unet.onnx")             # same model, default bounds
    assert default.level == "conv+matmul" and [a["level"] for a in default.attempts] == ["conv+matmul"]
    assert set(default.kept_fp32) <= set(report.kept_fp32)
    assert len(report.kept_fp32) == len(default.kept_fp32) + default.quantized["Conv"]
    ops = optimized_ops(out / "unet.onnx", tmp_path)
    assert ops.get("MatMulIntegerToFloat", 0) == report.quantized["MatMul"] and "QLinearConv" not in ops
    assert load_manifest(out).component("unet").parity.rel_l2 == report.unet_rel_l2


# --- building blocks vs numpy ------------------------------------------------------------------

def _toy_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> conv_in -> SiLU -> conv (3x3) -> y1 -> flatten -> matmul -> out; plus a concat-fed conv."""
    def init(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
    nodes = [
        helper.make_node("Conv", ["x", "w_in", "b_in"], ["h0"], name="conv_in", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["h0"], ["s0"]), helper.make_node("Mul", ["h0", "s0"], ["a0"]),
        helper.make_node("Conv", ["a0", "w_mid", "b_mid"], ["h1"], name="conv_mid", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["h1", "a0"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w_skip"], ["h2"], name="conv_skip"),
        helper.make_node("Add", ["h1", "h2"], ["h3"]),
        helper.make_node("Transpose", ["h3"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["t", "w_mm"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5, 5, 6])],
        [init("w_in", 8, 3, 3, 3), init("b_in", 8), init("w_mid", 8, 8, 3, 3), init("b_mid", 8),
         init("w_skip", 8, 16, 1, 1), init("w_mm", 8, 6)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_select_targets_keeps_io_and_concat_fed_convs_in_fp32():
    graph = _toy_graph(np.random.default_rng(0)).graph
    targets, kept = select_targets(graph)
    assert [t.node for t in targets] == ["conv_mid"]
    assert kept == ["conv_in", "conv_skip", "matmul"]       # graph input, concat-fed, graph output
    assert targets[0] == QuantTarget("conv_mid", "Conv", "a0", "w_mid", "b_mid", "h1")


def test_weight_and_activation_qparams():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * np.array([1, 10, 0.1, 0])[:, None, None, None]
    q, scale = _weight_qparams(weight, axis=0)
    assert q.dtype == np.int8 and np.abs(q).max() == WEIGHT_MAX and scale.shape == (4,)
    assert 2 * 255 * WEIGHT_MAX <= 32767          # no u8 x s8 pair-sum saturation without VNNI
    assert scale[3] == 1.0 and not q[3].any()                    # all-zero channel: no division by 0
    error = np.abs(q * scale[:, None, None, None] - weight)
    assert (error <= scale[:, None, None, None] / 2 + 1e-7).all()
    scale_a, zero = _activation_qparams(-1.0, 3.0)
    assert zero.dtype == np.uint8 and math.isclose(scale_a, 4.0 / 255, rel_tol=1e-6) and zero == 64
    assert _activation_qparams(0.5, 2.0)[1] == 0                  # range widened to include 0
    assert _activation_qparams(0.0, 0.0) == (np.float32(1.0), np.uint8(0))


def _fake_quant(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scale, zero = _activation_qparams(lo, hi)
    q = np.clip(np.round(x / np.float64(scale)) + int(zero), 0, 255)
    return (q - int(zero)) * np.float64(scale)


def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Plain float64 3x3 conv, padding 1 (the numpy oracle)."""
    n, c, h, wd = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", padded[:, :, i:i + h, j:j + wd], w[:, :, i, j])
    return out + b[None, :, None, None]


def test_qdq_graph_matches_numpy_simulation(tmp_path):
    rng = np.random.default_rng(2)
    model = _toy_graph(rng)
    path = tmp_path / "toy.onnx"
    onnx.save_model(model, str(path))
    feeds = [{"x": rng.standard_normal((2, 3, 5, 5)).astype(np.float32)} for _ in range(3)]
    targets, _ = select_targets(model.graph)
    ranges = collect_ranges(path, ["a0", "h1"], iter(feeds))
    # The probe saw exactly what float64 numpy computes for these tensors.
    init = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    acts, mids = [], []
    for feed in feeds:
        h0 = _conv2d(feed["x"].astype(np.float64), init["w_in"], init["b_in"])
        acts.append(h0 / (1 + np.exp(-h0)))
        mids.append(_conv2d(acts[-1], init["w_mid"], init["b_mid"]))
    for name, arrays in (("a0", acts), ("h1", mids)):
        lo, hi = ranges[name]
        assert math.isclose(lo, min(a.min() for a in arrays), rel_tol=1e-5, abs_tol=1e-5)
        assert math.isclose(hi, max(a.max() for a in arrays), rel_tol=1e-5, abs_tol=1e-5)
    assert not list(tmp_path.glob(".*calibration*"))               # the probe graph is removed

    quantized = insert_qdq(onnx.load(str(path)), targets, ranges)
    onnx.checker.check_model(quantized, full_check=True)
    qpath = tmp_path / "toy.int8.onnx"
    onnx.save_model(quantized, str(qpath))
    session = ort.InferenceSession(str(qpath), providers=["CPUExecutionProvider"])
    x = feeds[0]["x"]
    (found,) = session.run(None, {"x": x})
    # numpy: fake-quantize the conv's input, weight (per channel), bias (int32) and output.
    w_q, w_scale = _weight_qparams(init["w_mid"].astype(np.float32), axis=0)
    a_scale = np.float64(_activation_qparams(*ranges["a0"])[0])
    b_scale = w_scale.astype(np.float64) * a_scale
    bias = np.round(init["b_mid"] / b_scale) * b_scale
    h1 = _conv2d(_fake_quant(acts[0], *ranges["a0"]), w_q * w_scale.astype(np.float64)[:, None, None, None], bias)
    h1 = _fake_quant(h1, *ranges["h1"])
    h2 = np.einsum("nchw,oc->nohw", np.concatenate([h1, acts[0]], axis=1), init["w_skip"][:, :, 0, 0])
    expected = np.transpose(h1 + h2, (0, 2, 3, 1)) @ init["w_mm"]
    assert rel_l2(found, expected) < 1e-4
    # ... and that simulation is not the float graph: the check above can fail.
    (float_out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert rel_l2(float_out, expected) > 1e-3


def test_psnr():
    image = np.linspace(0, 1, 300).reshape(1, 10, 10, 3)
    assert psnr(image, image) == float("inf")
    assert math.isclose(psnr(image + 0.01, image), 40.0, rel_tol=1e-9)
    assert psnr(np.full_like(image, np.nan), image) == 0.0


def test_report_round_trips_through_the_graph(int8_bundle, tmp_path):
    model = onnx.load(str(int8_bundle / "unet.onnx"), load_external_data=False)
    entries = [e for e in model.metadata_props if e.key == METADATA_KEY]
    assert len(entries) == 1
    data = json.loads(entries[0].value)
    report = read_report(int8_bundle / "unet.onnx")
    assert dataclasses.asdict(report) == data
    record = report.parity_record()
    assert record.rel_l2 == report.unet_rel_l2 and record.tolerance == report.bounds["unet_rel_l2"]
    bad = dataclasses.replace(report, image_psnr_db=report.bounds["image_psnr_db"] - 0.1)
    with pytest.raises(ParityError, match="image PSNR"):
        bad.check()


def test_cli_export_int8_names_the_quantized_unet_and_its_reference(tmp_path):
    from typer.testing import CliRunner

    from ldmrt.cli import app
    out = tmp_path / "tiny-int8"
    result = CliRunner().invoke(app, ["export", "tiny", "--precision", "int8", "--components", "text_encoder,unet",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    (unet_row,) = [line for line in result.stdout.splitlines() if "│ unet" in line]
    (text_row,) = [line for line in result.stdout.splitlines() if "│ text_enc" in line]
    assert "int8" in unet_row and "fp32 onnx" in unet_row
    assert "float32" in text_row and "torch" in text_row
    report = read_report(out / "unet.onnx")
    assert f"{report.unet_rel_l2:.2e}" in unet_row
    assert f"image PSNR {report.image_psnr_db:.1f} dB" in result.stdout


@pytest.mark.parametrize("family", ["ldm-class", "sd1"])
def test_replay_starts_from_the_noise_of_the_run_it_replays(family):
    """Class labels and (without a tokenizer) random tokens are drawn for a run, not for its replay:
    the noise must not depend on them, or the parity PSNR compares two different images."""
    from ldmrt.iospec import ShapeRanges, component_specs
    from tests.families import FAMILIES

    config = FAMILIES[family]
    model = build_model(config, seed=0).eval()
    spec = component_specs(config, ShapeRanges.for_model(config), Precision.FP32)["unet"]
    graph = ComponentGraph(model, spec).eval()

    def unet(feeds):
        with torch.no_grad():
            return graph(*to_torch(feeds, spec)).numpy()

    maker = TrajectoryMaker(model, spec, (4, 6), 7.5)
    run = maker.run(unet, 4, 3, "a red fox")
    replayed = maker.run(unet, 4, 3, "a red fox", replay=run)
    np.testing.assert_array_equal(replayed.feeds[0]["sample"], run.feeds[0]["sample"])
    np.testing.assert_array_equal(replayed.latents, run.latents)


# --- SDXL: two text encoders, the pooled embedding and the size ids ----------------------------

@pytest.fixture(scope="module")
def sdxl_int8_bundle(tmp_path_factory) -> Path:
    from tests.families import SDXL_FAMILY, model_source, shape_ranges

    root, source = tmp_path_factory.mktemp("int8-sdxl"), model_source(SDXL_FAMILY)
    for precision in (Precision.INT8, Precision.FP32):       # the fp32 one: the reference
        export_bundle(source, root / precision.value, ExportOptions(
            shape_ranges=shape_ranges(SDXL_FAMILY), precision=precision, validate=False, optimize=False,
            components=("text_encoder", "text_encoder_2", "unet", "vae_decoder"),
            int8=Int8Options(parity_steps=10)))      # (the int8 parity itself is always measured)
    return root / Precision.INT8.value


def test_sdxl_calibration_feeds_what_the_runtime_feeds(sdxl_int8_bundle):
    """The calibration's UNet inputs are the runtime's: both encoders' contexts side by side, zero
    embeddings for the empty negative (force_zeros_for_empty_prompt), the pooled embedding of the
    projection encoder and the size ids (h, w, 0, 0, h, w) of the calibration size in pixels."""

    manifest = load_manifest(sdxl_int8_bundle)
    config, spec = manifest.config, manifest.component("unet").spec
    model = build_model(config, seed=0).eval()
    tokenizer = load_tokenizer(sdxl_int8_bundle / "tokenizer", config.conditioner)
    latent_hw = (6, 10)
    feeds = TrajectoryMaker(model, spec, latent_hw, 5.0, tokenizer).conditioning("a red fox", np.random.default_rng(0))
    ids = tokenizer.encode(["a red fox"]).input_ids
    with torch.no_grad():
        first = model.conditioner(torch.from_numpy(ids))
        second, pooled = model.conditioner_2(torch.from_numpy(ids))
    context = torch.cat([first, second], dim=-1).numpy()
    np.testing.assert_array_equal(feeds["encoder_hidden_states"][0], np.zeros_like(context[0]))
    np.testing.assert_allclose(feeds["encoder_hidden_states"][1], context[0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(feeds["text_embeds"][0], 0.0)
    np.testing.assert_allclose(feeds["text_embeds"][1], pooled[0].numpy(), rtol=0, atol=1e-6)
    h, w = (side * config.downsampling_factor for side in latent_hw)
    np.testing.assert_array_equal(feeds["time_ids"], [[h, w, 0, 0, h, w]] * 2)


def test_sdxl_int8_bundle_meets_the_bounds(sdxl_int8_bundle):
    """The report holds the SDXL inputs; 12 guided steps with the int8 UNet vs the fp32 bundle of
    the same weights (both on ONNX Runtime), same noise, at a size neither traced nor calibrated."""
    from ldmrt.runtime.pipeline import GenerationRequest, Pipeline

    manifest = load_manifest(sdxl_int8_bundle)
    report = read_report(sdxl_int8_bundle / "unet.onnx")
    assert report.shapes["text_embeds"][1] == 16 and report.shapes["time_ids"][1] == 6
    assert report.unet_rel_l2 <= BOUNDS.unet_rel_l2 and report.image_psnr_db >= BOUNDS.image_psnr_db
    assert manifest.component("unet").parity.passed
    request = GenerationRequest(prompt="a red fox in the snow", steps=12, seed=3, height=24, width=40,
                                guidance=5.0, original_size=(64, 96))
    int8 = Pipeline.load(sdxl_int8_bundle, "onnxruntime").generate(request).images
    fp32 = Pipeline.load(sdxl_int8_bundle.with_name(Precision.FP32.value), "onnxruntime").generate(request).images
    assert int8.shape == fp32.shape == (1, 24, 40, 3)
    assert psnr(int8, fp32) >= BOUNDS.image_psnr_db
