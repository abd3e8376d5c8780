"""LoRA adapter files as real tools write them, and diffusers' own fused weights for them.

Two layouts for tiny random SD 1.x / SDXL pipelines: diffusers' / PEFT's (`unet.<module>.lora_A.weight`,
written by diffusers' `save_lora_weights` with its alpha metadata) and kohya's / A1111's
(`lora_unet_<module>.lora_down.weight` + `.alpha`; SGM block names for SDXL). `diffusers_fused`
loads them with diffusers' `load_lora_weights` and fuses them: the reference ldmrt's LoRA loader
is compared against. Nothing here uses ldmrt's LoRA code; the CompVis / SGM name of every diffusers
UNet module is checked against diffusers' single-file converter (`convert_ldm_unet_checkpoint`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ldmrt.config import AutoencoderConfig, ClipTextConfig, UNetConfig
from ldmrt.synthetic_tokenizer import write_synthetic_clip_assets
from tests import test_sdxl_pipeline as xl
from tests.reference import diffusers_autoencoder, diffusers_unet, perturb_, transformers_clip

RELATIVE_CHANGE = 0.03      # ||scaling * up @ down|| / ||W|| of every adapted module at scale 1

# The module names diffusers' training scripts and kohya's trainer adapt (matched as PEFT matches
# target_modules: the whole name or its dotted tail).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
RESNET_TARGETS = ("conv1", "conv2")                  # LoCon: the ResNets' 3x3 convolutions
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
SCRIPT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")     # diffusers' train_*_lora scripts
SCRIPT_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


# --- tiny pipelines ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TinyPipeline:
    """A diffusers pipeline with random perturbed weights and the diffusers folder it was saved to
    (`ldmrt.checkpoints.loading.load_checkpoint(folder)` loads the same weights)."""
    pipe: object
    folder: Path


VOCAB = 1000
# SD 1.x at toy widths: conv proj_in, attention on the first two of three levels (SD 1's last level
# has none), CLIP last layer + quick_gelu
SD1_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                      num_heads=8, context_dim=64)
SD1_AUTOENCODER = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
SD1_CLIP = ClipTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
                          pad_token_id=VOCAB - 1)
# SDXL base at toy widths (tests/test_sdxl_pipeline.py's), except one ResNet count for every level:
# diffusers' SGM <-> diffusers block maps (single-file and kohya) take layers_per_block as one int,
# as real SDXL (2 everywhere) has it.
SDXL_UNET = dict(xl.UNET, layers_per_block=2)
SDXL_VAE, SDXL_CLIP_L, SDXL_BIG_G = xl.VAE, xl.CLIP_L, xl.BIG_G


def tiny_sd1_pipe(root: Path) -> TinyPipeline:
    """A random SD 1.x StableDiffusionPipeline, saved as a diffusers folder under `root`."""
    import diffusers
    from transformers import CLIPTokenizer

    root = Path(root)
    pipe = diffusers.StableDiffusionPipeline(
        unet=perturb_(diffusers_unet(SD1_UNET), seed=11), vae=perturb_(diffusers_autoencoder(SD1_AUTOENCODER), seed=12),
        text_encoder=perturb_(transformers_clip(SD1_CLIP), seed=13),
        tokenizer=CLIPTokenizer.from_pretrained(write_synthetic_clip_assets(root / "assets", VOCAB)),
        scheduler=diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          steps_offset=1, skip_prk_steps=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _saved(pipe, root / "pipeline")


def tiny_sdxl_pipe(root: Path) -> TinyPipeline:
    """A random SDXL base StableDiffusionXLPipeline, saved as a diffusers folder under `root`."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(root)
    torch.manual_seed(0)
    assets = write_synthetic_clip_assets(root / "assets", VOCAB)
    pipe = diffusers.StableDiffusionXLPipeline(
        unet=perturb_(diffusers.UNet2DConditionModel(**SDXL_UNET), seed=21).eval(),
        vae=perturb_(diffusers.AutoencoderKL(**SDXL_VAE), seed=22).eval(),
        text_encoder=perturb_(CLIPTextModel(CLIPTextConfig(**SDXL_CLIP_L)), seed=23).eval(),
        text_encoder_2=perturb_(CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_BIG_G)), seed=24).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(assets, model_max_length=77),
        tokenizer_2=CLIPTokenizer.from_pretrained(assets, model_max_length=77, pad_token="!"),
        scheduler=diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                   steps_offset=1, timestep_spacing="leading"),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    return _saved(pipe, root / "pipeline")


def _saved(pipe, folder: Path) -> TinyPipeline:
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return TinyPipeline(pipe, folder)


def is_sdxl(pipe) -> bool:
    import diffusers

    return isinstance(pipe, diffusers.StableDiffusionXLPipeline)


def text_encoder_modules(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoders by component name, those it has."""
    return {name: getattr(pipe, name) for name in TEXT_ENCODERS if getattr(pipe, name, None) is not None}


def base_weights(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet": ..., "text_encoder": ..., ["text_encoder_2": ...]} state dicts of `pipe` as it is."""
    return {"unet": pipe.unet.state_dict(), **{name: m.state_dict() for name, m in text_encoder_modules(pipe).items()}}


# --- the CompVis / SGM names of the diffusers UNet's modules -----------------------------------

_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_LEVEL = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def compvis_unet_names(unet) -> dict[str, str]:
    """diffusers module name -> CompVis / SGM module name (`down_blocks.1.attentions.0` ->
    `input_blocks.4.1`), for every module of `unet` that holds parameters; checked against
    diffusers' single-file converter before it is returned."""
    per_block = unet.config.layers_per_block
    if not isinstance(per_block, int):
        raise ValueError(f"layers_per_block: expected one ResNet count for every level (CompVis' UNet and "
                         f"diffusers' converters assume it), found {per_block!r}; use a uniform count")
    names = {name: _compvis_name(unet, name, per_block)
             for name, module in unet.named_modules() if any(True for _ in module.parameters(recurse=False))}
    check_compvis_names(unet, names)
    return names


def _compvis_name(unet, name: str, per_block: int) -> str:
    span = per_block + 1            # a level's CompVis blocks: its ResNets (+ attentions), then the resampler
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        level, kind, index, rest = match.groups()
        block = f"input_blocks.{1 + int(level) * span + int(index)}"
        return f"{block}.0.{_resnet_part(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name):
        return f"input_blocks.{1 + int(match[1]) * span + per_block}.0.op"
    if match := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
        kind, index, rest = match.groups()
        if kind == "resnets":
            return f"middle_block.{2 * int(index)}.{_resnet_part(rest)}"
        return f"middle_block.{2 * int(index) + 1}.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        level, kind, index, rest = match.groups()
        block = f"output_blocks.{int(level) * span + int(index)}"
        return f"{block}.0.{_resnet_part(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", name):
        level = int(match[1])
        # the upsampler follows the last ResNet (and its attention, where the level has one)
        slot = 2 if hasattr(unet.up_blocks[level], "attentions") else 1
        return f"output_blocks.{level * span + per_block}.{slot}.conv"
    raise ValueError(f"{name}: no CompVis name known for this diffusers UNet module")


def _resnet_part(rest: str) -> str:
    if rest not in _RESNET_PARTS:
        raise ValueError(f"{rest}: expected a ResNet part ({', '.join(_RESNET_PARTS)})")
    return _RESNET_PARTS[rest]


def check_compvis_names(unet, names: dict[str, str]) -> None:
    """Assert that diffusers' `convert_ldm_unet_checkpoint` turns the UNet's weights, renamed by
    `names`, back into exactly the UNet's state dict (every key, every tensor in its place)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = unet.state_dict()
    compvis = {}
    for key, tensor in state.items():
        module, param = key.rsplit(".", 1)
        compvis[f"model.diffusion_model.{names[module]}.{param}"] = tensor
    converted = convert_ldm_unet_checkpoint(compvis, dict(unet.config))
    missing, extra = sorted(state.keys() - converted.keys()), sorted(converted.keys() - state.keys())
    misplaced = sorted(k for k in state.keys() & converted.keys() if converted[k] is not state[k])
    assert not (missing or extra or misplaced), (
        f"diffusers' single-file converter disagrees with the CompVis names: missing {missing[:5]}, "
        f"extra {extra[:5]}, misplaced {misplaced[:5]}")


# --- random adapter factors --------------------------------------------------------------------

def targets(model: torch.nn.Module, suffixes: Sequence[str]) -> list[str]:
    """Names of `model`'s Linear / Conv2d modules that are one of `suffixes` or end in ".<suffix>"."""
    return [name for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            and any(name == s or name.endswith("." + s) for s in suffixes)]


def lora_delta(down: torch.Tensor, up: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """up @ down as a change of a weight of `weight_shape`: down (r, in[, kh, kw]), up (out, r[, 1, 1])."""
    return (up.flatten(1).double() @ down.flatten(1).double()).reshape(weight_shape)


def _random_factors(weight: torch.Tensor, rank: int, scaling: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (rank, in[, kh, kw]), up (out, rank[, 1, 1])), both random, with
    ||scaling * up @ down|| = RELATIVE_CHANGE * ||weight||."""
    out_features, in_features, *kernel = weight.shape
    down = torch.randn((rank, in_features, *kernel), generator=generator)
    up = torch.randn((out_features, rank, *[1] * len(kernel)), generator=generator)
    delta = scaling * lora_delta(down, up, weight.shape)
    factor = float((RELATIVE_CHANGE * weight.double().norm() / delta.norm()).sqrt())
    return down * factor, up * factor


# --- diffusers' / PEFT's layout -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PeftLayout:
    """How a diffusers-layout file spells what it holds.

    metadata: the LoraConfig of each component as diffusers' training scripts save it (safetensors
    header "lora_adapter_metadata"; the only place the file keeps lora_alpha).
    text_model_prefix: text-encoder keys `text_encoder.text_model.encoder...`, as every file written
    with transformers 4 has them (transformers 5's CLIPTextModel has no `text_model`, so diffusers
    writes `text_encoder.encoder...` there; CLIPTextModelWithProjection keeps `text_model`).
    training_script_keys: what diffusers' train_*_lora scripts write: their targets (attention
    to_q/k/v/out.0, text q/k/v/out_proj) under the names convert_state_dict_to_diffusers gives
    (`to_q.lora.down.weight`, `q_proj.lora_linear_layer.down.weight`). diffusers converts a UNet
    file's names only when its first key lacks "lora_A", so a file mixing both spellings loses a part.
    """
    metadata: bool = True
    text_model_prefix: bool = True
    training_script_keys: bool = False


def write_peft_lora(pipe, path: Path, *, rank: int = 4, alpha: float | None = None, seed: int = 0,
                    unet: bool = True, text_encoders: bool = True, conv: bool = False,
                    layout: PeftLayout = PeftLayout()) -> Path:
    """Random PEFT LoRA adapters (lora_alpha = `alpha`, rank when None) for `pipe`'s UNet and / or
    text encoders, saved by diffusers' `save_lora_weights` to the file `path`; `pipe` is not changed."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    path = Path(path)
    components = {"unet": pipe.unet} if unet else {}
    if text_encoders:
        components.update(text_encoder_modules(pipe))
    if not components:
        raise ValueError("unet, text_encoders: expected at least one of them True, found both False")
    if conv and layout.training_script_keys:
        raise ValueError("conv: diffusers' training scripts adapt no convolutions; found conv=True "
                         "with layout.training_script_keys")
    generator = torch.Generator().manual_seed(seed)
    arguments = {}
    for name, model in components.items():
        if layout.training_script_keys:
            suffixes = SCRIPT_UNET_TARGETS if name == "unet" else SCRIPT_TEXT_TARGETS
        else:
            suffixes = (UNET_TARGETS + (RESNET_TARGETS if conv else ())) if name == "unet" else TEXT_TARGETS
        config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=list(suffixes))
        adapted = copy.deepcopy(model)
        # what unet.add_adapter / text_encoder.add_adapter do (transformers 5's add_adapter refuses peft < 0.22)
        inject_adapter_in_model(config, adapted, "default")
        _randomize_peft_factors(adapted, rank, generator)
        state = get_peft_model_state_dict(adapted)
        if layout.training_script_keys:
            state = convert_state_dict_to_diffusers(state)
        if name != "unet" and layout.text_model_prefix and not hasattr(model, "text_model"):
            state = {f"text_model.{key}": value for key, value in state.items()}
        arguments[f"{name}_lora_layers"] = state
        if layout.metadata:
            arguments[f"{name}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(path.parent, weight_name=path.name, **arguments)
    return path


def _randomize_peft_factors(model: torch.nn.Module, rank: int, generator: torch.Generator) -> None:
    """Random lora_A and lora_B (PEFT starts B at zero, which would make every comparison vacuous)."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                down, up = _random_factors(module.get_base_layer().weight, rank, module.scaling["default"],
                                           generator)
                module.lora_A["default"].weight.copy_(down)
                module.lora_B["default"].weight.copy_(up)


# --- kohya's / A1111's layout ---------------------------------------------------------------------

def kohya_names(pipe, *, conv: bool = False, sgm_names: bool | None = None) -> dict[str, tuple[str, str]]:
    """kohya LoRA name -> (component, diffusers module name) for the modules kohya's trainer adapts:
    `lora_unet_<UNet module>` (diffusers names, or SGM names for SDXL by default), `lora_te_` (SD 1.x)
    or `lora_te1_` / `lora_te2_` (SDXL) + `text_model_encoder_layers_0_self_attn_q_proj`."""
    sdxl = is_sdxl(pipe)
    sgm = sdxl if sgm_names is None else sgm_names
    compvis = compvis_unet_names(pipe.unet) if sgm else None
    names = {}
    for module in targets(pipe.unet, UNET_TARGETS + (RESNET_TARGETS if conv else ())):
        spelled = compvis[module] if sgm else module
        names["lora_unet_" + spelled.replace(".", "_")] = ("unet", module)
    prefixes = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    for component, model in text_encoder_modules(pipe).items():
        for module in targets(model, TEXT_TARGETS):
            spelled = module if module.startswith("text_model.") else f"text_model.{module}"
            names[prefixes[component] + spelled.replace(".", "_")] = (component, module)
    return names


def write_kohya_lora(pipe, path: Path, *, rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
                     conv: bool = False, sgm_names: bool | None = None, conv_rank: int | None = None,
                     conv_alpha: float | None = None) -> Path:
    """Random kohya / A1111 LoRA (LoCon with `conv`) for `pipe`'s UNet and text encoders, written
    with safetensors to the file `path`; `pipe` is not changed.

    alpha None: no `.alpha` keys (scale 1, as kohya reads such files). conv_rank / conv_alpha: the
    3x3 convolutions' rank and alpha (kohya's conv_dim / conv_alpha), `rank` / `alpha` when None.
    sgm_names None: SGM UNet names for an SDXL pipeline, diffusers' names otherwise (kohya's own choice).
    """
    from safetensors.torch import save_file

    path = Path(path)
    conv_rank = rank if conv_rank is None else conv_rank
    conv_alpha = alpha if conv_alpha is None else conv_alpha
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for lora_name, (component, module) in kohya_names(pipe, conv=conv, sgm_names=sgm_names).items():
        weight = getattr(pipe, component).get_submodule(module).weight.detach()
        spatial = weight.dim() == 4 and weight.shape[2:] != (1, 1)
        module_rank, module_alpha = (conv_rank, conv_alpha) if spatial else (rank, alpha)
        scaling = 1.0 if module_alpha is None else module_alpha / module_rank
        down, up = _random_factors(weight, module_rank, scaling, generator)
        state[f"{lora_name}.lora_down.weight"] = down.contiguous()
        state[f"{lora_name}.lora_up.weight"] = up.contiguous()
        if module_alpha is not None:
            state[f"{lora_name}.alpha"] = torch.tensor(float(module_alpha))      # 0-d, as kohya saves it
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path, metadata=_kohya_metadata(pipe, rank, alpha, conv, conv_rank, conv_alpha))
    return path


def _kohya_metadata(pipe, rank: int, alpha: float | None, conv: bool, conv_rank: int,
                    conv_alpha: float | None) -> dict[str, str]:
    """The `ss_*` training record kohya's trainer leaves in the header (informative only)."""
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                "ss_network_alpha": str(rank if alpha is None else alpha),
                "ss_base_model_version": "sdxl_base_v1-0" if is_sdxl(pipe) else "sd_v1"}
    if conv:
        metadata["ss_network_args"] = json.dumps(
            {"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank if conv_alpha is None else conv_alpha)})
    return metadata


# --- diffusers' reference -------------------------------------------------------------------------

def diffusers_fused(pipe, lora_paths_and_scales: Sequence[tuple[Path, float]]) -> dict[str, dict[str, torch.Tensor]]:
    """The weights diffusers runs with after `load_lora_weights` of each file (adapters a0, a1, ...),
    `set_adapters` with the scales, `fuse_lora` and `unload_lora_weights`, as plain state dicts
    {"unet": ..., "text_encoder": ..., ["text_encoder_2": ...]}; `pipe` is not changed."""
    loadable = {"unet", *text_encoder_modules(pipe)}
    # copy only what LoRA changes: the VAE, tokenizers and scheduler stay shared
    shared = {id(part): part for name, part in pipe.components.items() if name not in loadable and part is not None}
    fused = copy.deepcopy(pipe, memo=shared)
    names = [f"a{i}" for i in range(len(lora_paths_and_scales))]
    # SD 1.x's load_lora_weights maps SGM (input_blocks) kohya names only when given the UNet's
    # config; SDXL's passes it itself (and refuses a second one)
    extra = {} if is_sdxl(fused) else {"unet_config": fused.unet.config}
    for name, (path, _) in zip(names, lora_paths_and_scales):
        fused.load_lora_weights(str(path), adapter_name=name, **extra)
    fused.set_adapters(names, [float(scale) for _, scale in lora_paths_and_scales])
    fused.fuse_lora(components=["unet", *text_encoder_modules(fused)], adapter_names=names, lora_scale=1.0)
    fused.unload_lora_weights()        # the LoRA layers go, the fused weights stay
    return base_weights(fused)
