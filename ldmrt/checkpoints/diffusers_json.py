"""Reading diffusers / transformers config.json values: typed, and failing by the field's name."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ldmrt.errors import CheckpointError


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def class_name(cfg: Mapping[str, Any]) -> str | None:
    if cfg.get("_class_name"):
        return str(cfg["_class_name"])
    architectures = cfg.get("architectures")
    return str(architectures[0]) if isinstance(architectures, list) and architectures else None


def get_value(cfg: Mapping[str, Any], key: str, where: str, kind: type) -> Any:
    value = cfg.get(key)
    kinds = (list, tuple) if kind is list else (kind,)
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise CheckpointError(f"{where}: expected {key} to be a {kind.__name__}, found {value!r}")
    return value


def integer(value: Any, key: str, where: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise CheckpointError(f"{where}: expected {key} to be an integer >= {minimum}, found {value!r}")
    return value


def per_level(value: Any, levels: int, key: str, where: str, minimum: int = 0) -> list[int]:
    """An int (repeated) or a list of one int per level."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise CheckpointError(f"{where}: {key}={list(value)}: expected one value per level ({levels})")
    return [integer(v, key, where, minimum) for v in values]


def uniform(value: Any, key: str, where: str) -> int:
    """An int, or a per-level list whose entries are all equal (modules with one value)."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"{where}: per-level {key}={list(value)} is not supported; "
                                  f"ldmrt's modules use one value for every level")
        value = value[0]
    return integer(value, key, where)


def require_defaults(cfg: Mapping[str, Any], fixed: Mapping[str, Any], where: str) -> None:
    for key, expected in fixed.items():
        value = cfg.get(key, expected)
        values = value if isinstance(value, list) else [value]
        if any(v != expected for v in values):
            raise CheckpointError(f"{where}: {key}={value!r} is not supported; ldmrt's modules "
                                  f"implement only {key}={expected!r}")
