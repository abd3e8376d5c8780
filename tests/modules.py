"""Loading a Python file that is not an importable module (a script, a benchmark, a Triton model
ldmrt generated) as a module, for tests."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_file(path: Path, name: str) -> ModuleType:
    """The file at `path` executed as module `name`; registered in sys.modules first, as an import
    would (dataclasses look their module up there while a class is built)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
