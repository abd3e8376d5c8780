"""The `sdxl` and `sdxl-refiner` presets at full size, on the meta device: the UNets against diffusers'
UNet2DConditionModel (parameter count, key for key), the text encoders against transformers', and the
released config files read by ldmrt's loaders into exactly the presets.

The config dicts below are the released unet/config.json, text_encoder*/config.json, vae/config.json
and scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0
(docs/research/general-unet-and-sdxl.md sections 1.2, 2 and 4), written out here rather than taken
from ldmrt's conversion code, so that they are an independent reference.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch

from ldmrt.checkpoints.diffusers_folder import autoencoder_config_from_diffusers, clip_config_from_transformers
from ldmrt.checkpoints.diffusers_unet import unet_config_from_diffusers
from ldmrt.checkpoints.schedule import scheduler_from_diffusers
from ldmrt.config import SDXL_REFINER_TIME_IDS, SDXL_TIME_IDS, ClipTextConfig, LayerChoice, ModelConfig
from ldmrt.models import build_model
from ldmrt.models.conditioning import ClipTextConditioner
from ldmrt.models.convert import clip_from_transformers, unet_from_diffusers
from ldmrt.models.unet import UNetModel
from ldmrt.presets import preset

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# UNet2DConditionModel fields both SDXL UNets leave at these values (the hub files write them out)
_UNET_COMMON = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_norm": None, "downsample_padding": 1, "dual_cross_attention": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None, "upcast_attention": None, "use_linear_projection": True,
}
BASE_UNET = {
    **_UNET_COMMON,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],                  # heads per level: a head size of 64
    "cross_attention_dim": 2048,                        # 768 (CLIP ViT-L) + 1280 (OpenCLIP bigG)
    "projection_class_embeddings_input_dim": 2816,      # 1280 pooled + 6 time ids x 256
}
REFINER_UNET = {
    **_UNET_COMMON,
    "block_out_channels": [384, 768, 1536, 1536],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": 4,
    "attention_head_dim": [6, 12, 24, 24],
    "cross_attention_dim": 1280,                        # OpenCLIP bigG alone
    "projection_class_embeddings_input_dim": 2560,      # 1280 pooled + 5 time ids x 256
}
# name -> (unet/config.json, the time ids its pipeline passes, the parameter count)
UNETS = {"sdxl": (BASE_UNET, SDXL_TIME_IDS, 2_567_463_684),
         "sdxl-refiner": (REFINER_UNET, SDXL_REFINER_TIME_IDS, 2_259_526_660)}

# text_encoder*/config.json; their bos/eos/pad fields are transformers' defaults, not the tokenizers'
_CLIP_COMMON = {"attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
                "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-05,
                "max_position_embeddings": 77, "model_type": "clip_text_model", "pad_token_id": 1,
                "vocab_size": 49408}
CLIP_L = {**_CLIP_COMMON, "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
          "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768}
OPENCLIP_BIGG = {**_CLIP_COMMON, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
                 "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                 "num_hidden_layers": 32, "projection_dim": 1280}
# the tokenizers' ids (special_tokens_map.json): tokenizer pads with <|endoftext|>, tokenizer_2 with "!"
TOKEN_IDS = {"CLIPTextModel": {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
             "CLIPTextModelWithProjection": {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0}}
# (preset, its encoder field, the encoder's config.json): the base has both, the refiner bigG alone
ENCODERS = [pytest.param("sdxl", "conditioner", CLIP_L, id="sdxl-clip-l"),
            pytest.param("sdxl", "conditioner_2", OPENCLIP_BIGG, id="sdxl-bigg"),
            pytest.param("sdxl-refiner", "conditioner", OPENCLIP_BIGG, id="sdxl-refiner-bigg")]

VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
       "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
       "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
       "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4}
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
             "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.cache
def _diffusers_unet(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel.from_config(UNETS[name][0])


@functools.cache
def _our_unet(name: str) -> UNetModel:
    with torch.device("meta"):
        return UNetModel(preset(name).unet)


def _transformers_encoder(hub: dict) -> torch.nn.Module:
    fields = {k: v for k, v in hub.items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        return getattr(transformers, hub["architectures"][0])(transformers.CLIPTextConfig(**fields))


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_parameter_count_matches_diffusers(name: str) -> None:
    count = UNETS[name][2]
    assert _parameters(_our_unet(name)) == count
    assert _parameters(_diffusers_unet(name)) == count


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_state_maps_onto_diffusers_key_for_key(name: str) -> None:
    """Every diffusers tensor lands on an ldmrt tensor of its shape, one to one: the same layout per
    level, not only the same total."""
    theirs = {key: torch.empty(value.shape, device="meta") for key, value in _diffusers_unet(name).state_dict().items()}
    mapped = unet_from_diffusers(theirs, preset(name).unet)
    assert len(mapped) == len(theirs), "two diffusers keys renamed onto one"
    ours = {key: tuple(value.shape) for key, value in _our_unet(name).state_dict().items()}
    found = {key: tuple(value.shape) for key, value in mapped.items()}
    assert sorted(set(found) - set(ours)) == [], "diffusers keys with no ldmrt key"
    assert sorted(set(ours) - set(found)) == [], "ldmrt keys no diffusers key maps to"
    assert {k: v for k, v in found.items() if ours[k] != v} == {}, "shapes differ"


@pytest.mark.parametrize("name", list(UNETS))
def test_diffusers_unet_config_reads_as_the_preset(name: str) -> None:
    hub, time_ids, _ = UNETS[name]
    assert unet_config_from_diffusers(hub, "unet/config.json", time_ids=time_ids) == preset(name).unet


@pytest.mark.parametrize("name, field, hub", ENCODERS)
def test_text_encoder_matches_transformers(name: str, field: str, hub: dict) -> None:
    """Same parameter count and the same tensors by name and shape (transformers' position_ids is a
    buffer, not a parameter, and ldmrt computes positions)."""
    encoder: ClipTextConfig = getattr(preset(name), field)
    with torch.device("meta"):
        ours = ClipTextConditioner(encoder)
    reference = _transformers_encoder(hub)
    assert _parameters(ours) == _parameters(reference)
    mapped = {key: tuple(value.shape) for key, value in clip_from_transformers(reference.state_dict()).items()}
    assert mapped == {key: tuple(value.shape) for key, value in ours.state_dict().items()}


@pytest.mark.parametrize("name, field, hub", ENCODERS)
def test_text_encoder_config_reads_as_the_preset(name: str, field: str, hub: dict) -> None:
    """The sizes, activation and token ids as ldmrt reads config.json (which holds neither the layer
    SDXL takes nor whether the pooled projection is used: those two are set here)."""
    kind = hub["architectures"][0]
    read = clip_config_from_transformers(hub, TOKEN_IDS[kind], "text_encoder/config.json")
    projection = hub["projection_dim"] if kind == "CLIPTextModelWithProjection" else 0
    expected = dataclasses.replace(read, layer=LayerChoice.PENULTIMATE_HIDDEN, projection_dim=projection)
    assert getattr(preset(name), field) == expected


@pytest.mark.parametrize("name", list(UNETS))
def test_vae_and_scheduler_configs_read_as_the_preset(name: str) -> None:
    config = preset(name)
    assert autoencoder_config_from_diffusers(VAE, "vae/config.json") == (config.autoencoder, config.scale_factor)
    assert scheduler_from_diffusers(SCHEDULER, "scheduler/scheduler_config.json")[0] == config.scheduler


def test_the_refiner_has_bigg_alone_and_encodes_empty_negatives() -> None:
    base, refiner = preset("sdxl"), preset("sdxl-refiner")
    assert [e.hidden_size for e in base.text_encoders] == [768, 1280]
    assert [e.hidden_size for e in refiner.text_encoders] == [1280]
    assert refiner.conditioner == base.conditioner_2
    # model_index.json: force_zeros_for_empty_prompt true (base), false (refiner)
    assert (base.force_zeros_for_empty_prompt, refiner.force_zeros_for_empty_prompt) == (True, False)
    assert base.default_image_size == refiner.default_image_size == BASE_UNET["sample_size"] * 8


@pytest.mark.parametrize("name", list(UNETS))
def test_whole_model_builds_on_meta(name: str) -> None:
    """LatentDiffusion holds each text encoder of the preset (the base's second as cond_stage_model_2)."""
    config = preset(name)
    with torch.device("meta"):
        model = build_model(config, seed=None)
    encoders = [m for m in (model.conditioner, model.conditioner_2) if m is not None]
    assert tuple(encoder.config for encoder in encoders) == config.text_encoders
    assert _parameters(model.unet) == UNETS[name][2]


@pytest.mark.parametrize("name", list(UNETS))
def test_preset_round_trips_through_json(name: str) -> None:
    config = preset(name)
    data = json.loads(json.dumps(config.to_dict()))
    assert ModelConfig.from_dict(data) == config
    assert ModelConfig.from_dict(data).to_dict() == config.to_dict()
