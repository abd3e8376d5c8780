"""Write a file whole or not at all: a temporary file in the same folder, fsync, rename.

The result gets the permissions a plain `open(path, "w")` would give (0666 minus the umask), not
mkstemp's 0600: images, engine plans and manifests are read by other users (a Triton container,
a web server). Torch-free.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write `data` (bytes, or a function writing to a binary file) to `path`; on any failure,
    including KeyboardInterrupt, the old `path` (if any) is untouched and no temporary is left."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path
