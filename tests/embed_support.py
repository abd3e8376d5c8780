"""What the C ABI tests share: libldmrt built once per session, programs compiled against it, the
digits bundle exported once, and `ldmrt generate`'s own PNG to compare with."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PROBES = Path(__file__).resolve().parent / "embed"
LDMRT = str(Path(sys.executable).with_name("ldmrt"))
PROMPT = "a red 7 on a white background"

needs_compilers = pytest.mark.skipif(shutil.which("cc") is None or shutil.which("c++") is None,
                                     reason="no C/C++ compiler on this machine")


def run(command, *, timeout: float = 300, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"{command} exited {done.returncode}:\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done


def build_library(folder: Path, *, extra: tuple[str, ...] = ("-Werror",)) -> Path:
    from ldmrt.embed.info import build_library as build
    return build(folder, extra=extra)


def compile_program(source: Path, output: Path, library_dir: Path, *, cplusplus: bool | None = None,
                    extra: tuple[str, ...] = ()) -> Path:
    """One C (.c) or C++ (.cpp) file linked with -lldmrt, warnings as errors."""
    from ldmrt.embed.info import cflags, libs

    cplusplus = source.suffix == ".cpp" if cplusplus is None else cplusplus
    compiler = ["c++", "-std=c++17"] if cplusplus else ["cc", "-std=c99"]
    run([*compiler, "-Wall", "-Wextra", "-Werror", "-g", *extra, *cflags(), str(source), "-o", str(output),
         *libs(library_dir)])
    return output


def export_digits(folder: Path) -> Path:
    run([LDMRT, "export", "digits", "--out", folder, "--force"], timeout=600)
    return folder


def cli_png(bundle: Path, out: Path, *extra) -> bytes:
    """`ldmrt generate BUNDLE --prompt PROMPT --out OUT` and the file it wrote."""
    run([LDMRT, "generate", bundle, "--prompt", PROMPT, "--out", out, *extra])
    return out.read_bytes()


def clean_environment(**changes: str | None) -> dict[str, str]:
    """os.environ without the variables that would steer an embedded interpreter, plus `changes`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "LDMRT_VENV")}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env
