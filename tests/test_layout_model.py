"""The paper's layout-to-image model (issue 18; its trained proof: tests/test_builtin_layout.py): the preset
at full size against the published parameter counts, its YAML read as the preset, and generation
from a layout on ONNX Runtime against a loop written here: tokens by the paper's definition
(tests/test_layout_tokens.py), diffusers' UNet2DConditionModel, DDIM and VQModel."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from ldmrt.checkpoints.original import Detection
from ldmrt.checkpoints.yaml_config import config_from_yaml
from ldmrt.engines import trt_api
from ldmrt.errors import CheckpointError, GenerationError
from ldmrt.export.bundle import ExportOptions, ModelSource, export_bundle
from ldmrt.iospec import ShapeRanges
from ldmrt.models import LatentDiffusion, build_model
from ldmrt.models.convert import autoencoder_from_diffusers, unet_from_diffusers
from ldmrt.presets import preset
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
from tests.families import LAYOUT_FAMILY
from tests.test_concat_checkpoints import _VQ_STAGE
from tests.pipeline_reference import diffusers_scheduler
from tests.reference import diffusers_autoencoder, diffusers_unet, perturb_
from tests.test_layout_tokens import reference_tokens

LAYOUT_YAML = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0205
    timesteps: 1000
    first_stage_key: image
    cond_stage_key: coordinates_bbox
    image_size: 64
    channels: 3
    conditioning_key: crossattn
    cond_stage_trainable: true
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {image_size: 64, in_channels: 3, out_channels: 3, model_channels: 128, attention_resolutions: [8, 4, 2],
               num_res_blocks: 2, channel_mult: [1, 2, 3, 4], num_head_channels: 32, use_spatial_transformer: true,
               transformer_depth: 3, context_dim: 512}
""" + _VQ_STAGE.format(attn="") + """
    cond_stage_config:
      target: ldm.modules.encoders.modules.BERTEmbedder
      params: {n_embed: 512, n_layer: 16, vocab_size: 8192, max_seq_len: 92, use_tokenizer: false}
"""


def test_the_preset_has_the_published_parameter_counts():
    import diffusers

    with torch.device("meta"):
        model = LatentDiffusion(preset("ldm-layout"))
        reference = diffusers.UNet2DConditionModel(
            in_channels=3, out_channels=3, block_out_channels=(128, 256, 384, 512), layers_per_block=2,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), cross_attention_dim=512,
            attention_head_dim=(4, 8, 12, 16), transformer_layers_per_block=3)
    assert sum(p.numel() for p in model.unet.parameters()) == sum(p.numel() for p in reference.parameters())
    # CompVis' BERTEmbedder(n_embed 512, n_layer 16, vocab 8192, max_seq_len 92), built on the meta
    # device from ldm's x_transformer.py (docs/research/layout-and-guidance.md, section 1.2)
    assert sum(p.numel() for p in model.conditioner.parameters()) == 58_858_496


def test_the_published_yaml_reads_as_the_preset(tmp_path):
    import yaml

    path = tmp_path / "layout2img.yaml"
    path.write_text(LAYOUT_YAML)
    expected = preset("ldm-layout")
    config, _ = config_from_yaml(path, yaml.safe_load(LAYOUT_YAML), {}, Detection(expected.family, "bert",
                                                                                  expected.autoencoder.kind, ""),
                                 {}, "layout")
    assert (config.unet, config.autoencoder, config.conditioner, config.layout) == \
        (expected.unet, expected.autoencoder, expected.conditioner, expected.layout)
    assert config.layout.max_length == 92 and config.layout.grid == 90
    bad = LAYOUT_YAML.replace("cond_stage_key: coordinates_bbox", "cond_stage_key: caption")
    path.write_text(bad)
    with pytest.raises(CheckpointError, match="cond_stage_key 'caption'"):
        config_from_yaml(path, yaml.safe_load(bad), {}, Detection(expected.family, "bert", expected.autoencoder.kind,
                                                                  ""), {}, "layout")


def test_the_written_yaml_reads_back_with_its_class_count(tmp_path):
    """compvis_yaml writes the layout2img form plus taming's builder constants (data.params.train);
    the reader takes no_object_classes from there, and refuses splits that disagree."""
    import yaml

    from ldmrt.checkpoints.compvis_yaml import compvis_yaml

    released = preset("ldm-layout")
    model = dataclasses.replace(released, layout=dataclasses.replace(released.layout, n_classes=10))
    written = compvis_yaml(model)
    assert written["model"]["params"]["cond_stage_config"]["params"]["use_tokenizer"] is False
    path = tmp_path / "layout.yaml"
    detection = Detection(model.family, "bert", model.autoencoder.kind, "")
    config, _ = config_from_yaml(path, written, {}, detection, {}, "layout")
    assert (config.layout, config.conditioner, config.unet) == (model.layout, model.conditioner, model.unet)
    assert config.layout.n_classes == 10          # not the released model's 352
    builder = written["data"]["params"]["train"]["params"]
    disagreeing = {**written, "data": {"params": {"train": {"params": builder},
                                                  "validation": {"params": {**builder, "no_object_classes": 12}}}}}
    with pytest.raises(CheckpointError, match=r"disagree on no_object_classes \[10, 12\]"):
        config_from_yaml(path, disagreeing, {}, detection, {}, "layout")
    written["data"]["params"]["train"]["params"]["no_object_classes"] = "ten"
    with pytest.raises(CheckpointError, match="no_object_classes 'ten': expected a positive integer"):
        config_from_yaml(path, written, {}, detection, {}, "layout")
    yaml.safe_dump(written)                       # plain YAML types only


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    config = LAYOUT_FAMILY
    torch.manual_seed(0)
    unet = perturb_(diffusers_unet(config.unet), seed=0)
    vae = perturb_(diffusers_autoencoder(config.autoencoder), seed=1)
    ours = perturb_(build_model(config, seed=0), seed=2)         # the BERT conditioner stays ours
    ours.unet.load_state_dict(unet_from_diffusers(unet.state_dict(), config.unet), strict=True)
    ours.first_stage_model.load_state_dict(autoencoder_from_diffusers(vae.state_dict(), config.autoencoder),
                                           strict=True)
    ours.eval()
    bundle = export_bundle(ModelSource(model=ours, source="test:layout", random_weights=True),
                           tmp_path_factory.mktemp("layout") / "b",
                           ExportOptions(shape_ranges=ShapeRanges(min_size=16, opt_size=32, max_size=48, max_batch=2))).path
    return ours, unet, vae, bundle, Pipeline.load(bundle, threads=1)


LAYOUT = [{"class": 3, "box": [0.1, 0.2, 0.55, 0.9]}, {"class": "digit 7", "box": [0.5, 0.05, 0.95, 0.6]}]
OBJECTS = [(3, (0.1, 0.2, 0.55, 0.9)), (7, (0.5, 0.05, 0.95, 0.6))]


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_generation_from_a_layout_matches_the_loop_written_here(golden, guidance):
    ours, unet, vae, bundle, pipeline = golden
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((1, 3, 8, 12)).astype(np.float32)
    found = pipeline.generate(GenerationRequest(steps=5, sampler="ddim", guidance=guidance, latents=latents,
                                                layout=LAYOUT, height=32, width=48)).images
    layout = LAYOUT_FAMILY.layout
    tokens = torch.tensor([reference_tokens(OBJECTS, vocab=layout.vocab_size, max_objects=layout.max_objects)])
    empty = torch.tensor([reference_tokens([], vocab=layout.vocab_size, max_objects=layout.max_objects)])
    scheduler = diffusers_scheduler("ddim", LAYOUT_FAMILY.scheduler)
    scheduler.set_timesteps(5)
    z = torch.from_numpy(latents)
    with torch.no_grad():
        context, uncond = ours.conditioner(tokens), ours.conditioner(empty)
        for t in scheduler.timesteps:
            eps = unet(z, t, encoder_hidden_states=context).sample
            if guidance > 1:
                eps_u = unet(z, t, encoder_hidden_states=uncond).sample
                eps = eps_u + guidance * (eps - eps_u)
            z = scheduler.step(eps, t, z).prev_sample
        expected = ((vae.decode(z).sample.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert np.abs(found - expected).mean() <= 1e-3


@pytest.mark.parametrize("change, words", [
    (dict(layout=None), "it needs a layout"),
    (dict(prompt="a cat"), "it takes a layout, not prompts"),
    (dict(layout=[{"class": 11, "box": [0, 0, 1, 1]}]), "layout[0].class 11: expected a class id in [0, 10)"),
    (dict(layout=[[{"class": 1, "box": [0, 0, 1, 1]}]] * 3, batch=2), "3 layouts for 2 images"),
    (dict(layout=[[{"class": 1, "box": [0, 0, 1, 1]}], [{"class": 2, "box": [0.5, 0, 0.2, 1]}]], batch=2),
     "layout[1][0].box"),
    (dict(layout=[{"class": 1, "box": [0, 0, 1, 1]}] * 5), "5 objects, expected at most 4"),
])
def test_bad_layout_requests_are_refused_by_name(golden, change, words):
    pipeline = golden[-1]
    request = dataclasses.replace(GenerationRequest(steps=2, layout=LAYOUT), **change)
    with pytest.raises(GenerationError) as caught:
        pipeline.generate(request)
    assert words in str(caught.value), str(caught.value)


def test_per_image_layouts_and_the_manifest_record(golden):
    """Each image gets its own layout: image 1 of a batch is the single-image run of its layout."""
    pipeline, bundle = golden[-1], golden[3]
    second = [{"class": 0, "box": [0.0, 0.0, 0.5, 0.5]}]
    latents = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    both = pipeline.generate(GenerationRequest(steps=3, layout=[LAYOUT, second], batch=2, guidance=1.0,
                                               latents=latents)).images
    alone = pipeline.generate(GenerationRequest(steps=3, layout=second, guidance=1.0, latents=latents[1:])).images
    first = pipeline.generate(GenerationRequest(steps=3, layout=LAYOUT, guidance=1.0, latents=latents[1:])).images
    assert np.abs(both[1] - alone[0]).max() <= 1e-5
    assert np.abs(first[0] - alone[0]).mean() > 1e-3          # the layout changes the image
    record = json.loads((bundle / "manifest.json").read_text())["config"]["layout"]
    assert record["kind"] == "layout" and record["vocab_size"] == 200 and record["classes"][7] == "digit 7"
    assert not (bundle / "tokenizer").exists()


def test_cli_and_triton_take_a_layout_file_and_text(golden, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ldmrt.cli import app
    from ldmrt.triton.repository import PipelineModelOptions, RepositoryOptions, write_repository
    from tests.test_triton import CPU, _Tensor, load_pipeline_model

    pipeline, bundle = golden[-1], golden[3]
    (tmp_path / "boxes.json").write_text(json.dumps(LAYOUT))
    out = tmp_path / "out.npy"
    result = CliRunner().invoke(app, ["generate", str(bundle), "--layout", str(tmp_path / "boxes.json"),
                                      "--steps", "3", "--guidance", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = pipeline.generate(GenerationRequest(steps=3, guidance=1.0, layout=LAYOUT)).images
    assert np.abs(np.load(out) - expected).max() <= 1e-6
    for text, words in (("[{\"class\": 1,", "--layout"), ("{\"class\": 1}", "expected a JSON list")):
        (tmp_path / "bad.json").write_text(text)
        result = CliRunner().invoke(app, ["generate", str(bundle), "--layout", str(tmp_path / "bad.json"),
                                          "--out", str(tmp_path / "x.npy")])
        assert result.exit_code == 2 and words in result.output, result.output

    repo = tmp_path / "repo"
    write_repository(bundle, repo, RepositoryOptions(instances=CPU, pipeline=PipelineModelOptions(instances=CPU)))
    assert 'name: "layout"' in (repo / "pipeline" / "config.pbtxt").read_text()
    model = load_pipeline_model(repo, monkeypatch, "ldmrt_triton_layout_under_test")
    request = {"layout": _Tensor("layout", np.array([json.dumps(LAYOUT).encode()], dtype=np.object_)),
               "steps": _Tensor("steps", np.array([3], np.int32)),
               "guidance": _Tensor("guidance", np.array([1.0], np.float32))}
    (good,) = model.execute([request])
    assert np.abs(good.output_tensors[0].as_numpy() - expected).max() <= 1e-6


@pytest.mark.skipif(not trt_api.available(trt_api.TENSORRT_RTX), reason="TensorRT-RTX is not installed: "
                    "pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs")
def test_tensorrt_rtx_builds_the_layout_conditioner_and_unet(golden, tmp_path):
    """The layout BERT (int32 tokens of the fixed layout length) and its cross-attention UNet parse
    and build with their profiles on CPU; running them needs a GPU (not verified here)."""
    import shutil

    from ldmrt.export.engines import BundleBuildOptions, build_bundle
    from ldmrt.iospec import Component
    from ldmrt.manifest import load_manifest

    bundle = tmp_path / "b"
    shutil.copytree(golden[3], bundle)
    wanted = (Component.TEXT_ENCODER, Component.UNET)
    records = {r.component: r for r in build_bundle(bundle, BundleBuildOptions(components=wanted), lambda e: None)}
    manifest = load_manifest(bundle)
    text = records[Component.TEXT_ENCODER]
    spec = manifest.component(Component.TEXT_ENCODER).spec
    assert text.profiles == (spec.profile(),)
    shape = text.profiles[0]["input_ids"]
    assert [dims[1] for dims in shape] == [LAYOUT_FAMILY.layout.max_length] * 3      # the layout length, fixed
    for component in wanted:
        assert (bundle / "engines" / records[component].key / records[component].file).is_file()
