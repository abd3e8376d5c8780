"""ldmrt's LoRA against diffusers' own: the same tiny SD 1.x and SDXL pipelines, the same adapter
files (written as diffusers / PEFT and kohya write them, tests/lora_files.py), diffusers'
load_lora_weights + set_adapters + fuse_lora as the reference; weights rel L2 <= 1e-5 fp32, and
images end to end (ldmrt export --lora on ONNX Runtime vs diffusers' fused pipeline, same
latents) mean abs <= 1e-3."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ldmrt.checkpoints.loading import load_checkpoint
from ldmrt.checkpoints.source import checkpoint_source
from ldmrt.export.bundle import ExportOptions, export_bundle
from ldmrt.iospec import ShapeRanges
from ldmrt.lora.choice import LoraChoice
from ldmrt.lora.switch import WeightSwitch
from ldmrt.models.convert import clip_from_transformers, unet_from_diffusers
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
from tests import lora_files
from tests.lora_files import PeftLayout
from tests.reference import rel_l2

WEIGHT_TOL = 1e-5      # the bar: rel L2, fp32
IMAGE_TOL = 1e-3       # mean abs of images
SCALE = 0.75
E2E_SCALE = 2.0        # the tiny adapters' change must show in the images

# (name, writer, kwargs): every layout and alpha rule diffusers reads
FILES = {
    "peft-metadata-conv": (lora_files.write_peft_lora, dict(rank=4, alpha=8.0, conv=True)),
    "peft-script-keys": (lora_files.write_peft_lora, dict(rank=2, layout=PeftLayout(metadata=False,
                                                                                    training_script_keys=True))),
    "kohya-locon": (lora_files.write_kohya_lora, dict(rank=4, alpha=2.0, conv=True, conv_rank=2, conv_alpha=1.0)),
    "kohya-no-alpha": (lora_files.write_kohya_lora, dict(rank=3, alpha=None)),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {"sd1": lora_files.tiny_sd1_pipe(tmp_path_factory.mktemp("sd1")),
            "sdxl": lora_files.tiny_sdxl_pipe(tmp_path_factory.mktemp("sdxl"))}


def _ours_named(fused: dict, config) -> dict[str, torch.Tensor]:
    """diffusers' fused state dicts under ldmrt's LatentDiffusion names."""
    out = {f"model.diffusion_model.{k}": v for k, v in unet_from_diffusers(fused["unet"], config.unet).items()}
    prefixes = {"text_encoder": "cond_stage_model.", "text_encoder_2": "cond_stage_model_2."}
    for component, prefix in prefixes.items():
        if component in fused:
            out.update({prefix + k: v for k, v in clip_from_transformers(fused[component]).items()})
    return out


@pytest.mark.parametrize("name", list(FILES))
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_fused_weights_match_diffusers(tiny, kind, name, tmp_path):
    pipe, folder = tiny[kind].pipe, tiny[kind].folder
    writer, options = FILES[name]
    path = writer(pipe, tmp_path / f"{name}.safetensors", seed=7, **options)
    model = load_checkpoint(folder).model
    base = {k: v.clone() for k, v in model.state_dict().items()}
    WeightSwitch(model).set([LoraChoice(path, SCALE)])
    expected = _ours_named(lora_files.diffusers_fused(pipe, [(path, SCALE)]), model.config)
    ours = model.state_dict()
    changed = [k for k in expected if not torch.equal(expected[k], base[k])]
    assert len(changed) > 10, "the file changed nothing in diffusers"
    components = {k.split(".")[0] for k in changed}
    assert components == ({"model", "cond_stage_model"} | ({"cond_stage_model_2"} if kind == "sdxl" else set()))
    for key, value in expected.items():
        if key in changed:
            assert rel_l2(ours[key], value) <= WEIGHT_TOL, key
            assert rel_l2(ours[key] - base[key], value - base[key]) <= 1e-4, key     # the change itself
        else:
            assert torch.equal(ours[key], base[key]), key


def test_two_adapters_with_scales_match_diffusers(tiny, tmp_path):
    pipe, folder = tiny["sdxl"].pipe, tiny["sdxl"].folder
    a = lora_files.write_peft_lora(pipe, tmp_path / "a.safetensors", seed=1, rank=4, alpha=4.0)
    b = lora_files.write_kohya_lora(pipe, tmp_path / "b.safetensors", seed=2, conv=True)
    model = load_checkpoint(folder).model
    WeightSwitch(model).set([LoraChoice(a, 0.6), LoraChoice(b, -0.4)])
    expected = _ours_named(lora_files.diffusers_fused(pipe, [(a, 0.6), (b, -0.4)]), model.config)
    ours = model.state_dict()
    assert max(rel_l2(ours[k], v) for k, v in expected.items()) <= WEIGHT_TOL


def _diffusers_images(pipe, fused: dict, request: GenerationRequest) -> np.ndarray:
    shared = {id(p): p for n, p in pipe.components.items() if n not in fused and p is not None}
    reference = copy.deepcopy(pipe, memo=shared)
    for component, state in fused.items():
        getattr(reference, component).load_state_dict(state)
    reference.set_progress_bar_config(disable=True)
    for tokenizer in (reference.tokenizer, getattr(reference, "tokenizer_2", None)):
        if tokenizer is not None:
            tokenizer.model_max_length = 77        # the text encoders' length (the assets leave it unset)
    latents = torch.from_numpy(np.ascontiguousarray(request.latents))
    with torch.no_grad():
        return reference(prompt=request.prompt, negative_prompt=request.negative_prompt, height=request.height,
                         width=request.width, num_inference_steps=request.steps, guidance_scale=request.guidance,
                         latents=latents, output_type="np").images


def _bundle(tiny, kind: str, folder_out: Path, loras: tuple = ()) -> Pipeline:
    components = ("text_encoder", "unet", "vae_decoder") + (("text_encoder_2",) if kind == "sdxl" else ())
    export_bundle(checkpoint_source(tiny[kind].folder), folder_out, ExportOptions(
        components=components, loras=loras, validate=False, optimize=False,
        shape_ranges=ShapeRanges(min_size=16, opt_size=32, max_size=64, max_batch=1)))
    return Pipeline.load(folder_out, "onnxruntime", threads=1)


def _request(pipe) -> GenerationRequest:
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latents = np.random.default_rng(4).standard_normal((1, 4, 32 // factor, 48 // factor)).astype(np.float32)
    return GenerationRequest(prompt="a photograph of an astronaut", negative_prompt="blurry", steps=5,
                             guidance=5.0, height=32, width=48, latents=latents)


@pytest.mark.parametrize("kind, name", [("sd1", "kohya-locon"), ("sdxl", "peft-metadata-conv")])
def test_export_with_lora_matches_diffusers_images(tiny, kind, name, tmp_path):
    pipe = tiny[kind].pipe
    writer, options = FILES[name]
    path = writer(pipe, tmp_path / f"{name}.safetensors", seed=3, **options)
    ours = _bundle(tiny, kind, tmp_path / "bundle", (LoraChoice(path, E2E_SCALE),))
    request = _request(pipe)
    images = ours.generate(request).images
    expected = _diffusers_images(pipe, lora_files.diffusers_fused(pipe, [(path, E2E_SCALE)]), request)
    plain = _diffusers_images(pipe, lora_files.base_weights(pipe), request)
    assert float(np.abs(images - expected).mean()) <= IMAGE_TOL
    assert float(np.abs(plain - expected).mean()) > 10 * IMAGE_TOL, "the adapter must show in the image"


@pytest.mark.parametrize("kind, name", [("sd1", "peft-metadata-conv"), ("sdxl", "kohya-locon")])
def test_switching_at_run_time_matches_diffusers_images(tiny, kind, name, tmp_path):
    """ONNX Runtime, no re-export: the plain bundle switched to the adapter (both text encoders of
    SDXL too) gives diffusers' images with it fused, and switched back, diffusers' base images."""
    pipe = tiny[kind].pipe
    writer, options = FILES[name]
    path = writer(pipe, tmp_path / f"{name}.safetensors", seed=5, **options)
    ours = _bundle(tiny, kind, tmp_path / "plain")
    request = _request(pipe)
    ours.loras.set([LoraChoice(path, E2E_SCALE)])
    expected = _diffusers_images(pipe, lora_files.diffusers_fused(pipe, [(path, E2E_SCALE)]), request)
    assert float(np.abs(ours.generate(request).images - expected).mean()) <= IMAGE_TOL
    ours.loras.set([])
    plain = _diffusers_images(pipe, lora_files.base_weights(pipe), request)
    assert float(np.abs(ours.generate(request).images - plain).mean()) <= IMAGE_TOL
    assert float(np.abs(plain - expected).mean()) > 10 * IMAGE_TOL, "the adapter must show in the image"
