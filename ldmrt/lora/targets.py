"""LoRA pairs -> the weights of ldmrt's model they change, and the changes.

A module is found under any name a tool writes for it: the UNet's CompVis name (SGM / kohya SDXL)
or diffusers' name (diffusers, kohya SD 1.x), the text encoders' transformers names; kohya's with
dots written as underscores. The delta of a pair is scale * alpha / rank * up @ down in float32,
reshaped to the weight (a linear pair fits a 1x1 convolution and back). Every pair must land on a
Linear or Conv2d weight of the right shape, or the LoraError names its tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ldmrt.config import Family
from ldmrt.errors import LoraError
from ldmrt.lora.choice import LoraChoice
from ldmrt.lora.reading import Component, LoraFile, read_lora
from ldmrt.models.convert import unet_diffusers_names

UNET_PREFIX = "model.diffusion_model."
_TEXT_PREFIXES = ("cond_stage_model.transformer.", "cond_stage_model_2.transformer.")


def _component_prefixes(model) -> dict[Component, str]:
    """Each diffusers component name -> its state-dict prefix in ldmrt's LatentDiffusion."""
    prefixes = {Component.UNET: UNET_PREFIX}
    config = model.config
    if not config.is_text_conditioned or config.is_layout_conditioned:
        return prefixes
    if config.family == Family.SDXL_REFINER:          # diffusers' text_encoder_2 is the only one
        prefixes[Component.TEXT_ENCODER_2] = _TEXT_PREFIXES[0]
    else:
        prefixes[Component.TEXT_ENCODER] = _TEXT_PREFIXES[0]
        if config.conditioner_2 is not None:
            prefixes[Component.TEXT_ENCODER_2] = _TEXT_PREFIXES[1]
    return prefixes


class ModuleIndex:
    """Every Linear / Conv2d weight of a model under each name a LoRA file may use for it."""

    def __init__(self, model):
        self.prefixes = _component_prefixes(model)
        self.names: dict[tuple[Component, str], str] = {}       # (component, name) -> state key
        self.shapes: dict[str, torch.Size] = {}
        weighted = [(name, module) for name, module in model.named_modules()
                    if isinstance(module, (nn.Linear, nn.Conv2d))]
        diffusers_names = unet_diffusers_names(     # by weight key: a module may be a whole prefix
            [f"{name[len(UNET_PREFIX):]}.weight" for name, _ in weighted if name.startswith(UNET_PREFIX)],
            model.config.unet)
        for component, prefix in self.prefixes.items():
            for name, module in weighted:
                if not name.startswith(prefix):
                    continue
                key, local = f"{name}.weight", name[len(prefix):]
                self.shapes[key] = module.weight.shape
                aliases = [local]
                if component == Component.UNET and f"{local}.weight" in diffusers_names:
                    aliases.append(diffusers_names[f"{local}.weight"].removesuffix(".weight"))
                elif local.startswith("text_model."):      # transformers 5's CLIPTextModel is flat
                    aliases.append(local.removeprefix("text_model."))
                for alias in aliases:
                    self.names[(component, alias)] = key
                    self.names[(component, alias.replace(".", "_"))] = key

    def key(self, component: Component, module: str) -> str | None:
        return self.names.get((component, module))


def lora_deltas(model, choices: Sequence[LoraChoice], field_name: str = "lora",
                files: dict[Path, LoraFile] | None = None) -> dict[str, torch.Tensor]:
    """state key -> the summed float32 change of every chosen adapter; LoraError naming the input
    for a tensor that lands on nothing or does not fit. `files`: already read ones, by path."""
    index = ModuleIndex(model)
    deltas: dict[str, torch.Tensor] = {}
    for choice in choices:
        lora = (files or {}).get(choice.path) or read_lora(choice.path, field_name)
        for (component, module), pair in lora.pairs.items():
            where = f"{field_name} {lora.path}: {', '.join(sorted(pair.keys))}"
            if component not in index.prefixes:
                raise LoraError(f"{where}: targets the {component.value}, which this model "
                                f"({model.config.name}) does not have; it has {[c.value for c in index.prefixes]}",
                                field=field_name)
            key = index.key(component, module)
            if key is None:
                raise LoraError(f"{where}: no {component.value} Linear or Conv2d module named {module!r} in this "
                                f"model ({model.config.name})", field=field_name)
            delta = _delta(pair.down * (choice.scale * pair.scaling), pair.up, index.shapes[key], where, field_name)
            if key in deltas:
                deltas[key].add_(delta)
            else:
                deltas[key] = delta
    return deltas


def _delta(down: torch.Tensor, up: torch.Tensor, shape: torch.Size, where: str, field_name: str) -> torch.Tensor:
    product = up.flatten(1) @ down.flatten(1)          # (out, in * kh * kw)
    kernel = tuple(down.shape[2:]) if down.dim() == 4 else ()
    natural = (product.shape[0], down.shape[1], *kernel)
    squeezed = lambda s: tuple(d for i, d in enumerate(s) if i < 2 or d != 1)   # noqa: E731 (1x1 conv ~ linear)
    if squeezed(natural) != squeezed(tuple(shape)):
        raise LoraError(f"{where}: the pair's update has shape {list(natural)}, the weight it targets "
                        f"{list(shape)}", field=field_name)
    return product.reshape(shape)
