"""Issue 14, Triton rows: a shared model repository keeps what ldmrt did not write (1), unwritable
and unservable --out paths are refused before any work (13, 20), bad requests are 400 and server
faults 500 with failures counted (17), cancelled and over-cost requests stop (19), a dead stub is
seen by the shipped probe and cured by a reload (16), warnings reach the client, the local server
helper dies with its owner (21).

Tests that need a tritonserver use the environment of scripts/triton_env.sh and skip without it
(LDMRT_REQUIRE_TRITON=1 makes that a failure).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ldmrt.errors import ConfigError, LdmrtError
from ldmrt.triton.config import InstanceGroup, InstanceKind
from ldmrt.triton.ownership import MARKER
from ldmrt.triton.repository import PipelineModelOptions, RepositoryOptions, write_repository
from tests.test_triton import triton_env  # noqa: F401  (the one fixture: skips, or fails under LDMRT_REQUIRE_TRITON=1)

CPU = InstanceGroup(1, InstanceKind.CPU)
CPU_OPTIONS = RepositoryOptions(instances=CPU, pipeline=PipelineModelOptions(instances=CPU, threads=1))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source

    out = tmp_path_factory.mktemp("reliability_triton") / "tiny"
    export_bundle(preset_source("tiny"), out, ExportOptions(validate=False))
    return out


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: files by sha256, links by target, folders as such."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[key] = "link:" + os.readlink(path)
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _shared_repository(bundle: Path, root: Path) -> Path:
    """A repository with a foreign model, a foreign top-level file, and ldmrt's models."""
    repo = root / "repo"
    write_repository(bundle, repo, CPU_OPTIONS)
    foreign = repo / "resnet" / "1"
    foreign.mkdir(parents=True)
    (repo / "resnet" / "config.pbtxt").write_text('name: "resnet"\nplatform: "onnxruntime_onnx"\n')
    (foreign / "model.onnx").write_bytes(b"somebody else's graph")
    (repo / "README.txt").write_text("shared by the vision team")
    return repo


# --- row 1: --force replaces only what ldmrt wrote ----------------------------------------------

def test_force_replaces_only_ldmrts_models_in_a_shared_repository(bundle, tmp_path):
    repo = _shared_repository(bundle, tmp_path)
    foreign = {k: v for k, v in _snapshot(repo).items() if k.startswith("resnet") or k == "README.txt"}
    assert len(foreign) == 5
    old_inode = (repo / "unet" / "config.pbtxt").stat().st_ino
    result = write_repository(bundle, repo, replace(CPU_OPTIONS, force=True))
    after = _snapshot(repo)
    assert {k: v for k, v in after.items() if k in foreign} == foreign      # byte-identical
    assert not [k for k in after if k.startswith("resnet") and k not in foreign]
    assert (repo / "unet" / "config.pbtxt").stat().st_ino != old_inode          # replaced
    assert sorted(result.replaced) == sorted(["pipeline", "text_encoder", "unet", "vae_decoder",
                                              "vae_encoder"])
    assert sorted(p.name for p in repo.iterdir()) == sorted(
        ["README.txt", "resnet", "pipeline", "text_encoder", "unet", "vae_decoder", "vae_encoder"])
    assert all((repo / name / MARKER).is_file() for name in result.replaced)
    with pytest.raises(ConfigError, match="already exist; pass --force"):
        write_repository(bundle, repo, CPU_OPTIONS)


def test_a_file_added_inside_an_ldmrt_model_is_named_and_kept(bundle, tmp_path):
    repo = _shared_repository(bundle, tmp_path)
    (repo / "unet" / "1" / "notes.txt").write_text("my tuning notes")
    before = _snapshot(repo)
    with pytest.raises(ConfigError, match=r"model folder unet holds what ldmrt did not write.*1/notes.txt"):
        write_repository(bundle, repo, replace(CPU_OPTIONS, force=True))
    assert _snapshot(repo) == before                                          # nothing touched


def test_an_edited_file_of_an_ldmrt_model_is_named_and_kept(bundle, tmp_path):
    repo = _shared_repository(bundle, tmp_path)
    config = repo / "pipeline" / "config.pbtxt"
    config.write_text(config.read_text().replace("count: 1", "count: 4"))       # same size, other bytes
    before = _snapshot(repo)
    with pytest.raises(ConfigError, match="model folder pipeline .*config.pbtxt"):
        write_repository(bundle, repo, replace(CPU_OPTIONS, force=True))
    assert _snapshot(repo) == before


def test_what_the_pipeline_writes_while_serving_does_not_block_force(bundle, tmp_path):
    """Serving writes ONNX Runtime's cache next to the bundle copy and Python's bytecode caches into
    the pipeline's folder: ldmrt's own runtime wrote them, so --force replaces the folder; a user's
    file in that cache is still named and kept."""
    from ldmrt.runtime.pipeline import Pipeline
    from ldmrt.triton import ownership
    from ldmrt.triton.repository import BUNDLE_DIR, VERSION

    repo = tmp_path / "repo"
    write_repository(bundle, repo, CPU_OPTIONS)
    served = repo / "pipeline" / VERSION / BUNDLE_DIR
    assert ownership._SERVING_CACHE == f"{VERSION}/{BUNDLE_DIR}/ort_cache"
    Pipeline.load(served)                                          # what a CPU stub's load writes
    assert any((served / "ort_cache").iterdir())
    pycache = repo / "pipeline" / VERSION / "ldmrt" / "__pycache__"
    pycache.mkdir()
    (pycache / "__init__.cpython-311.pyc").write_bytes(b"bytecode")
    write_repository(bundle, repo, replace(CPU_OPTIONS, force=True))          # no refusal
    assert not (repo / "pipeline" / VERSION / "ldmrt" / "__pycache__").exists()

    Pipeline.load(served)
    (served / "ort_cache" / "notes.txt").write_text("mine")
    before = _snapshot(repo)
    with pytest.raises(ConfigError, match=r"model folder pipeline holds what ldmrt did not write.*ort_cache/notes.txt"):
        write_repository(bundle, repo, replace(CPU_OPTIONS, force=True))
    assert _snapshot(repo) == before


def test_a_foreign_model_with_an_ldmrt_name_is_never_replaced(bundle, tmp_path):
    repo = tmp_path / "repo"
    (repo / "unet" / "1").mkdir(parents=True)
    (repo / "unet" / "config.pbtxt").write_text('name: "unet"\nplatform: "tensorrt_plan"\n')
    (repo / "unet" / "1" / "model.plan").write_bytes(b"their engine")
    before = _snapshot(repo)
    with pytest.raises(ConfigError, match=f"unet holds .*no {MARKER}"):
        write_repository(bundle, repo, replace(CPU_OPTIONS, force=True))
    assert _snapshot(repo) == before
    # Another prefix writes next to it, without --force: nothing of theirs is in the way.
    write_repository(bundle, repo, replace(CPU_OPTIONS, prefix="tiny_"))
    assert _snapshot(repo).items() >= before.items() and (repo / "tiny_unet" / MARKER).is_file()


def test_a_file_added_while_the_run_writes_is_kept(bundle, tmp_path, monkeypatch):
    import ldmrt.triton.repository as repository

    repo = _shared_repository(bundle, tmp_path)
    write = repository._write

    def write_then_someone_adds_a_file(*args, **kwargs):
        notes = write(*args, **kwargs)
        (repo / "unet" / "1" / "late.txt").write_text("added meanwhile")
        return notes

    monkeypatch.setattr(repository, "_write", write_then_someone_adds_a_file)
    with pytest.raises(ConfigError, match="model folder unet .*1/late.txt"):
        write_repository(bundle, repo, replace(CPU_OPTIONS, force=True))
    assert (repo / "unet" / "1" / "late.txt").read_text() == "added meanwhile"
    assert (repo / "unet" / MARKER).is_file() and (repo / "resnet" / "1" / "model.onnx").is_file()
    assert not [p.name for p in repo.iterdir() if p.name.startswith(".")]     # no work folder left


def test_models_of_the_same_group_no_longer_written_are_removed_with_force(bundle, tmp_path):
    repo = _shared_repository(bundle, tmp_path)
    smaller = tmp_path / "smaller"
    shutil.copytree(bundle, smaller)
    from ldmrt.manifest import load_manifest, write_manifest

    manifest = load_manifest(smaller)
    components = {k: v for k, v in manifest.components.items() if k != "vae_encoder"}
    write_manifest(smaller, replace(manifest, components=components))
    result = write_repository(smaller, repo, replace(CPU_OPTIONS, force=True))
    assert result.removed == ["vae_encoder"] and not (repo / "vae_encoder").exists()
    assert (repo / "resnet" / "1" / "model.onnx").read_bytes() == b"somebody else's graph"


def test_cli_force_on_a_shared_repository(bundle, tmp_path):
    from typer.testing import CliRunner

    from ldmrt.cli import app

    repo = _shared_repository(bundle, tmp_path)
    result = CliRunner().invoke(app, ["triton", str(bundle), "--out", str(repo), "--force",
                                      "--kind", "cpu", "--pipeline-kind", "cpu"])
    assert result.exit_code == 0, result.output
    assert "nothing else in the repository was touched" in result.output
    assert (repo / "README.txt").read_text() == "shared by the vision team"


# --- row 13: unwritable --out, before any work ---------------------------------------------------

@pytest.mark.parametrize("where", ["proc", "under-a-file", "read-only"])
def test_an_unwritable_out_is_one_line_exit_2_before_any_work(bundle, tmp_path, where, monkeypatch):
    from typer.testing import CliRunner

    from ldmrt.cli import app
    import ldmrt.triton.repository as repository

    if where == "proc":
        out = Path("/proc/ldmrt-triton-x")
    elif where == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "repo"
    else:
        if os.geteuid() == 0:
            # root writes through mode bits; a folder on a read-only mount is what root cannot write
            pytest.skip("root ignores mode bits; /proc covers the unwritable case")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "repo"
    calls = []
    monkeypatch.setattr(repository, "verify_bundle", lambda *a, **k: calls.append(a))
    result = CliRunner().invoke(app, ["triton", str(bundle), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "out" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert calls == []                                                        # before the sha256 check


# --- row 20: paths Triton's Python backend cannot start a model from -----------------------------

@pytest.mark.parametrize("name", ["with space", "ünïcode", "quote'd", "semi;colon"])
def test_unservable_paths_are_refused_by_name(bundle, tmp_path, name):
    out = tmp_path / name / "repo"
    with pytest.raises(LdmrtError, match="Triton's Python backend cannot start a model") as caught:
        write_repository(bundle, out, CPU_OPTIONS)
    assert caught.value.field == "out"
    assert not (tmp_path / name).exists()


def test_a_symlinked_bundle_must_be_on_a_servable_path_too(bundle, tmp_path):
    from ldmrt.triton.repository import FileMode

    spaced = tmp_path / "my bundles" / "tiny"
    shutil.copytree(bundle, spaced)
    with pytest.raises(LdmrtError, match="bundle '.*my bundles") as caught:
        write_repository(spaced, tmp_path / "repo", replace(CPU_OPTIONS, files=FileMode.SYMLINK))
    assert caught.value.field == "bundle_dir" and not (tmp_path / "repo").exists()
    write_repository(spaced, tmp_path / "repo", CPU_OPTIONS)      # hard links: the path is not used


def test_the_printed_serve_command_is_quoted(bundle, tmp_path):
    import shlex

    from typer.testing import CliRunner

    from ldmrt.cli import app

    out = tmp_path / "a=b,c" / "repo"        # servable, but shell-sensitive for some shells' words
    result = CliRunner().invoke(app, ["triton", str(bundle), "--out", str(out), "--kind", "cpu",
                                      "--pipeline-kind", "cpu"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("serve: "))
    command = line.removeprefix("serve: ").split(" (see")[0]
    assert shlex.split(command) == ["tritonserver", f"--model-repository={out.resolve()}"]


# --- row 21: options with bounds ------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--max-queue-delay-us", str(365 * 24 * 3600 * 10 ** 6)], "--max-queue-delay-us 31536000000000: "
                                                             "expected an integer in [0, 1000000] microseconds"),
    (["--max-queue-delay-us", "-1"], "expected an integer in [0, 1000000]"),
    (["--max-cost", "-1"], "--max-cost -1.0: expected a finite number >= 0"),
    (["--max-cost", "inf"], "--max-cost inf: expected a finite number >= 0"),
])
def test_bounded_options_are_usage_errors_before_any_work(bundle, tmp_path, args, message):
    from typer.testing import CliRunner

    from ldmrt.cli import app

    result = CliRunner().invoke(app, ["triton", str(bundle), "--out", str(tmp_path / "repo"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "repo").exists()


# --- the pipeline model in-process (no Triton): error codes, cost limit, cancellation ------------

def _load_model(repo: Path, monkeypatch):
    """REPO's model.py, run with the stand-in for Triton's pb_utils from test_triton.py."""
    from tests.test_triton import load_pipeline_model

    return load_pipeline_model(repo, monkeypatch, "ldmrt_reliability_model", verify="false", max_cost="2")


class _CancellableRequest(dict):
    """A request whose client goes away after `after` calls of is_cancelled."""

    def __init__(self, tensors, after: int):
        super().__init__(tensors)
        self.after, self.calls = after, 0

    def is_cancelled(self) -> bool:
        self.calls += 1
        return self.calls > self.after


@pytest.fixture(scope="module")
def served_repo(bundle, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("served") / "repo"
    write_repository(bundle, repo, replace(CPU_OPTIONS, pipeline=replace(CPU_OPTIONS.pipeline, max_cost=2.0)))
    return repo


def test_in_process_error_codes_cost_limit_and_cancellation(served_repo, monkeypatch):
    from tests.test_triton import _Error, _request, _Tensor

    model = _load_model(served_repo, monkeypatch)
    steps_run = []
    generate = model.pipeline.generate

    def counting(request, on_step=None, **cancel):
        def step(done, total):
            steps_run.append(done)
            if on_step is not None:
                on_step(done, total)
        return generate(request, on_step=step, **cancel)

    model.pipeline.generate = counting
    bad_utf8 = _request(steps=1)
    bad_utf8["prompt"] = _Tensor("prompt", np.array([b"\xff\xfe"], dtype=object))
    over_cost = _request(steps=900)                     # 900 x 1 x 0.0041 MP = 3.7 > 2
    cancelled = _CancellableRequest(_request(steps=50), after=4)
    responses = model.execute([_request(sampler="nope"), bad_utf8, over_cost, cancelled, _request(steps=1)])
    codes = [None if r.error is None else r.error.code for r in responses]
    assert codes == [_Error.INVALID_ARG, _Error.INVALID_ARG, _Error.INVALID_ARG, _Error.CANCELLED, None]
    assert responses[0].error.startswith("sampler 'nope'")
    assert "prompt: element 0 is not UTF-8" in responses[1].error
    assert "over this model's limit max_cost 2" in responses[2].error
    # Refused before any work: the over-cost request ran no step; the cancelled one stopped at once.
    assert max(steps_run[:-1]) <= cancelled.after + 1, steps_run
    assert steps_run[-1] == 1                          # the next request ran normally


# --- with a real tritonserver ------------------------------------------------------------------------



# A server fault on demand: requests of 3 images fail inside the pipeline (not the caller's doing).
_FAULT = '''

_initialize = TritonPythonModel.initialize


def _initialize_with_a_fault(self, args):
    _initialize(self, args)
    decode = self.pipeline._decode

    def faulty(x, *rest):
        if x.shape[0] == 3:
            raise MemoryError("injected server fault")
        return decode(x, *rest)
    self.pipeline._decode = faulty


TritonPythonModel.initialize = _initialize_with_a_fault
'''


@pytest.fixture(scope="module")
def server(triton_env, bundle, tmp_path_factory):
    from ldmrt.triton.server import TritonServer

    root = tmp_path_factory.mktemp("server")
    repo = root / "repo"
    write_repository(bundle, repo, replace(CPU_OPTIONS, pipeline=replace(CPU_OPTIONS.pipeline, max_cost=2.0)))
    with open(repo / "pipeline" / "1" / "model.py", "a") as handle:
        handle.write(_FAULT)
    # A short exit timeout: after the probe test's reload, the version with the killed stub never
    # finishes unloading, and tritonserver waits the whole timeout for it at exit.
    server = TritonServer(triton_env, repo, root / "work", startup_timeout=120, exit_timeout=2)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _infer(server, inputs: list[dict], outputs=("images", "warnings"), binary: bytes = b"",
           timeout: float = 60) -> tuple[int, dict]:
    """(HTTP status, JSON answer) of one KServe v2 request; `binary` follows the JSON header."""
    import urllib.error
    import urllib.request

    header = json.dumps({"inputs": inputs, "outputs": [{"name": n} for n in outputs]}).encode()
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/pipeline/infer",
                                     data=header + binary, method="POST")
    if binary:
        request.add_header("Inference-Header-Content-Length", str(len(header)))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _scalar(name: str, value, datatype: str = "INT32") -> dict:
    return {"name": name, "datatype": datatype, "shape": [1], "data": [value]}


def _metrics(server) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_bad_requests_are_400_server_faults_500_and_both_are_counted(server):
    before = _metrics(server)
    invalid_utf8 = b"\xff\xfe not utf-8"
    cases = [
        ([_scalar("sampler", "nope", "BYTES")], b"", 400, "sampler 'nope'"),
        ([_scalar("steps", 1), _scalar("height", 0)], b"", 400, "height 0"),
        ([_scalar("steps", 1), {"name": "prompt", "datatype": "BYTES", "shape": [1],
                                "parameters": {"binary_data_size": 4 + len(invalid_utf8)}}],
         len(invalid_utf8).to_bytes(4, "little") + invalid_utf8, 400, "prompt: element 0 is not UTF-8"),
        ([_scalar("steps", 1), {"name": "prompt", "datatype": "BYTES", "shape": [3], "data": ["a", "b", "c"]}],
         b"", 500, "MemoryError: injected server fault"),
    ]
    for inputs, binary, status, message in cases:
        code, answer = _infer(server, inputs, binary=binary)
        assert (code, message in answer.get("error", "")) == (status, True), (inputs, code, answer)
    assert _infer(server, [_scalar("steps", 1)])[0] == 200                    # still serving
    after = _metrics(server)
    counter = 'ldmrt_pipeline_failures{model="pipeline",reason="%s"}'
    assert after[counter % "invalid_argument"] - before.get(counter % "invalid_argument", 0) == 3
    assert after[counter % "internal"] - before.get(counter % "internal", 0) == 1


def test_the_truncation_warning_reaches_the_client_once(server):
    long_prompt = " ".join(f"word{i}" for i in range(100))
    code, answer = _infer(server, [_scalar("steps", 1), _scalar("prompt", long_prompt, "BYTES")])
    assert code == 200, answer
    (warnings,) = [o for o in answer["outputs"] if o["name"] == "warnings"]
    assert warnings["shape"] == [1] and warnings["data"][0].startswith("prompt truncated to 77 tokens")
    code, answer = _infer(server, [_scalar("steps", 1), _scalar("prompt", "short", "BYTES")])
    assert [o["shape"] for o in answer["outputs"] if o["name"] == "warnings"] == [[0]]
    time.sleep(0.5)                                   # the log is written by another process
    assert server.log_tail(10 ** 6).count("word0 word1 word2") == 1          # once, not twice


def test_an_over_cost_request_is_refused_before_any_work(server):
    import urllib.request

    start = time.perf_counter()
    code, answer = _infer(server, [_scalar("steps", 900)])          # 900 x 0.0041 MP = 3.7 > 2
    seconds = time.perf_counter() - start
    assert code == 400 and "over this model's limit max_cost 2" in answer["error"], answer
    print(f"over-cost request refused in {seconds * 1e3:.1f} ms")
    assert seconds < 1.0, seconds                                  # 900 steps take ~5 s here
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/pipeline/config", timeout=10) as answer:
        config = json.loads(answer.read())
    limits = json.loads(config["parameters"]["limits"]["string_value"])
    assert limits["max_cost"] == 2.0 and limits["steps"]["lcm"][1] == 50


_CANCEL = '''
import json, sys, time
import numpy as np
import tritonclient.grpc as grpcclient

url, steps, after = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
client = grpcclient.InferenceServerClient(url)

def steps_input(n):
    tensor = grpcclient.InferInput("steps", [1], "INT32")
    tensor.set_data_from_numpy(np.array([n], np.int32))
    return tensor

start = time.time()
call = client.async_infer("pipeline", [steps_input(steps)], callback=lambda result, error: None)
time.sleep(after)
cancelled = time.time()
call.cancel()
client.infer("pipeline", [steps_input(1)])          # the one instance is free again at once
print(json.dumps({"start": start, "cancelled": cancelled, "follow_up": time.time() - cancelled}))
'''


def test_a_cancelled_grpc_request_stops_within_a_step_or_two(server, triton_env, tmp_path):
    import datetime
    import re
    import subprocess

    script = tmp_path / "cancel.py"
    script.write_text(_CANCEL)
    steps = 450                                                   # ~4 s here; cost 1.8 <= 2
    result = subprocess.run([str(triton_env.python), str(script), server.grpc_url, str(steps), "1.5"],
                            env=triton_env.environ(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    times = json.loads(result.stdout)
    time.sleep(0.5)
    match = re.findall(r"(\d\d):(\d\d):(\d\d\.\d+) \d+ model.py:\d+\] \"ldmrt pipeline: generation "
                       r"cancelled by the caller after denoising step (\d+) of (\d+)", server.log_tail(10 ** 6))
    assert match, server.log_tail()
    hour, minute, second, done, total = match[-1]
    assert int(total) == steps and int(done) < steps
    cancelled = datetime.datetime.fromtimestamp(times["cancelled"])
    stopped = cancelled.replace(hour=int(hour), minute=int(minute), second=0, microsecond=0) \
        + datetime.timedelta(seconds=float(second))
    step_seconds = (times["cancelled"] - times["start"]) / int(done)    # an upper bound: includes set-up
    delay = (stopped - cancelled).total_seconds()
    print(f"cancelled after step {done} of {total}: stopped {delay * 1e3:.1f} ms after the cancel, "
          f"{step_seconds * 1e3:.1f} ms per step; next request answered after {times['follow_up']:.3f} s")
    assert delay < 2 * step_seconds + 0.25, (delay, step_seconds)
    remaining = (steps - int(done)) * step_seconds
    assert times["follow_up"] < 0.25 * remaining, (times, remaining)     # it did not wait for the rest


def _stub_pids(server) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == server.process.pid and b"triton_python_backend_stub" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def _probe(server, timeout: float = 20) -> "subprocess.CompletedProcess":
    import subprocess
    import sys

    probe = server.repository / "pipeline" / "probe.py"          # the copy the repository ships
    return subprocess.run([sys.executable, str(probe), "--url", server.http_url, "--timeout", str(timeout)],
                          capture_output=True, text=True, timeout=timeout + 30)


def test_the_probe_sees_a_dead_stub_and_a_reload_cures_it(server):
    import signal
    import urllib.request

    healthy = _probe(server)
    assert healthy.returncode == 0 and healthy.stdout.startswith("ok: pipeline made 2 images"), healthy
    (stub,) = _stub_pids(server)
    os.kill(stub, signal.SIGKILL)
    time.sleep(1.0)
    ready = urllib.request.urlopen(f"http://{server.http_url}/v2/models/pipeline/ready", timeout=10)
    assert ready.status == 200                                   # what readiness probes see: nothing
    start = time.perf_counter()
    dead = _probe(server, timeout=15)
    print(f"probe: healthy {healthy.stdout.strip()}; dead stub seen in {time.perf_counter() - start:.2f} s")
    assert dead.returncode == 1 and "not healthy" in dead.stderr, dead
    assert time.perf_counter() - start < 20
    # The recovery docs/triton.md gives for --model-control-mode=explicit: reload the model.
    load = urllib.request.Request(f"http://{server.http_url}/v2/repository/models/pipeline/load",
                                  data=b"", method="POST")
    assert urllib.request.urlopen(load, timeout=120).status == 200
    cured = _probe(server)
    assert cured.returncode == 0, cured
    assert _stub_pids(server) and _stub_pids(server) != [stub]


_OWNER = '''
import json, sys, time
sys.path.insert(0, sys.argv[3])
from ldmrt.triton.server import TritonEnvironment, TritonServer
server = TritonServer(TritonEnvironment.locate(), sys.argv[1], sys.argv[2], startup_timeout=120)
server.start()
print(json.dumps({"server": server.process.pid}), flush=True)
time.sleep(600)
'''


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_the_server_helper_stops_its_server_when_its_owner_dies(triton_env, served_repo, tmp_path, signal_name):
    import signal
    import subprocess
    import sys

    from ldmrt.triton.server import SOURCE_ROOT

    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    owner = subprocess.Popen([sys.executable, str(script), str(served_repo), str(tmp_path / "work"),
                              str(SOURCE_ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = json.loads(owner.stdout.readline())["server"]
        members = lambda: [p for p in Path("/proc").glob("[0-9]*/stat")          # noqa: E731
                           if _group_of(p) == server_pid]
        assert members()
        owner.send_signal(getattr(signal, signal_name))
        owner.wait(timeout=30)
        deadline = time.monotonic() + 30
        while members() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not members(), f"tritonserver (group {server_pid}) outlived its owner's {signal_name}"
    finally:
        if owner.poll() is None:
            owner.kill()


def _group_of(stat: Path) -> int | None:
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[2]) if fields[0] != "Z" else None


def test_the_protobuf_check_accepts_a_shared_repository(triton_env, bundle, tmp_path):
    repo = _shared_repository(bundle, tmp_path)
    (repo / "their_python" / "1").mkdir(parents=True)
    (repo / "their_python" / "config.pbtxt").write_text('name: "their_python"\nbackend: "python"\n')
    write_repository(bundle, repo, replace(CPU_OPTIONS, prefix="b_"))      # a second ldmrt group
    result = triton_env.run_module("ldmrt.triton.check", [str(repo)], timeout=120)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["problems"] == [], result.stdout + result.stderr
    assert {"pipeline", "b_pipeline", "unet", "b_unet"} <= set(report["models"])
    assert not {"resnet", "their_python"} & set(report["models"])
    outputs = report["models"]["unet"]["outputs"]
    assert outputs == [["model_output", "TYPE_FP32", [4, -1, -1]]]


def test_the_probe_counts_every_instance_on_every_gpu():
    """Triton puts a group's `count` instances on each GPU it lists: the probe must reach them all."""
    from ldmrt.triton.probe import instance_count

    assert instance_count({"instance_group": [{"count": 2, "kind": "KIND_GPU", "gpus": [0, 1]},
                                              {"count": 1, "kind": "KIND_CPU"}]}) == 5
    assert instance_count({"instance_group": [{"count": 3, "kind": "KIND_CPU"}]}) == 3
    assert instance_count({}) == 1


def test_the_pipeline_backend_is_taken_in_any_case():
    assert PipelineModelOptions(backend=" ONNXRuntime ").backend == "onnxruntime"
    with pytest.raises(ConfigError) as info:
        PipelineModelOptions(backend="torch")                   # a Triton stub has no torch
    assert info.value.field == "pipeline_backend" and "onnxruntime, tensorrt, tensorrt-rtx" in str(info.value)

