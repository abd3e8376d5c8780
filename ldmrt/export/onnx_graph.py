"""torch module -> ONNX file: trace with the spec's dynamic axes, fold constants, check, save."""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import onnx
import torch

from ldmrt.errors import ExportError
from ldmrt.iospec import ComponentSpec

log = logging.getLogger(__name__)

# The protobuf limit; graphs above it keep their weights in `<file>.data`.
PROTOBUF_LIMIT = 2**31 - 1
MIN_OPSET = 18


def export_graph(module: torch.nn.Module, spec: ComponentSpec, inputs: tuple[torch.Tensor, ...],
                 path: Path, opset: int, optimize: bool = True) -> Path:
    """Write `module` as `path` (plus `path.data` when over 2 GB) and return `path`.

    `path`'s folder must be private to this export: the tracer may drop per-tensor files
    there for big graphs, which are removed once the graph is re-saved.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset}: expected >= {MIN_OPSET} (LayerNormalization, GroupNormalization)",
                          field="opset")
    raw = path.with_suffix(".raw.onnx")
    scratch = path.parent / f"{path.stem}.trace"
    scratch.mkdir(exist_ok=True)
    raw = scratch / raw.name
    try:
        with torch.no_grad(), _quiet_tracer():
            torch.onnx.export(module, inputs, str(raw), dynamo=False, opset_version=opset,
                              input_names=[t.name for t in spec.inputs],
                              output_names=[t.name for t in spec.outputs],
                              dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)
    except Exception as exc:  # the tracer raises many kinds; keep the cause visible
        raise ExportError(f"{spec.name}: torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    model = onnx.load(str(raw), load_external_data=True)
    if optimize:
        model = _optimize(model, spec.name)
    _name_symbolic_dims(model, spec)
    save_graph(model, path)
    for leftover in scratch.iterdir():
        leftover.unlink()
    scratch.rmdir()
    check_graph(path, spec)
    return path


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Save, moving weights to `<name>.data` when the graph would exceed the protobuf limit."""
    external = model.ByteSize() > PROTOBUF_LIMIT - (64 << 20) if _fits_bytesize(model) else True
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        data.chmod(0o644)   # onnx writes it 0600; servers (Triton containers) run as other users
    else:
        onnx.save_model(model, str(path))


def check_graph(path: Path, spec: ComponentSpec) -> None:
    """onnx.checker full check, and the graph's I/O names match the spec."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"{spec.name}: onnx.checker rejected {path.name}: {exc}") from exc
    model = onnx.load(str(path), load_external_data=False)
    names = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    expected = ([t.name for t in spec.inputs], [t.name for t in spec.outputs])
    if names != expected:
        raise ExportError(f"{spec.name}: graph I/O {names} differ from the spec {expected}")


def _optimize(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """Constant folding and dead-node cleanup (onnxscript's optimizer), keeping the I/O."""
    try:
        import onnxscript.optimizer
    except ImportError:
        log.warning("%s: onnxscript not installed; skipping constant folding", name)
        return model
    before = len(model.graph.node)
    optimized = onnxscript.optimizer.optimize(model)
    log.info("%s: constant folding %d -> %d nodes", name, before, len(optimized.graph.node))
    return optimized


def _name_symbolic_dims(model: onnx.ModelProto, spec: ComponentSpec) -> None:
    """Make every I/O dim carry the spec's symbol (exporters invent names for derived dims)."""
    tensors = {t.name: t for t in spec.inputs + spec.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        declared = tensors[value.name]
        for dim, want in zip(value.type.tensor_type.shape.dim, declared.shape):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want


def _fits_bytesize(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages over 2 GB in some versions
        return False


@contextlib.contextmanager
def _quiet_tracer():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*[Cc]onstant folding.*")
        yield
