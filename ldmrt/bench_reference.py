"""diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline with a bundle's exact weights, for
`ldmrt bench` side by side, and the diffusers / transformers modules of ldmrt configs that the
tests' golden comparisons share (tests/reference.py).

torch, diffusers and transformers load when a contender is made: the harness (ldmrt.bench) asks
what diffusers covers (diffusers_coverage) while it checks options, without them."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ldmrt.config import (SDXL_REFINER_TIME_IDS, SDXL_TIME_IDS, AutoencoderConfig, AutoencoderKind,
                          ClipTextConfig, Family, LayerChoice, ModelConfig)
from ldmrt.errors import BackendUnavailableError, CheckpointError, ConfigError
from ldmrt.manifest import load_manifest
from ldmrt.sampling import scheduler_for

if TYPE_CHECKING:
    import torch

    from ldmrt.runtime.pipeline import GenerationRequest


def diffusers_coverage(config) -> str:
    """Why neither StableDiffusionPipeline (CLIP-conditioned KL models, SD 1.x/2.x) nor
    StableDiffusionXLPipeline (SDXL bases) can stand in for `config`'s model ('' when one can).
    Torch-free, so options are checked quickly."""
    a, c = config.autoencoder, config.conditioner
    if getattr(config, "spatial", None) is not None:
        return (f"the diffusers comparison covers text-to-image StableDiffusionPipeline models; {config.name!r} "
                f"concatenates maps to its latents (tests/test_concat_models.py compares it with its own pipeline)")
    if config.family == Family.SDXL_REFINER or config.unet.time_ids == SDXL_REFINER_TIME_IDS:
        return (f"the diffusers comparison generates from noise; {config.name!r} is an SDXL refiner, which "
                f"continues a base's latents (StableDiffusionXLImg2ImgPipeline with denoising_start: "
                f"tests/test_sdxl_pipeline.py compares the hand-off)")
    if config.conditioner_2 is not None or config.unet.time_ids:
        encoders = config.text_encoders
        if len(encoders) != 2 or config.unet.time_ids != SDXL_TIME_IDS or encoders[0].projection_dim \
                or not encoders[1].projection_dim \
                or any(e.layer != LayerChoice.PENULTIMATE_HIDDEN for e in encoders):
            return (f"the diffusers comparison covers SDXL bases as StableDiffusionXLPipeline runs them (two "
                    f"CLIP encoders' penultimate hidden states, the second's pooled projection, "
                    f"{SDXL_TIME_IDS} size ids); {config.name!r} is not one")
    if not isinstance(c, ClipTextConfig) or a.kind != AutoencoderKind.KL or a.embed_dim != a.z_channels:
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


# --- diffusers / transformers modules of ldmrt configs (random weights until loaded) ----------

def transformers_clip(config: ClipTextConfig):
    """transformers' CLIPTextModel of `config`'s sizes and ids; CLIPTextModelWithProjection when
    it has a projection_dim (SDXL's pooled encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    projection = {"projection_dim": config.projection_dim} if config.projection_dim else {}
    text_config = CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings, hidden_act=config.hidden_act,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, **projection)
    return (CLIPTextModelWithProjection if config.projection_dim else CLIPTextModel)(text_config).eval()


def diffusers_autoencoder(config: AutoencoderConfig, scaling_factor: float = 0.18215):
    """diffusers' AutoencoderKL (VQModel for a VQ config) of `config`'s sizes."""
    from diffusers import AutoencoderKL, VQModel

    levels = len(config.ch_mult)
    common = dict(in_channels=config.in_channels, out_channels=config.out_ch,
                  down_block_types=("DownEncoderBlock2D",) * levels,
                  up_block_types=("UpDecoderBlock2D",) * levels,
                  block_out_channels=tuple(config.ch * m for m in config.ch_mult),
                  layers_per_block=config.num_res_blocks, latent_channels=config.z_channels,
                  norm_num_groups=config.norm_num_groups, mid_block_add_attention=config.mid_attention,
                  scaling_factor=scaling_factor)
    if config.kind == AutoencoderKind.KL:
        if config.embed_dim != config.z_channels:
            raise ConfigError(f"autoencoder: diffusers' AutoencoderKL ties embed_dim to z_channels; found "
                              f"embed_dim={config.embed_dim}, z_channels={config.z_channels}", field="autoencoder")
        return AutoencoderKL(**common, force_upcast=config.force_upcast).eval()
    return VQModel(**common, num_vq_embeddings=config.n_embed, vq_embed_dim=config.embed_dim).eval()


def load_clip_(text: torch.nn.Module, ours: Mapping[str, torch.Tensor], name: str = "text_encoder") -> torch.nn.Module:
    """Our text encoder's tensors (`transformer.*`, ldmrt.models.convert.clip_from_transformers'
    names) into the transformers model `text`, every weight of it (position_ids are computed)."""
    from ldmrt.models.convert import clip_from_transformers, to_diffusers

    template = {k: v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    missing, unexpected = text.load_state_dict(to_diffusers(ours, template, clip_from_transformers), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(f"{name}: transformers' {type(text).__name__} did not take our weights: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return text


def diffusers_modules(model, config: ModelConfig) -> dict[str, torch.nn.Module]:
    """The diffusers pipeline's modules holding `model`'s weights, by the pipeline's names: unet,
    vae, text_encoder (and SDXL's text_encoder_2)."""
    from diffusers import UNet2DConditionModel

    from ldmrt.checkpoints.diffusers_unet import diffusers_unet_config
    from ldmrt.models.convert import autoencoder_from_diffusers, to_diffusers, unet_from_diffusers

    reason = diffusers_coverage(config)
    if reason:
        raise BackendUnavailableError(reason)
    try:
        unet = UNet2DConditionModel(**diffusers_unet_config(config.unet))
    except ValueError as exc:      # a toy UNet diffusers cannot build (its middle block's depth)
        raise BackendUnavailableError(f"the diffusers comparison: {config.name!r} has no diffusers "
                                      f"UNet2DConditionModel: {exc}") from exc
    vae = diffusers_autoencoder(config.autoencoder, scaling_factor=config.scale_factor)
    state = model.state_dict()

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    unet.load_state_dict(to_diffusers(part("model.diffusion_model."), unet.state_dict(),
                                      lambda s: unet_from_diffusers(s, config.unet)))
    vae.load_state_dict(to_diffusers(part("first_stage_model."), vae.state_dict(),
                                     lambda s: autoencoder_from_diffusers(s, config.autoencoder)))
    modules = {"unet": unet.eval(), "vae": vae.eval()}
    for name, prefix, encoder in (("text_encoder", "cond_stage_model.", config.conditioner),
                                  ("text_encoder_2", "cond_stage_model_2.", config.conditioner_2)):
        if encoder is not None:
            modules[name] = load_clip_(transformers_clip(encoder), part(prefix), name)
    return modules


def clip_tokenizer(folder: Path, encoder: ClipTextConfig):
    """transformers' CLIPTokenizer of a bundle's tokenizer folder (tokenizer.json), padding with
    `encoder`'s pad token (SDXL's two encoders pad differently) as ldmrt's tokenizer does."""
    from transformers import CLIPTokenizer

    pad = CLIPTokenizer.from_pretrained(folder).convert_ids_to_tokens(encoder.pad_token_id)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=encoder.max_length, pad_token=pad)


def diffusers_pipeline(model, config: ModelConfig, tokenizer_folder: Path):
    """StableDiffusionXLPipeline (SDXL bases) or StableDiffusionPipeline over `model`'s weights,
    with the scheduler of the bundle's default sampler."""
    import diffusers

    modules = diffusers_modules(model, config)
    scheduler = diffusers_scheduler(config.scheduler.default_sampler, config)
    if config.conditioner_2 is None:
        return diffusers.StableDiffusionPipeline(
            **modules, tokenizer=clip_tokenizer(tokenizer_folder, config.conditioner), scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return diffusers.StableDiffusionXLPipeline(
        **modules, tokenizer=clip_tokenizer(tokenizer_folder, config.conditioner),
        tokenizer_2=clip_tokenizer(tokenizer_folder, config.conditioner_2), scheduler=scheduler,
        force_zeros_for_empty_prompt=config.force_zeros_for_empty_prompt, add_watermarker=False)


def _per_image(text: str | Sequence[str] | None, batch: int) -> list[str] | None:
    return None if text is None else [text] * batch if isinstance(text, str) else list(text)


class DiffusersContender:
    """diffusers' pipeline over the bundle's weights (rebuilt from its source) and tokenizer files."""

    def __init__(self, bundle: Path, device: str = "cpu"):
        import torch

        from ldmrt.engines.torch import load_reference_model

        manifest = load_manifest(bundle)
        self.config = manifest.config
        self.xl = self.config.conditioner_2 is not None
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        model = load_reference_model(manifest, torch.device("cpu"), torch.float32, bundle)
        self.pipe = diffusers_pipeline(model, self.config, bundle / "tokenizer").to(self.device, self.dtype)
        del model
        self.pipe.set_progress_bar_config(disable=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            import torch
            torch.cuda.synchronize()

    def generate(self, request: GenerationRequest) -> np.ndarray:
        """`request`'s images (B, H, W, 3) as ldmrt generates them: its prompt, negative prompt (None:
        "" or, SDXL, force_zeros_for_empty_prompt's zeros), steps, guidance, sampler, size, size
        ids and the initial noise of its seed; stochastic samplers' step noise is diffusers' own."""
        import torch

        prompt = _per_image(request.prompt, request.batch)
        sampler = request.sampler or self.config.scheduler.default_sampler
        self.pipe.scheduler = diffusers_scheduler(sampler, self.config)
        f = self.config.downsampling_factor
        shape = (len(prompt), self.config.latent_channels, request.height // f, request.width // f)
        # ldmrt's initial noise: the first draw of the seed's generator
        latents = request.latents if request.latents is not None else \
            np.random.default_rng(request.seed).standard_normal(shape).astype(np.float32)
        extra: dict[str, Any] = {}
        if self.xl:        # the size ids; None: diffusers' default, the image's size (as ldmrt)
            extra = {k: tuple(getattr(request, k)) for k in ("original_size", "crops_coords_top_left", "target_size")
                     if getattr(request, k) is not None}
        elif self.config.conditioner.layer == LayerChoice.PENULTIMATE:
            extra["clip_skip"] = 1
        with torch.no_grad():
            return self.pipe(prompt=prompt, negative_prompt=_per_image(request.negative_prompt, len(prompt)),
                             num_inference_steps=request.steps, guidance_scale=request.guidance, eta=request.eta,
                             height=request.height, width=request.width, output_type="np",
                             latents=torch.from_numpy(np.asarray(latents, np.float32)).to(self.device, self.dtype),
                             **extra).images

    def unet_call(self, case) -> torch.Tensor:
        import torch

        f, unet = self.config.downsampling_factor, self.config.unet
        batch = case.batch * (2 if case.guidance > 1.0 else 1)    # CFG only above 1, as the pipeline
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(batch, unet.in_channels, case.size // f, case.size // f, generator=generator)
        context = torch.randn(batch, self.config.conditioner.max_length, unet.context_dim, generator=generator)
        extra = {}
        if self.xl:        # the pooled embedding and the size ids (h, w, 0, 0, h, w)
            ids = torch.tensor([case.size, case.size, 0, 0, case.size, case.size], dtype=torch.float32)
            pooled = torch.randn(batch, unet.text_embeds_dim, generator=generator)
            extra["added_cond_kwargs"] = {"text_embeds": pooled.to(self.device, self.dtype),
                                          "time_ids": ids.repeat(batch, 1).to(self.device, self.dtype)}
        with torch.no_grad():
            return self.pipe.unet(sample.to(self.device, self.dtype), torch.full((batch,), 500.0, device=self.device),
                                  encoder_hidden_states=context.to(self.device, self.dtype), **extra).sample
