"""`ldmrt embed`: the C ABI (ldmrt.h): build libldmrt, print where it is and the flags to use it."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from ldmrt.commands.terminal import console, out, user_errors


def embed(
    build: bool = typer.Option(False, "--build", help="Compile libldmrt.so (hosting this interpreter's ldmrt) "
                                                      "and its ldmrt.pc into --lib-dir."),
    lib_dir: Optional[Path] = typer.Option(None, "--lib-dir", help="Folder of libldmrt.so and ldmrt.pc (default: "
                                                                   "the venv's lib/ldmrt-embed)."),
    compiler: str = typer.Option("cc", help="--build: the C compiler (C11)."),
    force: bool = typer.Option(False, "--force", help="--build: replace libldmrt.so / ldmrt.pc even when "
                                                      "another tool wrote them."),
    cflags: bool = typer.Option(False, "--cflags", help="Print only the compile flags."),
    libs: bool = typer.Option(False, "--libs", help="Print only the link flags."),
    cmake_dir: bool = typer.Option(False, "--cmake-dir", help="Print only the folder to add_subdirectory() "
                                                              "from CMake."),
    pkg_config_path: bool = typer.Option(False, "--pkg-config-path", help="Print only the folder holding "
                                                                          "ldmrt.pc (PKG_CONFIG_PATH)."),
) -> None:
    """Embed the runtime in C/C++: where ldmrt.h and libldmrt are, the flags to build with (--build compiles it)."""
    with user_errors():
        from ldmrt.embed import info

        folder = lib_dir if lib_dir is not None else info.default_library_dir()
        if build:
            with console.status("compiling libldmrt"):
                library = info.build_library(folder, compiler=compiler, force=force)
            console.print(f"wrote {library} and {library.with_name(info.PKG_CONFIG_NAME)}; build programs with "
                          f"$(ldmrt embed --cflags --libs{'' if lib_dir is None else f' --lib-dir {lib_dir}'})")
            return
        if cmake_dir or pkg_config_path:
            out.print(str(info.EMBED_DIR if cmake_dir else folder), highlight=False, soft_wrap=True)
            return
        if cflags or libs:
            flags = (info.cflags() if cflags else []) + (info.libs(folder) if libs else [])
            out.print(shlex.join(flags), highlight=False, soft_wrap=True)
            return
        from ldmrt.manifest import LDMRT_VERSION

        python = info.PythonLink.here()
        library = folder / info.LIBRARY_NAME
        rows = (("ldmrt", f"{LDMRT_VERSION}, C ABI {info.abi_version()}"),
                ("header", str(info.INCLUDE_DIR / "ldmrt.h") + "  (C++: ldmrt.hpp)"),
                ("library", f"{library}" + ("" if library.is_file() else "  (not built: ldmrt embed --build)")),
                ("python", f"{python.version}, lib{python.library}.so in {python.library_dir}"),
                ("venv", info.venv() or "(none: the interpreter's own paths)"),
                ("cflags", shlex.join(info.cflags())),
                ("libs", shlex.join(info.libs(folder))),
                ("pkg-config", f"PKG_CONFIG_PATH={folder} pkg-config --cflags --libs ldmrt"),
                ("cmake", f"add_subdirectory({info.EMBED_DIR} ldmrt)  then  target_link_libraries(app ldmrt::ldmrt)"))
        for name, value in rows:
            out.print(f"{name:<11} {value}", highlight=False, soft_wrap=True)
