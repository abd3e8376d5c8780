"""Write a file or a folder whole or not at all: a temporary next to it, then a rename.

The result gets the permissions a plain `open(path, "w")` would give (0666 minus the umask), not
mkstemp's 0600: images, engine plans and manifests are read by other users (a Triton container,
a web server). Torch-free.

Folders are built in a private work folder next to the target, `.NAME.partial-PID-HOST-RANDOM`
(unique per call: threads of one process and processes on one machine never share one), then
renamed into place. Without `replace` the rename refuses an existing target atomically (Linux
renameat2 RENAME_NOREPLACE; elsewhere rename(2), which never replaces a non-empty folder), so of two
writers racing for one new folder exactly one wins. With `replace` the old folder is judged by the
caller, swapped with the new one in one step (RENAME_EXCHANGE) and judged again before it is
removed. What ldmrt wrote inside a folder is told apart from what it did not by `foreign_entries`.
"""
from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from ldmrt.errors import LdmrtError

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


# --- names of ldmrt's scratch files and folders ---------------------------------------------------

# atomic_write's temporaries: `.NAME.` + mkstemp's 8 random characters + `.tmp`.
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")
# Work folders `.NAME.partial-PID-HOST-RANDOM` and folders moved aside `.NAME.old-...`; the bare
# `-PID` form is what ldmrt wrote before the host and random parts.
_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>partial|old)-(?P<pid>[0-9]+)"
                       r"(?:-(?P<host>[0-9a-f]{8})-[0-9a-f]{8})?$")
# The host part keeps a machine from judging another one's processes on a shared folder (NFS).
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


@dataclass(frozen=True)
class _Leftover:
    target: str
    kind: str
    pid: int
    host: str | None


def _leftover(name: str) -> _Leftover | None:
    match = _LEFTOVER.match(name)
    if match is None:
        return None
    return _Leftover(match["target"], match["kind"], int(match["pid"]), match["host"])


def _fresh_folder(out: Path, kind: str) -> Path:
    while True:
        folder = out.parent / f".{out.name}.{kind}-{os.getpid()}-{_HOST}-{secrets.token_hex(4)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


# --- whole folders ----------------------------------------------------------------------------------

def work_folder(out: Path, replaceable: "Replaceable | None" = None) -> Path:
    """A fresh private `.NAME.partial-PID-HOST-RANDOM` next to `out` (created with its parents;
    leftovers of killed processes removed first: see remove_dead_leftovers)."""
    out = Path(out)
    remove_dead_leftovers(out, replaceable)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _fresh_folder(out, "partial")


def remove_dead_leftovers(out: Path, replaceable: "Replaceable | None" = None) -> None:
    """Remove the work folders of `out` whose process is gone (killed), on this machine. A
    moved-aside folder (`.NAME.old-…`, the folder a killed run replaced) is put back when its
    replacement never arrived; else it is removed only when `replaceable` approves it (the same
    check the replace made: a user may have added files in between), and kept with a warning when
    there is no such check or it refuses."""
    out = Path(out)
    try:
        names = os.listdir(out.parent)
    except OSError:
        return
    for name in names:
        leftover = _leftover(name)
        if (leftover is None or leftover.target != out.name or leftover.pid == os.getpid()
                or leftover.host not in (None, _HOST) or _alive(leftover.pid)):
            continue
        folder = out.parent / name
        if folder.is_symlink() or not folder.is_dir():
            continue
        if leftover.kind == "old" and not os.path.lexists(out):
            # Killed between moving the old folder aside and moving the new one in.
            with contextlib.suppress(OSError):
                _rename_noreplace(folder, out)
                log.warning("%s: put back, a killed process had moved it aside", out)
                continue
        if leftover.kind == "old":
            try:
                if replaceable is None:
                    raise LookupError("nothing here can tell whether it holds only what ldmrt wrote")
                replaceable(folder)
            except (LdmrtError, LookupError) as exc:
                log.warning("keeping %s, which a killed process moved aside from %s (%s); look through "
                            "it and remove it yourself", folder, out, exc)
                continue
        log.info("removing %s, left by a killed process", folder)
        shutil.rmtree(folder, ignore_errors=True)


Replaceable = Callable[[Path], None]   # raises to refuse replacing the folder it is given


def move_into_place(work: Path, out: Path, replaceable: Replaceable | None) -> None:
    """Rename the finished `work` folder to `out` (an empty folder at `out` is replaced).

    replaceable=None: never replace; FileExistsError when `out` exists, decided atomically at the
    rename, so a folder another writer put there meanwhile is never replaced.
    Otherwise an existing `out` is first given to `replaceable` (which raises to refuse), then
    swapped with `work` in one step and given to `replaceable` again: a folder that changed in
    between is swapped back and the error re-raised; only an approved old folder is removed, so
    nothing is ever replaced without the caller's own check of what it holds.
    On failure `work` is still the caller's to remove and `out` is what it was."""
    work, out = Path(work), Path(out)
    for _ in range(8):         # concurrent writers may remove or create `out` between two steps
        with contextlib.suppress(OSError):
            os.rmdir(out)      # only ever removes an empty folder
        try:
            _rename_noreplace(work, out)
            return
        except FileExistsError:
            if replaceable is None:
                raise
        replaceable(out)
        try:
            old, put_back = _swap(work, out, replaceable)
        except (FileNotFoundError, FileExistsError):
            continue
        try:
            replaceable(old)
        except BaseException:
            try:
                put_back()
            except OSError:
                _keep(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    raise FileExistsError(errno.EEXIST, "other writers kept replacing it", str(out))


def _swap(work: Path, out: Path, replaceable: Replaceable) -> tuple[Path, Callable[[], None]]:
    """Put `work` at `out`; returns where the old `out` is now and how to undo the swap.
    FileNotFoundError when `out` is gone (another writer moved it)."""
    if _renameat2(work, out, _RENAME_EXCHANGE):
        def exchange_back() -> None:
            if not _renameat2(work, out, _RENAME_EXCHANGE):
                raise OSError(errno.ENOTSUP, "renameat2 failed", str(out))
        return work, exchange_back
    # No RENAME_EXCHANGE here: move the old folder aside, then rename (a short window without `out`).
    old = _fresh_folder(out, "old")
    try:
        os.rename(out, old)    # replaces the empty `old` just made
    except BaseException:
        os.rmdir(old)
        raise
    try:
        _rename_noreplace(work, out)
    except BaseException:
        try:
            _rename_noreplace(old, out)
        except OSError:        # another writer's folder is at `out` now: the old one was to go
            if _approved(replaceable, old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                _keep(old, out)
        raise

    def move_back() -> None:
        os.rename(out, work)
        os.rename(old, out)
    return old, move_back


def _approved(replaceable: Replaceable, folder: Path) -> bool:
    try:
        replaceable(folder)
    except Exception:
        return False
    return True


def _keep(old: Path, out: Path) -> None:
    """The old folder could not be put back: keep it under a visible name, never remove it."""
    kept = out.parent / f"{out.name}.kept-{secrets.token_hex(4)}"
    with contextlib.suppress(OSError):
        os.rename(old, kept)
        old = kept
    log.error("%s: could not put the previous folder back; it is kept at %s", out, old)


# --- rename without replacing, swap ---------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2    # glibc >= 2.28, musl >= 1.2.2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """renameat2(2); False where the C library, the kernel or the filesystem lacks it."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def _rename_noreplace(source: Path, target: Path) -> None:
    """Rename, FileExistsError when `target` exists (atomically where renameat2 works; rename(2)
    elsewhere, which refuses a non-empty folder and so still never replaces a finished one)."""
    if _renameat2(source, target, _RENAME_NOREPLACE):
        return
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- what ldmrt wrote inside a folder -------------------------------------------------------------

class Ownership(enum.Enum):
    FOREIGN = "foreign"      # not ldmrt's
    WHOLE = "whole"          # a file ldmrt wrote, or a folder that is ldmrt's with all it holds
    FOLDER = "folder"        # a folder ldmrt made: what it holds is judged entry by entry


Judge = Callable[[tuple[str, ...], bool], Ownership]   # (path parts under the root, is a folder)

SCAN_LIMIT = 10_000          # entries looked at before giving up (the answer is then "too many")


def foreign_entries(root: Path, judge: Judge, limit: int = SCAN_LIMIT) -> tuple[list[str], bool]:
    """(paths under `root` that ldmrt did not write, complete): folders ldmrt did not make are
    named once ("samples/") and not looked into; atomic_write temporaries and work folders of what
    `judge` owns are ldmrt's too. Unreadable folders count as foreign, vanished ones as empty. `complete` is False when more
    than `limit` entries were looked at (the list then holds what was found so far)."""
    found: list[str] = []
    pending: list[tuple[str, ...]] = [()]
    seen = 0
    while pending:
        parent = pending.pop()
        try:
            with os.scandir(root.joinpath(*parent)) as entries:
                listing = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
        except FileNotFoundError:
            continue           # gone meanwhile (another writer replaced it): nothing there to keep
        except OSError:
            found.append("/".join(parent) + "/ (unreadable)")
            continue
        for name, is_dir in listing:
            seen += 1
            if seen > limit:
                return sorted(found), False
            parts = parent + (name,)
            verdict = judge(parts, is_dir)
            if verdict == Ownership.FOREIGN:
                verdict = _scratch(parent, name, is_dir, judge)
            if verdict == Ownership.FOLDER and is_dir:
                pending.append(parts)
            elif verdict == Ownership.FOREIGN or (verdict == Ownership.FOLDER and not is_dir):
                found.append("/".join(parts) + ("/" if is_dir else ""))
    return sorted(found), True


def _scratch(parent: tuple[str, ...], name: str, is_dir: bool, judge: Judge) -> Ownership:
    """WHOLE for an atomic_write temporary of a file `judge` owns, or a work folder of an owned one."""
    temporary = _TEMPORARY.match(name)
    if temporary is not None and not is_dir:
        if judge(parent + (temporary["target"],), False) == Ownership.WHOLE:
            return Ownership.WHOLE
    leftover = _leftover(name)
    if leftover is not None and is_dir:
        if judge(parent + (leftover.target,), True) != Ownership.FOREIGN:
            return Ownership.WHOLE
    return Ownership.FOREIGN


def describe(paths: list[str], complete: bool = True, shown: int = 5) -> str:
    """'samples/, notes.txt and 3 more (5 in all)': a few names and the count."""
    names = ", ".join(paths[:shown])
    if len(paths) > shown:
        names += f" and {len(paths) - shown} more"
    count = f"{len(paths)} in all" if complete else f"more than {SCAN_LIMIT} entries looked at"
    return f"{names} ({count})" if len(paths) > shown or not complete else names
