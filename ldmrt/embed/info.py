"""Where libldmrt's sources are, how to build it against this interpreter, and the flags a C or
C++ program compiles and links with (`ldmrt embed`, `ldmrt embed --build`).

The library embeds the Python that runs this module (its libpython, found through an rpath) and
remembers the virtual environment it was built from, so a program linked with -lldmrt finds
ldmrt without any option. CMake builds the same sources (ldmrt/embed/CMakeLists.txt).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ldmrt.atomic import atomic_write
from ldmrt.digest import sha256_file
from ldmrt.errors import BundleError, EmbedError
from ldmrt.writable import check_folder_writable

EMBED_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = EMBED_DIR / "include"
SOURCE_DIR = EMBED_DIR / "src"
LIBRARY_NAME = "libldmrt.so"
PKG_CONFIG_NAME = "ldmrt.pc"
RECORD_NAME = "ldmrt-embed.json"      # what `ldmrt embed --build` wrote in a folder (name -> sha256s)
RECORD_KIND = "ldmrt-embed"


@dataclass(frozen=True)
class PythonLink:
    """This interpreter's headers and shared libpython, as libldmrt compiles and links them."""
    version: str          # "3.11"
    include_dir: Path
    library_dir: Path
    library: str          # "python3.11"

    @classmethod
    def here(cls) -> "PythonLink":
        version = sysconfig.get_python_version()
        include = Path(sysconfig.get_paths()["include"])
        library_dir = Path(sysconfig.get_config_var("LIBDIR") or "")
        name = f"libpython{version}{sys.abiflags}.so"
        if not (include / "Python.h").is_file():
            raise EmbedError(f"Python {version}: no Python.h in {include}; install this interpreter's "
                             f"development headers (Debian: apt install python{version}-dev)")
        if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not (library_dir / name).exists():
            raise EmbedError(f"Python {version} at {sys.base_prefix}: no shared {name} in {library_dir}; "
                             f"libldmrt embeds a shared libpython (build Python with --enable-shared, or use "
                             f"the distribution's python{version})")
        return cls(version, include, library_dir, f"python{version}{sys.abiflags}")


def abi_version() -> int:
    """LDMRT_ABI_VERSION, read from ldmrt.h (the one place it is written)."""
    found = re.search(r"^#define LDMRT_ABI_VERSION (\d+)$", (INCLUDE_DIR / "ldmrt.h").read_text(), re.MULTILINE)
    if found is None:
        raise EmbedError(f"{INCLUDE_DIR / 'ldmrt.h'}: no LDMRT_ABI_VERSION; the installation is broken")
    return int(found.group(1))


def venv() -> str:
    """The virtual environment this interpreter runs in; "" outside one."""
    return sys.prefix if sys.prefix != sys.base_prefix else ""


def default_library_dir() -> Path:
    """Where `ldmrt embed --build` puts libldmrt by default: the venv's lib/ldmrt-embed (a user cache outside one)."""
    if venv():
        return Path(sys.prefix) / "lib" / "ldmrt-embed"
    return Path.home() / ".cache" / "ldmrt" / "embed" / f"python{sysconfig.get_python_version()}"


def cflags() -> list[str]:
    return [f"-I{INCLUDE_DIR}"]


def libs(library_dir: Path) -> list[str]:
    library_dir = Path(library_dir).resolve()
    return [f"-L{library_dir}", f"-Wl,-rpath,{library_dir}", "-lldmrt", "-pthread"]


def pkg_config(library_dir: Path) -> str:
    """ldmrt.pc for `pkg-config --cflags --libs ldmrt` (PKG_CONFIG_PATH=<library_dir>)."""
    from ldmrt.manifest import LDMRT_VERSION

    return (f"# written by ldmrt embed --build\n"
            f"Name: ldmrt\nDescription: C ABI of the ldmrt lean runtime (ldmrt.h)\nVersion: {LDMRT_VERSION}\n"
            f"Cflags: {' '.join(shlex.quote(f) for f in cflags())}\n"
            f"Libs: {' '.join(shlex.quote(f) for f in libs(library_dir))}\n")


def compile_command(output: Path, *, compiler: str = "cc", extra: tuple[str, ...] = ()) -> list[str]:
    """The one compiler call that builds libldmrt.so at `output`."""
    from ldmrt.manifest import LDMRT_VERSION

    python = PythonLink.here()
    sources = sorted(str(p) for p in SOURCE_DIR.glob("*.c"))
    return [compiler, "-std=c11", "-O2", "-g", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Wextra",
            f"-I{INCLUDE_DIR}", f"-I{SOURCE_DIR}", f"-I{python.include_dir}",
            f'-DLDMRT_VERSION="{LDMRT_VERSION}"', f'-DLDMRT_DEFAULT_VENV="{_c_string(venv())}"',
            *extra, *sources, "-o", str(output),
            f"-L{python.library_dir}", f"-Wl,-rpath,{python.library_dir}", f"-l{python.library}", "-pthread"]


def _c_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def build_library(library_dir: Path | None = None, *, compiler: str = "cc", extra: tuple[str, ...] = (),
                  force: bool = False) -> Path:
    """Compile libldmrt.so (and write ldmrt.pc) into `library_dir`; replaces only files an earlier
    `ldmrt embed --build` wrote (its ldmrt-embed.json record), unless `force`. Atomic: a failed build
    leaves the folder as it was. Returns the library's path."""
    folder = Path(library_dir) if library_dir is not None else default_library_dir()
    check_folder_writable(folder, f"out {folder}", EmbedError, field="out")
    record = _read_record(folder)
    if os.path.lexists(folder / RECORD_NAME) and record is None and not force:
        raise EmbedError(f"out {folder}: {RECORD_NAME} there is not ldmrt embed --build's record; remove it or "
                         f"pass --force", field="out")
    record = record or {}
    for name in (LIBRARY_NAME, PKG_CONFIG_NAME, RECORD_NAME):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            raise EmbedError(f"out {folder}: {name} there is a folder; expected ldmrt embed --build's file (ldmrt "
                             f"never deletes a folder it did not write, even with --force)", field="out")
    for name in (LIBRARY_NAME, PKG_CONFIG_NAME):
        path = folder / name
        if os.path.lexists(path) and not force and _sha256(path) not in record.get(name, ()):
            raise EmbedError(f"out {folder}: {name} there was not written by ldmrt embed --build (or was changed "
                             f"since); remove it or pass --force", field="out")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".ldmrt-embed-") as temp:
        built = Path(temp) / LIBRARY_NAME
        command = compile_command(built, compiler=compiler, extra=extra)
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except OSError as exc:
            raise EmbedError(f"compiler {compiler}: cannot run it ({exc}); install gcc or pass --compiler") from None
        if done.returncode != 0:
            raise EmbedError(f"compiling libldmrt failed (exit {done.returncode}):\n{shlex.join(command)}\n"
                             f"{done.stderr.strip()}")
        pc = Path(temp) / PKG_CONFIG_NAME
        pc.write_text(pkg_config(folder))
        written = {LIBRARY_NAME: _sha256(built), PKG_CONFIG_NAME: _sha256(pc)}
        # The record names the old and the new files while they are swapped, so a build killed between
        # the two renames leaves files the next build still knows as its own.
        _write_record(folder, {name: sorted({*record.get(name, ()), digest}) for name, digest in written.items()})
        os.replace(built, folder / LIBRARY_NAME)
        os.replace(pc, folder / PKG_CONFIG_NAME)
    _write_record(folder, {name: [digest] for name, digest in written.items()})
    return folder / LIBRARY_NAME


def _read_record(folder: Path) -> dict[str, set[str]] | None:
    """name -> the sha256s `ldmrt embed --build` wrote in `folder`; {} without a record, None for a file of
    that name that is not one."""
    path = folder / RECORD_NAME
    if not os.path.lexists(path):
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("kind") == RECORD_KIND else None
    if not isinstance(files, dict):
        return None
    return {name: {d for d in (digests if isinstance(digests, list) else [digests]) if isinstance(d, str)}
            for name, digests in files.items()}


def _write_record(folder: Path, files: dict[str, list[str]]) -> None:
    atomic_write(folder / RECORD_NAME, (json.dumps({"kind": RECORD_KIND, "files": files}, indent=1) + "\n").encode())


def _sha256(path: Path) -> str:
    """The file's sha256 (ldmrt.digest's); "" for one that cannot be read (then it is not ours)."""
    try:
        return sha256_file(path)
    except BundleError:
        return ""
