"""The time-conditional cross-attention UNet of the LDM paper (CompVis `openaimodel.UNetModel`).

Attribute names mirror the original checkpoint keys (`model.diffusion_model.*` without the
prefix), so an original checkpoint loads by a strict key match.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmrt.config import UNetConfig
from ldmrt.models.layers import (GroupNorm32, LayerNorm32, attention, merge_heads, split_heads,
                                 timestep_embedding)


def _norm(channels: int, groups: int, eps: float = 1e-5) -> GroupNorm32:
    return GroupNorm32(groups, channels, eps=eps)


class CrossAttention(nn.Module):
    """Multi-head attention of x over a context (itself when context is None)."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int,
                 upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context                         # (B, S, Dc)
        q = split_heads(self.to_q(x), self.heads)                           # (B, h, T, d)
        k = split_heads(self.to_k(context), self.heads)                     # (B, h, S, d)
        v = split_heads(self.to_v(context), self.heads)
        return self.to_out(merge_heads(attention(q, k, v, upcast=self.upcast)))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU feed-forward; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, upcast: bool,
                 cross_only: bool = False):
        super().__init__()
        # cross_only: the first attention attends to the context too (CompVis disable_self_attn)
        self.cross_only = cross_only
        self.attn1 = CrossAttention(dim, context_dim if cross_only else None, heads, dim_head, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, upcast)
        self.norm1, self.norm2, self.norm3 = LayerNorm32(dim), LayerNorm32(dim), LayerNorm32(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context if self.cross_only else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, proj-in (1x1 conv or linear), N transformer blocks, proj-out, residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, config: UNetConfig,
                 cross_only: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.linear = config.use_linear_in_transformer
        self.norm = _norm(channels, config.norm_num_groups, eps=1e-6)
        project = (lambda i, o: nn.Linear(i, o)) if self.linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = project(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, config.context_dim, config.upcast_attention,
                                  cross_only)
            for _ in range(depth))
        self.proj_out = project(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)                                    # (B, h*w, C)
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)                          # (B, C, h, w)
        if not self.linear:
            x = self.proj_out(x)
        return x + x_in


class AttentionBlock(nn.Module):
    """The paper's plain spatial self-attention (unconditional LDMs), legacy QKV head order."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w)
        qkv = self.qkv(self.norm(x))                                        # (B, 3C, T)
        # Legacy layout: channels are grouped [head][q|k|v][d].
        qkv = qkv.reshape(b, self.heads, 3, c // self.heads, h * w).transpose(-1, -2)
        q, k, v = qkv.unbind(2)                                             # (B, heads, T, d)
        out = attention(q, k, v).transpose(-1, -2).reshape(b, c, h * w)    # (B, C, T)
        return (x + self.proj_out(out)).reshape(b, c, h, w)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected timestep embedding, GroupNorm-SiLU-conv, skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int,
                 resample: str = ""):
        super().__init__()
        # resample "down" / "up" (CompVis resblock_updown): the block halves / doubles the size,
        # by 2x2 average pooling / nearest upsampling of both paths between norm and first conv.
        self.resample = resample
        self.in_layers = nn.Sequential(_norm(channels, groups), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(_norm(out_channels, groups), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def _resampled(self, x: torch.Tensor, size: torch.Size | None) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if size is None:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.interpolate(x, size=size, mode="nearest")

    def forward(self, x: torch.Tensor, emb: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        if self.resample:
            norm_act, conv = self.in_layers[:-1], self.in_layers[-1]
            h = conv(self._resampled(norm_act(x), size))
            x = self._resampled(x, size)
        else:
            h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        # `size`: the skip connection's size, when a side is not a multiple of 2 (as diffusers).
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Runs its layers in order, giving each what it takes (embedding, context or neither)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                upsample_size: torch.Size | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, upsample_size if layer.resample == "up" else None)
            elif isinstance(layer, (SpatialTransformer, AttentionBlock)):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """eps/v = UNet(x (B, C, h, w), timesteps (B,), context (B, L, D), class labels (B,),
    SDXL's text_embeds (B, P) and time_ids (B, n))."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        mc, groups = config.model_channels, config.norm_num_groups
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if config.num_classes is not None:
            self.label_emb = nn.Embedding(config.num_classes, emb_dim)
        if config.time_ids:     # SGM "sequential": the keys are label_emb.0.0 / label_emb.0.2
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(config.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))])
        skip_channels, ch = [mc], mc
        last = config.levels - 1
        for level in range(config.levels):
            for block in range(config.res_blocks(level)):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, config.width(level), groups)]
                ch = config.width(level)
                if config.has_attention(level):
                    layers.append(self._attention(ch, level, config.depth(level, block)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(TimestepEmbedSequential(
                    ResBlock(ch, emb_dim, ch, groups, "down") if config.resblock_updown else Downsample(ch)))
                skip_channels.append(ch)

        if config.middle_block:
            self.middle_block = TimestepEmbedSequential(
                ResBlock(ch, emb_dim, ch, groups), self._attention(ch, None, config.depth(None)),
                ResBlock(ch, emb_dim, ch, groups))

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(config.levels)):
            blocks = config.res_blocks(level) + 1
            for block in range(blocks):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, config.width(level), groups)]
                ch = config.width(level)
                if config.has_attention(level):
                    layers.append(self._attention(ch, level, config.depth(level, block, up=True)))
                if level and block == blocks - 1:
                    layers.append(ResBlock(ch, emb_dim, ch, groups, "up") if config.resblock_updown
                                  else Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(_norm(ch, groups), nn.SiLU(), nn.Conv2d(ch, config.out_channels, 3, padding=1))

    def _attention(self, channels: int, level: int | None, depth: int) -> nn.Module:
        """Attention at `level` (None: the middle block, which always attends to itself first)."""
        heads, dim_head = self.config.heads_and_dim(level)
        if self.config.use_spatial_transformer:
            cross_only = level is not None and bool(self.config.disable_self_attentions) \
                and self.config.disable_self_attentions[level]
            return SpatialTransformer(channels, heads, dim_head, depth, self.config, cross_only)
        return AttentionBlock(channels, heads, self.config.norm_num_groups)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        if self.config.num_classes is not None:
            if y is None:
                raise ValueError("UNetModel: this model is class-conditional; pass class labels y")
            emb = emb + self.label_emb(y).to(emb.dtype)
        if self.config.time_ids:
            emb = emb + self.label_emb(self._text_time(text_embeds, time_ids).to(emb.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        if self.config.middle_block:
            h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)

    def _text_time(self, text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None) -> torch.Tensor:
        """SDXL's vector: [text_embeds | each time id's fp32 sinusoid (cos first)], (B, adm_in)."""
        if text_embeds is None or time_ids is None:
            raise ValueError("UNetModel: this model takes text_time conditioning; pass text_embeds and time_ids")
        batch = time_ids.shape[0]
        ids = timestep_embedding(time_ids.float().reshape(-1), self.config.time_id_dim)
        return torch.cat([text_embeds.float(), ids.reshape(batch, -1)], dim=-1)
