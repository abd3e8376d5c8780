#!/usr/bin/env python
"""Fine-tune the built-in `digits` model into `digits-layout`, the LDM paper's layout-to-image
system (sec. 4.3.1) in small: one to three digits placed by boxes on a 64x64 canvas (issue 18).

tau_theta is an unmasked BERT over the layout tokens of ldmrt.layout ((class, top-left cell,
bottom-right cell) per box on a 17x17 grid — one cell per latent pixel — then the crop), trained
from scratch; the UNet and the autoencoder are `digits`' (the convolutional UNet runs on the 16x16
latents of a 64x64 canvas as it is; the autoencoder is frozen). 10% of the layouts are dropped to
the empty layout (padding and the crop only), the unconditional input of classifier-free guidance.
Stage 2's recipe of scripts/train_digits.py otherwise, by its own train_diffusion. Writes
`digits-layout.safetensors` + `.yaml` (CompVis' layout2img form: a BERTEmbedder with
`use_tokenizer: false` over `coordinates_bbox`), `-training.json` and `-loss.png`.
`--attention-weight W` adds AttentionSupervision (a training-only loss on the cross-attention that
teaches which class goes in which box; docs/layout-and-guidance.md). The shipped model's stages:

    python scripts/train_digits_layout.py --out ldmrt/builtin/digits --minutes 38 --placement free
    python scripts/train_digits_layout.py --out ldmrt/builtin/digits --minutes 32 --placement cells --resume --lr 5e-4 --seed 1
    python scripts/train_digits_layout.py --out ldmrt/builtin/digits --minutes 10 --placement cells --resume --lr 5e-4 --attention-weight 0.1
    python scripts/train_digits_layout.py --out ldmrt/builtin/digits --minutes 12 --placement cells --resume --lr 3e-4 --attention-weight 0.1 --seed 2
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_digits as base  # noqa: E402  (the from-scratch script: data, loss schedule, checkpoint)

from ldmrt.checkpoints.builtin import BUILTIN_DIR, builtin_source  # noqa: E402
from ldmrt.config import BertConfig, ModelConfig  # noqa: E402
from ldmrt.digits.layouts import CANVAS, MAX_DIGITS, layout_samples  # noqa: E402
from ldmrt.layout import TOKENS_PER_OBJECT, LayoutTokenizerConfig, encode_layout  # noqa: E402
from ldmrt.models import LatentDiffusion  # noqa: E402
from ldmrt.models.layers import split_heads  # noqa: E402
from ldmrt.models.unet import CrossAttention  # noqa: E402

log = logging.getLogger("train_digits_layout")
NAME = "digits-layout"
# 17 x 17 cells (4 pixels, one latent pixel, apart) need more than 289 tokens; the last pads
LAYOUT = LayoutTokenizerConfig(vocab_size=17 * 17 + 1, max_objects=MAX_DIGITS, n_classes=10)


def layout_model(digits: LatentDiffusion) -> LatentDiffusion:
    """`digits`' UNet and autoencoder with a fresh BERT over layout tokens (digits' width and depth)."""
    config: ModelConfig = digits.config
    conditioner = dataclasses.replace(config.conditioner, vocab_size=LAYOUT.vocab_size,
                                      max_seq_len=LAYOUT.max_length, pad_token_id=LAYOUT.pad_token)
    assert isinstance(conditioner, BertConfig)
    model = LatentDiffusion(dataclasses.replace(config, name=NAME, conditioner=conditioner, layout=LAYOUT,
                                                default_image_size=CANVAS))
    kept = {k: v for k, v in digits.state_dict().items() if not k.startswith("cond_stage_model.")}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith("cond_stage_model.") for k in missing), (missing, unexpected)
    return model


def make_pool(count: int, seed: int, placement: str) -> tuple[base.Pool, torch.Tensor]:
    """Canvases (N, 3, 64, 64) in [-1, 1] with their layouts (as JSON, the pool's prompts) and tokens (N, L)."""
    samples = layout_samples(count, seed, placement=placement)
    images = torch.from_numpy(np.stack([image for image, _ in samples])).permute(0, 3, 1, 2).contiguous() * 2 - 1
    tokens = torch.from_numpy(np.stack([encode_layout(LAYOUT, layout) for _, layout in samples]).astype(np.int64))
    pool = base.Pool(images=images, prompts=[json.dumps(layout) for _, layout in samples],
                     digits=torch.tensor([layout[0]["class"] for _, layout in samples]))
    return pool, tokens


def object_maps(layouts: list[list[dict]], side: int) -> torch.Tensor:
    """(N, side*side) int64: which object's box holds each pixel's centre of a side x side grid, -1 for none."""
    centres = (np.arange(side) + 0.5) / side
    maps = np.full((len(layouts), side, side), -1, np.int64)
    for n, layout in enumerate(layouts):
        for k, item in enumerate(layout):
            x0, y0, x1, y1 = item["box"]
            inside_y = (centres >= y0) & (centres < y1)
            inside_x = (centres >= x0) & (centres < x1)
            maps[n][np.ix_(inside_y, inside_x)] = k
    return torch.from_numpy(maps.reshape(len(layouts), -1))


class AttentionSupervision:
    """A training-only loss that teaches the binding of class to box: every cross-attention head, at
    every pixel inside box k, should put its attention on object k's three tokens (class, top-left,
    bottom-right): the mean of -log(that share) over heads and in-box pixels, times `weight`. The
    model stays the paper's (the loss reads the attention the UNet computes anyway); only the
    gradient that reaches the binding is made direct: with the eps loss alone, 9,400 steps left
    which digit goes in which box at chance (docs/layout-and-guidance.md)."""

    def __init__(self, model: LatentDiffusion, layouts: list[list[dict]], weight: float):
        self.weight, self.layouts, self.seen, self.values = weight, layouts, [], []
        self.maps: dict[int, torch.Tensor] = {}     # pixels of an attention level's grid -> object_maps
        self.layers = [m for name, m in model.unet.named_modules() if name.endswith("attn2")
                       and isinstance(m, CrossAttention)]
        for layer in self.layers:
            layer.register_forward_pre_hook(self._keep)

    def _keep(self, layer: CrossAttention, args: tuple) -> None:
        if layer.training:
            self.seen.append((layer, args[0], args[1]))

    def _maps(self, pixels: int) -> torch.Tensor:
        """object_maps of every layout on a level's square grid of `pixels` (made once per level)."""
        if pixels not in self.maps:
            self.maps[pixels] = object_maps(self.layouts, math.isqrt(pixels))
        return self.maps[pixels]

    def __call__(self, rows: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        terms = []
        for layer, x, context in self.seen:
            q = split_heads(layer.to_q(x), layer.heads)                               # (B, h, T, d)
            k = split_heads(layer.to_k(context), layer.heads)                         # (B, h, S, d)
            weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            objects = weights[..., :TOKENS_PER_OBJECT * LAYOUT.max_objects]
            share = objects.unflatten(-1, (LAYOUT.max_objects, TOKENS_PER_OBJECT)).sum(-1)  # (B, h, T, K)
            where = self._maps(x.shape[1])[rows]                                       # (B, T)
            where = torch.where(drop[:, None], -1, where)
            chosen = share.gather(-1, where.clamp(min=0)[:, None, :, None].expand(-1, share.shape[1], -1, 1))[..., 0]
            inside = (where >= 0)[:, None, :].expand_as(chosen)
            if inside.any():
                terms.append(-chosen[inside].clamp(min=1e-6).log().mean())
        self.seen.clear()
        if not terms:
            return torch.zeros(())
        loss = torch.stack(terms).mean()
        self.values.append(loss.item())
        return self.weight * loss


def train(out: Path, settings: base.Settings, pool_size: int, placement: str, resume: bool,
          show_progress: bool = True, attention_weight: float = 0.0) -> dict:
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    if resume:       # a further stage from the shipped digits-layout (its record keeps the earlier ones)
        model = builtin_source(NAME).model
        assert model.config.layout == LAYOUT, model.config.layout
        earlier = json.loads((BUILTIN_DIR / f"{NAME}-training.json").read_text())
        stages = earlier["stages"] if "stages" in earlier else \
            [{k: earlier[k] for k in ("settings", "pool_size", "diffusion")} | {"placement": "free", "from": "digits"}]
    else:
        model = layout_model(builtin_source("digits").model)
        stages = []
    pool, tokens = make_pool(pool_size, settings.seed, placement)
    data_seconds = time.perf_counter() - started
    encodings = base.encode_pool(model, pool.images)
    empty = torch.from_numpy(encode_layout(LAYOUT, []).astype(np.int64))

    def context(rows: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        return model.conditioner(torch.where(drop[:, None], empty, tokens[rows]))

    supervision = AttentionSupervision(model, [json.loads(p) for p in pool.prompts], attention_weight) \
        if attention_weight > 0 else None
    with base._bar(show_progress, settings.steps, f"{NAME} fine-tuning") as bar:
        losses, ema = base.train_diffusion(model, pool, encodings, settings, None, settings.seconds, bar,
                                           base.Finetune(context=context, auxiliary=supervision))
    base.load_ema(model, ema)
    path, dtype = base.write_checkpoint(model, out)
    base.plot_losses({f"{NAME}: fine-tuning stage {len(stages) + 1} (eps MSE)": losses}, out / f"{NAME}-loss.png")
    stage = {"from": NAME if resume else "digits", "placement": placement,
             "settings": dataclasses.asdict(settings) | {"seconds": None if math.isinf(settings.seconds) else
                                                         settings.seconds}, "pool_size": pool_size,
             "attention_weight": attention_weight,
             "attention_loss_mean100": base._mean_tail(supervision.values) if supervision else None,
             "diffusion": {"steps": len(losses), "final_loss_mean100": base._mean_tail(losses),
                           "seconds": round(time.perf_counter() - started - data_seconds, 1)}}
    record = {
        "model": NAME, "from": "digits", "seed": settings.seed, "stages": [*stages, stage],
        "parameters": base.parameter_counts(model), "layout": dataclasses.asdict(LAYOUT),
        "diffusion": {"steps": sum(s["diffusion"]["steps"] for s in [*stages, stage]),
                      "seconds": round(sum(s["diffusion"]["seconds"] for s in [*stages, stage]), 1)},
        "scale_factor": model.config.scale_factor, "data_seconds": round(data_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "checkpoint": {"file": path.name, "bytes": path.stat().st_size, "dtype": dtype, "yaml": f"{NAME}.yaml",
                       "tokenizer": None},
        "machine": base.machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / f"{NAME}-training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    base.add_finetune_arguments(parser, minutes=30.0, lr=1e-3, batch=32, pool=8000)
    parser.add_argument("--placement", choices=["free", "cells"], default="free",
                        help="boxes anywhere, or one per cell of the canvas' 2x2 grid")
    parser.add_argument("--resume", action="store_true", help="continue from the shipped digits-layout")
    parser.add_argument("--attention-weight", type=float, default=0.0,
                        help="weight of the attention-supervision loss (0: the eps loss alone)")
    args = parser.parse_args(argv)
    settings = base.finetune_settings(args, warmup_steps=200)
    record = train(args.out, settings, args.pool, args.placement, args.resume, show_progress=not args.no_progress,
                   attention_weight=args.attention_weight)
    log.info("done: %s", json.dumps({k: record[k] for k in ("diffusion", "wall_seconds", "checkpoint")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
