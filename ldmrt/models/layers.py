"""Building blocks shared by the UNet, the autoencoders and the conditioners.

Written to export cleanly: no Python branching on tensor values, attention as plain
MatMul -> Softmax -> MatMul (which TensorRT fuses into one MHA kernel) during ONNX export,
and torch's fused scaled_dot_product_attention in eager mode.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def exporting() -> bool:
    """True while torch.onnx traces the module (pick the export-friendly code path)."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in fp32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            self.bias.float(), self.eps).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, upcast: bool = False,
              softmax_fp32: bool = True) -> torch.Tensor:
    """Scaled dot-product attention over (B, heads, T, d) tensors -> (B, heads, T, d).

    `upcast` computes QK^T and softmax in fp32 (SD 2.x); `softmax_fp32` keeps only the
    softmax in fp32 for reduced-precision graphs.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if not exporting() and not upcast:
        return F.scaled_dot_product_attention(q, k, v)
    dtype = q.dtype
    if upcast:
        q, k = q.float(), k.float()
    scores = torch.matmul(q * scale, k.transpose(-1, -2))                    # (B, h, T, S)
    if softmax_fp32 and scores.dtype != torch.float32:
        weights = torch.softmax(scores.float(), dim=-1).to(dtype)
    else:
        weights = torch.softmax(scores, dim=-1).to(dtype)
    return torch.matmul(weights, v)                                          # (B, h, T, d)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, heads*d) -> (B, heads, T, d)."""
    b, t, _ = x.shape
    return x.reshape(b, t, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, d) -> (B, T, heads*d)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding (cos first, as CompVis): (B,) -> (B, dim)."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps.float()[:, None] * freqs[None]                          # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding
