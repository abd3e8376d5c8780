"""Typed reading of untrusted JSON: manifest.json and every other record ldmrt keeps on disk.

One serialization style for every record on disk (manifest entries, engine records, ORT cache
records, Triton model markers): a frozen dataclass with `to_dict()` (plain JSON values) and
`from_dict(data, origin)`, which parses with a `Reader` through `parse_<record>(reader, data,
where)`; a record nested in another is parsed by its parse function with the outer reader, so
errors name the whole path. Every failure is an error of the reader's type (BundleError unless
told) naming the document, the field (a dotted path such as `components.unet.io`), what was
expected and what was found, in a message of bounded size whatever the input. Standard library only.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
from typing import Any, Iterable, NoReturn

from ldmrt.errors import BundleError, LdmrtError

MANIFEST_NAME = "manifest.json"
MAX_DEPTH = 32                    # real manifests nest < 10 levels
MAX_INT = 2**63 - 1               # every count, size and dimension fits an int64
MAX_STRING = 4096

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
COMPONENT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
TENSOR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$")
VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+!_-]{0,63}$")
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_]+$")
MISSING = object()

# What the config/iospec parsers (not written for hostile input) may raise on bad data.
_FOREIGN_ERRORS = (LdmrtError, LookupError, TypeError, ValueError, ArithmeticError,
                   AttributeError, RecursionError)


class _JsonRejected(ValueError):
    pass


def _reject_constant(name: str) -> NoReturn:
    raise _JsonRejected(f"{name} (JSON has no non-finite numbers)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _JsonRejected(f"the key {key[:80]!r} twice in one object")
        out[key] = value
    return out


def describe(value: Any) -> str:
    """How a found value reads in an error message (short, whatever its size)."""
    if value is MISSING:
        return "nothing (the key is missing)"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    kind = {bool: "boolean", int: "integer", float: "number", str: "string",
            type(None): "null"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text[:77] + '...' if len(text) > 80 else text}"


def join_path(where: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    key = str(key)
    if _PLAIN_KEY.match(key):
        return key if where == "<root>" else f"{where}.{key}"
    return f"{where}[{json.dumps(key[:40])}]"


class Reader:
    """Typed accessors over untrusted data; every failure is an `error` naming the field.

    Messages name the document as "<kind> <origin>: <document>": "bundle B: manifest.json",
    "engine folder B/engines/K: unet.engine.json"; `remedy` ends every message."""

    def __init__(self, origin: str, document: str = MANIFEST_NAME, *, kind: str = "bundle",
                 error: type[LdmrtError] = BundleError, remedy: str = "") -> None:
        self.origin = origin
        self.document = document
        self.kind = kind
        self.error_type = error
        self.remedy = remedy

    def _raise(self, message: str) -> LdmrtError:
        return self.error_type(message + (f"; {self.remedy}" if self.remedy else ""))

    def error(self, where: str, expected: str, found: str) -> LdmrtError:
        return self._raise(f"{self.kind} {self.origin}: {self.document} field {where}: "
                           f"expected {expected}, found {found}")

    def fail(self, where: str, expected: str, value: Any) -> NoReturn:
        raise self.error(where, expected, describe(value))

    def parse_json(self, raw: bytes) -> Any:
        """Strict JSON: UTF-8, no NaN or Infinity, no key twice in an object, bounded nesting."""
        def fail(found: str) -> NoReturn:
            raise self._raise(f"{self.kind} {self.origin}: expected {self.document} to be UTF-8 "
                              f"JSON, found {found}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            fail(f"bytes that are not UTF-8 at offset {exc.start}")
        try:
            return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
        except _JsonRejected as exc:
            fail(str(exc))
        except json.JSONDecodeError as exc:
            fail(f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
        except RecursionError:
            fail(f"values nested deeper than {MAX_DEPTH} levels")
        except ValueError as exc:   # e.g. an integer with thousands of digits
            fail(f"an unreadable value ({str(exc)[:120]})")

    def read_file(self, max_bytes: int) -> Any:
        """The document, read from the folder `origin`; refused unread when over `max_bytes`."""
        try:
            with open(os.path.join(self.origin, self.document), "rb") as handle:
                raw = handle.read(max_bytes + 1)
        except (OSError, ValueError) as exc:
            raise self._raise(f"{self.kind} {self.origin}: cannot read {self.document}: {exc}") from None
        if len(raw) > max_bytes:
            raise self._raise(f"{self.kind} {self.origin}: expected {self.document} of at most "
                              f"{max_bytes} bytes, found a larger file")
        return self.parse_json(raw)

    def json_value(self, value: Any, where: str) -> None:
        """Plain JSON only: string keys, finite numbers, int64 integers, bounded nesting."""
        stack = [(value, where, 1)]
        while stack:
            item, path, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise self.error(path, f"at most {MAX_DEPTH} levels of nesting", "deeper nesting")
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        self.fail(path, "an object with string keys", key)
                    stack.append((child, join_path(path, key), depth + 1))
            elif isinstance(item, (list, tuple)):   # json.dumps writes tuples as lists
                stack.extend((child, join_path(path, i), depth + 1) for i, child in enumerate(item))
            elif isinstance(item, float):
                if not math.isfinite(item):
                    self.fail(path, "a finite number", item)
            elif isinstance(item, int) and not isinstance(item, bool):
                if not -MAX_INT - 1 <= item <= MAX_INT:
                    raise self.error(path, "an integer that fits in 64 bits",
                                     f"an integer with {len(str(abs(item)))} digits")
            elif not (item is None or isinstance(item, (str, bool))):
                self.fail(path, "a JSON value", item)

    def record(self, value: Any, where: str, required: tuple[str, ...],
               optional: tuple[str, ...] = ()) -> dict[str, Any]:
        """An object with every key of `required`, and of `optional` those it has."""
        if not isinstance(value, dict):
            self.fail(where, "an object", value)
        known = required + optional
        unknown = sorted(k for k in value if k not in known)
        if unknown:
            raise self.error(where, f"only the keys {list(known)}",
                             f"the unknown key {unknown[0][:80]!r}")
        for key in required:
            if key not in value:
                self.fail(join_path(where, key), "a value (the key is required)", MISSING)
        return value

    def mapping(self, value: Any, where: str, minimum: int = 0) -> dict[str, Any]:
        """An object with free-form keys (JSON keys are strings)."""
        if not isinstance(value, dict) or len(value) < minimum:
            self.fail(where, "an object" + (f" with at least {minimum} keys" if minimum else ""), value)
        return value

    def sequence(self, value: Any, where: str, minimum: int = 0) -> list[Any]:
        if not isinstance(value, list) or len(value) < minimum:
            self.fail(where, "a list" + (f" of at least {minimum} items" if minimum else ""), value)
        return value

    def string(self, value: Any, where: str, pattern: re.Pattern[str] | None = None,
               expected: str = "a non-empty string") -> str:
        if not isinstance(value, str) or not 0 < len(value) <= MAX_STRING \
                or (pattern is not None and not pattern.match(value)):
            self.fail(where, expected, value)
        return value

    def choice(self, value: Any, where: str, choices: Iterable[str]) -> str:
        choices = list(choices)
        if not isinstance(value, str) or value not in choices:
            self.fail(where, f"one of {choices}", value)
        return value

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            self.fail(where, "true or false", value)
        return value

    def integer(self, value: Any, where: str, minimum: int = 0, maximum: int = MAX_INT) -> int:
        if type(value) is not int or not minimum <= value <= maximum:
            self.fail(where, f"an integer >= {minimum}" if maximum == MAX_INT else
                      f"an integer in [{minimum}, {maximum}]", value)
        return value

    def number(self, value: Any, where: str, positive: bool = False, signed: bool = False) -> float:
        """A finite number >= 0, or > 0 if `positive`, or of any sign if `signed` (integers are
        accepted and become floats)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (not signed and value < 0) or (positive and value == 0):
            self.fail(where, "a finite number" if signed else f"a finite number {'>' if positive else '>='} 0",
                      value)
        return float(value)

    def utc_time(self, value: Any, where: str) -> str:
        """An ISO-8601 time in UTC ('2024-05-01T12:00:00Z' or '...+00:00'), returned as written."""
        text = self.string(value, where)
        stamp = self.foreign(lambda: datetime.datetime.fromisoformat(text), where,
                             "an ISO-8601 UTC time such as '2024-05-01T12:00:00Z'")
        if stamp.utcoffset() != datetime.timedelta(0):
            self.fail(where, "an ISO-8601 time in UTC (ending in 'Z' or '+00:00')", text)
        return text

    def sha256(self, value: Any, where: str) -> str:
        return self.string(value, where, SHA256_PATTERN, "a sha256 as 64 lowercase hex digits")

    def file_name(self, value: Any, where: str) -> str:
        """A plain file name: nothing that could point outside the bundle folder."""
        expected = "a plain file name inside the bundle (no path separators, '..' or drive)"
        if not isinstance(value, str) or not 0 < len(value) <= 255 or value in (".", "..") \
                or any(c in value for c in "/\\:") or any(ord(c) < 32 or ord(c) == 127 for c in value) \
                or value != value.strip():
            self.fail(where, expected, value)
        return value

    def foreign(self, parse: Any, where: str, expected: str) -> Any:
        """Run a config/iospec parser; whatever it raises becomes a BundleError for `where`."""
        try:
            return parse()
        except _FOREIGN_ERRORS as exc:
            message = str(exc) or type(exc).__name__
            raise self.error(where, expected, message[:300]) from None
