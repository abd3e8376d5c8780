#!/usr/bin/env python
"""Train ldmrt's built-in models from scratch on CPU and write them as CompVis checkpoints.

`digits`: a KL autoencoder (32x32x3 -> 8x8x4), an LDM-BERT text encoder over a WordPiece
vocabulary of the prompt words and a cross-attention UNet, trained jointly on the diffusion loss.
`digits-vq`: a VQ autoencoder and a class-conditional UNet (labels 0-9, label 10 = "no class" for
guidance, as ldmrt's class path expects).

Stage 1 trains the autoencoder (L1 + L2 reconstruction, a small KL term or the VQ codebook and
commitment losses); stage 2 freezes it, encodes a pool of images once, sets the latent scale to
1/std of the latents (as LDM's scale_by_std) and trains UNet + conditioner together on epsilon
prediction with Min-SNR-5 loss weights (Hang et al. 2023: the low-noise steps, which teach no
shape, stop dominating the gradient), AdamW at 1e-3 with a 200-step warm-up and a cosine decay to
5% over the time budget, 10% of the conditions dropped (empty prompt / "no class") for
classifier-free guidance, and one EMA over UNet and conditioner (the UNet attends to the
conditioner of its own steps). 70% of the digits prompts name colours. The result is
`<model>.safetensors` + `<model>.yaml` (+ `tokenizer/vocab.txt`), the layout `ldmrt export PATH`
takes for a user's checkpoint, with `<model>-training.json` and `<model>-loss.png`.

    python scripts/train_digits.py --model digits --out ldmrt/builtin/digits      # 28 minutes
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ldmrt.config import (AutoencoderConfig, AutoencoderKind, BertConfig, BetaSchedule, ClassEmbedderConfig,
                          Family, ModelConfig, SchedulerConfig, UNetConfig)
from ldmrt.errors import ConfigError
from ldmrt.checkpoints.compvis_yaml import compvis_yaml
from ldmrt.models import LatentDiffusion
from ldmrt.tokenizer import BERT_SPECIALS, WORDPIECE_PREFIX, load_tokenizer

log = logging.getLogger("train_digits")

MODELS = ("digits", "digits-vq")
IMAGE_SIZE = 32
TEXT_LENGTH = 16                  # [CLS] + up to 14 tokens + [SEP]; the longest prompt is ~8
NUM_DIGITS = 10
NO_CLASS = NUM_DIGITS             # the class-conditional UNet's "no class" label (guidance)
MAX_CHECKPOINT_BYTES = 10 * 1024 * 1024
POOL_SIZE = 12000                 # training images rendered once (augmented, coloured)
# CompVis "linear" (linear in sqrt(beta)) with LDM's small-image range: the last step keeps
# ~4% of the signal's std, so sampling from pure noise starts close to what training saw.
SCHEDULER = SchedulerConfig(beta_start=0.0015, beta_end=0.0195, beta_schedule=BetaSchedule.SCALED_LINEAR)


# --- the two models ----------------------------------------------------------------------

def model_config(name: str, vocab_size: int = 0, scale_factor: float = 1.0) -> ModelConfig:
    """The architecture of `digits` (text, KL) or `digits-vq` (class labels, VQ)."""
    if name == "digits":
        if vocab_size < len(BERT_SPECIALS) + 1:
            raise ConfigError(f"digits: vocab_size {vocab_size}: expected the WordPiece vocabulary's size "
                              f"(> {len(BERT_SPECIALS)})", field="vocab_size")
        # x-transformers' Encoder as CompVis' BERTEmbedder builds it: 8 heads of 64 (not in the YAML)
        conditioner = BertConfig(vocab_size=vocab_size, n_embed=64, n_layer=2, heads=8, dim_head=64,
                                 ff_mult=4, max_seq_len=TEXT_LENGTH, pad_token_id=0)
        autoencoder = AutoencoderConfig(kind=AutoencoderKind.KL, embed_dim=4, z_channels=4, ch=32,
                                        ch_mult=(1, 2, 2), num_res_blocks=1)
    elif name == "digits-vq":
        conditioner = ClassEmbedderConfig(n_classes=NUM_DIGITS + 1, embed_dim=64)
        autoencoder = AutoencoderConfig(kind=AutoencoderKind.VQ, embed_dim=4, z_channels=4, ch=32,
                                        ch_mult=(1, 2, 2), num_res_blocks=1, n_embed=256)
    else:
        raise ConfigError(f"model {name!r}: expected one of {list(MODELS)}", field="model")
    # 64 channels at both latent levels (8x8, 4x4), attention at both: 1.7 M parameters, ~5 steps/s
    # at batch 64 on 2 cores; widening the 4x4 level to 128 costs 2.5x the parameters and 1.6x the time
    unet = UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 1), num_res_blocks=1,
                      attention_resolutions=(1, 2), num_heads=4, context_dim=64)
    return ModelConfig(name=name, family=Family.LDM, unet=unet, autoencoder=autoencoder, conditioner=conditioner,
                       scheduler=SCHEDULER, scale_factor=scale_factor, default_image_size=IMAGE_SIZE)


def parameter_counts(model: LatentDiffusion) -> dict[str, int]:
    parts = {"unet": model.unet, "autoencoder": model.first_stage_model, "conditioner": model.conditioner}
    return {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items() if part is not None}


# --- tokenizer ---------------------------------------------------------------------------

def wordpiece_vocabulary(words: list[str]) -> list[str]:
    """[PAD]=0 and BERT's specials, every prompt word, then single characters (and their ## forms)
    so that a word outside the prompts still splits into pieces instead of [UNK]."""
    characters = "abcdefghijklmnopqrstuvwxyz0123456789"
    tokens = list(BERT_SPECIALS)
    tokens += sorted({w.lower() for w in words if w} - set(tokens))
    tokens += [c for c in characters + ".,!?'-" if c not in tokens]
    tokens += [WORDPIECE_PREFIX + c for c in characters]
    return list(dict.fromkeys(tokens))


def write_tokenizer(folder: Path, words: list[str]) -> list[str]:
    """tokenizer/vocab.txt (+ tokenizer_config.json) as a bert-base-uncased folder holds them."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = wordpiece_vocabulary(words)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "model_max_length": TEXT_LENGTH, "tokenizer_class": "BertTokenizer"}, indent=2))
    return vocab


# --- settings ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    batch: int = 64                # diffusion batch
    ae_batch: int = 32
    ae_steps: int = 700            # ~3.5 min; the judge reads its reconstructions as well as the originals
    steps: int = 20000             # diffusion steps (at most; the time budget usually ends stage 2 first)
    ae_lr: float = 1e-3
    lr: float = 1e-3               # peak: linear warm-up, then cosine down to lr * final_lr_share
    warmup_steps: int = 200
    final_lr_share: float = 0.05
    min_snr_gamma: float = 5.0     # Min-SNR-gamma loss weights (Hang et al. 2023); 0 = plain eps MSE
    coloured_share: float = 0.7    # digits prompts that name colours (the plain ones are learnt first)
    kl_weight: float = 1e-5
    commitment: float = 0.25
    drop_condition: float = 0.1    # share of empty prompts / "no class" (classifier-free guidance)
    ema_decay: float = 0.999
    seconds: float = math.inf      # the whole budget; stage 1 gets at most ae_share of it
    ae_share: float = 0.3
    seed: int = 0


# --- data --------------------------------------------------------------------------------

@dataclass
class Pool:
    """Training images (N, 3, 32, 32) in [-1, 1], their prompts and digits."""
    images: torch.Tensor
    prompts: list[str]
    digits: torch.Tensor


def dataset_batches(batch_size: int, seed: int, coloured_share: float = Settings.coloured_share
                    ) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
    """(images (B, 32, 32, 3) in [0, 1], prompts, digits) forever from ldmrt.digits' training split."""
    from ldmrt.digits import data
    return data.batches(batch_size, seed, split="train", coloured_share=coloured_share)


def make_pool(count: int, seed: int, source: Callable[[int, int], Iterator] = dataset_batches) -> Pool:
    images, prompts, digits = [], [], []
    batches = source(min(count, 256), seed)
    while sum(len(p) for p in prompts) < count:
        batch_images, batch_prompts, batch_digits = next(batches)
        images.append(np.asarray(batch_images, dtype=np.float32))
        prompts.append(list(batch_prompts))
        digits.append(np.asarray(batch_digits))
    nhwc = np.concatenate(images)[:count]
    return Pool(images=torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous() * 2 - 1,
                prompts=[p for chunk in prompts for p in chunk][:count],
                digits=torch.from_numpy(np.concatenate(digits)[:count].astype(np.int64)))


# --- stage 1: the autoencoder --------------------------------------------------------------

def autoencoder_loss(model: LatentDiffusion, images: torch.Tensor,
                     settings: Settings) -> tuple[torch.Tensor, dict]:
    """Reconstruction L1 + L2, plus the KL term (KL) or the codebook + commitment terms (VQ)."""
    ae = model.first_stage_model
    h = ae.encode(images)                                           # KL (B, 2C, h, w); VQ (B, C, h, w)
    if ae.config.kind == AutoencoderKind.KL:
        mean, logvar = h.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        regulariser = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        weight = settings.kl_weight
        decoded = ae.decoder(ae.post_quant_conv(z))
    else:
        quantized = _nearest_code(ae.quantize.embedding.weight, h)
        regulariser = F.mse_loss(quantized, h.detach()) + settings.commitment * F.mse_loss(h, quantized.detach())
        weight = 1.0
        decoded = ae.decoder(ae.post_quant_conv(h + (quantized - h).detach()))   # straight-through
    reconstruction = (decoded - images).abs().mean() + (decoded - images).pow(2).mean()
    return reconstruction + weight * regulariser, {"reconstruction": reconstruction.item(),
                                                   "regulariser": regulariser.item()}


def _nearest_code(codebook: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    b, c, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, c)                     # (B*h*w, C)
    distances = (codebook * codebook).sum(1)[None, :] - 2.0 * flat @ codebook.t()
    return codebook[distances.argmin(dim=1)].reshape(b, h, w, c).permute(0, 3, 1, 2)


def train_autoencoder(model: LatentDiffusion, pool: Pool, settings: Settings,
                      progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Stage 1: Adam on the autoencoder until settings.ae_steps or its share of the budget."""
    ae = model.first_stage_model.train().requires_grad_(True)
    generator = torch.Generator().manual_seed(settings.seed)
    if ae.config.kind == AutoencoderKind.VQ:
        with torch.no_grad():   # codebook from encoder outputs, so that no code starts dead
            sample = pool.images[torch.randint(len(pool.images), (256,), generator=generator)]
            h = ae.encode(sample).permute(0, 2, 3, 1).reshape(-1, ae.config.embed_dim)
            picks = torch.randint(len(h), (ae.config.n_embed,), generator=generator)
            ae.quantize.embedding.weight.copy_(h[picks] + 0.01 * torch.randn(ae.config.n_embed, h.shape[1],
                                                                             generator=generator))
    optimizer = torch.optim.Adam(ae.parameters(), lr=settings.ae_lr)
    deadline = time.perf_counter() + settings.seconds * settings.ae_share
    losses = []
    for step in range(settings.ae_steps):
        images = pool.images[torch.randint(len(pool.images), (settings.ae_batch,), generator=generator)]
        loss, _ = autoencoder_loss(model, images, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress:
            progress(step + 1, losses[-1])
        if time.perf_counter() > deadline:
            break
    ae.eval().requires_grad_(False)
    return losses


# --- stage 2: latents, then UNet + conditioner on the diffusion loss ---------------------

@torch.no_grad()
def encode_pool(model: LatentDiffusion, images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """The first stage's encodings: KL (N, 2C, h, w) mean and logvar; VQ (N, C, h, w) pre-quantization."""
    ae = model.first_stage_model.eval()
    return torch.cat([ae.encode(images[i:i + chunk]) for i in range(0, len(images), chunk)])


def sample_latents(kind: AutoencoderKind, encodings: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A draw of the KL posterior (or the VQ latent itself), unscaled."""
    if kind == AutoencoderKind.VQ:
        return encodings
    mean, logvar = encodings.chunk(2, dim=1)
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(mean.shape, generator=generator)


def latent_scale(kind: AutoencoderKind, encodings: torch.Tensor, seed: int) -> float:
    """1 / std of the latents, as LDM's scale_by_std measures it."""
    z = sample_latents(kind, encodings, torch.Generator().manual_seed(seed))
    return float(1.0 / z.flatten().std())


def alphas_cumprod(config: SchedulerConfig) -> torch.Tensor:
    """The training schedule's cumulative alphas (float64), as diffusers computes them."""
    t = config.num_train_timesteps
    if config.beta_schedule == BetaSchedule.SCALED_LINEAR:
        betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, t, dtype=torch.float64) ** 2
    elif config.beta_schedule == BetaSchedule.LINEAR:
        betas = torch.linspace(config.beta_start, config.beta_end, t, dtype=torch.float64)
    else:
        raise ConfigError(f"beta_schedule {config.beta_schedule.value}: train_digits supports linear and "
                          f"scaled_linear", field="beta_schedule")
    return torch.cumprod(1.0 - betas, dim=0)


class Conditions:
    """Pool rows -> the UNet's context, with a share of them dropped to the unconditional one."""

    def __init__(self, model: LatentDiffusion, pool: Pool, tokenizer_dir: Path | None):
        self.model = model
        self.class_conditioned = model.config.is_class_conditioned
        if self.class_conditioned:
            self.labels = pool.digits
        else:
            tokenizer = load_tokenizer(tokenizer_dir, model.config.conditioner)
            # the runtime's own tokenizer: training sees exactly the ids generation will feed
            self.input_ids = torch.from_numpy(tokenizer.encode(pool.prompts).input_ids.astype(np.int64))
            self.empty_ids = torch.from_numpy(tokenizer.encode([""]).input_ids.astype(np.int64))

    def __call__(self, rows: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """context (B, L, D) for pool rows `rows`; rows where `drop` is set get the unconditional context."""
        if self.class_conditioned:
            labels = torch.where(drop, torch.full_like(rows, NO_CLASS), self.labels[rows])
            return self.model.conditioner(labels)                  # (B, 1, D)
        ids = torch.where(drop[:, None], self.empty_ids, self.input_ids[rows])
        return self.model.conditioner(ids)                         # (B, L, D)


@dataclass(frozen=True)
class Finetune:
    """How a fine-tune (scripts/train_digits_concat.py, train_digits_layout.py) departs from stage 2:
    maps concatenated to the noisy latents, made from the pool rows' images; the conditioner frozen;
    every prompt empty; the context made by another rule than the pool's prompts or labels; a further
    loss term, computed after the UNet's forward pass (e.g. from what its hooks saw)."""
    concat: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None   # images -> maps
    freeze_conditioner: bool = False
    unprompted: bool = False
    context: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None     # (rows, drop) -> context
    auxiliary: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None   # (rows, drop) -> loss


def train_diffusion(model: LatentDiffusion, pool: Pool, encodings: torch.Tensor, settings: Settings,
                    tokenizer_dir: Path | None, seconds: float = math.inf,
                    progress: Callable[[int, float], None] | None = None,
                    finetune: Finetune = Finetune()) -> tuple[list[float], dict]:
    """Stage 2: epsilon prediction on the scaled latents, Min-SNR-weighted, for UNet and conditioner
    together (the UNet alone where `finetune` freezes the conditioner). Returns the plain eps MSE
    of every step and the EMA state of what was trained (`load_ema`)."""
    config = model.config
    unet = model.unet.train().requires_grad_(True)
    parts = {"unet": unet}
    if not finetune.freeze_conditioner:
        parts["conditioner"] = model.conditioner.train().requires_grad_(True)
    trained = torch.nn.ModuleDict(parts)
    conditions = finetune.context or Conditions(model, pool, tokenizer_dir)
    # One EMA over everything stage 2 trains: the UNet learnt its attention against the conditioner
    # of the same steps, so an averaged UNet beside the last conditioner would not match it.
    ema = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    # state_dict() tensors share storage with the parameters: pair them with their averages once,
    # not every step
    averaged = [(ema[k], v) for k, v in trained.state_dict().items() if v.dtype.is_floating_point]
    copied = [(ema[k], v) for k, v in trained.state_dict().items() if not v.dtype.is_floating_point]
    parameters = list(trained.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.0)
    schedule = alphas_cumprod(config.scheduler).float()
    snr = schedule / (1 - schedule)
    weights = (snr.clamp(max=settings.min_snr_gamma) / snr) if settings.min_snr_gamma > 0 else torch.ones_like(snr)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    started = time.perf_counter()
    losses = []
    for step in range(settings.steps):
        done = max(step / settings.steps, (time.perf_counter() - started) / seconds)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step, done)
        rows = torch.randint(len(pool.prompts), (settings.batch,), generator=generator)
        z0 = sample_latents(config.autoencoder.kind, encodings[rows], generator) * config.scale_factor
        maps = None if finetune.concat is None else finetune.concat(pool.images[rows], generator)
        t = torch.randint(config.scheduler.num_train_timesteps, (settings.batch,), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        a = schedule[t][:, None, None, None]
        noisy = a.sqrt() * z0 + (1 - a).sqrt() * noise
        drop = torch.ones(settings.batch, dtype=torch.bool) if finetune.unprompted else \
            torch.rand(settings.batch, generator=generator) < settings.drop_condition
        with torch.set_grad_enabled(not finetune.freeze_conditioner):
            context = conditions(rows, drop)
        prediction = unet(noisy if maps is None else torch.cat([noisy, maps], dim=1), t.float(), context)
        per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (weights[t] * per_sample).mean()
        if finetune.auxiliary is not None:
            loss = loss + finetune.auxiliary(rows, drop)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, value in averaged:
                average.lerp_(value, 1 - decay)
            for average, value in copied:
                average.copy_(value)
        losses.append(per_sample.mean().item())
        if progress:
            progress(step + 1, losses[-1])
        if time.perf_counter() - started > seconds:
            break
    for module in trained.values():
        module.eval().requires_grad_(False)
    return losses, ema


def learning_rate(settings: Settings, step: int, done: float) -> float:
    """Linear warm-up over warmup_steps, then a cosine from lr down to lr * final_lr_share as `done`
    (the share of the step or time budget spent, whichever is larger) goes to 1."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(max(done, 0.0), 1.0)))
    return settings.lr * (settings.final_lr_share + (1 - settings.final_lr_share) * cosine)


def load_ema(model: LatentDiffusion, ema: dict) -> None:
    """The EMA weights train_diffusion returned, into the model's UNet and conditioner."""
    for part, module in (("unet", model.unet), ("conditioner", model.conditioner)):
        prefix = part + "."
        state = {k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)}
        if state:                  # a frozen conditioner was not averaged
            module.load_state_dict(state)


# --- the checkpoint: CompVis single file + YAML ------------------------------------------

def write_checkpoint(model: LatentDiffusion, out: Path) -> tuple[Path, str]:
    """<out>/<name>.safetensors (fp32, or fp16 when fp32 would pass 10 MB) + <name>.yaml; (path, dtype)."""
    import yaml
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    dtype = "float32"
    if nbytes > MAX_CHECKPOINT_BYTES:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        dtype = "float16"
    path = out / f"{model.config.name}.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "ldmrt": "scripts/train_digits.py"})
    path.chmod(0o644)            # safetensors writes 0600; the file ships as package data
    (out / f"{model.config.name}.yaml").write_text(yaml.safe_dump(compvis_yaml(model.config), sort_keys=False))
    return path, dtype


# --- records: loss plot and training.json ------------------------------------------------

def plot_losses(curves: dict[str, list[float]], path: Path, width: int = 900, height: int = 320) -> None:
    """One panel per stage: the loss (log scale, faint) and its running mean, drawn with Pillow."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height * len(curves)), "white")
    draw = ImageDraw.Draw(image)
    for panel, (title, losses) in enumerate(curves.items()):
        top, left, right, bottom = panel * height + 30, 60, width - 20, panel * height + height - 30
        draw.rectangle([left, top, right, bottom], outline="black")
        values = np.log10(np.maximum(np.asarray(losses, dtype=np.float64), 1e-8))
        if len(values) < 2:
            draw.text((left + 10, top + 10), f"{title}: {len(values)} step(s)", fill="black")
            continue
        smooth = np.convolve(values, np.ones(min(50, len(values))) / min(50, len(values)), mode="valid")
        lo, hi = float(values.min()), float(values.max()) or 1.0
        span = hi - lo or 1.0

        def points(series: np.ndarray, offset: int = 0) -> list[tuple[float, float]]:
            xs = left + (np.arange(len(series)) + offset) / max(len(values) - 1, 1) * (right - left)
            ys = bottom - (series - lo) / span * (bottom - top)
            return list(zip(xs.tolist(), ys.tolist()))
        draw.line(points(values), fill=(170, 190, 230), width=1)
        draw.line(points(smooth, len(values) - len(smooth)), fill=(200, 30, 30), width=2)
        draw.text((left, top - 20), f"{title}: {len(values)} steps, last mean {10 ** smooth[-1]:.4g} "
                                    f"(log10 scale {lo:.2f}..{hi:.2f})", fill="black")
        draw.text((5, top), f"{10 ** hi:.3g}", fill="black")
        draw.text((5, bottom - 10), f"{10 ** lo:.3g}", fill="black")
    image.save(path)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("model name", platform.processor())
        info["cpu_flags"] = " ".join(f for f in fields.get("flags", "").split()
                                     if f.startswith(("avx", "fma", "sse4", "amx", "f16c")))
    except OSError:
        info["cpu"] = platform.processor()
    return info


def _mean_tail(losses: list[float], n: int = 100) -> float | None:
    return float(np.mean(losses[-n:])) if losses else None


# --- the whole run -----------------------------------------------------------------------

def train(name: str, out: Path, settings: Settings, pool_size: int = POOL_SIZE,
          source: Callable[[int, int], Iterator] | None = None, show_progress: bool = True) -> dict:
    """Both stages for model `name`; writes the checkpoint and its records into `out`; the record."""
    from ldmrt.digits.prompts import VOCABULARY

    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    tokenizer_dir = None
    vocab_size = 0
    if name == "digits":
        tokenizer_dir = out / "tokenizer"
        vocab_size = len(write_tokenizer(tokenizer_dir, list(VOCABULARY)))
    model = LatentDiffusion(model_config(name, vocab_size))       # seeded by manual_seed above
    log.info("%s: parameters %s", name, parameter_counts(model))
    start = time.perf_counter()
    if source is None:
        source = functools.partial(dataset_batches, coloured_share=settings.coloured_share)
    pool = make_pool(pool_size, settings.seed, source)
    pool_seconds = time.perf_counter() - start

    start = time.perf_counter()
    with _bar(show_progress, settings.ae_steps, f"{name} autoencoder") as bar:
        ae_losses = train_autoencoder(model, pool, settings, bar)
    ae_seconds = time.perf_counter() - start

    encodings = encode_pool(model, pool.images)
    scale = latent_scale(model.config.autoencoder.kind, encodings, settings.seed)
    model.config = dataclasses.replace(model.config, scale_factor=scale)
    start = time.perf_counter()
    remaining = settings.seconds - (time.perf_counter() - started)
    with _bar(show_progress, settings.steps, f"{name} diffusion") as bar:
        losses, ema = train_diffusion(model, pool, encodings, settings, tokenizer_dir, remaining, bar)
    diffusion_seconds = time.perf_counter() - start
    load_ema(model, ema)

    path, dtype = write_checkpoint(model, out)
    plot_losses({f"{name} stage 1: autoencoder": ae_losses, f"{name} stage 2: diffusion (eps MSE)": losses},
                out / f"{name}-loss.png")
    record = {
        "model": name, "seed": settings.seed, "settings": dataclasses.asdict(settings) | {"seconds": (
            None if math.isinf(settings.seconds) else settings.seconds)},
        "pool_size": pool_size, "parameters": parameter_counts(model),
        "autoencoder": {"steps": len(ae_losses), "final_loss_mean100": _mean_tail(ae_losses),
                        "seconds": round(ae_seconds, 1),
                        "steps_per_second": round(len(ae_losses) / max(ae_seconds, 1e-9), 2)},
        "diffusion": {"steps": len(losses), "final_loss_mean100": _mean_tail(losses),
                      "seconds": round(diffusion_seconds, 1),
                      "steps_per_second": round(len(losses) / max(diffusion_seconds, 1e-9), 2),
                      "ema_decay": settings.ema_decay},
        "scale_factor": scale, "data_seconds": round(pool_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "checkpoint": {"file": path.name, "bytes": path.stat().st_size, "dtype": dtype,
                       "yaml": f"{name}.yaml", "tokenizer": "tokenizer/" if tokenizer_dir else None},
        "machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / f"{name}-training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


class _bar:
    """A tqdm progress bar (or nothing) as a (step, loss) callback."""

    def __init__(self, show: bool, total: int, title: str):
        self.show, self.total, self.title, self.bar = show, total, title, None

    def __enter__(self):
        if self.show:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, desc=self.title, mininterval=2.0, dynamic_ncols=True)
        return self

    def __call__(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if step % 10 == 0:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def add_finetune_arguments(parser: argparse.ArgumentParser, *, minutes: float, lr: float, batch: int,
                           pool: int) -> None:
    """The options every fine-tuning script of the digits (train_digits_concat.py, _layout.py) takes."""
    parser.add_argument("--minutes", type=float, default=minutes, help="time budget (0: the step budget only)")
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--pool", type=int, default=pool, help="training images drawn once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")


def finetune_settings(args: argparse.Namespace, warmup_steps: int) -> Settings:
    """Logging, torch's threads and the Settings of add_finetune_arguments' options."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    return Settings(batch=args.batch, lr=args.lr, warmup_steps=warmup_steps, seed=args.seed,
                    seconds=args.minutes * 60 if args.minutes > 0 else math.inf)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the checkpoint and its records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=28.0, help="time budget of both stages")
    parser.add_argument("--steps", type=int, default=Settings.steps, help="diffusion steps (at most)")
    parser.add_argument("--ae-steps", type=int, default=Settings.ae_steps, help="autoencoder steps (at most)")
    parser.add_argument("--batch", type=int, default=Settings.batch, help="diffusion batch")
    parser.add_argument("--ae-batch", type=int, default=Settings.ae_batch)
    parser.add_argument("--lr", type=float, default=Settings.lr, help="peak diffusion learning rate")
    parser.add_argument("--min-snr-gamma", type=float, default=Settings.min_snr_gamma,
                        help="Min-SNR loss weighting (0: plain eps MSE)")
    parser.add_argument("--coloured-share", type=float, default=Settings.coloured_share,
                        help="share of training prompts that name colours")
    parser.add_argument("--pool", type=int, default=POOL_SIZE, help="training images drawn once")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    settings = Settings(batch=args.batch, ae_batch=args.ae_batch, ae_steps=args.ae_steps, steps=args.steps,
                        lr=args.lr, min_snr_gamma=args.min_snr_gamma, coloured_share=args.coloured_share,
                        seed=args.seed, seconds=args.minutes * 60)
    record = train(args.model, args.out, settings, args.pool, show_progress=not args.no_progress)
    log.info("done: %s", json.dumps({k: record[k] for k in ("autoencoder", "diffusion", "scale_factor",
                                                           "wall_seconds", "checkpoint")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
