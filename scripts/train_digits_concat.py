#!/usr/bin/env python
"""Fine-tune the built-in `digits` model into its concatenation-conditioned variants (issue 17).

`digits-sr`: 8x8 -> 32x32 super-resolution: the UNet also sees the low-resolution image (a 4x4
box average of the 32x32 digit, in [-1, 1], at the 8x8 latent size), unprompted (the empty prompt).
`digits-inpaint`: SD-style inpainting: the UNet also sees the mask (1 = repaint, at latent size,
nearest) and the latents of the masked image (repainted pixels 0 = grey, as SD), prompted.

Both start from `digits` (its autoencoder and text encoder frozen and reused): the UNet's first
convolution is widened with zero weights for the new channels, as Stability's
LatentFinetuneDiffusion does, so training starts from the text-to-image model. Stage 2's recipe of
scripts/train_digits.py otherwise, by its own train_diffusion (Min-SNR-5 eps loss, AdamW,
warm-up + cosine, EMA). Writes
`<model>.safetensors` + `<model>.yaml` (LatentUpscaleFinetuneDiffusion / LatentInpaintDiffusion,
read back by ldmrt's YAML loader) + `<model>-training.json` + `<model>-loss.png`.

    python scripts/train_digits_concat.py --model digits-sr --out ldmrt/builtin/digits --minutes 8
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_digits as base  # noqa: E402  (the from-scratch script: data, loss schedule, checkpoint)

from ldmrt.checkpoints.builtin import builtin_files, builtin_source  # noqa: E402
from ldmrt.config import ConcatKind, ModelConfig, SpatialConditioning  # noqa: E402
from ldmrt.models import LatentDiffusion  # noqa: E402

log = logging.getLogger("train_digits_concat")
MODELS = {"digits-sr": SpatialConditioning(inputs=(ConcatKind.LOW_RES_IMAGE,)),
          "digits-inpaint": SpatialConditioning(inputs=(ConcatKind.MASK, ConcatKind.MASKED_IMAGE_LATENTS))}
LOW_RES = 8                       # the low-resolution side: the latent's


def widened(digits: LatentDiffusion, name: str) -> LatentDiffusion:
    """`digits` with the concat UNet of `name`: new input channels start at zero weight."""
    config: ModelConfig = digits.config
    spatial = MODELS[name]
    extra = sum(config.concat_channels(kind) for kind in spatial.inputs)
    unet = dataclasses.replace(config.unet, in_channels=config.latent_channels + extra)
    model = LatentDiffusion(dataclasses.replace(config, name=name, unet=unet, spatial=spatial))
    state = digits.state_dict()
    key = "model.diffusion_model.input_blocks.0.0.weight"
    weight = torch.zeros(model.state_dict()[key].shape)
    weight[:, :config.latent_channels] = state[key]
    model.load_state_dict({**state, key: weight}, strict=True)
    return model


def repaint_masks(batch: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 1, 32, 32) {0, 1}: half the image (top, bottom, left or right) for 70%, a random
    rectangle for the rest; 1 = repaint."""
    side = base.IMAGE_SIZE
    masks = torch.zeros(batch, 1, side, side)
    kind = torch.randint(5, (batch,), generator=generator)
    for i in range(batch):
        k = int(kind[i])
        if k < 4 and torch.rand((), generator=generator) < 0.875:
            half = side // 2
            region = [(slice(None, half), slice(None)), (slice(half, None), slice(None)),
                      (slice(None), slice(None, half)), (slice(None), slice(half, None))][k]
            masks[i, 0][region] = 1.0
        else:
            y0, x0 = torch.randint(0, side - 8, (2,), generator=generator).tolist()
            h, w = torch.randint(8, side + 1, (2,), generator=generator).tolist()
            masks[i, 0, y0:y0 + h, x0:x0 + w] = 1.0
    return masks


def concat_inputs(model: LatentDiffusion, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The maps the UNet concatenates, for training images (B, 3, 32, 32) in [-1, 1]."""
    if model.config.name == "digits-sr":
        return F.avg_pool2d(images, base.IMAGE_SIZE // LOW_RES)                    # (B, 3, 8, 8)
    masks = repaint_masks(len(images), generator)
    with torch.no_grad():
        moments = model.first_stage_model.encode(images * (1 - masks))            # repainted pixels: 0
        latents = base.sample_latents(model.config.autoencoder.kind, moments, generator)
    f = model.config.downsampling_factor
    return torch.cat([masks[:, :, ::f, ::f], latents * model.config.scale_factor], dim=1)


def fine_tune(model: LatentDiffusion, pool: base.Pool, encodings: torch.Tensor, settings: base.Settings,
              tokenizer_dir: Path, progress=None) -> list[float]:
    """Stage 2 of train_digits on [z_t, maps], text encoder and autoencoder frozen; the UNet ends
    with its EMA weights. The eps MSE of every step."""
    finetune = base.Finetune(concat=lambda images, generator: concat_inputs(model, images, generator),
                             freeze_conditioner=True, unprompted=model.config.name == "digits-sr")
    losses, ema = base.train_diffusion(model, pool, encodings, settings, tokenizer_dir, settings.seconds, progress,
                                       finetune)
    base.load_ema(model, ema)
    return losses


def train(name: str, out: Path, settings: base.Settings, pool_size: int, show_progress: bool = True) -> dict:
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    digits = builtin_source("digits").model
    _, _, tokenizer_dir = builtin_files("digits")
    model = widened(digits, name)
    pool = base.make_pool(pool_size, settings.seed)
    encodings = base.encode_pool(model, pool.images)
    with base._bar(show_progress, settings.steps, f"{name} fine-tuning") as bar:
        losses = fine_tune(model, pool, encodings, settings, tokenizer_dir, bar)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer").exists():
        shutil.copytree(tokenizer_dir, out / "tokenizer")
    path, dtype = base.write_checkpoint(model, out)
    base.plot_losses({f"{name}: fine-tuning (eps MSE)": losses}, out / f"{name}-loss.png")
    record = {
        "model": name, "from": "digits", "seed": settings.seed,
        "settings": dataclasses.asdict(settings) | {"seconds": None if math.isinf(settings.seconds) else
                                                    settings.seconds}, "pool_size": pool_size,
        "parameters": base.parameter_counts(model),
        "diffusion": {"steps": len(losses), "final_loss_mean100": base._mean_tail(losses),
                      "seconds": round(time.perf_counter() - started, 1)},
        "scale_factor": model.config.scale_factor, "wall_seconds": round(time.perf_counter() - started, 1),
        "checkpoint": {"file": path.name, "bytes": path.stat().st_size, "dtype": dtype, "yaml": f"{name}.yaml",
                       "tokenizer": "tokenizer/"},
        "machine": base.machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / f"{name}-training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    base.add_finetune_arguments(parser, minutes=8.0, lr=5e-4, batch=64, pool=6000)
    args = parser.parse_args(argv)
    settings = base.finetune_settings(args, warmup_steps=100)
    record = train(args.model, args.out, settings, args.pool, show_progress=not args.no_progress)
    log.info("done: %s", json.dumps({k: record[k] for k in ("diffusion", "wall_seconds", "checkpoint")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
