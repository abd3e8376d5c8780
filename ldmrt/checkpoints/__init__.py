"""Checkpoints -> ldmrt models: diffusers folders and original (CompVis) single files, loaded safely
(safetensors, or pickles only with torch.load(weights_only=True)) and strictly. See docs/checkpoints.md.
"""
from __future__ import annotations

from ldmrt.checkpoints.describe import describe_checkpoint
from ldmrt.checkpoints.loading import LoadedCheckpoint, load_checkpoint
from ldmrt.checkpoints.source import ModelSource, checkpoint_source

__all__ = ["LoadedCheckpoint", "ModelSource", "checkpoint_source", "describe_checkpoint", "load_checkpoint"]
