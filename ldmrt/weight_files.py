"""Reading weight files without running code: safetensors (bound-checked header) and torch pickles
read only with `torch.load(weights_only=True)`. Every failure is a CheckpointError naming the file.
"""
from __future__ import annotations

import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldmrt.errors import CheckpointError
from ldmrt.safetensors_file import SAFETENSORS_SUFFIXES, safetensors_header

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = SAFETENSORS_SUFFIXES + (".ckpt", ".pt", ".pth")
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
