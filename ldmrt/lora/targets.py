"""ldmrt's torch model -> the ModuleIndex of its adaptable weights (ldmrt.lora.deltas), and the
deltas of adapters on it."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from ldmrt.config import Family
from ldmrt.lora.choice import LoraChoice
from ldmrt.lora.deltas import ModuleEntry, ModuleIndex, adapter_deltas
from ldmrt.lora.reading import Component, LoraFile
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


def module_index(model) -> ModuleIndex:
    """Every Linear / Conv2d weight of ldmrt's LatentDiffusion under each name a LoRA file may use."""
    prefixes = _component_prefixes(model)
    weighted = [(name, module) for name, module in model.named_modules()
                if isinstance(module, (nn.Linear, nn.Conv2d))]
    diffusers_names = unet_diffusers_names(     # by weight key: a module may be a whole prefix
        [f"{name[len(UNET_PREFIX):]}.weight" for name, _ in weighted if name.startswith(UNET_PREFIX)],
        model.config.unet)
    entries = {}
    for component, prefix in prefixes.items():
        for name, module in weighted:
            if not name.startswith(prefix):
                continue
            key, local = f"{name}.weight", name[len(prefix):]
            names = [local]
            if component == Component.UNET and f"{local}.weight" in diffusers_names:
                names.append(diffusers_names[f"{local}.weight"].removesuffix(".weight"))
            elif local.startswith("text_model."):      # transformers 5's CLIPTextModel is flat
                names.append(local.removeprefix("text_model."))
            entries[key] = ModuleEntry(component, tuple(names), tuple(module.weight.shape))
    return ModuleIndex(model.config.name, prefixes, entries)


def lora_deltas(model, choices: Sequence[LoraChoice], field_name: str = "lora",
                files: dict[Path, LoraFile] | None = None) -> dict[str, np.ndarray]:
    """state key -> the summed float32 change (numpy) of every chosen adapter on `model`; LoraError
    naming the input for a tensor that lands on nothing or does not fit (ldmrt.lora.deltas)."""
    return adapter_deltas(module_index(model), choices, field_name, files)
