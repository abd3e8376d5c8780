"""safetensors without torch: the bound-checked header (every weight reader starts here) and small
files' floating-point tensors as float32 numpy arrays (LoRA adapters, for the torch-free runtime).

numpy has no bfloat16: BF16 tensors are widened bit-exactly (the 16 bits become the high half of a
float32). Every failure is a CheckpointError naming the file and, where it is one, the tensor.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ldmrt.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
MAX_HEADER_BYTES = 100 * 1024 * 1024   # safetensors' own limit

# Bytes per element of every safetensors dtype.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}     # BF16: widened by hand
_ZIP_MAGIC = b"PK\x03\x04"


def safetensors_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(tensor name -> {dtype, shape, data_offsets}, __metadata__) after checking every bound."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated or empty ({size} bytes); a safetensors file "
                                  f"starts with an 8-byte header length")
        if prefix[:4] == _ZIP_MAGIC:
            raise CheckpointError(f"{path}: this is a PyTorch zip checkpoint, not safetensors; "
                                  f"rename it to .ckpt (it is then read with weights_only=True)")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8 or length > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: corrupt or truncated: the header length {length} bytes "
                                  f"runs past the end of the {size}-byte file")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header (not UTF-8 JSON: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: expected a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ is not an object")
    data_size = size - 8 - length
    for name, entry in header.items():
        _check_entry(path, name, entry, data_size)
    return header, {str(k): str(v) for k, v in metadata.items()}


def _check_entry(path: Path, name: str, entry: Any, data_size: int) -> None:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(f"{where}: corrupt header entry (expected dtype, shape, data_offsets)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPE_BYTES:
        raise CheckpointError(f"{where}: unsupported dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: corrupt shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: corrupt data_offsets {offsets!r}")
    if offsets[1] > data_size:
        raise CheckpointError(f"{where}: data ends at byte {offsets[1]} of the data section, which has "
                              f"only {data_size} bytes; the file is truncated")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * _DTYPE_BYTES[dtype]:
        raise CheckpointError(f"{where}: {offsets[1] - offsets[0]} data bytes do not hold a {dtype} "
                              f"tensor of shape {shape}")


def read_float32(path: Path, max_bytes: int = 4 << 30) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensor name -> float32 array, __metadata__) of a safetensors file of floating-point tensors
    (F64, F32, F16, BF16); CheckpointError naming a tensor of another dtype, or a file over
    `max_bytes` (the whole file is read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: expected a weight file, found "
                              f"{'a folder' if path.is_dir() else 'nothing'} there")
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(f"{path}: {size} bytes; expected at most {max_bytes} for this kind of file")
    header, metadata = safetensors_header(path)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    data = memoryview(raw)[8 + length:]
    tensors = {}
    for name, entry in header.items():
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        chunk = data[begin:end]
        if dtype == "BF16":
            array = (np.frombuffer(chunk, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in _FLOAT_DTYPES:
            array = np.frombuffer(chunk, _FLOAT_DTYPES[dtype]).astype(np.float32)
        else:
            raise CheckpointError(f"{path}: tensor {name!r}: dtype {dtype}; expected a floating-point "
                                  f"tensor (F32, F16, BF16 or F64)")
        tensors[name] = array.reshape(shape)
    return tensors, metadata
