"""Can ldmrt write there? Asked before any work, so a long job never ends in a traceback.

Permission bits are not enough: root ignores them, and /proc or a read-only mount refuse files
whatever the bits say. So a folder is probed by creating (and removing) a temporary file in it.
Torch-free.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ldmrt.errors import ConfigError, LdmrtError


def nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (what creating `path`'s folders starts from)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_folder_writable(folder: Path, name: str, error: type[LdmrtError] = ConfigError,
                          field: str | None = None) -> None:
    """Raise `error` (message starting with `name`) unless files can be created in `folder`, or,
    when it does not exist yet, in the nearest existing folder above it (folders are created
    from there at write time)."""
    existing = nearest_existing(Path(folder))
    if not existing.is_dir():
        raise error(f"{name}: {existing} is a file, not a folder; choose a path in a folder",
                    field=field)
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".ldmrt-probe-")
    except OSError as exc:
        raise error(f"{name}: cannot create files in {existing} ({exc.strerror or exc}); "
                    f"choose a writable folder", field=field) from None
    os.close(handle)
    os.unlink(probe)
