"""The model source a bundle records: the torch backend runs the very weights of the ONNX graphs
(a seeded preset; a checkpoint exported with options from another working directory), refuses
weights whose digest differs and bundles without a record, and the parser checks the record."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ldmrt.errors import BackendUnavailableError, BundleError
from ldmrt.manifest import MANIFEST_NAME, Manifest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
safetensors_torch = pytest.importorskip("safetensors.torch")

from typer.testing import CliRunner  # noqa: E402

from ldmrt.cli import app  # noqa: E402
from ldmrt.presets import preset  # noqa: E402
from ldmrt.models import build_model  # noqa: E402
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline  # noqa: E402
from ldmrt.synthetic_tokenizer import write_synthetic_clip_assets  # noqa: E402
from tests.test_manifest import make_manifest  # noqa: E402

# design.md ladder 5. Measured: the seed-0 weights put the seed-5 images 0.19 mean abs away (47/255).
IMAGE_TOL = 1 / 255
LATENT_RTOL = 1e-4
REQUEST = GenerationRequest(prompt=["a red square"], negative_prompt=[""], steps=2, guidance=5.0, seed=11,
                            height=32, width=32)
SIZES = ["--min-size", "32", "--opt-size", "32", "--max-size", "32", "--max-batch", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def export(args: list[str], cwd: Path, monkeypatch) -> None:
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, ["export", *args, *SIZES])
    assert result.exit_code == 0, result.output
    monkeypatch.chdir("/")


def assert_backends_agree(bundle: Path) -> None:
    found = Pipeline.load(bundle, "torch", device="cpu").generate(REQUEST)
    expected = Pipeline.load(bundle, "onnxruntime", threads=1).generate(REQUEST)
    mean_abs = float(np.abs(found.images - expected.images).mean())
    assert mean_abs <= IMAGE_TOL, f"images: mean abs {mean_abs:.3g} (torch vs ONNX Runtime)"
    rel_l2 = float(np.linalg.norm(found.latents - expected.latents) / np.linalg.norm(expected.latents))
    assert rel_l2 <= LATENT_RTOL, f"latents: relative L2 {rel_l2:.3g} (torch vs ONNX Runtime)"


def edit_manifest(bundle: Path, edit) -> None:
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    edit(data)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    """`ldmrt export tiny --seed 5` (from its own working directory)."""
    folder = tmp_path_factory.mktemp("seeded")
    with pytest.MonkeyPatch.context() as monkeypatch:
        export(["tiny", "--seed", "5", "--out", "bundle"], folder, monkeypatch)
    return folder / "bundle"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A single-file checkpoint that needs --preset and --tokenizer, exported by a relative path:
    (the working directory of the export, the bundle)."""
    work = tmp_path_factory.mktemp("checkpoint")
    (work / "weights").mkdir()
    weights = build_model(preset("tiny"), seed=7).state_dict()
    safetensors_torch.save_file(weights, work / "weights" / "model.safetensors")
    write_synthetic_clip_assets(work / "assets" / "clip", preset("tiny").conditioner.vocab_size)
    with pytest.MonkeyPatch.context() as monkeypatch:
        export(["weights/model.safetensors", "--preset", "tiny", "--tokenizer", "assets/clip", "--out", "bundle"],
               work, monkeypatch)
    return work, work / "bundle"


def test_a_seeded_preset_runs_its_own_weights_on_the_torch_backend(seeded) -> None:
    assert_backends_agree(seeded)
    record = Manifest.from_dict(json.loads((seeded / MANIFEST_NAME).read_text())).model_source
    assert (record.kind, record.location, record.seed) == ("preset", "tiny", 5)


def test_a_checkpoint_exported_with_options_elsewhere_runs_its_own_weights(checkpoint) -> None:
    work, bundle = checkpoint
    assert_backends_agree(bundle)        # the working directory is "/" here
    record = Manifest.from_dict(json.loads((bundle / MANIFEST_NAME).read_text())).model_source
    assert record.kind == "checkpoint" and record.preset == "tiny" and record.strict
    assert record.location == str(work / "weights" / "model.safetensors")
    assert record.tokenizer == str(work / "assets" / "clip")


def test_weights_that_differ_from_the_recorded_digest_are_refused_by_name(checkpoint, seeded, tmp_path) -> None:
    work, bundle = checkpoint
    weights = work / "weights" / "model.safetensors"
    original = weights.read_bytes()
    try:
        safetensors_torch.save_file(build_model(preset("tiny"), seed=8).state_dict(), weights)
        with pytest.raises(BundleError, match=r"weights_sha256.*checkpoint .*model\.safetensors.*"
                                              r"changed since export.*re-export"):
            Pipeline.load(bundle, "torch", device="cpu")
        weights.unlink()
        with pytest.raises(BackendUnavailableError, match=r"model\.safetensors.*not found.*put the checkpoint back"):
            Pipeline.load(bundle, "torch", device="cpu")
    finally:
        weights.write_bytes(original)
    # A preset bundle whose record says another seed than its graphs were made with.
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in seeded.iterdir():
        if file.is_file():
            (copy / file.name).write_bytes(file.read_bytes())
    (copy / "tokenizer").mkdir()
    for file in (seeded / "tokenizer").iterdir():
        (copy / "tokenizer" / file.name).write_bytes(file.read_bytes())
    edit_manifest(copy, lambda data: data["model_source"].update(seed=0))
    with pytest.raises(BundleError, match=r"preset 'tiny' \(seed 0\).*expected sha256"):
        Pipeline.load(copy, "torch", device="cpu")
    # Written before the record: still a bundle (ONNX Runtime runs it); the torch backend refuses.
    edit_manifest(copy, lambda data: data.pop("model_source"))
    assert Pipeline.load(copy, "onnxruntime", threads=1).manifest.model_source is None
    with pytest.raises(BundleError, match=r"cannot prove which weights.*'preset:tiny'.*re-export"):
        Pipeline.load(copy, "torch", device="cpu")


DIGEST = "ab" * 32
PRESET = {"kind": "preset", "location": "tiny", "seed": 5, "preset": None, "yaml": None, "tokenizer": None,
          "strict": True, "weights_sha256": DIGEST}
CHECKPOINT = {**PRESET, "kind": "checkpoint", "location": "/models/x.safetensors", "seed": None,
              "preset": "tiny", "tokenizer": "/models/tokenizer", "strict": False}
MALFORMED = [
    ("kind", PRESET, {"kind": "url"}, r"model_source\.kind: expected one of \['preset', 'checkpoint'\]"),
    ("digest", PRESET, {"weights_sha256": "AB" * 32}, r"model_source\.weights_sha256: expected a sha256"),
    ("no-digest", PRESET, {"weights_sha256": None}, r"model_source\.weights_sha256"),
    ("seed", PRESET, {"seed": "5"}, r"model_source\.seed: expected an integer"),
    ("negative-seed", PRESET, {"seed": -1}, r"model_source\.seed: expected an integer >= 0"),
    ("preset-yaml", PRESET, {"yaml": "/a.yaml"}, r"model_source\.yaml: expected null"),
    ("preset-strict", PRESET, {"strict": False}, r"model_source\.strict: expected true"),
    ("preset-name", PRESET, {"location": "../tiny"}, r"model_source\.location: expected a preset name"),
    ("relative", CHECKPOINT, {"location": "weights/x.safetensors"}, r"model_source\.location: expected an absolute"),
    ("relative-tokenizer", CHECKPOINT, {"tokenizer": "tok"}, r"model_source\.tokenizer: expected an absolute"),
    ("checkpoint-seed", CHECKPOINT, {"seed": 0}, r"model_source\.seed: expected null"),
    ("preset-and-yaml", CHECKPOINT, {"yaml": "/m/x.yaml"}, r"model_source\.yaml: expected null when a preset"),
    ("strict", CHECKPOINT, {"strict": 1}, r"model_source\.strict: expected true or false"),
    ("ema", CHECKPOINT, {"ema": "yes"}, r"model_source\.ema: expected true or false"),
    ("preset-ema", PRESET, {"ema": False}, r"model_source\.ema: expected null"),
    ("missing", PRESET, {"seed": ...}, r"model_source\.seed: expected a value \(the key is required\)"),
    ("unknown", PRESET, {"url": "x"}, r"model_source: expected only the keys .*unknown key 'url'"),
    ("not-an-object", PRESET, None, r"model_source: expected an object"),
]


@pytest.mark.parametrize("base, change, message", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_the_parser_checks_the_record_and_reads_bundles_without_one(base, change, message) -> None:
    data = make_manifest("tiny").to_dict()
    assert Manifest.from_dict(data).model_source is None          # written before the record
    for good in (PRESET, CHECKPOINT, {**CHECKPOINT, "ema": True}):
        data["model_source"] = good
        assert Manifest.from_dict(data).model_source.to_dict() == good
        assert Manifest.from_dict(Manifest.from_dict(data).to_dict()) == Manifest.from_dict(data)
    if change is None:
        data["model_source"] = ["not", "a", "record"]
    else:
        data["model_source"] = {k: v for k, v in {**base, **change}.items() if v is not ...}
    with pytest.raises(BundleError, match=message):
        Manifest.from_dict(data, origin="b")
    from ldmrt.source_record import SourceRecord
    assert SourceRecord.from_dict(PRESET).describe() == "preset 'tiny' (seed 5)"
    assert SourceRecord.from_dict(CHECKPOINT).describe() == \
        "checkpoint /models/x.safetensors (preset 'tiny', tokenizer /models/tokenizer, no-strict)"
    assert SourceRecord.from_dict({**CHECKPOINT, "ema": False}).describe().endswith("no-strict, no-ema)")
