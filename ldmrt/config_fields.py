"""What every config dataclass shares: the metadata of later fields and the positive-integer check."""
from __future__ import annotations

from typing import Any

from ldmrt.errors import ConfigError

# Field metadata of options added after bundles were first written: omitted from the manifest
# while at their default, so an older bundle's manifest is rewritten byte for byte.
LATER = {"omit_default": True}


def positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{type(obj).__name__}.{name}: expected a positive integer, found {value!r}")
