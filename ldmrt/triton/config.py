"""Triton model configurations (config.pbtxt) derived from a component's I/O spec.

Torch-free and protobuf-free: the text is written here; `ldmrt.triton.check` parses it with
Triton's own protobuf. Mapping rules (the spec is the single source):

- A component whose every tensor starts with the `batch` symbol is batched: max_batch_size is
  the top of the batch range and `dims` leave the batch axis out. A tensor that is only
  [batch] (the UNet's `timestep`) becomes dims [1] with `reshape { shape: [] }`.
- A symbolic dimension is -1; a symbol that an engine profile pins to one value is that value.
- dtypes map by numpy name: float32 -> TYPE_FP32, float16 -> TYPE_FP16, int32 -> TYPE_INT32, ...
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping

from ldmrt.errors import ConfigError
from ldmrt.iospec import ComponentSpec, TensorSpec, parse_dim

TRITON_DTYPES: Mapping[str, str] = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
    "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL", "string": "TYPE_STRING",
}
BATCH = "batch"
MAX_QUEUE_DELAY_US = 1_000_000     # dynamic batching: the longest wait for a fuller batch


class InstanceKind(str, enum.Enum):
    AUTO = "auto"      # Triton picks: GPU where the backend supports it and one is visible
    CPU = "cpu"
    GPU = "gpu"

    @property
    def triton(self) -> str:
        return f"KIND_{self.name}"


@dataclass(frozen=True)
class InstanceGroup:
    """`count` execution instances of a model (on each of `gpus` when kind is GPU)."""
    count: int = 1
    kind: InstanceKind = InstanceKind.AUTO
    gpus: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or self.count < 1:
            raise ConfigError(f"instance count {self.count!r}: expected an integer >= 1")
        if self.gpus and self.kind != InstanceKind.GPU:
            raise ConfigError(f"gpus {list(self.gpus)}: needs instance kind gpu, found {self.kind.value}",
                              field="gpus")
        if any(not isinstance(g, int) or g < 0 for g in self.gpus):
            raise ConfigError(f"gpus {list(self.gpus)}: expected device indices >= 0", field="gpus")


@dataclass(frozen=True)
class DynamicBatching:
    """Triton's dynamic batcher for batched component models."""
    enabled: bool = True
    max_queue_delay_us: int = 100
    preferred_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_queue_delay_us, bool) or not isinstance(self.max_queue_delay_us, int) \
                or not 0 <= self.max_queue_delay_us <= MAX_QUEUE_DELAY_US:
            raise ConfigError(f"max_queue_delay_us {self.max_queue_delay_us!r}: expected an integer in "
                              f"[0, {MAX_QUEUE_DELAY_US}] microseconds (at most 1 s: a request waiting "
                              f"longer for a fuller batch has waited longer than it runs)",
                              field="max_queue_delay_us")
        if any(size < 1 for size in self.preferred_batch_sizes):
            raise ConfigError(f"preferred_batch_sizes {list(self.preferred_batch_sizes)}: expected sizes >= 1",
                              field="preferred_batch_sizes")


@dataclass(frozen=True)
class TritonTensor:
    name: str
    data_type: str                     # TYPE_FP32, ...
    dims: tuple[int, ...]              # without the batch axis when the model is batched
    reshape: tuple[int, ...] | None = None
    optional: bool = False


@dataclass(frozen=True)
class TritonModelConfig:
    """One model's config.pbtxt: a platform (tensorrt_plan, onnxruntime_onnx) or a backend (python)."""
    name: str
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]
    max_batch_size: int = 0
    platform: str | None = None
    backend: str | None = None
    instance_group: InstanceGroup = InstanceGroup()
    dynamic_batching: DynamicBatching | None = None
    default_model_filename: str | None = None
    cc_model_filenames: Mapping[str, str] = field(default_factory=dict)   # "9.0" -> file
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.platform is None) == (self.backend is None):
            raise ConfigError(f"model {self.name}: expected exactly one of platform and backend")
        if self.dynamic_batching is not None and self.dynamic_batching.enabled and self.max_batch_size < 1:
            raise ConfigError(f"model {self.name}: dynamic batching needs a batched model "
                              f"(max_batch_size >= 1), found max_batch_size {self.max_batch_size}")
        for size in self.dynamic_batching.preferred_batch_sizes if self.dynamic_batching else ():
            if size > self.max_batch_size:
                raise ConfigError(f"model {self.name}: preferred batch size {size} exceeds "
                                  f"max_batch_size {self.max_batch_size}")

    def to_pbtxt(self) -> str:
        """The model configuration in protobuf text format (model_config.proto's ModelConfig)."""
        lines = [f"name: {_quote(self.name)}"]
        if self.platform is not None:
            lines.append(f"platform: {_quote(self.platform)}")
        if self.backend is not None:
            lines.append(f"backend: {_quote(self.backend)}")
        lines.append(f"max_batch_size: {self.max_batch_size}")
        if self.default_model_filename is not None:
            lines.append(f"default_model_filename: {_quote(self.default_model_filename)}")
        lines += _tensors("input", self.inputs)
        lines += _tensors("output", self.outputs)
        group = self.instance_group
        gpus = f" gpus: {_list(group.gpus)}" if group.gpus else ""
        lines.append(f"instance_group [ {{ count: {group.count} kind: {group.kind.triton}{gpus} }} ]")
        batching = self.dynamic_batching
        if batching is not None and batching.enabled:
            lines.append("dynamic_batching {")
            if batching.preferred_batch_sizes:
                lines.append(f"  preferred_batch_size: {_list(batching.preferred_batch_sizes)}")
            lines.append(f"  max_queue_delay_microseconds: {batching.max_queue_delay_us}")
            lines.append("}")
        if self.cc_model_filenames:
            entries = ", ".join(f"{{ key: {_quote(k)} value: {_quote(v)} }}"
                                for k, v in sorted(self.cc_model_filenames.items()))
            lines.append(f"cc_model_filenames [ {entries} ]")
        if self.parameters:
            lines.append("parameters [")
            items = sorted(self.parameters.items())
            for i, (key, value) in enumerate(items):
                comma = "," if i < len(items) - 1 else ""
                lines.append(f"  {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}{comma}")
            lines.append("]")
        return "\n".join(lines) + "\n"


# --- from the I/O spec --------------------------------------------------------------------------

def triton_dtype(dtype: str) -> str:
    try:
        return TRITON_DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"dtype {dtype!r} has no Triton data type; expected one of "
                          f"{sorted(TRITON_DTYPES)}") from None


def is_batched(spec: ComponentSpec, fixed: Mapping[str, int] = {}) -> bool:
    """True when every tensor's first axis is exactly the (unpinned) `batch` symbol."""
    if BATCH in fixed:
        return False
    return all(tensor.shape and parse_dim(tensor.shape[0]) == (1, BATCH)
               for tensor in spec.inputs + spec.outputs)


def tensor_dims(tensor: TensorSpec, batched: bool, fixed: Mapping[str, int] = {}) -> tuple[int, ...]:
    """Triton dims of one tensor: -1 for a free symbol, k*value for a pinned one."""
    dims = []
    for dim in tensor.shape[1:] if batched else tensor.shape:
        factor, symbol = parse_dim(dim)
        dims.append(factor if symbol is None else factor * fixed[symbol] if symbol in fixed else -1)
    return tuple(dims)


def component_tensors(spec: ComponentSpec, fixed: Mapping[str, int] = {}
                      ) -> tuple[bool, tuple[TritonTensor, ...], tuple[TritonTensor, ...]]:
    """(batched, inputs, outputs) of a component model; `fixed` pins symbols (static engines)."""
    batched = is_batched(spec, fixed)

    def convert(tensor: TensorSpec) -> TritonTensor:
        dims = tensor_dims(tensor, batched, fixed)
        if batched and not dims:
            # [batch] alone: Triton needs a non-empty shape, so each request row is [1] -> [].
            return TritonTensor(tensor.name, triton_dtype(tensor.dtype), (1,), reshape=())
        return TritonTensor(tensor.name, triton_dtype(tensor.dtype), dims)

    return batched, tuple(map(convert, spec.inputs)), tuple(map(convert, spec.outputs))


# --- text format ---------------------------------------------------------------------------------

def _tensors(kind: str, tensors: tuple[TritonTensor, ...]) -> list[str]:
    lines = [f"{kind} ["]
    for i, tensor in enumerate(tensors):
        parts = [f"name: {_quote(tensor.name)}", f"data_type: {tensor.data_type}",
                 f"dims: {_list(tensor.dims)}"]
        if tensor.reshape is not None:
            parts.append(f"reshape: {{ shape: {_list(tensor.reshape)} }}")
        if tensor.optional:
            parts.append("optional: true")
        comma = "," if i < len(tensors) - 1 else ""
        lines.append(f"  {{ {' '.join(parts)} }}{comma}")
    lines.append("]")
    return lines


def _list(values) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]" if values else "[ ]"


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\{ord(char):03o}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
