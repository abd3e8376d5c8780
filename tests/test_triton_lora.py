"""`ldmrt triton --lora NAME=FILE[:SCALE]`: the pipeline model's adapters, selected per request.

References: the Pipeline API on the same bundle with the adapter set by `pipeline.loras.set`
(the same files, scales and backend), and the base pipeline for requests without `lora`. The
repository's own record (config.pbtxt's `loras`, the files, the ownership marker) is read back.
In-process with the stand-in pb_utils of tests/test_triton.py, and once on a real tritonserver.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from ldmrt.digest import sha256_file
from ldmrt.errors import BundleError, LoraError
from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
from ldmrt.lora.choice import LoraChoice
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
from ldmrt.triton.adapters import NamedAdapter
from ldmrt.triton.ownership import foreign_paths, read_marker
from ldmrt.triton.repository import FileMode, PipelineModelOptions, write_repository
from ldmrt.triton.server import TritonServer
from tests.test_lora import COMPONENTS, write_kohya
from tests.test_reliability_triton import _infer
from tests.test_triton import (CPU_OPTIONS, MAX_DIFF, _check, _Error, _request, client_generate,  # noqa: F401
                               load_pipeline_model, triton_env)

REQUEST = dict(prompt="a red fox", steps=3, seed=4, height=32, width=32)
SCALE_B = 0.7          # b's default scale in the repository


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny bundle whose graphs record their adaptable weights, and two random kohya files."""
    root = tmp_path_factory.mktemp("triton-lora")
    source = preset_source("tiny")
    files = {name: write_kohya(source.model, root / f"{name}.safetensors", seed) for name, seed in (("a", 3), ("b", 4))}
    export_bundle(source, root / "bundle", ExportOptions(components=COMPONENTS, validate=False))
    return root, root / "bundle", files


def _options(files: dict[str, Path], mode: FileMode = FileMode.HARDLINK, **scales: float):
    adapters = tuple(NamedAdapter(name, files[name], scales.get(name, 1.0)) for name in sorted(files))
    return replace(CPU_OPTIONS, files=mode, pipeline=replace(CPU_OPTIONS.pipeline, loras=adapters))


def _written(setup, name: str, mode: FileMode = FileMode.HARDLINK) -> tuple[Path, dict]:
    """A repository with adapters a (scale 1) and b (SCALE_B): its path and its `loras` parameter."""
    root, bundle, files = setup
    result = write_repository(bundle, root / name, _options(files, mode, b=SCALE_B))
    return result.path, json.loads(result.models[0].config.parameters["loras"])


@pytest.fixture(scope="module")
def repo(setup):
    return _written(setup, "repo")


# --- the repository ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [FileMode.HARDLINK, FileMode.COPY, FileMode.SYMLINK])
def test_the_repository_lists_the_adapters_and_holds_their_files(setup, mode):
    _, _, files = setup
    repo, listed = _written(setup, f"repo-{mode.value}", mode)
    assert listed == {"a": {"file": "a.safetensors", "scale": 1.0, "sha256": sha256_file(files["a"])},
                      "b": {"file": "b.safetensors", "scale": SCALE_B, "sha256": sha256_file(files["b"])}}
    text = (repo / "pipeline" / "config.pbtxt").read_text()
    assert 'key: "loras"' in text and 'name: "lora" data_type: TYPE_STRING dims: [ -1 ] optional: true' in text
    for name, source in files.items():
        held = repo / "pipeline" / "1" / "loras" / f"{name}.safetensors"
        assert not held.is_symlink() and held.read_bytes() == source.read_bytes()
        assert (held.stat().st_ino == source.stat().st_ino) == (mode == FileMode.HARDLINK)
    # ldmrt's own files: the marker lists them, so --force may replace the model folder
    pipeline = repo / "pipeline"
    assert {"1/loras/a.safetensors", "1/loras/b.safetensors"} <= set(read_marker(pipeline).contents)
    assert foreign_paths(pipeline) == []


def test_force_replaces_the_adapters_and_a_repository_without_them_lists_none(setup, tmp_path):
    root, bundle, files = setup
    out = tmp_path / "repo"
    write_repository(bundle, out, _options(files))
    result = write_repository(bundle, out, replace(_options({"b": files["b"]}), force=True))
    assert sorted(p.name for p in (out / "pipeline" / "1" / "loras").iterdir()) == ["b.safetensors"]
    assert list(json.loads(result.models[0].config.parameters["loras"])) == ["b"]
    plain = write_repository(bundle, tmp_path / "plain", CPU_OPTIONS)
    assert plain.models[0].config.parameters["loras"] == "{}"
    assert not (tmp_path / "plain" / "pipeline" / "1" / "loras").exists()


def _not_a_lora(tmp_path: Path) -> Path:
    path = tmp_path / "weights.safetensors"
    save_file({"model.diffusion_model.out.0.weight": np.ones((4,), np.float32)}, str(path))
    return path


@pytest.mark.parametrize("case, message", [
    ("no-name", "expected NAME=FILE[:SCALE]"),
    ("bad-name", "name 'a/b': expected 1 to 64 letters"),
    ("twice", "name 'a': given twice"),
    ("missing", "missing.safetensors"),
    ("pickle", "expected a .safetensors LoRA file"),
    ("not-a-lora", "model.diffusion_model.out.0.weight"),
    ("bad-scale", "scale nan: expected a finite number"),
])
def test_bad_lora_options_are_refused_naming_the_flag_before_anything_is_written(setup, tmp_path, case, message):
    from typer.testing import CliRunner

    from ldmrt.cli import app

    _, bundle, files = setup
    pickle = tmp_path / "a.ckpt"
    pickle.write_bytes(b"not read")
    values = {"no-name": [str(files["a"])], "bad-name": [f"a/b={files['a']}"],
              "twice": [f"a={files['a']}", f"a={files['b']}"], "missing": [f"a={tmp_path / 'missing.safetensors'}"],
              "pickle": [f"a={pickle}"], "not-a-lora": [f"a={_not_a_lora(tmp_path)}"],
              "bad-scale": [f"a={files['a']}:nan"]}[case]
    out = tmp_path / "repo"
    args = ["triton", str(bundle), "--out", str(out)] + [arg for value in values for arg in ("--lora", value)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--lora" in result.output and message in result.output, result.output
    assert not out.exists() and not list(tmp_path.glob(".repo*"))


def test_the_library_names_its_field(setup, tmp_path):
    _, bundle, files = setup
    for loras, message in (((NamedAdapter("a", files["a"]), NamedAdapter("a", files["b"])), "given twice"),
                           ("a=x.safetensors", "expected a tuple of NamedAdapter"),
                           ((LoraChoice(files["a"]),), "expected NamedAdapter items")):
        with pytest.raises(LoraError, match=message) as caught:
            PipelineModelOptions(loras=loras)
        assert caught.value.field == "loras" and str(caught.value).startswith("loras")
    with pytest.raises(LoraError, match="name 'a:b'") as caught:
        NamedAdapter("a:b", files["a"])
    assert caught.value.field == "loras"
    options = replace(CPU_OPTIONS, pipeline=PipelineModelOptions(
        instances=CPU_OPTIONS.pipeline.instances, loras=(NamedAdapter("w", _not_a_lora(tmp_path)),)))
    with pytest.raises(LoraError, match="weights.safetensors") as caught:
        write_repository(bundle, tmp_path / "repo", options)
    assert caught.value.field == "loras" and not (tmp_path / "repo").exists()


def test_the_cli_writes_the_adapters(setup, tmp_path):
    from typer.testing import CliRunner

    from ldmrt.cli import app

    _, bundle, files = setup
    out = tmp_path / "repo"
    result = CliRunner().invoke(app, ["triton", str(bundle), "--out", str(out), "--kind", "cpu", "--pipeline-kind",
                                      "cpu", "--lora", f"style.v2={files['a']}:0.25", "--lora", f"b={files['b']}"])
    assert result.exit_code == 0, result.output
    assert (out / "pipeline" / "1" / "loras" / "style.v2.safetensors").read_bytes() == files["a"].read_bytes()
    text = (out / "pipeline" / "config.pbtxt").read_text()
    assert '\\"style.v2\\": {\\"file\\": \\"style.v2.safetensors\\", \\"scale\\": 0.25' in text


# --- the pipeline model in-process -----------------------------------------------------------------

def _images(pipeline: Pipeline, choices: list[LoraChoice]) -> np.ndarray:
    pipeline.loras.set(choices)
    return pipeline.generate(GenerationRequest(**REQUEST)).images


@pytest.fixture(scope="module")
def expected(setup):
    """The Pipeline API's images with each adapter set, on the same bundle and backend."""
    _, bundle, files = setup
    pipeline = Pipeline.load(bundle, "onnxruntime")
    return {"base": _images(pipeline, []), "a": _images(pipeline, [LoraChoice(files["a"])]),
            "a:0.5": _images(pipeline, [LoraChoice(files["a"], 0.5)]),
            "b": _images(pipeline, [LoraChoice(files["b"], SCALE_B)]),
            "a+b": _images(pipeline, [LoraChoice(files["a"], -0.5), LoraChoice(files["b"], SCALE_B)])}


def _model(repo: Path, listed: dict, monkeypatch, name: str, **parameters: str):
    return load_pipeline_model(repo, monkeypatch, name, loras=json.dumps(listed), **parameters)


def test_each_request_runs_on_the_adapters_it_names(repo, expected, monkeypatch):
    model = _model(*repo, monkeypatch, "ldmrt_triton_lora_model")
    assert np.abs(expected["a"] - expected["base"]).max() > 0.05          # the adapter changes the image
    assert np.abs(expected["a"] - expected["a:0.5"]).max() > 0.02         # and its scale does
    # Base, adapters, base again, other adapters: each request on its own weights, in one batch.
    cases = [("base", {}), ("a", {"lora": ["a"]}), ("a:0.5", {"lora": ["a:0.5"]}), ("base", {"lora": []}),
             ("b", {"lora": ["b"]}), ("a+b", {"lora": ["b", " a:-0.5"]}), ("a", {"lora": ["a:1"]})]
    responses = model.execute([_request(**REQUEST, **lora) for _, lora in cases])
    for (key, lora), response in zip(cases, responses):
        assert response.error is None, (lora, response.error)
        np.testing.assert_allclose(response.output_tensors[0].as_numpy(), expected[key], rtol=0, atol=1e-5,
                                   err_msg=f"lora {lora}")


@pytest.mark.parametrize("lora, message", [
    (["c"], "lora element 0 'c': unknown adapter 'c'; this model may load ['a', 'b']"),
    (["a", "a:0.5"], "lora element 1 'a:0.5': adapter 'a' given twice"),
    (["a:lots"], "lora element 0 'a:lots': scale 'lots': expected a finite number"),
    (["a:inf"], "scale 'inf': expected a finite number"),
    (["A"], "unknown adapter 'A'"),
])
def test_a_bad_choice_is_invalid_arg_naming_lora_and_the_allowed_names(repo, expected, monkeypatch, lora, message):
    model = _model(*repo, monkeypatch, "ldmrt_triton_lora_bad")
    bad, good = model.execute([_request(**REQUEST, lora=lora), _request(**REQUEST, lora=["a"])])
    assert bad.error is not None and bad.error.code == _Error.INVALID_ARG and not bad.output_tensors
    assert message in bad.error and "['a', 'b']" in bad.error, bad.error
    np.testing.assert_allclose(good.output_tensors[0].as_numpy(), expected["a"], rtol=0, atol=1e-5)


def test_a_repository_without_adapters_refuses_any_lora(setup, expected, tmp_path, monkeypatch):
    _, bundle, _ = setup
    write_repository(bundle, tmp_path / "plain", CPU_OPTIONS)
    model = load_pipeline_model(tmp_path / "plain", monkeypatch, "ldmrt_triton_lora_none", loras="{}")
    refused, base = model.execute([_request(**REQUEST, lora=["a"]), _request(**REQUEST, lora=[])])
    assert refused.error.code == _Error.INVALID_ARG and "lora element 0 'a'" in refused.error
    assert "no adapters (its repository was written without ldmrt triton --lora)" in refused.error
    np.testing.assert_allclose(base.output_tensors[0].as_numpy(), expected["base"], rtol=0, atol=1e-5)


def test_a_missing_or_changed_adapter_file_fails_the_load(setup, tmp_path, monkeypatch):
    repo, listed = _written(setup, "repo-copied", FileMode.COPY)     # copies: the sources stay as they are
    held = repo / "pipeline" / "1" / "loras" / "b.safetensors"
    held.write_bytes(held.read_bytes()[:-1] + b" ")
    with pytest.raises(BundleError, match="adapter 'b': .*b.safetensors does not match the sha256"):
        _model(repo, listed, monkeypatch, "ldmrt_triton_lora_changed")
    _model(repo, listed, monkeypatch, "ldmrt_triton_lora_unverified", verify="false")   # as --no-verify
    held.unlink()
    with pytest.raises(BundleError, match="adapter 'b': .*b.safetensors is missing"):
        _model(repo, listed, monkeypatch, "ldmrt_triton_lora_missing")
    for bad, message in (({"a": {**listed["a"], "file": "../a.safetensors"}}, "a.file: expected a plain file name"),
                         ({"a": {**listed["a"], "scale": "1"}}, "a.scale: expected a finite number"),
                         ({"a:1": listed["a"]}, "expected an adapter name")):
        with pytest.raises(BundleError, match=message):
            _model(repo, bad, monkeypatch, "ldmrt_triton_lora_bad_record")


# --- with Triton's environment ---------------------------------------------------------------------

def test_the_repository_check_verifies_the_adapters(triton_env, setup):   # noqa: F811
    repo, _ = _written(setup, "repo-checked", FileMode.COPY)
    assert _check(triton_env, repo)["problems"] == []
    held = repo / "pipeline" / "1" / "loras" / "a.safetensors"
    held.write_bytes(held.read_bytes()[:-1] + b" ")
    (problem,) = _check(triton_env, repo)["problems"]
    assert problem.startswith("pipeline: ") and "adapter 'a'" in problem and "does not match the sha256" in problem



def test_triton_serves_requests_with_adapters(triton_env, repo, expected, tmp_path):   # noqa: F811
    path, _ = repo
    lora = dict(REQUEST, prompt=[REQUEST["prompt"]])
    requests = [{"protocol": "http", **lora, "lora": ["a:0.5"]}, {"protocol": "grpc", **lora, "lora": ["a"]},
                {"protocol": "http", **lora}]
    server = TritonServer(triton_env, path, tmp_path / "server", startup_timeout=120)
    try:
        server.start()
        client_generate(triton_env, server, requests, tmp_path / "images.npz", concurrency=2)
        code, answer = _infer(server, [{"name": "lora", "datatype": "BYTES", "shape": [1], "data": ["nope"]},
                                       {"name": "steps", "datatype": "INT32", "shape": [1], "data": [1]}])
        assert code == 400 and "lora element 0 'nope': unknown adapter 'nope'" in answer["error"], answer
        assert "['a', 'b']" in answer["error"]
    finally:
        server.stop()
    served = np.load(tmp_path / "images.npz")
    for i, key in enumerate(("a:0.5", "a", "base")):
        assert np.abs(served[f"images_{i}"] - expected[key]).max() <= MAX_DIFF, key
