"""UNetConfig: the time-conditional UNet's config in its CompVis and per-level forms (ldmrt.config
re-exports it). Torch-free."""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

from ldmrt.config_fields import LATER as _LATER, positive as _positive
from ldmrt.errors import ConfigError


@dataclass(frozen=True)
class UNetConfig:
    """The time-conditional UNet of CompVis `openaimodel.UNetModel`, in its general form.

    The CompVis form (one base width times `channel_mult`, one ResBlock count, one head count or
    head size, one transformer depth) is written by the fields up to `norm_num_groups`. The
    per-level fields below replace parts of it, for every config diffusers' UNet2DConditionModel
    and Stability's SGM UNet allow (SDXL: depths [1, 2, 10], a head size of 64 per level); at
    their defaults they are left out of the manifest. Read the model through the accessors
    (`levels`, `width`, `res_blocks`, `heads_and_dim`, `depth`), never the raw fields.
    """
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320          # conv_in's width and the timestep sinusoid's (time embedding: 4x)
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling rates that get attention
    num_heads: int = 8                 # used when num_head_channels == -1
    num_head_channels: int = -1        # fixed head dim (SD 2.x: 64); overrides num_heads
    transformer_depth: int = 1
    context_dim: int | None = 768      # None: no cross-attention context (unconditional)
    use_spatial_transformer: bool = True   # False: the paper's plain self-attention blocks
    use_linear_in_transformer: bool = False
    upcast_attention: bool = False     # softmax (and QK^T) in fp32 whatever the graph dtype
    num_classes: int | None = None     # class embedding added to the timestep embedding
    norm_num_groups: int = 32
    # per level: the transformer's first attention attends to the context, not to itself
    # (CompVis `disable_self_attentions`, diffusers `only_cross_attention`; the SD x4 upscaler)
    disable_self_attentions: tuple[bool, ...] = field(default=(), metadata=_LATER)
    resblock_updown: bool = field(default=False, metadata=_LATER)   # resampling by ResBlocks, not convs
    # --- the per-level form (diffusers block_out_channels, layers_per_block, per-level heads,
    # transformer_layers_per_block); each replaces its CompVis field when given
    level_channels: tuple[int, ...] = field(default=(), metadata=_LATER)    # then channel_mult is ()
    level_res_blocks: tuple[int, ...] = field(default=(), metadata=_LATER)  # down level; up: one more
    level_heads: tuple[int, ...] = field(default=(), metadata=_LATER)       # head count per level
    # transformer blocks of each attention, per level and ResBlock: down (num_res_blocks each) and
    # up (num_res_blocks + 1 each), both in level order; given together or not at all
    down_depths: tuple[tuple[int, ...], ...] = field(default=(), metadata=_LATER)
    up_depths: tuple[tuple[int, ...], ...] = field(default=(), metadata=_LATER)
    middle_depth: int = field(default=-1, metadata=_LATER)    # -1: transformer_depth
    middle_block: bool = field(default=True, metadata=_LATER)  # False: diffusers mid_block_type None
    # SDXL's text_time conditioning (SGM label_emb "sequential" over the "vector"): an MLP of
    # [text_embeds (B, text_embeds_dim) | sinusoid(time_ids (B, time_ids)) of time_id_dim each]
    # added to the timestep embedding
    text_embeds_dim: int = field(default=0, metadata=_LATER)
    time_ids: int = field(default=0, metadata=_LATER)
    time_id_dim: int = field(default=256, metadata=_LATER)

    def __post_init__(self) -> None:
        _positive(self, "in_channels", "out_channels", "model_channels", "num_res_blocks",
                  "transformer_depth", "norm_num_groups", "time_id_dim")
        if bool(self.level_channels) == bool(self.channel_mult):
            raise ConfigError(f"UNetConfig: give the level widths by channel_mult or by level_channels "
                              f"(exactly one), found channel_mult={list(self.channel_mult)}, "
                              f"level_channels={list(self.level_channels)}")
        self._per_level("level_channels", self.level_channels, minimum=1)
        self._per_level("level_res_blocks", self.level_res_blocks, minimum=1)
        self._per_level("level_heads", self.level_heads, minimum=1)
        self._check_depths()
        for name in ("text_embeds_dim", "time_ids"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"UNetConfig.{name}: expected an integer >= 0, found {value!r}")
        if bool(self.text_embeds_dim) != bool(self.time_ids):
            raise ConfigError(f"UNetConfig: text_time conditioning needs both text_embeds_dim and time_ids "
                              f"> 0, found {self.text_embeds_dim} and {self.time_ids}")
        if self.time_ids and self.num_classes is not None:
            raise ConfigError("UNetConfig: num_classes and text_time conditioning (time_ids) both "
                              "embed into label_emb; give one")
        for width in (self.model_channels, *(self.width(level) for level in range(self.levels))):
            if width % self.norm_num_groups:
                raise ConfigError(f"UNetConfig: channels {width} not divisible by "
                                  f"norm_num_groups={self.norm_num_groups}")
        if self.num_head_channels == -1 and self.num_heads < 1 and not self.level_heads:
            raise ConfigError("UNetConfig: set num_heads >= 1 or num_head_channels >= 1")
        if self.use_spatial_transformer and self.context_dim is None:
            raise ConfigError("UNetConfig: a spatial transformer needs context_dim")
        if len(self.disable_self_attentions) not in (0, self.levels):
            raise ConfigError(f"UNetConfig.disable_self_attentions: expected one flag per level "
                              f"({self.levels}) or none, found {list(self.disable_self_attentions)}")
        if any(self.disable_self_attentions) and not self.use_spatial_transformer:
            raise ConfigError("UNetConfig.disable_self_attentions: needs spatial transformers (a context)")
        for level in [lv for lv in range(self.levels) if self.has_attention(lv)] + [None] * self.middle_block:
            self.heads_and_dim(level)

    def _per_level(self, name: str, values: tuple, minimum: int) -> None:
        if values and len(values) != self.levels:
            raise ConfigError(f"UNetConfig.{name}: expected one value per level ({self.levels}), "
                              f"found {list(values)}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
            raise ConfigError(f"UNetConfig.{name}: expected integers >= {minimum}, found {list(values)}")

    def _check_depths(self) -> None:
        if bool(self.down_depths) != bool(self.up_depths):
            raise ConfigError("UNetConfig: down_depths and up_depths are given together or not at all")
        for name, extra in (("down_depths", 0), ("up_depths", 1)):
            depths = getattr(self, name)
            if not depths:
                continue
            expected = [self.res_blocks(level) + extra for level in range(self.levels)]
            if [len(d) for d in depths] != expected or any(
                    isinstance(n, bool) or not isinstance(n, int) or n < 0 for d in depths for n in d):
                raise ConfigError(f"UNetConfig.{name}: expected per level {expected} depths >= 0, "
                                  f"found {[list(d) for d in depths]}")
        if isinstance(self.middle_depth, bool) or not isinstance(self.middle_depth, int) or self.middle_depth < -1:
            raise ConfigError(f"UNetConfig.middle_depth: expected an integer >= 0 (or -1: transformer_depth), "
                              f"found {self.middle_depth!r}")

    # --- the model, level by level ---------------------------------------------------------

    @property
    def levels(self) -> int:
        return len(self.level_channels or self.channel_mult)

    def width(self, level: int) -> int:
        """The channels of a level's ResBlocks."""
        if self.level_channels:
            return self.level_channels[level]
        return self.model_channels * self.channel_mult[level]

    def res_blocks(self, level: int) -> int:
        """ResBlocks of a down level (its up level has one more)."""
        return self.level_res_blocks[level] if self.level_res_blocks else self.num_res_blocks

    def has_attention(self, level: int) -> bool:
        return 2 ** level in self.attention_resolutions

    def depth(self, level: int | None, block: int = 0, up: bool = False) -> int:
        """Transformer blocks of the attention after ResBlock `block` of a level (None: the middle)."""
        if level is None:
            return self.transformer_depth if self.middle_depth == -1 else self.middle_depth
        if self.down_depths:
            return (self.up_depths if up else self.down_depths)[level][block]
        return self.transformer_depth

    def heads_and_dim(self, level: int | None) -> tuple[int, int]:
        """(number of heads, head dim) of the attention at a level (None: the middle block, which
        takes the last level's setting)."""
        level = self.levels - 1 if level is None else level
        channels = self.width(level)
        if self.level_heads:
            heads = self.level_heads[level]
            if channels % heads:
                raise ConfigError(f"UNetConfig.level_heads: level {level}'s {channels} channels not "
                                  f"divisible by {heads} heads")
            return heads, channels // heads
        if self.num_head_channels != -1:
            if channels % self.num_head_channels:
                raise ConfigError(f"UNetConfig: {channels} channels not divisible by "
                                  f"num_head_channels={self.num_head_channels}")
            return channels // self.num_head_channels, self.num_head_channels
        if channels % self.num_heads:
            raise ConfigError(f"UNetConfig: {channels} channels not divisible by "
                              f"num_heads={self.num_heads}")
        return self.num_heads, channels // self.num_heads

    @property
    def adm_in_channels(self) -> int:
        """The text_time vector's width (SGM adm_in_channels; 0 without text_time)."""
        return self.text_embeds_dim + self.time_ids * self.time_id_dim if self.time_ids else 0

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (self.levels - 1)


# SDXL's time ids: (original size, crop top-left, target size); the refiner's: (original size,
# crop top-left, aesthetic score)
SDXL_TIME_IDS = 6
SDXL_REFINER_TIME_IDS = 5


def unet_from_levels(*, widths: typing.Sequence[int], res_blocks: typing.Sequence[int],
                     depths: tuple[typing.Sequence[typing.Sequence[int]], typing.Sequence[typing.Sequence[int]], int]
                     | None = None, level_heads: typing.Sequence[int] | None = None, **fields: Any) -> UNetConfig:
    """A UNetConfig from per-level values, in the CompVis form wherever the values allow it
    (one multiplier base, one ResBlock count, one depth, one head count or size), so that a model
    CompVis can write keeps its manifest. `depths`: (down, up, middle) as UNetConfig's fields;
    `level_heads`: a head count per level (else the heads are in `fields`)."""
    levels = len(widths)
    base = fields.get("model_channels", widths[0])
    fields["model_channels"] = base
    if all(w % base == 0 for w in widths):
        fields["channel_mult"] = tuple(w // base for w in widths)
    else:
        fields.update(level_channels=tuple(widths), channel_mult=())
    if len(set(res_blocks)) == 1:
        fields["num_res_blocks"] = res_blocks[0]
    else:
        fields["level_res_blocks"] = tuple(res_blocks)
    attention = [2 ** level in fields.get("attention_resolutions", ()) for level in range(levels)]
    if depths is not None:
        down, up, middle = depths
        used = {d for level in range(levels) if attention[level] for d in (*down[level], *up[level])}
        used |= {middle} if fields.get("middle_block", True) else set()
        if len(used) == 1 and min(used) >= 1:
            fields["transformer_depth"] = used.pop()
        else:
            fields.update(down_depths=tuple(tuple(d) for d in down), up_depths=tuple(tuple(d) for d in up),
                          middle_depth=middle)
    if level_heads is not None:
        used_levels = [level for level in range(levels) if attention[level]] + [levels - 1]
        counts = {level_heads[level] for level in used_levels}
        sizes = {widths[level] / level_heads[level] for level in used_levels}
        if len(counts) == 1:
            fields.update(num_heads=counts.pop(), num_head_channels=-1)
        elif len(sizes) == 1 and float(next(iter(sizes))).is_integer():
            fields.update(num_heads=8, num_head_channels=int(sizes.pop()))
        else:
            fields["level_heads"] = tuple(level_heads)
    return UNetConfig(**fields)
