"""PyTorch definitions of the LDM components, named after the original checkpoint keys."""
from __future__ import annotations

import torch
from torch import nn

from ldmrt.config import ModelConfig
from ldmrt.models.autoencoder import Autoencoder
from ldmrt.models.conditioning import build_conditioner
from ldmrt.models.unet import UNetModel

# The torch dtype of each float dtype a graph may have (numpy names, as in ldmrt.iospec).
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model`, as CompVis' LatentDiffusion does (`model.diffusion_model.*`)."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class LatentDiffusion(nn.Module):
    """UNet + first stage + conditioner under the original checkpoint prefixes."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(UNetModel(config.unet))
        self.first_stage_model = Autoencoder(config.autoencoder)
        # The spatial rescaler is a concat model's cond_stage_model, as in CompVis' checkpoints.
        rescaler = config.spatial.rescaler if config.spatial is not None else None
        conditioner = build_conditioner(config.conditioner or rescaler)
        if conditioner is not None:
            self.cond_stage_model = conditioner
        if config.conditioner_2 is not None:      # SDXL's second text encoder (ldmrt's own prefix)
            self.cond_stage_model_2 = build_conditioner(config.conditioner_2)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def conditioner(self) -> nn.Module | None:
        return getattr(self, "cond_stage_model", None)

    @property
    def conditioner_2(self) -> nn.Module | None:
        return getattr(self, "cond_stage_model_2", None)


def build_model(config: ModelConfig, seed: int | None = 0, dtype: torch.dtype = torch.float32) -> LatentDiffusion:
    """The whole model with random weights from `seed` (deterministic), in eval mode."""
    if seed is not None:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    try:
        model = LatentDiffusion(config)
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)
    return model.to(dtype).eval().requires_grad_(False)


__all__ = ["LatentDiffusion", "build_model", "UNetModel", "Autoencoder"]
