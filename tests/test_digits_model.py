"""scripts/train_digits.py: the `digits` and `digits-vq` models train, write a CompVis single file +
YAML (+ tokenizer/) that ldmrt's checkpoint loader reads back as the same model, and export.

Small: a 32-image pool, 5 steps per stage, batch 8. References: the loader's own reading of the
files (config from the YAML, weights from the safetensors), the trained tensors themselves,
diffusers' DDPMScheduler for the noise schedule, and the runtime tokenizer for the vocabulary.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ldmrt.checkpoints.source import checkpoint_source
from ldmrt.config import AutoencoderKind, BertConfig, ClassEmbedderConfig
from ldmrt.errors import ConfigError
from ldmrt.export.bundle import ExportOptions, export_bundle
from ldmrt.tokenizer import load_tokenizer
from tests.modules import load_file

pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_digits.py"


@pytest.fixture(scope="module")
def td():
    return load_file(SCRIPT, "ldmrt_train_digits")


@pytest.fixture(scope="module")
def pool(td):
    return td.make_pool(32, seed=0)


SMALL = dict(batch=8, ae_batch=8, ae_steps=5, steps=5)


@pytest.mark.parametrize("name", ["digits", pytest.param("digits-vq", marks=pytest.mark.slow)])   # the same path
def test_trains_writes_and_exports_through_the_checkpoint_loader(td, pool, name, tmp_path):
    torch.manual_seed(0)
    settings = td.Settings(**SMALL)
    tokenizer_dir, vocab_size = None, 0
    if name == "digits":
        from ldmrt.digits.prompts import VOCABULARY
        tokenizer_dir = tmp_path / "ckpt" / "tokenizer"
        vocab_size = len(td.write_tokenizer(tokenizer_dir, list(VOCABULARY)))
    model = td.LatentDiffusion(td.model_config(name, vocab_size))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    ae_losses = td.train_autoencoder(model, pool, settings)
    encodings = td.encode_pool(model, pool.images)
    scale = td.latent_scale(model.config.autoencoder.kind, encodings, seed=0)
    model.config = dataclasses.replace(model.config, scale_factor=scale)
    losses, ema = td.train_diffusion(model, pool, encodings, settings, tokenizer_dir)
    td.load_ema(model, ema)
    assert len(ae_losses) == 5 and len(losses) == 5 and np.isfinite(ae_losses + losses).all()
    trained = model.state_dict()
    conditioner = "transformer.token_emb.weight" if name == "digits" else "embedding.weight"
    for part in ("first_stage_model.encoder.conv_in.weight", "model.diffusion_model.out.2.weight",
                 "cond_stage_model." + conditioner):
        assert not torch.equal(before[part], trained[part]), f"{part} did not train"

    path, dtype = td.write_checkpoint(model, tmp_path / "ckpt")
    assert path.stat().st_size <= td.MAX_CHECKPOINT_BYTES
    source = checkpoint_source(path)           # what `ldmrt export PATH` runs: sidecar YAML, tokenizer/
    loaded = source.model
    assert loaded.config == model.config       # the YAML rebuilt every field, the scale included
    assert loaded.config.default_image_size == 32 and loaded.config.downsampling_factor == 4
    stored = getattr(torch, dtype)               # the file holds fp16 when fp32 would pass 10 MB
    for key, value in trained.items():
        expected = value.to(stored).float() if value.is_floating_point() else value
        assert torch.equal(loaded.state_dict()[key], expected), key

    result = export_bundle(source, tmp_path / "bundle", ExportOptions())   # validates ONNX vs torch
    components = set(result.manifest.components)
    assert {"unet", "vae_decoder", "vae_encoder"} <= components
    assert ("text_encoder" in components) == (name == "digits")
    assert result.manifest.config.scale_factor == pytest.approx(scale)


def test_configs(td):
    digits, vq = td.model_config("digits", 100), td.model_config("digits-vq")
    assert isinstance(digits.conditioner, BertConfig) and digits.autoencoder.kind == AutoencoderKind.KL
    assert isinstance(vq.conditioner, ClassEmbedderConfig) and vq.autoencoder.kind == AutoencoderKind.VQ
    # ldmrt's class path guides with the last label as "no class": labels 0-9 and 10
    assert vq.conditioner.n_classes == td.NO_CLASS + 1 == 11
    for config in (digits, vq):
        assert config.downsampling_factor == 4 and config.latent_channels == 4
    with pytest.raises(ConfigError, match="expected one of"):
        td.model_config("digits-xl")
    with pytest.raises(ConfigError, match="vocab_size"):
        td.model_config("digits", 0)


def test_schedule_matches_diffusers(td):
    diffusers = pytest.importorskip("diffusers")
    config = td.model_config("digits", 100).scheduler
    reference = diffusers.DDPMScheduler(num_train_timesteps=config.num_train_timesteps,
                                        beta_start=config.beta_start, beta_end=config.beta_end,
                                        beta_schedule=config.beta_schedule.value).alphas_cumprod
    # diffusers computes in float32
    np.testing.assert_allclose(td.alphas_cumprod(config).numpy(), reference.double().numpy(), rtol=1e-5)


def test_every_prompt_word_is_one_token(td, tmp_path):
    from ldmrt.digits.prompts import VOCABULARY
    vocab = td.write_tokenizer(tmp_path, list(VOCABULARY))
    tokenizer = load_tokenizer(tmp_path, td.model_config("digits", len(vocab)).conditioner)
    unk = vocab.index("[UNK]")
    for word in VOCABULARY:
        ids = tokenizer.tokenize(word)
        assert len(ids) == 1 and ids[0] != unk and vocab[ids[0]] == word.lower(), word
    # a word outside the prompts splits into pieces rather than [UNK]
    assert unk not in tokenizer.tokenize("purple")
    # the longest prompts fit the text encoder's window without truncation
    from ldmrt.digits.data import training_samples
    prompts = [s.prompt for s in training_samples(300, seed=1)]
    assert not any(tokenizer.encode(prompts).truncated)


def test_latent_scale_is_one_over_std(td):
    generator = torch.Generator().manual_seed(123)   # not latent_scale's seed: its noise must be independent
    mean = 3.0 * torch.randn(64, 4, 8, 8, generator=generator)
    logvar = torch.full_like(mean, np.log(0.25))
    kl = torch.cat([mean, logvar], dim=1)
    scale = td.latent_scale(AutoencoderKind.KL, kl, seed=0)
    # std of mean + 0.5 * noise with mean ~ N(0, 9): sqrt(9 + 0.25) within sampling error
    assert scale == pytest.approx(1 / np.sqrt(mean.var().item() + 0.25), rel=0.02)
    vq = torch.randn(64, 4, 8, 8, generator=generator) * 2.0
    expected = 1 / vq.flatten().std().item()
    assert td.latent_scale(AutoencoderKind.VQ, vq, seed=0) == pytest.approx(expected, rel=1e-6)


def test_learning_rate_warms_up_then_decays_to_its_floor(td) -> None:
    settings = td.Settings(lr=1e-3, warmup_steps=100, final_lr_share=0.05)
    assert td.learning_rate(settings, 0, 0.0) == pytest.approx(1e-5)
    assert td.learning_rate(settings, 99, 0.0) == pytest.approx(1e-3)
    assert td.learning_rate(settings, 500, 0.5) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))
    assert td.learning_rate(settings, 900, 1.0) == pytest.approx(5e-5)
    assert td.learning_rate(settings, 900, 3.0) == pytest.approx(5e-5)      # past the budget: the floor
    rates = [td.learning_rate(settings, s, s / 1000) for s in range(100, 1000, 50)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_the_ema_covers_the_conditioner_as_well_as_the_unet(td, pool, tmp_path) -> None:
    torch.manual_seed(0)
    from ldmrt.digits.prompts import VOCABULARY
    tokenizer_dir = tmp_path / "tokenizer"
    model = td.LatentDiffusion(td.model_config("digits", len(td.write_tokenizer(tokenizer_dir, list(VOCABULARY)))))
    encodings = td.encode_pool(model, pool.images)
    start = {k: v.clone() for k, v in model.conditioner.state_dict().items()}
    losses, ema = td.train_diffusion(model, pool, encodings, td.Settings(batch=4, steps=3, warmup_steps=1),
                                     tokenizer_dir)
    assert {k.split(".")[0] for k in ema} == {"unet", "conditioner"}
    last = {k: v.clone() for k, v in model.conditioner.state_dict().items()}
    td.load_ema(model, ema)
    loaded = model.conditioner.state_dict()
    key = "transformer.token_emb.weight"
    # the averaged conditioner lies between its start and its last step, equal to neither
    assert not torch.equal(loaded[key], last[key]) and not torch.equal(loaded[key], start[key])
    assert all(torch.equal(loaded[k], ema["conditioner." + k]) for k in loaded)
