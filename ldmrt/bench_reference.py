"""diffusers' StableDiffusionPipeline with a bundle's exact weights, for `ldmrt bench` side by side.

torch, diffusers and transformers load when a contender is made: the harness (ldmrt.bench) asks
what diffusers covers (diffusers_coverage) while it checks options, without them."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ldmrt.config import ClipTextConfig, LayerChoice, ModelConfig
from ldmrt.errors import BackendUnavailableError
from ldmrt.manifest import load_manifest
from ldmrt.sampling import scheduler_for

if TYPE_CHECKING:
    import torch


def diffusers_coverage(config) -> str:
    """Why diffusers' StableDiffusionPipeline cannot stand in for `config`'s model ('' when it
    can: CLIP-conditioned KL models, SD 1.x/2.x). Torch-free, so options are checked quickly."""
    a, c = config.autoencoder, config.conditioner
    if getattr(config, "spatial", None) is not None:
        return (f"the diffusers comparison covers text-to-image StableDiffusionPipeline models; {config.name!r} "
                f"concatenates maps to its latents (tests/test_concat_models.py compares it with its own pipeline)")
    if config.conditioner_2 is not None or config.unet.time_ids:
        return (f"the diffusers comparison here runs StableDiffusionPipeline (SD 1.x/2.x); {config.name!r} "
                f"is SDXL (tests/test_sdxl_pipeline.py compares it with StableDiffusionXLPipeline)")
    if not isinstance(c, ClipTextConfig) or a.kind.value != "kl" or a.embed_dim != a.z_channels:
        return (f"the diffusers comparison covers CLIP-conditioned KL models (SD 1.x/2.x); "
                f"{config.name!r} is not one")
    return ""


def diffusers_scheduler(sampler: str, config: ModelConfig):
    """The diffusers scheduler that ldmrt's `sampler` reproduces, from the same SchedulerConfig."""
    import diffusers

    s = scheduler_for(sampler, config.scheduler)    # the settings ldmrt's sampler runs with
    common = dict(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
                  beta_schedule=s.beta_schedule.value, prediction_type=s.prediction_type.value)
    spaced = dict(common, timestep_spacing=s.timestep_spacing.value, steps_offset=s.steps_offset)
    table = {
        "ddim": lambda: diffusers.DDIMScheduler(**spaced, clip_sample=s.clip_sample, set_alpha_to_one=s.set_alpha_to_one,
                                                clip_sample_range=s.clip_sample_range),
        "ddpm": lambda: diffusers.DDPMScheduler(**spaced, clip_sample=s.clip_sample, clip_sample_range=s.clip_sample_range),
        "plms": lambda: diffusers.PNDMScheduler(**spaced, skip_prk_steps=True, set_alpha_to_one=s.set_alpha_to_one),
        "euler": lambda: diffusers.EulerDiscreteScheduler(**spaced),
        "euler-a": lambda: diffusers.EulerAncestralDiscreteScheduler(**spaced),
        "dpmpp-2m": lambda: diffusers.DPMSolverMultistepScheduler(**spaced),
        "dpmpp-2m-karras": lambda: diffusers.DPMSolverMultistepScheduler(**spaced, use_karras_sigmas=True),
        "lcm": lambda: diffusers.LCMScheduler(**common, clip_sample=s.clip_sample, clip_sample_range=s.clip_sample_range,
                                              original_inference_steps=s.original_inference_steps,
                                              timestep_scaling=s.timestep_scaling),
    }
    return table[sampler]()


def diffusers_modules(model, config: ModelConfig):
    """(UNet2DConditionModel, AutoencoderKL, CLIPTextModel) holding `model`'s weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldmrt.checkpoints.diffusers_unet import diffusers_unet_config
    from ldmrt.models.convert import autoencoder_from_diffusers, to_diffusers, unet_from_diffusers

    u, a, c = config.unet, config.autoencoder, config.conditioner
    reason = diffusers_coverage(config)
    if reason:
        raise BackendUnavailableError(reason)
    unet = UNet2DConditionModel(**diffusers_unet_config(u))
    vae = AutoencoderKL(in_channels=a.in_channels, out_channels=a.out_ch,
                        down_block_types=("DownEncoderBlock2D",) * len(a.ch_mult),
                        up_block_types=("UpDecoderBlock2D",) * len(a.ch_mult),
                        block_out_channels=tuple(a.ch * m for m in a.ch_mult), layers_per_block=a.num_res_blocks,
                        latent_channels=a.z_channels, norm_num_groups=a.norm_num_groups,
                        scaling_factor=config.scale_factor)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id))
    state = model.state_dict()

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    unet.load_state_dict(to_diffusers(part("model.diffusion_model."), unet.state_dict(),
                                      lambda s: unet_from_diffusers(s, u)))
    vae.load_state_dict(to_diffusers(part("first_stage_model."), vae.state_dict(),
                                     lambda s: autoencoder_from_diffusers(s, a)))
    text_state = part("cond_stage_model.transformer.text_model.")
    template = text.state_dict()
    flat = not any(k.startswith("text_model.") for k in template)
    text.load_state_dict({k: text_state[k if flat else k.removeprefix("text_model.")] for k in template
                          if not k.endswith("position_ids")}, strict=False)
    return unet.eval(), vae.eval(), text.eval()


class DiffusersContender:
    """StableDiffusionPipeline over the bundle's weights (rebuilt from its source) and tokenizer files."""

    def __init__(self, bundle: Path, device: str = "cpu"):
        import torch
        from diffusers import StableDiffusionPipeline
        from transformers import CLIPTokenizer

        from ldmrt.engines.torch import load_reference_model

        manifest = load_manifest(bundle)
        self.config = manifest.config
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        model = load_reference_model(manifest, torch.device("cpu"), torch.float32)
        unet, vae, text = diffusers_modules(model, self.config)
        del model
        cond = self.config.conditioner
        folder = bundle / "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=cond.max_length,   # tokenizer.json
                                                  pad_token="!" if cond.pad_token_id == 0 else "<|endoftext|>")
        self.clip_skip = 1 if cond.layer == LayerChoice.PENULTIMATE else None
        self.pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                            scheduler=diffusers_scheduler("ddim", self.config),
                                            safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False).to(self.device, self.dtype)
        self.pipe.set_progress_bar_config(disable=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            import torch
            torch.cuda.synchronize()

    def generate(self, case) -> np.ndarray:
        import torch

        self.pipe.scheduler = diffusers_scheduler(case.sampler, self.config)
        f = self.config.downsampling_factor
        shape = (case.batch, self.config.latent_channels, case.size // f, case.size // f)
        latents = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
        with torch.no_grad():
            return self.pipe(prompt=["a photograph of an astronaut riding a horse"] * case.batch,
                             negative_prompt=[""] * case.batch, num_inference_steps=case.steps,
                             guidance_scale=case.guidance, height=case.size, width=case.size,
                             latents=latents.to(self.device, self.dtype), output_type="np",
                             clip_skip=self.clip_skip).images

    def unet_call(self, case) -> torch.Tensor:
        import torch

        f = self.config.downsampling_factor
        batch = case.batch * (2 if case.guidance > 1.0 else 1)    # CFG only above 1, as the pipeline
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(batch, self.config.unet.in_channels, case.size // f, case.size // f, generator=generator)
        context = torch.randn(batch, self.config.conditioner.max_length, self.config.unet.context_dim, generator=generator)
        with torch.no_grad():
            return self.pipe.unet(sample.to(self.device, self.dtype), torch.full((batch,), 500.0, device=self.device),
                                  encoder_hidden_states=context.to(self.device, self.dtype)).sample
