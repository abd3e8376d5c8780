"""LoRA adapters switched at run time on ONNX Runtime (and the slot's per-request choice).

References: bundles exported with the adapters fused (the same weights traced by PyTorch), fresh
pipelines for the base, the torch backend's switch, and the base graph's own initializers.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ldmrt.errors import LoraError
from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
from ldmrt.lora.choice import LoraChoice
from ldmrt.lora.graph_weights import read_graph_weights
from ldmrt.lora.targets import module_index
from ldmrt.runtime.pipeline import Pipeline
from tests.test_lora import COMPONENTS, REQUEST, write_kohya


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-ort")
    source = preset_source("tiny")
    files = {name: write_kohya(source.model, root / f"{name}.safetensors", seed) for name, seed in (("a", 5), ("b", 6))}
    options = ExportOptions(components=COMPONENTS, validate=False)
    export_bundle(source, root / "plain", options)
    for name, choices in (("fused-a", (LoraChoice(files["a"]),)), ("fused-b", (LoraChoice(files["b"], 0.7),)),
                          ("fused-ab", (LoraChoice(files["a"], 0.5), LoraChoice(files["b"], -0.25)))):
        export_bundle(source, root / name, ExportOptions(components=COMPONENTS, validate=False, loras=choices))
    return root, source, files


def _images(bundle: Path, backend: str = "onnxruntime") -> np.ndarray:
    return Pipeline.load(bundle, backend, **({"device": "cpu"} if backend == "torch" else {})).generate(REQUEST).images


def test_every_adaptable_weight_of_the_graphs_is_recorded(bundles):
    """Each Linear / Conv2d weight of the UNet and the text encoder maps to initializers holding
    exactly its values (as they are, or transposed); none is left out."""
    root, source, _ = bundles
    index = module_index(source.model)
    state = source.model.state_dict()
    for component in ("unet", "text_encoder"):
        record = read_graph_weights(root / "plain" / f"{component}.onnx")
        held = {t.name: onnx.numpy_helper.to_array(t)
                for t in onnx.load(str(root / "plain" / f"{component}.onnx")).graph.initializer}
        prefix = "model.diffusion_model." if component == "unet" else "cond_stage_model."
        assert set(record.targets) == {k for k in index.entries if k.startswith(prefix)} and not record.unswitchable
        for key, targets in record.targets.items():
            for target in targets:
                weight = state[key].numpy()
                np.testing.assert_array_equal(held[target.initializer], weight.T if target.transposed else weight)


def test_switching_gives_the_fused_bundles_images_and_the_base_bit_for_bit(bundles):
    root, _, files = bundles
    pipeline = Pipeline.load(root / "plain", "onnxruntime")
    none = pipeline.generate(REQUEST).images
    np.testing.assert_array_equal(none, _images(root / "plain"))
    for choices, fused in (([LoraChoice(files["a"])], "fused-a"), ([f"{files['b']}:0.7"], "fused-b"),
                           ([LoraChoice(files["a"], 0.5), LoraChoice(files["b"], -0.25)], "fused-ab")):
        pipeline.loras.set(choices)
        switched = pipeline.generate(REQUEST).images
        assert np.abs(switched - none).max() > 1e-3                       # the adapter shows
        np.testing.assert_allclose(switched, _images(root / fused), rtol=0, atol=1e-6)
    pipeline.loras.set([])
    assert not any(r.adapted for r in pipeline.runners.values())
    np.testing.assert_array_equal(pipeline.generate(REQUEST).images, none)     # the base graph again


def test_onnxruntime_and_torch_switch_to_the_same_images(bundles):
    root, _, files = bundles
    images = {}
    for backend in ("onnxruntime", "torch"):
        pipeline = Pipeline.load(root / "plain", backend, **({"device": "cpu"} if backend == "torch" else {}))
        pipeline.loras.set([LoraChoice(files["b"], 0.7)])
        images[backend] = pipeline.generate(REQUEST).images
    assert np.abs(images["onnxruntime"] - images["torch"]).max() < 1e-4


def test_weights_outside_the_graph_are_replaced_too(bundles, tmp_path, monkeypatch):
    """Graphs over 2 GB keep their weights in <graph>.onnx.data: those are swapped in as external
    initializers. The limit is lowered so the tiny graphs are written that way."""
    import ldmrt.export.onnx_graph as onnx_graph

    root, source, files = bundles
    monkeypatch.setattr(onnx_graph, "PROTOBUF_LIMIT", (64 << 20) + 1)
    export_bundle(source, tmp_path / "external", ExportOptions(components=COMPONENTS, validate=False))
    assert (tmp_path / "external" / "unet.onnx.data").is_file()
    pipeline = Pipeline.load(tmp_path / "external", "onnxruntime")
    pipeline.loras.set([LoraChoice(files["b"], 0.7)])
    np.testing.assert_allclose(pipeline.generate(REQUEST).images, _images(root / "fused-b"), rtol=0, atol=1e-6)
    pipeline.loras.set([])
    np.testing.assert_array_equal(pipeline.generate(REQUEST).images, _images(root / "plain"))


def test_using_runs_each_request_on_its_own_adapters(bundles):
    """AdapterSlot.using: a server's per-request choice; requests on A and on none interleave on
    threads, each gets its own adapters' image."""
    root, _, files = bundles
    pipeline = Pipeline.load(root / "plain", "onnxruntime")
    expected = {(): _images(root / "plain"), (LoraChoice(files["a"]),): _images(root / "fused-a")}
    results, errors = [], []

    def work(choices):
        try:
            for _ in range(2):
                with pipeline.loras.using(list(choices)):
                    results.append((choices, pipeline.generate(REQUEST).images))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in list(expected) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8
    for choices, image in results:
        np.testing.assert_allclose(image, expected[choices], rtol=0, atol=1e-6)


def test_a_switch_from_inside_a_request_is_refused_not_a_deadlock(bundles):
    root, _, files = bundles
    pipeline = Pipeline.load(root / "plain", "onnxruntime")
    raised = []

    def on_step(done, total):
        try:
            pipeline.loras.set([files["a"]])
        except LoraError as exc:
            raised.append(exc)

    pipeline.generate(REQUEST, on_step=on_step)
    assert raised and "inside a request" in str(raised[0]) and pipeline.loras.active == ()


def test_a_failed_switch_keeps_the_previous_sessions(bundles, tmp_path):
    root, source, files = bundles
    pipeline = Pipeline.load(root / "plain", "onnxruntime")
    pipeline.loras.set([files["a"]])
    sessions = {name: runner.session for name, runner in pipeline.runners.items()}
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.ones(2, 4),
               "lora_unet_nothing_here.lora_up.weight": torch.ones(4, 2)}, str(bad))
    with pytest.raises(LoraError, match="nothing_here"):
        pipeline.loras.set([files["b"], bad])
    assert {name: runner.session for name, runner in pipeline.runners.items()} == sessions
    assert pipeline.loras.active == (LoraChoice(files["a"]),)


def test_weights_that_share_their_values_are_refused_by_name(tmp_path):
    """Two all-zero layers of one shape cannot be told apart by their bytes: neither is recorded,
    and an adapter on one is refused naming it (never applied to the other); the rest switch."""
    source = preset_source("tiny")
    model = source.model
    blocks = [m for n, m in model.named_modules() if n.endswith("attn1.to_q")]
    blocks = [m for m in blocks if m.weight.shape == blocks[0].weight.shape][:2]
    assert len(blocks) == 2
    with torch.no_grad():
        for module in blocks:
            module.weight.zero_()
    export_bundle(source, tmp_path / "b", ExportOptions(components=COMPONENTS, validate=False))
    record = read_graph_weights(tmp_path / "b" / "unet.onnx")
    assert len(record.unswitchable) == 2 and all(k.endswith("attn1.to_q.weight") for k in record.unswitchable)
    pipeline = Pipeline.load(tmp_path / "b", "onnxruntime")
    path = write_kohya(model, tmp_path / "a.safetensors", seed=1)
    with pytest.raises(LoraError) as raised:
        pipeline.loras.set([path])
    assert "attn1" in str(raised.value) and "not switchable" in str(raised.value) and raised.value.field == "lora"


def test_float16_graphs_switch_like_their_fused_export(bundles, tmp_path):
    """fp16 initializers: base (fp16) + delta in float32, cast back; the fused fp16 export rounds
    the fp32 sum once, so they agree to fp16 rounding, and removing the adapter is exact."""
    from ldmrt.iospec import Precision

    root, source, _ = bundles
    files = {"b": write_kohya(source.model, tmp_path / "unet-only.safetensors", seed=6, text=False)}
    options = ExportOptions(components=("unet",), validate=False, precision=Precision.FP16)
    export_bundle(source, tmp_path / "half", options)
    export_bundle(source, tmp_path / "half-b", ExportOptions(components=("unet",), validate=False,
                                                             precision=Precision.FP16,
                                                             loras=(LoraChoice(files["b"], 0.7),)))
    assert read_graph_weights(tmp_path / "half" / "unet.onnx").targets
    pipeline, fused = (Pipeline.load(tmp_path / name, "onnxruntime") for name in ("half", "half-b"))
    spec = pipeline.manifest.component("unet").spec
    from ldmrt.export.validate import shape_plan
    from ldmrt.models.components import example_inputs

    dtypes = {t.name: t.dtype for t in spec.inputs}
    inputs = {k: v.astype(dtypes[k]) for k, v in example_inputs(source.model.config, spec, shape_plan(spec).trace,
                                                                  seed=0).items()}
    base = pipeline.runners["unet"](inputs)
    pipeline.loras.set([LoraChoice(files["b"], 0.7)])
    switched, reference = pipeline.runners["unet"](inputs), fused.runners["unet"](inputs)
    assert np.abs(switched.astype(np.float32) - base).max() > 1e-2
    np.testing.assert_allclose(switched.astype(np.float32), reference.astype(np.float32), rtol=0, atol=1e-2)
    pipeline.loras.set([])
    np.testing.assert_array_equal(pipeline.runners["unet"](inputs), base)


# --- TensorRT refit, against a stand-in (no GPU here; TensorRT-RTX builds no refittable engine on a CPU)

class _Engine:
    """What the switch sees of a refittable engine: its weights by initializer name."""

    def __init__(self, graph: Path, refittable: bool = True, hide: str | None = None):
        self.weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(graph)).graph.initializer}
        self.refittable, self.hide, self.refits = refittable, hide, 0


class _Refitter:
    def __init__(self, engine: _Engine, logger):
        self.engine, self.staged = engine, {}

    def get_all_weights(self):
        return [name for name in self.engine.weights if name != self.engine.hide]

    def set_named_weights(self, name, weights) -> bool:
        self.staged[name] = weights.array
        return True

    def refit_cuda_engine(self) -> bool:
        for name, array in self.staged.items():
            assert array.dtype == self.engine.weights[name].dtype and array.shape == self.engine.weights[name].shape
            self.engine.weights[name] = array.copy()
        self.engine.refits += 1
        return True


class _Runner:
    def __init__(self, engine: _Engine):
        self.engine, self.dropped = engine, 0

    def drop_graphs(self):
        self.dropped += 1


def _trt(root: Path, **engine_options):
    from types import SimpleNamespace

    from ldmrt.engines.trt_lora import trt_switch

    api = SimpleNamespace(module=SimpleNamespace(Refitter=_Refitter, Weights=lambda a: SimpleNamespace(array=a)),
                          logger=None)
    graphs = {name: root / "plain" / f"{name}.onnx" for name in ("unet", "text_encoder")}
    runners = {name: _Runner(_Engine(path, **engine_options)) for name, path in graphs.items()}
    refitted = []
    return trt_switch(api, graphs.__getitem__, runners, refitted.append), runners, refitted


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_refit_sets_the_fused_weights_then_the_base_and_drops_cuda_graphs(bundles):
    from ldmrt.lora.slot import AdapterSlot

    root, _, files = bundles
    switch, runners, refitted = _trt(root)
    slot = AdapterSlot(switch, "tensorrt")
    for choices, bundle in (([LoraChoice(files["b"], 0.7)], "fused-b"), ([files["a"]], "fused-a"), ([], "plain")):
        slot.set(choices)
        for name, runner in runners.items():
            expected = _initializers(root / bundle / f"{name}.onnx")
            assert runner.engine.weights.keys() == expected.keys()
            for key, value in expected.items():
                np.testing.assert_array_equal(runner.engine.weights[key], value, err_msg=f"{bundle} {key}")
    assert all(r.engine.refits == 3 and r.dropped == 3 for r in runners.values())
    assert refitted.count("unet") == 3                    # the denoiser's loop graphs go too


def test_refit_refuses_unrefittable_engines_and_weights_before_touching_any(bundles):
    from ldmrt.lora.slot import AdapterSlot

    root, _, files = bundles
    assert _trt(root, refittable=False)[0] is None
    with pytest.raises(LoraError, match="--refit"):
        AdapterSlot(None, "tensorrt").set([files["a"]])
    record = read_graph_weights(root / "plain" / "unet.onnx")
    hidden = next(t.initializer for key, targets in record.targets.items() if "attn1.to_q" in key for t in targets)
    switch, runners, _ = _trt(root, hide=hidden)
    with pytest.raises(LoraError, match="no refittable weights"):
        AdapterSlot(switch, "tensorrt").set([files["a"]])
    assert all(r.engine.refits == 0 for r in runners.values())


def test_a_bundle_without_weight_records_is_refused_with_advice(bundles, tmp_path):
    """Graphs exported before the record (or int8 ones): a switch says to re-export or fuse."""
    import shutil

    root, _, files = bundles
    shutil.copytree(root / "plain", tmp_path / "old")
    for name in ("unet", "text_encoder"):
        graph = onnx.load(str(tmp_path / "old" / f"{name}.onnx"))
        del graph.metadata_props[:]
        onnx.save_model(graph, str(tmp_path / "old" / f"{name}.onnx"))
    pipeline = Pipeline.load(tmp_path / "old", "onnxruntime", verify=False, cache_dir=tmp_path / "cache")
    with pytest.raises(LoraError, match="record no switchable weights.*re-export"):
        pipeline.loras.set([files["a"]])
    assert pipeline.loras.active == ()


def test_the_wire_reader_reads_what_onnx_reads(bundles, tmp_path):
    """ldmrt.onnx_wire (no onnx package in the lean runtime) against onnx itself: every initializer's
    value, inside the protobuf and in .data, and the metadata; a truncated graph is a BundleError."""
    from ldmrt import onnx_wire
    from ldmrt.errors import BundleError

    root, _, _ = bundles
    graph = root / "plain" / "unet.onnx"
    model = onnx.load(str(graph))
    onnx.save_model(onnx.load(str(graph)), str(tmp_path / "external.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="external.onnx.data", size_threshold=1024)
    for path in (graph, tmp_path / "external.onnx"):
        data = path.read_bytes()
        spans = onnx_wire.initializers(data, str(path))
        assert set(spans) == {t.name for t in model.graph.initializer}
        for tensor in model.graph.initializer:
            np.testing.assert_array_equal(onnx_wire.read_array(spans[tensor.name], data, path.parent, str(path)),
                                          onnx.numpy_helper.to_array(tensor))
        assert onnx_wire.metadata(data, str(path)) == {p.key: p.value for p in model.metadata_props}
    assert any(s.location for s in onnx_wire.initializers((tmp_path / "external.onnx").read_bytes(), "x").values())
    with pytest.raises(BundleError, match="not a readable ONNX graph"):
        onnx_wire.initializers(graph.read_bytes()[:-1000], str(graph))
