"""Check a generated repository with Triton's own model-config protobuf against the manifest.

Needs `tritonclient` (its grpc package ships model_config_pb2) and protobuf: run it in the
environment scripts/triton_env.sh makes, e.g.

    TRITON_ENV/bin/python -m ldmrt.triton.check REPO

Every config.pbtxt must parse as Triton's ModelConfig, and each component model's names,
data types and dims must follow from the manifest's I/O spec. The rules are re-derived here
from the spec (not by calling ldmrt.triton.config), so a mistake there is caught here. The
pipeline model's inputs are those pipeline_io.py declares for the manifest's model, each optional,
and the LoRA adapters its parameter `loras` lists are in its version folder, unchanged.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ldmrt.iospec import Component, ComponentSpec, TensorSpec, parse_dim
from ldmrt.manifest import load_manifest
from ldmrt.triton.pipeline_io import RESPONSE_TENSORS, request_tensors

VERSION = "1"
_NUMPY_TO_TRITON = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16",
                    "int32": "TYPE_INT32", "int64": "TYPE_INT64", "uint8": "TYPE_UINT8",
                    "int8": "TYPE_INT8", "bool": "TYPE_BOOL", "float64": "TYPE_FP64"}


def parse_config(path: Path) -> Any:
    """config.pbtxt as Triton's inference.ModelConfig message (google.protobuf text format)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def check_repository(repo: str | Path) -> dict[str, Any]:
    """{"models": {name: summary}, "problems": [...]}; no problems means the repository matches."""
    from tritonclient.grpc import model_config_pb2

    repo = Path(repo)
    problems: list[str] = []
    configs: dict[str, Any] = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        try:
            configs[path.parent.name] = parse_config(path)
        except Exception as exc:  # text_format.ParseError and friends
            problems.append(f"{path}: does not parse as Triton's ModelConfig: {exc}")
    # A repository may be shared: ldmrt's pipelines say so in their parameters, and each one's
    # component models share its prefix; other models are someone else's.
    pipelines = [name for name, c in configs.items()
                 if c.backend == "python" and "ldmrt_bundle_name" in c.parameters]
    if not pipelines:
        return {"models": sorted(configs), "problems": problems + [
            f"{repo}: expected an ldmrt pipeline model (Python backend, parameter ldmrt_bundle_name), "
            f"found none among {sorted(configs)}"]}
    dtype_name = model_config_pb2.DataType.Name
    summary: dict[str, Any] = {}
    for pipeline in pipelines:
        problems += _check_group(repo, pipeline, configs, summary, dtype_name)
    return {"models": summary, "problems": problems}


def _check_group(repo: Path, pipeline: str, configs: dict[str, Any], summary: dict[str, Any],
                 dtype_name) -> list[str]:
    """One pipeline model and the component models of its prefix, against its bundle's manifest."""
    from ldmrt.triton.ownership import marker_group

    prefix = pipeline.removesuffix("pipeline")
    params = {k: v.string_value for k, v in configs[pipeline].parameters.items()}
    bundle = repo / pipeline / VERSION / params.get("bundle", "bundle")
    manifest = load_manifest(bundle)
    problems = _check_pipeline(repo, pipeline, configs[pipeline], manifest.config, dtype_name)
    summary[pipeline] = {"backend": "python", "bundle": str(bundle)}
    served = {name: entry for name, entry in manifest.components.items()
              if name != Component.DENOISE_STEP}      # the update graph is not a Triton model
    expected = {f"{prefix}{name}" for name in served} | {pipeline}
    for extra in sorted(set(configs) - expected):
        if marker_group(repo / extra) == pipeline:
            problems.append(f"{repo}/{extra}: a model of {pipeline} that its manifest does not have")
    for name, entry in served.items():
        model = f"{prefix}{name}"
        if model not in configs:
            problems.append(f"{repo}: no model {model} for component {name}")
            continue
        config = configs[model]
        problems += [f"{model}: {p}" for p in _check_component(repo / model, config, entry.spec,
                                                                 entry.files, dtype_name)]
        summary[model] = {"platform": config.platform, "max_batch_size": config.max_batch_size,
                          "inputs": [[t.name, dtype_name(t.data_type), list(t.dims)] for t in config.input],
                          "outputs": [[t.name, dtype_name(t.data_type), list(t.dims)] for t in config.output]}
    return problems


def _check_pipeline(repo: Path, name: str, config: Any, model_config, dtype_name) -> list[str]:
    problems = []
    found = [(t.name, dtype_name(t.data_type), list(t.dims)) for t in config.input]
    expected = [(t.name, t.data_type, list(t.dims)) for t in request_tensors(model_config)]
    if found != expected:
        problems.append(f"{name}: inputs {found}, expected {expected}")
    if any(not t.optional for t in config.input):
        problems.append(f"{name}: every request input should be optional")
    outputs = [(t.name, dtype_name(t.data_type), list(t.dims)) for t in config.output]
    expected = [(t.name, t.data_type, list(t.dims)) for t in RESPONSE_TENSORS]
    if outputs != expected:
        problems.append(f"{name}: outputs {outputs}, expected {expected}")
    if not (repo / name / VERSION / "model.py").is_file():
        problems.append(f"{name}: no {VERSION}/model.py")
    problems += _check_adapters(repo / name, config)
    return problems


def _check_adapters(model_dir: Path, config: Any) -> list[str]:
    """The parameter `loras` parses, and every file it lists is there with its sha256."""
    from ldmrt.errors import BundleError
    from ldmrt.triton.adapters import PARAMETER, parse_adapters, served_adapters

    if PARAMETER not in config.parameters:
        return [f"{model_dir.name}: no parameter {PARAMETER} (the LoRA adapters; {{}} for none)"]
    try:
        served_adapters(parse_adapters(config.parameters[PARAMETER].string_value, str(model_dir)),
                        model_dir / VERSION, verify=True)
    except BundleError as exc:
        return [f"{model_dir.name}: {exc}"]
    return []


def _check_component(model_dir: Path, config: Any, spec: ComponentSpec, onnx_files: tuple[str, ...],
                     dtype_name) -> list[str]:
    problems = []
    if config.platform not in ("onnxruntime_onnx", "tensorrt_plan"):
        problems.append(f"platform {config.platform!r}, expected onnxruntime_onnx or tensorrt_plan")
    batched = config.max_batch_size > 0
    if batched:
        lo, _, hi = spec.ranges.get("batch", (0, 0, 0))
        if not lo <= config.max_batch_size <= hi:
            problems.append(f"max_batch_size {config.max_batch_size} outside the batch range [{lo}, {hi}]")
    for kind, tensors, declared in (("input", spec.inputs, config.input),
                                    ("output", spec.outputs, config.output)):
        names = [t.name for t in declared]
        if names != [t.name for t in tensors]:
            problems.append(f"{kind}s {names}, manifest {[t.name for t in tensors]}")
            continue
        for tensor, triton in zip(tensors, declared):
            problems += [f"{kind} {tensor.name}: {p}" for p in _check_tensor(tensor, triton, batched, dtype_name)]
    version = model_dir / VERSION
    files = list(config.cc_model_filenames.values())
    if config.default_model_filename:
        files.append(config.default_model_filename)
    if not files:
        problems.append("no default_model_filename or cc_model_filenames")
    for file in files:
        if not (version / file).is_file():
            problems.append(f"model file {VERSION}/{file} is missing")
    if config.platform == "onnxruntime_onnx":
        for file in onnx_files:   # external data must sit next to the graph
            if not (version / file).is_file():
                problems.append(f"{VERSION}/{file} (a file of the ONNX graph) is missing")
        if config.default_model_filename != onnx_files[0]:
            problems.append(f"default_model_filename {config.default_model_filename!r}, expected {onnx_files[0]!r}")
    for cc in config.cc_model_filenames:
        major, _, minor = cc.partition(".")
        if not (major.isdigit() and minor.isdigit()):
            problems.append(f"cc_model_filenames key {cc!r} is not a compute capability such as 9.0")
    return problems


def _check_tensor(tensor: TensorSpec, triton: Any, batched: bool, dtype_name) -> list[str]:
    problems = []
    expected_type = _NUMPY_TO_TRITON.get(tensor.dtype, f"<no Triton type for {tensor.dtype}>")
    if dtype_name(triton.data_type) != expected_type:
        problems.append(f"data_type {dtype_name(triton.data_type)}, manifest {tensor.dtype} ({expected_type})")
    shape = list(tensor.shape)
    if batched:
        if not shape or parse_dim(shape[0]) != (1, "batch"):
            return problems + [f"model is batched but the manifest shape {shape} does not start with batch"]
        shape = shape[1:]
    dims = list(triton.dims)
    if not shape:   # [batch] alone: dims [1] reshaped to []
        if dims != [1] or not triton.HasField("reshape") or list(triton.reshape.shape):
            problems.append(f"dims {dims}: a [batch] tensor needs dims [1] and reshape {{ shape: [] }}")
        return problems
    if len(dims) != len(shape):
        return problems + [f"dims {dims}, manifest {shape} (batch axis {'left out' if batched else 'kept'})"]
    for axis, (dim, size) in enumerate(zip(shape, dims)):
        factor, symbol = parse_dim(dim)
        ok = size == factor if symbol is None else size == -1 or (size > 0 and size % factor == 0)
        if not ok:
            problems.append(f"axis {axis}: dims {dims}, manifest {shape}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m ldmrt.triton.check REPO\n")
        return 2
    report = check_repository(args[0])
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
