"""ldmrt.checkpoints: random tiny diffusers/transformers models saved as diffusers folders and as
original single files (.safetensors, .ckpt), loaded by ldmrt, compared with the models they were
saved from (relative L2 <= 1e-5, fp32); then every refusal: unsafe, corrupt, mismatched, wrong YAML.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ldmrt.checkpoints import checkpoint_source, describe_checkpoint, load_checkpoint
from ldmrt.checkpoints.diffusers_folder import legacy_attention_from_diffusers, unet_config_from_diffusers
from ldmrt.checkpoints.schedule import (betas_of, schedule_from_betas, scheduler_from_compvis,
                                       scheduler_from_diffusers)
from ldmrt.config import (AutoencoderConfig, AutoencoderKind, BertConfig, BetaSchedule, ClipTextConfig, Family,
                          LayerChoice, PredictionType, SchedulerConfig, TimestepSpacing, UNetConfig)
from ldmrt.errors import CheckpointError, ConfigError
from ldmrt.models.convert import autoencoder_from_diffusers, clip_from_transformers, unet_from_diffusers
from ldmrt.tokenizer import load_tokenizer
from ldmrt.synthetic_tokenizer import write_synthetic_clip_assets, write_synthetic_wordpiece_assets
from tests.reference import (diffusers_autoencoder, diffusers_ldmbert, diffusers_plain_unet, diffusers_unet,
                             perturb_, rel_l2, transformers_clip)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 1e-5
CLIP_TEXT = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                 bos_token_id=998, eos_token_id=999)
SD1 = SimpleNamespace(
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                    num_heads=8, context_dim=128),
    ae=AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
    clip=ClipTextConfig(**CLIP_TEXT, num_hidden_layers=2, pad_token_id=999))
SD2 = SimpleNamespace(
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                    num_head_channels=64, context_dim=128, use_linear_in_transformer=True, upcast_attention=True),
    ae=SD1.ae,
    clip=ClipTextConfig(**CLIP_TEXT, num_hidden_layers=3, hidden_act="gelu", layer=LayerChoice.PENULTIMATE,
                        pad_token_id=0))
VQ = SimpleNamespace(
    unet=UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(2,), num_head_channels=32, context_dim=None,
                    use_spatial_transformer=False),
    ae=AutoencoderConfig(kind=AutoencoderKind.VQ, embed_dim=3, z_channels=3, ch=32, ch_mult=(1, 2),
                         num_res_blocks=1, n_embed=64))
BERT = SimpleNamespace(unet=dataclasses.replace(SD1.unet, context_dim=64), ae=SD1.ae,
                       bert=BertConfig(vocab_size=1000, n_embed=64, n_layer=2, heads=4, dim_head=16))
PROMPTS = ["a photograph of an astronaut riding a horse", "", "Hello, WORLD!! café 猫 don't", "long " * 90]


# --- references and how they are saved ------------------------------------------------------

def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    return next(m for name, m in model.named_modules() if name.endswith("final_layer_norm"))


def _clip_tokenizer(folder: Path, vocab_size: int, pad: str | None = None):
    write_synthetic_clip_assets(folder, vocab_size)
    return transformers.CLIPTokenizer.from_pretrained(folder, **({"pad_token": pad} if pad else {}))


def _betas_buffers(schedule: SchedulerConfig) -> dict[str, torch.Tensor]:
    betas = torch.tensor(betas_of(schedule), dtype=torch.float32)
    return {"betas": betas, "alphas_cumprod": torch.cumprod(1 - betas, 0)}


def _prefixed(prefix: str, state) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _to_openclip(text_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our transformers-style CLIP names -> SD 2.x OpenCLIP layout (q/k/v fused into in_proj)."""
    out, p = {}, "transformer.text_model."
    inner = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = {int(k.split(".")[4]) for k in text_state if ".encoder.layers." in k}
    for i in layers:
        layer = f"{p}encoder.layers.{i}."
        for param in ("weight", "bias"):
            out[f"model.transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(
                [text_state[f"{layer}self_attn.{n}_proj.{param}"] for n in "qkv"])
            for ours, theirs in inner.items():
                out[f"model.transformer.resblocks.{i}.{theirs}.{param}"] = text_state[f"{layer}{ours}.{param}"]
    out["model.token_embedding.weight"] = text_state[p + "embeddings.token_embedding.weight"]
    out["model.positional_embedding"] = text_state[p + "embeddings.position_embedding.weight"]
    for param in ("weight", "bias"):
        out[f"model.ln_final.{param}"] = text_state[f"{p}final_layer_norm.{param}"]
    width = out["model.token_embedding.weight"].shape[1]
    out["model.text_projection"] = torch.randn(width, width)       # unused by text_embeddings
    out["model.logit_scale"] = torch.tensor(4.6)
    return out


def _save_ckpt(path: Path, state: dict, legacy: bool = False, **extras) -> Path:
    """Lightning's layout; `legacy` writes torch's pre-1.6 (non-zip) format."""
    torch.save({"state_dict": state, **extras}, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1")
    unet = perturb_(diffusers_unet(SD1.unet), seed=1)
    vae = perturb_(diffusers_autoencoder(SD1.ae), seed=2)
    text = perturb_(transformers_clip(SD1.clip), seed=3)
    tokenizer = _clip_tokenizer(root / "assets", SD1.clip.vocab_size)
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        steps_offset=1, skip_prk_steps=True)
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                      scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(root / "pipeline")
    state = {**_prefixed("model.diffusion_model.", unet_from_diffusers(unet.state_dict(), SD1.unet)),
             **_prefixed("first_stage_model.", autoencoder_from_diffusers(vae.state_dict(), SD1.ae)),
             **_prefixed("cond_stage_model.", clip_from_transformers(text.state_dict())),
             "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
             **_betas_buffers(SchedulerConfig())}
    # EMA copies that differ: loading them by mistake breaks the parity checks
    state.update({"model_ema." + k[len("model."):].replace(".", ""): torch.zeros_like(v)
                  for k, v in state.items() if k.startswith("model.diffusion_model.")})
    state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(7)
    single = root / "single"
    single.mkdir()
    safetensors_torch.save_file(state, single / "sd1.safetensors")
    _save_ckpt(single / "sd1.ckpt", state, global_step=np.int64(470000), epoch=3)
    return SimpleNamespace(folder=root / "pipeline", safetensors=single / "sd1.safetensors",
                           ckpt=single / "sd1.ckpt", state=state, unet=unet, vae=vae, tokenizer=tokenizer,
                           text_expected=lambda ids: text(ids).last_hidden_state)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2")
    unet = perturb_(diffusers_unet(SD2.unet), seed=4)
    vae = perturb_(diffusers_autoencoder(SD2.ae), seed=5)
    text = perturb_(transformers_clip(SD2.clip), seed=6)         # OpenCLIP: 3 layers, penultimate used
    cut = transformers_clip(dataclasses.replace(SD2.clip, num_hidden_layers=2))   # what diffusers ships
    cut.load_state_dict({k: v for k, v in text.state_dict().items() if "layers.2." not in k})
    tokenizer = _clip_tokenizer(root / "assets", SD2.clip.vocab_size, pad="!")
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        prediction_type="v_prediction", timestep_spacing="trailing",
                                        steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    folder = root / "pipeline"
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=cut, tokenizer=tokenizer, unet=unet,
                                      scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(folder)
    for file in (folder / "tokenizer").iterdir():               # the classic layout of the SD 2 repos
        file.unlink()
    write_synthetic_clip_assets(folder / "tokenizer", SD2.clip.vocab_size)
    (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    clip_state = clip_from_transformers(text.state_dict())
    state = {**_prefixed("model.diffusion_model.", unet_from_diffusers(unet.state_dict(), SD2.unet)),
             **_prefixed("first_stage_model.", autoencoder_from_diffusers(vae.state_dict(), SD2.ae)),
             **_prefixed("cond_stage_model.", _to_openclip(clip_state)), **_betas_buffers(SchedulerConfig())}
    (root / "single").mkdir()
    safetensors_torch.save_file(state, root / "single" / "sd2.safetensors")

    def text_expected(ids):
        return _final_norm(text)(text(ids, output_hidden_states=True).hidden_states[-2])
    return SimpleNamespace(folder=folder, safetensors=root / "single" / "sd2.safetensors", unet=unet, vae=vae,
                           text_expected=text_expected)


@pytest.fixture(scope="module")
def vq(tmp_path_factory):
    root = tmp_path_factory.mktemp("vq")
    unet = perturb_(diffusers_plain_unet(VQ.unet), seed=7)
    vae = perturb_(diffusers_autoencoder(VQ.ae), seed=8)
    schedule = SchedulerConfig(beta_start=0.0015, beta_end=0.0195)
    scheduler = diffusers.DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    diffusers.LDMPipeline(vqvae=vae, unet=unet, scheduler=scheduler).save_pretrained(root / "pipeline")
    unet_state = legacy_attention_from_diffusers(unet.state_dict(), VQ.unet)
    state = {**_prefixed("model.diffusion_model.", unet_from_diffusers(unet_state, VQ.unet)),
             **_prefixed("first_stage_model.", autoencoder_from_diffusers(vae.state_dict(), VQ.ae)),
             **_betas_buffers(schedule)}
    ckpt = _save_ckpt(root / "ldm-vq.ckpt", state, legacy=True)
    return SimpleNamespace(folder=root / "pipeline", ckpt=ckpt, unet=unet, vae=vae, schedule=schedule)


# --- parity helpers -------------------------------------------------------------------------

def assert_unet_matches(model, reference, config: UNetConfig) -> None:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, config.in_channels, 8, 12, generator=g)
    t = torch.tensor([981.0, 3.0])
    with torch.no_grad():
        if config.context_dim is None:
            expected, found = reference(x, t).sample, model.unet(x, t)
        else:
            context = torch.randn(2, 5, config.context_dim, generator=g)
            expected = reference(x, t, encoder_hidden_states=context).sample
            found = model.unet(x, t, context)
    assert rel_l2(found, expected) <= TOL


def assert_autoencoder_matches(model, reference, config: AutoencoderConfig) -> None:
    g = torch.Generator().manual_seed(12)
    f = config.downsampling_factor
    images = torch.rand(2, 3, 6 * f, 4 * f, generator=g) * 2 - 1
    latent = torch.randn(2, config.embed_dim, 5, 3, generator=g)
    with torch.no_grad():
        assert rel_l2(model.first_stage_model.decode(latent), reference.decode(latent).sample) <= TOL
        moments = model.first_stage_model.encode(images)
        if config.kind == AutoencoderKind.KL:
            assert rel_l2(moments.chunk(2, dim=1)[0], reference.encode(images).latent_dist.mean) <= TOL
        else:
            assert rel_l2(moments, reference.encode(images).latents) <= TOL


def assert_text_matches(model, expected_fn, vocab_size: int) -> None:
    ids = torch.randint(0, vocab_size, (2, 77), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        assert rel_l2(model.cond_stage_model(ids.int()), expected_fn(ids)) <= TOL


def assert_tokenizer_matches(source, conditioner, oracle, folder: Path) -> str:
    kind = source.write_tokenizer(folder)
    ours = load_tokenizer(folder, conditioner)
    expected = oracle(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ours.encode(PROMPTS).input_ids, expected["input_ids"])
    return kind


# --- diffusers folders ----------------------------------------------------------------------

def _unrecorded(schedule: SchedulerConfig) -> SchedulerConfig:
    """The schedule without what records its origin (class, default sampler, unset fields)."""
    return dataclasses.replace(schedule, scheduler_class="", default_sampler="ddim", defaulted_fields=())


def test_sd1_diffusers_folder_matches_its_models(sd1, tmp_path) -> None:
    loaded = load_checkpoint(sd1.folder)
    assert loaded.family == Family.SD1 and loaded.format == "diffusers"
    assert "quick_gelu" in loaded.detected
    config = loaded.config
    assert config.unet == SD1.unet and config.autoencoder == SD1.ae and config.conditioner == SD1.clip
    # SD's PNDM config: scaled_linear, leading, offset 1; its class's sampler is plms
    assert _unrecorded(config.scheduler) == SchedulerConfig()
    assert (config.scheduler.scheduler_class, config.scheduler.default_sampler) == ("PNDMScheduler", "plms")
    assert config.scale_factor == 0.18215 and config.default_image_size == 16 * 2
    assert_unet_matches(loaded.model, sd1.unet, SD1.unet)
    assert_autoencoder_matches(loaded.model, sd1.vae, SD1.ae)
    assert_text_matches(loaded.model, sd1.text_expected, SD1.clip.vocab_size)
    source = checkpoint_source(sd1.folder)
    assert source.source == str(sd1.folder) and not source.random_weights
    oracle = transformers.CLIPTokenizer.from_pretrained(sd1.folder / "tokenizer")   # tokenizer.json only
    assert assert_tokenizer_matches(source, SD1.clip, oracle, tmp_path / "tok") == "clip"
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json"]


def test_sd2_diffusers_folder_uses_the_last_of_the_layers_it_ships(sd2, tmp_path) -> None:
    loaded = load_checkpoint(sd2.folder)
    assert loaded.family == Family.SD2 and "already the penultimate" in loaded.detected
    clip = loaded.config.conditioner
    assert (clip.num_hidden_layers, clip.layer, clip.pad_token_id) == (2, LayerChoice.LAST, 0)
    assert loaded.config.unet == SD2.unet
    assert _unrecorded(loaded.config.scheduler) == SchedulerConfig(
        prediction_type=PredictionType.V_PREDICTION, timestep_spacing=TimestepSpacing.TRAILING)
    assert loaded.config.scheduler.default_sampler == "ddim"
    assert_unet_matches(loaded.model, sd2.unet, SD2.unet)
    assert_autoencoder_matches(loaded.model, sd2.vae, SD2.ae)
    assert_text_matches(loaded.model, sd2.text_expected, SD2.clip.vocab_size)   # == penultimate of 3
    oracle = transformers.CLIPTokenizer.from_pretrained(sd2.folder / "tokenizer", pad_token="!")
    assert_tokenizer_matches(checkpoint_source(sd2.folder), clip, oracle, tmp_path / "tok")


def test_vq_ldm_diffusers_folder_with_plain_attention_unet(vq) -> None:
    loaded = load_checkpoint(vq.folder)
    assert loaded.family == Family.LDM and loaded.config.conditioner is None
    assert loaded.config.unet == VQ.unet and loaded.config.autoencoder == VQ.ae
    assert loaded.config.scale_factor == 0.18215     # what diffusers' LDMPipeline divides by
    assert_unet_matches(loaded.model, vq.unet, VQ.unet)
    assert_autoencoder_matches(loaded.model, vq.vae, VQ.ae)
    assert checkpoint_source(vq.folder).write_tokenizer is None


def test_ldm_bert_diffusers_folder_and_wordpiece_tokenizer(tmp_path) -> None:
    unet = perturb_(diffusers_unet(BERT.unet), seed=9)
    vae = perturb_(diffusers_autoencoder(BERT.ae), seed=10)
    bert = perturb_(diffusers_ldmbert(BERT.bert), seed=11)
    write_synthetic_wordpiece_assets(tmp_path / "assets", BERT.bert.vocab_size)
    tokenizer = transformers.BertTokenizer.from_pretrained(tmp_path / "assets")
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    diffusers.LDMTextToImagePipeline(vqvae=vae, bert=bert, tokenizer=tokenizer, unet=unet,
                                     scheduler=scheduler).save_pretrained(tmp_path / "ldm")
    loaded = load_checkpoint(tmp_path / "ldm")
    assert loaded.family == Family.LDM and loaded.config.conditioner == BERT.bert
    assert torch.equal(loaded.model.cond_stage_model.transformer.to_logits.weight, bert.to_logits.weight)
    assert loaded.config.scheduler.clip_sample and loaded.config.scheduler.steps_offset == 0   # DDIM defaults
    assert_unet_matches(loaded.model, unet, BERT.unet)
    assert_text_matches(loaded.model, lambda ids: bert(ids).last_hidden_state, BERT.bert.vocab_size)
    source = checkpoint_source(tmp_path / "ldm")
    assert assert_tokenizer_matches(source, BERT.bert, tokenizer, tmp_path / "tok") == "wordpiece"


# --- original single files ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_sd1_single_file_matches_its_models(sd1, kind: str) -> None:
    loaded = load_checkpoint(getattr(sd1, kind))
    assert loaded.family == Family.SD1 and "cond_stage_model.transformer.text_model" in loaded.detected
    assert loaded.config.unet == SD1.unet and loaded.config.conditioner == SD1.clip
    assert loaded.config.scheduler == SchedulerConfig() and "betas buffer" in " ".join(loaded.notes)
    assert any("EMA" in note for note in loaded.notes) and any("position_ids" in n for n in loaded.notes)
    if kind == "ckpt":
        assert any("global_step=470000" in note for note in loaded.notes)
    assert_unet_matches(loaded.model, sd1.unet, SD1.unet)
    assert_autoencoder_matches(loaded.model, sd1.vae, SD1.ae)
    assert_text_matches(loaded.model, sd1.text_expected, SD1.clip.vocab_size)


def test_sd2_single_file_with_openclip_keys(sd2) -> None:
    loaded = load_checkpoint(sd2.safetensors)
    assert loaded.family == Family.SD2 and "OpenCLIP" in loaded.detected and "linear proj_in" in loaded.detected
    assert loaded.config.conditioner == SD2.clip and loaded.config.unet == SD2.unet
    assert loaded.config.scheduler.prediction_type == PredictionType.V_PREDICTION
    assert any("prediction type" in w for w in loaded.warnings)       # not recorded in SD 2 files
    assert any("text_projection" in n for n in loaded.notes)
    assert_unet_matches(loaded.model, sd2.unet, SD2.unet)
    assert_text_matches(loaded.model, sd2.text_expected, SD2.clip.vocab_size)


SD2_YAML = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "{parameterization}"
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {{use_checkpoint: True, image_size: 32, in_channels: 4, out_channels: 4, model_channels: 64,
               attention_resolutions: [2, 1], num_res_blocks: 1, channel_mult: {channel_mult},
               num_head_channels: 64, use_spatial_transformer: True, use_linear_in_transformer: True,
               transformer_depth: 1, context_dim: 128, legacy: False}}
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig: {{double_z: true, z_channels: 4, resolution: 256, in_channels: 3, out_ch: 3, ch: 32,
                   ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}}
        lossconfig: {{target: torch.nn.Identity}}
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params: {{freeze: True, layer: "penultimate"}}
"""


def test_yaml_described_single_file(sd2, tmp_path) -> None:
    yaml_path = tmp_path / "v2-inference.yaml"
    yaml_path.write_text(SD2_YAML.format(parameterization="eps", channel_mult="[1, 2]"))
    loaded = load_checkpoint(sd2.safetensors, yaml=yaml_path)
    assert loaded.config_source == f"the YAML {yaml_path}" and not loaded.warnings
    assert loaded.config.scheduler.prediction_type == PredictionType.EPSILON
    assert loaded.config.default_image_size == 64
    assert (loaded.config.unet, loaded.config.conditioner) == (SD2.unet, SD2.clip)
    assert_unet_matches(loaded.model, sd2.unet, SD2.unet)
    assert_autoencoder_matches(loaded.model, sd2.vae, SD2.ae)
    assert_text_matches(loaded.model, sd2.text_expected, SD2.clip.vocab_size)
    # the AUTOMATIC1111 convention: <stem>.yaml next to the checkpoint is picked up
    (tmp_path / "m.safetensors").write_bytes(sd2.safetensors.read_bytes())
    (tmp_path / "m.yaml").write_text(SD2_YAML.format(parameterization="v", channel_mult="[1, 2]"))
    found = load_checkpoint(tmp_path / "m.safetensors")
    assert found.config.scheduler.prediction_type == PredictionType.V_PREDICTION
    assert found.config_source.endswith("m.yaml")


@pytest.mark.parametrize("edit, words", [
    (("use_spatial_transformer: True, ", ""),
     "model.params.unet_config.params.use_spatial_transformer is false, the weights say true"),
    (("channel_mult: [1, 2]", "channel_mult: [1, 4]"),
     "model.params.unet_config.params.channel_mult is [1, 4], the weights say [1, 2]"),
    (("use_linear_in_transformer: True", "use_linear_in_transformer: False"),
     "use_linear_in_transformer is false, the weights say true"),
])
def test_a_yaml_that_does_not_fit_the_weights_names_its_field(sd2, tmp_path, edit, words) -> None:
    yaml_path = tmp_path / "v2-inference.yaml"
    text = SD2_YAML.format(parameterization="eps", channel_mult="[1, 2]")
    assert edit[0] in text
    yaml_path.write_text(text.replace(*edit))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(sd2.safetensors, yaml=yaml_path)
    assert words in str(caught.value) and "do not fit" in str(caught.value), str(caught.value)
    described = describe_checkpoint(sd2.safetensors, yaml=yaml_path)          # `ldmrt inspect` says it too
    assert "fields at fault: " in described and words in described, described


def test_vq_ldm_single_ckpt_matches_its_models(vq) -> None:
    loaded = load_checkpoint(vq.ckpt)
    assert loaded.format == "torch-legacy" and loaded.family == Family.LDM
    assert "VQ" in loaded.detected and "unconditional" in loaded.detected
    assert loaded.config.unet == VQ.unet and loaded.config.autoencoder == VQ.ae
    assert loaded.config.scheduler == vq.schedule and loaded.config.scale_factor == 1.0
    assert_unet_matches(loaded.model, vq.unet, VQ.unet)
    assert_autoencoder_matches(loaded.model, vq.vae, VQ.ae)


@pytest.mark.parametrize("name", ["sd15", "sd21", "ldm-txt2img", "ldm-uncond-vq", "ldm-class"])
def test_released_architectures_are_inferred_from_shapes(name: str) -> None:
    """Full-size layouts (on the meta device): keys and shapes alone reproduce the presets."""
    from ldmrt.checkpoints.original import clean_keys, detect
    from ldmrt.checkpoints.single_file import infer_config
    from ldmrt.presets import preset
    from ldmrt.models import LatentDiffusion

    expected = preset(name)
    with torch.device("meta"):
        state = LatentDiffusion(expected).state_dict()
    if name == "sd21":
        text = {k[len("cond_stage_model."):]: state.pop(k) for k in list(state)
                if k.startswith("cond_stage_model.")}
        state.update(_prefixed("cond_stage_model.", _to_openclip(text)))
    cleaned = clean_keys(state, name)
    detection = detect(cleaned.state, cleaned.openclip, name)
    config, assumptions = infer_config(cleaned.state, detection, {}, name, name)
    assert dataclasses.replace(config, name=name) == expected
    assert f"matches preset {name!r}" in assumptions[0]


def test_half_precision_file_is_cast_with_a_note(sd1, tmp_path) -> None:
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd1.state.items()}
    safetensors_torch.save_file(half, tmp_path / "half.safetensors")
    loaded = load_checkpoint(tmp_path / "half.safetensors")
    assert any("float16" in note and "float32" in note for note in loaded.notes)
    weight = loaded.model.state_dict()["model.diffusion_model.out.2.weight"]
    assert weight.dtype == torch.float32
    assert torch.equal(weight, sd1.state["model.diffusion_model.out.2.weight"].half().float())


def test_single_file_tokenizer_next_to_it_or_a_clear_error(sd1, tmp_path) -> None:
    source = checkpoint_source(sd1.safetensors)
    with pytest.raises(CheckpointError, match=r"no tokenizer.*vocab\.json \+ merges\.txt.*tokenizer/"):
        source.write_tokenizer(tmp_path / "out")
    (tmp_path / "m.safetensors").write_bytes(sd1.safetensors.read_bytes())
    write_synthetic_clip_assets(tmp_path / "tokenizer", SD1.clip.vocab_size)
    beside = checkpoint_source(tmp_path / "m.safetensors")
    assert assert_tokenizer_matches(beside, SD1.clip, sd1.tokenizer, tmp_path / "tok") == "clip"


def test_preset_and_an_ema_only_single_file(tmp_path) -> None:
    from ldmrt.presets import preset
    from ldmrt.models import build_model

    state = build_model(preset("tiny"), seed=3).state_dict()
    safetensors_torch.save_file(state, tmp_path / "tiny.safetensors")
    loaded = load_checkpoint(tmp_path / "tiny.safetensors", preset="tiny")
    assert loaded.config_source == "preset 'tiny'" and loaded.config.name == "tiny"
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(CheckpointError, match="64-wide heads"):    # tiny's CLIP is narrower than any real one
        load_checkpoint(tmp_path / "tiny.safetensors")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_checkpoint(tmp_path / "tiny.safetensors", preset="sd99")
    # LitEma names (dots removed) and CompVis' scale_by_std buffer
    ema = {("model_ema." + k[len("model."):].replace(".", "") if k.startswith("model.") else k): v
           for k, v in state.items()}
    safetensors_torch.save_file({**ema, "scale_factor": torch.tensor(0.3)}, tmp_path / "ema.safetensors")
    loaded = load_checkpoint(tmp_path / "ema.safetensors", preset="tiny")
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    assert loaded.config.scale_factor == pytest.approx(0.3)
    assert any("only EMA" in n for n in loaded.notes) and any("scale_factor buffer" in n for n in loaded.notes)
    with pytest.raises(CheckpointError, match="only EMA weights"):
        load_checkpoint(tmp_path / "ema.safetensors")


def _with_ema(sd1, tmp_path: Path) -> tuple[Path, dict]:
    """sd1's file with a second, different UNet as its EMA set (LitEma names: dots removed)."""
    averaged = perturb_(diffusers_unet(SD1.unet), seed=5)
    state = dict(sd1.state)
    state.update({"model_ema." + k[len("model."):].replace(".", ""): v for k, v in _prefixed(
        "model.diffusion_model.", unet_from_diffusers(averaged.state_dict(), SD1.unet)).items()})
    safetensors_torch.save_file(state, tmp_path / "both.safetensors")
    return tmp_path / "both.safetensors", state


def test_a_file_with_both_unet_sets_gives_the_one_asked_for(sd1, tmp_path) -> None:
    """As diffusers' single-file converter: the non-EMA set by default, the EMA set with ema=True
    (its extract_ema=True is the reference); asking for a set the file lacks is refused by name."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    path, state = _with_ema(sd1, tmp_path)
    extracted = diffusers_unet(SD1.unet)
    extracted.load_state_dict(convert_ldm_unet_checkpoint(state, extracted.config, extract_ema=True))
    for ema, reference, words in ((None, sd1.unet, "the default; --ema"), (False, sd1.unet, "asked by --no-ema"),
                                  (True, extracted, "asked by --ema")):
        loaded = load_checkpoint(path, ema=ema)
        assert words in loaded.unet_weights and any(words in note for note in loaded.notes)
        assert_unet_matches(loaded.model, reference, SD1.unet)
    with pytest.raises(AssertionError):                 # the two sets differ: the check can fail
        assert_unet_matches(load_checkpoint(path).model, extracted, SD1.unet)
    only_plain = tmp_path / "plain.safetensors"
    safetensors_torch.save_file({k: v for k, v in state.items() if not k.startswith("model_ema.")}, only_plain)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(only_plain, ema=True)
    assert caught.value.field == "ema" and "holds none" in str(caught.value)
    assert "no EMA set" in load_checkpoint(only_plain).unet_weights
    only_ema = tmp_path / "ema.safetensors"
    safetensors_torch.save_file({k: v for k, v in state.items() if not k.startswith("model.diffusion_model.")},
                                only_ema)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(only_ema, ema=False)
    assert caught.value.field == "ema" and "holds only EMA" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_checkpoint(sd1.folder, ema=True)
    assert caught.value.field == "ema"


def test_export_says_which_unet_set_it_used_and_the_torch_backend_rebuilds_that_one(sd1, tmp_path) -> None:
    from typer.testing import CliRunner

    from ldmrt.checkpoints.source import rebuild_model, weights_digest
    from ldmrt.cli import app
    from ldmrt.manifest import load_manifest

    path, _ = _with_ema(sd1, tmp_path)
    for flag, words in (("--ema", "UNet weights: EMA"), (None, "UNet weights: non-EMA")):
        out = tmp_path / f"bundle{flag}"
        result = CliRunner().invoke(app, ["export", str(path), "--out", str(out), "--components", "unet",
                                          "--min-size", "64", "--opt-size", "64", "--max-size", "64", "--max-batch",
                                          "1", "--no-validate", *([flag] if flag else [])], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert words in " ".join(result.output.split()), result.output
        assert load_manifest(out).model_source.ema == (True if flag else None)
    manifest = load_manifest(tmp_path / "bundle--ema")       # the torch backend's rebuild: ema=True, digest holds
    assert weights_digest(rebuild_model(manifest, tmp_path / "bundle--ema")) == manifest.model_source.weights_sha256
    assert manifest.model_source.weights_sha256 != load_manifest(tmp_path / "bundleNone").model_source.weights_sha256
    refused = CliRunner().invoke(app, ["export", "tiny", "--out", str(tmp_path / "t"), "--ema"])
    assert refused.exit_code == 2 and "--ema" in refused.output and not (tmp_path / "t").exists()


def test_describe_reports_components_schedule_and_oddities(sd1, tmp_path) -> None:
    text = describe_checkpoint(sd1.ckpt)
    for expected in ("sd1:", "model.diffusion_model: UNet", "first_stage_model: KL autoencoder",
                     "cond_stage_model: CLIP text 2x128", "float32", "scaled_linear 0.00085..0.012",
                     "EMA", "global_step=470000", "UNet attention heads assumed: 8 heads"):
        assert expected in text, expected
    assert "missing key" not in text and "extra key" not in text and "non-finite" not in text
    broken = dict(sd1.state)
    broken["model.diffusion_model.out.2.bias"] = torch.full((4,), float("nan"))
    broken["model.diffusion_model.extra.weight"] = torch.ones(2)
    safetensors_torch.save_file(broken, tmp_path / "broken.safetensors")
    text = describe_checkpoint(tmp_path / "broken.safetensors")
    assert "non-finite values" in text and "out.2.bias" in text and "1 extra key" in text
    folder_text = describe_checkpoint(sd1.folder)
    for expected in ("diffusers folder (StableDiffusionPipeline)", "unet/: UNet2DConditionModel",
                     "scheduler/: PNDMScheduler", "unusual: nothing"):
        assert expected in folder_text, expected


# --- scheduler configs ------------------------------------------------------------------------

SCHEDULERS = {
    "ddim-v-trailing": ("DDIMScheduler", dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                              prediction_type="v_prediction", timestep_spacing="trailing",
                                              steps_offset=1, clip_sample=False, set_alpha_to_one=False)),
    "pndm-sd": ("PNDMScheduler", dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      steps_offset=1, skip_prk_steps=True)),
    "euler-linear": ("EulerDiscreteScheduler", dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")),
    "dpm-cosine": ("DPMSolverMultistepScheduler", dict(beta_schedule="squaredcos_cap_v2",
                                                       num_train_timesteps=500)),
    "lcm": ("LCMScheduler", {}),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_config_maps_field_by_field(name: str, tmp_path) -> None:
    cls_name, kwargs = SCHEDULERS[name]
    scheduler = getattr(diffusers, cls_name)(**kwargs)
    scheduler.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    ours, _ = scheduler_from_diffusers(saved, "scheduler_config.json")
    cfg = scheduler.config
    assert (ours.beta_schedule.value, ours.num_train_timesteps, ours.prediction_type.value,
            ours.timestep_spacing.value, ours.steps_offset, ours.clip_sample, ours.set_alpha_to_one) == \
        (cfg.beta_schedule, cfg.num_train_timesteps, cfg.prediction_type, cfg.timestep_spacing,
         cfg.steps_offset, cfg.get("clip_sample", False), cfg.get("set_alpha_to_one", False))
    np.testing.assert_allclose(betas_of(ours), scheduler.betas.double().numpy(), rtol=2e-6, atol=1e-9)
    assert schedule_from_betas(scheduler.betas.numpy(), ours) == ours       # the betas buffer path


def test_scheduler_missing_fields_take_the_class_defaults() -> None:
    base = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    ddim, notes = scheduler_from_diffusers({"_class_name": "DDIMScheduler", **base}, "s.json")
    assert (ddim.clip_sample, ddim.set_alpha_to_one, ddim.steps_offset, ddim.timestep_spacing) == \
        (True, True, 0, TimestepSpacing.LEADING)
    assert "DDIMScheduler's defaults" in notes[0]
    euler, _ = scheduler_from_diffusers({"_class_name": "EulerDiscreteScheduler", **base}, "s.json")
    assert euler.timestep_spacing == TimestepSpacing.LINSPACE


@pytest.mark.parametrize("source, bad, message", [
    ("diffusers", {"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ("diffusers", {"beta_schedule": "sigmoid"}, "unsupported scheduler setting"),
    ("diffusers", {"prediction_type": "sample"}, "unsupported scheduler setting"),
    ("diffusers", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ("compvis", {"parameterization": "x0"}, "parameterization 'x0'"),
    ("compvis", {"beta_schedule": "sqrt"}, "beta_schedule 'sqrt'"),
])
def test_unsupported_schedules_are_refused(source: str, bad: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        if source == "diffusers":
            scheduler_from_diffusers({"_class_name": "DDIMScheduler", **bad}, "s.json")
        else:
            scheduler_from_compvis(bad, "v1-inference.yaml")


def test_compvis_schedule_names() -> None:
    default = scheduler_from_compvis({}, "y")      # CompVis' DDPM defaults; its "linear" is scaled_linear
    assert (default.beta_schedule, default.beta_start, default.beta_end) == \
        (BetaSchedule.SCALED_LINEAR, 1e-4, 2e-2)
    assert scheduler_from_compvis({"beta_schedule": "sqrt_linear"}, "y").beta_schedule == BetaSchedule.LINEAR
    assert scheduler_from_compvis({"beta_schedule": "cosine"}, "y").beta_schedule == BetaSchedule.SQUAREDCOS_CAP_V2
    assert scheduler_from_compvis({"parameterization": "v"}, "y").prediction_type == PredictionType.V_PREDICTION
    assert schedule_from_betas(np.random.default_rng(0).uniform(0.001, 0.01, 1000), SchedulerConfig()) is None


# --- refusals: unsafe and corrupt files --------------------------------------------------------

class _CreatesAFile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("container", ["zip", "raw-pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, container: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"model.diffusion_model.x": torch.ones(1)}, "callback": _CreatesAFile(marker)}
    if container == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused: the pickle imports .*open"):
        load_checkpoint(path)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(path, weights_only=False) if container == "zip" else pickle.loads(path.read_bytes())
    assert marker.exists()


def test_corrupt_files_name_the_file_and_the_problem(sd1, tmp_path) -> None:
    data = sd1.safetensors.read_bytes()
    cases = {
        "half.safetensors": (data[: len(data) // 2], "truncated"),
        "header.safetensors": (struct.pack("<Q", 10 ** 9) + data[8:100], "header length 1000000000 bytes run"),
        "notjson.safetensors": (struct.pack("<Q", 16) + b"this is no json!" + b"\0" * 8, "not UTF-8 JSON"),
        "tiny.safetensors": (b"\x01\x02", "truncated or empty"),
        "garbage.ckpt": (bytes(range(256)) * 8, "corrupt, or not a PyTorch checkpoint"),
        "cut.ckpt": (sd1.ckpt.read_bytes()[:5000], "truncated"),
        "zip.safetensors": (sd1.ckpt.read_bytes(), "PyTorch zip checkpoint, not safetensors"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as error:
            load_checkpoint(tmp_path / name)
        assert name in str(error.value)
    torch.save(torch.ones(3), tmp_path / "tensor.ckpt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_checkpoint(tmp_path / "tensor.ckpt")


def test_missing_paths_and_wrong_file_types(tmp_path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "unet.bin").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    for path, message in ((tmp_path / "absent.safetensors", "not found"), (tmp_path / "absent", "not found"),
                          (tmp_path / "model.onnx", "unsupported file type '.onnx'"),
                          (tmp_path / "unet.bin", "pass the diffusers folder"),
                          (tmp_path / "empty", "without model_index.json")):
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)


def test_broken_diffusers_folders(sd1, tmp_path) -> None:
    import shutil
    folder = tmp_path / "pipe"
    shutil.copytree(sd1.folder, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(folder / "unet" / "weights.txt")
    with pytest.raises(CheckpointError, match="expected diffusion_pytorch_model.safetensors"):
        load_checkpoint(folder)
    (folder / "unet" / "weights.txt").rename(folder / "unet" / "diffusion_pytorch_model.safetensors")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "resnet_time_scale_shift": "scale_shift"}))
    with pytest.raises(CheckpointError, match="resnet_time_scale_shift='scale_shift' is not supported"):
        load_checkpoint(folder)
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"unet/config\.json: corrupt JSON"):
        load_checkpoint(folder)
    with pytest.raises(ConfigError, match="describes itself"):
        load_checkpoint(sd1.folder, preset="sd15")


# --- refusals: weights that do not fit --------------------------------------------------------

def _edited(sd1, tmp_path: Path, edit) -> Path:
    state = dict(sd1.state)
    edit(state)
    safetensors_torch.save_file(state, tmp_path / "edited.safetensors")
    return tmp_path / "edited.safetensors"


@pytest.mark.parametrize("problem, edit, message", [
    ("missing", lambda s: s.pop("first_stage_model.decoder.conv_out.bias"),
     r"1 missing key: first_stage_model\.decoder\.conv_out\.bias"),
    ("extra", lambda s: s.update({"model.diffusion_model.surprise.weight": torch.ones(3)}),
     r"1 unexpected key: model\.diffusion_model\.surprise\.weight"),
    ("shape", lambda s: s.update({"first_stage_model.decoder.conv_out.bias": torch.ones(5)}),
     r"1 shape mismatch: first_stage_model\.decoder\.conv_out\.bias \(file \[5\], model \[3\]\)"),
])
def test_strict_loading_names_what_does_not_fit(sd1, tmp_path, problem: str, edit, message: str) -> None:
    path = _edited(sd1, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    loaded = load_checkpoint(path, strict=False)
    assert loaded.partially_random and any("strict=False" in w for w in loaded.warnings)
    assert checkpoint_source(path, strict=False).random_weights


def test_many_missing_keys_are_counted_not_all_listed(sd1, tmp_path) -> None:
    prefixes = ("first_stage_model.decoder.mid.", "model.diffusion_model.middle_block.0.")
    path = _edited(sd1, tmp_path, lambda s: [s.pop(k) for k in list(s) if k.startswith(prefixes)])
    vae, unet = (sum(k.startswith(p) for k in sd1.state) for p in prefixes)
    with pytest.raises(CheckpointError, match=rf"{vae + unet} missing keys: \S+, \S+, \S+, \S+, \S+ and "
                                              rf"{vae + unet - 5} more \[first_stage_model: {vae}, "
                                              rf"model\.diffusion_model: {unet}\]"):
        load_checkpoint(path)


@pytest.mark.parametrize("text, message", [
    ("model: [unclosed", "not valid YAML"),
    ("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params: {}\n",
     r"expected a mapping at model\.params\.unet_config"),
    ("model:\n  target: some.other.Model\n", "model.target 'some.other.Model' is not supported"),
    (SD2_YAML.format(parameterization="eps", channel_mult="[1, 4]"), "shape mismatch"),
    (SD2_YAML.format(parameterization="x0", channel_mult="[1, 2]"), "parameterization 'x0'"),
    (SD2_YAML.format(parameterization="eps", channel_mult="[1, 2]").replace("0.0120", "0.02"),
     "betas buffer .* contradicts"),
    (SD2_YAML.format(parameterization="eps", channel_mult="[1, 2]").replace("penultimate", "hidden"),
     "layer 'hidden' is not supported"),
])
def test_wrong_yaml_is_refused_by_name(sd2, tmp_path, text: str, message: str) -> None:
    (tmp_path / "wrong.yaml").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(sd2.safetensors, yaml=tmp_path / "wrong.yaml")


def test_unet_layouts_outside_the_compvis_form_load_and_unsupported_ones_fail_by_name() -> None:
    config = dict(diffusers_unet(SD1.unet).config)
    with pytest.raises(CheckpointError, match="do not mirror"):
        unet_config_from_diffusers({**config, "up_block_types": ["UpBlock2D"] * 2 + ["CrossAttnUpBlock2D"]}, "u")
    # once refused ("per-level layers_per_block", "neither a fixed head count nor a fixed head size");
    # tests/test_unet_configs.py compares such models with diffusers'
    general = unet_config_from_diffusers({**config, "layers_per_block": [1, 2, 1], "attention_head_dim": [2, 1, 8]}, "u")
    assert general.level_res_blocks == (1, 2, 1) and general.level_heads == (2, 1, 8)
    with pytest.raises(CheckpointError, match=r"level_heads: level 1's 64 channels not divisible by 3 heads"):
        unet_config_from_diffusers({**config, "attention_head_dim": [2, 3, 8]}, "u")


# --- the CLI turns all of it into one line and exit code 2 ----------------------------------

def test_cli_inspect_and_export_errors_are_one_line(sd1, tmp_path) -> None:
    from typer.testing import CliRunner

    from ldmrt.cli import app

    evil = tmp_path / "evil.ckpt"
    torch.save({"x": _CreatesAFile(tmp_path / "PWNED")}, evil)
    (tmp_path / "half.safetensors").write_bytes(sd1.safetensors.read_bytes()[:1000])
    runner = CliRunner()
    for args in (["inspect", str(evil)], ["inspect", str(tmp_path / "half.safetensors")],
                 ["export", str(tmp_path / "half.safetensors"), "--out", str(tmp_path / "bundle")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and "CheckpointError" in result.output
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "bundle").exists()
    result = runner.invoke(app, ["inspect", str(sd1.safetensors)])
    assert result.exit_code == 0 and "sd1:" in result.output
