"""Robustness: every bad input gets a typed error naming the input, what was expected and what was
found; the CLI turns it into one line and exit code 2; nothing half-written is left behind; one
loaded pipeline serves many threads. docs/robustness.md maps every row to the test that covers it
(here or in the other test files). Known bugs are strict xfails: they fail loudly once fixed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from typer.testing import CliRunner

from ldmrt.cli import app
from ldmrt.presets import preset
from ldmrt.engines import trt_api
from ldmrt.errors import BundleError, CheckpointError, ConfigError, GenerationError, ShapeError
from ldmrt.manifest import (MANIFEST_NAME, TOKENIZER_DIR, ComponentEntry, load_manifest,
                            write_manifest)
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
from ldmrt.sampling import make_plan
from tests.modules import load_file

REPO = Path(__file__).resolve().parents[1]
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=30)


# --- shared fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """tiny, fp32, 32..64 px, at most 2 images per call; not validated (test_export does that)."""
    from tests.families import export_small_tiny

    return export_small_tiny(tmp_path_factory.mktemp("robust") / "tiny")


@pytest.fixture(scope="module")
def pipeline(bundle) -> Pipeline:
    return Pipeline.load(bundle, "onnxruntime")


def copy_bundle(bundle: Path, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    # Without the module bundle's ORT cache: a sound entry stands in for its graph, which is then not read.
    return Path(shutil.copytree(bundle, where / "bundle", ignore=shutil.ignore_patterns("ort_cache")))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_names(message: str, *fragments: str) -> None:
    """The message names the input, what was expected and what was found (each a fragment)."""
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{missing} not in {message!r}"


# --- CLI helpers -----------------------------------------------------------------------------

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error(result) -> str:
    """Exit 2, no traceback, and the error is exactly one line (the last one on stderr)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


# --- generation: bad requests ------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_REQUESTS = [   # (id, request fields, error type, fragments: input, expected, found)
    ("height-not-multiple", dict(height=30), GenerationError,
     ["height 30", "a positive multiple of the latent factor 4"]),
    ("width-not-multiple", dict(width=66), GenerationError, ["width 66", "multiple of the latent factor 4"]),
    ("height-above-range", dict(height=96), GenerationError,
     ["height 96", "outside the exported range [32, 64] pixels", "--max-size"]),
    ("width-below-range", dict(width=16), GenerationError, ["width 16", "exported range [32, 64]"]),
    ("batch-over-max", dict(batch=3), GenerationError, ["batch 3", "at most 2 images per call", "--max-batch"]),
    ("batch-zero", dict(batch=0), GenerationError, ["batch 0", "expected an integer >= 1"]),
    ("steps-zero", dict(steps=0), GenerationError, ["steps 0", "expected an integer >= 1"]),
    ("steps-negative", dict(steps=-3), GenerationError, ["steps -3", "expected an integer >= 1"]),
    ("guidance-nan", dict(guidance=NAN), GenerationError, ["guidance nan", "expected a finite number"]),
    ("guidance-inf", dict(guidance=INF), GenerationError, ["guidance inf", "expected a finite number"]),
    ("guidance-minus-inf", dict(guidance=-INF), GenerationError, ["guidance -inf", "finite"]),
    ("unknown-sampler", dict(sampler="heun"), GenerationError,
     ["sampler 'heun'", "expected one of", "'dpmpp-2m-karras'"]),
    ("eta-nan", dict(eta=NAN), GenerationError, ["eta", "expected a number in [0, 1]", "nan"]),
    ("latents-shape", dict(latents=np.zeros((1, 4, 4, 4), np.float32)), ShapeError,
     ["latents", "expected shape [1, 4, 8, 8]", "found [1, 4, 4, 4]"]),
    ("latents-batch", dict(latents=np.zeros((2, 4, 8, 8), np.float32)), ShapeError,
     ["latents", "expected shape [1, 4, 8, 8]", "found [2, 4, 8, 8]"]),
    ("latents-dtype", dict(latents=np.zeros((1, 4, 8, 8), np.int32)), ShapeError,
     ["latents", "expected a float array", "found dtype int32"]),
    ("latents-nan", dict(latents=np.full((1, 4, 8, 8), NAN, np.float32)), GenerationError,
     ["latents", "expected finite", "NaN/Inf"]),
    ("latents-inf", dict(latents=np.full((1, 4, 8, 8), INF, np.float32)), GenerationError,
     ["latents", "expected finite", "NaN/Inf"]),
    ("prompt-count", dict(prompt=["a", "b", "c"], batch=2), GenerationError,
     ["prompt", "expected 1 or 2 strings", "found 3"]),
]


@pytest.mark.parametrize("fields, error, fragments", [c[1:] for c in BAD_REQUESTS],
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_refused_before_any_work(pipeline, fields, error, fragments) -> None:
    steps_done = []
    with pytest.raises(error) as info:
        pipeline.generate(GenerationRequest(**{"prompt": "a cat", "steps": 2, **fields}),
                          on_step=lambda done, total: steps_done.append(done))
    assert_names(str(info.value), *fragments)
    assert info.value.field is not None and str(info.value).startswith(info.value.field)
    assert steps_done == []          # refused up front, not after minutes of denoising


def test_non_finite_latents_are_blamed_on_the_input(pipeline) -> None:
    latents = np.zeros((1, 4, 8, 8), np.float32)
    latents[0, 1, 2, 3] = NAN
    with pytest.raises(GenerationError) as info:
        pipeline.generate(GenerationRequest(prompt="a cat", steps=2, latents=latents))
    assert_names(str(info.value), "latents", "expected finite values", "found 1")
    assert "fp32" not in str(info.value)


def test_long_prompt_warning_reaches_the_log_and_the_terminal(pipeline, bundle, caplog) -> None:
    """What is cut is tested in tests/test_pipeline.py; here: the user is told, in both channels."""
    with caplog.at_level(logging.WARNING, logger="ldmrt.runtime.pipeline"):
        result = pipeline.generate(GenerationRequest(prompt="cat " * 200, steps=1))
    assert len(result.warnings) == 1 and "prompt truncated to 77 tokens" in result.warnings[0]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == result.warnings
    out = Path(tempfile.mkdtemp()) / "a.png"
    cli = invoke("generate", bundle, "-p", "cat " * 200, "--steps", "1", "--out", out)
    assert cli.exit_code == 0, cli.output
    assert "warning: prompt truncated to 77 tokens" in cli.stderr and out.is_file()


# --- generation: non-finite values, detected where they appear --------------------------------

def poisoned(bundle: Path, where: Path, component: str, nodes) -> Path:
    """A copy of `bundle` whose `component` graph feeds its output through `nodes(raw, out)`; rehashed."""
    out = copy_bundle(bundle, where)
    manifest = load_manifest(out)
    entry = manifest.component(component)
    model = onnx.load(str(out / entry.file))
    name = entry.spec.outputs[0].name
    raw = f"{name}_before_poison"
    for node in model.graph.node:
        for i, output in enumerate(node.output):
            if output == name:
                node.output[i] = raw
    model.graph.node.extend(nodes(raw, name))
    onnx.checker.check_model(model)
    onnx.save(model, str(out / entry.file))
    fresh = ComponentEntry.from_files(out, entry.spec, entry.dtype, entry.parity)
    write_manifest(out, dataclasses.replace(manifest, components={**manifest.components, component: fresh}))
    return out


def const(name: str, value: float):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [1], [value]))


def unet_poison_after(threshold: float, op: str):
    """model_output += f(timestep - threshold): finite above the threshold, NaN (Sqrt) or inf below."""
    def nodes(raw, out):
        shape = helper.make_node("Constant", [], ["p_shape"],
                                 value=helper.make_tensor("p_shape", TensorProto.INT64, [4], [-1, 1, 1, 1]))
        made = [const("p_threshold", threshold), shape,
                helper.make_node("Sub", ["timestep", "p_threshold"], ["p_delta"])]
        if op == "nan":
            made.append(helper.make_node("Sqrt", ["p_delta"], ["p_bad"]))
        else:                               # 1 / relu(t - threshold): +inf once t < threshold
            made += [helper.make_node("Relu", ["p_delta"], ["p_relu"]),
                     helper.make_node("Reciprocal", ["p_relu"], ["p_bad"])]
        return made + [helper.make_node("Reshape", ["p_bad", "p_shape"], ["p_4d"]),
                       helper.make_node("Add", [raw, "p_4d"], [out])]
    return nodes


def times(value: float):
    return lambda raw, out: [const("p_value", value), helper.make_node("Mul", [raw, "p_value"], [out])]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("op", ["nan", "inf"])
def test_non_finite_unet_output_is_caught_at_its_step(bundle, tmp_path, op) -> None:
    timesteps = make_plan("ddim", preset("tiny").scheduler, 4).timesteps      # 751, 501, 251, 1
    threshold = float(timesteps[1] + timesteps[2]) / 2                          # bad from step 3 on
    broken = poisoned(bundle, tmp_path, "unet", unet_poison_after(threshold, op))
    steps_done = []
    with pytest.raises(GenerationError) as info:
        Pipeline.load(broken).generate(GenerationRequest(prompt="a cat", steps=4, sampler="ddim"),
                                       on_step=lambda done, total: steps_done.append(done))
    assert_names(str(info.value), "non-finite latents after denoising step 3 of 4", "sampler ddim",
                 "precision fp32", "fp32")
    assert steps_done == [1, 2]      # detected at the step itself, not after the loop
    error = one_error(invoke("generate", broken, "-p", "a cat", "--steps", "4",
                             "--out", tmp_path / "x.png"))
    assert "GenerationError" in error and "step 3 of 4" in error
    assert not (tmp_path / "x.png").exists()


def test_non_finite_images_suggest_what_fits_the_decoders_precision(bundle, tmp_path, monkeypatch) -> None:
    broken = Pipeline.load(poisoned(bundle, tmp_path, "vae_decoder", times(INF)))
    with pytest.raises(GenerationError) as info:
        broken.generate(GenerationRequest(prompt="a cat", steps=2))
    assert_names(str(info.value), "non-finite values in the decoded pixels from the vae_decoder",
                 "precision fp32", "runs in fp32")
    assert "--fp32-vae-decoder" not in str(info.value), "the decoder is fp32 already"
    entry = dataclasses.replace(broken.manifest.component("vae_decoder"), dtype="float16")
    monkeypatch.setattr(broken, "manifest", dataclasses.replace(
        broken.manifest, components={**broken.manifest.components, "vae_decoder": entry}))
    with pytest.raises(GenerationError, match="export with --fp32-vae-decoder"):
        broken.generate(GenerationRequest(prompt="a cat", steps=2))


def test_non_finite_text_embeddings_are_caught_before_denoising(bundle, tmp_path) -> None:
    broken = poisoned(bundle, tmp_path, "text_encoder", times(NAN))
    steps_done = []
    with pytest.raises(GenerationError, match="non-finite values in text embeddings"):
        Pipeline.load(broken).generate(GenerationRequest(prompt="a cat", steps=2),
                                       on_step=lambda done, total: steps_done.append(done))
    assert steps_done == []


# --- CLI: user errors are one line and exit 2 ----------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    np.save(folder / "small.npy", np.zeros((1, 4, 4, 4), np.float32))
    np.save(folder / "ints.npy", np.zeros((1, 4, 8, 8), np.int32))
    np.save(folder / "object.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    (folder / "text.npy").write_text("not an array")
    return {p.stem: p for p in folder.iterdir()}


CLI_CASES = [   # (id, arguments after the bundle, fragments of the error line); the other generation
    # options are covered by tests/test_pipeline.py::test_cli_bad_inputs_exit_2_with_one_error_line
    ("latents-pickle", ["--latents", "{object}"],
     ["GenerationError", "--latents {object}", "cannot read a .npy array", "allow_pickle=False"]),
    ("latents-garbage", ["--latents", "{text}"], ["GenerationError", "--latents {text}", "cannot read a .npy"]),
    ("out-suffix", ["--out", "{outjpg}"], ["GenerationError", "--out {outjpg}", "expected a .png or .npy"]),
    ("backend", ["--backend", "cuda"], ["ConfigError", "--backend 'cuda'", "expected one of",
                                        "onnxruntime, tensorrt, tensorrt-rtx, torch"]),
]


@pytest.mark.parametrize("args, fragments", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_generation_errors_are_one_line_exit_2(bundle, files, tmp_path, args, fragments) -> None:
    names = {**{k: str(v) for k, v in files.items()}, "outjpg": str(tmp_path / "out.jpg")}
    fill = lambda s: s.format(**names)  # noqa: E731
    argv = ["generate", bundle, "-p", "a cat", "--steps", "2", *map(fill, args)]
    if "--out" not in args:
        argv += ["--out", tmp_path / "out.png"]
    assert_names(one_error(invoke(*argv)), *map(fill, fragments))
    assert [p.name for p in tmp_path.iterdir()] == []          # no image, no temp file


def test_cli_debug_shows_the_traceback(bundle, tmp_path) -> None:
    result = invoke("--debug", "generate", bundle, "--height", "30", "--out", tmp_path / "a.png")
    assert result.exit_code != 0 and isinstance(result.exception, GenerationError)
    assert str(result.exception).startswith("height 30") and result.exception.field == "height"


def test_cli_negative_seed_is_a_user_error(bundle, tmp_path) -> None:
    error = one_error(invoke("generate", bundle, "--seed", "-1", "--steps", "1",
                             "--out", tmp_path / "a.png"))
    assert_names(error, "GenerationError", "--seed -1", ">= 0")


def test_cli_unparsable_option_is_one_line(bundle, tmp_path) -> None:
    result = invoke("generate", bundle, "--steps", "abc", "--out", tmp_path / "a.png")
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "--steps" in errors[0] and "│" not in result.stderr, result.stderr


@pytest.mark.parametrize("backend", ["tensorrt", "tensorrt-rtx"])
def test_cli_missing_tensorrt_names_the_pip_packages(bundle, tmp_path, monkeypatch, backend) -> None:
    for name in trt_api.MODULE_NAMES[backend]:
        monkeypatch.setitem(sys.modules, name, None)
    error = one_error(invoke("generate", bundle, "--backend", backend, "--out", tmp_path / "a.png"))
    assert_names(error, "BackendUnavailableError", backend, "pip install")


# --- bundles: what generate does with a damaged bundle ------------------------------------------

def flip_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))


BUNDLE_DAMAGE = [   # (id, edit(bundle), fragments of the BundleError)
    ("flipped-byte", lambda b: flip_byte(b / "unet.onnx"),
     ["file unet.onnx does not match components.unet.sha256", "expected sha256", "found"]),
    ("missing-file", lambda b: (b / "vae_decoder.onnx").unlink(), ["file vae_decoder.onnx", "is missing"]),
    ("truncated-file", lambda b: os.truncate(b / "unet.onnx", 100), ["components.unet.size_bytes", "found 100"]),
    ("tokenizer-file", lambda b: flip_byte(b / TOKENIZER_DIR / "tokenizer.json"),
     ["tokenizer/tokenizer.json", "tokenizer.files"]),
    ("no-manifest", lambda b: (b / MANIFEST_NAME).unlink(), ["expected manifest.json, found no such file"]),
    ("corrupt-manifest", lambda b: (b / MANIFEST_NAME).write_bytes(b"\x00garbage"),
     ["expected manifest.json to be UTF-8 JSON"]),
    ("half-manifest", lambda b: os.truncate(b / MANIFEST_NAME, 500), ["manifest.json", "UTF-8 JSON"]),
    ("newer-schema", lambda b: (b / MANIFEST_NAME).write_text(json.dumps(
        {**json.loads((b / MANIFEST_NAME).read_text()), "schema_version": 7})),
     ["field schema_version", "newer ldmrt", "upgrade"]),
]


@pytest.mark.parametrize("edit, fragments", [c[1:] for c in BUNDLE_DAMAGE], ids=[c[0] for c in BUNDLE_DAMAGE])
def test_damaged_bundle_is_refused_by_load_and_cli(bundle, tmp_path, edit, fragments) -> None:
    damaged = copy_bundle(bundle, tmp_path / "copy")
    edit(damaged)
    before = tree(damaged)
    with pytest.raises(BundleError) as info:
        Pipeline.load(damaged)
    assert_names(str(info.value), f"bundle {damaged}", *fragments)
    error = one_error(invoke("generate", damaged, "--out", tmp_path / "a.png"))
    assert "BundleError" in error and fragments[0] in error
    assert tree(damaged) == before and not (tmp_path / "a.png").exists()


# --- bundles: hostile files (manifest parsing is property-tested in test_manifest.py) ------------

@settings(PROPERTY, max_examples=40)
@given(st.data())
def test_manifest_cut_anywhere_is_a_bundle_error(bundle, data) -> None:
    text = (bundle / MANIFEST_NAME).read_bytes()
    cut = data.draw(st.integers(0, len(text) - 2), label="cut")     # the last byte is a newline
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / MANIFEST_NAME).write_bytes(text[:cut])
        with pytest.raises(BundleError, match=f"bundle {folder}"):
            load_manifest(folder)


@settings(PROPERTY, max_examples=25)
@given(st.integers(65, 1 << 20), st.integers(0, 2**32 - 1), st.booleans())
def test_large_random_manifest_is_a_bundle_error(bundle, size, seed, json_prefix) -> None:
    blob = np.random.default_rng(seed).bytes(size)
    if json_prefix:                  # a plausible start, then garbage
        blob = (bundle / MANIFEST_NAME).read_bytes()[:size // 2] + blob
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / MANIFEST_NAME).write_bytes(blob)
        with pytest.raises(BundleError, match=f"bundle {folder}"):
            load_manifest(folder)


def finishes(call, seconds: float = 10.0):
    """(finished, exception) of `call` run in a daemon thread; a hang shows as finished=False."""
    outcome: list = []

    def target():
        try:
            call()
            outcome.append(None)
        except BaseException as exc:   # noqa: BLE001 - reported to the test
            outcome.append(exc)
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(outcome), (outcome[0] if outcome else None)


def test_huge_files_are_refused_without_reading_them(bundle, tmp_path) -> None:
    copy = copy_bundle(bundle, tmp_path)
    unet = copy / "unet.onnx"
    os.truncate(unet, 64 << 30)                       # sparse 64 GiB: hashing it would take minutes
    done, error = finishes(lambda: Pipeline.load(copy), seconds=5)
    assert done and isinstance(error, BundleError), error
    assert_names(str(error), "components.unet.size_bytes", f"found {64 << 30}")
    manifest = tmp_path / "big" / MANIFEST_NAME
    manifest.parent.mkdir()
    with open(manifest, "wb") as handle:
        handle.truncate(4 << 30)                      # sparse 4 GiB manifest
    done, error = finishes(lambda: load_manifest(manifest.parent), seconds=5)
    assert done and isinstance(error, BundleError) and "at most 16777216 bytes" in str(error), error


SPECIAL = {   # what a hostile bundle member may be instead of a regular file
    "fifo": lambda path: os.mkfifo(path),
    "dev-zero": lambda path: path.symlink_to("/dev/zero"),
    "folder": lambda path: path.mkdir(),
    "dangling-link": lambda path: path.symlink_to(path.parent / "nowhere"),
}


@pytest.mark.parametrize("member", [MANIFEST_NAME, "unet.onnx", f"{TOKENIZER_DIR}/tokenizer.json"])
@pytest.mark.parametrize("kind", sorted(SPECIAL))
def test_special_files_in_a_bundle_are_refused_without_hanging(bundle, tmp_path, member, kind) -> None:
    copy = copy_bundle(bundle, tmp_path)
    (copy / member).unlink()
    SPECIAL[kind](copy / member)
    done, error = finishes(lambda: Pipeline.load(copy))
    assert done, f"{member} as {kind}: Pipeline.load hangs"
    assert isinstance(error, BundleError), error
    assert_names(str(error), f"bundle {copy}", member.split("/")[-1] if member != MANIFEST_NAME else MANIFEST_NAME)


TAMPER = {
    "flip": lambda path, rng: flip_byte(path),
    "truncate": lambda path, rng: os.truncate(path, int(rng.integers(0, path.stat().st_size))),
    "append": lambda path, rng: path.write_bytes(path.read_bytes() + rng.bytes(int(rng.integers(1, 64)))),
    "same-size": lambda path, rng: path.write_bytes(rng.bytes(path.stat().st_size)),
    "delete": lambda path, rng: path.unlink(),
}


@PROPERTY
@given(st.sampled_from(["text_encoder.onnx", "unet.onnx", "vae_decoder.onnx", "tokenizer/tokenizer.json"]),
       st.sampled_from(sorted(TAMPER)), st.integers(0, 2**32 - 1))
def test_any_tampered_file_is_named_by_load(bundle, member, operation, seed) -> None:
    with tempfile.TemporaryDirectory() as folder:
        copy = copy_bundle(bundle, Path(folder))
        TAMPER[operation](copy / member, np.random.default_rng(seed))
        with pytest.raises(BundleError) as info:
            Pipeline.load(copy)
        assert_names(str(info.value), f"bundle {copy}", member.split("/")[-1])


@pytest.mark.parametrize("member", ["unet.onnx", TOKENIZER_DIR])
def test_symlinks_escaping_the_bundle_are_refused(bundle, tmp_path, member) -> None:
    copy = copy_bundle(bundle, tmp_path)
    outside = tmp_path / "outside"
    shutil.move(str(copy / member), outside)          # same bytes, so every sha256 still matches
    (copy / member).symlink_to(outside, target_is_directory=outside.is_dir())
    with pytest.raises(BundleError) as info:
        Pipeline.load(copy)
    assert_names(str(info.value), member, "outside the bundle")


# --- export: interrupted, unwritable, stale leftovers --------------------------------------------

# The UNet's export starts with a long pause, so a signal sent once text_encoder.onnx exists always
# lands mid-export (without it a fast machine can finish the tiny UNet before the signal arrives).
SLOW_UNET = """
import time
import ldmrt.export.bundle as bundle
real = bundle._export_component
def slow(model, spec, *args, **kwargs):
    if spec.name == "unet":
        time.sleep(60)
    return real(model, spec, *args, **kwargs)
bundle._export_component = slow
"""


def export_process(out: Path, *extra: str, slow_unet: bool = False) -> subprocess.Popen:
    # A shell starts background jobs with SIGINT ignored, and Python keeps that: give the child the
    # default handler a foreground `ldmrt` gets, whatever way this test run was started.
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            + (SLOW_UNET if slow_unet else "") + "import sys; from ldmrt.cli import app; sys.argv[0] = 'ldmrt'; app()")
    return subprocess.Popen([sys.executable, "-c", code, "export", "tiny", "--out", str(out), "--no-validate",
                             "--components", "text_encoder,unet", *extra],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interrupt_mid_export(root: Path, sig: int) -> tuple[int, str]:
    """Start `ldmrt export`, send `sig` once the work folder holds a graph, return (code, stderr)."""
    process = export_process(root / "bundle", slow_unet=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if any(p.name == "text_encoder.onnx" for p in root.glob(".bundle.partial-*/*")):
            break
        time.sleep(0.02)
    assert process.poll() is None, "the export finished before it could be interrupted"
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


def test_ctrl_c_mid_export_leaves_nothing(tmp_path) -> None:
    code, stderr = interrupt_mid_export(tmp_path, signal.SIGINT)
    assert code == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_kill_mid_export_leaves_only_a_hidden_unfinished_folder(tmp_path) -> None:
    """SIGKILL cannot be handled: the hidden work folder stays, and nothing mistakes it for a bundle."""
    code, _ = interrupt_mid_export(tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL
    (partial,) = tmp_path.iterdir()
    assert partial.name.startswith(".bundle.partial-") and not (partial / MANIFEST_NAME).exists()
    assert not (tmp_path / "bundle").exists()
    with pytest.raises(BundleError, match="expected manifest.json, found no such file; the export did not finish"):
        load_manifest(partial)


def test_sigterm_mid_export_leaves_nothing(tmp_path) -> None:
    code, _ = interrupt_mid_export(tmp_path, signal.SIGTERM)
    assert list(tmp_path.iterdir()) == [], code


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_next_export_removes_folders_left_by_a_killed_export(tmp_path) -> None:
    from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source

    stale = tmp_path / f".bundle.partial-{dead_pid()}"
    (stale / TOKENIZER_DIR).mkdir(parents=True)
    (stale / "unet.onnx").write_bytes(b"half a graph")
    export_bundle(preset_source("tiny"), tmp_path / "bundle",
                  ExportOptions(components=("text_encoder",), validate=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_cli_unwritable_out_is_a_user_error(tmp_path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    error = one_error(invoke("export", "tiny", "--out", tmp_path / "a-file" / "bundle",
                             "--components", "text_encoder", "--no-validate"))
    assert_names(error, "ExportError", "--out", "a-file")


# --- checkpoints: dtypes ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_state():
    import torch  # noqa: F401 - the checkpoint side needs torch
    from ldmrt.models import build_model

    return {k: v.contiguous() for k, v in build_model(preset("tiny"), seed=0).state_dict().items()}


WEIGHT = "first_stage_model.decoder.conv_out.weight"


def save_checkpoint(state, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(state, str(path))
    return path


@pytest.mark.parametrize("dtype", ["int8", "bool"])
def test_integer_weights_for_a_float_parameter_are_refused(tiny_state, tmp_path, dtype) -> None:
    import torch

    from ldmrt.checkpoints import load_checkpoint

    state = {**tiny_state, WEIGHT: (tiny_state[WEIGHT] * 100).to(getattr(torch, dtype))}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(save_checkpoint(state, tmp_path / "quantized.safetensors"), preset="tiny")
    assert_names(str(info.value), "quantized.safetensors", WEIGHT, "float", dtype)


def test_float_weights_of_other_widths_are_cast_and_non_finite_ones_named(tiny_state, tmp_path) -> None:
    import torch

    from ldmrt.checkpoints import load_checkpoint

    wide = {**tiny_state, WEIGHT: tiny_state[WEIGHT].double()}
    loaded = load_checkpoint(save_checkpoint(wide, tmp_path / "f64.safetensors"), preset="tiny")
    assert any("1 float64 tensors to float32" in note for note in loaded.notes), loaded.notes
    assert torch.equal(loaded.model.state_dict()[WEIGHT], tiny_state[WEIGHT])
    broken = dict(tiny_state)
    broken[WEIGHT] = tiny_state[WEIGHT].clone()
    broken[WEIGHT][0, 0, 0, 0] = float("nan")
    loaded = load_checkpoint(save_checkpoint(broken, tmp_path / "nan.safetensors"), preset="tiny")
    assert any("non-finite" in w and WEIGHT in w for w in loaded.warnings), loaded.warnings


# --- concurrency ------------------------------------------------------------------------------

def load_soak():
    return load_file(REPO / "benchmarks" / "soak.py", "ldmrt_soak")


def test_one_pipeline_serves_many_threads_correctly_in_flat_memory(bundle, pipeline) -> None:
    """The short soak: 40 calls on 4 threads equal their sequential references bit for bit."""
    result = load_soak().run_soak(bundle, calls=40, threads=4, warmup=12, steps=2, distinct=8,
                                  period=0.1, pipeline=pipeline)
    assert result["error_count"] == 0, result["errors"]
    assert result["mismatch_count"] == 0, result["mismatches"]
    assert result["sequential_repeatable"]
    assert result["truncation_warnings"]["seen"] == result["truncation_warnings"]["expected"] > 0
    # A per-call leak of a session or an arena (MiBs each) shows; allocator noise (~1 MiB) does not.
    assert result["growth_after_warmup_mib"] < 24, result["rss_mib"]
    assert len(result["curve"]) >= 3


def test_backend_names_are_taken_in_any_case_and_unknown_ones_named(bundle) -> None:
    """`ONNXRUNTIME` is onnxruntime (as `ldmrt build` takes it); an unknown name is a ConfigError
    naming the field and every backend, before the bundle is read."""
    request = GenerationRequest(prompt="a red fox", steps=2, seed=3)
    reference = Pipeline.load(bundle).generate(request).images
    loaded = Pipeline.load(bundle, " ONNXRuntime ")
    assert loaded.backend == "onnxruntime"
    np.testing.assert_array_equal(loaded.generate(request).images, reference)
    with pytest.raises(ConfigError) as info:
        Pipeline.load(bundle / "missing", "cuda")
    assert info.value.field == "backend"
    assert_names(str(info.value), "backend 'cuda'", "onnxruntime, tensorrt, tensorrt-rtx, torch")



def test_a_request_over_max_cost_is_refused_before_any_work(bundle) -> None:
    """Pipeline.load(max_cost=…) bounds steps x images x megapixels per request (what `ldmrt triton
    --max-cost` sets), checked with the other fields, before any model runs."""
    pipeline = Pipeline.load(bundle, max_cost=0.01)
    with pytest.raises(GenerationError) as info:
        pipeline.generate(GenerationRequest(prompt="a cat", steps=20, height=32, width=32))   # 0.0205
    assert info.value.field == "request"
    assert_names(str(info.value), "costs 0.02048", "20 x 1 images", "max_cost 0.01")
    assert pipeline.generate(GenerationRequest(prompt="a cat", steps=9, height=32, width=32)).images.shape \
        == (1, 32, 32, 3)                                                                       # 0.0092
    with pytest.raises(ConfigError) as info:
        Pipeline.load(bundle, max_cost=float("inf"))
    assert info.value.field == "max_cost"
