"""Issue 14 row 8: a manifest that lies about its graphs is refused by name, never trusted.

At parse: every field's value range, and the I/O spec of every component against what ldmrt
derives from the manifest's own config and shape ranges (text width, latent channels, the VAE's
factor). At load: every declared input/output (name, dtype, rank, static dims, symbol names)
against the ONNX Runtime session or the TensorRT engine. At run time: each output's shape and
dtype against the spec. The lies are edits of a real tiny bundle (manifest or graph).
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from ldmrt.cli import app
from ldmrt.engines.ort_cache import BUNDLE_CACHE_DIR
from ldmrt.engines.tensorrt import TensorRTRunner, _ComponentEngine
from ldmrt.errors import BundleError
from ldmrt.iospec import ComponentSpec, TensorSpec
from ldmrt.manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_file
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
from tests.test_tensorrt import DataType, FakeDevice, FakeEngine, fake_api, inputs, unet_spec


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """tiny (latent factor 4, text width 32), fp32, 32..64 px, at most 2 images; not validated."""
    from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
    from ldmrt.iospec import ShapeRanges

    out = tmp_path_factory.mktemp("lies") / "tiny"
    export_bundle(preset_source("tiny"), out, ExportOptions(
        validate=False, shape_ranges=ShapeRanges(min_size=32, opt_size=32, max_size=64, max_batch=2)))
    return out


def lying_copy(bundle: Path, where: Path, manifest=None, graphs=None, cache: bool = False) -> Path:
    """A copy of `bundle` with manifest.json edited by `manifest(data)` and graphs edited by
    `graphs[component](model)` (rehashed, so only the lie differs); the file is written raw,
    as an attacker or a careless hand would, not through write_manifest."""
    out = where / "bundle"
    shutil.copytree(bundle, out, ignore=None if cache else shutil.ignore_patterns(BUNDLE_CACHE_DIR))
    data = json.loads((out / MANIFEST_NAME).read_text())
    for component, edit in (graphs or {}).items():
        entry = data["components"][component]
        path = out / entry["file"]
        model = onnx.load(str(path))
        edit(model)
        onnx.save(model, str(path))
        entry["sha256"] = {entry["file"]: sha256_file(path)}
        entry["size_bytes"] = path.stat().st_size
    if manifest is not None:
        manifest(data)
    (out / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
    return out


def edits(*changes):
    """One manifest edit from several (dotted path, value) changes; a path step may be an index."""
    def apply(data):
        for path, value in changes:
            *parents, last = path
            node = data
            for key in parents:
                node = node[key]
            node[last] = value
    return apply


def io(component, group, index, *rest):
    return ("components", component, "io", group, index, *rest)


# --- the CLI -------------------------------------------------------------------------------------

cli = CliRunner()


def generate_refused(bundle: Path, tmp_path: Path, *fragments: str) -> str:
    """`ldmrt generate` exits 2 with one BundleError line naming `fragments`, and writes no image."""
    out = tmp_path / "out.png"
    result = cli.invoke(app, ["generate", str(bundle), "--prompt", "a fox", "--steps", "1",
                              "--out", str(out)])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "BundleError" in errors[0], result.stderr
    missing = [f for f in fragments if f not in result.stderr]
    assert not missing, f"{missing} not in {result.stderr!r}"
    assert not out.exists()
    return errors[0]


def assert_names(message: str, *fragments: str) -> None:
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{missing} not in {message!r}"


# --- parse: value ranges and the spec against the config --------------------------------------

def parity(**changes):
    """A parity record as validation writes it (the fixture's export skipped validation)."""
    return {"reference": "torch", "rel_l2": 1e-7, "max_abs": 1e-6, "tolerance": 1e-5,
            "shapes": {"sample": [2, 4, 8, 8]}, **changes}


# A factor-8 autoencoder in config (tiny's is factor 4): more levels, the same channels.
FACTOR_8 = [1, 1, 1, 2]

PARSE_LIES = [  # (id, manifest edit, field named, fragments of the message)
    ("latent_scale-0", edits((("latent_scale",), 0)),
     "latent_scale", ["> 0", "found integer 0"]),
    ("latent_scale-negative", edits((("latent_scale",), -0.5)),
     "latent_scale", ["> 0"]),
    ("dtype-float99", edits((io("unet", "inputs", 0, "dtype"), "float99")),
     "components.unet.io.inputs[0].dtype", ["float32", "float99"]),
    ("dtype-float64", edits((io("vae_decoder", "outputs", 0, "dtype"), "float64")),
     "components.vae_decoder.io.outputs[0].dtype", ["float64"]),
    ("dtype-int32-for-float", edits((io("unet", "inputs", 0, "dtype"), "int32")),
     "components.unet.io.inputs[0].dtype", ["'float32'", "'int32'"]),
    ("output-name-swapped", edits((io("vae_decoder", "outputs", 0, "name"), "pixels")),
     "components.vae_decoder.io.outputs[0].name", ["'images'", "'pixels'"]),
    ("input-names-swapped", edits((io("unet", "inputs", 0, "name"), "timestep"),
                                  (io("unet", "inputs", 1, "name"), "sample")),
     "components.unet.io.inputs[0].name", ["'sample'", "'timestep'"]),
    ("extra-output", lambda d: d["components"]["unet"]["io"]["outputs"].append(
        {"name": "extra", "dtype": "float32", "shape": ["batch"]}),
     "components.unet.io.outputs", ["['model_output']", "'extra'"]),
    ("factor-in-config", edits((("config", "autoencoder", "ch_mult"), FACTOR_8)),
     "components.", ["config and shape_ranges"]),
    ("text-width-in-config", edits((("config", "conditioner", "hidden_size"), 48),
                                   (("config", "unet", "context_dim"), 48)),
     "components.text_encoder.io.outputs[0].shape", ["48", "32"]),
    ("latent-channels-in-io", edits((io("vae_decoder", "inputs", 0, "shape", 1), 3)),
     "components.vae_decoder.io.inputs[0].shape", ["4", "3"]),
    ("zero-factor", edits((io("unet", "inputs", 0, "shape", 0), "0*batch")),
     "components.unet.io.inputs[0].shape[0]", ["'0*batch'"]),
    ("zero-static-dim", edits((io("text_encoder", "inputs", 0, "shape", 1), 0)),
     "components.text_encoder.io.inputs[0].shape[1]", ["integer 0"]),
    ("range-wider-than-shape_ranges", edits((("components", "unet", "io", "ranges", "batch"), [1, 2, 400])),
     "components.unet.io.ranges.batch", ["[1, 2, 4]", "[1, 2, 400]"]),
    ("unknown-symbol-range", edits((("components", "unet", "io", "ranges", "frames"), [1, 1, 1])),
     "components.unet.io.ranges", ["frames"]),
    ("postprocess-unknown", edits((("postprocess", "images"), "x * 0")),
     "postprocess.images", ["clamp(x / 2 + 0.5, 0, 1)", "'x * 0'"]),
    ("postprocess-unknown-output", edits((("postprocess",), {"masks": "clamp(x / 2 + 0.5, 0, 1)"})),
     "postprocess", ["masks"]),
    ("max_size-huge", edits((("shape_ranges", "max_size"), 2**40)),
     "shape_ranges.max_size", ["16384"]),
    ("max_batch-huge", edits((("shape_ranges", "max_batch"), 10**6)),
     "shape_ranges.max_batch", ["1024"]),
    ("component-dtype-not-the-precision", edits((("components", "unet", "dtype"), "float16")),
     "components.unet.dtype", ["float32", "float16"]),
    ("unknown-component", lambda d: d["components"].update(
        refiner={**copy.deepcopy(d["components"]["unet"]), "file": "refiner.onnx",
                 "sha256": {"refiner.onnx": "0" * 64}}),
     "components", ["refiner", "text_encoder"]),
    ("parity-negative", edits((("components", "unet", "parity"), parity(tolerance=-1))),
     "components.unet.parity.tolerance", ["finite number >= 0"]),
]


@pytest.mark.parametrize("edit, where, fragments", [c[1:] for c in PARSE_LIES],
                         ids=[c[0] for c in PARSE_LIES])
def test_a_lying_manifest_is_refused_at_parse_by_field(bundle, tmp_path, edit, where, fragments):
    lying = lying_copy(bundle, tmp_path, manifest=edit)
    with pytest.raises(BundleError) as info:
        load_manifest(lying)
    assert_names(str(info.value), f"bundle {lying}: manifest.json field {where}", "expected",
                 "found", *fragments)


def test_nan_parity_is_refused(bundle, tmp_path):
    lying = lying_copy(bundle, tmp_path, manifest=edits(
        (("components", "unet", "parity"), parity(rel_l2=float("nan")))))   # json.dumps writes NaN
    with pytest.raises(BundleError, match="NaN"):
        load_manifest(lying)
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    data["components"]["unet"]["parity"] = parity(rel_l2=float("nan"))
    with pytest.raises(BundleError, match=r"field components\.unet\.parity\.rel_l2: expected a finite"):
        Manifest.from_dict(data)


@pytest.mark.parametrize("case", ["latent_scale-0", "output-name-swapped", "factor-in-config"])
def test_cli_refuses_a_parse_lie_with_exit_2(bundle, tmp_path, case):
    edit, where, _ = next(c[1:] for c in PARSE_LIES if c[0] == case)
    generate_refused(lying_copy(bundle, tmp_path, manifest=edit), tmp_path, f"field {where}")


def test_the_honest_copy_loads_and_generates(bundle, tmp_path):
    """Guards the cases above and below: they fail for their lie, not for the copy."""
    honest = lying_copy(bundle, tmp_path, manifest=lambda data: None, graphs={"vae_decoder": lambda m: None})
    result = Pipeline.load(honest).generate(GenerationRequest(prompt="a fox", steps=1, sampler="ddim"))
    assert result.images.shape == (1, 32, 32, 3)


# --- load: the graphs against the manifest -------------------------------------------------------

def rename_output(old: str, new: str):
    def edit(model):
        for node in model.graph.node:
            node.output[:] = [new if o == old else o for o in node.output]
        for value in model.graph.output:
            if value.name == old:
                value.name = new
    return edit


def output_as_float16(name: str):
    """The graph's output `name` becomes float16 (a Cast at the end)."""
    def edit(model):
        raw = f"{name}_fp32"
        rename_output(name, raw)(model)
        for value in model.graph.output:
            if value.name == raw:
                value.name = name
                value.type.tensor_type.elem_type = TensorProto.FLOAT16
        model.graph.node.append(helper.make_node("Cast", [raw], [name], to=TensorProto.FLOAT16))
    return edit


def input_as_float16(name: str):
    """The graph's input `name` becomes float16 (cast to float32 inside)."""
    def edit(model):
        inner = f"{name}_fp32"
        for node in model.graph.node:
            node.input[:] = [inner if i == name else i for i in node.input]
        for value in model.graph.input:
            if value.name == name:
                value.type.tensor_type.elem_type = TensorProto.FLOAT16
        model.graph.node.insert(0, helper.make_node("Cast", [name], [inner], to=TensorProto.FLOAT))
    return edit


def forget_dims(name: str):
    """The graph no longer states the symbolic dims of its input or output `name`."""
    def edit(model):
        for value in list(model.graph.input) + list(model.graph.output):
            if value.name == name:
                for dim in value.type.tensor_type.shape.dim:
                    if dim.HasField("dim_param"):
                        dim.Clear()
    return edit


def text_width(width: int):
    """config and every io entry agree on a text width the graphs do not have (tiny's is 32)."""
    return edits((("config", "conditioner", "hidden_size"), width),
                 (("config", "unet", "context_dim"), width),
                 (io("text_encoder", "outputs", 0, "shape", 2), width),
                 (io("unet", "inputs", 2, "shape", 2), width))


def vae_factor_8(data):
    """config and every io entry agree on a factor-8 autoencoder; the graphs are factor 4."""
    edits((("config", "autoencoder", "ch_mult"), FACTOR_8))(data)
    for name in ("unet", "vae_decoder", "vae_encoder", "denoise_step"):
        spec = data["components"][name]["io"]
        spec["ranges"]["latent_height"] = spec["ranges"]["latent_width"] = [4, 4, 8]
        for tensor in spec["inputs"] + spec["outputs"]:
            tensor["shape"] = [d.replace("4*", "8*") if isinstance(d, str) else d for d in tensor["shape"]]


LOAD_LIES = [  # (id, manifest edit, graph edits, fragments of the BundleError)
    ("output-renamed-in-graph", None, {"vae_decoder": rename_output("images", "pixels")},
     ["vae_decoder.onnx", "outputs", "'images'", "'pixels'"]),
    ("input-dtype-in-graph", None, {"unet": input_as_float16("sample")},
     ["unet.onnx", "sample", "dtype", "float32", "float16"]),
    ("output-dtype-in-graph", None, {"vae_decoder": output_as_float16("images")},
     ["vae_decoder.onnx", "images", "dtype", "float32", "float16"]),
    ("text-width", text_width(48), None,
     ["text_encoder.onnx", "text_embeddings", "axis 2", "48", "32"]),
    ("vae-factor", vae_factor_8, None,
     ["vae_decoder.onnx", "images", "axis 2", "'8*latent_height'",
      "'4*latent_height'"]),
]


@pytest.mark.parametrize("manifest, graphs, fragments", [c[1:] for c in LOAD_LIES],
                         ids=[c[0] for c in LOAD_LIES])
def test_a_graph_that_disagrees_with_the_manifest_is_refused_at_load(bundle, tmp_path, manifest,
                                                                      graphs, fragments):
    lying = lying_copy(bundle, tmp_path, manifest=manifest, graphs=graphs)
    load_manifest(lying)                         # the manifest alone is consistent
    components = ("vae_decoder",) if "vae_decoder.onnx" in fragments else None
    with pytest.raises(BundleError) as info:
        Pipeline.load(lying, components=components)
    assert_names(str(info.value), *fragments, "manifest declares", "the graph has", "re-export")
    generate_refused(lying, tmp_path, *fragments[:2])


def test_cached_sessions_are_checked_too(bundle, tmp_path):
    """A warm ORT cache (same graphs, so the same cache key) does not skip the check."""
    copy_of = lying_copy(bundle, tmp_path, manifest=lambda data: None)
    Pipeline.load(copy_of)                      # writes <bundle>/ort_cache
    assert any((copy_of / BUNDLE_CACHE_DIR).iterdir())
    text_width(48)(data := json.loads((copy_of / MANIFEST_NAME).read_text()))
    (copy_of / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"text_embeddings.*axis 2.*48.*32"):
        Pipeline.load(copy_of, components=("text_encoder",))


def test_an_output_the_graph_does_not_state_is_checked_when_it_runs(bundle, tmp_path):
    """Factor 8 in the manifest, factor 4 in a graph that names no output dims: the first decode
    is refused (never an image of the wrong size with exit 0)."""
    lying = lying_copy(bundle, tmp_path, manifest=vae_factor_8, graphs={
        "vae_decoder": forget_dims("images"), "vae_encoder": forget_dims("images")})
    pipeline = Pipeline.load(lying)
    with pytest.raises(BundleError) as info:
        pipeline.generate(GenerationRequest(prompt="a fox", steps=1, sampler="ddim"))
    assert_names(str(info.value), "vae_decoder", "images", "[1, 3, 32, 32]", "[1, 3, 16, 16]",
                 "re-export")
    generate_refused(lying, tmp_path, "vae_decoder", "images", "[1, 3, 32, 32]")


# --- TensorRT: the engine's tensors against the spec (fake engine) ------------------------------

class LyingEngine(FakeEngine):
    """FakeEngine with its tensors' names, dtypes and shapes replaced where asked."""

    def __init__(self, device, names=None, dtypes=None, shapes=None):
        super().__init__(device)
        self.original = {new: old for old, new in (names or {}).items()}
        self.names = [(names or {}).get(n, n) for n in self.names]
        self.dtypes, self.shape_of = dtypes or {}, shapes or {}

    def get_tensor_mode(self, name):
        return super().get_tensor_mode(self.original.get(name, name))

    def get_tensor_dtype(self, name):
        return self.dtypes.get(name, super().get_tensor_dtype(name))

    def get_tensor_profile_shape(self, name, index):
        return super().get_tensor_profile_shape(self.original.get(name, name), index)

    def get_tensor_shape(self, name):
        return self.shape_of.get(name, super().get_tensor_shape(self.original.get(name, name)))


def engine_for(spec: ComponentSpec, **lies) -> _ComponentEngine:
    device = FakeDevice()
    runner = TensorRTRunner(b"fake plan", fake_api(LyingEngine(device, **lies)), device=device,
                            name=spec.name)
    return _ComponentEngine(spec, runner)


def test_the_fake_engine_matches_its_spec():
    engine = engine_for(unet_spec())
    arrays = inputs()
    np.testing.assert_array_equal(engine(arrays), 2 * arrays["sample"] + arrays["timestep"][:, None, None, None])


HALF = DataType.HALF


@pytest.mark.parametrize("lies, fragments", [
    ({"names": {"model_output": "out"}}, ["outputs", "'model_output'", "'out'"]),
    ({"names": {"timestep": "t"}}, ["inputs", "'timestep'", "'t'"]),
    ({"dtypes": {"sample": HALF}}, ["sample", "dtype", "float32", "float16"]),
    ({"dtypes": {"model_output": HALF}}, ["model_output", "dtype", "float32", "float16"]),
    ({"shapes": {"sample": [-1, 3, -1, -1]}}, ["sample", "axis 1", "4", "3"]),
    ({"shapes": {"model_output": [-1, 4, -1]}}, ["model_output", "rank", "4", "3"]),
    ({"shapes": {"sample": [2, 4, -1, -1]}}, ["sample", "axis 0", "'batch'", "2"]),
], ids=["output-name", "input-name", "input-dtype", "output-dtype", "static-dim", "rank", "static-batch"])
def test_an_engine_that_disagrees_with_the_spec_is_refused_at_load(lies, fragments):
    with pytest.raises(BundleError) as info:
        engine_for(unet_spec(), **lies)
    assert_names(str(info.value), "unet", *fragments, "manifest declares", "the graph has")


def test_an_engine_output_of_another_size_is_refused_when_it_runs():
    """The spec says the output doubles the latent size; the engine returns the input's size."""
    spec = unet_spec()
    doubled = ("batch", 4, "2*latent_height", "2*latent_width")
    lying = ComponentSpec(spec.name, spec.inputs, (TensorSpec("model_output", "float32", doubled),),
                          spec.ranges)
    engine = engine_for(lying)                  # the engine states no output dims: passes load
    with pytest.raises(BundleError) as info:
        engine(inputs())
    assert_names(str(info.value), "unet.model_output", "[2, 4, 32, 32]", "[2, 4, 16, 16]", "re-export")


def test_a_static_engine_dim_serves_a_symbol_whose_range_is_one_value():
    """--static-batch style: batch pinned to its only value loads; one the range allows does not."""
    spec = unet_spec()
    pinned = ComponentSpec(spec.name, spec.inputs, spec.outputs, {**spec.ranges, "batch": (2, 2, 2)})
    shapes = {"sample": [2, 4, -1, -1], "timestep": [2], "model_output": [2, 4, -1, -1]}
    engine_for(pinned, shapes=shapes)
    with pytest.raises(BundleError, match=r"input sample axis 0: the manifest declares 'batch' \(batch 1\.\.4\)"):
        engine_for(spec, shapes=shapes)


@pytest.mark.parametrize("value", [0, -0.18, float("nan")])
def test_a_bad_config_scale_factor_is_blamed_on_the_config(value):
    """config.scale_factor 0 is the config's fault, not latent_scale's ("expected 0.0" is no value)."""
    from ldmrt.config import ConfigError, ModelConfig
    from ldmrt.presets import PRESETS

    data = PRESETS["tiny"].to_dict()
    data["scale_factor"] = value
    with pytest.raises(ConfigError, match="scale_factor"):
        ModelConfig.from_dict(data)
