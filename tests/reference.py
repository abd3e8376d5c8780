"""Independent reference models (diffusers / transformers) built from ldmrt configs, same weights.

The CLIP text model and the autoencoder are `ldmrt bench`'s (ldmrt.bench_reference), shared."""
from __future__ import annotations

import torch

from ldmrt.bench_reference import diffusers_autoencoder, transformers_clip  # noqa: F401  (re-exported)
from ldmrt.config import BertConfig, UNetConfig


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN never passes."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all() and torch.isfinite(ref).all(), "non-finite values"
    return float((out - ref).norm() / ref.norm())


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so norms and biases are not the 1/0 defaults that hide swaps."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
    return module


def diffusers_unet(config: UNetConfig):
    from diffusers import UNet2DConditionModel

    from ldmrt.checkpoints.diffusers_unet import diffusers_unet_config

    return UNet2DConditionModel(sample_size=16, **diffusers_unet_config(config)).eval()


def diffusers_plain_unet(config: UNetConfig):
    """diffusers UNet2DModel (the paper's unconditional / concat LDMs' UNet) for a plain-attention
    UNetConfig; resblock_updown as downsample_type / upsample_type "resnet"."""
    from diffusers import UNet2DModel

    attn = [config.has_attention(level) for level in range(config.levels)]
    resample = "resnet" if config.resblock_updown else "conv"
    return UNet2DModel(
        sample_size=8, in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(config.width(level) for level in range(config.levels)),
        layers_per_block=config.num_res_blocks, attention_head_dim=config.num_head_channels,
        downsample_type=resample, upsample_type=resample, norm_num_groups=config.norm_num_groups).eval()


def diffusers_ldmbert(config: BertConfig):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    return LDMBertModel(LDMBertConfig(
        vocab_size=config.vocab_size, max_position_embeddings=config.max_seq_len,
        encoder_layers=config.n_layer, encoder_ffn_dim=config.n_embed * config.ff_mult,
        encoder_attention_heads=config.heads, head_dim=config.dim_head, d_model=config.n_embed,
        activation_function="gelu", dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0)).eval()


# ldmrt sampler name -> (diffusers scheduler class, the arguments that pick ldmrt's variant)
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {"variance_type": "fixed_small"}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                  "lower_order_final": True}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                         "lower_order_final": True, "use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
}
