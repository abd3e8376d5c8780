"""Issue 14 rows 2, 3, 7, 11: folders ldmrt replaces, racing writers, the ONNX Runtime cache.

Nothing ldmrt did not write is deleted or overwritten (export --force, the ORT cache); two exports
to one folder never silently replace each other; a cache entry runs only when its files match its
record; threads and processes loading a cold cache all succeed and leave one sound entry.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import ldmrt.atomic as atomic
import ldmrt.export.bundle as bundle_module
from ldmrt.cli import app
from ldmrt.engines import ort_cache
from ldmrt.engines.onnxruntime import open_onnxruntime, prepare_cache
from ldmrt.errors import ExportError
from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
from ldmrt.iospec import ShapeRanges, example_inputs
from ldmrt.manifest import MANIFEST_NAME, load_manifest, sha256_file, verify_bundle
from ldmrt.runtime.pipeline import Pipeline

pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]
RANGES = ShapeRanges(min_size=32, opt_size=32, max_size=64, max_batch=2)


def export(out: Path, components: tuple[str, ...] = ("text_encoder",), force: bool = False):
    return export_bundle(preset_source("tiny"), out, ExportOptions(
        components=components, validate=False, force=force, shape_ranges=RANGES))


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory) -> Path:
    return export(tmp_path_factory.mktemp("text") / "bundle").path


@pytest.fixture(scope="module")
def full_bundle(tmp_path_factory) -> Path:
    """tiny text_encoder + unet + vae_decoder, never loaded (no ort_cache/)."""
    return export(tmp_path_factory.mktemp("full") / "bundle", ("text_encoder", "unet", "vae_decoder")).path


@pytest.fixture(params=["renameat2", "rename fallback"])
def renames(request, monkeypatch, tmp_path) -> str:
    """Every folder rename through Linux renameat2 (where this file system has it), or through
    the portable fallback."""
    if request.param == "renameat2":
        probe, probed = tmp_path / ".probe", tmp_path / ".probed"
        probe.mkdir()
        works = not hasattr(atomic, "_renameat2") or atomic._renameat2(probe, probed, atomic._RENAME_NOREPLACE)
        (probed if probed.exists() else probe).rmdir()
        if not works:
            pytest.skip("no renameat2 on this file system")
    else:
        monkeypatch.setattr(atomic, "_RENAMEAT2", None, raising=False)
    return request.param


def no_export_work(monkeypatch) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("the export started before the destination was checked")
    monkeypatch.setattr(bundle_module, "_export_component", must_not_run)


# --- row 2: --force replaces only what ldmrt wrote --------------------------------------------------

USER_FILES = {
    "samples": {f"samples/{i:02d}.png": b"\x89PNG user image" for i in range(7)},
    "triton repository": {"triton/pipeline/config.pbtxt": b'name: "pipeline"',
                          "triton/pipeline/1/model.py": b"# user's"},
    "file at the top": {"notes.txt": b"keep me"},
    "file in tokenizer/": {"tokenizer/my_vocab_notes.txt": b"keep me"},
    "file in engines/": {"engines/README": b"keep me"},
    "file in ort_cache/": {"ort_cache/mine.bin": b"keep me"},
    "file in a cache entry": {"ort_cache/text_encoder-0123456789abcdef/mine.bin": b"keep me"},
    "hidden file": {".DS_Store": b"keep me"},
    "many files": {f"img{i:03d}.png": b"x" for i in range(12)},
}
NAMED = {"samples": ["samples/"], "triton repository": ["triton/"], "file at the top": ["notes.txt"],
         "file in tokenizer/": ["tokenizer/my_vocab_notes.txt"], "file in engines/": ["engines/README"],
         "file in ort_cache/": ["ort_cache/mine.bin"],
         "file in a cache entry": ["ort_cache/text_encoder-0123456789abcdef/mine.bin"],
         "hidden file": [".DS_Store"], "many files": ["img000.png", "and 7 more (12 in all)"]}


@pytest.mark.parametrize("where", list(USER_FILES))
def test_force_refuses_a_bundle_holding_user_files_before_any_work(text_bundle, tmp_path, monkeypatch, where):
    out = Path(shutil.copytree(text_bundle, tmp_path / "bundle"))
    for name, data in USER_FILES[where].items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = tree(out)
    no_export_work(monkeypatch)
    with pytest.raises(ExportError, match="files ldmrt did not write") as caught:
        export(out, ("vae_decoder",), force=True)
    for fragment in NAMED[where] + [str(out), "even with --force"]:
        assert fragment in str(caught.value), str(caught.value)
    assert caught.value.field == "out"
    assert tree(out) == before and hidden(tmp_path) == []


def fake_ldmrt_leftovers(out: Path) -> None:
    """What ldmrt itself writes inside a bundle besides the export: a TensorRT engine folder and
    timing cache, ORT cache entries, a killed writer's temporaries and staging folder."""
    key = "text_encoder-trtrtx1.0.0-default-fp32-0123456789ab"
    (out / "engines" / key).mkdir(parents=True)
    (out / "engines" / key / "text_encoder.plan").write_bytes(b"plan")
    (out / "engines" / key / "text_encoder.engine.json").write_text(json.dumps({"key": key}))
    (out / "engines" / key / ".text_encoder.plan.a1b2c3d4.tmp").write_bytes(b"half a plan")
    (out / "engines" / "timing.cache").write_bytes(b"cache")
    (out / ".manifest.json.x9y8z7w6.tmp").write_bytes(b"{")
    Pipeline.load(out, components=("text_encoder",))          # writes ort_cache/text_encoder-<key>/
    (entry,) = (out / ort_cache.BUNDLE_CACHE_DIR).iterdir()
    stale = out / ort_cache.BUNDLE_CACHE_DIR / f".{entry.name}.partial-{dead_pid()}-{atomic._HOST}-0badf00d"
    stale.mkdir()
    (stale / ort_cache.GRAPH).write_bytes(b"half")


def test_force_replaces_a_bundle_holding_only_what_ldmrt_wrote(text_bundle, tmp_path):
    out = Path(shutil.copytree(text_bundle, tmp_path / "bundle"))
    fake_ldmrt_leftovers(out)
    export(out, ("vae_decoder",), force=True)
    assert set(tree(out)) == {MANIFEST_NAME, "vae_decoder.onnx"}          # replaced, not merged
    verify_bundle(out, load_manifest(out))
    assert hidden(tmp_path) == []


def test_force_refuses_a_bundle_whose_manifest_is_unreadable(text_bundle, tmp_path, monkeypatch):
    out = Path(shutil.copytree(text_bundle, tmp_path / "bundle"))
    (out / MANIFEST_NAME).write_text('{"schema_version": 1, "name": ')
    before = tree(out)
    no_export_work(monkeypatch)
    with pytest.raises(ExportError, match="manifest.json is unreadable, so ldmrt cannot tell its files"):
        export(out, force=True)
    assert tree(out) == before


def test_cli_force_names_the_users_files_in_one_line(text_bundle, tmp_path):
    out = Path(shutil.copytree(text_bundle, tmp_path / "bundle"))
    (out / "samples").mkdir()
    (out / "samples" / "fox.png").write_bytes(b"png")
    result = CliRunner().invoke(app, ["export", "tiny", "--out", str(out), "--force", "--no-validate",
                                      "--components", "text_encoder"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: ExportError: --out {out}: the bundle folder holds files ldmrt "
                                f"did not write: samples/"), result.stderr
    assert (out / "samples" / "fox.png").read_bytes() == b"png"


# --- row 3: racing exports ----------------------------------------------------------------------------

def race(monkeypatch, jobs: list[tuple[Path, tuple[str, ...], bool]], during=None) -> list[object]:
    """Run the exports in threads; each waits at the last step (after its manifest is written)
    until all are there, then `during()` runs once and they all move into place at once.
    Returns each job's result or exception. Tracing runs one at a time (torch's exporter keeps
    global state); only the final steps race."""
    barrier = threading.Barrier(len(jobs), action=during)
    trace_lock = threading.Lock()
    real_component, real_manifest = bundle_module._export_component, bundle_module.write_manifest

    def one_at_a_time(*args, **kwargs):
        with trace_lock:
            return real_component(*args, **kwargs)

    def then_wait(*args, **kwargs):
        written = real_manifest(*args, **kwargs)
        barrier.wait(timeout=120)
        return written

    monkeypatch.setattr(bundle_module, "_export_component", one_at_a_time)
    monkeypatch.setattr(bundle_module, "write_manifest", then_wait)
    results: list[object] = [None] * len(jobs)

    def run(i: int, out: Path, components: tuple[str, ...], force: bool) -> None:
        try:
            results[i] = export(out, components, force)
        except BaseException as exc:        # noqa: BLE001 - the test looks at it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results


def one_of_the_racers(out: Path, text_bundle: Path) -> None:
    """`out` holds exactly the files of one racing export (text_encoder or vae_decoder), not a mix."""
    manifest = load_manifest(out)
    expected = set(tree(text_bundle)) if "text_encoder" in manifest.components else {MANIFEST_NAME, "vae_decoder.onnx"}
    assert set(tree(out)) == expected
    verify_bundle(out, manifest)


def test_two_exports_to_one_new_folder_one_wins_one_fails(text_bundle, tmp_path, monkeypatch, renames):
    out = tmp_path / "bundle"
    results = race(monkeypatch, [(out, ("text_encoder",), False), (out, ("vae_decoder",), False)])
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], ExportError), results
    assert "another export finished there while this one ran" in str(errors[0])
    (winner,) = [r for r in results if not isinstance(r, BaseException)]
    manifest = load_manifest(out)
    assert list(manifest.components) == list(winner.manifest.components)
    one_of_the_racers(out, text_bundle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]         # the loser's work removed


def test_two_forced_exports_leave_one_whole_bundle(text_bundle, tmp_path, monkeypatch, renames):
    out = Path(shutil.copytree(text_bundle, tmp_path / "bundle"))
    (out / "engines").mkdir()                             # ldmrt's, in the old bundle only: gone unless merged
    (out / "engines" / "timing.cache").write_bytes(b"old")
    results = race(monkeypatch, [(out, ("text_encoder",), True), (out, ("vae_decoder",), True)])
    assert not [r for r in results if isinstance(r, BaseException)], results
    one_of_the_racers(out, text_bundle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_files_added_during_a_forced_export_stop_the_swap(text_bundle, tmp_path, monkeypatch, renames):
    out = Path(shutil.copytree(text_bundle, tmp_path / "bundle"))
    before = tree(out)

    def user_saves_an_image() -> None:
        (out / "samples").mkdir()
        (out / "samples" / "new.png").write_bytes(b"png")

    (result,) = race(monkeypatch, [(out, ("vae_decoder",), True)], during=user_saves_an_image)
    assert isinstance(result, ExportError) and "samples/" in str(result), result
    assert tree(out) == {**before, "samples/new.png": b"png"}               # old bundle and the image
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_folder_changed_between_check_and_swap_is_swapped_back(tmp_path, renames):
    """The second look happens after the swap: what changed in between is put back, not removed."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "new.txt").write_text("new")
    out.mkdir()
    (out / "old.txt").write_text("old")
    looks = []

    def replaceable(folder: Path) -> None:
        looks.append(sorted(p.name for p in folder.iterdir()))
        if len(looks) == 2:
            raise ExportError("changed meanwhile")

    with pytest.raises(ExportError, match="changed meanwhile"):
        atomic.move_into_place(work, out, replaceable=replaceable)
    assert looks == [["old.txt"], ["old.txt"]]
    assert tree(out) == {"old.txt": b"old"} and tree(work) == {"new.txt": b"new"}


EXPORT_IN_STEP = """
import os, sys, time
from pathlib import Path
import ldmrt.export.bundle as bundle
real, gate = bundle.write_manifest, Path(sys.argv[1])
def wait_for_the_other(*args, **kwargs):
    written = real(*args, **kwargs)
    (gate / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while len(list(gate.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    return written
bundle.write_manifest = wait_for_the_other
from ldmrt.cli import app
sys.argv = ["ldmrt"] + sys.argv[2:]
app()
"""


def test_two_export_processes_to_one_folder(tmp_path):
    gate, out = tmp_path / "gate", tmp_path / "work" / "bundle"
    gate.mkdir()
    processes = [subprocess.Popen([sys.executable, "-c", EXPORT_IN_STEP, str(gate), "export", "tiny",
                                   "--out", str(out), "--no-validate", "--components", component],
                                  cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for component in ("text_encoder", "vae_decoder")]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    assert sorted(code for code, _ in outcomes) == [0, 2], outcomes
    (loser,) = [err for code, err in outcomes if code == 2]
    assert "another export finished there while this one ran" in loser, loser
    verify_bundle(out, load_manifest(out))
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle"]


# --- row 7: a cache entry runs only when its files match its record ----------------------------------

@pytest.fixture(scope="module")
def unet_bundle(tmp_path_factory) -> Path:
    return export(tmp_path_factory.mktemp("unet") / "bundle", ("unet",)).path


def run_unet(bundle: Path, cache_dir) -> np.ndarray:
    manifest = load_manifest(bundle)
    runner = open_onnxruntime(bundle, manifest, ("unet",), cache_dir=cache_dir)["unet"]
    feeds = example_inputs(manifest.config, runner.spec, {"batch": 2, "latent_height": 8, "latent_width": 8}, 3)
    return runner(feeds)


def unet_cache(bundle: Path, cache: Path) -> ort_cache.GraphCache:
    return ort_cache.GraphCache.for_graph(cache, "unet", load_manifest(bundle).component("unet").digest)


def entry_of(bundle: Path, cache: Path) -> Path:
    key = unet_cache(bundle, cache).key
    return ort_cache.entry_folder(cache, "unet", key)


def assert_sound(bundle: Path, cache: Path) -> None:
    """The entry exists and each file's sha256 is its record's."""
    folder = entry_of(bundle, cache)
    record = json.loads((folder / ort_cache.RECORD).read_text())
    assert record["key"]["graph_sha256"] == load_manifest(bundle).component("unet").digest
    assert {name: facts["sha256"] for name, facts in record["files"].items()} == \
        {name: sha256_file(folder / name) for name in record["files"]}
    assert ort_cache.lookup(cache, "unet", unet_cache(bundle, cache).key) == folder / ort_cache.GRAPH


def other_weights(path: Path) -> None:
    """Another graph of the same size: the same bytes with every weight scaled (a valid graph)."""
    data = np.fromfile(path, dtype=np.float32)
    (data * 0.5).tofile(path)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["other weights, same size", "one bit flipped on disk"])
def test_a_same_size_cached_graph_that_differs_is_rebuilt_not_run(unet_bundle, tmp_path, caplog, damage):
    cache = tmp_path / "c"
    expected = run_unet(unet_bundle, "off")
    run_unet(unet_bundle, cache)
    weights = entry_of(unet_bundle, cache) / f"{ort_cache.GRAPH}.data"
    assert weights.stat().st_size > 10_000                       # the tiny UNet's weights live there
    size = weights.stat().st_size
    (other_weights if damage.startswith("other") else flip_a_byte)(weights)
    assert weights.stat().st_size == size
    with caplog.at_level(logging.WARNING, logger="ldmrt.engines.ort_cache"):
        found = run_unet(unet_bundle, cache)
    np.testing.assert_array_equal(found, expected)
    assert any("sha256" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records), caplog.text
    assert_sound(unet_bundle, cache)


def test_a_damaged_entry_is_never_parsed(unet_bundle, tmp_path, monkeypatch):
    """The entry's sha256 is checked before ONNX Runtime reads it: a damaged graph is never opened."""
    import onnxruntime

    cache = tmp_path / "c"
    run_unet(unet_bundle, cache)
    entry = entry_of(unet_bundle, cache)
    flip_a_byte(entry / ort_cache.GRAPH)
    opened = []
    real = onnxruntime.InferenceSession

    def recording(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    run_unet(unet_bundle, cache)
    assert str(entry / ort_cache.GRAPH) not in opened, opened
    assert opened                                              # the source was read instead


def test_an_entry_recorded_for_another_graph_is_not_used(unet_bundle, tmp_path, caplog):
    cache = tmp_path / "c"
    expected = run_unet(unet_bundle, "off")
    run_unet(unet_bundle, cache)
    folder = entry_of(unet_bundle, cache)
    record = json.loads((folder / ort_cache.RECORD).read_text())
    record["key"]["graph_sha256"] = "f" * 64
    other_weights(folder / f"{ort_cache.GRAPH}.data")              # and its files made to match
    for name in record["files"]:
        record["files"][name]["sha256"] = sha256_file(folder / name)
    (folder / ort_cache.RECORD).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="ldmrt.engines.ort_cache"):
        np.testing.assert_array_equal(run_unet(unet_bundle, cache), expected)
    assert "made for another graph" in caplog.text
    assert_sound(unet_bundle, cache)


def test_users_files_in_and_next_to_the_cache_survive(unet_bundle, tmp_path, caplog):
    cache = tmp_path / "c"
    expected = run_unet(unet_bundle, "off")
    run_unet(unet_bundle, cache)
    folder = entry_of(unet_bundle, cache)
    (cache / "notes.txt").write_text("mine")
    (tmp_path / "next-to-it.txt").write_text("mine")
    (folder / "mine.bin").write_bytes(b"mine")                     # inside an entry
    flip_a_byte(folder / f"{ort_cache.GRAPH}.data")                # damaged: would be rebuilt
    damaged = tree(folder)
    with caplog.at_level(logging.WARNING, logger="ldmrt.engines.ort_cache"):
        np.testing.assert_array_equal(run_unet(unet_bundle, cache), expected)
        ort_cache.discard(unet_cache(unet_bundle, cache))         # what `build --force` does first
    assert "holds files ldmrt did not write (mine.bin)" in caplog.text, caplog.text
    assert tree(folder) == damaged                                 # not replaced, not removed
    assert (cache / "notes.txt").read_text() == "mine" and (tmp_path / "next-to-it.txt").read_text() == "mine"
    assert hidden(cache) == []


@pytest.mark.parametrize("what", ["a file at the entry's path", "a file at the cache's path"])
def test_a_foreign_file_where_the_cache_goes_is_not_deleted(unet_bundle, tmp_path, what):
    cache = tmp_path / "c"
    target = entry_of(unet_bundle, cache) if what.startswith("a file at the entry") else cache
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"a user's file")
    expected = run_unet(unet_bundle, "off")
    np.testing.assert_array_equal(run_unet(unet_bundle, cache), expected)
    ort_cache.discard(unet_cache(unet_bundle, cache))
    assert target.read_bytes() == b"a user's file"
    assert hidden(target.parent) == []


def test_build_force_rebuilds_a_sound_entry_and_keeps_users_files(unet_bundle, tmp_path):
    cache = tmp_path / "c"
    prepare_cache(unet_bundle, load_manifest(unet_bundle), ("unet",), cache_dir=cache)
    (cache / "notes.txt").write_text("mine")
    (forced,) = prepare_cache(unet_bundle, load_manifest(unet_bundle), ("unet",), cache_dir=cache, force=True)
    assert not forced.reused
    assert_sound(unet_bundle, cache)
    assert (cache / "notes.txt").read_text() == "mine"


# --- row 11: threads and processes loading a cold cache --------------------------------------------

def assert_cache_complete(bundle: Path) -> None:
    manifest = load_manifest(bundle)
    cache = bundle / ort_cache.BUNDLE_CACHE_DIR
    for name, entry in manifest.components.items():
        key = ort_cache.GraphCache.for_graph(cache, name, entry.digest).key
        assert ort_cache.lookup(cache, name, key) is not None, name
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        ort_cache.entry_folder(cache, name, ort_cache.cache_key(entry.digest)).name
        for name, entry in manifest.components.items())                  # no staging left


def test_four_threads_loading_a_cold_cache_all_succeed(full_bundle, tmp_path, caplog):
    out = Path(shutil.copytree(full_bundle, tmp_path / "bundle"))
    barrier = threading.Barrier(4)
    results: list[object] = [None] * 4

    def load(i: int) -> None:
        barrier.wait(timeout=60)
        try:
            results[i] = Pipeline.load(out)
        except BaseException as exc:        # noqa: BLE001
            results[i] = exc

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    with caplog.at_level(logging.WARNING):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    assert not [r for r in results if not isinstance(r, Pipeline)], results
    assert_cache_complete(out)
    assert "ignoring ORT cache entry" not in caplog.text
    reference = Pipeline.load(full_bundle, cache_dir="off")
    feeds = example_inputs(reference.manifest.config, reference.runners["unet"].spec,
                           {"batch": 2, "latent_height": 8, "latent_width": 8}, 5)
    expected = reference.runners["unet"](feeds)
    for pipeline in results:
        np.testing.assert_array_equal(pipeline.runners["unet"](feeds), expected)
    assert all(Pipeline.load(out).runners[name].cache_hit for name in load_manifest(out).components)


LOAD_IN_STEP = """
import os, sys, time
from pathlib import Path
gate = Path(sys.argv[1])
(gate / f"ready-{os.getpid()}").touch()
deadline = time.monotonic() + 120
while len(list(gate.glob("ready-*"))) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
from ldmrt.runtime.pipeline import Pipeline
Pipeline.load(sys.argv[2])
"""


def test_two_processes_loading_a_cold_cache_both_succeed(full_bundle, tmp_path):
    out = Path(shutil.copytree(full_bundle, tmp_path / "bundle"))
    gate = tmp_path / "gate"
    gate.mkdir()
    processes = [subprocess.Popen([sys.executable, "-c", LOAD_IN_STEP, str(gate), str(out)], cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    assert [code for code, _ in outcomes] == [0, 0], outcomes
    assert_cache_complete(out)


# --- leftovers: removed only when their process is gone ------------------------------------------

def test_leftovers_are_removed_only_when_their_process_is_gone(tmp_path):
    out = tmp_path / "bundle"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone, host = dead_pid(), atomic._HOST
        folders = {
            "live process": f".bundle.partial-{sleeper.pid}-{host}-00000001",
            "this process": f".bundle.partial-{os.getpid()}-{host}-00000002",
            "another machine": f".bundle.partial-{gone}-{'0' * 8 if host != '0' * 8 else '1' * 8}-00000003",
            "not ldmrt's name": f".bundle.partial-{gone}-mine",
            "a user's file": f".bundle.partial-{gone}-{host}-00000004",
            "dead process": f".bundle.partial-{gone}-{host}-00000005",
            "dead process, old form": f".bundle.partial-{gone}",
            "moved aside, then killed": f".bundle.old-{gone}-{host}-00000006",
        }
        for what, name in folders.items():
            if what == "a user's file":
                (tmp_path / name).write_text("a file, not a folder")
            else:
                (tmp_path / name).mkdir()
                (tmp_path / name / "x").write_text(what)
        atomic.remove_dead_leftovers(out)
        left = set(hidden(tmp_path))
    finally:
        sleeper.kill()
        sleeper.wait()
    kept = {"live process", "this process", "another machine", "not ldmrt's name", "a user's file"}
    assert left == {folders[what] for what in kept}
    assert (out / "x").read_text() == "moved aside, then killed"           # put back, not removed


def test_a_moved_aside_folder_is_removed_only_when_its_check_approves(tmp_path):
    """A killed run's `.NAME.old-…` (the folder it replaced; a user may have added files before the
    kill) goes only when the replace's own check approves it; without a check, or refused, it stays."""
    out = tmp_path / "bundle"
    out.mkdir()
    old = tmp_path / f".bundle.old-{dead_pid()}-{atomic._HOST}-00000007"

    def make():
        old.mkdir(exist_ok=True)
        (old / "mine.txt").write_text("added while the swap ran")

    def refuse(folder):
        raise ExportError(f"{folder} holds mine.txt")

    make()
    atomic.remove_dead_leftovers(out)                                    # no check: kept
    assert (old / "mine.txt").is_file()
    atomic.remove_dead_leftovers(out, refuse)                            # refused: kept
    assert (old / "mine.txt").is_file()
    atomic.remove_dead_leftovers(out, lambda folder: None)               # approved: removed
    assert not old.exists()


def test_work_folders_are_unique_per_call(tmp_path):
    out = tmp_path / "bundle"
    made: list[Path] = []

    def make() -> None:
        for _ in range(20):
            made.append(atomic.work_folder(out))

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 80 and all(p.is_dir() for p in made)


def test_looking_for_users_files_stops_at_a_bound(tmp_path):
    for i in range(30):
        (tmp_path / f"f{i:02d}").write_bytes(b"")
    found, complete = atomic.foreign_entries(tmp_path, lambda parts, is_dir: atomic.Ownership.FOREIGN, limit=10)
    assert len(found) == 10 and not complete
    assert atomic.describe(found, complete).endswith(f"and 5 more (more than {atomic.SCAN_LIMIT} entries looked at)")


def test_an_engine_shaped_folder_without_a_record_is_the_users(text_bundle, tmp_path):
    """engines/<component>-<anything>/ is ldmrt's only when the manifest or its own record names
    that key: a user's saved engine under such a name survives --force (the export is refused)."""
    out = Path(shutil.copytree(text_bundle, tmp_path / "bundle"))
    saved = out / "engines" / "text_encoder-my-backup"
    saved.mkdir(parents=True)
    (saved / "text_encoder.plan").write_bytes(b"my engine")
    (saved / "text_encoder.engine.json").write_text(json.dumps({"key": "text_encoder-other"}))
    before = tree(out)
    with pytest.raises(ExportError) as caught:
        export(out, ("vae_decoder",), force=True)
    assert "engines/text_encoder-my-backup" in str(caught.value), str(caught.value)
    assert tree(out) == before


def test_a_search_stopped_at_its_bound_refuses_force(text_bundle, tmp_path, monkeypatch):
    """Past the bound nothing is known about the rest: --force is refused, not taken as 'all ldmrt's'."""
    import functools

    from ldmrt.export import bundle as bundle_module

    out = Path(shutil.copytree(text_bundle, tmp_path / "bundle"))
    for i in range(30):                                    # ldmrt's own engine folders, each with its record
        key = f"text_encoder-k{i:02d}"
        (out / "engines" / key).mkdir(parents=True)
        (out / "engines" / key / "text_encoder.engine.json").write_text(json.dumps({"key": key}))
    (out / "engines" / "text_encoder-k29" / "mine.txt").write_bytes(b"keep me")   # found only past the bound
    monkeypatch.setattr(bundle_module, "foreign_entries", functools.partial(atomic.foreign_entries, limit=20))
    before = tree(out)
    with pytest.raises(ExportError) as caught:
        export(out, ("vae_decoder",), force=True)
    assert "too many entries" in str(caught.value), str(caught.value)
    assert tree(out) == before



def test_nothing_is_replaced_without_the_callers_check(tmp_path):
    """move_into_place has no unchecked replace: without a `replaceable` check an existing folder stays."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "new.txt").write_text("new")
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        atomic.move_into_place(work, out, None)
    assert tree(out) == {"mine.txt": b"mine"} and tree(work) == {"new.txt": b"new"}
