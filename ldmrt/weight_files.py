"""Reading weight files without running code: safetensors (bound-checked header) and torch pickles
read only with `torch.load(weights_only=True)`. Every failure is a CheckpointError naming the file.
"""
from __future__ import annotations

import json
import pickletools
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldmrt.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = SAFETENSORS_SUFFIXES + (".ckpt", ".pt", ".pth")
MAX_HEADER_BYTES = 100 * 1024 * 1024   # safetensors' own limit

# Bytes per element of every safetensors dtype.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class WeightFile:
    """The tensors of one file, plus what else it held (Lightning's epoch, global_step, ...)."""
    path: Path
    format: str                                   # "safetensors" | "torch-zip" | "torch-legacy"
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)   # safetensors __metadata__
    extras: dict[str, str] = field(default_factory=dict)     # non-tensor entries, summarized


def read_weights(path: Path) -> WeightFile:
    """All tensors of a .safetensors or torch (.ckpt/.pt/.pth/.bin) file, on the CPU."""
    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "nothing"
        raise CheckpointError(f"{path}: expected a weight file, found {what} there")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _read_torch(path)
    raise CheckpointError(f"{path}: unknown weight file extension {suffix!r}; expected one of "
                          f"{list(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}")


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


def _read_safetensors(path: Path) -> WeightFile:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _, metadata = safetensors_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from None
    return WeightFile(path, "safetensors", dict(tensors), metadata)


def _safe_numpy_globals() -> list[Any]:
    """numpy scalars (e.g. a Lightning `global_step`) hold only data: allow them, nothing else."""
    try:
        import numpy as np
        import numpy.dtypes as dtypes
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    scalar = np.core.multiarray.scalar if not hasattr(np, "_core") else np._core.multiarray.scalar
    names = ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
             "Float16", "Float32", "Float64", "Byte", "UByte", "Short", "UShort", "Int", "UInt",
             "Long", "ULong", "LongLong", "ULongLong")
    # numpy 1 pickles name numpy.core.multiarray.scalar, numpy 2 pickles numpy._core.multiarray.scalar
    allowed: list[Any] = [(scalar, "numpy.core.multiarray.scalar"),
                          (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    allowed += [getattr(dtypes, f"{n}DType") for n in names if hasattr(dtypes, f"{n}DType")]
    return allowed


def _read_torch(path: Path) -> WeightFile:
    with path.open("rb") as f:
        magic = f.read(4)
    is_zip = magic == _ZIP_MAGIC
    if is_zip and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: corrupt or truncated zip checkpoint (no central directory); "
                              f"download or copy the file again")
    try:
        with torch.serialization.safe_globals(_safe_numpy_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")   # torch's aside, not ours
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise _torch_load_error(path, exc, is_zip) from None
    return _weights_from_object(path, "torch-zip" if is_zip else "torch-legacy", obj)


def _torch_load_error(path: Path, exc: Exception, is_zip: bool) -> CheckpointError:
    message = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", message)
    imports = [found.group(1)] if found else ([] if is_zip else _pickle_imports(path))
    if imports:
        return CheckpointError(
            f"{path}: refused: the pickle imports {', '.join(imports[:5])}, which could run code "
            f"when loaded. ldmrt reads .ckpt files only with torch.load(weights_only=True). If you "
            f"trust the file, convert it to .safetensors in a sandbox; otherwise do not use it")
    if "central directory" in message or "zip archive" in message or isinstance(exc, EOFError):
        return CheckpointError(f"{path}: corrupt or truncated checkpoint ({_first_line(message)})")
    return CheckpointError(f"{path}: corrupt, or not a PyTorch checkpoint ({type(exc).__name__}: "
                           f"{_first_line(message)})")


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    useful = [line for line in lines if line.startswith("Unsupported")]
    return (useful or lines or ["no details"])[0][:300]


def _pickle_imports(path: Path, limit: int = 1 << 20) -> list[str]:
    """Modules/names a raw pickle would import, found by parsing opcodes (never executing them)."""
    imports, strings = [], []
    try:
        with path.open("rb") as f:
            for opcode, arg, _ in pickletools.genops(f.read(limit)):
                if opcode.name in ("GLOBAL", "INST"):
                    imports.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    imports.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - garbage is reported by the caller; stop at the first bad opcode
        pass
    return imports


def _weights_from_object(path: Path, fmt: str, obj: Any) -> WeightFile:
    """Unwrap Lightning's {"state_dict": ...}; keep non-tensor entries only as summaries."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        outer, obj = obj, obj["state_dict"]
        extras = {str(k): _summary(v) for k, v in outer.items() if k != "state_dict"}
    else:
        extras = {}
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found a "
                              f"{type(obj).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value
        else:
            extras[str(key)] = _summary(value)
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (top-level entries: {sorted(extras)[:8]})")
    return WeightFile(path, fmt, tensors, extras=extras)


def _summary(value: Any) -> str:
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()   # a numpy scalar
    if isinstance(value, (int, float, str, bool)) or value is None:
        return repr(value)[:80]
    if isinstance(value, (dict, list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__
