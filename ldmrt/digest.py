"""sha256 of a file: the one file hash behind every record check (manifest files, engine plans,
ORT cache entries, Triton model markers). Standard library only."""
from __future__ import annotations

import hashlib
import os

from ldmrt.errors import BundleError


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (graphs and plans can be many GB)."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as handle:
            while n := handle.readinto(buffer):
                digest.update(view[:n])
    except OSError as exc:
        raise BundleError(f"cannot hash {path}: {exc}") from None
    return digest.hexdigest()
