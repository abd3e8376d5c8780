"""Just enough of the ONNX file format to find a graph's initializers and metadata without the onnx
package (the lean runtime is numpy + one backend): a protobuf wire-format walk over ModelProto ->
GraphProto.initializer -> TensorProto, skipping every payload it does not need.

Field numbers (onnx.proto3): ModelProto graph 7, metadata_props 14; GraphProto initializer 5;
TensorProto dims 1, data_type 2, name 8, raw_data 9, external_data 13, data_location 14;
StringStringEntryProto key 1, value 2. A malformed file is a BundleError naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ldmrt.errors import BundleError

# TensorProto.DataType -> numpy (the ones weights come in; bfloat16 has no numpy dtype)
NUMPY_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64, 3: np.int8, 2: np.uint8}
BFLOAT16 = 16
_EXTERNAL = 1


@dataclass(frozen=True)
class InitializerSpan:
    """Where one initializer's bytes are: inside the graph file (`start`..`end` of its raw_data) or
    in an external file (`location`, `offset`, `length`)."""
    name: str
    dims: tuple[int, ...]
    data_type: int
    start: int = -1
    end: int = -1
    location: str | None = None
    offset: int = 0
    length: int = -1


def _varint(data, pos: int, where: str) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise BundleError(f"{where}: not a readable ONNX graph (a truncated varint)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data, start: int, end: int, where: str) -> Iterator[tuple[int, int, int, int]]:
    """(field, wire type, value or payload start, payload end) of one message's fields."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, where)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos, where)
            yield field, wire, value, pos
        elif wire == 2:
            length, pos = _varint(data, pos, where)
            if pos + length > end:
                raise BundleError(f"{where}: not a readable ONNX graph (a field runs past its message)")
            yield field, wire, pos, pos + length
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise BundleError(f"{where}: not a readable ONNX graph (wire type {wire})")


def _text(data, start: int, end: int) -> str:
    return bytes(data[start:end]).decode("utf-8", errors="replace")


def metadata(data, where: str) -> dict[str, str]:
    """ModelProto.metadata_props."""
    props = {}
    for field, wire, start, end in _fields(data, 0, len(data), where):
        if field == 14 and wire == 2:
            entry = {f: _text(data, s, e) for f, w, s, e in _fields(data, start, end, where) if w == 2}
            props[entry.get(1, "")] = entry.get(2, "")
    return props


def initializers(data, where: str) -> dict[str, InitializerSpan]:
    """Every initializer of the graph (ModelProto bytes), by name."""
    found = {}
    for field, wire, start, end in _fields(data, 0, len(data), where):
        if field != 7 or wire != 2:
            continue
        for g_field, g_wire, t_start, t_end in _fields(data, start, end, where):
            if g_field == 5 and g_wire == 2:
                span = _tensor(data, t_start, t_end, where)
                found[span.name] = span
    return found


def _tensor(data, start: int, end: int, where: str) -> InitializerSpan:
    dims, data_type, name, raw, external, location_kind = [], 0, "", (-1, -1), {}, 0
    for field, wire, a, b in _fields(data, start, end, where):
        if field == 1:
            if wire == 0:
                dims.append(a)
            else:                                            # packed
                pos = a
                while pos < b:
                    value, pos = _varint(data, pos, where)
                    dims.append(value)
        elif field == 2:
            data_type = a
        elif field == 8:
            name = _text(data, a, b)
        elif field == 9:
            raw = (a, b)
        elif field == 13:
            entry = {f: _text(data, s, e) for f, w, s, e in _fields(data, a, b, where) if w == 2}
            external[entry.get(1, "")] = entry.get(2, "")
        elif field == 14:
            location_kind = a
    if location_kind == _EXTERNAL:
        return InitializerSpan(name, tuple(dims), data_type, location=external.get("location", ""),
                               offset=int(external.get("offset", 0)), length=int(external.get("length", -1)))
    return InitializerSpan(name, tuple(dims), data_type, start=raw[0], end=raw[1])


def read_array(span: InitializerSpan, data, folder: Path, where: str) -> np.ndarray:
    """The initializer's value (a copy); BundleError for a dtype or layout this reader does not take."""
    dtype = NUMPY_DTYPES.get(span.data_type)
    if dtype is None:
        raise BundleError(f"{where}: initializer {span.name}: data type {span.data_type} is not read here "
                          f"(float32 and float16 weights are)")
    size = int(np.prod(span.dims, dtype=np.int64)) * np.dtype(dtype).itemsize
    if span.location is None:
        if span.end - span.start != size:
            raise BundleError(f"{where}: initializer {span.name}: expected {size} raw bytes, found "
                              f"{max(span.end - span.start, 0)} (typed data fields are not read here)")
        chunk = bytes(data[span.start:span.end])
    else:
        path = folder / span.location
        if Path(span.location).is_absolute() or ".." in Path(span.location).parts or not path.is_file():
            raise BundleError(f"{where}: initializer {span.name}: external data {span.location!r} is not a "
                              f"file beside the graph")
        with open(path, "rb") as file:
            file.seek(span.offset)
            chunk = file.read(size)
        if len(chunk) != size or (span.length >= 0 and span.length != size):
            raise BundleError(f"{where}: initializer {span.name}: {span.location} holds {len(chunk)} of its "
                              f"{size} bytes at offset {span.offset}")
    return np.frombuffer(chunk, dtype).reshape(span.dims).copy()
