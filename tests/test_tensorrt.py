"""TensorRT / TensorRT-RTX: ahead-of-time builds on CPU (RTX), records, staleness, checked runner.

Builds need the TensorRT-RTX wheels (tensorrt-rtx-cu13-bindings + -libs) and skip without them;
the record, staleness and runner tests use hand-made records and a fake engine and always run.
"""
from __future__ import annotations

import enum
import hashlib
import json
import subprocess
import sys
import threading
import types
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ldmrt.digest import sha256_file as file_sha256
from ldmrt.engine_record import EngineRecord, read_engine_record
from ldmrt.engines import trt_api
from ldmrt.engines.tensorrt import CudaDevice, RuntimeInfo, TensorRTRunner, check_engine_record
from ldmrt.errors import (BackendUnavailableError, ConfigError, CorruptEngineError,
                          EngineBuildError, ShapeError, StaleEngineError)
from ldmrt.iospec import ComponentSpec, TensorSpec

HAS_RTX = trt_api.available(trt_api.TENSORRT_RTX)
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX is not installed: "
                               "pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs")


def unet_spec(dtype: str = "float32") -> ComponentSpec:
    return ComponentSpec(
        "unet",
        inputs=(TensorSpec("sample", dtype, ("batch", 4, "latent_height", "latent_width")),
                TensorSpec("timestep", "float32", ("batch",))),
        outputs=(TensorSpec("model_output", dtype, ("batch", 4, "latent_height", "latent_width")),),
        ranges={"batch": (1, 2, 4), "latent_height": (8, 16, 32), "latent_width": (8, 16, 32)})


# --- small ONNX graphs -----------------------------------------------------------------------

def export_tiny_unet(path: Path, dtype: str, seed: int = 0) -> Path:
    """conv + GroupNorm + LayerNorm + attention (matmul, softmax) + conv, dynamic batch and size."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class TinyUNet(nn.Module):
        def __init__(self, channels: int = 4, width: int = 8) -> None:
            super().__init__()
            self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
            self.norm = nn.GroupNorm(4, width)
            self.ln = nn.LayerNorm(width)
            self.qkv = nn.Linear(width, 3 * width)
            self.proj = nn.Linear(width, width)
            self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

        def forward(self, sample, timestep):
            h = self.conv_in(sample) + timestep[:, None, None, None].to(sample.dtype)
            h = nn.functional.silu(self.norm(h))
            b, c, y, x = h.shape
            tokens = self.ln(h.flatten(2).transpose(1, 2))                  # (B, y*x, C)
            q, k, v = self.qkv(tokens).chunk(3, dim=-1)
            attn = torch.softmax(q @ k.transpose(1, 2) * c ** -0.5, dim=-1)  # (B, y*x, y*x)
            h = h + self.proj(attn @ v).transpose(1, 2).reshape(b, c, y, x)
            return self.conv_out(h)

    torch.manual_seed(seed)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    model = TinyUNet().to(torch_dtype).eval()
    args = (torch.randn(2, 4, 16, 16, dtype=torch_dtype), torch.tensor([1.0, 2.0]))
    image_axes = {0: "batch", 2: "latent_height", 3: "latent_width"}
    with warnings.catch_warnings():   # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), input_names=["sample", "timestep"],
                          output_names=["model_output"], opset_version=18, dynamo=False,
                          dynamic_axes={"sample": image_axes, "timestep": {0: "batch"},
                                        "model_output": image_axes})
    return path


def write_bad_graph(path: Path) -> Path:
    """MatMul -> Softmax -> an operator no parser knows (node 2, 'mystery_node', 'FooBarOp')."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    weight = helper.make_tensor("weight", TensorProto.FLOAT, [8, 8],
                                np.eye(8, dtype=np.float32).tobytes(), raw=True)
    nodes = [helper.make_node("MatMul", ["x", "weight"], ["y"], name="matmul_0"),
             helper.make_node("Softmax", ["y"], ["z"], axis=-1, name="softmax_0"),
             helper.make_node("FooBarOp", ["z"], ["out"], name="mystery_node", domain="ldmrt.test")]
    graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                           ["batch", 4, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                             ["batch", 4, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("ldmrt.test", 1)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    return {"fp32": export_tiny_unet(root / "unet32.onnx", "float32"),
            "fp16": export_tiny_unet(root / "unet16.onnx", "float16"),
            "fp32_other_weights": export_tiny_unet(root / "unet32b.onnx", "float32", seed=1)}


# --- builds (TensorRT-RTX, ahead of time, no GPU needed) ----------------------------------------

@needs_rtx
@pytest.mark.parametrize("precision,dtype", [("fp32", "float32"), ("fp16", "float16")])
def test_build_writes_plan_and_complete_record(graphs, tmp_path, precision, dtype):
    from ldmrt.export.tensorrt import BuildOptions, build_engine
    api = trt_api.load(trt_api.TENSORRT_RTX)
    spec = unet_spec(dtype)
    record = build_engine(graphs[precision], spec, tmp_path, BuildOptions())
    folder = tmp_path / "engines" / record.key
    plan = folder / record.file
    assert plan.is_file() and plan.stat().st_size == record.size > 1000
    assert file_sha256(plan) == record.sha256
    assert record.component == "unet" and record.file == "unet.plan"
    assert (record.builder, record.builder_version) == ("tensorrt-rtx", api.version)
    assert record.targets == ("default",) and record.precision == precision
    assert record.profiles == (spec.profile(),)
    assert record.onnx_sha256 == hashlib.sha256(graphs[precision].read_bytes()).hexdigest()
    assert record.flags["strongly_typed"] is True and record.flags["refit"] is False
    assert record.build_seconds > 0 and record.created.endswith("+00:00")
    assert record.key.startswith(f"unet-trtrtx{api.version}-default-{precision}-")
    # The record on disk is the returned one, and survives a JSON round trip.
    assert read_engine_record(folder / "unet.engine.json") == record
    assert EngineRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    assert sorted(p.name for p in folder.iterdir()) == ["unet.engine.json", "unet.plan"]
    # A record checks clean against a runtime like the builder (no GPU here: nothing to compare).
    check_engine_record(record, RuntimeInfo("tensorrt-rtx", api.version, None),
                        onnx_sha256=record.onnx_sha256, plan_path=plan)


@needs_rtx
def test_engine_key_changes_with_onnx_profile_and_targets_only(graphs, tmp_path):
    from ldmrt.export.tensorrt import BuildOptions, build_engine
    spec, options = unet_spec(), BuildOptions()
    base = build_engine(graphs["fp32"], spec, tmp_path, options)
    again = build_engine(graphs["fp32"], spec, tmp_path, options)
    assert again.key == base.key
    other_onnx = build_engine(graphs["fp32_other_weights"], spec, tmp_path, options)
    narrower = build_engine(graphs["fp32"], spec, tmp_path,
                            replace(options, profiles=({"latent_height": (8, 16, 16)},)))
    targeted = build_engine(graphs["fp32"], spec, tmp_path,
                            replace(options, compute_capabilities=("sm86", "sm89")))
    streamed = build_engine(graphs["fp32"], spec, tmp_path, replace(options, weight_streaming=True))
    keys = [base.key, other_onnx.key, narrower.key, targeted.key, streamed.key]
    assert len(set(keys)) == len(keys)
    assert targeted.targets == ("sm86", "sm89") and "-sm86_sm89-" in targeted.key
    assert narrower.profiles[0]["sample"][2] == (4, 4, 16, 32)
    assert streamed.flags["weight_streaming"] is True
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == sorted(keys)


@needs_rtx
def test_several_profiles_and_static_shape(graphs, tmp_path):
    from ldmrt.export.tensorrt import BuildOptions, build_engine
    spec = unet_spec()
    two = build_engine(graphs["fp32"], spec, tmp_path, BuildOptions(profiles=(
        {"batch": (1, 1, 2), "latent_height": (8, 8, 16), "latent_width": (8, 8, 16)},
        {"batch": (2, 2, 4), "latent_height": (16, 32, 32), "latent_width": (16, 32, 32)})))
    assert [p["sample"] for p in two.profiles] == [
        ((1, 4, 8, 8), (1, 4, 8, 8), (2, 4, 16, 16)), ((2, 4, 16, 16), (2, 4, 32, 32), (4, 4, 32, 32))]
    static = build_engine(graphs["fp32"], spec, tmp_path,
                          BuildOptions(static_shape={"batch": 2, "latent_height": 16}))
    assert static.profiles == ({"sample": ((2, 4, 16, 16),) * 3, "timestep": ((2,),) * 3},)


def test_build_options_and_profiles_are_validated():
    from ldmrt.export.tensorrt import BuildOptions, resolve_profiles
    with pytest.raises(ConfigError, match="backend"):
        BuildOptions(backend="tensorrt-llm")
    with pytest.raises(ConfigError, match="optimization level"):
        BuildOptions(optimization_level=7)
    with pytest.raises(ConfigError, match="not both"):
        BuildOptions(profiles=({},), static_shape={"batch": 1})
    spec = unet_spec()
    with pytest.raises(ConfigError, match="exported range"):
        resolve_profiles(spec, BuildOptions(profiles=({"latent_height": (8, 16, 64)},)))
    with pytest.raises(ConfigError, match="unknown"):
        resolve_profiles(spec, BuildOptions(static_shape={"height": 8}))


@needs_rtx
def test_what_rtx_cannot_build_is_refused_up_front(graphs, tmp_path):
    from ldmrt.export.tensorrt import BuildOptions, build_engine
    with pytest.raises(ConfigError, match="sm99"):
        build_engine(graphs["fp32"], unet_spec(), tmp_path, BuildOptions(compute_capabilities=("sm99",)))
    with pytest.raises(ConfigError, match="libnvinfer_lean"):
        build_engine(graphs["fp32"], unet_spec(), tmp_path, BuildOptions(version_compatible=True))
    assert not (tmp_path / "engines").exists()


@needs_rtx
def test_builder_failure_carries_tensorrt_message_and_leaves_nothing(graphs, tmp_path):
    from ldmrt.export.tensorrt import BuildOptions, build_engine
    # TensorRT-RTX compiles no fp32 GEMM for Turing: a real build error, not a parse error.
    with pytest.raises(EngineBuildError, match="SM75"):
        build_engine(graphs["fp32"], unet_spec(), tmp_path, BuildOptions(compute_capabilities=("sm75",)))
    assert not (tmp_path / "engines").exists()


@needs_rtx
def test_parse_failure_names_node_and_operator(tmp_path):
    from ldmrt.export.tensorrt import BuildOptions, build_engine
    spec = ComponentSpec("text_encoder", inputs=(TensorSpec("x", "float32", ("batch", 4, 8)),),
                         outputs=(TensorSpec("out", "float32", ("batch", 4, 8)),),
                         ranges={"batch": (1, 1, 2)})
    with pytest.raises(EngineBuildError) as error:
        build_engine(write_bad_graph(tmp_path / "bad.onnx"), spec, tmp_path, BuildOptions())
    message = str(error.value)
    assert "node 2 'mystery_node' (op FooBarOp)" in message and "text_encoder" in message
    assert not (tmp_path / "engines").exists()


def test_parser_error_op_type_comes_from_the_onnx_graph_when_missing():
    from ldmrt.export.tensorrt import GraphFacts, _describe_parser_error

    class OldParserError:   # parsers before TensorRT 10 report only the node index
        def node(self):
            return 1

        def desc(self):
            return "unsupported"

    facts = GraphFacts("0" * 64, "fp32", (("conv_0", "Conv"), ("gn_0", "GroupNormalization")))
    assert _describe_parser_error(OldParserError(), facts) == \
        "node 1 'gn_0' (op GroupNormalization): unsupported"


@needs_rtx
def test_graph_that_disagrees_with_the_spec_is_refused(graphs, tmp_path):
    from ldmrt.export.tensorrt import BuildOptions, build_engine
    with pytest.raises(EngineBuildError, match="dtype float32.*declares float16"):
        build_engine(graphs["fp32"], unet_spec("float16"), tmp_path, BuildOptions())
    renamed = replace(unet_spec(), inputs=(TensorSpec("latent", "float32", ("batch", 4, "latent_height",
                                                                            "latent_width")),
                                           TensorSpec("timestep", "float32", ("batch",))))
    with pytest.raises(EngineBuildError, match="inputs"):
        build_engine(graphs["fp32"], renamed, tmp_path, BuildOptions())
    with pytest.raises(EngineBuildError, match="does not exist"):
        build_engine(tmp_path / "missing.onnx", unet_spec(), tmp_path, BuildOptions())


@needs_rtx
def test_timing_cache_is_written_then_loaded(graphs, tmp_path):
    from ldmrt.export.tensorrt import (BuildOptions, apply_timing_cache, build_engine, parse_onnx,
                                       read_graph_facts, save_timing_cache)
    api = trt_api.load(trt_api.TENSORRT_RTX)
    cache = tmp_path / "timing.cache"
    facts = read_graph_facts(graphs["fp32"])
    states = []
    for _ in range(2):   # the steps themselves, on real builder configs
        net = parse_onnx(api, graphs["fp32"], facts, "unet")
        config = net.builder.create_builder_config()
        states.append(apply_timing_cache(api, config, cache))
        save_timing_cache(config, cache)
        assert cache.stat().st_size > 0
    assert states == ["created", "loaded"]
    # TensorRT-RTX documents the timing cache as a no-op that needs a GPU during AOT: ignored.
    other = tmp_path / "rtx.cache"
    record = build_engine(graphs["fp32"], unet_spec(), tmp_path, BuildOptions(timing_cache=other))
    assert record.timing_cache == "ignored" and not other.exists()


# --- staleness and corruption, with hand-made records ------------------------------------------

def make_record(tmp_path: Path, **changes) -> tuple[EngineRecord, Path]:
    bundle = tmp_path / "bundle"
    folder = bundle / "engines" / "unet-test"
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / "unet.plan"
    plan.write_bytes(b"plan bytes " * 100)
    record = EngineRecord(
        component="unet", file="unet.plan", sha256=file_sha256(plan), size=plan.stat().st_size,
        builder="tensorrt-rtx", builder_version="1.7.1.116", targets=("sm86", "sm89"),
        precision="fp16", profiles=(unet_spec().profile(),), onnx_sha256="a" * 64,
        build_seconds=1.5, created="2026-01-01T00:00:00+00:00",
        flags={"version_compatible": False}, key="unet-test")
    return replace(record, **changes), plan


RTX_SM89 = RuntimeInfo("tensorrt-rtx", "1.7.1.116", "sm89")


def test_matching_record_passes(tmp_path):
    record, plan = make_record(tmp_path)
    check_engine_record(record, RTX_SM89, onnx_sha256="a" * 64, plan_path=plan)


@pytest.mark.parametrize("runtime,onnx_sha,expected", [
    (replace(RTX_SM89, builder_version="1.8.0.10"), "a" * 64, "builder version 1.7.1.116, runtime 1.8.0.10"),
    (replace(RTX_SM89, gpu_target="sm120"), "a" * 64, "GPU compute capability sm120"),
    (RTX_SM89, "b" * 64, "ONNX sha256 bbbbbbbbbbbb"),
    (replace(RTX_SM89, builder="tensorrt"), "a" * 64, "built with tensorrt-rtx, this runtime is tensorrt"),
])
def test_stale_record_says_what_differs_and_how_to_rebuild(tmp_path, runtime, onnx_sha, expected):
    record, plan = make_record(tmp_path)
    with pytest.raises(StaleEngineError) as error:
        check_engine_record(record, runtime, onnx_sha256=onnx_sha, plan_path=plan,
                            bundle=tmp_path / "bundle")
    assert expected in str(error.value)
    assert f"ldmrt build {tmp_path / 'bundle'} --backend tensorrt-rtx" in str(error.value)


def test_every_difference_is_listed(tmp_path):
    record, _ = make_record(tmp_path)
    runtime = RuntimeInfo("tensorrt-rtx", "1.8.0.10", "sm75")
    with pytest.raises(StaleEngineError, match="builder version.*GPU compute capability sm75.*ONNX"):
        check_engine_record(record, runtime, onnx_sha256="c" * 64)


@pytest.mark.parametrize("target,runs_on,refused_on", [
    ("default", ("sm80", "sm86", "sm89", "sm120"), ("sm75", "sm90")),   # RTX: no Turing, no Hopper
    ("ampere+", ("sm80", "sm86", "sm90", "sm120"), ("sm75",)),
    ("sm86", ("sm86",), ("sm89", "sm80")),
])
def test_symbolic_targets_cover_the_documented_gpus(tmp_path, target, runs_on, refused_on):
    record, _ = make_record(tmp_path, targets=(target,))
    for gpu in runs_on:
        check_engine_record(record, replace(RTX_SM89, gpu_target=gpu))
    for gpu in refused_on:
        with pytest.raises(StaleEngineError, match=f"GPU compute capability {gpu}"):
            check_engine_record(record, replace(RTX_SM89, gpu_target=gpu))


def test_version_compatible_engines_run_newer_runtimes_only_when_opted_in(tmp_path):
    record, _ = make_record(tmp_path, flags={"version_compatible": True})
    newer = replace(RTX_SM89, builder_version="1.8.0.10")
    with pytest.raises(StaleEngineError, match="allow_version_compatible"):
        check_engine_record(record, newer)
    check_engine_record(record, replace(newer, allow_version_compatible=True))
    for version in ("2.0.0.1", "1.6.0.0"):   # another major, or older: never
        with pytest.raises(StaleEngineError, match="builder version"):
            check_engine_record(record, replace(RTX_SM89, builder_version=version,
                                                allow_version_compatible=True))


def test_changed_or_missing_plan_is_corrupt(tmp_path):
    record, plan = make_record(tmp_path)
    plan.write_bytes(plan.read_bytes()[:-1] + b"X")         # same size, other bytes
    with pytest.raises(CorruptEngineError, match="sha256"):
        check_engine_record(record, RTX_SM89, plan_path=plan)
    plan.write_bytes(b"short")
    with pytest.raises(CorruptEngineError, match="size 5"):
        check_engine_record(record, RTX_SM89, plan_path=plan)
    plan.unlink()
    with pytest.raises(CorruptEngineError, match="missing"):
        check_engine_record(record, RTX_SM89, plan_path=plan)


def test_malformed_record_is_corrupt(tmp_path):
    record, plan = make_record(tmp_path)
    data = record.to_dict()
    del data["sha256"]
    path = plan.parent / "unet.engine.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CorruptEngineError, match="sha256"):
        read_engine_record(path)
    path.write_text("{not json")
    with pytest.raises(CorruptEngineError):
        read_engine_record(path)


# --- the runner, against a fake TensorRT module and a fake device ------------------------------

class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class FakeDevice:
    """Host memory posing as device memory; CUDA graphs record and replay engine launches."""

    def __init__(self):
        self.memory: dict[int, bytearray] = {}
        self.capturing: list | None = None
        self.launches = 0
        self.freed: list[int] = []

    def malloc(self, nbytes):
        ptr = 4096 * (len(self.memory) + 1)
        self.memory[ptr] = bytearray(nbytes)
        return ptr

    def free(self, ptr):
        self.freed.append(ptr)

    def create_stream(self):
        return object()

    def stream_handle(self, stream):
        return id(stream)

    def copy_to_device(self, ptr, array, stream):
        self.memory[ptr][:array.nbytes] = array.tobytes()

    def copy_to_host(self, array, ptr, stream):
        array[...] = np.frombuffer(bytes(self.memory[ptr][:array.nbytes]),
                                   dtype=array.dtype).reshape(array.shape)

    def synchronize(self, stream):
        pass

    def begin_capture(self, stream):
        self.capturing = []

    def end_capture(self, stream):
        graph, self.capturing = self.capturing, None
        return graph

    def launch(self, graph, stream):
        self.launches += 1
        for step in graph:
            step()

    def destroy_graph(self, graph):
        pass

    def destroy_stream(self, stream):
        pass


class FakeEngine:
    """model_output = 2 * sample + timestep, with optimization profiles like a real engine."""

    def __init__(self, device, profiles=None, refuse=()):
        self.device, self.refuse, self.contexts = device, set(refuse), []
        self.profiles = profiles or [unet_spec().profile()]
        self.num_optimization_profiles = len(self.profiles)
        self.names = ["sample", "timestep", "model_output"]
        self.num_io_tensors = 3

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return TensorIOMode.OUTPUT if name == "model_output" else TensorIOMode.INPUT

    def get_tensor_dtype(self, name):
        return DataType.FLOAT

    def get_tensor_profile_shape(self, name, index):
        return [list(s) for s in self.profiles[index][name]]

    def get_tensor_shape(self, name):
        """As TensorRT: the network's declared shape, -1 where a profile lets the dim vary."""
        lo, _, hi = self.profiles[0]["sample" if name == "model_output" else name]
        return [a if a == b else -1 for a, b in zip(lo, hi)]

    def create_execution_context(self):
        context = FakeContext(self)
        self.contexts.append(context)
        return context


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.profile = engine, {}, {}, 0
        self.executions = 0
        self.capturable = True

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return "set_optimization_profile_async" not in self.engine.refuse

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profiles[self.profile][name]
        self.shapes[name] = tuple(shape)
        return "set_input_shape" not in self.engine.refuse and \
            all(a <= s <= b for a, s, b in zip(lo, shape, hi))

    def get_tensor_shape(self, name):
        return self.shapes["sample"] if name == "model_output" else self.shapes[name]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return "set_tensor_address" not in self.engine.refuse

    def is_stream_capturable(self, stream):
        return self.capturable

    def execute_async_v3(self, stream):
        if "execute_async_v3" in self.engine.refuse:
            return False
        device = self.engine.device
        shape = self.shapes["sample"]

        def step():
            self.executions += 1
            n = int(np.prod(shape))
            sample = np.frombuffer(bytes(device.memory[self.addresses["sample"]][:4 * n]),
                                   np.float32).reshape(shape)
            t = np.frombuffer(bytes(device.memory[self.addresses["timestep"]][:4 * shape[0]]),
                              np.float32)
            out = 2 * sample + t[:, None, None, None]
            device.memory[self.addresses["model_output"]][:out.nbytes] = out.tobytes()

        if device.capturing is not None:
            device.capturing.append(step)
        else:
            step()
        return True


def fake_api(engine, validity=None):
    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self):
            pass

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, plan):
            return engine if plan == b"fake plan" else None

    if validity is not None:
        Runtime.get_engine_validity = lambda self, plan: validity
    module = types.ModuleType("fake_tensorrt_rtx")
    module.__version__ = "1.7.1.116"
    module.ILogger, module.Runtime, module.TensorIOMode = ILogger, Runtime, TensorIOMode
    module.EngineInvalidityDiagnostics = enum.IntFlag("Diag", {"VERSION_MISMATCH": 1,
                                                               "UNSUPPORTED_CC": 2})
    return trt_api.wrap(module, trt_api.TENSORRT_RTX)


def inputs(batch=2, size=16, dtype=np.float32):
    rng = np.random.default_rng(batch * 100 + size)
    return {"sample": rng.standard_normal((batch, 4, size, size)).astype(dtype),
            "timestep": np.arange(batch, dtype=np.float32) + 1}


def make_runner(refuse=(), profiles=None, **kwargs):
    device = FakeDevice()
    engine = FakeEngine(device, profiles, refuse)
    return TensorRTRunner(b"fake plan", fake_api(engine), device=device, **kwargs), engine, device


def expected(arrays):
    return 2 * arrays["sample"] + arrays["timestep"][:, None, None, None]


def test_runner_runs_and_returns_outputs():
    runner, engine, _ = make_runner()
    assert [t.name for t in runner.inputs] == ["sample", "timestep"]
    assert runner.inputs[0].profiles == (((1, 4, 8, 8), (2, 4, 16, 16), (4, 4, 32, 32)),)
    for batch, size in [(2, 16), (1, 8), (4, 32), (3, 24)]:
        arrays = inputs(batch, size)
        out = runner.run(arrays)
        assert list(out) == ["model_output"] and out["model_output"].dtype == np.float32
        np.testing.assert_array_equal(out["model_output"], expected(arrays))
    assert len(engine.contexts) == 1
    runner.close()


@pytest.mark.parametrize("arrays,match", [
    ({"sample": inputs()["sample"]}, "expected inputs"),
    ({**inputs(), "extra": np.zeros(1, np.float32)}, "expected inputs"),
    ({"latent": inputs()["sample"], "timestep": inputs()["timestep"]}, "expected inputs"),
    (inputs(dtype=np.float16), "expected dtype float32, found float16"),
    ({**inputs(), "timestep": np.ones((2, 1), np.float32)}, "expected 1 dimensions"),
    (inputs(batch=5), "fit no optimization profile"),
    (inputs(size=40), "fit no optimization profile"),
])
def test_runner_refuses_bad_inputs_before_running(arrays, match):
    runner, engine, _ = make_runner()
    with pytest.raises(ShapeError, match=match):
        runner.run(arrays)
    assert not engine.contexts   # refused before any context or buffer exists


@pytest.mark.parametrize("call,error", [("set_input_shape", ShapeError),
                                        ("set_tensor_address", BackendUnavailableError),
                                        ("execute_async_v3", BackendUnavailableError)])
def test_runner_checks_every_boolean_tensorrt_returns(call, error):
    runner, _, _ = make_runner(refuse={call})
    with pytest.raises(error, match=call):
        runner.run(inputs())


def test_runner_picks_the_profile_that_fits():
    small = {"sample": ((1, 4, 8, 8), (1, 4, 8, 8), (2, 4, 16, 16)), "timestep": ((1,), (1,), (2,))}
    large = {"sample": ((2, 4, 16, 16), (2, 4, 32, 32), (4, 4, 32, 32)),
             "timestep": ((2,), (2,), (4,))}
    runner, engine, _ = make_runner(profiles=[small, large])
    # (2, 16) fits both profiles: the context stays on the one it has.
    for batch, size, profile in [(1, 8, 0), (4, 32, 1), (2, 16, 1), (1, 8, 0), (2, 16, 0)]:
        arrays = inputs(batch, size)
        np.testing.assert_array_equal(runner.run(arrays)["model_output"], expected(arrays))
        assert engine.contexts[0].profile == profile
    with pytest.raises(ShapeError, match="fit no optimization profile"):
        runner.run(inputs(batch=1, size=32))


def test_cuda_graph_is_captured_after_one_warm_up_per_shape():
    runner, engine, device = make_runner(cuda_graphs=True)
    context = None
    for call, (batch, size) in enumerate([(2, 16)] * 3 + [(1, 8)] * 2 + [(2, 16)]):
        arrays = inputs(batch, size)
        np.testing.assert_array_equal(runner.run(arrays)["model_output"], expected(arrays))
        context = engine.contexts[0]
    # (2,16): run, capture+launch, launch; (1,8): run, capture+launch; (2,16): launch.
    assert device.launches == 4 and context.executions == 6
    assert len(runner._workers[0].graphs) == 2


def test_no_capture_when_the_context_is_not_capturable():
    runner, engine, device = make_runner(cuda_graphs=True)
    runner.run(inputs())
    engine.contexts[0].capturable = False
    for _ in range(2):
        runner.run(inputs())
    assert device.launches == 0 and engine.contexts[0].executions == 3


def test_one_execution_context_per_thread():
    runner, engine, _ = make_runner(cuda_graphs=True)
    errors, barrier = [], threading.Barrier(3)

    def work(size):
        try:
            barrier.wait()
            for _ in range(3):
                arrays = inputs(2, size)
                np.testing.assert_array_equal(runner.run(arrays)["model_output"], expected(arrays))
        except Exception as exc:   # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(size,)) for size in (8, 16, 24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(engine.contexts) == 3
    runner.close()
    assert not runner._workers


def test_invalid_or_undeserializable_plan_is_stale():
    device = FakeDevice()
    engine = FakeEngine(device)
    api = fake_api(engine, validity=(types.SimpleNamespace(name="INVALID"), 2))
    with pytest.raises(StaleEngineError, match="UNSUPPORTED_CC.*ldmrt build /b --backend"):
        TensorRTRunner(b"fake plan", api, device=device,
                       rebuild="ldmrt build /b --backend tensorrt-rtx")
    with pytest.raises(StaleEngineError, match="could not deserialize"):
        TensorRTRunner(b"another plan", fake_api(engine), device=device)


def test_from_record_checks_the_plan_before_loading(tmp_path):
    record, plan = make_record(tmp_path, builder_version="1.7.1.116")
    plan.write_bytes(b"fake plan")
    record = replace(record, sha256=file_sha256(plan), size=plan.stat().st_size)
    path = plan.parent / "unet.engine.json"
    path.write_text(json.dumps(record.to_dict()))
    device = FakeDevice()
    api = fake_api(FakeEngine(device))
    runner = TensorRTRunner.from_record(path, api, runtime=RTX_SM89, device=device)
    arrays = inputs()
    np.testing.assert_array_equal(runner.run(arrays)["model_output"], expected(arrays))
    plan.write_bytes(b"fake plaN")
    with pytest.raises(CorruptEngineError, match="rebuild it: ldmrt build"):
        TensorRTRunner.from_record(path, api, runtime=RTX_SM89, device=device)


def test_cuda_device_without_cuda_python_is_unavailable(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendUnavailableError, match="cuda-python"):
        CudaDevice()


def test_missing_backend_names_the_packages(monkeypatch):
    for name in trt_api.MODULE_NAMES[trt_api.TENSORRT_RTX]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendUnavailableError, match="tensorrt-rtx-cu13-bindings"):
        trt_api.load(trt_api.TENSORRT_RTX)


def test_runtime_modules_import_without_torch_or_onnx():
    code = ("import sys; sys.modules.update(torch=None, onnx=None);"
            "import ldmrt.engines.tensorrt, ldmrt.engines.trt_api")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
