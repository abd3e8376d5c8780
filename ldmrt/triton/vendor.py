"""The torch-free part of ldmrt that the pipeline model needs, found by following imports.

The generated repository carries its own copy (`<pipeline>/1/ldmrt/`), so the Triton server's
Python needs no ldmrt install, and the runtime it runs is exactly the one that wrote the
repository. The set is the import closure of the runtime entry points and of the pipeline
model's request declaration (every `ldmrt.*` import, module-level or inside functions), minus
the torch backend; a test imports the copy where torch cannot be imported.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import ldmrt

PACKAGE_DIR = Path(ldmrt.__file__).resolve().parent
ENTRY_POINTS = ("ldmrt.runtime.pipeline", "ldmrt.engines.onnxruntime", "ldmrt.engines.tensorrt",
                "ldmrt.triton.pipeline_io", "ldmrt.triton.adapters")   # model.py reads its requests by them
EXCLUDED = frozenset({"ldmrt.engines.torch"})   # imports torch; a Triton stub has none


def module_file(name: str) -> Path | None:
    """The source file of module `ldmrt.x.y` (a package's __init__.py), or None."""
    parts = name.split(".")[1:]
    base = PACKAGE_DIR.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def runtime_modules(entry_points: tuple[str, ...] = ENTRY_POINTS) -> list[str]:
    """Sorted names of every ldmrt module the entry points import, with their packages."""
    seen: set[str] = set()
    todo = [name for name in entry_points if module_file(name) is not None]
    while todo:
        name = todo.pop()
        if name in seen or name in EXCLUDED:
            continue
        path = module_file(name)
        if path is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]   # parent packages
        todo += _imports(name, path)
    return sorted(seen)


def vendor_runtime(destination: Path) -> list[Path]:
    """Copy the runtime modules to destination/ldmrt/...; returns the files written."""
    written = []
    for name in runtime_modules():
        source = module_file(name)
        assert source is not None
        target = destination / source.relative_to(PACKAGE_DIR.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        written.append(target)
    return written


def _imports(name: str, path: Path) -> list[str]:
    """ldmrt modules named by the imports in one file (`from m import x` adds m and m.x)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(module)
            found += [f"{module}.{alias.name}" for alias in node.names]
    return [m for m in found if m == "ldmrt" or m.startswith("ldmrt.")]
