"""`ldmrt triton`: a model repository from the tiny bundle, checked three ways.

1. Without Triton: the configs follow the I/O spec (hand-written expectations for the tiny
   model, fp16 and class-conditional specs, engine-pinned shapes); the repository's layout,
   links and engine selection; the pipeline model run in-process with a stand-in for Triton's
   `triton_python_backend_utils` gives the Pipeline API's images; the vendored runtime imports
   where torch cannot.
2. With the environment of scripts/triton_env.sh: every config.pbtxt parses with Triton's own
   model-config protobuf (tritonclient) and matches the manifest; tampered configs are caught.
3. End to end: a real tritonserver (PyTriton's, CPU) serves the pipeline; concurrent requests
   over HTTP and gRPC return the images of `ldmrt generate` with the same seed; a bad request
   gets an error and the server keeps serving; stopping leaves no process behind.

Parts 2 and 3 skip when the environment is missing (LDMRT_REQUIRE_TRITON=1 makes that a failure,
as CI sets it).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ldmrt.presets import PRESETS
from ldmrt.errors import BundleError, ConfigError
from ldmrt.iospec import Precision, ShapeRanges, component_specs
from ldmrt.manifest import load_manifest, write_manifest
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
from ldmrt.triton.config import (DynamicBatching, InstanceGroup, InstanceKind, TritonModelConfig,
                                 TritonTensor, component_tensors)
from ldmrt.triton.repository import (ComponentPlatform, FileMode, PipelineModelOptions,
                                     RepositoryOptions, write_repository)
from ldmrt.triton.server import TritonEnvironment, TritonServer, TritonServerError
from tests.modules import load_file

CPU = InstanceGroup(1, InstanceKind.CPU)
CPU_OPTIONS = RepositoryOptions(instances=CPU, pipeline=PipelineModelOptions(instances=CPU))
MAX_DIFF = 1 / 255   # the bar for "the same image"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source

    out = tmp_path_factory.mktemp("triton") / "tiny"
    # No ONNX Runtime parity run: test_export.py covers it.
    export_bundle(preset_source("tiny"), out, ExportOptions(validate=False))
    return out


@pytest.fixture(scope="module")
def repo(bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    write_repository(bundle, out, CPU_OPTIONS)
    return out


# --- configs from the spec (no Triton needed) --------------------------------------------------

def _tensors(spec, fixed=None):
    batched, inputs, outputs = component_tensors(spec, fixed or {})
    return batched, {t.name: (t.data_type, list(t.dims), t.reshape) for t in inputs + outputs}


def test_tiny_fp32_configs_follow_the_spec_by_hand():
    specs = component_specs(PRESETS["tiny"], ShapeRanges(min_size=32, opt_size=64, max_size=96,
                                                         max_batch=3), Precision.FP32)
    assert _tensors(specs["unet"]) == (True, {
        "sample": ("TYPE_FP32", [4, -1, -1], None),
        "timestep": ("TYPE_FP32", [1], ()),                     # [batch] -> dims [1], reshape []
        "encoder_hidden_states": ("TYPE_FP32", [77, 32], None),
        "model_output": ("TYPE_FP32", [4, -1, -1], None)})
    assert _tensors(specs["text_encoder"]) == (True, {
        "input_ids": ("TYPE_INT32", [77], None), "text_embeddings": ("TYPE_FP32", [77, 32], None)})
    assert _tensors(specs["vae_decoder"]) == (True, {
        "latent": ("TYPE_FP32", [4, -1, -1], None), "images": ("TYPE_FP32", [3, -1, -1], None)})
    assert _tensors(specs["vae_encoder"])[1]["latent_dist"] == ("TYPE_FP32", [8, -1, -1], None)
    assert specs["unet"].ranges["batch"][2] == 6                 # CFG doubles the 3 images


def test_fp16_and_class_conditional_dtypes():
    fp16 = component_specs(PRESETS["tiny"], ShapeRanges(min_size=32, opt_size=64, max_size=96),
                           Precision.FP16)
    _, unet = _tensors(fp16["unet"])
    assert unet["sample"][0] == unet["model_output"][0] == "TYPE_FP16"
    assert unet["timestep"][0] == "TYPE_FP32"                    # timesteps stay fp32 by spec
    assert _tensors(fp16["text_encoder"])[1]["input_ids"][0] == "TYPE_INT32"
    config = PRESETS["ldm-class"]
    specs = component_specs(config, ShapeRanges.for_model(config), Precision.FP32)
    _, unet = _tensors(specs["unet"])
    assert unet["class_labels"] == ("TYPE_INT32", [1], ())


def test_symbols_an_engine_pins_become_fixed_dims():
    specs = component_specs(PRESETS["tiny"], ShapeRanges(min_size=32, opt_size=64, max_size=96),
                            Precision.FP32)
    batched, unet = _tensors(specs["unet"], {"latent_height": 8, "latent_width": 12})
    assert batched and unet["sample"][1] == [4, 8, 12]
    batched, vae = _tensors(specs["vae_decoder"], {"batch": 2, "latent_height": 8, "latent_width": 8})
    assert not batched                                           # a pinned batch is part of dims
    assert vae["latent"][1] == [2, 4, 8, 8] and vae["images"][1] == [2, 3, 32, 32]   # tiny: f = 4


def test_pbtxt_text_and_invalid_configs():
    tensor = TritonTensor("x", "TYPE_FP32", (1,), reshape=())
    config = TritonModelConfig(name='a"b', platform="onnxruntime_onnx", inputs=(tensor,), outputs=(tensor,),
                               max_batch_size=4, dynamic_batching=DynamicBatching(True, 50, (2, 4)),
                               parameters={"k": "line\nbreak"})
    text = config.to_pbtxt()
    assert 'name: "a\\"b"' in text and "reshape: { shape: [ ] }" in text
    assert "preferred_batch_size: [ 2, 4 ]" in text and "max_queue_delay_microseconds: 50" in text
    assert 'string_value: "line\\nbreak"' in text
    with pytest.raises(ConfigError, match="dynamic batching needs a batched model"):
        replace(config, max_batch_size=0)
    with pytest.raises(ConfigError, match="preferred batch size 4 exceeds max_batch_size 2"):
        replace(config, max_batch_size=2)
    with pytest.raises(ConfigError, match="exactly one of platform and backend"):
        replace(config, backend="python")
    with pytest.raises(ConfigError, match="instance count"):
        InstanceGroup(0)
    with pytest.raises(ConfigError, match="needs instance kind gpu"):
        InstanceGroup(1, InstanceKind.CPU, (0,))
    with pytest.raises(ConfigError, match="pipeline_backend"):
        PipelineModelOptions(backend="torch")
    with pytest.raises(ConfigError, match="prefix"):
        RepositoryOptions(prefix="a/b")


# --- the repository on disk ----------------------------------------------------------------------

def served(manifest) -> dict:
    """The components that become Triton models: all but the update graph (the pipeline model runs
    the numpy loop)."""
    return {name: entry for name, entry in manifest.components.items() if name != "denoise_step"}


def test_repository_layout_and_hard_links(bundle, repo):
    manifest = load_manifest(bundle)
    assert "denoise_step" in manifest.components
    assert sorted(p.name for p in repo.iterdir()) == sorted([*served(manifest), "pipeline"])
    pipeline = repo / "pipeline" / "1"
    assert (pipeline / "model.py").is_file() and (pipeline / "bundle" / "manifest.json").is_file()
    assert load_manifest(pipeline / "bundle").components.keys() == manifest.components.keys()
    for name, entry in served(manifest).items():
        graph = repo / name / "1" / entry.file
        # One inode for the bundle's graph, the pipeline's copy and the component model's file.
        assert graph.stat().st_ino == (bundle / entry.file).stat().st_ino
        assert graph.stat().st_ino == (pipeline / "bundle" / entry.file).stat().st_ino
        text = (repo / name / "config.pbtxt").read_text()
        assert 'platform: "onnxruntime_onnx"' in text and f'default_model_filename: "{entry.file}"' in text
        assert "kind: KIND_CPU" in text
    vendored = sorted(p.relative_to(pipeline).as_posix() for p in (pipeline / "ldmrt").rglob("*.py"))
    assert "ldmrt/runtime/pipeline.py" in vendored and "ldmrt/engines/onnxruntime.py" in vendored
    assert "ldmrt/triton/pipeline_io.py" in vendored          # model.py reads its request by it
    assert not any(name.startswith(("ldmrt/models", "ldmrt/export", "ldmrt/engines/torch", "ldmrt/cli"))
                   for name in vendored)


def test_existing_output_is_refused_then_replaced_with_force(bundle, tmp_path):
    out = tmp_path / "repo"
    write_repository(bundle, out, CPU_OPTIONS)
    (out / "stale-marker").write_text("old")
    with pytest.raises(ConfigError, match="already exist; pass --force"):
        write_repository(bundle, out, CPU_OPTIONS)
    write_repository(bundle, out, replace(CPU_OPTIONS, force=True, prefix="tiny_"))
    # A shared repository: a file ldmrt did not write stays (issue 14 row 1).
    assert (out / "stale-marker").read_text() == "old" and (out / "tiny_pipeline" / "config.pbtxt").is_file()
    assert 'name: "tiny_unet"' in (out / "tiny_unet" / "config.pbtxt").read_text()
    assert not list(tmp_path.glob(".repo.*"))                     # no temporary folder left


@pytest.mark.parametrize("mode", [FileMode.COPY, FileMode.SYMLINK])
def test_copy_and_symlink_modes(bundle, tmp_path, mode):
    out = tmp_path / "repo"
    write_repository(bundle, out, replace(CPU_OPTIONS, files=mode))
    graph = out / "unet" / "1" / "unet.onnx"
    assert graph.read_bytes() == (bundle / "unet.onnx").read_bytes()
    if mode == FileMode.COPY:
        assert graph.stat().st_ino != (bundle / "unet.onnx").stat().st_ino
    else:   # in-repository links are relative, so a mounted repository still resolves them
        assert graph.is_symlink() and not os.readlink(graph).startswith("/")
        link = out / "pipeline" / "1" / "bundle"
        assert link.is_symlink() and link.resolve() == bundle.resolve()
    # What a pipeline instance loads, with the sha256 check, and what a component model reads.
    assert Pipeline.load(out / "pipeline" / "1" / "bundle", verify=True).manifest.name == "tiny"
    assert graph.resolve().read_bytes() == (bundle / "unet.onnx").read_bytes()


def test_a_corrupt_bundle_is_refused(bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    with open(broken / "unet.onnx", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(BundleError, match="unet"):
        write_repository(broken, tmp_path / "repo", CPU_OPTIONS)
    assert not (tmp_path / "repo").exists()


def _with_engines(bundle: Path, out: Path, engines: list[dict]) -> Path:
    """A copy of the bundle whose manifest lists fake UNet engines (oldest first): each dict has
    a key and optionally builder, targets, pick (narrower profile ranges) and onnx (its sha256)."""
    from ldmrt.digest import sha256_file as file_sha256
    from ldmrt.engine_record import EngineRecord

    shutil.copytree(bundle, out)
    manifest = load_manifest(out)
    entry = manifest.component("unet")
    records = []
    for engine in engines:
        key = engine["key"]
        plan = out / "engines" / key / "unet.plan"
        plan.parent.mkdir(parents=True)
        plan.write_bytes(f"fake plan {key}".encode() * 50)
        record = EngineRecord(component="unet", file="unet.plan", sha256=file_sha256(plan),
                              size=plan.stat().st_size, builder=engine.get("builder", "tensorrt"),
                              builder_version="10.13.0", targets=engine.get("targets", ("sm90",)),
                              precision="fp32", profiles=(entry.spec.profile(engine.get("pick")),),
                              onnx_sha256=engine.get("onnx", entry.sha256["unet.onnx"]),
                              build_seconds=1.0, created="2026-01-01T00:00:00Z", key=key)
        records.append(record)
        if engine.get("corrupt"):   # same size, other bytes
            plan.write_bytes(plan.read_bytes()[::-1])
    write_manifest(out, replace(manifest, engines=tuple(records)))
    return out


STATIC = {"batch": (2, 2, 2), "latent_height": (8, 8, 8), "latent_width": (8, 8, 8)}
MIXED_ENGINES = [
    {"key": "unet-static", "targets": ("sm80",), "pick": STATIC},     # another shape signature
    {"key": "unet-old-sm90"},                                         # shadowed by the newer sm90
    {"key": "unet-ampere", "targets": ("ampere+",), "pick": {"batch": (1, 2, 4)}},
    {"key": "unet-sm90"},
    {"key": "unet-rtx", "builder": "tensorrt-rtx", "targets": ("sm89",)},
    {"key": "unet-stale", "targets": ("sm86",), "onnx": "b" * 64},
    {"key": "unet-corrupt", "targets": ("sm75",), "corrupt": True},
]


def test_tensorrt_engines_become_per_compute_capability_plans(bundle, tmp_path):
    with_engines = _with_engines(bundle, tmp_path / "bundle", MIXED_ENGINES)
    options = replace(CPU_OPTIONS, instances=InstanceGroup(2, InstanceKind.GPU, (0, 1)))
    result = write_repository(with_engines, tmp_path / "repo", options)
    unet = next(m for m in result.models if m.config.name == "unet").config
    assert unet.platform == "tensorrt_plan"
    assert dict(unet.cc_model_filenames) == {"9.0": "unet.sm90.plan"}
    assert unet.default_model_filename == "unet.ampere_plus.plan"    # ampere+: any GPU from sm80
    # The newest sm90 engine wins; the plan files are the engines' files.
    for file, key in (("unet.sm90.plan", "unet-sm90"), ("unet.ampere_plus.plan", "unet-ampere")):
        assert ((tmp_path / "repo" / "unet" / "1" / file).read_bytes()
                == (with_engines / "engines" / key / "unet.plan").read_bytes())
    assert sorted(p.name for p in (tmp_path / "repo" / "unet" / "1").iterdir()) == [
        "unet.ampere_plus.plan", "unet.sm90.plan"]
    # Batched up to what every kept engine accepts (the ampere+ one: 4), dims as the spec says.
    assert unet.max_batch_size == 4 and unet.dynamic_batching is not None
    assert [list(t.dims) for t in unet.inputs] == [[4, -1, -1], [1], [77, 32]]
    text = (tmp_path / "repo" / "unet" / "config.pbtxt").read_text()
    assert "kind: KIND_GPU gpus: [ 0, 1 ]" in text and "count: 2" in text
    notes = "\n".join(result.notes)
    assert "unet-rtx is a tensorrt-rtx engine" in notes and "unet-stale was built from another ONNX" in notes
    assert "engine unet-static left out" in notes and "TensorRT 10.13.0" in notes
    assert "unet-corrupt: plan" in notes and "does not match the sha256" in notes
    others = [m.config for m in result.models if m.config.name in ("text_encoder", "vae_decoder")]
    assert all(c.platform == "onnxruntime_onnx" for c in others)
    with pytest.raises(ConfigError, match="TensorRT engines run on GPUs only"):
        write_repository(with_engines, tmp_path / "cpu", CPU_OPTIONS)
    forced = write_repository(with_engines, tmp_path / "ort",
                              replace(CPU_OPTIONS, platform=ComponentPlatform.ONNXRUNTIME))
    assert all(m.config.platform in (None, "onnxruntime_onnx") for m in forced.models)


def test_a_static_engine_gives_an_unbatched_model_with_full_shapes(bundle, tmp_path):
    with_engines = _with_engines(bundle, tmp_path / "bundle", [
        {"key": "unet-static", "targets": ("ampere+",), "pick": STATIC}])
    result = write_repository(with_engines, tmp_path / "repo",
                              replace(CPU_OPTIONS, instances=InstanceGroup(1, InstanceKind.AUTO)))
    unet = next(m for m in result.models if m.config.name == "unet").config
    assert unet.max_batch_size == 0 and unet.dynamic_batching is None
    assert [list(t.dims) for t in unet.inputs] == [[2, 4, 8, 8], [2], [2, 77, 32]]
    assert [list(t.dims) for t in unet.outputs] == [[2, 4, 8, 8]]
    assert not unet.cc_model_filenames and unet.default_model_filename == "unet.ampere_plus.plan"


def test_cli_writes_a_repository_and_rejects_bad_options(bundle, tmp_path):
    from typer.testing import CliRunner

    from ldmrt.cli import app

    runner = CliRunner()
    out = tmp_path / "repo"
    result = runner.invoke(app, ["triton", str(bundle), "--out", str(out), "--kind", "cpu",
                                 "--pipeline-kind", "cpu", "--pipeline-instances", "2", "--threads", "1",
                                 "--preferred-batch-size", "2", "--max-queue-delay-us", "500"])
    assert result.exit_code == 0, result.output
    assert "count: 2 kind: KIND_CPU" in (out / "pipeline" / "config.pbtxt").read_text()
    unet = (out / "unet" / "config.pbtxt").read_text()
    assert "preferred_batch_size: [ 2 ]" in unet and "max_queue_delay_microseconds: 500" in unet
    for args, message in ((["--kind", "bogus"], "--kind 'bogus'"),
                          (["--files", "move"], "--files 'move'"),
                          (["--platform", "tensorrt"], "no usable TensorRT engine"),
                          (["--preferred-batch-size", "99"], "exceeds max_batch_size")):
        result = runner.invoke(app, ["triton", str(bundle), "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(app, ["triton", str(bundle), "--out", str(out)])
    assert result.exit_code == 2 and "already exist" in result.output


# --- the pipeline model in-process, with a stand-in for Triton's pb_utils -----------------------

class _Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _Error(str):
    """pb_utils.TritonError: a message and a code (the codes as in Triton's Python backend)."""
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __new__(cls, message, code=0):
        error = super().__new__(cls, message)
        error.code = code
        return error


class _Response:
    def __init__(self, output_tensors=(), error=None):
        self.output_tensors, self.error = list(output_tensors), error


def _fake_pb_utils() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = _Tensor
    module.InferenceResponse = _Response
    module.TritonError = _Error
    module.get_input_tensor_by_name = lambda request, name: request.get(name)
    module.Logger = types.SimpleNamespace(log_info=lambda m: None, log_warn=lambda m: None,
                                          log_error=lambda m: None)
    return module


def load_pipeline_model(repo: Path, monkeypatch, name: str, **parameters: str):
    """REPO's pipeline model.py, initialized in this process with the stand-in pb_utils. model.py
    puts its vendored runtime first on sys.path: restored after the test, or every process spawned
    later (bench contenders) would import that copy, which has no torch backend."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    model = load_file(repo / "pipeline" / "1" / "model.py", name).TritonPythonModel()
    values = {"backend": "onnxruntime", "bundle": "bundle", "verify": "true", **parameters}
    config = {"name": "pipeline", "parameters": {k: {"string_value": v} for k, v in values.items()}}
    model.initialize({"model_config": json.dumps(config), "model_instance_kind": "CPU",
                      "model_instance_device_id": "0", "model_instance_name": "pipeline_0"})
    return model


def _request(**inputs) -> dict:
    """Request tensors of the client's data types: a list or an array as it is, else one element."""
    from ldmrt.triton.client import INPUTS

    out = {}
    for name, value in inputs.items():
        dtype = INPUTS[name][1]
        values = value if isinstance(value, (list, np.ndarray)) else [value]
        if dtype is np.object_:
            values = [v.encode() for v in values]
        out[name] = _Tensor(name, np.array(values, dtype=dtype))
    return out


def test_pipeline_model_in_process_matches_the_pipeline_api(bundle, repo, monkeypatch):
    model = load_pipeline_model(repo, monkeypatch, "ldmrt_triton_model_under_test")
    requests = [_request(prompt=["a red fox", "a blue bird"], negative_prompt="blurry", steps=3,
                         seed=5, sampler="euler", guidance=6.0, height=64, width=96),
                _request(sampler="no-such-sampler"),
                _request(prompt="x", steps=2)]
    good, bad, default = model.execute(requests)
    reference = Pipeline.load(bundle)
    expected = reference.generate(GenerationRequest(
        prompt=["a red fox", "a blue bird"], negative_prompt="blurry", steps=3, seed=5, sampler="euler",
        guidance=6.0, height=64, width=96, batch=2))
    images, latents, warnings = good.output_tensors
    assert images.name() == "images" and images.as_numpy().shape == (2, 64, 96, 3)
    assert latents.name() == "latents" and latents.as_numpy().shape == expected.latents.shape
    assert warnings.name() == "warnings" and warnings.as_numpy().shape == (0,)
    assert np.abs(images.as_numpy() - expected.images).max() <= MAX_DIFF
    np.testing.assert_allclose(latents.as_numpy(), expected.latents, rtol=0, atol=1e-5)
    assert bad.error is not None and "no-such-sampler" in bad.error and not bad.output_tensors
    expected = reference.generate(GenerationRequest(prompt="x", steps=2)).images
    assert np.abs(default.output_tensors[0].as_numpy() - expected).max() <= MAX_DIFF
    (steps_twice,) = model.execute([_request(steps=[2, 3])])
    assert "steps: expected one element" in steps_twice.error


def test_vendored_runtime_imports_without_torch(repo):
    pipeline = repo / "pipeline" / "1"
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]);"
            "import ldmrt.runtime.pipeline, ldmrt.engines.onnxruntime, ldmrt.engines.tensorrt;"
            "import ldmrt.triton.pipeline_io;"
            "from ldmrt.runtime.pipeline import Pipeline; p = Pipeline.load(sys.argv[1] + '/bundle');"
            "assert ldmrt.__file__.startswith(sys.argv[1]), ldmrt.__file__;"
            "assert 'torch' not in {m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code, str(pipeline)], cwd=pipeline,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr


def test_an_environment_of_another_interpreter_is_refused(tmp_path):
    (tmp_path / "pyvenv.cfg").write_text("home = /root/.pyenv/versions/3.11.7/bin\nversion = 3.11.7\n")
    with pytest.raises(TritonServerError, match="not the system's /usr/bin python"):
        TritonEnvironment.locate(tmp_path)
    (tmp_path / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.11.2\n")
    with pytest.raises(TritonServerError, match="tritonserver is missing|python is missing"):
        TritonEnvironment.locate(tmp_path)


# --- with Triton's environment ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def triton_env() -> TritonEnvironment:
    try:
        return TritonEnvironment.locate()
    except TritonServerError as exc:
        if os.environ.get("LDMRT_REQUIRE_TRITON") == "1":
            pytest.fail(f"LDMRT_REQUIRE_TRITON=1 but {exc}")
        pytest.skip(f"no Triton environment: {exc}")


def _check(env: TritonEnvironment, repo: Path) -> dict:
    result = env.run_module("ldmrt.triton.check", [str(repo)], timeout=120)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def test_every_config_parses_with_tritons_protobuf_and_matches_the_manifest(triton_env, bundle, repo, tmp_path):
    report = _check(triton_env, repo)
    assert report["problems"] == []
    manifest = load_manifest(bundle)
    for name, entry in served(manifest).items():   # what protobuf parsed, against the manifest
        parsed = report["models"][name]
        assert [t[0] for t in parsed["inputs"]] == [t.name for t in entry.spec.inputs]
        assert [t[0] for t in parsed["outputs"]] == [t.name for t in entry.spec.outputs]
        assert parsed["max_batch_size"] == entry.spec.ranges["batch"][2]
    assert report["models"]["unet"]["inputs"][0] == ["sample", "TYPE_FP32", [4, -1, -1]]
    for name, engines in (("mixed", MIXED_ENGINES), ("static", [
            {"key": "unet-static", "targets": ("sm80",), "pick": STATIC}])):
        with_engines = _with_engines(bundle, tmp_path / name, engines)
        written = write_repository(with_engines, tmp_path / f"{name}-repo", replace(
            CPU_OPTIONS, instances=InstanceGroup(1, InstanceKind.GPU)))
        report = _check(triton_env, written.path)
        assert report["problems"] == [] and report["models"]["unet"]["platform"] == "tensorrt_plan"


def test_the_check_catches_configs_that_disagree_with_the_manifest(triton_env, bundle, tmp_path):
    out = tmp_path / "repo"
    write_repository(bundle, out, CPU_OPTIONS)
    unet = out / "unet" / "config.pbtxt"
    text = unet.read_text()
    unet.write_text(text.replace('data_type: TYPE_FP32 dims: [ 4, -1, -1 ]',
                                 'data_type: TYPE_FP16 dims: [ 4, -1, -1 ]', 1))
    decoder = out / "vae_decoder" / "config.pbtxt"
    decoder.write_text(decoder.read_text().replace("dims: [ 3, -1, -1 ]", "dims: [ 4, -1, -1 ]"))
    encoder = out / "text_encoder" / "config.pbtxt"
    encoder.write_text(encoder.read_text().replace("max_batch_size: 8", "max_batch_sizes: 8"))
    (out / "vae_encoder" / "1" / "vae_encoder.onnx").unlink()
    problems = "\n".join(_check(triton_env, out)["problems"])
    assert "unet: input sample: data_type TYPE_FP16, manifest float32" in problems
    assert "vae_decoder: output images: axis 0" in problems
    assert "text_encoder/config.pbtxt: does not parse as Triton's ModelConfig" in problems
    assert "vae_encoder: model file 1/vae_encoder.onnx is missing" in problems



def client_generate(triton_env, server, requests: list[dict], out: Path, concurrency: int) -> None:
    """`ldmrt.triton.client generate` of `requests` against a started server, into `out` (.npz)."""
    path = out.with_suffix(".requests.json")
    path.write_text(json.dumps(requests))
    result = triton_env.run_module("ldmrt.triton.client", [
        "generate", "--http", server.http_url, "--grpc", server.grpc_url, "--concurrency", str(concurrency),
        "--requests", str(path), "--out", str(out)], timeout=300)
    assert result.returncode == 0, result.stderr + server.log_tail()

def test_triton_serves_the_pipeline_over_http_and_grpc(triton_env, bundle, tmp_path):
    """A real tritonserver on CPU: concurrent requests equal `ldmrt generate` with the same seed."""
    from typer.testing import CliRunner

    from ldmrt.cli import app

    repo = tmp_path / "repo"
    options = replace(CPU_OPTIONS, pipeline=PipelineModelOptions(instances=InstanceGroup(2, InstanceKind.CPU),
                                                                 threads=1))
    write_repository(bundle, repo, options)
    requests = [
        {"protocol": "http", "prompt": ["a red fox"], "steps": 4, "seed": 11},
        {"protocol": "grpc", "prompt": ["a red fox"], "steps": 4, "seed": 11},
        {"protocol": "grpc", "prompt": ["a cat", "a dog"], "negative_prompt": ["blurry"], "steps": 3,
         "seed": 7, "sampler": "euler-a", "guidance": 5.0, "height": 64, "width": 96},
        {"protocol": "http", "prompt": ["a house"], "steps": 3, "seed": 3, "sampler": "dpmpp-2m",
         "height": 96, "width": 64},
        {"protocol": "http", "prompt": ["a red fox"], "steps": 4, "seed": 12},
        {"protocol": "grpc", "steps": 2, "seed": 0},
    ]
    server = TritonServer(triton_env, repo, tmp_path / "server", startup_timeout=120)
    try:
        server.start()
        client_generate(triton_env, server, requests, tmp_path / "images.npz", concurrency=4)
        bad = triton_env.run_module("ldmrt.triton.client", [
            "load", "--url", server.grpc_url, "--protocol", "grpc", "--request",
            json.dumps({"sampler": "no-such-sampler", "steps": 1}), "--count", "1", "--warmup", "0"],
            timeout=120)
        assert bad.returncode == 1 and "no-such-sampler" in bad.stdout
        again = triton_env.run_module("ldmrt.triton.client", [
            "load", "--url", server.http_url, "--request", json.dumps({"steps": 1}), "--count", "2",
            "--warmup", "0"], timeout=120)
        assert again.returncode == 0 and json.loads(again.stdout)["requests"] == 2
        assert server.process.poll() is None
    finally:
        server.stop()
    assert server.group_members() == [], "tritonserver or a stub outlived stop()"
    served = np.load(tmp_path / "images.npz")

    # Request 0 against the `ldmrt generate` command itself; every request against the Pipeline API.
    cli = CliRunner().invoke(app, ["generate", str(bundle), "--prompt", "a red fox", "--steps", "4",
                                   "--seed", "11", "--out", str(tmp_path / "cli.npy")])
    assert cli.exit_code == 0, cli.output
    assert np.abs(served["images_0"] - np.load(tmp_path / "cli.npy")).max() <= MAX_DIFF
    pipeline = Pipeline.load(bundle)
    for i, request in enumerate(requests):
        fields = {k: v for k, v in request.items() if k != "protocol"}
        prompts = fields.pop("prompt", [""])
        negative = fields.pop("negative_prompt", [""])
        expected = pipeline.generate(GenerationRequest(
            prompt=prompts if len(prompts) > 1 else prompts[0], negative_prompt=negative[0],
            batch=len(prompts), **fields)).images
        assert served[f"images_{i}"].shape == expected.shape
        assert np.abs(served[f"images_{i}"] - expected).max() <= MAX_DIFF, f"request {i}"
    assert np.abs(served["images_0"] - served["images_1"]).max() <= MAX_DIFF       # HTTP == gRPC
    assert np.abs(served["images_0"] - served["images_4"]).max() > 0.01            # the seed matters


def test_force_never_deletes_a_folder_that_is_not_a_repository(bundle, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_text("keep me")
    with pytest.raises(ConfigError, match="not a Triton model repository"):
        write_repository(bundle, out, replace(CPU_OPTIONS, force=True))
    assert (out / "holiday.jpg").read_text() == "keep me" and not list(tmp_path.glob(".photos.*"))


def test_the_bundle_copy_leaves_out_the_onnxruntime_cache(bundle, tmp_path):
    cache = bundle / "ort_cache" / "unet-0123"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "graph.onnx").write_text("optimized for another CPU")
    try:
        result = write_repository(bundle, tmp_path / "repo", CPU_OPTIONS)
    finally:
        shutil.rmtree(bundle / "ort_cache")
    pipeline = result.models[0]
    assert pipeline.files and not any("ort_cache" in name for name in pipeline.files)
