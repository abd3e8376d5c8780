"""Golden parity: ldmrt's PyTorch modules vs diffusers / transformers with the same weights."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ldmrt.config import (AutoencoderConfig, AutoencoderKind, BertConfig, ClassEmbedderConfig,
                          ClipTextConfig, LayerChoice, UNetConfig)
from ldmrt.presets import preset
from ldmrt.models import build_model
from ldmrt.models.autoencoder import Autoencoder
from ldmrt.models.conditioning import BertConditioner, ClassEmbedder, ClipTextConditioner
from ldmrt.models.convert import (autoencoder_from_diffusers, bert_from_diffusers,
                                  clip_from_transformers, unet_from_diffusers)
from ldmrt.models.unet import AttentionBlock, UNetModel
from tests.reference import (diffusers_autoencoder, diffusers_ldmbert, diffusers_unet, perturb_,
                             rel_l2, transformers_clip)

TOL = 1e-5
_BASE = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(1, 2), num_heads=2, context_dim=24)

UNET_CASES = {
    "heads-conv-proj": _BASE,
    "head-dim-linear-proj": dataclasses.replace(_BASE, num_head_channels=16, use_linear_in_transformer=True),
    "depth2-upcast": dataclasses.replace(_BASE, transformer_depth=2, upcast_attention=True),
    "class-labels": dataclasses.replace(_BASE, num_classes=10),
    "three-levels-partial-attn": dataclasses.replace(_BASE, channel_mult=(1, 2, 2), num_res_blocks=2,
                                                     attention_resolutions=(2,), in_channels=5),
    "four-levels-sd-like": dataclasses.replace(_BASE, channel_mult=(1, 1, 2, 2),
                                               attention_resolutions=(4, 2, 1), num_heads=4),
}


@pytest.mark.parametrize("name", list(UNET_CASES))
def test_unet_matches_diffusers(name: str) -> None:
    config = UNET_CASES[name]
    torch.manual_seed(0)
    reference = perturb_(diffusers_unet(config))
    ours = UNetModel(config).eval()
    ours.load_state_dict(unet_from_diffusers(reference.state_dict(), config), strict=True)

    g = torch.Generator().manual_seed(1)
    # Non-square latents; the three-level case has sides that are not multiples of 4 (upsample to size).
    batch, h, w = (3, 15, 9) if "three" in name else (3, 16, 8 if "levels" in name else 12)
    x = torch.randn(batch, config.in_channels, h, w, generator=g)
    t = torch.tensor([999.0, 500.0, 1.0])
    context = torch.randn(batch, 7, config.context_dim, generator=g)
    labels = torch.tensor([0, 3, 9]) if config.num_classes else None
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context, class_labels=labels).sample
        found = ours(x, t, context, labels)
    assert found.shape == expected.shape
    assert rel_l2(found, expected) <= TOL


def test_unet_parity_detects_a_wrong_weight() -> None:
    """The comparison above can fail: one perturbed bias breaks it."""
    config = UNET_CASES["heads-conv-proj"]
    reference = perturb_(diffusers_unet(config))
    ours = UNetModel(config).eval()
    ours.load_state_dict(unet_from_diffusers(reference.state_dict(), config))
    with torch.no_grad():
        ours.output_blocks[1][0].out_layers[3].bias.add_(0.1)
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([10.0])
        c = torch.randn(1, 3, 24)
        assert rel_l2(ours(x, t, c), reference(x, t, encoder_hidden_states=c).sample) > TOL


KL = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
AE_CASES = {
    "kl-3-levels": KL,
    "kl-4-levels-2-blocks": dataclasses.replace(KL, ch_mult=(1, 1, 2, 2), num_res_blocks=2),
    "vq-f4": AutoencoderConfig(kind=AutoencoderKind.VQ, embed_dim=3, z_channels=3, ch=32,
                               ch_mult=(1, 2, 2), num_res_blocks=1, n_embed=64),
}


@pytest.mark.parametrize("name", list(AE_CASES))
def test_autoencoder_matches_diffusers(name: str) -> None:
    config = AE_CASES[name]
    torch.manual_seed(0)
    reference = perturb_(diffusers_autoencoder(config))
    ours = Autoencoder(config).eval()
    ours.load_state_dict(autoencoder_from_diffusers(reference.state_dict(), config), strict=True)

    g = torch.Generator().manual_seed(2)
    f = config.downsampling_factor
    images = torch.rand(2, 3, 6 * f, 4 * f, generator=g) * 2 - 1
    latent = torch.randn(2, config.embed_dim, 5, 7, generator=g)
    with torch.no_grad():
        moments = ours.encode(images)
        decoded = ours.decode(latent)
        if config.kind == AutoencoderKind.KL:
            dist = reference.encode(images).latent_dist
            mean, logvar = moments.chunk(2, dim=1)
            assert rel_l2(mean, dist.mean) <= TOL
            assert rel_l2(logvar.clamp(-30.0, 20.0), dist.logvar) <= TOL
        else:
            assert rel_l2(moments, reference.encode(images).latents) <= TOL
        expected = reference.decode(latent).sample
    assert decoded.shape == expected.shape == (2, 3, 5 * f, 7 * f)
    assert rel_l2(decoded, expected) <= TOL


@pytest.mark.parametrize("layer", list(LayerChoice))
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_text_matches_transformers(layer: LayerChoice, act: str) -> None:
    config = ClipTextConfig(vocab_size=500, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, hidden_act=act, layer=layer,
                            bos_token_id=498, eos_token_id=499, pad_token_id=499)
    torch.manual_seed(0)
    reference = perturb_(transformers_clip(config))
    ours = ClipTextConditioner(config).eval()
    ours.load_state_dict(clip_from_transformers(reference.state_dict()), strict=True)
    ids = torch.randint(0, 500, (3, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = reference(ids, output_hidden_states=True)
        final_norm = reference.get_submodule(_final_norm(reference))
        candidates = {LayerChoice.LAST: out.last_hidden_state,
                      LayerChoice.PENULTIMATE: final_norm(out.hidden_states[-2]),
                      LayerChoice.PENULTIMATE_HIDDEN: out.hidden_states[-2]}
        found = ours(ids.int())
    assert rel_l2(found, candidates[layer]) <= TOL
    # the candidates differ from each other beyond TOL, so a wrong choice of layer fails
    assert all(rel_l2(found, other) > TOL for choice, other in candidates.items() if choice != layer)


def _final_norm(model: torch.nn.Module) -> str:
    return next(name for name, _ in model.named_modules() if name.endswith("final_layer_norm"))


def test_bert_matches_diffusers_ldmbert() -> None:
    config = BertConfig(vocab_size=300, n_embed=64, n_layer=3, heads=4, dim_head=16, max_seq_len=77)
    torch.manual_seed(0)
    reference = perturb_(diffusers_ldmbert(config))
    ours = BertConditioner(config).eval()
    state = bert_from_diffusers(reference.state_dict(), config)
    state["transformer.to_logits.weight"] = ours.transformer.to_logits.weight   # unused by both
    state["transformer.to_logits.bias"] = ours.transformer.to_logits.bias
    ours.load_state_dict(state, strict=True)
    ids = torch.randint(0, 300, (2, 77), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(ids).last_hidden_state
        found = ours(ids.int())
    assert rel_l2(found, expected) <= TOL


def test_class_embedder_is_one_context_token() -> None:
    embedder = ClassEmbedder(ClassEmbedderConfig(n_classes=11, embed_dim=8))
    labels = torch.tensor([3, 10])
    out = embedder(labels.int())
    assert out.shape == (2, 1, 8)
    assert torch.equal(out[:, 0], embedder.embedding.weight[labels])


def test_legacy_attention_block_matches_numpy_float64() -> None:
    """The paper's AttentionBlock (legacy [head][q|k|v][d] layout) against a float64 numpy oracle."""
    torch.manual_seed(0)
    block = perturb_(AttentionBlock(64, heads=2, groups=32)).eval()
    x = torch.randn(2, 64, 3, 5)
    with torch.no_grad():
        found = block(x).double().numpy()

    p = {k: v.double().numpy() for k, v in block.state_dict().items()}
    xs = x.double().numpy().reshape(2, 64, 15)
    groups = xs.reshape(2, 32, -1)
    normed = ((groups - groups.mean(-1, keepdims=True)) / np.sqrt(groups.var(-1, keepdims=True) + 1e-5))
    normed = normed.reshape(2, 64, 15) * p["norm.weight"][:, None] + p["norm.bias"][:, None]
    qkv = np.einsum("oc,bct->bot", p["qkv.weight"][:, :, 0], normed) + p["qkv.bias"][:, None]
    heads = qkv.reshape(2 * 2, 3 * 32, 15)
    q, k, v = heads[:, :32], heads[:, 32:64], heads[:, 64:]
    logits = np.einsum("bct,bcs->bts", q, k) / np.sqrt(32)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bts,bcs->bct", weights, v).reshape(2, 64, 15)
    out = np.einsum("oc,bct->bot", p["proj_out.weight"][:, :, 0], attended) + p["proj_out.bias"][:, None]
    expected = (xs + out).reshape(2, 64, 3, 5)
    assert np.linalg.norm(found - expected) / np.linalg.norm(expected) <= TOL


@pytest.mark.parametrize("name, component, count", [
    ("sd15", "unet", 859_520_964),
    ("sd15", "first_stage_model", 83_653_863),
    ("sd15", "cond_stage_model", 123_060_480),        # CLIP ViT-L/14 text transformer
    ("sd21", "unet", 865_910_724),
    ("sd21", "cond_stage_model", 352_984_064),        # OpenCLIP ViT-H text, 24 layers (diffusers keeps 23)
    ("ldm-uncond-vq", "unet", 274_056_163),
])
def test_preset_parameter_counts(name: str, component: str, count: int) -> None:
    with torch.device("meta"):
        model = build_model(preset(name), seed=None)
    module = model.unet if component == "unet" else getattr(model, component)
    assert sum(p.numel() for p in module.parameters()) == count


def test_every_preset_builds_on_meta() -> None:
    for name in ("sd15", "sd21", "ldm-txt2img", "ldm-uncond-vq", "ldm-class"):
        with torch.device("meta"):
            model = build_model(preset(name), seed=None)
        assert model.unet.config == preset(name).unet


def test_tiny_is_deterministic_from_its_seed() -> None:
    a, b = build_model(preset("tiny"), seed=0), build_model(preset("tiny"), seed=0)
    c = build_model(preset("tiny"), seed=1)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
