"""Reports on disk: strict JSON written whole or not at all, replacing only a report ldmrt wrote."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ldmrt.atomic import atomic_write
from ldmrt.errors import ConfigError
from ldmrt.writable import check_folder_writable

# A report ldmrt wrote names its schema first thing ("ldmrt-bench/1", "ldmrt-cpu-speed/1",
# "ldmrt.triton_load/1"); only such a file is replaced. Reports are kilobytes: a bigger file is
# not read (the check's cost stays bounded) and is not one.
_REPORT_SCHEMA = re.compile(r"ldmrt[-.][A-Za-z0-9_.-]+/[0-9]+")
REPORT_MAX_BYTES = 16 * 2**20


def write_report(report: dict, path: Path, label: str = "report") -> None:
    """`report` as strict JSON (NaN and infinities become null, each noted under "notes"),
    written whole or not at all. Refuses (ConfigError, message starting with `label`) to replace
    anything but a report ldmrt wrote; checked again here because the run can take hours."""
    path = Path(path)
    check_report_path(path, label)
    notes: list[str] = []
    strict = _strict(report, "", notes)
    if notes:
        strict["notes"] = list(strict.get("notes") or []) + notes
    data = json.dumps(strict, indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data.encode())


def check_report_path(path: Path, label: str) -> None:
    """A report can be written at `path`: absent (its folder writable) or a report ldmrt wrote;
    never a folder, a link or someone else's file (ldmrt does not overwrite what it did not write)."""
    path = Path(path)
    where = f"{label} {path}"
    if path.is_symlink():
        raise ConfigError(f"{where}: is a symbolic link; ldmrt writes reports as plain files and "
                          f"does not replace links: give another path")
    if path.is_dir():
        raise ConfigError(f"{where}: is a folder; expected a file path, e.g. {path / 'bench.json'}")
    if path.exists():
        if not path.is_file():
            raise ConfigError(f"{where}: exists and is not a plain file; give another path")
        if not is_ldmrt_report(path):
            raise ConfigError(f"{where}: exists and is not a report ldmrt wrote (no \"schema\": "
                              f"\"ldmrt-...\" key); ldmrt does not overwrite files it did not "
                              f"write: give another path or move the file away")
    check_folder_writable(path.parent, where)


def is_ldmrt_report(path: Path) -> bool:
    """Whether `path` holds a JSON report ldmrt wrote (a "schema" of ldmrt's own first)."""
    try:
        if Path(path).stat().st_size > REPORT_MAX_BYTES:
            return False
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    schema = data.get("schema") if isinstance(data, dict) else None
    return isinstance(schema, str) and _REPORT_SCHEMA.fullmatch(schema) is not None


def _strict(value: Any, where: str, notes: list[str]) -> Any:
    """A JSON-able copy of `value` with only finite numbers; non-finite ones become None and
    `notes` says where (strict JSON has no NaN: json.dumps would write a bare NaN)."""
    if isinstance(value, dict):
        return {str(k): _strict(v, f"{where}.{k}" if where else str(k), notes) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v, f"{where}[{i}]", notes) for i, v in enumerate(value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if math.isfinite(value):
            return float(value)
        notes.append(f"{where}: {float(value)} recorded as null")
        return None
    if value is None or isinstance(value, str):
        return value
    return str(value)      # paths and the like, as their text
