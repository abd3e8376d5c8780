"""The lean runtime end to end: ldmrt.runtime.pipeline against diffusers, backends, threads, the CLI.

Oracles: diffusers' StableDiffusionPipeline (tests/pipeline_reference.py) with the same weights,
tokenizer files, scheduler config, prompts and initial latents (design.md, verification ladder
step 5: decoded images within 1/255 mean abs in fp32); the torch reference backend for the
other backend; the pipeline's own sequential results for threads, seeds, batches and the CLI.
Bundles are exported once per module: two golden models (SD 1.x-like, SD 2.x-like) whose
weights come from the diffusers/transformers modules, and the tiny preset.
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from ldmrt.errors import GenerationError, LdmrtError, ShapeError
from ldmrt.export.bundle import ExportOptions, ModelSource, export_bundle, preset_source, synthetic_tokenizer_writer
from ldmrt.runtime.pipeline import GenerationRequest, GenerationResult, Pipeline
from ldmrt.sampling import SAMPLERS

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
from tests.pipeline_reference import (GOLDEN_CONFIGS, GOLDEN_RANGES, StepNoiseRecorder,  # noqa: E402
                                      golden_model, reference_pipeline, run_reference)

# diffusers' schedulers call np.array(tensor, copy=False), which numpy 2 + torch answer with this
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

REPO = Path(__file__).resolve().parents[1]
IMAGE_TOL = 1 / 255          # design.md ladder 5: mean abs of decoded images in [0, 1], fp32
IMAGE_MAX_TOL = 4 / 255      # no single pixel may be far off either (measured: < 0.002/255)
LATENT_RTOL = 1e-4           # backends, fp32 relative L2 of the final latents
DETERMINISTIC = ("ddim", "plms", "euler", "dpmpp-2m", "dpmpp-2m-karras")
STOCHASTIC = ("euler-a", "ddpm", "lcm")
PROMPTS = ("a red cat sitting on a chair", "a blue dog on a hill, oil painting")
NEGATIVE = "blurry, low quality"


# --- helpers -------------------------------------------------------------------------------

def _float64_pair(found, expected) -> tuple[np.ndarray, np.ndarray] | None:
    """Both as float64 with equal shapes; None when either holds NaN or inf (which never passes)."""
    found64, expected64 = np.asarray(found, np.float64), np.asarray(expected, np.float64)
    assert found64.shape == expected64.shape, (found64.shape, expected64.shape)
    finite = np.isfinite(found64).all() and np.isfinite(expected64).all()
    return (found64, expected64) if finite else None


def mean_abs(found, expected) -> float:
    pair = _float64_pair(found, expected)
    return math.inf if pair is None else float(np.abs(pair[0] - pair[1]).mean())


def max_abs(found, expected) -> float:
    pair = _float64_pair(found, expected)
    return math.inf if pair is None else float(np.abs(pair[0] - pair[1]).max())


def rel_l2(found, expected) -> float:
    pair = _float64_pair(found, expected)
    return math.inf if pair is None else float(np.linalg.norm(pair[0] - pair[1]) / np.linalg.norm(pair[1]))


def assert_images(result: GenerationResult, batch: int, height: int, width: int) -> None:
    """The documented output: float32 [B, H, W, 3] in [0, 1], finite, not a constant image."""
    images = result.images
    assert images.dtype == np.float32 and images.shape == (batch, height, width, 3)
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0.01, "a constant image says nothing about the pipeline"


def noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def gradient_image(height: int = 64, width: int = 64) -> np.ndarray:
    """A smooth colour gradient, float32 [1, H, W, 3] in [0, 1]."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    return np.stack([x, y, 1 - x * y], axis=-1)[None].astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The modules are tiny: one thread is faster than several, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- bundles (exported once per module) ----------------------------------------------------

class Golden:
    """A golden bundle: ldmrt's runtime on it, and the diffusers modules it was exported from."""

    def __init__(self, name: str, out: Path):
        self.config = GOLDEN_CONFIGS[name]
        self.model = golden_model(self.config, seed=0)
        source = ModelSource(model=self.model.ours, source=f"test:{self.config.name}", random_weights=True,
                             write_tokenizer=synthetic_tokenizer_writer(self.config.conditioner))
        self.bundle = export_bundle(source, out, ExportOptions(shape_ranges=GOLDEN_RANGES)).path
        self.pipeline = Pipeline.load(self.bundle, "onnxruntime", threads=1)
        self.factor = self.config.downsampling_factor

    def reference(self, sampler: str):
        return reference_pipeline(self.model, self.bundle, self.config, sampler)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    cache: dict[str, Golden] = {}

    def get(name: str) -> Golden:
        if name not in cache:
            cache[name] = Golden(name, tmp_path_factory.mktemp("golden") / name)
        return cache[name]
    return get


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """`ldmrt export tiny`: every component (vae_encoder too), default ranges 32..96 px, batch <= 4."""
    return export_bundle(preset_source("tiny"), tmp_path_factory.mktemp("tiny") / "bundle").path


@pytest.fixture(scope="module")
def tiny(tiny_bundle) -> Pipeline:
    return Pipeline.load(tiny_bundle, "onnxruntime", threads=1)


@pytest.fixture(scope="module")
def tiny_torch(tiny_bundle) -> Pipeline:
    return Pipeline.load(tiny_bundle, "torch", device="cpu")


def tiny_shape(pipeline: Pipeline, batch: int = 1, height: int = 64, width: int = 64) -> tuple[int, ...]:
    f = pipeline.config.downsampling_factor
    return batch, pipeline.config.latent_channels, height // f, width // f


# --- 1. golden: the whole pipeline vs diffusers' StableDiffusionPipeline --------------------

def against_diffusers(g: Golden, request: GenerationRequest) -> tuple[GenerationResult, np.ndarray]:
    """(ldmrt's result, diffusers' images) for `request`, with ldmrt's initial and step noise."""
    with StepNoiseRecorder() as recorder:
        found = g.pipeline.generate(request)
    assert_images(found, request.batch, *found.images.shape[1:3])
    return found, run_reference(g.reference(request.sampler), request, recorder.noises)


def assert_golden(found: GenerationResult, expected: np.ndarray, record_property) -> None:
    error, worst = mean_abs(found.images, expected), max_abs(found.images, expected)
    record_property("mean_abs_x255", error * 255)
    record_property("max_abs_x255", worst * 255)
    assert error <= IMAGE_TOL and worst <= IMAGE_MAX_TOL, \
        f"mean abs {error * 255:.4g}/255, max abs {worst * 255:.4g}/255"


# (model, sampler, guidance, prompts, height, width, steps, eta)
GOLDEN_CASES = [
    *[("sd1", s, g, PROMPTS, 32, 48, 6, 0.0) for s in DETERMINISTIC for g in (1.0, 7.5)],
    ("sd1", "ddim", 5.0, PROMPTS[:1], 32, 32, 10, 0.0),            # batch 1, square, more steps
    ("sd1", "euler", 7.5, PROMPTS[:1], 48, 16, 4, 0.0),             # extreme aspect ratio
    *[("sd2", s, g, PROMPTS, 48, 32, 6, 0.0) for s in ("ddim", "plms", "euler", "dpmpp-2m")
      for g in (1.0, 7.5)],
    *[(m, s, 7.5, PROMPTS, 32, 48, 6, 0.0) for m in ("sd1", "sd2") for s in STOCHASTIC],
    ("sd1", "euler-a", 1.0, PROMPTS, 32, 48, 6, 0.0),
    *[(m, "ddim", 7.5, PROMPTS, 32, 48, 6, 0.5) for m in ("sd1", "sd2")],
]


def _case_id(case) -> str:
    model, sampler, guidance, prompts, height, width, steps, eta = case
    eta_part = f"-eta{eta}" if eta else ""
    return f"{model}-{sampler}{eta_part}-g{guidance}-b{len(prompts)}-{height}x{width}-{steps}steps"


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=_case_id)
def test_images_match_diffusers_stable_diffusion_pipeline(golden, record_property, case) -> None:
    model, sampler, guidance, prompts, height, width, steps, eta = case
    g = golden(model)
    batch = len(prompts)
    latents = noise(11, (batch, g.config.latent_channels, height // g.factor, width // g.factor))
    found, expected = against_diffusers(g, GenerationRequest(
        prompt=list(prompts), negative_prompt=NEGATIVE, steps=steps, guidance=guidance, sampler=sampler,
        eta=eta, seed=5, height=height, width=width, batch=batch, latents=latents))
    assert found.images.shape == (batch, height, width, 3)
    assert_golden(found, expected, record_property)


@pytest.mark.parametrize("change, least", [
    ({"prompt": [PROMPTS[0] + " at night", PROMPTS[1]]}, 1.0),   # one token in one image
    ({"negative_prompt": "sharp"}, 1.0),
    ({"guidance": 1.0}, 4.0),
    ({"steps": 7}, 1.0),
])
def test_golden_comparison_can_fail(golden, change, least: float) -> None:
    """The 1/255 bound discriminates: each change to the request moves the images well past it."""
    g = golden("sd1")
    latents = noise(11, (2, g.config.latent_channels, 32 // g.factor, 48 // g.factor))
    request = GenerationRequest(prompt=list(PROMPTS), negative_prompt=NEGATIVE, steps=6, guidance=7.5,
                                sampler="ddim", height=32, width=48, batch=2, latents=latents)
    expected = run_reference(g.reference("ddim"), request)
    changed = g.pipeline.generate(dataclasses.replace(request, **change))
    per_image = [mean_abs(changed.images[i], expected[i]) for i in range(2)]
    assert max(per_image) >= least * IMAGE_TOL, f"{[e * 255 for e in per_image]} (/255)"


IMG2IMG_CASES = [("sd1", "ddim", 0.5, 0.0), ("sd1", "euler", 0.8, 0.0), ("sd1", "dpmpp-2m", 0.6, 0.0),
                 ("sd1", "ddpm", 0.5, 0.0), ("sd1", "ddim", 0.7, 0.5), ("sd2", "euler-a", 0.7, 0.0),
                 ("sd2", "plms", 0.5, 0.0)]


@pytest.mark.parametrize("model, sampler, strength, eta", IMG2IMG_CASES,
                         ids=[f"{m}-{s}-strength{x}" + (f"-eta{e}" if e else "") for m, s, x, e in IMG2IMG_CASES])
def test_img2img_matches_diffusers_img2img_pipeline(golden, record_property, model: str, sampler: str,
                                                    strength: float, eta: float) -> None:
    """Preprocessing, encoder, scale factor and the partial schedule vs StableDiffusionImg2ImgPipeline."""
    g = golden(model)
    latents = noise(12, (2, g.config.latent_channels, 32 // g.factor, 48 // g.factor))
    found, expected = against_diffusers(g, GenerationRequest(
        prompt=list(PROMPTS), negative_prompt=NEGATIVE, steps=8, guidance=7.5, sampler=sampler, eta=eta,
        height=32, width=48, batch=2, latents=latents, init_image=gradient_image(32, 48), strength=strength))
    assert_golden(found, expected, record_property)


def test_golden_img2img_comparison_can_fail(golden) -> None:
    """The init image reaches the output: the reference's images for another init image are far off."""
    g = golden("sd1")
    latents = noise(12, (1, g.config.latent_channels, 32 // g.factor, 48 // g.factor))
    request = GenerationRequest(prompt=PROMPTS[0], negative_prompt=NEGATIVE, steps=8, guidance=7.5,
                                height=32, width=48, latents=latents, init_image=gradient_image(32, 48),
                                strength=0.5)
    found = g.pipeline.generate(request)
    flipped = dataclasses.replace(request, init_image=request.init_image[:, ::-1].copy())
    assert mean_abs(found.images, run_reference(g.reference("ddim"), flipped)) >= 3 * IMAGE_TOL


def test_reference_tokenizer_agrees_with_ours(golden) -> None:
    """transformers' CLIPTokenizer (v5) reads the bundle's tokenizer/ folder and gives our ids."""
    for name in ("sd1", "sd2"):
        g = golden(name)
        reference = g.reference("ddim").tokenizer
        texts = [*PROMPTS, "", NEGATIVE, "Émile's <|endoftext|> café!! 123"]
        ours = g.pipeline.tokenizer.encode(texts).input_ids
        theirs = reference(texts, padding="max_length", max_length=reference.model_max_length,
                           truncation=True, return_tensors="np").input_ids
        np.testing.assert_array_equal(ours, theirs)


# --- 2. backends: onnxruntime vs the torch reference backend -------------------------------

BACKEND_CASES = [(s, 0.0) for s in SAMPLERS] + [("ddim", 0.5)]


@pytest.mark.parametrize("sampler, eta", BACKEND_CASES, ids=[f"{s}-eta{e}" for s, e in BACKEND_CASES])
def test_onnxruntime_matches_the_torch_backend(tiny, tiny_torch, sampler: str, eta: float) -> None:
    assert tiny_torch.manifest.source == "preset:tiny"    # what load_reference_model can rebuild
    request = GenerationRequest(prompt=list(PROMPTS), negative_prompt=NEGATIVE, steps=4, guidance=6.0,
                                sampler=sampler, eta=eta, seed=42, height=32, width=48, batch=2)
    found, expected = tiny.generate(request), tiny_torch.generate(request)
    assert_images(found, 2, 32, 48)
    assert mean_abs(found.images, expected.images) <= IMAGE_TOL
    assert max_abs(found.images, expected.images) <= IMAGE_MAX_TOL
    assert rel_l2(found.latents, expected.latents) <= LATENT_RTOL


def test_torch_backend_unguided_matches(tiny, tiny_torch) -> None:
    request = GenerationRequest(prompt="a cat", steps=3, guidance=1.0, sampler="dpmpp-2m", seed=3)
    found, expected = tiny.generate(request), tiny_torch.generate(request)
    assert rel_l2(found.latents, expected.latents) <= LATENT_RTOL
    assert mean_abs(found.images, expected.images) <= IMAGE_TOL


@pytest.mark.parametrize("height, width, batch, guidance", [
    (36, 44, 1, 7.5),      # odd latent sides (9 x 11): the UNet upsamples to its skip sizes
    (96, 32, 4, 7.5),      # the corners of the exported range: UNet batch 8 with guidance
    (32, 96, 4, 1.0),
])
def test_backends_agree_over_the_exported_range(tiny, tiny_torch, height: int, width: int, batch: int,
                                                guidance: float) -> None:
    request = GenerationRequest(prompt="a cat", steps=2, sampler="euler", guidance=guidance, seed=1,
                                height=height, width=width, batch=batch)
    found, expected = tiny.generate(request), tiny_torch.generate(request)
    assert_images(found, batch, height, width)
    assert mean_abs(found.images, expected.images) <= IMAGE_TOL
    assert rel_l2(found.latents, expected.latents) <= LATENT_RTOL


# --- 3. reproducibility --------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddim", "euler-a"])
def test_same_seed_same_images_other_seed_other_images(tiny, sampler: str) -> None:
    request = GenerationRequest(prompt="a cat", steps=4, sampler=sampler, seed=7)
    first, again = tiny.generate(request), tiny.generate(request)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.latents, again.latents)
    other = tiny.generate(GenerationRequest(prompt="a cat", steps=4, sampler=sampler, seed=8))
    assert mean_abs(other.images, first.images) > 5 * IMAGE_TOL
    assert rel_l2(other.latents, first.latents) > 0.1


@pytest.mark.parametrize("sampler", DETERMINISTIC)
@pytest.mark.parametrize("batch", [1, 2])
def test_latents_equal_to_the_seeds_noise_reproduce_the_seeds_run(tiny, sampler: str, batch: int) -> None:
    seed = 13
    request = dict(prompt="a cat", steps=4, sampler=sampler, seed=seed, batch=batch)
    from_seed = tiny.generate(GenerationRequest(**request))
    given = tiny.generate(GenerationRequest(**request, latents=noise(seed, tiny_shape(tiny, batch))))
    np.testing.assert_array_equal(given.images, from_seed.images)
    # float64 noise is the same noise (cast to float32 exactly as the pipeline draws it)
    given64 = tiny.generate(GenerationRequest(
        **request, latents=np.random.default_rng(seed).standard_normal(tiny_shape(tiny, batch))))
    np.testing.assert_array_equal(given64.images, from_seed.images)


@pytest.mark.parametrize("sampler, eta", [("euler-a", 0.0), ("ddpm", 0.0), ("lcm", 0.0), ("ddim", 0.5)])
def test_latents_equal_to_the_seeds_noise_reproduce_a_stochastic_run(tiny, sampler: str, eta: float) -> None:
    seed = 13
    request = dict(prompt="a cat", steps=4, sampler=sampler, eta=eta, seed=seed)
    from_seed = tiny.generate(GenerationRequest(**request))
    given = tiny.generate(GenerationRequest(**request, latents=noise(seed, tiny_shape(tiny))))
    assert mean_abs(given.images, from_seed.images) <= IMAGE_TOL


def test_given_latents_are_used_exactly_whatever_the_seed(tiny) -> None:
    latents = noise(99, tiny_shape(tiny))
    first = tiny.generate(GenerationRequest(prompt="a cat", steps=3, seed=1, latents=latents))
    second = tiny.generate(GenerationRequest(prompt="a cat", steps=3, seed=2, latents=latents))
    np.testing.assert_array_equal(first.images, second.images)
    assert latents.dtype == np.float32 and np.array_equal(latents, noise(99, tiny_shape(tiny))), \
        "the caller's array was modified"


@pytest.mark.parametrize("sampler, guidance", [("ddim", 7.5), ("dpmpp-2m", 1.0), ("plms", 4.0)])
def test_batch_images_do_not_depend_on_their_batch_position(tiny, sampler: str, guidance: float) -> None:
    """The contract: image i depends on its own initial latents and prompt only.

    (With a seed the whole batch's noise is one draw, so images of a seeded batch are not the
    single-image runs of any seed; with explicit latents they are.)
    """
    latents = noise(21, tiny_shape(tiny, 2))
    request = dict(negative_prompt=NEGATIVE, steps=4, guidance=guidance, sampler=sampler)
    batch = tiny.generate(GenerationRequest(prompt=list(PROMPTS), batch=2, latents=latents, **request))
    swapped = tiny.generate(GenerationRequest(prompt=list(PROMPTS[::-1]), batch=2,
                                              latents=latents[::-1].copy(), **request))
    for i in range(2):
        single = tiny.generate(GenerationRequest(prompt=PROMPTS[i], latents=latents[i:i + 1], **request))
        assert max_abs(batch.images[i], single.images[0]) <= 1e-5
        assert max_abs(swapped.images[1 - i], single.images[0]) <= 1e-5
        assert rel_l2(batch.latents[i], single.latents[0]) <= 1e-5
    assert mean_abs(batch.images[0], batch.images[1]) > 5 * IMAGE_TOL


def test_result_reports_stage_timings(tiny, tiny_torch) -> None:
    request = GenerationRequest(prompt="a cat", steps=3, sampler="plms")
    result = tiny.generate(request)
    for stage in ("conditioning", "denoise", "unet", "vae_decoder"):
        assert result.timings[stage] >= 0.0
    assert result.timings["unet"] <= result.timings["denoise"]
    assert result.warnings == []
    for stage in ("conditioning", "denoise", "vae_decoder"):      # the fused loop has no UNet-only time
        assert tiny_torch.generate(request).timings[stage] >= 0.0


@pytest.mark.parametrize("backend", [
    "tiny",
    "tiny_torch",
])
def test_on_step_reports_every_evaluation(request, backend: str) -> None:
    pipeline: Pipeline = request.getfixturevalue(backend)
    calls: list[tuple[int, int]] = []
    pipeline.generate(GenerationRequest(prompt="a cat", steps=3, sampler="plms"),
                      on_step=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]          # PLMS: steps + 1 evaluations


# --- 4. img2img ----------------------------------------------------------------------------

def _image_latents(pipeline: Pipeline, image: np.ndarray) -> np.ndarray:
    """The KL posterior mean of `image`, scaled as the UNet sees it (numpy, through the runner)."""
    pixels = image.transpose(0, 3, 1, 2) * 2.0 - 1.0
    moments = pipeline.runners["vae_encoder"]({"images": np.ascontiguousarray(pixels, dtype=np.float32)})
    return moments[:, :pipeline.config.latent_channels] * pipeline.config.scale_factor


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp-2m"])
def test_img2img_lower_strength_stays_closer_to_the_init_image(tiny, sampler: str) -> None:
    init = gradient_image()
    target = _image_latents(tiny, init)
    distances = {}
    for strength in (0.3, 0.5, 1.0):
        result = tiny.generate(GenerationRequest(prompt="a cat", steps=10, sampler=sampler, seed=3,
                                                 init_image=init, strength=strength))
        assert_images(result, 1, 64, 64)
        distances[strength] = mean_abs(result.latents, target)
    txt2img = tiny.generate(GenerationRequest(prompt="a cat", steps=10, sampler=sampler, seed=3))
    # The random tiny decoder maps every latent to similar noise, so compare where the loop ends.
    assert distances[0.3] < distances[0.5] < 0.5 * distances[1.0], distances
    assert distances[1.0] > 0.5 * mean_abs(txt2img.latents, target), distances


def test_img2img_batch_broadcasts_one_init_image(tiny) -> None:
    result = tiny.generate(GenerationRequest(prompt=list(PROMPTS), batch=2, steps=4, height=32, width=48,
                                             init_image=gradient_image(32, 48), strength=0.5))
    assert_images(result, 2, 32, 48)


@pytest.mark.parametrize("shape", [(1, 32, 32, 3), (1, 64, 48, 3), (64, 64, 3), (1, 64, 64, 4), (3, 64, 64, 3)])
def test_img2img_refuses_an_init_image_of_the_wrong_shape(tiny, shape) -> None:
    image = np.full(shape, 0.5, np.float32)
    with pytest.raises(ShapeError, match="^init_image.*64, 64, 3"):
        tiny.generate(GenerationRequest(prompt="a cat", steps=2, init_image=image, strength=0.5))


def test_img2img_refuses_a_strength_outside_0_1(tiny) -> None:
    for strength in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(GenerationError, match="strength"):
            tiny.generate(GenerationRequest(prompt="a cat", steps=2, init_image=gradient_image(),
                                            strength=strength))


def test_img2img_needs_the_vae_encoder(tiny_bundle) -> None:
    without_encoder = Pipeline.load(tiny_bundle, components=("text_encoder", "unet", "vae_decoder"))
    with pytest.raises(GenerationError, match="vae_encoder"):
        without_encoder.generate(GenerationRequest(prompt="a cat", steps=2, init_image=gradient_image(),
                                                   strength=0.5))


# --- 5. bad requests: typed errors naming the input ----------------------------------------

def _one_nan(shape: tuple[int, ...]) -> np.ndarray:
    latents = noise(0, shape)
    latents[0, 2, 5, 7] = np.nan
    return latents


BAD_REQUESTS = {
    "height-not-multiple": ({"height": 30}, GenerationError, "^height 30"),
    "width-not-multiple": ({"width": 66}, GenerationError, "^width 66"),
    "height-below-range": ({"height": 16}, GenerationError, r"^height 16.*\[32, 96\]"),
    "width-above-range": ({"width": 128}, GenerationError, r"^width 128.*\[32, 96\]"),
    "height-float": ({"height": 64.0}, GenerationError, "^height"),
    "batch-over-max": ({"batch": 5}, GenerationError, "^batch 5.*at most 4"),
    "batch-zero": ({"batch": 0}, GenerationError, "^batch 0"),
    "steps-zero": ({"steps": 0}, GenerationError, "^steps 0"),
    "steps-negative": ({"steps": -3}, GenerationError, "^steps -3"),
    "guidance-nan": ({"guidance": float("nan")}, GenerationError, "^guidance nan"),
    "guidance-inf": ({"guidance": float("inf")}, GenerationError, "^guidance inf"),
    "seed-negative": ({"seed": -1}, GenerationError, "^seed -1"),
    "unknown-sampler": ({"sampler": "heun"}, GenerationError, "^sampler 'heun'.*dpmpp-2m"),
    "eta-not-ddim": ({"sampler": "euler", "eta": 0.5}, GenerationError, "eta"),
    "latents-wrong-shape": ({"latents": np.zeros((1, 4, 8, 8), np.float32)}, ShapeError,
                            r"^latents.*\[1, 4, 16, 16\].*\[1, 4, 8, 8\]"),
    "latents-wrong-batch": ({"latents": np.zeros((2, 4, 16, 16), np.float32)}, ShapeError, "^latents"),
    "latents-int": ({"latents": np.zeros((1, 4, 16, 16), np.int64)}, ShapeError, "^latents.*int64"),
    "latents-one-nan": ({"latents": _one_nan((1, 4, 16, 16))}, GenerationError, "^latents"),
    "latents-inf": ({"latents": np.full((1, 4, 16, 16), np.inf, np.float32)}, GenerationError, "^latents"),
    "prompts-vs-batch": ({"prompt": ["a", "b", "c"], "batch": 2}, GenerationError, "^prompt"),
    "negative-vs-batch": ({"negative_prompt": ["a", "b"], "batch": 3}, GenerationError, "^negative_prompt"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_raise_typed_errors_naming_the_input(tiny, name: str) -> None:
    change, error, message = BAD_REQUESTS[name]
    request = GenerationRequest(**{"prompt": "a cat", "steps": 2, **change})
    with pytest.raises(error, match=message) as raised:
        tiny.generate(request)
    assert isinstance(raised.value, LdmrtError)
    assert raised.value.field is not None      # the caller's input: the message starts with the field




@pytest.mark.parametrize("change, field", [
    ({"prompt": None}, "^prompt"),
    ({"prompt": 123}, "^prompt"),
    ({"guidance": "7.5"}, "^guidance"),
    ({"guidance": None}, "^guidance"),
    ({"prompt": ["a cat", None], "batch": 2}, "^prompt"),
    ({"seed": 1.5}, "^seed"),
])
def test_wrongly_typed_requests_raise_typed_errors(tiny, change, field: str) -> None:
    with pytest.raises(GenerationError, match=field) as raised:
        tiny.generate(GenerationRequest(**{"prompt": "a cat", "steps": 2, **change}))
    assert raised.value.field == field.lstrip("^")


def test_a_non_finite_init_image_is_named(tiny) -> None:
    image = gradient_image()
    image[0, 10, 20, 1] = np.nan
    with pytest.raises(GenerationError, match="^init_image"):
        tiny.generate(GenerationRequest(prompt="a cat", steps=4, init_image=image, strength=0.5))


def test_a_long_prompt_is_truncated_with_a_warning_not_an_error(tiny) -> None:
    long_prompt = "a red cat " * 40                 # 120 tokens; the model takes 75 + bos + eos
    kept = ("a red cat " * 25).strip()               # its first 75 tokens
    assert len(tiny.tokenizer.tokenize(long_prompt)) == 120 and len(tiny.tokenizer.tokenize(kept)) == 75
    result = tiny.generate(GenerationRequest(prompt=long_prompt, negative_prompt="blurry", steps=2))
    assert_images(result, 1, 64, 64)
    assert len(result.warnings) == 1 and "truncated" in result.warnings[0] and "77" in result.warnings[0]
    cut = tiny.generate(GenerationRequest(prompt=kept, negative_prompt="blurry", steps=2))
    np.testing.assert_array_equal(result.images, cut.images)
    assert cut.warnings == []
    negative = tiny.generate(GenerationRequest(prompt="a cat", negative_prompt=long_prompt, steps=2))
    assert len(negative.warnings) == 1 and "truncated" in negative.warnings[0]
    unguided = tiny.generate(GenerationRequest(prompt="a cat", negative_prompt=long_prompt, steps=2,
                                               guidance=1.0))
    assert unguided.warnings == [], "guidance 1 never tokenizes the negative prompt"


# --- 6. threads ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend_fixture", ["tiny", "tiny_torch"])
def test_four_threads_on_one_pipeline_match_sequential_calls(request, backend_fixture: str) -> None:
    pipeline: Pipeline = request.getfixturevalue(backend_fixture)
    samplers = ("dpmpp-2m", "euler-a", "plms", "ddim")     # multistep and stochastic state per call

    def make(seed: int) -> GenerationRequest:
        return GenerationRequest(prompt=PROMPTS[seed % 2], negative_prompt=NEGATIVE, steps=4, guidance=5.0,
                                 sampler=samplers[seed % 4], seed=seed, height=32 + 16 * (seed % 2), width=48)
    seeds = list(range(8))
    sequential = {seed: pipeline.generate(make(seed)) for seed in seeds}
    concurrent: dict[int, GenerationResult] = {}
    steps_seen: dict[int, list[int]] = {seed: [] for seed in seeds}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(mine: list[int]) -> None:
        try:
            barrier.wait(timeout=60)
            for seed in mine:
                concurrent[seed] = pipeline.generate(
                    make(seed), on_step=lambda done, total, s=seed: steps_seen[s].append(done))
        except BaseException as exc:       # re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seeds[k::4],)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert sorted(concurrent) == seeds
    for seed in seeds:
        np.testing.assert_array_equal(concurrent[seed].images, sequential[seed].images, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(concurrent[seed].latents, sequential[seed].latents)
        if backend_fixture == "tiny":     # torch reports no steps: test_on_step_reports_every_evaluation
            evaluations = 5 if samplers[seed % 4] == "plms" else 4
            assert steps_seen[seed] == list(range(1, evaluations + 1)), steps_seen


# --- 7. the lean runtime: no torch, transformers or diffusers ------------------------------

_BLOCKER = '''
import sys

class _Refuse:
    """Fails the import of the heavy stacks, as on a service host that does not have them."""
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "transformers", "diffusers", "torchvision"):
            raise ImportError(f"{name} is not installed on this host (blocked by the test)")
        return None

sys.meta_path.insert(0, _Refuse())
'''

_LEAN_SCRIPT = '''
import sys
import numpy as np
for name in ("torch", "transformers", "diffusers"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"the blocker let {name} import")
import ldmrt.engines.onnxruntime
import ldmrt.manifest
import ldmrt.runtime.pipeline
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
pipeline = Pipeline.load(sys.argv[1], "onnxruntime", threads=1)
result = pipeline.generate(GenerationRequest(prompt="a cat", negative_prompt="a dog", steps=2,
                                             sampler="dpmpp-2m", seed=4))
np.save(sys.argv[2], result.images)
heavy = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "transformers", "diffusers"))
assert not heavy, heavy
print("lean ok", result.images.shape)
'''


def test_runtime_generates_where_torch_transformers_and_diffusers_cannot_import(tiny, tiny_bundle,
                                                                                 tmp_path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(_BLOCKER))
    script = tmp_path / "lean.py"
    script.write_text(_LEAN_SCRIPT)
    out = tmp_path / "images.npy"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    result = subprocess.run([sys.executable, str(script), str(tiny_bundle), str(out)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lean ok (1, 64, 64, 3)" in result.stdout
    expected = tiny.generate(GenerationRequest(prompt="a cat", negative_prompt="a dog", steps=2,
                                               sampler="dpmpp-2m", seed=4))
    np.testing.assert_array_equal(np.load(out), expected.images)


def test_the_blocker_really_blocks(tmp_path) -> None:
    """The lean test above can fail: with the blocker, code that imports torch does not run."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(_BLOCKER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", "import ldmrt.engines.torch"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode != 0 and "blocked by the test" in result.stderr


# --- 8. the CLI: `ldmrt generate` ----------------------------------------------------------

@pytest.fixture
def cli(monkeypatch):
    from typer.testing import CliRunner

    from ldmrt.cli import app

    monkeypatch.setenv("LDMRT_THREADS", "1")       # as the API pipelines of this module
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, ["generate", *map(str, args)])
    return invoke


def test_cli_png_batch_writes_one_file_per_image(cli, tiny_bundle, tmp_path) -> None:
    from PIL import Image

    out = tmp_path / "cat.png"
    result = cli(tiny_bundle, "-p", "a cat", "--batch", "2", "--steps", "2", "--height", "32", "--out", out)
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["cat-0.png", "cat-1.png"]
    for name in written:
        with Image.open(tmp_path / name) as image:
            assert image.size == (64, 32) and image.mode == "RGB"     # (width, height)


def test_cli_npy_equals_the_api_result(cli, tiny, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "images.npy"
    result = cli(tiny_bundle, "-p", PROMPTS[0], "-p", PROMPTS[1], "--negative-prompt", NEGATIVE,
                 "--steps", "3", "--guidance", "5", "--sampler", "euler-a", "--seed", "17", "--height", "32",
                 "--width", "48", "--batch", "2", "--out", out)
    assert result.exit_code == 0, result.output
    images = np.load(out)
    assert images.dtype == np.float32 and images.shape == (2, 32, 48, 3)
    assert images.min() >= 0.0 and images.max() <= 1.0
    expected = tiny.generate(GenerationRequest(prompt=list(PROMPTS), negative_prompt=NEGATIVE, steps=3,
                                               guidance=5.0, sampler="euler-a", seed=17, height=32, width=48,
                                               batch=2))
    np.testing.assert_array_equal(images, expected.images)


def test_cli_latents_file_is_used_exactly(cli, tiny, tiny_bundle, tmp_path) -> None:
    latents = noise(123, tiny_shape(tiny, 2))
    np.save(tmp_path / "latents.npy", latents)
    args = ["-p", "a cat", "--steps", "3", "--sampler", "dpmpp-2m", "--batch", "2"]
    given = cli(tiny_bundle, *args, "--seed", "5", "--latents", tmp_path / "latents.npy",
                "--out", tmp_path / "given.npy")
    assert given.exit_code == 0, given.output
    expected = tiny.generate(GenerationRequest(prompt="a cat", steps=3, sampler="dpmpp-2m", batch=2,
                                               latents=latents))
    np.testing.assert_array_equal(np.load(tmp_path / "given.npy"), expected.images)
    seeded = cli(tiny_bundle, *args, "--seed", "5", "--out", tmp_path / "seeded.npy")
    assert seeded.exit_code == 0, seeded.output
    assert mean_abs(np.load(tmp_path / "seeded.npy"), expected.images) > 5 * IMAGE_TOL


def test_cli_init_image_runs_img2img(cli, tiny, tiny_bundle, tmp_path) -> None:
    from PIL import Image

    pixels = (gradient_image()[0] * 255 + 0.5).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "init.png")
    result = cli(tiny_bundle, "-p", "a cat", "--steps", "4", "--init-image", tmp_path / "init.png",
                 "--strength", "0.5", "--out", tmp_path / "out.npy")
    assert result.exit_code == 0, result.output
    expected = tiny.generate(GenerationRequest(prompt="a cat", steps=4, strength=0.5,
                                               init_image=pixels[None].astype(np.float32) / 255.0))
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected.images)


CLI_BAD = {    # {name} stands for a file the test writes; --out defaults to out/image.png
    "height-not-multiple": (["--height", "30"], "--height"),
    "height-out-of-range": (["--height", "128"], "--height"),
    "batch-over-max": (["--batch", "9"], "--batch"),
    "steps-zero": (["--steps", "0"], "--steps"),
    "guidance-nan": (["--guidance", "nan"], "--guidance"),
    "unknown-sampler": (["--sampler", "heun"], "--sampler"),
    "seed-negative": (["--seed", "-1"], "--seed"),
    "out-suffix": (["--out", "{out_jpg}"], "--out"),
    "latents-shape": (["--latents", "{wrong_shape}"], "--latents"),
    "latents-int": (["--latents", "{integers}"], "--latents"),
    "latents-missing": (["--latents", "{missing}"], "--latents"),
    "latents-not-npy": (["--latents", "{text}"], "--latents"),
    "init-image-size": (["--init-image", "{small_png}"], "--init-image"),
    "init-image-not-image": (["--init-image", "{text}"], "--init-image"),
}


@pytest.mark.parametrize("name", list(CLI_BAD))
def test_cli_bad_inputs_exit_2_with_one_error_line(cli, tiny_bundle, tmp_path, name: str) -> None:
    from PIL import Image

    files = {"wrong_shape": tmp_path / "wrong.npy", "integers": tmp_path / "int.npy",
             "missing": tmp_path / "missing.npy", "text": tmp_path / "text.npy",
             "small_png": tmp_path / "small.png", "out_jpg": tmp_path / "out" / "image.jpg"}
    np.save(files["wrong_shape"], np.zeros((1, 4, 8, 8), np.float32))
    np.save(files["integers"], np.zeros((1, 4, 16, 16), np.int32))
    files["text"].write_text("not an array, not an image")
    Image.new("RGB", (32, 32)).save(files["small_png"])
    args, option = CLI_BAD[name]
    args = [arg.format(**files) for arg in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out" / "image.png")]
    result = cli(tiny_bundle, "-p", "a cat", "--steps", "2", *args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and option in errors[0] and errors[0] == lines[-1], result.stderr
    assert not (tmp_path / "out").exists(), "nothing is written on error"


def test_cli_long_error_stays_on_one_line(cli, tiny_bundle, tmp_path) -> None:
    """CliRunner's stderr is 80 columns wide; a longer message must not be wrapped."""
    result = cli(tiny_bundle, "-p", "a cat", "--batch", "9", "--out", tmp_path / "x.png")
    assert result.exit_code == 2
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert len(last) > 80 and last.startswith("error: GenerationError: --batch 9") \
        and last.endswith("re-export with --max-batch"), result.stderr


def test_strength_without_an_init_image_is_refused_by_the_pipeline_itself(tiny) -> None:
    """Library and Triton callers get the same refusal as the command line, not a silently ignored value."""
    with pytest.raises(GenerationError, match="^strength applies to img2img only"):
        tiny.generate(GenerationRequest(prompt="a cat", steps=2, strength=0.5))
