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
    model = onnx.load(str(raw), load_external_data=False)
    if _has_external_data(model):
        # Over 2 GB (SDXL's UNet: 10 GB in fp32): the weights are never all in memory at once.
        # The tracer's per-tensor files are copied one by one into <file>.data; the tracer has
        # already folded constants, the onnxscript pass (which loads every weight) is skipped.
        _name_symbolic_dims(model, spec)
        stream_external_data(model, raw.parent, path)
    else:
        onnx.load_external_data_for_model(model, str(raw.parent))
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


def stream_external_data(model: onnx.ModelProto, source: Path, path: Path) -> None:
    """Save `model`'s structure as `path` and every external tensor (files under `source`) into
    one `<name>.data` beside it, a tensor at a time (memory: the largest tensor), 64-byte aligned."""
    data = path.with_name(path.name + ".data")
    with open(data, "wb") as out:
        for tensor in _external_tensors(model):
            fields = {kv.key: kv.value for kv in tensor.external_data}
            offset, length = int(fields.get("offset", 0)), fields.get("length")
            with open(source / fields["location"], "rb") as file:
                file.seek(offset)
                payload = file.read(int(length)) if length is not None else file.read()
            out.seek((out.tell() + 63) // 64 * 64)
            start = out.tell()
            out.write(payload)
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", str(start)), ("length", str(len(payload)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    data.chmod(0o644)
    onnx.save_model(model, str(path))


def _external_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return [t for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]


def _has_external_data(model: onnx.ModelProto) -> bool:
    return bool(_external_tensors(model))


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
