"""Frozen configuration dataclasses for every LDM component (the built-in presets: ldmrt/presets.py).

Torch-free: the manifest and the lean runtime read these too. Field names follow the
original (CompVis) configs so that an inference YAML maps onto them one to one.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from ldmrt.config_fields import LATER as _LATER, positive as _positive
from ldmrt.errors import ConfigError
from ldmrt.layout import LayoutTokenizerConfig
# the UNet's config lives in its own module; imported from here as ever
from ldmrt.unet_config import SDXL_REFINER_TIME_IDS, SDXL_TIME_IDS, UNetConfig, unet_from_levels  # noqa: F401


class Family(str, enum.Enum):
    SD1 = "sd1"   # Stable Diffusion 1.x: CLIP ViT-L/14 text, last layer
    SD2 = "sd2"   # Stable Diffusion 2.x: OpenCLIP ViT-H text, penultimate layer
    LDM = "ldm"   # the LDM paper's models (BERT-like text, class-conditional, unconditional)
    SDXL = "sdxl"   # SDXL base: CLIP ViT-L + OpenCLIP ViT-bigG text (penultimate), text_time vector
    SDXL_REFINER = "sdxl_refiner"   # the SDXL refiner: OpenCLIP ViT-bigG alone, aesthetic-score time ids




class BetaSchedule(str, enum.Enum):
    """Diffusers' names. CompVis' "linear" is diffusers' "scaled_linear" (linear in sqrt(beta))."""
    LINEAR = "linear"
    SCALED_LINEAR = "scaled_linear"
    SQUAREDCOS_CAP_V2 = "squaredcos_cap_v2"


class PredictionType(str, enum.Enum):
    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"


class TimestepSpacing(str, enum.Enum):
    LEADING = "leading"
    TRAILING = "trailing"
    LINSPACE = "linspace"


class AutoencoderKind(str, enum.Enum):
    KL = "kl"
    VQ = "vq"


class LayerChoice(str, enum.Enum):
    """Which CLIP hidden state the UNet consumes."""
    LAST = "last"                      # the last layer, then the final LayerNorm (SD 1.x)
    PENULTIMATE = "penultimate"        # the layer before the last, then the final LayerNorm (SD 2.x)
    # the layer before the last as it is, no final LayerNorm (SDXL: diffusers hidden_states[-2],
    # CompVis/SGM layer "hidden" with layer_idx = layers - 2)
    PENULTIMATE_HIDDEN = "penultimate_hidden"


@dataclass(frozen=True)
class AutoencoderConfig:
    """CompVis `AutoencoderKL` / `VQModel` (Encoder + Decoder of `diffusionmodules.model`)."""
    kind: AutoencoderKind = AutoencoderKind.KL
    embed_dim: int = 4                 # latent channels the UNet sees
    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = ()  # resolution levels (0 = full size) with attention blocks
    n_embed: int = 0                   # VQ codebook size
    norm_num_groups: int = 32
    # False: CompVis attn_type "none" (diffusers mid_block_add_attention)
    mid_attention: bool = field(default=True, metadata=_LATER)
    # diffusers' AutoencoderKL flag (default true): the VAE overflows in fp16. Honoured where
    # diffusers' SDXL pipelines honour it (ModelConfig.vae_needs_fp32); false for the fp16-fixed VAE
    force_upcast: bool = field(default=True, metadata=_LATER)

    def __post_init__(self) -> None:
        _positive(self, "embed_dim", "z_channels", "in_channels", "out_ch", "ch",
                  "num_res_blocks", "norm_num_groups")
        if self.kind == AutoencoderKind.VQ and self.n_embed < 1:
            raise ConfigError("AutoencoderConfig: a VQ autoencoder needs n_embed >= 1")
        if any(not 0 <= level < len(self.ch_mult) for level in self.attn_levels):
            raise ConfigError(f"AutoencoderConfig.attn_levels: expected levels in "
                              f"[0, {len(self.ch_mult)}), found {self.attn_levels}")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def double_z(self) -> bool:
        return self.kind == AutoencoderKind.KL


@dataclass(frozen=True)
class ClipTextConfig:
    """CLIP text transformer (transformers' CLIPTextModel). SD 1.x: ViT-L/14; SD 2.x: OpenCLIP ViT-H."""
    kind: ClassVar[str] = "clip_text"
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer: LayerChoice = LayerChoice.LAST
    pad_token_id: int = 49407          # SD 1.x pads with <|endoftext|>; SD 2.x pads with 0 ("!")
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    # > 0: transformers' CLIPTextModelWithProjection; the encoder also gives the pooled embedding
    # text_projection(final_layer_norm(last layer)[first eos]) of this width (SDXL's OpenCLIP bigG)
    projection_dim: int = field(default=0, metadata=_LATER)

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "max_position_embeddings")
        if isinstance(self.projection_dim, bool) or not isinstance(self.projection_dim, int) \
                or self.projection_dim < 0:
            raise ConfigError(f"ClipTextConfig.projection_dim: expected an integer >= 0, found "
                              f"{self.projection_dim!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"ClipTextConfig: hidden_size {self.hidden_size} not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")

    @property
    def context_dim(self) -> int:
        return self.hidden_size

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings


@dataclass(frozen=True)
class BertConfig:
    """The LDM paper's BERT-like conditioner: TokEmb + PosEmb + N x (LN, MHSA, LN, MLP) + LN."""
    kind: ClassVar[str] = "bert"
    vocab_size: int = 30522
    n_embed: int = 1280
    n_layer: int = 32
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    max_seq_len: int = 77
    pad_token_id: int = 0

    @property
    def context_dim(self) -> int:
        return self.n_embed

    @property
    def max_length(self) -> int:
        return self.max_seq_len


@dataclass(frozen=True)
class ClassEmbedderConfig:
    """The LDM paper's class embedder: a label becomes one context token [B, 1, embed_dim]."""
    kind: ClassVar[str] = "class"
    n_classes: int = 1001
    embed_dim: int = 512

    @property
    def context_dim(self) -> int:
        return self.embed_dim


ConditionerConfig = Union[ClipTextConfig, BertConfig, ClassEmbedderConfig]
CONDITIONER_KINDS: dict[str, type] = {c.kind: c for c in (ClipTextConfig, BertConfig, ClassEmbedderConfig)}


# The samplers ldmrt runs (ldmrt.sampling builds them); here so that a config can name one.
SAMPLERS = ("ddim", "ddpm", "plms", "euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras", "lcm")
# SchedulerConfig fields that configure sampling rather than the training schedule: where the
# checkpoint leaves one unset, each sampler takes its own diffusers class's default for it.
SAMPLER_FIELDS = ("timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range",
                  "set_alpha_to_one", "original_inference_steps", "timestep_scaling")


@dataclass(frozen=True)
class SchedulerConfig:
    """The checkpoint's scheduler in diffusers' terms: training schedule, sampler settings, class."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = BetaSchedule.SCALED_LINEAR
    prediction_type: PredictionType = PredictionType.EPSILON
    timestep_spacing: TimestepSpacing = TimestepSpacing.LEADING
    steps_offset: int = 1
    clip_sample: bool = False
    set_alpha_to_one: bool = False
    clip_sample_range: float = 1.0     # with clip_sample: the x0 estimate is clipped to [-r, r]
    original_inference_steps: int = 50   # LCM: the schedule its steps are drawn from
    timestep_scaling: float = 10.0     # LCM: time scale of the consistency boundary condition
    default_sampler: str = "ddim"      # the sampler of the checkpoint's own scheduler class
    scheduler_class: str = ""          # the diffusers class the checkpoint names ("": none)
    # SAMPLER_FIELDS the checkpoint did not set (its class's defaults filled in): another
    # sampler takes its own class's defaults for these, as diffusers' from_config does.
    defaulted_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _positive(self, "num_train_timesteps", "original_inference_steps")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(f"SchedulerConfig: expected 0 < beta_start < beta_end < 1, found "
                              f"beta_start={self.beta_start}, beta_end={self.beta_end}")
        if not isinstance(self.steps_offset, int) or isinstance(self.steps_offset, bool) \
                or not 0 <= self.steps_offset < self.num_train_timesteps:
            raise ConfigError(f"SchedulerConfig.steps_offset: expected an integer in "
                              f"[0, {self.num_train_timesteps}), found {self.steps_offset!r}")
        if self.original_inference_steps > self.num_train_timesteps:
            raise ConfigError(f"SchedulerConfig.original_inference_steps: expected at most "
                              f"num_train_timesteps={self.num_train_timesteps}, found "
                              f"{self.original_inference_steps}")
        for name in ("clip_sample_range", "timestep_scaling"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigError(f"SchedulerConfig.{name}: expected a finite number > 0, found {value!r}")
        if self.default_sampler not in SAMPLERS:
            raise ConfigError(f"SchedulerConfig.default_sampler: expected one of {list(SAMPLERS)}, "
                              f"found {self.default_sampler!r}")
        unknown = set(self.defaulted_fields) - set(SAMPLER_FIELDS)
        if unknown:
            raise ConfigError(f"SchedulerConfig.defaulted_fields: expected names from "
                              f"{list(SAMPLER_FIELDS)}, found {sorted(unknown)}")


class ConcatKind(str, enum.Enum):
    """A map concatenated to z_t on the channel axis (the LDM paper's concatenation conditioning).
    The value is the UNet graph input's name."""
    MASK = "mask"                                  # (B, 1, h, w) the repaint mask at latent size
    MASKED_IMAGE_LATENTS = "masked_image_latents"  # (B, C, h, w) the image outside the mask, encoded
    LOW_RES_IMAGE = "low_res_image"                # (B, 3, h, w) the low-resolution image in [-1, 1]
    SEGMENTATION = "segmentation"                  # (B, H, W) int32 class indices -> spatial rescaler


class ResizeMethod(str, enum.Enum):
    """torch.nn.functional.interpolate modes the spatial rescaler may use (CompVis' choices)."""
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    AREA = "area"


@dataclass(frozen=True)
class SpatialRescalerConfig:
    """CompVis `SpatialRescaler`, the paper's tau_theta for semantic maps: the one-hot map resized
    n_stages times by `multiplier`, then a learned 1x1 convolution to `out_channels`."""
    n_stages: int = 2
    n_classes: int = 182               # the one-hot map's channels (CompVis `in_channels`)
    out_channels: int = 3
    multiplier: float = 0.5
    method: ResizeMethod = ResizeMethod.BILINEAR
    bias: bool = False

    def __post_init__(self) -> None:
        _positive(self, "n_stages", "n_classes", "out_channels")
        if isinstance(self.multiplier, bool) or not isinstance(self.multiplier, (int, float)) \
                or not 0 < self.multiplier < 1:
            raise ConfigError(f"SpatialRescalerConfig.multiplier: expected a number in (0, 1), "
                              f"found {self.multiplier!r}")


@dataclass(frozen=True)
class LowResNoise:
    """The SD x4 upscaler's noise augmentation: the low-res image is noised to `noise_level` of
    `schedule` (a DDPM q_sample) and the UNet gets the level as its class label."""
    schedule: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(beta_start=0.0001, beta_end=0.02))
    max_noise_level: int = 350
    default_noise_level: int = 20

    def __post_init__(self) -> None:
        _positive(self, "max_noise_level")
        level = self.default_noise_level
        if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= self.max_noise_level:
            raise ConfigError(f"LowResNoise.default_noise_level: expected an integer in "
                              f"[0, {self.max_noise_level}], found {level!r}")
        if self.max_noise_level >= self.schedule.num_train_timesteps:
            raise ConfigError(f"LowResNoise.max_noise_level {self.max_noise_level}: expected fewer than "
                              f"the schedule's {self.schedule.num_train_timesteps} timesteps")


@dataclass(frozen=True)
class SpatialConditioning:
    """What the UNet's input concatenates to z_t, in order, and how each map is made.

    SD inpainting: (MASK, MASKED_IMAGE_LATENTS), mask {0, 1}, masked pixels 0 (grey). The paper's
    LDM inpainting: (MASKED_IMAGE_LATENTS, MASK), mask {-1, +1}, masked pixels -1, paste-back.
    Super-resolution: (LOW_RES_IMAGE,), plus `low_res_noise` for the SD x4 upscaler. Semantic
    synthesis: (SEGMENTATION,) through `rescaler`. Every map is the same in both halves of a
    classifier-free-guidance batch."""
    inputs: tuple[ConcatKind, ...]
    mask_keep: float = 0.0             # MASK value where the image is kept
    mask_repaint: float = 1.0          # MASK value where it is repainted
    masked_pixel: float = 0.0          # the value, in [-1, 1], of repainted pixels before encoding
    paste_back: bool = False           # output = the input image outside the (pixel) mask
    rescaler: SpatialRescalerConfig | None = None   # SEGMENTATION
    low_res_noise: LowResNoise | None = None        # LOW_RES_IMAGE of the SD x4 upscaler

    def __post_init__(self) -> None:
        kinds = list(self.inputs)
        if not kinds or len(set(kinds)) != len(kinds):
            raise ConfigError(f"SpatialConditioning.inputs: expected distinct maps, found "
                              f"{[k.value for k in kinds]}")
        needs = ((self.rescaler is not None, ConcatKind.SEGMENTATION, "rescaler"),
                 (self.low_res_noise is not None, ConcatKind.LOW_RES_IMAGE, "low_res_noise"),
                 (self.paste_back, ConcatKind.MASK, "paste_back"))
        for given, kind, name in needs:
            if given and kind not in kinds:
                raise ConfigError(f"SpatialConditioning.{name}: applies only with a {kind.value!r} input")
        if ConcatKind.SEGMENTATION in kinds and self.rescaler is None:
            raise ConfigError("SpatialConditioning: a 'segmentation' input needs a rescaler")
        if ConcatKind.MASKED_IMAGE_LATENTS in kinds and ConcatKind.MASK not in kinds:
            raise ConfigError("SpatialConditioning: 'masked_image_latents' needs a 'mask' input too")
        for name in ("mask_keep", "mask_repaint", "masked_pixel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
                raise ConfigError(f"SpatialConditioning.{name}: expected a number in [-1, 1], found {value!r}")
        if self.mask_keep == self.mask_repaint:
            raise ConfigError(f"SpatialConditioning: mask_keep and mask_repaint are both {self.mask_keep}")

    def describe(self) -> str:
        """One line for `ldmrt inspect` and loading notes."""
        parts = []
        for kind in self.inputs:
            if kind == ConcatKind.MASK:
                parts.append(f"mask {{keep {self.mask_keep:g}, repaint {self.mask_repaint:g}}}")
            elif kind == ConcatKind.MASKED_IMAGE_LATENTS:
                parts.append(f"masked-image latents (repainted pixels {self.masked_pixel:g})")
            elif kind == ConcatKind.LOW_RES_IMAGE:
                noise = self.low_res_noise
                parts.append("low-res image" + (f" noised to a level <= {noise.max_noise_level} (class label)"
                                                if noise else ""))
            else:
                r = self.rescaler
                parts.append(f"segmentation ({r.n_classes} classes -> {r.out_channels} channels)")  # type: ignore
        return "concatenates " + " + ".join(parts) + (", pastes the kept pixels back" if self.paste_back else "")

    @property
    def is_inpainting(self) -> bool:
        return ConcatKind.MASK in self.inputs

    @property
    def is_super_resolution(self) -> bool:
        return ConcatKind.LOW_RES_IMAGE in self.inputs


@dataclass(frozen=True)
class ModelConfig:
    """A whole latent diffusion model: autoencoder + UNet + conditioner + noise schedule."""
    name: str
    family: Family
    unet: UNetConfig
    autoencoder: AutoencoderConfig
    conditioner: ConditionerConfig | None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    scale_factor: float = 0.18215      # latent = scale_factor * first_stage_encoding
    default_image_size: int = 512
    # maps concatenated to z_t (None: the latents alone)
    spatial: SpatialConditioning | None = field(default=None, metadata=_LATER)
    # the paper's layout-to-image model: its BERT conditioner reads layout tokens, not text
    layout: LayoutTokenizerConfig | None = field(default=None, metadata=_LATER)
    # SDXL base: the second text encoder (OpenCLIP ViT-bigG with the pooled projection; diffusers
    # text_encoder_2); the UNet's context is [conditioner | conditioner_2] on the last axis
    conditioner_2: ClipTextConfig | None = field(default=None, metadata=_LATER)
    # guidance without a negative prompt takes zero embeddings (context and pooled), not an
    # encoded "" (diffusers force_zeros_for_empty_prompt: the SDXL base)
    force_zeros_for_empty_prompt: bool = field(default=False, metadata=_LATER)

    def __post_init__(self) -> None:
        if isinstance(self.scale_factor, bool) or not isinstance(self.scale_factor, (int, float)) \
                or not math.isfinite(self.scale_factor) or self.scale_factor <= 0:
            raise ConfigError(f"ModelConfig {self.name!r}: scale_factor {self.scale_factor!r}: expected a "
                              f"finite number > 0 (latents are divided by it before decoding)")
        concat = {kind: self.concat_channels(kind) for kind in (self.spatial.inputs if self.spatial else ())}
        if self.unet.in_channels != self.latent_channels + sum(concat.values()):
            parts = " + ".join(f"{c} {k.value}" for k, c in concat.items())
            raise ConfigError(f"ModelConfig {self.name!r}: UNet in_channels={self.unet.in_channels}, "
                              f"expected the {self.latent_channels} latent channels"
                              + (f" + {parts}" if parts else " (declare `spatial` conditioning for "
                                 "maps concatenated to the latents)"))
        self._check_spatial()
        if self.layout is not None:
            cond = self.conditioner
            if not isinstance(cond, BertConfig) or cond.vocab_size != self.layout.vocab_size \
                    or cond.max_seq_len != self.layout.max_length:
                found = f"{type(cond).__name__}" + (f" (vocab {cond.vocab_size}, length {cond.max_seq_len})"
                                                    if isinstance(cond, BertConfig) else "")
                raise ConfigError(f"ModelConfig {self.name!r}: layout tokens ({self.layout.vocab_size} tokens, "
                                  f"length {self.layout.max_length}) need a BertConfig conditioner of that "
                                  f"vocabulary and length, found {found}")
        if self.unet.out_channels != self.latent_channels:
            raise ConfigError(f"ModelConfig {self.name!r}: UNet out_channels={self.unet.out_channels}"
                              f", expected the latent channels {self.latent_channels}")
        self._check_text_encoders()
        context = None if self.conditioner is None else \
            sum(encoder.context_dim for encoder in self.text_encoders) or self.conditioner.context_dim
        if self.unet.use_spatial_transformer and context != self.unet.context_dim:
            raise ConfigError(f"ModelConfig {self.name!r}: UNet context_dim={self.unet.context_dim}"
                              f" but the conditioner produces {context}")

    def _check_text_encoders(self) -> None:
        if self.conditioner_2 is not None and not isinstance(self.conditioner, ClipTextConfig):
            raise ConfigError(f"ModelConfig {self.name!r}: conditioner_2 (a second text encoder) needs a "
                              f"ClipTextConfig conditioner, found {type(self.conditioner).__name__}")
        pooled = self.pooled_encoder
        if self.unet.time_ids and (pooled is None or pooled.projection_dim != self.unet.text_embeds_dim):
            raise ConfigError(f"ModelConfig {self.name!r}: the UNet's text_time vector takes a pooled text "
                              f"embedding of {self.unet.text_embeds_dim}, the text encoders give "
                              f"{pooled.projection_dim if pooled else 'none'} (ClipTextConfig.projection_dim)")
        if self.force_zeros_for_empty_prompt and not self.text_encoders:
            raise ConfigError(f"ModelConfig {self.name!r}: force_zeros_for_empty_prompt needs a text encoder")

    def _check_spatial(self) -> None:
        spatial = self.spatial
        if spatial is None:
            return
        if spatial.rescaler is not None and self.conditioner is not None:
            raise ConfigError(f"ModelConfig {self.name!r}: a spatial rescaler is the model's conditioner "
                              f"(CompVis cond_stage_model); it cannot have {type(self.conditioner).__name__} too")
        if spatial.rescaler is not None:
            reach = spatial.rescaler.multiplier ** spatial.rescaler.n_stages * self.downsampling_factor
            if abs(reach - 1.0) > 1e-6:
                raise ConfigError(f"ModelConfig {self.name!r}: the spatial rescaler resizes by "
                                  f"{spatial.rescaler.multiplier}^{spatial.rescaler.n_stages}, expected "
                                  f"1/{self.downsampling_factor} (image size -> latent size)")
        noise = spatial.low_res_noise
        if noise is not None and (self.unet.num_classes is None or self.unet.num_classes <= noise.max_noise_level):
            raise ConfigError(f"ModelConfig {self.name!r}: the low-res noise level (up to "
                              f"{noise.max_noise_level}) is the UNet's class label; expected UNet "
                              f"num_classes > {noise.max_noise_level}, found {self.unet.num_classes}")
        if noise is None and self.unet.num_classes is not None and not self.is_class_conditioned \
                and spatial.is_super_resolution and self.is_text_conditioned:
            raise ConfigError(f"ModelConfig {self.name!r}: a text-conditioned super-resolution UNet "
                              f"with class labels needs low_res_noise (the labels are its noise level)")

    def concat_channels(self, kind: ConcatKind) -> int:
        """Channels of one concatenated map."""
        if kind == ConcatKind.MASK:
            return 1
        if kind == ConcatKind.MASKED_IMAGE_LATENTS:
            return self.latent_channels
        if kind == ConcatKind.LOW_RES_IMAGE:
            return self.autoencoder.in_channels
        return self.spatial.rescaler.out_channels          # type: ignore[union-attr]

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.embed_dim

    @property
    def downsampling_factor(self) -> int:
        return self.autoencoder.downsampling_factor

    @property
    def text_encoders(self) -> tuple[ClipTextConfig, ...]:
        """The CLIP text encoders, in context order (SDXL base: two)."""
        if not isinstance(self.conditioner, ClipTextConfig):
            return ()
        return (self.conditioner,) + ((self.conditioner_2,) if self.conditioner_2 is not None else ())

    @property
    def pooled_encoder(self) -> ClipTextConfig | None:
        """The text encoder whose pooled embedding the UNet's text_time vector takes (the last
        with a projection), None without one."""
        return next((e for e in reversed(self.text_encoders) if e.projection_dim), None)

    @property
    def vae_needs_fp32(self) -> bool:
        """An fp16 export keeps the VAE graphs in fp32: SDXL with a VAE that says force_upcast, as
        StableDiffusionXL(Img2Img)Pipeline upcasts it (other pipelines ignore the flag)."""
        return self.family in (Family.SDXL, Family.SDXL_REFINER) and self.autoencoder.force_upcast

    @property
    def is_text_conditioned(self) -> bool:
        return isinstance(self.conditioner, (ClipTextConfig, BertConfig))

    @property
    def is_layout_conditioned(self) -> bool:
        """The text encoder reads layout tokens (ldmrt.layout) instead of a prompt's."""
        return self.layout is not None

    @property
    def is_class_conditioned(self) -> bool:
        return isinstance(self.conditioner, ClassEmbedderConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return from_jsonable(cls, data)


# --- (de)serialisation for the manifest ----------------------------------------------------

def to_jsonable(obj: Any) -> Any:
    """Dataclasses -> dicts (conditioners tagged with their kind), enums -> values, tuples -> lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)
               if not (f.metadata.get("omit_default") and getattr(obj, f.name) == f.default)}
        if hasattr(type(obj), "kind") and not isinstance(getattr(type(obj), "kind"), property) \
                and "kind" not in out:
            out = {"kind": type(obj).kind, **out}
        return out
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (tuple, list)):
        return [to_jsonable(x) for x in obj]
    return obj


def from_jsonable(cls: type, data: Any) -> Any:
    """Inverse of `to_jsonable`, checking every field's type; raises ConfigError on bad input."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected an object, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names - {"kind"}
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    kwargs = {name: _convert(hints[name], data[name], f"{cls.__name__}.{name}")
              for name in names if name in data}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if any(a in CONDITIONER_KINDS.values() for a in candidates):
            kind = value.get("kind") if isinstance(value, dict) else None
            if kind not in CONDITIONER_KINDS:
                raise ConfigError(f"{where}: expected kind in {sorted(CONDITIONER_KINDS)}, found {kind!r}")
            return from_jsonable(CONDITIONER_KINDS[kind], value)
        return _convert(candidates[0], value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, found {type(value).__name__}")
        return tuple(_convert(args[0], v, where) for v in value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{where}: expected one of {[e.value for e in hint]}, found {value!r}") from None
    if dataclasses.is_dataclass(hint):
        return from_jsonable(hint, value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, found {type(value).__name__} {value!r}")
    return value
