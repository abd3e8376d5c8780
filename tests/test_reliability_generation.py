"""Issue 14, generation rows: guidance <= 1 (row 4), image modes (9), image bombs (12), `generate
--out` (13), request validation (15, 21) and cancellation (19).

Oracles: diffusers' StableDiffusionPipeline with the same weights (guidance), numpy on the
written pixel values (image modes), the request's own unguided / Python-typed runs (validation).
"""
from __future__ import annotations

import dataclasses
import io
import os
import resource
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ldmrt.errors import GenerationCancelled, GenerationError, LdmrtError, ShapeError
from ldmrt.runtime.images import MAX_IMAGE_PIXELS, read_image, write_images
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
from ldmrt.sampling import NumpyDenoiser

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from tests.test_pipeline import (IMAGE_TOL, NEGATIVE, PROMPTS, against_diffusers,  # noqa: E402,F401
                                 assert_golden, golden, mean_abs, noise, one_torch_thread, rel_l2,
                                 tiny, tiny_bundle, tiny_torch)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


class CountingRunner:
    """Wraps a component runner; records the batch of every call."""

    def __init__(self, runner):
        self.runner, self.spec, self.batches = runner, runner.spec, []

    def __call__(self, feeds):
        self.batches.append(len(next(iter(feeds.values()))))
        return self.runner(feeds)


@pytest.fixture
def counted(tiny_bundle):
    """A fresh tiny pipeline (numpy loop) whose runners count their calls."""
    pipeline = Pipeline.load(tiny_bundle, "onnxruntime", threads=1)
    pipeline.runners = {name: CountingRunner(r) for name, r in pipeline.runners.items()}
    pipeline.denoiser = NumpyDenoiser(pipeline.runners["unet"], pipeline.runners["unet"].spec)
    return pipeline


# --- row 4: guidance <= 1 is no classifier-free guidance, as in diffusers -------------------------

@pytest.mark.parametrize("guidance", [0.0, 0.5, 1.0])
def test_guidance_at_most_1_matches_diffusers(golden, record_property, guidance: float) -> None:
    g = golden("sd1")
    latents = noise(11, (2, g.config.latent_channels, 32 // g.factor, 48 // g.factor))
    found, expected = against_diffusers(g, GenerationRequest(
        prompt=list(PROMPTS), negative_prompt=NEGATIVE, steps=6, guidance=guidance, sampler="ddim",
        height=32, width=48, batch=2, latents=latents))
    assert_golden(found, expected, record_property)


@pytest.mark.parametrize("guidance", [0.0, 0.5, -2.0])
def test_guidance_at_most_1_runs_one_unet_batch_and_keeps_the_prompt(counted, guidance: float) -> None:
    request = GenerationRequest(prompt="a red cat", negative_prompt=NEGATIVE, steps=3, guidance=guidance,
                                seed=4, batch=2)
    result = counted.generate(request)
    assert counted.runners["unet"].batches == [2, 2, 2], "the unconditional half is skipped"
    assert counted.runners["text_encoder"].batches == [2], "the negative prompt is not encoded"
    unguided = counted.generate(dataclasses.replace(request, guidance=1.0))
    np.testing.assert_array_equal(result.images, unguided.images)
    other_prompt = counted.generate(dataclasses.replace(request, prompt="a blue dog"))
    # (the old formula at guidance 0 was the unconditional prediction alone: exactly no effect)
    assert mean_abs(other_prompt.latents, result.latents) > 1e-3, "the prompt was ignored"


def test_torch_fused_loop_skips_guidance_at_most_1(tiny, tiny_torch) -> None:
    request = GenerationRequest(prompt="a red cat", negative_prompt=NEGATIVE, steps=3, guidance=0.5,
                                sampler="dpmpp-2m", seed=3)
    found, expected = tiny_torch.generate(request), tiny.generate(request)
    assert rel_l2(found.latents, expected.latents) <= 1e-4
    unguided = tiny_torch.generate(dataclasses.replace(request, guidance=1.0))
    assert rel_l2(found.latents, unguided.latents) <= 1e-6
    # the fused loop on its own: unguided it takes the conditional rows only, and refuses
    # a [uncond; cond] context (the pipeline decides guidance, the denoiser never guesses)
    from ldmrt.sampling import DenoiseJob

    plan = tiny_torch._plan(dataclasses.replace(request, sampler="ddim"))
    x = noise(0, (1, 4, 16, 16))
    context = np.concatenate([np.zeros((1, 77, 32), np.float32), noise(1, (1, 77, 32))])
    no_noise = [None] * plan.num_evaluations
    with pytest.raises(ShapeError, match="encoder_hidden_states: expected 1 rows"):
        DenoiseJob(plan, x, {"encoder_hidden_states": context}, None, no_noise)
    cond_only = tiny_torch.denoiser(DenoiseJob(plan, x, {"encoder_hidden_states": context[1:]}, None, no_noise))
    reference = tiny.denoiser(DenoiseJob(plan, x, {"encoder_hidden_states": context[1:]}, None, no_noise))
    np.testing.assert_allclose(cond_only.latents, reference.latents, rtol=1e-4, atol=1e-5)


def test_int8_calibration_runs_unguided_at_guidance_at_most_1() -> None:
    from ldmrt.presets import preset
    from ldmrt.export.quantize import TrajectoryMaker
    from ldmrt.iospec import Precision, ShapeRanges, component_specs
    from ldmrt.models import build_model

    config = preset("tiny")
    model = build_model(config, seed=0).eval()
    spec = component_specs(config, ShapeRanges.for_model(config), Precision.FP32)["unet"]
    for guidance, batch in ((0.5, 1), (0.0, 1), (1.0, 1), (3.0, 2)):
        run = TrajectoryMaker(model, spec, (4, 4), guidance).run(
            lambda feeds: np.zeros_like(feeds["sample"]), 2, 0, "a red fox")
        assert {len(f["sample"]) for f in run.feeds} == {batch}, guidance
        assert {len(f["encoder_hidden_states"]) for f in run.feeds} == {batch}, guidance


# --- row 9: every image mode Pillow opens, to float RGB in [0, 1] ---------------------------------

def _gray16() -> np.ndarray:
    return (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21 % 65536).astype(np.uint16)


def _rgb8() -> np.ndarray:
    return (np.arange(48 * 64 * 3).reshape(48, 64, 3) * 7 % 256).astype(np.uint8)


def _alpha() -> np.ndarray:
    return (np.arange(48 * 64).reshape(48, 64) * 5 % 256).astype(np.uint8)


def _gray_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(gray, np.float64)[..., None], 3, axis=-1)


def _palette_image(with_alpha: bool):
    indices = (np.arange(48 * 64).reshape(48, 64) % 16).astype(np.uint8)
    palette = (np.arange(16 * 3).reshape(16, 3) * 17 % 256).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.ravel().tolist())
    if with_alpha:     # Pillow writes no PA PNG: a palette with a tRNS chunk opens as P + transparency
        image.info["transparency"] = bytes(range(0, 256, 16))
    return image, palette[indices] / 255.0


def _cases():
    """name -> (the PIL image to write, file format, its expected float RGB)."""
    g16, rgb8, alpha = _gray16(), _rgb8(), _alpha()
    gray8 = (g16 >> 8).astype(np.uint8)
    cmyk = (np.arange(48 * 64 * 4).reshape(48, 64, 4) * 11 % 256).astype(np.uint8)
    floats = (np.arange(48 * 64, dtype=np.float32).reshape(48, 64) / (48 * 64 - 1))
    ints = g16.astype(np.int32)
    p, p_expected = _palette_image(False)
    pa, pa_expected = _palette_image(True)
    c, k = cmyk[..., :3] / 255.0, cmyk[..., 3:] / 255.0
    return {
        "I;16-png": (Image.fromarray(g16), "PNG", _gray_rgb(g16) / 65535),
        "I;16B-tiff": (Image.frombytes("I;16B", (64, 48), g16.astype(">u2").tobytes()), "TIFF",
                       _gray_rgb(g16) / 65535),
        "I-tiff": (Image.fromarray(ints), "TIFF", _gray_rgb(ints) / 65535),
        "F-tiff": (Image.fromarray(floats), "TIFF", _gray_rgb(floats)),
        "L-png": (Image.fromarray(gray8), "PNG", _gray_rgb(gray8) / 255),
        "1-png": (Image.fromarray(gray8 > 127), "PNG", _gray_rgb(gray8 > 127)),
        "LA-png": (Image.fromarray(np.stack([gray8, alpha], -1), mode="LA"), "PNG", _gray_rgb(gray8) / 255),
        "RGB-png": (Image.fromarray(rgb8), "PNG", rgb8 / 255.0),
        "RGBA-png": (Image.fromarray(np.concatenate([rgb8, alpha[..., None]], -1)), "PNG", rgb8 / 255.0),
        "P-png": (p, "PNG", p_expected),
        "P-transparent-png": (pa, "PNG", pa_expected),
        "CMYK-tiff": (Image.fromarray(cmyk, mode="CMYK"), "TIFF", (1 - c) * (1 - k)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_every_image_mode_reads_as_float_rgb(tmp_path, name: str) -> None:
    image, fmt, expected = _cases()[name]
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, format=fmt)
    with Image.open(path) as reopened:
        assert reopened.mode == name.split("-")[0], reopened.mode      # the mode under test
    found = read_image(path)
    assert found.dtype == np.float32 and found.shape == (48, 64, 3)
    tolerance = 1 / 255 if name.startswith("CMYK") else 1e-6   # Pillow's integer CMYK conversion
    np.testing.assert_allclose(found, expected, atol=tolerance, rtol=0)


def _png(width: int, height: int, rows: bytes | None, bit_depth: int = 8, color_type: int = 0) -> bytes:
    """A PNG from raw scanlines (filter byte included); rows None: a header-only file (no pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = b"" if rows is None else chunk(b"IDAT", zlib.compress(rows, 9))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + body + chunk(b"IEND", b"")


def test_16_bit_rgb_png_reads_within_8_bits(tmp_path) -> None:
    """Pillow gives a 48-bit PNG as 8-bit RGB (the high byte): within 1/255 of value / 65535."""
    values = (np.arange(16 * 8 * 3, dtype=np.uint32).reshape(8, 16, 3) * 683 % 65536).astype(">u2")
    rows = b"".join(b"\x00" + values[y].tobytes() for y in range(8))
    (tmp_path / "rgb48.png").write_bytes(_png(16, 8, rows, bit_depth=16, color_type=2))
    np.testing.assert_allclose(read_image(tmp_path / "rgb48.png"), values / 65535.0, atol=1 / 255, rtol=0)


@pytest.mark.parametrize("mode, values", [("F", [0.0, 1.5]), ("F", [np.nan, 0.5]), ("I", [0, 70000]),
                                          ("I", [-1, 5])])
def test_out_of_range_pixels_are_refused_by_name(tmp_path, mode: str, values) -> None:
    dtype = np.float32 if mode == "F" else np.int32
    Image.fromarray(np.array([values] * 4, dtype)).save(tmp_path / "x.tiff")
    with pytest.raises(GenerationError, match=rf"^init_image .*x.tiff.*mode {mode}") as raised:
        read_image(tmp_path / "x.tiff")
    assert raised.value.field == "init_image"


# --- row 12: the declared size is checked before any pixel is decoded ----------------------------

_RSS_SCRIPT = '''
import resource, sys
from pathlib import Path
from ldmrt.errors import GenerationError
from ldmrt.runtime.images import read_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_image(Path(sys.argv[1]))
except GenerationError as exc:
    print("refused", exc.field, exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"rss_kib {before} {after}")
'''


@pytest.mark.parametrize("side, with_pixels", [(30000, False), (30000, True), (9600, True)])
def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path, record_property,
                                                                        side: int, with_pixels: bool) -> None:
    # 9600 x 9600 of zeros compresses to ~90 KB; decoding it would take ~1.2 GB (uint8 + float32 RGB).
    rows = (b"\x00" * (side + 1)) * side if with_pixels and side < 10000 else None
    if with_pixels and rows is None:    # 30000^2: a few rows of real data, the rest missing
        rows = (b"\x00" * (side + 1)) * 16
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(side, side, rows))
    assert path.stat().st_size < 2_000_000
    script = tmp_path / "rss.py"
    script.write_text(textwrap.dedent(_RSS_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("refused init_image init_image"), done.stdout
    assert f"{side * side:,} pixels" in lines[0] and f"{MAX_IMAGE_PIXELS:,}" in lines[0], lines[0]
    assert "cannot read" not in lines[0] and lines[0].count("init_image") == 2, lines[0]
    before, after = map(int, lines[-1].split()[1:])
    record_property("rss_mib_after", after / 1024)
    assert after - before < 50 * 1024, f"refusing took {(after - before) / 1024:.0f} MiB more"


def test_an_image_over_the_bundles_maximum_is_refused_before_decoding(tmp_path) -> None:
    Image.new("RGB", (128, 64)).save(tmp_path / "wide.png")
    with pytest.raises(GenerationError, match=r"^init_image .*128x64 pixels.*at most 96x96") as raised:
        read_image(tmp_path / "wide.png", max_size=(96, 96))
    assert raised.value.field == "init_image"
    assert read_image(tmp_path / "wide.png", max_size=(64, 128)).shape == (64, 128, 3)


# --- row 13: `generate --out` is checked before any work; foreign files are never overwritten -----

@pytest.fixture
def cli(monkeypatch):
    from typer.testing import CliRunner

    from ldmrt.cli import app

    monkeypatch.setenv("LDMRT_THREADS", "1")
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def no_work(monkeypatch):
    """Pipeline.load fails the test: an error must come before any model is loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("Pipeline.load ran: the error came after work")
    monkeypatch.setattr(Pipeline, "load", classmethod(refuse))


def error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def foreign_png(path: Path) -> bytes:
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path.read_bytes()


@pytest.mark.parametrize("where", ["a-directory", "proc", "under-a-file", "foreign-png", "foreign-png-batch",
                                   "existing-npy", "symlink"])
def test_unwritable_or_foreign_out_is_refused_before_any_work(cli, no_work, tiny_bundle, tmp_path,
                                                              where: str) -> None:
    before: dict[Path, bytes] = {}
    extra: list[str] = []
    if where == "a-directory":
        out = tmp_path / "dir.png"
        out.mkdir()
        expected = ["--out", "is a folder"]
    elif where == "proc":
        out = Path("/proc/ldmrt-test/x.png")
        expected = ["--out", "/proc", "cannot"]
    elif where == "under-a-file":
        (tmp_path / "file").write_text("mine")
        out = tmp_path / "file" / "x.png"
        expected = ["--out", "is a file, not a folder"]
    elif where in ("foreign-png", "foreign-png-batch"):
        out = tmp_path / "mine.png"
        target = out if where == "foreign-png" else tmp_path / "mine-1.png"
        before[target] = foreign_png(target)
        extra = [] if where == "foreign-png" else ["--batch", "2"]
        expected = ["--out", str(target), "not written by ldmrt"]
    elif where == "existing-npy":
        out = tmp_path / "mine.npy"
        np.save(out, np.zeros(3))
        before[out] = out.read_bytes()
        expected = ["--out", str(out), "exists"]
    else:
        target = tmp_path / "target.png"
        write_images(np.zeros((1, 8, 8, 3), np.float32), target)      # ldmrt's own file, but linked
        before[target] = target.read_bytes()
        out = tmp_path / "link.png"
        out.symlink_to(target)
        expected = ["--out", "symbolic link"]
    line = error_line(cli("generate", tiny_bundle, "-p", "a cat", "--steps", "1", *extra, "--out", out))
    missing = [fragment for fragment in expected if fragment not in line]
    assert not missing, (missing, line)
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path} was changed"
    if where == "symlink":
        assert out.is_symlink()


def test_an_image_ldmrt_wrote_is_overwritten_and_carries_the_marker(cli, tiny, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "cat.png"
    for seed in (1, 2):
        result = cli("generate", tiny_bundle, "-p", "a cat", "--steps", "2", "--seed", seed, "--out", out)
        assert result.exit_code == 0, result.output
        with Image.open(out) as image:
            assert image.info.get("Software", "").startswith("ldmrt"), image.info
            pixels = np.asarray(image)
        expected = tiny.generate(GenerationRequest(prompt="a cat", steps=2, seed=seed)).images[0]
        np.testing.assert_array_equal(pixels, (np.clip(expected, 0, 1) * 255 + 0.5).astype(np.uint8))
    # a file that merely claims another program, or no marker, is foreign
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "GIMP 2.10")
    Image.new("RGB", (8, 8)).save(out, pnginfo=info)
    line = error_line(cli("generate", tiny_bundle, "-p", "a cat", "--steps", "1", "--out", out))
    assert "not written by ldmrt" in line


def test_write_images_itself_refuses_a_foreign_file(tmp_path) -> None:
    content = foreign_png(tmp_path / "x.png")
    with pytest.raises(GenerationError, match="not written by ldmrt"):
        write_images(np.zeros((1, 8, 8, 3), np.float32), tmp_path / "x.png")
    assert (tmp_path / "x.png").read_bytes() == content


# --- rows 15 and 21: every field checked up front, named by its field -----------------------------

FIELD_ERRORS = [   # (request fields, field, fragments of the message)
    (dict(height=0), "height", "height 0: expected a positive multiple of the latent factor 4"),
    (dict(width=0), "width", "width 0: expected a positive multiple"),
    (dict(height=True), "height", "height True: expected an integer"),
    (dict(steps=True), "steps", "steps True: expected an integer"),
    (dict(steps=np.float64(3.0)), "steps", "steps 3.0: expected an integer"),
    (dict(guidance=True), "guidance", "guidance True: expected a number"),
    (dict(guidance=1e39), "guidance", "guidance 1e+39: expected a finite number"),
    (dict(guidance=np.float64("nan")), "guidance", "guidance nan: expected a finite number"),
    (dict(seed=False), "seed", "seed False: expected an integer"),
    (dict(seed=2 ** 64), "seed", "seed 18446744073709551616: expected an integer >= 0 and < 2**64"),
    (dict(batch=np.float32(2)), "batch", "batch 2.0: expected an integer"),
    (dict(eta=True), "eta", "eta True: expected a number"),
    (dict(strength=True, init_image=np.zeros((1, 64, 64, 3), np.float32)), "strength",
     "strength True: expected a number"),
    (dict(sampler=3), "sampler", "sampler 3: expected one of"),
    (dict(latents=np.zeros((1, 4, 8, 8), np.float32)), "latents", "latents: expected shape [1, 4, 16, 16]"),
    (dict(latents=[[1.0]]), "latents", "latents: expected a numpy array"),
    (dict(init_image=np.full((1, 64, 64, 3), 2.0, np.float32), strength=0.5), "init_image",
     "init_image: expected values in [0, 1], found values in [2, 2]"),
    (dict(class_labels=[3]), "class_labels", "class_labels [3]: this bundle's model is text-conditioned"),
    (dict(negative_prompt=5), "negative_prompt", "negative_prompt: expected a string or a list of strings"),
    (dict(prompt=["a", "b", "c"], batch=2), "prompt", "prompt: expected 1 or 2 strings, found 3"),
]


@pytest.mark.parametrize("fields, field, message", FIELD_ERRORS, ids=[e[2][:40] for e in FIELD_ERRORS])
def test_every_bad_field_is_named_by_its_field_before_any_work(counted, fields, field: str, message: str) -> None:
    with pytest.raises(LdmrtError) as raised:
        counted.generate(GenerationRequest(**{"prompt": "a cat", "steps": 2, **fields}))
    assert str(raised.value).startswith(message), str(raised.value)
    assert raised.value.field == field
    assert "--" not in str(raised.value).split(":")[0], "the library names fields, not flags"
    assert all(not r.batches for r in counted.runners.values()), "a model ran before the check"


def test_numpy_scalars_are_accepted_like_python_numbers(tiny) -> None:
    plain = GenerationRequest(prompt="a cat", steps=3, guidance=5.5, seed=9, height=32, width=48, batch=2,
                              sampler="ddim", eta=0.25)
    numpy = GenerationRequest(prompt="a cat", steps=np.int64(3), guidance=np.float32(5.5), seed=np.uint64(9),
                              height=np.int32(32), width=np.int16(48), batch=np.int8(2), sampler="ddim",
                              eta=np.float64(0.25))
    np.testing.assert_array_equal(tiny.generate(numpy).images, tiny.generate(plain).images)
    image = np.full((1, 64, 64, 3), 0.5, np.float32)
    one = tiny.generate(GenerationRequest(prompt="a cat", steps=2, init_image=image, strength=0.5))
    other = tiny.generate(GenerationRequest(prompt="a cat", steps=2, init_image=image,
                                            strength=np.float32(0.5)))
    np.testing.assert_array_equal(one.images, other.images)


def test_negative_prompt_none_is_the_empty_prompt(tiny) -> None:
    request = GenerationRequest(prompt="a cat", steps=2, guidance=6.0, seed=1)
    np.testing.assert_array_equal(tiny.generate(dataclasses.replace(request, negative_prompt=None)).images,
                                  tiny.generate(request).images)
    with pytest.raises(GenerationError, match="^negative_prompt: expected 1 or 2 strings"):
        tiny.generate(dataclasses.replace(request, negative_prompt=["a", None], batch=2))


def test_a_truncated_negative_prompt_says_negative_prompt(tiny) -> None:
    result = tiny.generate(GenerationRequest(prompt="a cat", negative_prompt="red cat " * 60, steps=1))
    assert len(result.warnings) == 1 and result.warnings[0].startswith("negative prompt truncated to 77"), \
        result.warnings
    both = tiny.generate(GenerationRequest(prompt="red cat " * 60, negative_prompt="red cat " * 60, steps=1))
    assert [w.split(" truncated")[0] for w in both.warnings] == ["negative prompt", "prompt"], both.warnings


def test_sampler_none_is_the_bundles_default(tiny, monkeypatch) -> None:
    request = GenerationRequest(prompt="a cat", steps=3, seed=2)
    assert request.sampler is None
    for default in ("euler", "dpmpp-2m"):
        scheduler = dataclasses.replace(tiny.config.scheduler, default_sampler=default)
        monkeypatch.setattr(tiny, "config", dataclasses.replace(tiny.config, scheduler=scheduler))
        np.testing.assert_array_equal(tiny.generate(request).images,
                                      tiny.generate(dataclasses.replace(request, sampler=default)).images)
    assert mean_abs(tiny.generate(request).images,
                    tiny.generate(dataclasses.replace(request, sampler="ddim")).images) > IMAGE_TOL


@pytest.mark.filterwarnings("ignore::RuntimeWarning")      # the overflow itself
def test_non_finite_latents_advice_fits_the_bundles_precision(counted, monkeypatch) -> None:
    """(The tiny UNet stays finite even at guidance 3e38, so its output is scaled to overflow.)"""
    from ldmrt.iospec import Precision

    unet = counted.runners["unet"]

    class Overflowing(CountingRunner):
        def __call__(self, feeds):
            return unet(feeds) * np.float32(3e38)
    counted.runners["unet"] = Overflowing(unet)
    counted.denoiser = NumpyDenoiser(counted.runners["unet"], unet.spec)
    request = GenerationRequest(prompt="a cat", negative_prompt="a dog", steps=2, guidance=7.5)
    with pytest.raises(GenerationError) as raised:
        counted.generate(request)
    message = str(raised.value)
    assert "non-finite latents after denoising step 1 of 2" in message and "lower guidance" in message
    assert "fp32 export" not in message, "the bundle is fp32 already"
    monkeypatch.setattr(counted, "manifest", dataclasses.replace(counted.manifest, precision=Precision.FP16))
    with pytest.raises(GenerationError, match="fp32 export"):
        counted.generate(request)


def test_prompts_are_refused_on_a_class_model_and_labels_accepted_as_numpy(tmp_path) -> None:
    """(class labels on a text model: FIELD_ERRORS above)."""
    from ldmrt.export.bundle import ExportOptions, export_bundle
    from ldmrt.iospec import ShapeRanges
    from tests.families import FAMILIES, model_source

    options = ExportOptions(validate=False, components=("unet", "vae_decoder"),
                            shape_ranges=ShapeRanges(min_size=16, opt_size=16, max_size=16, max_batch=1))
    pipeline = Pipeline.load(export_bundle(model_source(FAMILIES["ldm-class"]), tmp_path / "class", options).path)
    with pytest.raises(GenerationError, match="^prompt 'a cat': this bundle's model is class-conditional") as raised:
        pipeline.generate(GenerationRequest(prompt="a cat", steps=1))
    assert raised.value.field == "prompt"
    pipeline.runners["unet"] = unet = CountingRunner(pipeline.runners["unet"])
    pipeline.denoiser = NumpyDenoiser(unet, unet.spec)
    plain = pipeline.generate(GenerationRequest(class_labels=[2], steps=2, guidance=3.0))
    numpy = pipeline.generate(GenerationRequest(class_labels=np.array([2]), steps=2, guidance=np.float32(3.0)))
    np.testing.assert_array_equal(plain.images, numpy.images)
    assert unet.batches == [2] * 4, "guided: [no class; class 2]"
    # row 4 on the class-conditional path: guidance <= 1 is the label's prediction alone
    unguided = pipeline.generate(GenerationRequest(class_labels=[2], steps=2, guidance=1.0))
    half = pipeline.generate(GenerationRequest(class_labels=[2], steps=2, guidance=0.5))
    assert unet.batches[4:] == [1] * 4
    np.testing.assert_array_equal(half.images, unguided.images)
    other = pipeline.generate(GenerationRequest(class_labels=[5], steps=2, guidance=0.0))
    assert mean_abs(other.latents, half.latents) > 1e-4, "the label was ignored"
    with pytest.raises(GenerationError, match=r"^class_labels \[10\]: expected 1 integer labels in \[0, 10\)") as raised:
        pipeline.generate(GenerationRequest(class_labels=[10], steps=1))
    assert raised.value.field == "class_labels"


def test_cli_maps_fields_to_flags(cli, tiny_bundle, tmp_path) -> None:
    np.save(tmp_path / "small.npy", np.zeros((1, 4, 8, 8), np.float32))
    Image.new("RGB", (128, 64)).save(tmp_path / "wide.png")        # the tiny bundle: at most 96 x 96
    cases = [(["--init-image", tmp_path / "wide.png"],
              f"GenerationError: --init-image {tmp_path / 'wide.png'}: the file declares 128x64 pixels"),(["--latents", tmp_path / "small.npy"], "ShapeError: --latents: expected shape"),
             (["--class-label", "3"], "GenerationError: --class-label [3]: this bundle's model is text"),
             (["--height", "0"], "GenerationError: --height 0: expected a positive multiple"),
             (["--negative-prompt", "x", "--guidance", "1e39"], "GenerationError: --guidance 1e+39")]
    for args, expected in cases:
        line = error_line(cli("generate", tiny_bundle, "-p", "a cat", "--steps", "1", *args,
                              "--out", tmp_path / "x.png"))
        assert expected in line, line
    assert not (tmp_path / "x.png").exists()


def test_user_errors_swaps_only_a_leading_field_name() -> None:
    from ldmrt.commands.terminal import flag_for, user_errors

    assert [flag_for(f) for f in ("init_image", "class_labels", "negative_prompt", "steps")] == \
        ["--init-image", "--class-label", "--negative-prompt", "--steps"]
    import typer
    from rich.console import Console

    import ldmrt.commands.terminal as cli_module
    buffer = io.StringIO()
    console = cli_module.console
    cli_module.console = Console(file=buffer, width=300)
    try:
        for error, expected in ((LdmrtError("init_image x.png: bad", field="init_image"), "--init-image x.png: bad"),
                                (LdmrtError("the steps are: bad", field="steps"), "the steps are: bad"),
                                (LdmrtError("steps 0: bad"), "steps 0: bad")):
            with pytest.raises(typer.Exit):
                with user_errors():
                    raise error
            assert buffer.getvalue().splitlines()[-1].endswith(f"LdmrtError: {expected}"), buffer.getvalue()
    finally:
        cli_module.console = console


# --- row 19: a caller cancels between steps -----------------------------------------------------------

@pytest.mark.parametrize("backend", ["counted", "tiny_torch"])
def test_cancel_stops_between_steps_and_names_the_step(request, backend: str) -> None:
    pipeline: Pipeline = request.getfixturevalue(backend)
    steps: list[int] = []
    with pytest.raises(GenerationCancelled, match="after denoising step 2 of 5") as raised:
        pipeline.generate(GenerationRequest(prompt="a cat", steps=5, guidance=3.0),
                          on_step=lambda done, total: steps.append(done), cancel=lambda: len(steps) >= 2)
    assert steps == [1, 2]
    assert isinstance(raised.value, LdmrtError) and raised.value.field is None
    if backend == "counted":
        assert pipeline.runners["unet"].batches == [2, 2] and pipeline.runners["vae_decoder"].batches == []


def test_cancel_is_checked_before_the_text_encoder_and_before_the_decoder(counted) -> None:
    with pytest.raises(GenerationCancelled, match="before the text encoder"):
        counted.generate(GenerationRequest(prompt="a cat", steps=2), cancel=lambda: True)
    assert all(not r.batches for r in counted.runners.values())
    calls = {"n": 0}

    def after_the_loop() -> bool:
        calls["n"] += 1
        return counted.runners["unet"].batches == [2, 2]
    with pytest.raises(GenerationCancelled, match="before the VAE decoder"):
        counted.generate(GenerationRequest(prompt="a cat", steps=2), cancel=after_the_loop)
    assert counted.runners["vae_decoder"].batches == []
    never = counted.generate(GenerationRequest(prompt="a cat", steps=2), cancel=lambda: False)
    assert never.images.shape == (1, 64, 64, 3)
    with pytest.raises(GenerationError, match="^cancel: expected a callable"):
        counted.generate(GenerationRequest(prompt="a cat", steps=2), cancel=True)
