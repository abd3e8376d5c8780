"""ONNX -> TensorRT / TensorRT-RTX engine, in small steps: onnx -> network -> plan bytes -> file.

    build_engine(onnx_path, spec, out_dir, options) -> EngineRecord

writes OUT/engines/<key>/<component>.plan and <component>.engine.json. The key is a readable
prefix plus a hash of everything that makes the plan what it is (builder and version, GPU
targets, graph precision, profiles, flags, ONNX sha256), so a changed input never reuses a
folder. Networks are strongly typed: precision comes from the ONNX graph.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import onnx

from ldmrt.atomic import atomic_write
from ldmrt.digest import sha256_file
from ldmrt.engine_record import RECORD_SUFFIX, EngineRecord, ProfileShapes
from ldmrt.engines import trt_api
from ldmrt.engines.backend import ENGINE_BACKENDS, Backend
from ldmrt.engines.trt_api import TrtApi
from ldmrt.errors import ConfigError, EngineBuildError
from ldmrt.manifest import onnx_digest
from ldmrt.iospec import ComponentSpec

log = logging.getLogger(__name__)

Range = tuple[int, int, int]
_PRECISION = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16",
              onnx.TensorProto.BFLOAT16: "bf16"}


@dataclass(frozen=True)
class BuildOptions:
    """How to build one engine. Profiles: () = one from the spec's ranges; or several range
    picks (symbol -> (min, opt, max)); or `static_shape` (symbol -> size) for one fixed shape."""
    backend: str = trt_api.TENSORRT_RTX
    optimization_level: int = 3                    # builder_optimization_level, 0..5
    profiles: tuple[Mapping[str, Range], ...] = ()
    static_shape: Mapping[str, int] | None = None
    timing_cache: Path | None = None               # loaded if it exists, saved after the build
    compute_capabilities: tuple[str, ...] = ()     # RTX AOT targets ("sm86", ...); () = default
    refit: bool = False
    weight_streaming: bool = False
    version_compatible: bool = False
    workspace_bytes: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", Backend.parse(self.backend, choices=ENGINE_BACKENDS).value)
        check_optimization_level(self.optimization_level)
        if self.profiles and self.static_shape is not None:
            raise ConfigError("BuildOptions: give profiles or static_shape, not both")
        if self.workspace_bytes is not None and (isinstance(self.workspace_bytes, bool) or not isinstance(
                self.workspace_bytes, int) or self.workspace_bytes < 1):
            raise ConfigError(f"workspace_bytes {self.workspace_bytes!r}: expected a positive byte "
                              f"count", field="workspace_bytes")


def check_optimization_level(level: object) -> None:
    """The builder's optimization level is an integer 0..5 (TensorRT's builder_optimization_level)."""
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 5:
        raise ConfigError(f"optimization_level {level!r}: expected an integer 0..5 (builder "
                          f"optimization level; 3 is TensorRT's default)", field="optimization_level")


# --- step 0: facts about the ONNX file ---------------------------------------------------------

@dataclass(frozen=True)
class GraphFacts:
    """What the build needs to know about an ONNX graph, read without its external weights."""
    sha256: str
    precision: str                       # dtype holding most weight elements: fp32 | fp16 | bf16
    nodes: tuple[tuple[str, str], ...]   # (name, op_type) by node index


def onnx_sha256(path: str | Path, model: onnx.ModelProto | None = None) -> str:
    """sha256 of the .onnx file; with external data, of the file then each data file in order."""
    path = Path(path)
    model = model or onnx.load(str(path), load_external_data=False)
    locations = sorted({entry.value for tensor in model.graph.initializer
                        if tensor.data_location == onnx.TensorProto.EXTERNAL
                        for entry in tensor.external_data if entry.key == "location"})
    return onnx_digest([sha256_file(file) for file in [path, *(path.parent / loc for loc in locations)]])


def read_graph_facts(path: str | Path) -> GraphFacts:
    path = Path(path)
    if not path.is_file():
        raise EngineBuildError(f"ONNX file {path} does not exist; run `ldmrt export` first")
    model = onnx.load(str(path), load_external_data=False)
    weights: Counter[str] = Counter()
    for tensor in model.graph.initializer:
        if tensor.data_type in _PRECISION:
            weights[_PRECISION[tensor.data_type]] += max(1, int(_prod(tensor.dims)))
    if not weights:   # no float weights: fall back on the graph's float inputs
        for value in model.graph.input:
            dtype = value.type.tensor_type.elem_type
            if dtype in _PRECISION:
                weights[_PRECISION[dtype]] += 1
    precision = weights.most_common(1)[0][0] if weights else "fp32"
    nodes = tuple((n.name, n.op_type) for n in model.graph.node)
    return GraphFacts(onnx_sha256(path, model), precision, nodes)


def _prod(dims: Any) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


# --- step 1: profiles from the spec -------------------------------------------------------------

def resolve_profiles(spec: ComponentSpec, options: BuildOptions) -> tuple[ProfileShapes, ...]:
    """Input name -> (min, opt, max) shapes for every profile the options ask for."""
    if options.static_shape is not None:
        picks: tuple[Mapping[str, Range], ...] = (
            {s: (v, v, v) for s, v in options.static_shape.items()},)
    else:
        picks = options.profiles or ({},)
    profiles = []
    for pick in picks:
        for symbol, rng in pick.items():
            if symbol not in spec.ranges:
                raise ConfigError(f"{spec.name}: profile symbol {symbol!r} unknown; expected some "
                                  f"of {sorted(spec.ranges)}")
            lo, opt, hi = rng
            s_lo, _, s_hi = spec.ranges[symbol]
            if not s_lo <= lo <= opt <= hi <= s_hi:
                raise ConfigError(f"{spec.name}: profile {symbol}={tuple(rng)} must satisfy "
                                  f"{s_lo} <= min <= opt <= max <= {s_hi} (the exported range)")
        # A static shape fixes only the symbols it names; the others take their opt value.
        if options.static_shape is not None:
            pick = {s: pick.get(s, (r[1],) * 3) for s, r in spec.ranges.items()}
        profiles.append(spec.profile(pick))
    return tuple(profiles)


# --- step 2: ONNX -> network ------------------------------------------------------------------

@dataclass
class Network:
    """A parsed network and the objects that must outlive it (TensorRT keeps raw pointers)."""
    builder: Any
    network: Any
    parser: Any


def parse_onnx(api: TrtApi, onnx_path: str | Path, facts: GraphFacts, component: str) -> Network:
    """Parse into a strongly typed network; EngineBuildError names each failing node and op."""
    trt = api.module
    builder = trt.Builder(api.logger)
    network = builder.create_network(api.network_flags())
    parser = trt.OnnxParser(network, api.logger)
    with api.capture() as messages:
        ok = parser.parse_from_file(str(onnx_path))
    if not ok or parser.num_errors:
        problems = [_describe_parser_error(parser.get_error(i), facts)
                    for i in range(parser.num_errors)] or messages[-3:] or ["no error reported"]
        raise EngineBuildError(
            f"{component}: {api.name} {api.version} could not parse {onnx_path}: "
            f"{'; '.join(problems)}. Export the graph without this operator (another opset or "
            f"a decomposition) or build with the other backend")
    return Network(builder, network, parser)


def _describe_parser_error(error: Any, facts: GraphFacts) -> str:
    index = _call(error, "node", -1)
    name = _call(error, "node_name", "")
    op = _call(error, "node_operator", "")
    if 0 <= index < len(facts.nodes):   # the ONNX model is the authority on names and op types
        name, op = name or facts.nodes[index][0], op or facts.nodes[index][1]
    where = f"node {index} {name!r} (op {op})" if index >= 0 else "graph"
    return f"{where}: {_call(error, 'desc', str(error))}"


def _call(obj: Any, method: str, default: Any) -> Any:
    fn = getattr(obj, method, None)
    try:
        return fn() if fn is not None else default
    except Exception:   # older parsers lack some accessors
        return default


def check_network_io(api: TrtApi, net: Network, spec: ComponentSpec,
                     profiles: tuple[ProfileShapes, ...]) -> None:
    """The parsed inputs must be the spec's: names, dtypes, and fixed dims that fit every profile."""
    network = net.network
    found = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    expected = [t.name for t in spec.inputs]
    if sorted(found) != sorted(expected):
        raise EngineBuildError(f"{spec.name}: the ONNX graph has inputs {sorted(found)}, the I/O "
                               f"spec declares {expected}; re-export the component")
    for tensor in spec.inputs:
        dtype = trt_api.numpy_dtype_name(found[tensor.name].dtype)
        if dtype != tensor.dtype:
            raise EngineBuildError(f"{spec.name}.{tensor.name}: the ONNX graph has dtype {dtype}, "
                                   f"the I/O spec declares {tensor.dtype}; re-export the component")
        dims = tuple(found[tensor.name].shape)
        for profile in profiles:
            lo, _, hi = profile[tensor.name]
            if len(dims) != len(lo) or any(d >= 0 and not a == b == d
                                           for d, a, b in zip(dims, lo, hi)):
                raise EngineBuildError(f"{spec.name}.{tensor.name}: the ONNX graph has shape "
                                       f"{list(dims)} (-1 dynamic), the profile asks for "
                                       f"{list(lo)}..{list(hi)}; re-export with dynamic axes")


# --- step 3: builder configuration ---------------------------------------------------------------

def make_config(api: TrtApi, net: Network, profiles: tuple[ProfileShapes, ...],
                options: BuildOptions) -> tuple[Any, tuple[str, ...]]:
    """The builder config for `options`; returns it with the GPU targets to record."""
    trt = api.module
    api.check_build_flags(options.version_compatible)
    config = net.builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    for flag, wanted in (("REFIT", options.refit), ("WEIGHT_STREAMING", options.weight_streaming),
                         ("VERSION_COMPATIBLE", options.version_compatible)):
        if wanted:
            api.set_flag(config, flag)
    with api.capture() as messages:
        for shapes in profiles:
            profile = net.builder.create_optimization_profile()
            for name, (lo, opt, hi) in shapes.items():
                profile.set_shape(name, lo, opt, hi)
            if config.add_optimization_profile(profile) < 0:
                raise EngineBuildError(f"{api.name} rejected the optimization profile {shapes}: "
                                       f"{' | '.join(messages[-2:]) or 'no message'}")
    targets = api.set_targets(config, options.compute_capabilities)
    return config, targets


def apply_timing_cache(api: TrtApi, config: Any, path: Path | None) -> str:
    """Give `config` the timing cache at `path` (new if missing); 'loaded', 'created' or 'none'."""
    if path is None:
        return "none"
    data = path.read_bytes() if path.is_file() else b""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # RTX: deprecated, a no-op
        cache = config.create_timing_cache(data)
        if cache is None and data:
            log.warning("timing cache %s is unreadable (another TensorRT version?); starting anew",
                        path)
            cache, data = config.create_timing_cache(b""), b""
        if cache is None or not config.set_timing_cache(cache, False):
            raise EngineBuildError(f"{api.name} {api.version} refused the timing cache {path}; "
                                   f"delete it to start a new one")
    return "loaded" if data else "created"


def save_timing_cache(config: Any, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cache = config.get_timing_cache()
        data = bytes(cache.serialize()) if cache is not None else b""
    if data:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)


# --- step 4: network -> plan bytes ---------------------------------------------------------------

def serialize(api: TrtApi, net: Network, config: Any, component: str, hint: str = "") -> bytes:
    """Build and serialize; EngineBuildError with TensorRT's last errors when it returns nothing."""
    with api.capture() as messages:
        plan = net.builder.build_serialized_network(net.network, config)
    if plan is None or plan.nbytes == 0:
        raise EngineBuildError(f"{component}: {api.name} {api.version} failed to build the engine: "
                               f"{' | '.join(messages[-4:]) or 'no message'}.{hint}")
    return bytes(plan)


# --- step 5: key, record and files ---------------------------------------------------------------

def engine_key(component: str, builder: str, builder_version: str, targets: tuple[str, ...],
               precision: str, profiles: tuple[ProfileShapes, ...], onnx_sha: str,
               flags: Mapping[str, Any]) -> str:
    """'unet-trtrtx1.7.1.116-default-fp16-1a2b3c4d5e6f': readable prefix, stable hash of all."""
    identity = {"component": component, "builder": builder, "version": builder_version,
                "targets": list(targets), "precision": precision, "onnx_sha256": onnx_sha,
                "profiles": [{n: [list(s) for s in shapes] for n, shapes in sorted(p.items())}
                             for p in profiles],
                "flags": {k: flags[k] for k in sorted(flags)}}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    short = {"tensorrt": "trt", "tensorrt-rtx": "trtrtx"}.get(builder, builder)
    return f"{component}-{short}{builder_version}-{'_'.join(targets)}-{precision}-{digest}"


def write_engine(out_dir: str | Path, record: EngineRecord, plan: bytes) -> Path:
    """engines/<key>/<component>.plan, then its record (last: a record means a whole plan)."""
    folder = Path(out_dir) / "engines" / record.key
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / record.file, plan)
    record_path = folder / f"{record.component}{RECORD_SUFFIX}"
    atomic_write(record_path, (json.dumps(record.to_dict(), indent=2) + "\n").encode())
    return record_path


# --- the whole build ------------------------------------------------------------------------------

@dataclass(frozen=True)
class EnginePlan:
    """Everything that decides an engine's key, known before the (slow) build."""
    component: str
    facts: GraphFacts
    profiles: tuple[ProfileShapes, ...]
    targets: tuple[str, ...]
    flags: Mapping[str, Any]
    key: str


def plan_engine(onnx_path: str | Path, spec: ComponentSpec, options: BuildOptions,
                api: TrtApi) -> EnginePlan:
    """Read the graph, resolve profiles and targets, and compute the engine key (no build)."""
    facts = read_graph_facts(onnx_path)
    profiles = resolve_profiles(spec, options)
    api.check_build_flags(options.version_compatible)
    targets = api.resolve_targets(options.compute_capabilities)
    flags = {"strongly_typed": api.strongly_typed, "refit": options.refit,
             "weight_streaming": options.weight_streaming,
             "version_compatible": options.version_compatible,
             "optimization_level": options.optimization_level,
             "workspace_bytes": options.workspace_bytes}
    key = engine_key(spec.name, api.name, api.version, targets, facts.precision, profiles,
                     facts.sha256, flags)
    return EnginePlan(spec.name, facts, profiles, targets, flags, key)


def build_engine(onnx_path: str | Path, spec: ComponentSpec, out_dir: str | Path,
                 options: BuildOptions = BuildOptions(), *, api: TrtApi | None = None,
                 plan: EnginePlan | None = None) -> EngineRecord:
    """Build `spec`'s ONNX graph into OUT/engines/<key>/ and return the engine record.

    `plan` (from `plan_engine` with the same arguments) saves reading and hashing the graph again.
    """
    api = api or trt_api.load(options.backend)
    start = time.perf_counter()
    plan = plan or plan_engine(onnx_path, spec, options, api)
    facts, profiles = plan.facts, plan.profiles
    net = parse_onnx(api, onnx_path, facts, spec.name)
    check_network_io(api, net, spec, profiles)
    config, targets = make_config(api, net, profiles, options)
    if targets != plan.targets:
        raise EngineBuildError(f"{spec.name}: the builder targets {list(targets)}, the plan said "
                               f"{list(plan.targets)}; did the visible GPU change during the build?")
    if options.timing_cache is not None and not api.timing_cache_effective:
        log.info("%s: the timing cache is a no-op in %s (deprecated since RTX 1.2); not used",
                 spec.name, api.name)
        cache_state = "ignored"
    else:
        cache_state = apply_timing_cache(api, config, options.timing_cache)
    log.info("%s: building %s engine (%s, targets %s, %d profile(s))", spec.name, api.name,
             facts.precision, ",".join(targets), len(profiles))
    serialized = serialize(api, net, config, spec.name, api.build_failure_hint(options.refit))
    if cache_state in ("loaded", "created"):
        save_timing_cache(config, options.timing_cache)  # type: ignore[arg-type]
    record = EngineRecord(
        component=spec.name, file=f"{spec.name}.plan",
        sha256=hashlib.sha256(serialized).hexdigest(), size=len(serialized), builder=api.name,
        builder_version=api.version, targets=targets, precision=facts.precision,
        profiles=profiles, onnx_sha256=facts.sha256,
        build_seconds=round(time.perf_counter() - start, 3),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), flags=dict(plan.flags),
        key=plan.key, timing_cache=cache_state)
    write_engine(out_dir, record, serialized)
    log.info("%s: wrote engines/%s (%d bytes, %.1f s)", spec.name, plan.key, len(serialized),
             record.build_seconds)
    return record
