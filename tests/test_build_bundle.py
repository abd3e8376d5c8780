"""`ldmrt build`: every component of the tiny bundle (fp32, fp16) -> TensorRT-RTX engines on CPU.

The engine records are checked against independent facts: the manifest's sha256 of each ONNX
file, hashlib over each plan file, the I/O spec's ranges, and the CFG doubling of the batch
(twice the bundle's --max-batch for the text encoder and UNet). Skips without TensorRT-RTX
(pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from ldmrt.engine_record import read_engine_record
from ldmrt.engines import trt_api
from ldmrt.engines.tensorrt import RuntimeInfo, find_engine
from ldmrt.manifest import onnx_digest
from ldmrt.errors import (BackendUnavailableError, BundleError, ConfigError, CorruptEngineError,
                          EngineBuildError, StaleEngineError)
from ldmrt.manifest import load_manifest

pytestmark = pytest.mark.skipif(
    not trt_api.available(trt_api.TENSORRT_RTX),
    reason="TensorRT-RTX is not installed: pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs")

RTX = trt_api.TENSORRT_RTX
COMPONENTS = ["denoise_step", "text_encoder", "unet", "vae_decoder", "vae_encoder"]   # manifest order


def export_tiny(out: Path, precision: str) -> Path:
    from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
    from ldmrt.iospec import Precision
    # No ONNX Runtime parity run: test_export.py covers it, and it is not what is tested here.
    export_bundle(preset_source("tiny"), out, ExportOptions(precision=Precision(precision),
                                                            validate=False))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """precision -> (bundle, records, events, seconds): the tiny bundle with every engine built."""
    import time

    from ldmrt.export.engines import BundleBuildOptions, build_bundle
    root = tmp_path_factory.mktemp("bundles")
    results = {}
    for precision in ("fp32", "fp16"):
        bundle = export_tiny(root / precision, precision)
        events = []
        start = time.perf_counter()
        records = build_bundle(bundle, BundleBuildOptions(backend=RTX), events.append)
        results[precision] = (bundle, records, events, time.perf_counter() - start)
    return results


@pytest.fixture
def bundle_copy(built, tmp_path):
    """A private copy of the built fp32 bundle, for tests that change it."""
    return Path(shutil.copytree(built["fp32"][0], tmp_path / "bundle"))


def runtime_here() -> RuntimeInfo:
    """A runtime like the builder's, without a GPU to compare (this machine has none)."""
    return RuntimeInfo(RTX, trt_api.load(RTX).version, None)


def rewrite_engines(bundle: Path, edit) -> None:
    """Rewrite manifest.json's engine records as JSON (`edit` maps the list of dicts)."""
    data = json.loads((bundle / "manifest.json").read_text())
    data["engines"] = edit(data["engines"])
    (bundle / "manifest.json").write_text(json.dumps(data))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- a full build ----------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_component_gets_an_engine_and_a_complete_record(built, precision):
    bundle, records, events, _ = built[precision]
    manifest = load_manifest(bundle)
    api = trt_api.load(RTX)
    assert [r.component for r in records] == COMPONENTS == list(manifest.components)
    assert list(manifest.engines) == records
    assert [(e.component, e.stage) for e in events] == [("", "verifying")] + [
        (name, stage) for name in COMPONENTS for stage in ("building", "built")]
    for record in records:
        entry = manifest.component(record.component)
        folder = bundle / "engines" / record.key
        plan = folder / f"{record.component}.plan"
        assert sorted(p.name for p in folder.iterdir()) == sorted([plan.name, f"{record.component}.engine.json"])
        assert record.size == plan.stat().st_size > 10_000
        assert record.sha256 == hashlib.sha256(plan.read_bytes()).hexdigest()
        assert read_engine_record(folder / f"{record.component}.engine.json") == record
        assert (record.builder, record.builder_version) == (RTX, api.version)
        assert record.onnx_sha256 == entry.sha256[entry.file] == \
            hashlib.sha256((bundle / entry.file).read_bytes()).hexdigest()
        assert record.profiles == (entry.spec.profile(),)
        computes = "fp32" if record.component == "denoise_step" else precision   # the update: fp32
        assert record.precision == computes and record.targets == ("default",)
        assert record.key.startswith(f"{record.component}-trtrtx{api.version}-default-{computes}-")
        assert record.flags["strongly_typed"] and not record.flags["refit"]
    # Classifier-free guidance: text encoder and UNet take twice the images of the VAE.
    by_name = {r.component: r.profiles[0] for r in records}
    images = manifest.shape_ranges.max_batch
    assert by_name["unet"]["sample"][2][0] == by_name["text_encoder"]["input_ids"][2][0] == 2 * images
    assert by_name["vae_decoder"]["latent"][2][0] == images
    side = manifest.shape_ranges.max_size // manifest.config.downsampling_factor
    assert by_name["unet"]["sample"][2][2:] == (side, side)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_runtime_check_accepts_the_fresh_engines(built, precision):
    bundle, records, _, _ = built[precision]
    for record in records:
        found, plan = find_engine(bundle, record.component, runtime_here())
        assert found == record and plan == bundle / "engines" / record.key / record.file


def test_rtx_ignores_the_timing_cache_and_writes_none(built):
    for bundle, records, _, _ in built.values():
        assert {r.timing_cache for r in records} == {"ignored"}
        assert not (bundle / "engines" / "timing.cache").exists()


def test_the_timing_cache_path_is_the_bundles_unless_switched_off(built):
    from ldmrt.export.engines import BundleBuildOptions, component_options
    bundle = built["fp32"][0]
    manifest = load_manifest(bundle)
    spec = manifest.component("unet").spec
    cache = bundle / "engines" / "timing.cache"
    assert component_options(manifest, spec, BundleBuildOptions(), cache).timing_cache == cache
    off = BundleBuildOptions(timing_cache=False)
    assert component_options(manifest, spec, off, cache).timing_cache is None


# --- reuse -----------------------------------------------------------------------------------

def test_second_build_reuses_every_engine_and_changes_nothing(built):
    from ldmrt.export.engines import BundleBuildOptions, build_bundle
    bundle, records, _, first_seconds = built["fp32"]
    before = tree(bundle)
    events = []
    again = build_bundle(bundle, BundleBuildOptions(backend=RTX), events.append)
    assert again == records
    assert [(e.component, e.stage) for e in events if e.component] == [(n, "reused") for n in COMPONENTS]
    assert all("sha256 verified" in e.detail for e in events if e.stage == "reused")
    assert tree(bundle) == before                     # not even manifest.json was rewritten


def test_force_rebuilds_and_replaces_the_record_with_the_same_key(bundle_copy):
    from ldmrt.export.engines import BundleBuildOptions, build_bundle
    before = load_manifest(bundle_copy).engines
    events = []
    [record] = build_bundle(bundle_copy, BundleBuildOptions(components=("vae_encoder",), force=True),
                            events.append)
    assert [e.stage for e in events] == ["verifying", "building", "built"]
    after = load_manifest(bundle_copy).engines
    assert len(after) == len(before) and [e.key for e in after].count(record.key) == 1
    assert after[-1] == record


def test_corrupt_plan_is_refused_at_runtime_and_rebuilt_not_reused(bundle_copy):
    from ldmrt.export.engines import BundleBuildOptions, build_bundle
    record, plan = find_engine(bundle_copy, "vae_decoder", runtime_here())
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0x01
    plan.write_bytes(bytes(data))
    with pytest.raises(CorruptEngineError, match=f"sha256.*ldmrt build {bundle_copy} --backend tensorrt-rtx"):
        find_engine(bundle_copy, "vae_decoder", runtime_here())
    events = []
    [rebuilt] = build_bundle(bundle_copy, BundleBuildOptions(components=("vae_decoder",)), events.append)
    assert [e.stage for e in events] == ["verifying", "building", "built"]
    assert rebuilt.key == record.key
    assert find_engine(bundle_copy, "vae_decoder", runtime_here())[0] == rebuilt


def test_engines_on_disk_are_recovered_when_the_manifest_lost_their_records(bundle_copy):
    from ldmrt.export.engines import BundleBuildOptions, build_bundle
    records = list(load_manifest(bundle_copy).engines)
    rewrite_engines(bundle_copy, lambda engines: [])  # as after a crash before the manifest write
    events = []
    assert build_bundle(bundle_copy, BundleBuildOptions(), events.append) == records
    assert {e.stage for e in events if e.component} == {"reused"}
    assert list(load_manifest(bundle_copy).engines) == records


# --- staleness at run time -------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("builder_version", "1.6.0.1", "builder version 1.6.0.1, runtime "),
    ("onnx_sha256", "0" * 64, "ONNX sha256 "),
    ("builder", "tensorrt", None),
])
def test_edited_record_is_stale_and_names_the_rebuild_command(bundle_copy, field, value, message):
    from ldmrt.export.engines import BundleBuildOptions, build_bundle
    rewrite_engines(bundle_copy, lambda engines: [
        {**e, field: value} if e["component"] == "unet" else e for e in engines])
    if message is None:   # no tensorrt-rtx engine for the UNet any more
        with pytest.raises(BundleError, match=f"no tensorrt-rtx engine for unet.*ldmrt build {bundle_copy}"):
            find_engine(bundle_copy, "unet", runtime_here())
    else:
        with pytest.raises(StaleEngineError) as error:
            find_engine(bundle_copy, "unet", runtime_here())
        assert message in str(error.value)
        assert f"Rebuild it: ldmrt build {bundle_copy} --backend tensorrt-rtx" in str(error.value)
    # The build command repairs it from the intact engine folder, without rebuilding.
    events = []
    build_bundle(bundle_copy, BundleBuildOptions(components=("unet",)), events.append)
    assert events[-1].stage == "reused"
    find_engine(bundle_copy, "unet", runtime_here())


def test_engines_are_stale_on_another_runtime_or_gpu(built):
    bundle = built["fp16"][0]
    newer = RuntimeInfo(RTX, "2.0.0.1", None)
    with pytest.raises(StaleEngineError, match="builder version .* runtime 2.0.0.1.*ldmrt build"):
        find_engine(bundle, "unet", newer)
    hopper = replace(runtime_here(), gpu_target="sm90")   # default RTX targets leave Hopper out
    with pytest.raises(StaleEngineError, match=r"GPU compute capability sm90, engine targets \['default'\]"):
        find_engine(bundle, "vae_decoder", hopper)
    find_engine(bundle, "vae_decoder", replace(runtime_here(), gpu_target="sm89"))


def test_the_runtime_check_needs_neither_torch_nor_onnx(built):
    """Lean-runtime rule: a service finds and checks its engines with numpy + the backend."""
    import subprocess
    bundle = built["fp32"][0]
    code = ("import sys; sys.modules.update(torch=None, onnx=None, onnxruntime=None)\n"
            "from ldmrt.engines.tensorrt import RuntimeInfo, find_engine\n"
            "from ldmrt.engines import trt_api\n"
            f"record, plan = find_engine({str(bundle)!r}, 'unet', RuntimeInfo("
            "'tensorrt-rtx', trt_api.load('tensorrt-rtx').version, None))\n"
            "print(record.key)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == built["fp32"][1][COMPONENTS.index("unet")].key


def test_a_record_cannot_point_outside_the_bundle(bundle_copy):
    rewrite_engines(bundle_copy, lambda engines: [
        {**e, "key": "../../elsewhere"} if e["component"] == "unet" else e for e in engines])
    with pytest.raises(BundleError, match=rf"engines\[{COMPONENTS.index('unet')}\]\.key: expected a plain file name"):
        find_engine(bundle_copy, "unet", runtime_here())


# --- options ---------------------------------------------------------------------------------

def test_static_shape_build_fixes_every_input(bundle_copy):
    from ldmrt.export.engines import BundleBuildOptions, build_bundle
    manifest = load_manifest(bundle_copy)
    f, length = manifest.config.downsampling_factor, manifest.config.conditioner.max_length
    records = build_bundle(bundle_copy, BundleBuildOptions(static_size=(64, 32), static_batch=1))
    profiles = {r.component: r.profiles for r in records}
    assert profiles["unet"][0]["sample"] == ((2, 4, 64 // f, 32 // f),) * 3     # CFG: 2 x 1 image
    assert profiles["unet"][0]["timestep"] == ((2,),) * 3
    assert profiles["text_encoder"] == ({"input_ids": ((2, length),) * 3},)
    assert profiles["vae_decoder"][0]["latent"] == ((1, 4, 64 // f, 32 // f),) * 3
    assert profiles["vae_encoder"][0]["images"] == ((1, 3, 64, 32),) * 3
    engines = load_manifest(bundle_copy).engines
    assert len(engines) == 2 * len(COMPONENTS)               # the dynamic engines stay listed
    # The newest engine that checks is the one the runtime takes.
    assert find_engine(bundle_copy, "unet", runtime_here())[0] == records[COMPONENTS.index("unet")]


def test_several_profiles_targets_level_and_weight_streaming_reach_the_record(built, tmp_path):
    from ldmrt.export.engines import BundleBuildOptions, SizeProfile, build_bundle
    bundle = Path(shutil.copytree(built["fp16"][0], tmp_path / "fp16"))
    options = BundleBuildOptions(components=("vae_decoder",), optimization_level=1,
                                 profiles=(SizeProfile(32, 32, 64, 1), SizeProfile(64, 96, 96)),
                                 compute_capabilities=("sm86", "sm89"), weight_streaming=True)
    [record] = build_bundle(bundle, options)
    f = load_manifest(bundle).config.downsampling_factor
    assert [p["latent"] for p in record.profiles] == [
        ((1, 4, 32 // f, 32 // f), (1, 4, 32 // f, 32 // f), (1, 4, 64 // f, 64 // f)),
        ((1, 4, 64 // f, 64 // f), (1, 4, 96 // f, 96 // f), (4, 4, 96 // f, 96 // f))]
    assert record.targets == ("sm86", "sm89") and "-sm86_sm89-fp16-" in record.key
    assert record.flags["weight_streaming"] is True and record.flags["optimization_level"] == 1


@pytest.mark.parametrize("options,match", [
    (dict(static_size=(128, 64)), "static_size: height 128 px"),
    (dict(static_size=(62, 64)), "multiple of"),
    (dict(static_batch=9), "static_batch 9"),
    (dict(components=("unet", "safety_checker")), "components 'unet,safety_checker'"),
    (dict(compute_capabilities=("sm99",)), "sm99"),
])
def test_bad_options_are_refused_before_anything_is_built(bundle_copy, options, match):
    from ldmrt.export.engines import BundleBuildOptions, build_bundle
    before = tree(bundle_copy)
    with pytest.raises(ConfigError, match=match):
        build_bundle(bundle_copy, BundleBuildOptions(force=True, **options))
    assert tree(bundle_copy) == before


def test_profile_outside_the_bundle_and_conflicting_options_are_refused(built):
    from ldmrt.export.engines import BundleBuildOptions, SizeProfile, component_options
    manifest = load_manifest(built["fp32"][0])
    spec = manifest.component("unet").spec
    with pytest.raises(ConfigError, match="profiles 32,64,128,4: expected sizes within"):
        component_options(manifest, spec, BundleBuildOptions(profiles=(SizeProfile(32, 64, 128),)), None)
    with pytest.raises(ConfigError, match="1..4 images"):
        component_options(manifest, spec, BundleBuildOptions(profiles=(SizeProfile(32, 64, 96, 5),)), None)
    with pytest.raises(ConfigError, match="one or the other"):
        BundleBuildOptions(static_batch=1, profiles=(SizeProfile(32, 64, 96),))


def test_failed_build_leaves_only_complete_engines_listed(bundle_copy, monkeypatch):
    import ldmrt.export.engines as engines
    from ldmrt.export.engines import BundleBuildOptions, build_bundle
    rewrite_engines(bundle_copy, lambda engines: [])
    shutil.rmtree(bundle_copy / "engines")
    real_build = engines.build_engine

    def fail_on_unet(onnx_path, spec, *args, **kwargs):
        if spec.name == "unet":
            raise EngineBuildError("unet: the builder ran out of memory (simulated)")
        return real_build(onnx_path, spec, *args, **kwargs)

    monkeypatch.setattr(engines, "build_engine", fail_on_unet)
    with pytest.raises(EngineBuildError, match="simulated"):
        build_bundle(bundle_copy, BundleBuildOptions())
    listed = load_manifest(bundle_copy).engines
    assert [e.component for e in listed] == ["denoise_step", "text_encoder"]
    assert sorted(p.name for p in (bundle_copy / "engines").iterdir()) == sorted(e.key for e in listed)
    find_engine(bundle_copy, "text_encoder", runtime_here())


def test_a_graph_that_differs_from_the_manifest_is_refused(bundle_copy):
    from ldmrt.export.engines import BundleBuildOptions, build_bundle
    entry = load_manifest(bundle_copy).component("vae_encoder")
    assert onnx_digest([entry.sha256[entry.file]]) == entry.sha256[entry.file]
    (bundle_copy / entry.file).write_bytes((bundle_copy / entry.file).read_bytes() + b"\0")
    with pytest.raises(BundleError, match="vae_encoder.onnx"):
        build_bundle(bundle_copy, BundleBuildOptions(components=("vae_encoder",)))


# --- command line ----------------------------------------------------------------------------

def invoke(*args: str):
    from typer.testing import CliRunner

    from ldmrt.cli import app
    return CliRunner().invoke(app, list(args))


def one_error(result) -> str:
    """The error text (rich may wrap it over several lines when stderr is not a terminal)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    return " ".join(result.stderr.split())


def test_cli_build_prints_the_table_and_reuses(built):
    bundle = built["fp32"][0]
    result = invoke("build", str(bundle), "--backend", "tensorrt-rtx")
    assert result.exit_code == 0, result.output
    for text in ("component", "key", "size", "build seconds", "reused", *COMPONENTS):
        assert text in result.stdout
    assert result.stdout.count("│ yes") == len(COMPONENTS)
    assert "unet: reusing engines/unet-trtrtx" in result.stderr


def test_cli_static_build(bundle_copy):
    result = invoke("build", str(bundle_copy), "-b", "tensorrt-rtx", "--components", "vae_encoder",
                    "--static-size", "64x32", "--static-batch", "2", "--compute-capability", "8.6,8.9")
    assert result.exit_code == 0, result.output
    record = load_manifest(bundle_copy).engines[-1]
    assert record.profiles == ({"images": ((2, 3, 64, 32),) * 3},)
    assert record.targets == ("sm86", "sm89")


@pytest.mark.parametrize("args,match", [
    (["--backend", "tensorrt-llm"], "--backend 'tensorrt-llm': expected one of"),
    (["--backend", "tensorrt-rtx", "--static-size", "64by32"], "--static-size '64by32'"),
    (["--backend", "tensorrt-rtx", "--profile", "32,64"], "--profile '32,64'"),
    (["--backend", "tensorrt-rtx", "--compute-capability", "ampere"], "--compute-capability 'ampere'"),
    (["--backend", "tensorrt-rtx", "--components", "unet,vae"], "--components"),
    (["--backend", "tensorrt-rtx", "--static-batch", "99"], "--static-batch 99"),
])
def test_cli_bad_options_exit_2(built, args, match):
    bundle = built["fp32"][0]
    before = tree(bundle)
    assert match in one_error(invoke("build", str(bundle), *args))
    assert tree(bundle) == before


def test_cli_missing_bundle_exits_2(tmp_path):
    assert "BundleError" in one_error(invoke("build", str(tmp_path / "nope"), "--backend", "tensorrt-rtx"))


def test_cli_missing_backend_names_the_pip_packages(built, monkeypatch):
    for name in trt_api.MODULE_NAMES[RTX]:
        monkeypatch.setitem(sys.modules, name, None)
    error = one_error(invoke("build", str(built["fp32"][0]), "--backend", "tensorrt-rtx"))
    assert "BackendUnavailableError" in error
    assert "pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs" in error


def test_build_after_export_builds_or_reuses_and_explains_failures(built, monkeypatch):
    from ldmrt.commands.build import build_after_export
    bundle, records, _, _ = built["fp16"]
    assert build_after_export(bundle, RTX) == records
    for name in trt_api.MODULE_NAMES[RTX]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendUnavailableError) as error:
        build_after_export(bundle, RTX)
    message = str(error.value)
    assert f"the bundle {bundle} was exported" in message and "pip install tensorrt-rtx" in message
    assert f"retry with: ldmrt build {bundle} --backend tensorrt-rtx" in message


def test_build_times_are_small_on_cpu(built):
    """Guards the README's numbers: the tiny bundle builds in seconds, not minutes."""
    for precision, (_, records, _, seconds) in built.items():
        assert seconds < 120, (precision, seconds)
        assert all(r.build_seconds < 60 for r in records)
    print(json.dumps({p: {"seconds": round(s, 1),
                          "engines": {r.component: [r.size, r.build_seconds] for r in rs}}
                      for p, (_, rs, _, s) in built.items()}))


def test_every_sdxl_component_builds_with_its_profiles(tmp_path):
    """The tiny SDXL-structured family (tests/families.py): both text encoders (the second with
    its pooled output), the UNet with text_embeds / time_ids, and the VAE build with TensorRT-RTX,
    each engine's profile the I/O spec's (CFG doubling the encoders' and UNet's batch)."""
    from ldmrt.export.bundle import ExportOptions, export_bundle
    from ldmrt.export.engines import BundleBuildOptions, build_bundle
    from tests.families import SDXL_FAMILY, model_source, shape_ranges

    bundle = tmp_path / "sdxl"
    export_bundle(model_source(SDXL_FAMILY), bundle, ExportOptions(
        components=("text_encoder", "text_encoder_2", "unet", "vae_decoder"), validate=False,
        shape_ranges=shape_ranges(SDXL_FAMILY)))
    records = build_bundle(bundle, BundleBuildOptions(backend=RTX, components=(
        "text_encoder", "text_encoder_2", "unet", "vae_decoder")))
    manifest = load_manifest(bundle)
    assert [r.component for r in records] == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    for record in records:
        entry = manifest.component(record.component)
        assert record.profiles == (entry.spec.profile(),)
        assert record.size == (bundle / "engines" / record.key / record.file).stat().st_size > 10_000
    unet = next(r for r in records if r.component == "unet").profiles[0]
    images = manifest.shape_ranges.max_batch
    assert unet["text_embeds"][2] == (2 * images, SDXL_FAMILY.unet.text_embeds_dim)
    assert unet["time_ids"][2] == (2 * images, 6)
    assert unet["encoder_hidden_states"][2] == (2 * images, 77, 56)
