"""Any UNet2DConditionModel config that diffusers' SD / SDXL pipelines run: ldmrt reads its config.json,
converts its weights (strict load) and matches its output (relative L2 <= 1e-5, fp32); the options
ldmrt does not implement are refused by name before anything is built.

The strategy draws only configs diffusers itself builds and runs; the comparison builds the diffusers
model first, so a config diffusers rejects fails there, not in ldmrt.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldmrt.checkpoints.diffusers_folder import unet_config_from_diffusers
from ldmrt.errors import CheckpointError
from ldmrt.models.convert import unet_from_diffusers
from ldmrt.models.unet import UNetModel
from tests.reference import perturb_, rel_l2
from tests.test_models import TOL

diffusers = pytest.importorskip("diffusers")

WHERE = "unet/config.json"
CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
UP_OF = {CROSS_DOWN: "CrossAttnUpBlock2D", PLAIN_DOWN: "UpBlock2D"}
MID_CROSS = "UNetMidBlock2DCrossAttn"
MAX_WIDTH = 64


# --- configs and inputs -----------------------------------------------------------------------

def unet_json(**fields: Any) -> dict[str, Any]:
    """A config.json dict; up_block_types mirror down_block_types unless given."""
    config = {"_class_name": "UNet2DConditionModel", "sample_size": 16, **fields}
    config.setdefault("up_block_types", [UP_OF[t] for t in reversed(config["down_block_types"])])
    return config


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _one_or_per_level(draw, element: st.SearchStrategy, levels: int):
    """One value for every level, or a per-level list (diffusers accepts both)."""
    if draw(st.booleans()):
        return draw(element)
    return draw(st.lists(element, min_size=levels, max_size=levels))


@st.composite
def unet_configs(draw) -> dict[str, Any]:
    """config.json of a random tiny UNet2DConditionModel that diffusers builds and runs."""
    levels = draw(st.integers(1, 4))
    groups = draw(st.sampled_from([8, 16]))
    widths = draw(st.lists(st.sampled_from(range(groups, MAX_WIDTH + 1, groups)), min_size=levels, max_size=levels))
    down = draw(st.lists(st.sampled_from([CROSS_DOWN, PLAIN_DOWN]), min_size=levels, max_size=levels))
    mid = draw(st.sampled_from([MID_CROSS, None]))
    layers = _one_or_per_level(draw, st.integers(1, 2), levels)
    layer_list = [layers] * levels if isinstance(layers, int) else layers

    # diffusers' attention_head_dim is the head COUNT per level; it must divide the width where a
    # transformer uses it: the attention levels, and the last level's for a cross-attention mid block
    used = [i for i, kind in enumerate(down) if kind == CROSS_DOWN] + ([levels - 1] if mid else [])
    if draw(st.booleans()):
        common = math.gcd(*(widths[i] for i in used)) if used else groups
        heads: int | list[int] = draw(st.sampled_from(_divisors(common)))
    else:
        heads = [draw(st.sampled_from(_divisors(w)) if i in used else st.integers(1, 8))
                 for i, w in enumerate(widths)]

    depth = st.integers(0, 2)       # 0: a Transformer2DModel with norm and projections, no blocks
    extra: dict[str, Any] = {}
    form = draw(st.sampled_from(["one", "per-level", "per-resnet"]))
    if form == "one":
        depths: Any = draw(depth)
    elif form == "per-level":       # SDXL's [1, 2, 10]
        depths = draw(st.lists(depth, min_size=levels, max_size=levels))
    else:                           # per ResNet; diffusers then needs the up path's own list
        def per_resnet(level: int, resnets: int):
            # an attention-free level ignores its entry, whatever its length (test_asymmetrical_unet)
            count = st.just(resnets) if down[level] == CROSS_DOWN else st.integers(1, 3)
            return st.one_of(depth, count.flatmap(lambda n: st.lists(depth, min_size=n, max_size=n)))
        depths = [draw(per_resnet(i, layer_list[i])) for i in range(levels)]
        extra["reverse_transformer_layers_per_block"] = [draw(per_resnet(i, layer_list[i] + 1))
                                                         for i in reversed(range(levels))]

    context_dim = draw(st.sampled_from([8, 16, 24, 32]))
    # class labels (the x4 upscaler's noise level) or SDXL's added conditioning; no pipeline passes both
    embedding = draw(st.sampled_from([None, "class", "text_time"]))
    if embedding == "class":
        extra["num_class_embeds"] = draw(st.integers(2, 10))
    elif embedding == "text_time":  # SDXL: pooled text (B, P) + time ids (B, n) -> add_embedding
        time_dim = draw(st.sampled_from([4, 8, 16]))
        extra.update(addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                     projection_class_embeddings_input_dim=draw(st.sampled_from([8, 16, 32])) + 6 * time_dim)
    in_channels, out_channels = draw(st.sampled_from([(4, 4), (9, 4), (8, 4), (4, 8), (3, 3)]))
    return unet_json(
        in_channels=in_channels, out_channels=out_channels, norm_num_groups=groups, block_out_channels=widths,
        down_block_types=down, mid_block_type=mid, layers_per_block=layers, attention_head_dim=heads,
        transformer_layers_per_block=depths, use_linear_projection=draw(st.booleans()),
        upcast_attention=draw(st.booleans()),
        only_cross_attention=_one_or_per_level(draw, st.booleans(), levels),
        cross_attention_dim=context_dim if draw(st.booleans()) else [context_dim] * levels, **extra)


@dataclass(frozen=True)
class Inputs:
    """The sizes of one forward call; the tensors come from `seed`."""
    batch: int
    height: int
    width: int
    tokens: int = 5
    time_ids: int = 0        # SDXL's 6 (original size, crop, target size) or the refiner's 5 (..., aesthetic)
    seed: int = 0


@st.composite
def unet_inputs(draw, config: dict[str, Any]) -> Inputs:
    """Sides divisible by the downsampling factor or not (diffusers then forwards upsample_size)."""
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    # > factor: the deepest level keeps 2+ pixels, so GroupNorm never sees one value (width == groups)
    smallest = max(5, factor + 1)
    side = st.one_of(st.sampled_from([s for s in range(smallest, 17) if s % factor == 0]),
                     st.integers(smallest, 16))
    text_time = config.get("addition_embed_type") == "text_time"
    return Inputs(batch=draw(st.integers(1, 2)), height=draw(side), width=draw(side), tokens=draw(st.integers(1, 8)),
                  time_ids=draw(st.sampled_from([5, 6])) if text_time else 0, seed=draw(st.integers(0, 2 ** 16)))


@dataclass(frozen=True)
class Conditioning:
    """One forward call's tensors, passed to diffusers and to ldmrt by each one's names."""
    sample: torch.Tensor                  # (B, C_in, H, W)
    timesteps: torch.Tensor               # (B,)
    context: torch.Tensor                 # (B, L, D) encoder_hidden_states
    class_labels: torch.Tensor | None     # (B,)
    text_embeds: torch.Tensor | None      # (B, P) pooled text embedding
    time_ids: torch.Tensor | None         # (B, n)

    def diffusers(self, model) -> torch.Tensor:
        added = None if self.time_ids is None else {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return model(self.sample, self.timesteps, encoder_hidden_states=self.context,
                     class_labels=self.class_labels, added_cond_kwargs=added).sample

    def ldmrt(self, model: UNetModel) -> torch.Tensor:
        added = {} if self.time_ids is None else {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return model(self.sample, self.timesteps, self.context, y=self.class_labels, **added)


def _time_ids(batch: int, count: int, g: torch.Generator) -> torch.Tensor:
    """What SDXL's pipelines pass: sizes 512..1024, crops 0..64, an aesthetic score 2.5..6."""
    def sizes() -> torch.Tensor:
        return torch.randint(512, 1025, (batch, 2), generator=g).float()
    crop = torch.randint(0, 65, (batch, 2), generator=g).float()
    if count == 6:
        return torch.cat([sizes(), crop, sizes()], dim=1)                          # (B, 6)
    return torch.cat([sizes(), crop, 2.5 + 3.5 * torch.rand(batch, 1, generator=g)], dim=1)  # (B, 5)


def conditioning(config: dict[str, Any], inputs: Inputs) -> Conditioning:
    g = torch.Generator().manual_seed(inputs.seed)
    b = inputs.batch
    context_dim = config["cross_attention_dim"]
    context_dim = context_dim[0] if isinstance(context_dim, list) else context_dim
    classes = config.get("num_class_embeds")
    text_embeds = time_ids = None
    if inputs.time_ids:
        width = config["projection_class_embeddings_input_dim"] - inputs.time_ids * config["addition_time_embed_dim"]
        text_embeds = torch.randn(b, width, generator=g)
        time_ids = _time_ids(b, inputs.time_ids, g)
    return Conditioning(
        sample=torch.randn(b, config.get("in_channels", 4), inputs.height, inputs.width, generator=g),
        timesteps=torch.randint(0, 1000, (b,), generator=g).float(),
        context=torch.randn(b, inputs.tokens, context_dim, generator=g),
        class_labels=torch.randint(0, classes, (b,), generator=g) if classes else None,
        text_embeds=text_embeds, time_ids=time_ids)


def reference_unet(config: dict[str, Any], seed: int):
    torch.manual_seed(seed)
    return perturb_(diffusers.UNet2DConditionModel.from_config(config), seed=seed).eval()


def assert_matches_diffusers(config: dict[str, Any], inputs: Inputs, as_saved: bool = True) -> None:
    """`as_saved`: ldmrt reads the config.json save_pretrained writes (every field), else `config` as given."""
    with torch.device("meta"):      # diffusers accepts the config (no weights: a refusal shrinks fast)
        saved = json.loads(diffusers.UNet2DConditionModel.from_config(config).to_json_string())
    unet_config = unet_config_from_diffusers(saved if as_saved else config, WHERE)
    reference = reference_unet(config, inputs.seed)
    tensors = conditioning(config, inputs)
    with torch.no_grad():
        expected = tensors.diffusers(reference)
    ours = UNetModel(unet_config).eval()
    ours.load_state_dict(unet_from_diffusers(reference.state_dict(), unet_config), strict=True)
    with torch.no_grad():
        found = tensors.ldmrt(ours)
    assert found.shape == expected.shape
    assert rel_l2(found, expected) <= TOL


# tiny models: one thread is faster, and on a busy machine many times faster, than several
from tests.test_pipeline import one_torch_thread  # noqa: E402,F401  (an autouse module fixture)


# --- the property ------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, derandomize=True, database=None, report_multiple_bugs=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_unet_configs_match_diffusers(data) -> None:
    config = data.draw(unet_configs(), label="config")
    inputs = data.draw(unet_inputs(config), label="inputs")
    assert_matches_diffusers(config, inputs, as_saved=data.draw(st.booleans(), label="as_saved"))


# --- named configs -----------------------------------------------------------------------------

SDXL_LIKE = unet_json(
    norm_num_groups=16, block_out_channels=[16, 32, 64], down_block_types=[PLAIN_DOWN, CROSS_DOWN, CROSS_DOWN],
    layers_per_block=2, attention_head_dim=[2, 4, 8], transformer_layers_per_block=[1, 2, 3],
    use_linear_projection=True, cross_attention_dim=32, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
REFINER_LIKE = unet_json(
    norm_num_groups=16, block_out_channels=[16, 32, 64, 64],
    down_block_types=[PLAIN_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN], layers_per_block=2,
    attention_head_dim=[2, 4, 8, 8], transformer_layers_per_block=2, use_linear_projection=True,
    cross_attention_dim=24, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 5 * 8)

NAMED = {
    # widths that are not multiples of the first, one head count for all
    "channels-32-48-64": (unet_json(norm_num_groups=16, block_out_channels=[32, 48, 64],
                                    down_block_types=[CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN], layers_per_block=1,
                                    attention_head_dim=8, cross_attention_dim=16),
                          Inputs(batch=2, height=16, width=12)),
    # head sizes 4, 8, 8: neither a fixed count nor a fixed size
    "heads-4-6-8": (unet_json(norm_num_groups=16, block_out_channels=[16, 48, 64], down_block_types=[CROSS_DOWN] * 3,
                              layers_per_block=1, attention_head_dim=[4, 6, 8], cross_attention_dim=16),
                    Inputs(batch=2, height=8, width=12)),
    "sdxl-like": (SDXL_LIKE, Inputs(batch=2, height=16, width=12, time_ids=6)),
    "refiner-like": (REFINER_LIKE, Inputs(batch=2, height=16, width=8, time_ids=5)),
    "sdxl-like-odd-sides": (SDXL_LIKE, Inputs(batch=1, height=13, width=9, time_ids=6, seed=3)),
    # fixed head size 16, a level with a 0-block transformer, per-level ResNet counts
    "asymmetric": (unet_json(norm_num_groups=16, block_out_channels=[32, 48, 96], down_block_types=[CROSS_DOWN] * 3,
                             layers_per_block=[1, 2, 2], attention_head_dim=[2, 3, 6],
                             transformer_layers_per_block=[0, 1, 2], cross_attention_dim=16),
                   Inputs(batch=2, height=12, width=8)),
    # diffusers' test_asymmetrical_unet: per-ResNet depths, the up path's given separately
    "per-resnet-depths": (unet_json(norm_num_groups=8, block_out_channels=[16, 32],
                                    down_block_types=[CROSS_DOWN, PLAIN_DOWN], layers_per_block=2,
                                    attention_head_dim=2, cross_attention_dim=8,
                                    transformer_layers_per_block=[[3, 2], 1],
                                    reverse_transformer_layers_per_block=[[3, 4], 1]),
                          Inputs(batch=2, height=8, width=8)),
    "inpainting-9-to-4": (unet_json(in_channels=9, norm_num_groups=16, block_out_channels=[32, 64],
                                    down_block_types=[CROSS_DOWN, CROSS_DOWN], layers_per_block=1,
                                    attention_head_dim=4, cross_attention_dim=16),
                          Inputs(batch=2, height=10, width=8)),
    "class-labels-no-mid-block": (unet_json(norm_num_groups=8, block_out_channels=[16, 24],
                                            down_block_types=[CROSS_DOWN, PLAIN_DOWN], mid_block_type=None,
                                            layers_per_block=1, attention_head_dim=2, cross_attention_dim=8,
                                            num_class_embeds=10),
                                  Inputs(batch=2, height=8, width=12)),
}


@pytest.mark.parametrize("name", list(NAMED))
def test_named_unet_configs_match_diffusers(name: str) -> None:
    config, inputs = NAMED[name]
    assert_matches_diffusers(config, inputs)


@pytest.mark.parametrize("name", ["sdxl-like", "refiner-like"])
def test_time_ids_change_the_reference_output(name: str) -> None:
    """The parity above can fail for a UNet that ignores time_ids: diffusers' output depends on them."""
    config, inputs = NAMED[name]
    reference = reference_unet(config, inputs.seed)
    tensors = conditioning(config, inputs)
    shifted = dataclasses.replace(tensors, time_ids=tensors.time_ids + 64)
    with torch.no_grad():
        assert rel_l2(shifted.diffusers(reference), tensors.diffusers(reference)) > TOL


# --- refusals ----------------------------------------------------------------------------------

REFUSAL_BASE = unet_json(norm_num_groups=8, block_out_channels=[16, 32], down_block_types=[CROSS_DOWN, PLAIN_DOWN],
                         layers_per_block=1, attention_head_dim=2, cross_attention_dim=16)

# field -> the override diffusers builds and ldmrt does not run; a field ldmrt comes to support
# moves from here to NAMED
REFUSED = {
    "dual_cross_attention": {"dual_cross_attention": True},
    "encoder_hid_dim": {"encoder_hid_dim": 16},
    "time_cond_proj_dim": {"time_cond_proj_dim": 8},
    "class_embed_type": {"class_embed_type": "projection", "projection_class_embeddings_input_dim": 8},
    "addition_embed_type": {"addition_embed_type": "text", "addition_embed_type_num_heads": 4},
    "time_embedding_type": {"time_embedding_type": "fourier"},
    "resnet_time_scale_shift": {"resnet_time_scale_shift": "scale_shift"},
    "cross_attention_dim": {"cross_attention_dim": [16, 24]},
    "down_block_types": {"down_block_types": ["SimpleCrossAttnDownBlock2D", PLAIN_DOWN],
                         "up_block_types": ["UpBlock2D", "SimpleCrossAttnUpBlock2D"]},
    "attention_type": {"attention_type": "gated"},
    "mid_block_type": {"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"},
    "conv_in_kernel": {"conv_in_kernel": 5},
    # class labels and SDXL's added conditioning at once (no diffusers pipeline passes both)
    "num_class_embeds": {"num_class_embeds": 10, "addition_embed_type": "text_time", "addition_time_embed_dim": 4,
                         "projection_class_embeddings_input_dim": 8 + 6 * 4},
}


@pytest.mark.parametrize("field", list(REFUSED))
def test_unsupported_fields_are_refused_by_name(field: str) -> None:
    config = {**REFUSAL_BASE, **REFUSED[field]}
    with torch.device("meta"):              # diffusers accepts it (no weights needed to show that)
        diffusers.UNet2DConditionModel.from_config(config)
    with pytest.raises(CheckpointError) as refused:
        unet_config_from_diffusers(config, WHERE)
    assert field in str(refused.value)
    assert WHERE in str(refused.value)
