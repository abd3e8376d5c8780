"""Each component as a graph-ready module taking its inputs in I/O-spec order, plus example inputs."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ldmrt.config import ConcatKind
from ldmrt.errors import ConfigError
from ldmrt.iospec import FP32_INPUTS, Component, ComponentSpec, example_inputs  # noqa: F401  (example_inputs re-exported)
from ldmrt.models import LatentDiffusion
from ldmrt.models.conditioning import ClassEmbedder, SpatialRescaler


class ComponentGraph(nn.Module):
    """Adapts one component of a LatentDiffusion to the design's I/O contract."""

    def __init__(self, model: LatentDiffusion, spec: ComponentSpec):
        super().__init__()
        self.component = spec.name
        self.input_names = [t.name for t in spec.inputs]
        if spec.name == Component.TEXT_ENCODER:
            self.text_encoder = model.conditioner
        elif spec.name == Component.TEXT_ENCODER_2:
            self.text_encoder = model.conditioner_2
        elif spec.name == Component.UNET:
            self.unet = model.unet
            # Class-conditional LDMs (ImageNet kind) fold the class embedder into the UNet graph.
            if isinstance(model.conditioner, ClassEmbedder):
                self.class_embedder = model.conditioner
            # Concatenation conditioning happens in the graph: the maps' names, in channel order.
            self.concat = [kind.value for kind in (model.config.spatial.inputs if model.config.spatial else ())]
            if isinstance(model.conditioner, SpatialRescaler):
                self.spatial_rescaler = model.conditioner
        elif spec.name in (Component.VAE_DECODER, Component.VAE_ENCODER):
            self.autoencoder = model.first_stage_model
        else:
            raise ConfigError(f"unknown component {spec.name!r}")

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        named = dict(zip(self.input_names, inputs))
        if self.component in (Component.TEXT_ENCODER, Component.TEXT_ENCODER_2):
            return self.text_encoder(named["input_ids"])
        if self.component == Component.VAE_DECODER:
            return self.autoencoder.decode(named["latent"])
        if self.component == Component.VAE_ENCODER:
            return self.autoencoder.encode(named["images"])
        context, labels = named.get("encoder_hidden_states"), named.get("class_labels")
        sample = named["sample"]
        if hasattr(self, "class_embedder"):
            context, labels = self.class_embedder(labels).to(sample.dtype), None
        if self.concat:
            maps = [self.spatial_rescaler(named[name]).to(sample.dtype) if name == ConcatKind.SEGMENTATION
                    else named[name] for name in self.concat]
            sample = torch.cat([sample, *maps], dim=1)           # (B, latent + concat channels, h, w)
        return self.unet(sample, named["timestep"], context, labels, named.get("text_embeds"), named.get("time_ids"))


def to_torch(arrays: dict[str, np.ndarray], spec: ComponentSpec, dtype: torch.dtype | None = None
             ) -> tuple[torch.Tensor, ...]:
    """Arrays -> tensors in spec order; float inputs cast to `dtype` when given (FP32_INPUTS stay fp32)."""
    tensors = []
    for tensor in spec.inputs:
        value = torch.from_numpy(np.ascontiguousarray(arrays[tensor.name]))
        if dtype is not None and value.is_floating_point() and tensor.name not in FP32_INPUTS:
            value = value.to(dtype)
        tensors.append(value)
    return tuple(tensors)

