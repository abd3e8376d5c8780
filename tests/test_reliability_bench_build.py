"""Issue 14 rows 13 (bench --json), 14 (bench) and 15 (build): every bad option is a one-line usage
error before any work, bench never exits 0 when a contender failed and writes strict JSON only where
it may, and `ldmrt build --force` leaves what ldmrt did not write alone."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from ldmrt.engines import trt_api
from ldmrt.engines.backend import ENGINE_BACKENDS, Backend
from ldmrt.errors import ConfigError
from tests.modules import load_file

RTX = pytest.mark.skipif(not trt_api.available(trt_api.TENSORRT_RTX),
                         reason="TensorRT-RTX is not installed")


def invoke(*args: str):
    from typer.testing import CliRunner

    from ldmrt.cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error(result) -> str:
    """The one error line of a usage error (exit 2, no traceback), whitespace-normalized."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    text = " ".join(result.stderr.split())
    assert text.startswith("error: ") and text.count("error: ") == 1, text
    return text


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny bundle (no parity run: test_export.py covers it), sides 32..64, batch <= 2."""
    from tests.families import export_small_tiny

    return export_small_tiny(tmp_path_factory.mktemp("reliability") / "tiny")


@pytest.fixture
def bundle(tiny, tmp_path) -> Path:
    """A private copy of the tiny bundle, for tests that write into it."""
    return Path(shutil.copytree(tiny, tmp_path / "bundle"))


@pytest.fixture
def no_work(monkeypatch):
    """Hashing the graphs (verify_bundle) or optimizing them (prepare_cache) is the build's work:
    a usage error must come before either."""
    import ldmrt.engines.onnxruntime as onnxruntime
    import ldmrt.export.engines as engines

    def work(*args, **kwargs):
        raise AssertionError("the build started its work before refusing a bad option")

    monkeypatch.setattr(engines, "verify_bundle", work)
    monkeypatch.setattr(onnxruntime, "prepare_cache", work)


# --- row 15: one list of backends -------------------------------------------------------------

def test_backend_names_are_one_enum_accepted_in_any_case():
    assert Backend.parse("ONNXRUNTIME") is Backend.ONNXRUNTIME
    assert Backend.parse(" TensorRT-RTX ", choices=ENGINE_BACKENDS) is Backend.TENSORRT_RTX
    assert Backend.parse(Backend.TORCH) is Backend.TORCH
    for bad in ("", "onnx runtime", "tensorrt_rtx", None, 3):
        with pytest.raises(ConfigError) as error:
            Backend.parse(bad)
        assert error.value.field == "backend"
        assert str(error.value).startswith(f"backend {bad!r}: expected one of "
                                           f"onnxruntime, tensorrt, tensorrt-rtx, torch")
    with pytest.raises(ConfigError, match="backend 'torch': expected one of tensorrt, tensorrt-rtx"):
        Backend.parse("torch", choices=ENGINE_BACKENDS)
    from ldmrt.engines import base
    assert set(base.BACKENDS) == {b.value for b in Backend}
    assert set(trt_api.BACKENDS) == {b.value for b in ENGINE_BACKENDS}


def test_build_options_take_the_backend_in_any_case():
    from ldmrt.export.engines import BundleBuildOptions
    from ldmrt.export.tensorrt import BuildOptions
    assert BundleBuildOptions(backend="TensorRT-RTX").backend == "tensorrt-rtx"
    assert BuildOptions(backend="TENSORRT").backend == "tensorrt"
    with pytest.raises(ConfigError, match="backend 'onnxruntime': expected one of tensorrt, tensorrt-rtx"):
        BundleBuildOptions(backend="onnxruntime")


@pytest.mark.parametrize("value", ["", "tensorrt-llm", "onnx"])
def test_cli_build_unknown_backend_lists_every_build_backend(tiny, value, no_work):
    error = one_error(invoke("build", tiny, "--backend", value))
    assert f"--backend {value!r}: expected one of tensorrt, tensorrt-rtx, onnxruntime" in error


def test_cli_build_backend_onnxruntime_in_capitals_caches_the_graphs(bundle):
    result = invoke("build", bundle, "--backend", "ONNXRUNTIME", "--components", "vae_decoder")
    assert result.exit_code == 0, result.output
    (entry,) = (bundle / "ort_cache").iterdir()
    assert entry.name.startswith("vae_decoder-") and (entry / "graph.onnx").is_file()


# --- row 15: every build option checked before any work ---------------------------------------

ONNXRUNTIME_BAD = [
    (["--components", ""], "--components '': none not in this bundle; expected some of text_encoder, unet, vae_decoder"),
    (["--components", "unet,vae"], "--components 'unet,vae': ['vae'] not in this bundle"),
    (["--static-batch", "0"], "--static-batch: TensorRT options; --backend onnxruntime only"),
    (["--static-size", "0"], "--static-size: TensorRT options"),
]
ENGINE_BAD = [
    (["--static-batch", "0"], "--static-batch 0: expected an integer >= 1"),
    (["--static-batch", "99"], "--static-batch 99: expected 1..2 images"),
    (["--static-size", "0"], "--static-size 0x0: expected (height, width) in pixels, each >= 1"),
    (["--static-size", "128"], "--static-size: height 128 px: expected a multiple of 4 within the bundle's 32..64 px"),
    (["--static-size", "512x"], "--static-size '512x': expected H or HxW"),
    (["--profile", "64,32,48"], "--profile 64,32,48: expected MIN <= OPT <= MAX"),
    (["--profile", "0,0,0"], "--profile 0,0,0: expected MIN <= OPT <= MAX image sides >= 1"),
    (["--profile", "32,32,64,0"], "--profile 32,32,64,0: expected MIN <= OPT <= MAX image sides >= 1 and MAX_BATCH >= 1"),
    (["--profile", "32,48,128"], "--profile 32,48,128,2: expected sizes within the bundle's 32..64 px"),
    (["--profile", "32,48,64", "--static-batch", "1"], "give one or the other"),
    (["--opt-level", "7"], "--opt-level 7: expected an integer 0..5"),
    (["--opt-level", "-1"], "--opt-level -1: expected an integer 0..5"),
    (["--components", ""], "--components '': none not in this bundle"),
    (["--components", "unet,vae"], "--components 'unet,vae': ['vae'] not in this bundle"),
    (["--compute-capability", "sm99"], "unknown compute capabilities ['sm99']"),
    (["--compute-capability", "ampere"], "--compute-capability 'ampere'"),
]


@pytest.mark.parametrize("args,message", ONNXRUNTIME_BAD)
def test_cli_build_onnxruntime_bad_options_fail_before_any_work(bundle, no_work, args, message):
    before = tree(bundle)
    assert message in one_error(invoke("build", bundle, "--backend", "onnxruntime", *args))
    assert tree(bundle) == before


@RTX
@pytest.mark.parametrize("args,message", ENGINE_BAD)
def test_cli_build_engine_bad_options_fail_before_any_work(bundle, no_work, args, message):
    before = tree(bundle)
    assert message in one_error(invoke("build", bundle, "--backend", "tensorrt-rtx", *args))
    assert tree(bundle) == before


@RTX
def test_cli_build_refuses_an_engines_path_it_cannot_write_before_building(bundle, no_work):
    (bundle / "engines").write_text("the user's notes, not a folder")
    error = one_error(invoke("build", bundle, "--backend", "tensorrt-rtx"))
    assert f"BundleError: bundle {bundle}: engines is not a folder" in error
    assert (bundle / "engines").read_text() == "the user's notes, not a folder"


def engine_key(bundle: Path, component: str) -> str:
    """The key `ldmrt build --backend tensorrt-rtx --components COMPONENT` will write (no build)."""
    from ldmrt.export.engines import BundleBuildOptions, component_options
    from ldmrt.export.tensorrt import plan_engine
    from ldmrt.manifest import load_manifest

    manifest = load_manifest(bundle)
    entry = manifest.component(component)
    options = component_options(manifest, entry.spec, BundleBuildOptions(components=(component,)), None)
    return plan_engine(bundle / entry.file, entry.spec, options, trt_api.load(trt_api.TENSORRT_RTX)).key


@RTX
def test_cli_build_refuses_a_file_where_its_engine_folder_goes_before_building(bundle):
    key = engine_key(bundle, "vae_decoder")
    (bundle / "engines").mkdir()
    (bundle / "engines" / key).write_text("not a folder")
    error = one_error(invoke("build", bundle, "--backend", "tensorrt-rtx", "--components", "vae_decoder"))
    assert f"{bundle / 'engines' / key}: expected ldmrt's engine folder of that name, found a file" in error
    assert tree(bundle / "engines") == {key: b"not a folder"}


# --- acceptance: build --force never deletes or overwrites what ldmrt did not write -----------

@RTX
def test_build_force_keeps_the_users_files_in_engines(bundle):
    from ldmrt.engines.tensorrt import RuntimeInfo, find_engine

    api = trt_api.load(trt_api.TENSORRT_RTX)
    key = engine_key(bundle, "vae_decoder")
    engines = bundle / "engines"
    users = {engines / "notes.txt": b"mine", engines / "vae_decoder-from-my-laptop" / "vae_decoder.plan": b"x",
             engines / "vae_decoder-from-my-laptop" / "vae_decoder.engine.json": b"{}",
             engines / key / "README.md": b"my notes next to the engine"}
    for path, data in users.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    result = invoke("build", bundle, "--backend", "tensorrt-rtx", "--components", "vae_decoder", "--force")
    assert result.exit_code == 0, result.output
    assert {path: path.read_bytes() for path in users} == users
    record, plan = find_engine(bundle, "vae_decoder", RuntimeInfo(api.name, api.version, None))
    assert record.key == key and plan == engines / key / "vae_decoder.plan"
    assert sorted(p.name for p in (engines / key).iterdir()) == [
        "README.md", "vae_decoder.engine.json", "vae_decoder.plan"]


def test_build_onnxruntime_force_keeps_the_users_files_in_the_cache(bundle):
    cache = bundle / "ort_cache"
    users = {cache / "notes.txt": b"mine", cache / "my-graphs" / "graph.onnx": b"not ldmrt's"}
    for path, data in users.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for _ in range(2):    # once to create the entry, once to replace it
        result = invoke("build", bundle, "--backend", "onnxruntime", "--components", "vae_decoder", "--force")
        assert result.exit_code == 0, result.output
    assert {path: path.read_bytes() for path in users} == users
    entries = [p for p in cache.iterdir() if p.name.startswith("vae_decoder-")]
    assert len(entries) == 1 and (entries[0] / "graph.onnx").is_file()


# --- row 14: every bench option checked before any process starts ------------------------------

@pytest.fixture
def no_bench_work(monkeypatch):
    """Every contender runs in a spawned process: a usage error must come before the first."""
    import ldmrt.bench as bench

    def work(*args, **kwargs):
        raise AssertionError("the bench started a contender before refusing a bad option")

    monkeypatch.setattr(bench.multiprocessing, "get_context", work)


def bench_args(bundle: Path, *extra: str) -> list:
    return ["bench", bundle, "--sizes", "32", "--steps", "1", "--warmup", "0", "--repeat", "1", *extra]


BENCH_BAD = [
    (["--device", "foo"], "--device 'foo': expected cpu or cuda"),
    (["--threads", "-3"], "--threads -3: expected an integer in 1.."),
    (["--threads", "0"], "--threads 0: expected an integer in 1.."),
    (["--threads", "100000"], "--threads 100000: expected an integer in 1.."),
    (["--backend", ""], "--backend '': expected at least one of onnxruntime, tensorrt, tensorrt-rtx, torch"),
    (["--backend", "onnx"], "--backend 'onnx': expected one of onnxruntime, tensorrt, tensorrt-rtx, torch"),
    (["--backend", "onnxruntime,ONNXRUNTIME"], "--backend 'onnxruntime,ONNXRUNTIME': onnxruntime is listed twice"),
    (["--compare", "pytorch"], "--compare 'pytorch': expected a comma list of torch-eager, diffusers"),
    (["--guidance", "nan"], "--guidance nan: expected a finite number"),
    (["--guidance", "inf"], "--guidance inf: expected a finite number"),
    (["--steps", "0"], "--steps 0: expected an integer >= 1"),
    (["--steps", "5000"], "1000"),
    (["--sampler", "dpm"], "--sampler 'dpm': expected one of ddim, "),
    (["--sizes", "30"], "--sizes 30: expected a multiple of 4 in 32..64 pixels"),
    (["--sizes", "128"], "--sizes 128: expected a multiple of 4 in 32..64 pixels"),
    (["--sizes", "32,abc"], "--sizes '32,abc': expected comma-separated integers, found 'abc'"),
    (["--sizes", "32,32"], "--sizes '32,32': 32 is listed twice"),
    (["--batch", ""], "--batch '': expected comma-separated integers"),
    (["--batch", "3"], "--batch 3: expected 1..2 images per call"),
    (["--batch", "0"], "--batch 0: expected 1..2 images per call"),
    (["--warmup", "-1"], "--warmup -1: expected an integer >= 0"),
    (["--repeat", "0"], "--repeat 0: expected an integer >= 1"),
    (["--rounds", "0"], "--rounds 0: expected an integer >= 1"),
]


@pytest.mark.parametrize("args,message", BENCH_BAD)
def test_cli_bench_bad_options_fail_before_any_work(tiny, no_bench_work, tmp_path, args, message):
    report = tmp_path / "bench.json"
    error = one_error(invoke(*bench_args(tiny, "--compare", "torch-eager", "--json", report, *args)))
    assert message in error
    assert not report.exists()


def test_bench_library_callers_get_the_same_checks(tiny, no_bench_work):
    from ldmrt.bench import BenchCase, BenchOptions, run_bench
    case = BenchCase(size=32, batch=1, steps=1)
    for options, field in ((BenchOptions(contenders=("onnxruntime",), cases=(case,), threads=-3), "threads"),
                           (BenchOptions(contenders=("no-such-backend",), cases=(case,)), "contenders"),
                           (BenchOptions(contenders=(), cases=(case,)), "contenders"),
                           (BenchOptions(cases=(), contenders=("onnxruntime",)), "cases"),
                           (BenchOptions(contenders=("onnxruntime",), device="gpu", cases=(case,)), "device"),
                           (BenchOptions(contenders=("onnxruntime",),
                                         cases=(BenchCase(size=32, batch=1, steps=1, guidance=math.nan),)),
                            "guidance")):
        with pytest.raises(ConfigError) as error:
            run_bench(tiny, options)
        assert error.value.field == field and str(error.value).startswith(field)


def test_cli_bench_diffusers_on_a_model_it_does_not_cover_is_refused(tiny, no_bench_work, monkeypatch):
    import ldmrt.bench as bench
    from ldmrt.presets import PRESETS
    assert bench.diffusers_coverage(PRESETS["tiny"]) == ""
    reason = bench.diffusers_coverage(PRESETS["ldm-uncond-vq"])
    assert reason == ("the diffusers comparison covers CLIP-conditioned KL models (SD 1.x/2.x); "
                      "'ldm-uncond-vq' is not one")
    # Exporting an LDM bundle takes minutes here: the tiny bundle stands in, its coverage answer replaced.
    monkeypatch.setattr(bench, "diffusers_coverage", lambda config: reason)
    error = one_error(invoke(*bench_args(tiny, "--compare", "diffusers")))
    assert f"--compare 'diffusers': {reason}; compare with torch-eager only" in error


# --- row 13 (bench): --json is checked before any work; only ldmrt's own reports are replaced ---

def test_cli_bench_json_that_cannot_be_written_fails_before_any_work(tiny, no_bench_work, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    foreign = tmp_path / "results.json"
    foreign.write_text('{"accuracy": 0.93}')
    link = tmp_path / "link.json"
    link.symlink_to(foreign)
    cases = [(tmp_path, "is a folder"), (Path("/proc/ldmrt-bench.json"), "cannot create files in /proc"),
             (a_file / "bench.json", f"{a_file} is a file, not a folder"),
             (foreign, "exists and is not a report ldmrt wrote"), (link, "is a symbolic link")]
    for path, message in cases:
        error = one_error(invoke(*bench_args(tiny, "--compare", "torch-eager", "--json", path)))
        assert f"--json {path}: " in error and message in error, error
    assert a_file.read_text() == "mine" and foreign.read_text() == '{"accuracy": 0.93}'


def test_write_report_replaces_only_ldmrt_reports_and_writes_strict_json(tmp_path):
    import numpy as np

    from ldmrt.bench import SCHEMA, check_report_path, write_report
    path = tmp_path / "r.json"
    report = {"schema": SCHEMA, "x": float("nan"), "rows": [{"y": np.float32("inf"), "z": np.float64(2.5)}],
              "n": np.int64(3), "where": tmp_path}
    write_report(report, path)
    text = path.read_text()

    def bare(constant):
        raise AssertionError(f"not strict JSON: bare {constant}")

    data = json.loads(text, parse_constant=bare)
    assert data["x"] is None and data["rows"] == [{"y": None, "z": 2.5}] and data["n"] == 3
    assert data["where"] == str(tmp_path)
    assert data["notes"] == ["x: nan recorded as null", "rows[0].y: inf recorded as null"]
    write_report({"schema": SCHEMA, "x": 1.0}, path)           # its own report: replaced
    assert json.loads(path.read_text())["x"] == 1.0
    for other in ('{"schema": "ldmrt-cpu-speed/1"}', '{"schema": "ldmrt.triton_load/1"}'):
        path.write_text(other)
        check_report_path(path, "--json")                       # ldmrt's other reports: fine
    for foreign in ('{"schema": "mlperf/1"}', "[1, 2]", "not json", '{"schema": "ldmrt"}', "[" * 100_000):
        path.write_text(foreign)
        with pytest.raises(ConfigError, match="is not a report ldmrt wrote"):
            write_report({"schema": SCHEMA}, path)               # checked again at write time
        assert path.read_text() == foreign
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]   # no temporary left


# --- row 14: a run in which a contender failed is not a success --------------------------------

@RTX
def test_cli_bench_exits_3_when_ldmrt_failed_and_when_nothing_ran(tiny, tmp_path):
    # TensorRT-RTX is installed here but the bundle has no engines (and the machine no GPU):
    # the contender fails in its process, as a real run's would.
    report = tmp_path / "bench.json"
    result = invoke(*bench_args(tiny, "--backend", "tensorrt-rtx", "--compare", "torch-eager", "--json", report))
    assert result.exit_code == 3, result.output
    assert "error: bench: tensorrt-rtx failed (ran: torch-eager)" in " ".join(result.stderr.split())
    data = json.loads(report.read_text())
    assert data["failed"] == ["tensorrt-rtx"]
    status = {r["contender"]: r["status"] for r in data["results"]}
    assert status == {"tensorrt-rtx": "error", "torch-eager": "ok"}
    result = invoke(*bench_args(tiny, "--backend", "tensorrt-rtx", "--compare", "", "--json", report))
    assert result.exit_code == 3, result.output
    assert "error: bench: tensorrt-rtx failed; nothing ran" in " ".join(result.stderr.split())
    assert json.loads(report.read_text())["failed"] == ["tensorrt-rtx"]     # its own report: replaced


@pytest.mark.parametrize("engine,message", [
    ("foo", "--engine 'foo': expected one of tensorrt, tensorrt-rtx (any case)"),
    ("onnxruntime", "--engine 'onnxruntime': expected one of tensorrt, tensorrt-rtx"),
])
def test_cli_export_engine_is_checked_before_the_export(tmp_path, engine, message):
    out = tmp_path / "bundle"
    assert message in one_error(invoke("export", "tiny", "--out", out, "--no-validate", "--engine", engine))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_export_engine_not_installed_is_refused_before_the_export(tmp_path, monkeypatch):
    import sys
    for name in trt_api.MODULE_NAMES[trt_api.TENSORRT]:
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "bundle"
    error = one_error(invoke("export", "tiny", "--out", out, "--no-validate", "--engine", "TensorRT"))
    assert "BackendUnavailableError" in error and trt_api.INSTALL_HINT[trt_api.TENSORRT] in error
    assert not out.exists()


def test_the_markdown_table_reads_reports_with_nulls():
    bench_report = load_file(Path(__file__).parent.parent / "benchmarks" / "report.py", "bench_report")
    stats = {"median_ms": None, "p90_ms": None}
    data = {"bundle": {"name": "tiny", "precision": "fp32"}, "ratios": [], "results": [
        {"contender": "onnxruntime", "status": "ok", "peak_rss_mib": None, "cases": [
            {"case": {"size": 32, "batch": 1, "steps": 2}, "end_to_end": stats, "unet": stats}]}]}
    table = bench_report.markdown(bench_report.rows(data))
    assert "| tiny fp32 | onnxruntime | 32 | 1 | 2 | n/a (n/a) |  |" in table


def test_cli_bench_samples_with_the_bundles_own_sampler_by_default(bundle, monkeypatch):
    import ldmrt.bench as bench
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["config"]["scheduler"].update(default_sampler="euler", scheduler_class="EulerDiscreteScheduler")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    seen = []

    def capture(bundle_dir, options, progress=None):
        seen.append(options)
        raise ConfigError("captured")

    monkeypatch.setattr(bench, "run_bench", capture)
    one_error(invoke(*bench_args(bundle, "--compare", "torch-eager")))
    one_error(invoke(*bench_args(bundle, "--compare", "torch-eager", "--sampler", "dpmpp-2m")))
    assert [o.cases[0].sampler for o in seen] == ["euler", "dpmpp-2m"]


def test_a_contender_whose_process_is_killed_is_recorded_not_waited_for(tiny):
    """multiprocessing.Pool waits forever for the task of a worker killed (say, for memory)."""
    import multiprocessing
    import os
    import signal
    import threading
    import time

    from ldmrt.bench import BenchCase, BenchOptions, run_bench

    def kill_the_contender(name):
        def kill():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                for child in multiprocessing.active_children():
                    time.sleep(2)           # mid-task: the contender is loading or measuring
                    os.kill(child.pid, signal.SIGKILL)
                    return
                time.sleep(0.05)
        threading.Thread(target=kill, daemon=True).start()

    # 2000 warm-up images: a minute or more, so the kill 2 s in always lands mid-task.
    options = BenchOptions(contenders=("onnxruntime",), warmup=2000, repeat=1,
                           cases=(BenchCase(size=32, batch=1, steps=1),))
    done = {}
    runner = threading.Thread(target=lambda: done.update(report=run_bench(tiny, options, kill_the_contender)),
                              daemon=True)
    runner.start()
    runner.join(timeout=240)
    assert "report" in done, "run_bench still waits for the killed contender"
    report = done["report"]
    (result,) = report["results"]
    assert result["status"] == "error" and "process died" in result["error"], result
    assert report["failed"] == ["onnxruntime"]
