"""`ldmrt triton` for SDXL: a repository from the tiny SDXL bundle (tests/families.py SDXL_FAMILY:
two text encoders, the second with the pooled projection, the UNet's text_embeds and size ids),
and its pipeline model against ldmrt's Pipeline called directly with the same request.

Without Triton: the models' configs by hand; the pipeline model in-process (test_triton.py's
stand-in for pb_utils) with size ids, SDXL's zero negatives, the base -> refiner hand-off and bad
values refused naming the input. With the environment of scripts/triton_env.sh: every config
parses with Triton's protobuf and matches the manifest, and a real tritonserver answers the same
requests over HTTP and gRPC (images absent, latents returned, with denoising_end).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
from ldmrt.triton.repository import PipelineModelOptions, RepositoryResult, write_repository
from ldmrt.triton.server import TritonServer
from tests.families import SDXL_FAMILY
from tests.test_triton import (CPU, CPU_OPTIONS, client_generate, MAX_DIFF, _check, _Error, _request, _Tensor,  # noqa: F401
                               load_pipeline_model, triton_env)

# SDXL_FAMILY by hand: CLIP widths 32 | 24 (context 56), pooled projection 16, 6 size ids
CONTEXT_1, CONTEXT_2, POOLED, TIME_IDS = 32, 24, 16, 6
SIZE = dict(height=32, width=48)           # pixels; latents 8 x 12 (f = 4)
SIZE_IDS = dict(original_size=[64, 96], crops_coords_top_left=[4, 8], target_size=[16, 24])
HAND_OFF = 0.6


@pytest.fixture(scope="module")
def sdxl_bundle(tmp_path_factory) -> Path:
    from ldmrt.export.bundle import ExportOptions, export_bundle
    from tests.families import model_source, shape_ranges

    out = tmp_path_factory.mktemp("triton-sdxl") / "bundle"
    # No ONNX Runtime parity run: test_export.py covers the SDXL family's graphs.
    export_bundle(model_source(SDXL_FAMILY), out, ExportOptions(
        shape_ranges=shape_ranges(SDXL_FAMILY), validate=False, optimize=False,
        components=("text_encoder", "text_encoder_2", "unet", "vae_decoder")))
    return out


@pytest.fixture(scope="module")
def written(sdxl_bundle, tmp_path_factory) -> RepositoryResult:
    return write_repository(sdxl_bundle, tmp_path_factory.mktemp("triton-sdxl") / "repo", CPU_OPTIONS)


@pytest.fixture(scope="module")
def reference(sdxl_bundle) -> Pipeline:
    return Pipeline.load(sdxl_bundle)


def generation_request(**fields) -> GenerationRequest:
    """What the pipeline model should make of _request(**fields): one image per prompt."""
    prompt = fields.get("prompt", "")
    return GenerationRequest(**fields, batch=len(prompt) if isinstance(prompt, list) else 1)


# --- the repository --------------------------------------------------------------------------------

def _io(config) -> tuple[dict, dict]:
    return ({t.name: (t.data_type, list(t.dims)) for t in config.inputs},
            {t.name: (t.data_type, list(t.dims)) for t in config.outputs})


def test_the_repository_has_both_text_encoders_and_the_unets_sdxl_inputs(written):
    assert (SDXL_FAMILY.conditioner.hidden_size, SDXL_FAMILY.conditioner_2.hidden_size,
            SDXL_FAMILY.conditioner_2.projection_dim, SDXL_FAMILY.unet.time_ids) == (
            CONTEXT_1, CONTEXT_2, POOLED, TIME_IDS)
    configs = {model.config.name: model.config for model in written.models}
    assert sorted(configs) == ["pipeline", "text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    ids = {"input_ids": ("TYPE_INT32", [77])}
    assert _io(configs["text_encoder"]) == (ids, {"text_embeddings": ("TYPE_FP32", [77, CONTEXT_1])})
    assert _io(configs["text_encoder_2"]) == (ids, {"text_embeddings": ("TYPE_FP32", [77, CONTEXT_2]),
                                                    "pooled": ("TYPE_FP32", [POOLED])})
    assert _io(configs["unet"]) == ({
        "sample": ("TYPE_FP32", [4, -1, -1]), "timestep": ("TYPE_FP32", [1]),
        "encoder_hidden_states": ("TYPE_FP32", [77, CONTEXT_1 + CONTEXT_2]),
        "text_embeds": ("TYPE_FP32", [POOLED]), "time_ids": ("TYPE_FP32", [TIME_IDS])},
        {"model_output": ("TYPE_FP32", [4, -1, -1])})
    inputs, outputs = _io(configs["pipeline"])
    assert {name: inputs[name] for name in (*SIZE_IDS, "denoising_end", "denoising_start", "init_latents")} == {
        "original_size": ("TYPE_INT32", [2]), "crops_coords_top_left": ("TYPE_INT32", [2]),
        "target_size": ("TYPE_INT32", [2]), "denoising_end": ("TYPE_FP32", [1]),
        "denoising_start": ("TYPE_FP32", [1]), "init_latents": ("TYPE_FP32", [-1, -1, -1, -1])}
    assert not {"aesthetic_score", "negative_aesthetic_score"} & set(inputs)     # the refiner's only
    assert all(t.optional for t in configs["pipeline"].inputs)
    assert outputs == {"images": ("TYPE_FP32", [-1, -1, -1, 3]), "latents": ("TYPE_FP32", [-1, -1, -1, -1]),
                       "warnings": ("TYPE_STRING", [-1])}
    # what went to disk
    repo = written.path
    assert 'name: "pooled" data_type: TYPE_FP32 dims: [ 16 ]' in (repo / "text_encoder_2" / "config.pbtxt").read_text()
    unet = (repo / "unet" / "config.pbtxt").read_text()
    assert 'name: "text_embeds" data_type: TYPE_FP32 dims: [ 16 ]' in unet
    assert 'name: "time_ids" data_type: TYPE_FP32 dims: [ 6 ]' in unet
    pipeline = (repo / "pipeline" / "config.pbtxt").read_text()
    assert 'name: "original_size" data_type: TYPE_INT32 dims: [ 2 ] optional: true' in pipeline
    assert 'name: "latents" data_type: TYPE_FP32 dims: [ -1, -1, -1, -1 ]' in pipeline


def test_each_model_declares_the_size_ids_it_takes():
    """The tiny SD-shaped preset: no size-id inputs (Triton refuses them before the model runs);
    the hand-off, which any model takes, is declared; the refiner takes the aesthetic scores and
    no target size."""
    from ldmrt.presets import PRESETS
    from ldmrt.triton.pipeline_io import request_tensors

    names = {tensor.name for tensor in request_tensors(PRESETS["tiny"])}
    assert not names & {*SIZE_IDS, "aesthetic_score", "negative_aesthetic_score"}
    assert {"denoising_end", "denoising_start", "init_latents"} <= names
    assert {tensor.name for tensor in request_tensors(SDXL_FAMILY)} - names == set(SIZE_IDS)
    assert {tensor.name for tensor in request_tensors(PRESETS["sdxl-refiner"])} - names == {
        "original_size", "crops_coords_top_left", "aesthetic_score", "negative_aesthetic_score"}


# --- the pipeline model in-process -------------------------------------------------------------------

def _outputs(response) -> dict[str, np.ndarray]:
    assert response.error is None, response.error
    return {tensor.name(): tensor.as_numpy() for tensor in response.output_tensors}


def test_size_ids_and_zero_negatives_give_the_pipelines_images(written, reference, monkeypatch):
    model = load_pipeline_model(written.path, monkeypatch, "ldmrt_triton_sdxl_under_test")
    cases = [dict(prompt="a red fox", steps=3, seed=3, guidance=5.0, **SIZE, **SIZE_IDS),
             dict(prompt="a red fox", steps=3, seed=3, guidance=5.0, **SIZE),      # default ids: the image's size
             dict(prompt=["a red fox", "a blue bird"], steps=3, seed=3, guidance=5.0, **SIZE),  # zero negatives
             dict(prompt="a red fox", negative_prompt="blurry", steps=3, seed=3, guidance=5.0, **SIZE,
                  crops_coords_top_left=[0, 12])]
    responses = model.execute([_request(**fields) for fields in cases])
    served = [_outputs(response) for response in responses]
    for fields, outputs in zip(cases, served):
        expected = reference.generate(generation_request(**fields))
        assert list(outputs) == ["images", "latents", "warnings"]
        assert outputs["images"].shape == expected.images.shape
        np.testing.assert_allclose(outputs["images"], expected.images, rtol=0, atol=1e-6)
        np.testing.assert_allclose(outputs["latents"], expected.latents, rtol=0, atol=1e-6)
    # The inputs matter: size ids and the negative prompt each change the image.
    assert np.abs(served[0]["images"] - served[1]["images"]).max() > 0.01
    assert np.abs(served[3]["images"] - served[1]["images"]).max() > 0.01


def test_a_hand_off_returns_latents_and_the_refiner_continues_them(written, reference, monkeypatch):
    model = load_pipeline_model(written.path, monkeypatch, "ldmrt_triton_sdxl_hand_off")
    common = dict(steps=4, seed=3, guidance=5.0, sampler="euler", **SIZE, **SIZE_IDS)
    base = dict(prompt="a blue bird", denoising_end=HAND_OFF, **common)
    (response,) = model.execute([_request(**base)])
    outputs = _outputs(response)
    expected = reference.generate(generation_request(**base))
    assert expected.images is None and list(outputs) == ["latents", "warnings"]      # no images
    np.testing.assert_allclose(outputs["latents"], expected.latents, rtol=0, atol=1e-6)
    # The refiner continues the bird's latents under another prompt: not what a plain run draws.
    refine = dict(prompt="a red fox", denoising_start=HAND_OFF, init_latents=outputs["latents"], **common)
    (response,) = model.execute([_request(**refine)])
    refined = _outputs(response)["images"]
    expected = reference.generate(generation_request(**refine)).images
    np.testing.assert_allclose(refined, expected, rtol=0, atol=1e-6)
    plain = reference.generate(generation_request(prompt="a red fox", **common)).images
    assert np.abs(refined - plain).max() > 0.01


BAD = [  # (the input named, the request's tensors)
    ("original_size", dict(original_size=[0, 64])),
    ("crops_coords_top_left", dict(crops_coords_top_left=[-1, 0])),
    ("target_size", dict(target_size=[16, 99999])),
    ("original_size", dict(original_size=[32, 48, 1])),           # (a real Triton refuses this shape first)
    ("aesthetic_score", dict(aesthetic_score=7.0)),               # the base takes no aesthetic score
    ("denoising_end", dict(denoising_end=1.5)),
    ("init_latents", dict(denoising_start=HAND_OFF)),             # nothing to continue
    ("init_latents", dict(denoising_start=HAND_OFF, init_latents=np.zeros((1, 4, 5, 5), np.float32))),
    ("init_latents", dict(init_latents=np.zeros((1, 4, 8, 12), np.float32))),   # without denoising_start
]


def test_bad_size_ids_and_hand_offs_are_refused_naming_the_input(written, monkeypatch):
    model = load_pipeline_model(written.path, monkeypatch, "ldmrt_triton_sdxl_bad")
    requests = [_request(steps=2, **SIZE, **fields) for _, fields in BAD]
    requests.append({**_request(steps=2), "target_size": _Tensor("target_size", np.array([16.5, 24], np.float32))})
    responses = model.execute(requests + [_request(steps=2, **SIZE, **SIZE_IDS)])
    for (name, _), response in zip(BAD + [("target_size", None)], responses):
        assert response.error is not None and response.error.code == _Error.INVALID_ARG, (name, response.error)
        assert response.error.startswith(name), response.error
        assert not response.output_tensors
    assert "this bundle's model (fam-sdxl) does not use it" in responses[4].error
    assert responses[-1].error is None                               # and the instance goes on serving


# --- with Triton's environment -----------------------------------------------------------------------

def test_every_sdxl_config_parses_with_tritons_protobuf_and_matches_the_manifest(triton_env, written):
    report = _check(triton_env, written.path)
    assert report["problems"] == []
    models = report["models"]
    assert [t[0] for t in models["text_encoder_2"]["outputs"]] == ["text_embeddings", "pooled"]
    assert models["unet"]["inputs"][3:] == [["text_embeds", "TYPE_FP32", [POOLED]],
                                            ["time_ids", "TYPE_FP32", [TIME_IDS]]]


def test_triton_serves_size_ids_and_a_hand_off(triton_env, sdxl_bundle, reference, tmp_path):
    """A real tritonserver (CPU): size ids over HTTP, the base of a hand-off over gRPC (latents, no
    images) and the refiner from latents sent as FP32 [1, 4, 8, 12]; a bad size id is a 400 naming it."""
    repo = tmp_path / "repo"
    write_repository(sdxl_bundle, repo, replace(CPU_OPTIONS, pipeline=PipelineModelOptions(instances=CPU, threads=1)))
    common = dict(prompt=["a red fox"], steps=4, seed=3, guidance=5.0, **SIZE, **SIZE_IDS)
    handed = reference.generate(generation_request(**common, denoising_end=HAND_OFF)).latents
    requests = [dict(common, protocol="http"),
                dict(common, protocol="grpc", denoising_end=HAND_OFF),
                dict(common, protocol="http", denoising_start=HAND_OFF, init_latents=handed.tolist())]
    server = TritonServer(triton_env, repo, tmp_path / "server", startup_timeout=120)
    try:
        server.start()
        client_generate(triton_env, server, requests, tmp_path / "served.npz", concurrency=3)
        bad = triton_env.run_module("ldmrt.triton.client", [
            "load", "--url", server.http_url, "--request", json.dumps({"steps": 1, "original_size": [0, 64]}),
            "--count", "1", "--warmup", "0"], timeout=120)
        assert bad.returncode == 1 and "original_size [0, 64]" in json.loads(bad.stdout)["first_error"], bad.stdout
    finally:
        server.stop()
    served = np.load(tmp_path / "served.npz")
    assert sorted(served.files) == ["images_0", "images_2", "latents_0", "latents_1", "latents_2"]
    full = reference.generate(generation_request(**common))
    assert np.abs(served["images_0"] - full.images).max() <= MAX_DIFF
    # one intra-op thread in the server: another summation order (latents ~10: 3e-5 apart seen)
    np.testing.assert_allclose(served["latents_1"], handed, rtol=0, atol=1e-4)
    refined = reference.generate(generation_request(**common, denoising_start=HAND_OFF, init_latents=handed))
    assert np.abs(served["images_2"] - refined.images).max() <= MAX_DIFF
