"""Post-hoc image guidance (issue 18; ldmrt.sampling.image_guide): its downsampling against
Pillow's bicubic, its gradient against autograd through diffusers' decoder with the same weights,
whole guided trajectories on the torch backend against a loop written here from the paper's
update in z_t (diffusers' UNet, VAE and schedulers), and the refusals.

The trained proof (8x8 targets steer the built-in digits) is tests/test_builtin_layout.py's.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldmrt.config import PredictionType
from ldmrt.engines.torch import DecoderGradient, downsample
from ldmrt.errors import LdmrtError
from ldmrt.export.bundle import ExportOptions, ModelSource, export_bundle, synthetic_tokenizer_writer
from ldmrt.iospec import Component
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
from ldmrt.sampling import NumpyDenoiser
from tests.pipeline_reference import GOLDEN_CONFIGS, GOLDEN_RANGES, diffusers_scheduler, golden_model
from tests.reference import rel_l2


class Guided:
    """A golden model's bundle on ONNX Runtime and on the torch backend (its own modules)."""

    def __init__(self, name: str, out):
        self.config = GOLDEN_CONFIGS[name]
        self.model = golden_model(self.config, seed=4)
        source = ModelSource(model=self.model.ours, source=f"test:{self.config.name}", random_weights=True,
                             write_tokenizer=synthetic_tokenizer_writer(self.config.conditioner))
        self.bundle = export_bundle(source, out, ExportOptions(shape_ranges=GOLDEN_RANGES, validate=False)).path
        self.onnx = Pipeline.load(self.bundle, "onnxruntime", threads=1)
        # the test model has no checkpoint to rebuild from: the torch backend runs it as it is
        with mock.patch("ldmrt.engines.torch.load_reference_model", lambda *a, **k: self.model.ours):
            self.torch = Pipeline.load(self.bundle, "torch")

    def decoder_gradient(self, target: np.ndarray) -> DecoderGradient:
        return self.torch.image_gradient(target)


@pytest.fixture(scope="module")
def guided(tmp_path_factory):
    cache: dict[str, Guided] = {}

    def get(name: str) -> Guided:
        if name not in cache:
            cache[name] = Guided(name, tmp_path_factory.mktemp("guided") / name)
        return cache[name]
    return get


# --- T and the gradient ----------------------------------------------------------------------

@pytest.mark.parametrize("size, small", [((32, 32), (8, 8)), ((48, 32), (12, 8)), ((32, 48), (5, 7))])
def test_downsampling_is_pillows_bicubic(size, small):
    """T is the bicubic downsampling users know: Pillow's resize (antialiased, a = -0.5) per channel."""
    rng = np.random.default_rng(0)
    image = rng.random((*size, 3), dtype=np.float32)
    expected = np.stack([np.asarray(Image.fromarray(image[..., c]).resize(small[::-1], Image.Resampling.BICUBIC))
                         for c in range(3)], axis=-1)
    found = downsample(torch.from_numpy(image).permute(2, 0, 1)[None], small)
    assert np.abs(found[0].permute(1, 2, 0).numpy() - expected).max() <= 1e-5
    wrong = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=small, mode="bicubic",
                          align_corners=False)                  # without the antialiasing: not Pillow's
    assert np.abs(wrong[0].permute(1, 2, 0).numpy() - expected).max() > 1e-2


def _reference_gradient(vae, x0: torch.Tensor, target: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """d/dx0 of 1/2 ||T(D(x0 / scale_factor) / 2 + 1/2) - y||^2 by autograd through diffusers' decoder, float64."""
    vae = vae.double()
    try:
        z = x0.double().detach().requires_grad_(True)
        pixels = vae.decode(z / scale_factor).sample / 2 + 0.5
        if pixels.shape[-2:] != target.shape[-2:]:
            pixels = F.interpolate(pixels, size=tuple(target.shape[-2:]), mode="bicubic", align_corners=False,
                                   antialias=True)
        (grad,) = torch.autograd.grad(0.5 * (pixels - target.double()).pow(2).sum(), z)
        return grad
    finally:
        vae.float()


@pytest.mark.parametrize("latent, guide", [((8, 8), (8, 8)), ((12, 8), (48, 32))])
def test_gradient_matches_autograd_through_diffusers_decoder(guided, latent, guide):
    g = guided("sd1")
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((2, 4, *latent)).astype(np.float32)
    target = rng.random((2, 3, *guide), dtype=np.float32)
    found = g.decoder_gradient(target)(x0)                                     # numpy in, numpy out
    expected = _reference_gradient(g.model.vae, torch.from_numpy(x0), torch.from_numpy(target),
                                   g.config.scale_factor)
    assert isinstance(found, np.ndarray) and found.dtype == np.float32
    assert rel_l2(torch.from_numpy(found).double(), expected) <= 1e-4
    # and it can fail: another target's gradient is far off
    other = g.decoder_gradient(1.0 - target)(x0)
    assert rel_l2(torch.from_numpy(other).double(), expected) > 0.1


# --- whole trajectories vs the paper's update in z_t ------------------------------------------

def _weight(scale: float, uncertainty: float, alpha_bar: float) -> float:
    return 1.0 / (1.0 / scale + uncertainty * (1.0 - alpha_bar) / alpha_bar)


def _reference_trajectory(g: Guided, sampler: str, latents: np.ndarray, target: np.ndarray, steps: int,
                          scale: float, uncertainty: float, guidance: float, context, uncond) -> np.ndarray:
    """diffusers' scheduler stepping eps <- eps + w_t sqrt(1 - abar) grad_{z_t} L(x0_hat(z_t)) (eps
    held fixed), written in z_t as the paper does; v prediction converted to eps and back."""
    config = g.config
    scheduler = diffusers_scheduler(sampler, config.scheduler)
    scheduler.set_timesteps(steps)
    v_prediction = config.scheduler.prediction_type == PredictionType.V_PREDICTION
    y = torch.from_numpy(target)
    x = torch.from_numpy(latents) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        z = scheduler.scale_model_input(x, t)
        if hasattr(scheduler, "sigmas"):                   # Euler: z = x / sqrt(sigma^2 + 1)
            sigma = float(scheduler.sigmas[i])
            alpha_bar = 1.0 / (1.0 + sigma * sigma)
        else:
            alpha_bar = float(scheduler.alphas_cumprod[int(t)])
        with torch.no_grad():
            out = g.model.unet(torch.cat([z, z]) if guidance > 1 else z, t,
                               encoder_hidden_states=torch.cat([uncond, context]) if guidance > 1 else context).sample
            if guidance > 1:
                out_u, out_c = out.chunk(2)
                out = out_u + guidance * (out_c - out_u)
        a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
        eps = s * z + a * out if v_prediction else out
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            x0 = (zz - s * eps) / a
            pixels = g.model.vae.decode(x0 / config.scale_factor).sample / 2 + 0.5
            if pixels.shape[-2:] != y.shape[-2:]:
                pixels = F.interpolate(pixels, size=tuple(y.shape[-2:]), mode="bicubic", align_corners=False,
                                       antialias=True)
            (grad_z,) = torch.autograd.grad(0.5 * (pixels - y).pow(2).sum(), zz)
        eps = eps + _weight(scale, uncertainty, alpha_bar) * s * grad_z
        if v_prediction:
            x0 = (z - s * eps) / a
            out = a * eps - s * x0
        else:
            out = eps
        x = scheduler.step(out, t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("model, sampler, guidance, guide, uncertainty", [
    ("sd1", "ddim", 1.0, (8, 8), 0.003),            # epsilon, the paper's 8x8 target
    ("sd1", "dpmpp-2m", 3.0, (16, 16), 0.0),        # with classifier-free guidance; the paper's fixed variance
    ("sd2", "euler", 1.0, (32, 32), 0.01),          # v prediction, sigma space, T the identity
    ("sd1", "plms", 1.0, (8, 8), 0.003),            # PLMS' warm-up evaluates its second timestep twice
    ("sd2", "ddim", 2.0, (16, 8), 0.003),           # v prediction at alpha-bar timesteps, with CFG
])
def test_guided_trajectory_matches_the_papers_update(guided, model, sampler, guidance, guide, uncertainty):
    g = guided(model)
    rng = np.random.default_rng(2)
    latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    target = rng.random((1, *guide, 3), dtype=np.float32)
    scale = 5.0
    request = GenerationRequest(prompt="a b", steps=6, sampler=sampler, guidance=guidance, latents=latents,
                                guide_image=target, guide_scale=scale, guide_uncertainty=uncertainty)
    found = g.torch.generate(request).latents
    unguided = g.torch.generate(dataclasses.replace(request, guide_image=None, guide_scale=None,
                                                    guide_uncertainty=None)).latents
    tokens = g.torch.tokenizer.encode(["", "a b"]).input_ids
    with torch.no_grad():
        uncond, context = g.model.ours.conditioner(torch.from_numpy(tokens.astype(np.int64))).chunk(2)
    expected = _reference_trajectory(g, sampler, latents, target.transpose(0, 3, 1, 2), 6, scale, uncertainty,
                                     guidance, context, uncond)
    assert np.abs(found - expected).mean() <= 1e-3 * max(1.0, np.abs(expected).mean())
    assert np.abs(unguided - expected).mean() > 10 * np.abs(found - expected).mean()   # the guide moved it


def test_the_numpy_loop_applies_the_same_guide(guided):
    """NumpyDenoiser (the host loop every other backend uses) with the torch decoder's gradient
    runs the same trajectory as the torch backend's loop."""
    g = guided("sd1")
    rng = np.random.default_rng(3)
    request = GenerationRequest(prompt="a b", steps=5, sampler="plms", guidance=2.0,
                                latents=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
                                guide_image=rng.random((2, 8, 8, 3), dtype=np.float32), guide_scale=3.0, batch=2)
    expected = g.torch.generate(request).latents
    host = copy.copy(g.torch)   # the same runners, the host loop
    host.denoiser = NumpyDenoiser(g.torch.runners[Component.UNET], g.torch.runners[Component.UNET].spec)
    found = host.generate(request).latents
    assert np.abs(found - expected).max() <= 1e-4 * np.abs(expected).max()


# --- refusals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("change, field, words", [
    (dict(guide_image=np.zeros((1, 40, 8, 3), np.float32)), "guide_image", "h <= 32 and w <= 32"),
    (dict(guide_image=np.zeros((3, 8, 8, 3), np.float32)), "guide_image", "expected an RGB array [1, h, w, 3]"),
    (dict(guide_image=np.zeros((8, 8, 3), np.float32)), "guide_image", "found [8, 8, 3]"),
    (dict(guide_image=np.full((1, 8, 8, 3), 1.5, np.float32)), "guide_image", "expected values in [0, 1]"),
    (dict(guide_image=np.zeros((1, 8, 8, 3), np.uint8)), "guide_image", "expected a float array"),
    (dict(guide_scale=-1.0), "guide_scale", "expected a number in [0, 1e6]"),
    (dict(guide_uncertainty=float("nan")), "guide_uncertainty", "expected a finite number"),
    (dict(guide_image=None), "guide_scale", "applies to image guidance only"),
])
def test_bad_guides_are_refused_by_name(guided, change, field, words):
    g = guided("sd1")
    request = dataclasses.replace(GenerationRequest(steps=2, guide_image=np.zeros((1, 8, 8, 3), np.float32),
                                                    guide_scale=2.0), **change)
    with pytest.raises(LdmrtError) as caught:
        g.torch.generate(request)
    assert caught.value.field == field and words in str(caught.value), str(caught.value)


def test_backends_without_the_decoder_gradient_refuse_before_any_work(guided):
    g = guided("sd1")
    calls = []
    g.onnx.runners[Component.UNET] = _Counting(g.onnx.runners[Component.UNET], calls)
    with pytest.raises(LdmrtError) as caught:
        g.onnx.generate(GenerationRequest(steps=2, guide_image=np.zeros((1, 8, 8, 3), np.float32)))
    assert caught.value.field == "guide_image" and "use --backend torch" in str(caught.value)
    assert calls == []


def test_max_cost_counts_a_guided_step_as_several_and_a_zero_scale_as_plain(guided):
    g = guided("sd1")
    request = GenerationRequest(steps=2, guide_image=np.zeros((1, 8, 8, 3), np.float32))
    plain = g.torch.generate(dataclasses.replace(request, guide_image=None)).latents
    side = plain.shape[-1] * g.config.downsampling_factor
    plain_cost = 2 * (side * side / 1e6)
    with mock.patch.object(g.torch, "max_cost", plain_cost * 2):
        with pytest.raises(LdmrtError) as caught:
            g.torch.generate(request)
        assert caught.value.field == "request" and "(image guidance)" in str(caught.value)
        unpulled = g.torch.generate(dataclasses.replace(request, guide_scale=0.0)).latents   # no gradient: plain
    np.testing.assert_allclose(unpulled, plain, atol=1e-6)


class _Counting:
    def __init__(self, runner, calls):
        self.runner, self.calls, self.spec = runner, calls, runner.spec

    def __call__(self, feeds):
        self.calls.append(1)
        return self.runner(feeds)


def test_vq_decoders_pass_the_straight_through_gradient():
    """A VQ decoder quantizes (argmin, gradient zero): the guide's gradient goes straight through
    the codebook lookup instead, as VQ-VAE training does (d/dz = d/dq at q = quantize(z))."""
    from ldmrt.models import build_model
    from tests.families import FAMILIES

    config = FAMILIES["ldm-uncond-vq"]
    model = build_model(config, seed=0).eval()
    ae = model.first_stage_model
    target = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    x0 = torch.randn(1, 3, 8, 8)
    found = DecoderGradient(lambda latent: ae.decode(latent), 1.0, torch.device("cpu"), torch.float32, target)(x0)
    with torch.no_grad():
        q = ae.quantize(x0)
    with torch.enable_grad():
        q.requires_grad_(True)
        pixels = F.interpolate(ae.decoder(ae.post_quant_conv(q)) / 2 + 0.5, size=(8, 8), mode="bicubic",
                               antialias=True)
        (expected,) = torch.autograd.grad(0.5 * (pixels - torch.from_numpy(target)).pow(2).sum(), q)
    assert expected.abs().sum() > 0 and rel_l2(found, expected) <= 1e-5
    codebook = ae.quantize.embedding.weight
    with torch.enable_grad():                 # asked for a gradient: the same values, and one that passes
        passed = ae.quantize(x0.clone().requires_grad_(True))
    assert torch.allclose(passed, q.detach(), atol=1e-6) and passed.requires_grad
    with torch.no_grad():                     # no gradient asked: exact codebook rows, as the graphs export it
        rows = ae.quantize(x0).permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
        assert all(any(torch.equal(row, entry) for entry in codebook) for row in rows)
