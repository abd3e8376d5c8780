"""KL and VQ autoencoders of the LDM paper (CompVis `diffusionmodules.model` Encoder/Decoder).

Attribute names mirror `first_stage_model.*` checkpoint keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmrt.config import AutoencoderConfig, AutoencoderKind
from ldmrt.models.layers import GroupNorm32, attention


def _norm(channels: int, groups: int) -> GroupNorm32:
    return GroupNorm32(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, 1x1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)      # (B, C, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 conv with CompVis' asymmetric (right/bottom) padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (AttnBlocks), optional resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()   # CompVis attn_type none
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """images (B, 3, H, W) -> moments (B, 2z or z, H/f, W/f)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        g, ch = config.norm_num_groups, config.ch
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(config.ch_mult):
            blocks, attns = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult, g))
                block_in = ch * mult
                if level in config.attn_levels:
                    attns.append(AttnBlock(block_in, g))
            down = _Level(blocks, attns)
            if level != len(config.ch_mult) - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = _Mid(block_in, g, config.mid_attention)
        self.norm_out = _norm(block_in, g)
        z = config.z_channels * (2 if config.double_z else 1)
        self.conv_out = nn.Conv2d(block_in, z, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            h = down(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, z, h, w) -> images (B, 3, f*h, f*w) in [-1, 1] (not clamped)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        g, ch = config.norm_num_groups, config.ch
        block_in = ch * config.ch_mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, g, config.mid_attention)
        levels: list[nn.Module] = []
        for level in reversed(range(len(config.ch_mult))):
            blocks, attns = [], []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * config.ch_mult[level], g))
                block_in = ch * config.ch_mult[level]
                if level in config.attn_levels:
                    attns.append(AttnBlock(block_in, g))
            up = _Level(blocks, attns)
            if level != 0:
                up.upsample = Upsample(block_in)
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)   # indexed by resolution level, run from the lowest
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for up in reversed(self.up):
            h = up(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer (CompVis VectorQuantizer2, inference only)."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)                         # (B*h*w, C)
        codebook = self.embedding.weight
        # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e ; |z|^2 is constant per row and does not change argmin.
        distances = (codebook * codebook).sum(1)[None, :] - 2.0 * flat @ codebook.t()
        indices = distances.argmin(dim=1)
        quantized = codebook[indices].reshape(b, h, w, c).permute(0, 3, 1, 2)
        if z.requires_grad and torch.is_grad_enabled():   # image guidance: the straight-through gradient
            return z + (quantized - z).detach()           # (van den Oord et al. 2017); never in a graph
        return quantized


class Autoencoder(nn.Module):
    """KL or VQ first stage: encode -> moments / pre-quantization latent; decode -> images."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.kind == AutoencoderKind.KL:
            self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        else:
            self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
            self.quantize = VectorQuantizer(config.n_embed, config.embed_dim)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """KL: (mean, logvar) stacked on channels (B, 2C, h, w); VQ: the latent before quantization."""
        return self.quant_conv(self.encoder(images))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> images in [-1, 1]; a VQ model quantizes first, as CompVis' LDMs do."""
        if self.config.kind == AutoencoderKind.VQ:
            latent = self.quantize(latent)
        return self.decoder(self.post_quant_conv(latent))
