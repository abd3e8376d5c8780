"""Write a file or a folder whole or not at all: a temporary next to it, then a rename.

The result gets the permissions a plain `open(path, "w")` would give (0666 minus the umask), not
mkstemp's 0600: images, engine plans and manifests are read by other users (a Triton container,
a web server). Torch-free.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

log = logging.getLogger(__name__)


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


# --- whole folders: built in `.NAME.partial-PID` next to NAME, then renamed into place ------------

def work_folder(out: Path) -> Path:
    """A fresh `.NAME.partial-PID` next to `out` (leftovers of killed processes removed first)."""
    out = Path(out)
    remove_dead_leftovers(out)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def remove_dead_leftovers(out: Path) -> None:
    """Remove `.NAME.partial-PID` / `.NAME.old-PID` folders whose process is gone (killed)."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for kind in ("partial", "old"):
        for folder in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = folder.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and folder.is_dir():
                log.info("removing %s, left by a killed process", folder)
                shutil.rmtree(folder, ignore_errors=True)


def move_into_place(work: Path, out: Path) -> None:
    """Rename the finished `work` folder to `out`. An existing `out` is moved aside first, put back
    if the rename fails, and removed only once the new folder stands."""
    out = Path(out)
    if not out.exists():
        os.replace(work, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(work, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
