"""SDXL end to end: a tiny diffusers StableDiffusionXLPipeline folder (SDXL's structure: two text
encoders, the second with the pooled projection, depth > 1, per-level heads, text_time) exported
by ldmrt and run on ONNX Runtime, against diffusers' own pipeline with the same weights and
latents."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ldmrt.checkpoints.loading import load_checkpoint
from ldmrt.checkpoints.source import checkpoint_source
from ldmrt.config import Family, LayerChoice
from ldmrt.errors import CheckpointError, GenerationError, LdmrtError
from ldmrt.export.bundle import ExportOptions, export_bundle
from ldmrt.iospec import ShapeRanges
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
from ldmrt.synthetic_tokenizer import write_synthetic_clip_assets
from tests.reference import perturb_, rel_l2

VOCAB = 1000
TOL = 1e-3            # the bar: mean abs, fp32, same weights and latents
HEIGHT, WIDTH = 32, 48
PROMPTS = ["a photograph of an astronaut riding a horse", "Hello, WORLD!! café"]

# SDXL base at toy widths, with SDXL's conventions where a single file cannot tell (64-channel
# heads, 64-wide CLIP heads, 256-channel time ids): attention-free first level, per-level ResNets
# [1, 2] and depths [_, 2], per-level head counts [1, 2], linear projections, context
# [CLIP 64 | bigG 128], pooled 40 + 6 time ids
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=(1, 2),
            transformer_layers_per_block=(1, 2), attention_head_dim=(1, 2), cross_attention_dim=192,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=40 + 6 * 256, norm_num_groups=32)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
           latent_channels=4, norm_num_groups=32, scaling_factor=0.13025)
CLIP_L = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
              hidden_act="quick_gelu", bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
BIG_G = dict(CLIP_L, hidden_size=128, intermediate_size=256, num_attention_heads=2, hidden_act="gelu", pad_token_id=0,
             projection_dim=40)


def _components(root):
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = perturb_(diffusers.UNet2DConditionModel(**UNET), seed=1).eval()
    vae = perturb_(diffusers.AutoencoderKL(**VAE), seed=2).eval()
    text = perturb_(CLIPTextModel(CLIPTextConfig(**CLIP_L)), seed=3).eval()
    text_2 = perturb_(CLIPTextModelWithProjection(CLIPTextConfig(**BIG_G)), seed=4).eval()
    assets = write_synthetic_clip_assets(root / "assets", VOCAB)
    tokenizer = CLIPTokenizer.from_pretrained(assets, model_max_length=77)
    tokenizer_2 = CLIPTokenizer.from_pretrained(assets, model_max_length=77, pad_token="!")
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1, timestep_spacing="leading")
    return dict(unet=unet, vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, scheduler=scheduler)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    import diffusers

    root = tmp_path_factory.mktemp("sdxl")
    pipe = diffusers.StableDiffusionXLPipeline(**_components(root), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "pipeline")
    export_bundle(checkpoint_source(root / "pipeline"), root / "bundle", ExportOptions(
        components=("text_encoder", "text_encoder_2", "unet", "vae_decoder"),
        shape_ranges=ShapeRanges(min_size=16, opt_size=32, max_size=64, max_batch=2), optimize=False))
    return dataclasses.make_dataclass("SDXL", ["pipe", "folder", "ours"])(
        pipe, root / "pipeline", Pipeline.load(root / "bundle", "onnxruntime", threads=1))


REFINER_UNET = dict(UNET, cross_attention_dim=128, projection_class_embeddings_input_dim=40 + 5 * 256)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory, sdxl):
    """The refiner's structure (OpenCLIP bigG alone, aesthetic-score time ids) at toy widths."""
    import diffusers

    root = tmp_path_factory.mktemp("refiner")
    parts = _components(root)
    torch.manual_seed(1)
    unet = perturb_(diffusers.UNet2DConditionModel(**REFINER_UNET), seed=5).eval()
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=parts["vae"], text_encoder=None, text_encoder_2=parts["text_encoder_2"], tokenizer=None,
        tokenizer_2=parts["tokenizer_2"], unet=unet, scheduler=parts["scheduler"],
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "pipeline")
    export_bundle(checkpoint_source(root / "pipeline"), root / "bundle", ExportOptions(
        components=("text_encoder", "unet", "vae_decoder"),
        shape_ranges=ShapeRanges(min_size=16, opt_size=32, max_size=64, max_batch=2), optimize=False))
    return dataclasses.make_dataclass("Refiner", ["pipe", "folder", "ours"])(
        pipe, root / "pipeline", Pipeline.load(root / "bundle", "onnxruntime", threads=1))


def _reference(pipe, request: GenerationRequest) -> np.ndarray:
    latents = torch.from_numpy(np.ascontiguousarray(request.latents, dtype=np.float32))
    extra = {k: getattr(request, k) for k in ("original_size", "crops_coords_top_left", "target_size")
             if getattr(request, k) is not None}
    with torch.no_grad():
        return pipe(prompt=request.prompt, negative_prompt=request.negative_prompt, height=request.height,
                    width=request.width, num_inference_steps=request.steps, guidance_scale=request.guidance,
                    latents=latents, output_type="np", **extra).images


def _latents(seed: int, batch: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, HEIGHT // 4, WIDTH // 4)).astype(np.float32)


def test_the_folder_loads_as_sdxl(sdxl) -> None:
    loaded = load_checkpoint(sdxl.folder)
    config = loaded.config
    assert config.family == Family.SDXL and config.force_zeros_for_empty_prompt
    assert [e.layer for e in config.text_encoders] == [LayerChoice.PENULTIMATE_HIDDEN] * 2
    assert config.conditioner.projection_dim == 0 and config.conditioner_2.projection_dim == 40
    assert config.unet.time_ids == 6 and config.unet.text_embeds_dim == 40
    assert config.unet.level_res_blocks == (1, 2) and config.scale_factor == 0.13025
    assert sorted(sdxl.ours.runners) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]


@pytest.mark.parametrize("case", [
    dict(prompt=PROMPTS, negative_prompt=None, guidance=5.0),                    # zero negatives
    dict(prompt=PROMPTS, negative_prompt=["blurry", ""], guidance=6.5),           # encoded negatives
    dict(prompt=PROMPTS[0], negative_prompt=None, guidance=1.0, batch=1),         # no guidance
    dict(prompt=PROMPTS, negative_prompt=None, guidance=4.0, original_size=(64, 96),
         crops_coords_top_left=(8, 4), target_size=(32, 48)),                      # size ids
], ids=["zeros", "negatives", "unguided", "size-ids"])
def test_images_match_diffusers(sdxl, case) -> None:
    fields = {"batch": 2, **case}
    request = GenerationRequest(steps=6, sampler="euler", height=HEIGHT, width=WIDTH,
                                latents=_latents(5, fields["batch"]), **fields)
    ours = sdxl.ours.generate(request).images
    expected = _reference(sdxl.pipe, request)
    assert ours.shape == expected.shape
    assert float(np.abs(ours - expected).mean()) <= TOL
    assert float(np.abs(expected - expected.mean()).mean()) > 10 * TOL, "images too flat to compare"


def test_the_comparison_can_fail(sdxl) -> None:
    """Zero negatives and an encoded "" differ, and the size ids move the image: the checks above
    see each of them."""
    base = GenerationRequest(prompt=PROMPTS, steps=6, sampler="euler", guidance=5.0, height=HEIGHT,
                             width=WIDTH, batch=2, latents=_latents(5, 2))
    zeros = sdxl.ours.generate(base).images
    empty = sdxl.ours.generate(dataclasses.replace(base, negative_prompt="")).images
    resized = sdxl.ours.generate(dataclasses.replace(base, original_size=(256, 256))).images
    assert float(np.abs(zeros - empty).mean()) > 10 * TOL
    assert float(np.abs(zeros - resized).mean()) > 10 * TOL


def test_the_refiner_folder_loads_with_bigg_alone(refiner) -> None:
    config = load_checkpoint(refiner.folder).config
    assert config.family == Family.SDXL_REFINER and config.conditioner_2 is None
    assert config.conditioner.projection_dim == 40 and config.conditioner.layer == LayerChoice.PENULTIMATE_HIDDEN
    assert config.unet.time_ids == 5 and config.unet.context_dim == 128
    assert not config.force_zeros_for_empty_prompt


# (ddim here takes DDIMScheduler's clip_sample default, the Euler config leaving it unset: the
# toy model's x0 estimates sit on the clip bound, where fp32 rounding picks sides)
@pytest.mark.parametrize("sampler, fraction", [("euler", 0.8), ("dpmpp-2m", 0.7), ("dpmpp-2m-karras", 0.5)])
def test_base_to_refiner_hand_off_matches_diffusers(sdxl, refiner, sampler: str, fraction: float) -> None:
    """denoising_end on the base, its latents into the refiner with denoising_start, against
    diffusers' StableDiffusionXLPipeline -> StableDiffusionXLImg2ImgPipeline."""
    from ldmrt.bench_reference import diffusers_scheduler

    common = dict(prompt=PROMPTS, steps=10, sampler=sampler, guidance=5.0, height=HEIGHT, width=WIDTH, batch=2)
    base = sdxl.ours.generate(GenerationRequest(**common, latents=_latents(7, 2), denoising_end=fraction))
    assert base.images is None
    refined = refiner.ours.generate(GenerationRequest(**common, negative_prompt="blurry", aesthetic_score=7.0,
                                                      denoising_start=fraction, init_latents=base.latents))
    pipe, refine = sdxl.pipe, refiner.pipe
    pipe.scheduler = diffusers_scheduler(sampler, sdxl.ours.config)
    refine.scheduler = diffusers_scheduler(sampler, refiner.ours.config)
    with torch.no_grad():
        latents = pipe(prompt=PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=10, guidance_scale=5.0,
                       latents=torch.from_numpy(_latents(7, 2)), denoising_end=fraction, output_type="latent").images
        assert rel_l2(torch.from_numpy(base.latents), latents) <= 1e-5
        expected = refine(prompt=PROMPTS, negative_prompt="blurry", image=latents, num_inference_steps=10,
                          guidance_scale=5.0, denoising_start=fraction, aesthetic_score=7.0,
                          output_type="np").images
    assert float(np.abs(refined.images - expected).mean()) <= TOL
    assert float(np.abs(expected - expected.mean()).mean()) > 10 * TOL


@pytest.mark.parametrize("fields, field", [
    ({"denoising_start": 0.5}, "init_latents"),
    ({"init_latents": np.zeros((1, 4, 8, 12), np.float32)}, "init_latents"),
    ({"denoising_start": 0.5, "init_latents": np.zeros((1, 4, 8, 12), np.float32), "strength": 0.5}, "strength"),
    ({"denoising_end": 1.5}, "denoising_end"),
    ({"denoising_start": 0.5, "init_latents": np.zeros((1, 4, 4, 4), np.float32)}, "init_latents"),
])
def test_bad_hand_off_fields_are_refused_by_name(sdxl, fields, field) -> None:
    with pytest.raises(LdmrtError) as raised:
        sdxl.ours.generate(GenerationRequest(prompt="a cat", steps=4, height=HEIGHT, width=WIDTH, **fields))
    assert raised.value.field == field


def _sgm_file(loaded, bigg, bigg_prefix: str, clip_l: bool, path):
    """An original (SGM) SDXL single file of a loaded diffusers folder: the UNet and VAE under
    CompVis names, CLIP-L at conditioner.embedders.0.transformer.*, bigG in OpenCLIP's layout."""
    from safetensors.torch import save_file

    from tests.test_sdxl_text_encoders import _openclip_layout

    sgm = {}
    for key, value in loaded.model.state_dict().items():
        if key.startswith(("model.diffusion_model.", "first_stage_model.")):
            sgm[key] = value
        elif clip_l and key.startswith("cond_stage_model.transformer."):
            sgm["conditioner.embedders.0." + key[len("cond_stage_model."):]] = value
    sgm.update(_openclip_layout(bigg, bigg_prefix))
    save_file({k: v.contiguous() for k, v in sgm.items()}, str(path))
    return path


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_an_original_sdxl_file_loads_as_its_diffusers_folder(sdxl, refiner, kind: str, tmp_path) -> None:
    """conditioner.embedders.* (CLIP-L as it is, bigG in OpenCLIP's layout with its projection):
    the config read from the shapes and every weight equal the diffusers folder's."""
    model = sdxl if kind == "base" else refiner
    folder = load_checkpoint(model.folder)
    prefix = "conditioner.embedders.1.model." if kind == "base" else "conditioner.embedders.0.model."
    path = _sgm_file(folder, model.pipe.text_encoder_2, prefix, kind == "base", tmp_path / "sdxl.safetensors")
    single = load_checkpoint(path, tokenizer=model.folder / ("tokenizer" if kind == "base" else "tokenizer_2"))
    assert single.family == folder.family
    for part in ("unet", "autoencoder", "conditioner", "conditioner_2", "force_zeros_for_empty_prompt",
                 "scale_factor"):     # (a single file records no scheduler or image size: SDXL's are taken)
        assert getattr(single.config, part) == getattr(folder.config, part), part
    ours, theirs = single.model.state_dict(), folder.model.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def _sgm_yaml(kind: str) -> dict:
    """sd_xl_base.yaml / sd_xl_refiner.yaml as Stability writes them, at the tiny models' sizes."""
    unet = UNET if kind == "base" else REFINER_UNET
    text = [{"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
             "params": {"layer": "hidden", "layer_idx": CLIP_L["num_hidden_layers"] - 2}}] if kind == "base" else []
    text.append({"is_trainable": False, "input_key": "txt",
                 "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                 "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True,
                            "layer": "penultimate", "always_return_pooled": True, "legacy": False}})
    sizes = ["original_size_as_tuple", "crop_coords_top_left"] + (
        ["target_size_as_tuple"] if kind == "base" else ["aesthetic_score"])
    embedders = text + [{"is_trainable": False, "input_key": key, "params": {"outdim": 256},
                         "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND"} for key in sizes]
    widths = unet["block_out_channels"]
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": VAE["scaling_factor"], "disable_first_stage_autocast": True,
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
            "num_idx": 1000,
            "weighting_config": {"target": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"},
            "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
            "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "adm_in_channels": unet["projection_class_embeddings_input_dim"], "num_classes": "sequential",
            "use_checkpoint": True, "in_channels": 4, "out_channels": 4, "model_channels": widths[0],
            "attention_resolutions": [2], "num_res_blocks": list(unet["layers_per_block"]),
            "channel_mult": [w // widths[0] for w in widths], "num_head_channels": 64,
            **({"use_spatial_transformer": True} if kind == "base" else {}),    # as Stability's YAMLs
            "use_linear_in_transformer": True,
            "transformer_depth": list(unet["transformer_layers_per_block"]), "context_dim": unet["cross_attention_dim"],
            "spatial_transformer_attn_type": "softmax-xformers", "legacy": False}},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": embedders}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss", "lossconfig": {"target": "torch.nn.Identity"},
            "ddconfig": {"attn_type": "vanilla-xformers", "double_z": True, "z_channels": 4, "resolution": 256,
                         "in_channels": 3, "out_ch": 3, "ch": VAE["block_out_channels"][0],
                         "ch_mult": [c // VAE["block_out_channels"][0] for c in VAE["block_out_channels"]],
                         "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}}}}


@pytest.fixture(scope="module")
def sgm_files(sdxl, refiner, tmp_path_factory):
    """(single file, its SGM YAML, the diffusers folder's load) of the base and the refiner."""
    import yaml

    root, files = tmp_path_factory.mktemp("sgm"), {}
    for kind, model in (("base", sdxl), ("refiner", refiner)):
        folder = load_checkpoint(model.folder)
        prefix = "conditioner.embedders.1.model." if kind == "base" else "conditioner.embedders.0.model."
        path = _sgm_file(folder, model.pipe.text_encoder_2, prefix, kind == "base", root / f"{kind}.safetensors")
        (root / f"{kind}.yaml").write_text(yaml.safe_dump(_sgm_yaml(kind)))
        files[kind] = (path, root / f"{kind}.yaml", folder,
                       model.folder / ("tokenizer" if kind == "base" else "tokenizer_2"))
    return files


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_an_sgm_yaml_describes_the_file_as_its_diffusers_folder(sgm_files, kind: str) -> None:
    """--yaml with Stability's DiffusionEngine YAML: the config and every weight equal the folder's,
    the noise schedule included (LegacyDDPMDiscretization = scaled_linear 0.00085..0.012)."""
    from ldmrt.checkpoints.schedule import betas_of

    path, yaml_path, folder, tokenizer = sgm_files[kind]
    from ldmrt.checkpoints.diffusers_unet import diffusers_unet_config

    loaded = load_checkpoint(path, yaml=yaml_path, tokenizer=tokenizer)
    assert loaded.family == folder.family
    # the same UNet as diffusers reads it (CompVis' form writes heads as num_head_channels)
    assert diffusers_unet_config(loaded.config.unet) == diffusers_unet_config(folder.config.unet)
    for part in ("autoencoder", "conditioner", "conditioner_2", "force_zeros_for_empty_prompt", "scale_factor"):
        assert getattr(loaded.config, part) == getattr(folder.config, part), part
    ours, theirs = loaded.config.scheduler, folder.config.scheduler
    np.testing.assert_array_equal(betas_of(ours), betas_of(theirs))
    assert (ours.prediction_type, ours.scheduler_class) == (theirs.prediction_type, theirs.scheduler_class)
    state, expected = loaded.model.state_dict(), folder.model.state_dict()
    assert sorted(state) == sorted(expected) and all(torch.equal(state[k], expected[k]) for k in state)


def _edit(data: dict, dotted: str, value) -> dict:
    data = __import__("copy").deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is KeyError:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


_EMB = "model.params.conditioner_config.params.emb_models"


@pytest.mark.parametrize("dotted, value, named", [
    (f"{_EMB}.0.params.layer_idx", 0, "emb_models[0].params: layer 'hidden', layer_idx 0"),
    (f"{_EMB}.1.params.legacy", KeyError, "emb_models[1].params: legacy True"),          # SGM's default
    (f"{_EMB}.1.params.layer", "last", "emb_models[1].params: layer 'last'"),
    (f"{_EMB}.4.input_key", "aesthetic_score", "emb_models: input keys"),
    (f"{_EMB}.2.params.outdim", 128, "outdim"),
    ("model.params.denoiser_config.params.scaling_config.target", "EDMScaling", "scaling_config: target 'EDMScaling'"),
    ("model.params.network_config.params.num_res_blocks", [1, 2, 3], "network_config.params: num_res_blocks"),
    ("model.params.first_stage_config.params.ddconfig.attn_type", "linear", "ddconfig.attn_type 'linear'"),
    ("model.params.network_config", KeyError, "model.params.network_config: expected a mapping"),
])
def test_an_sgm_yaml_that_does_not_fit_is_refused_by_field(sgm_files, tmp_path, dotted, value, named) -> None:
    import yaml

    path, _, _, tokenizer = sgm_files["base"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_edit(_sgm_yaml("base"), dotted, value)))
    with pytest.raises(CheckpointError, match=__import__("re").escape(named)):
        load_checkpoint(path, yaml=bad, tokenizer=tokenizer)


@pytest.mark.parametrize("fields, field", [
    ({"aesthetic_score": 7.0}, "aesthetic_score"),              # the base takes no aesthetic score
    ({"original_size": (0, 64)}, "original_size"),
    ({"crops_coords_top_left": (1.5, 0)}, "crops_coords_top_left"),
    ({"target_size": "big"}, "target_size"),
])
def test_bad_size_ids_are_refused_by_name(sdxl, fields, field) -> None:
    with pytest.raises(GenerationError) as raised:
        sdxl.ours.generate(GenerationRequest(prompt="a cat", steps=2, height=HEIGHT, width=WIDTH, **fields))
    assert raised.value.field == field


def test_a_tokenizer_2_that_differs_is_refused(sdxl, tmp_path) -> None:
    import json
    import shutil

    folder = tmp_path / "pipeline"
    shutil.copytree(sdxl.folder, folder)
    path = folder / "tokenizer_2" / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    token = next(t for t, i in vocab.items() if i == 300)
    vocab["zz" + token] = vocab.pop(token)                  # one word of the vocabulary renamed
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError, match="tokenizer_2: differs from tokenizer"):
        load_checkpoint(folder)


def test_cli_hand_off_writes_latents_then_the_refined_image(sdxl, refiner, tmp_path) -> None:
    """`ldmrt generate --denoising-end` writes the latents (.npy, only), `--denoising-start
    --init-latents` continues them: the API's images, through the command line."""
    from PIL import Image
    from typer.testing import CliRunner

    from ldmrt.cli import app

    common = ["--prompt", PROMPTS[0], "--steps", "10", "--sampler", "euler", "--guidance", "5",
              "--height", str(HEIGHT), "--width", str(WIDTH), "--seed", "3"]
    runner = CliRunner()
    refused = runner.invoke(app, ["generate", str(sdxl.ours.bundle), *common, "--denoising-end", "0.8",
                                  "--out", str(tmp_path / "base.png")])
    assert refused.exit_code == 2 and "--out" in refused.output and not (tmp_path / "base-0.png").exists()
    base = runner.invoke(app, ["generate", str(sdxl.ours.bundle), *common, "--denoising-end", "0.8",
                               "--out", str(tmp_path / "base.npy")])
    assert base.exit_code == 0, base.output
    refined = runner.invoke(app, ["generate", str(refiner.ours.bundle), *common, "--denoising-start", "0.8",
                                  "--init-latents", str(tmp_path / "base.npy"), "--out", str(tmp_path / "x.png")])
    assert refined.exit_code == 0, refined.output
    request = GenerationRequest(prompt=PROMPTS[0], steps=10, sampler="euler", guidance=5.0, height=HEIGHT,
                                width=WIDTH, seed=3)
    latents = sdxl.ours.generate(dataclasses.replace(request, denoising_end=0.8)).latents
    np.testing.assert_array_equal(np.load(tmp_path / "base.npy"), latents)
    expected = refiner.ours.generate(dataclasses.replace(request, denoising_start=0.8, init_latents=latents)).images
    written = np.asarray(Image.open(tmp_path / "x.png"), dtype=np.float32) / 255
    assert np.abs(written - expected[0]).max() <= 1 / 255 + 1e-6
