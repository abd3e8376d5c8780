"""The Python side of libldmrt (ldmrt.h): what its C functions call, with plain values.

The C library converts structs to the dicts and tuples taken here and copies what comes back
into C memory; everything else (the checks, the errors, the images) is the lean runtime's own
code, so a C caller gets exactly what `ldmrt generate` and the parity tests get.
Torch-free: the lean-runtime import rule holds (tests/test_imports.py).
"""
from __future__ import annotations

import enum
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from ldmrt.errors import (BackendUnavailableError, BundleError, CheckpointError, ConfigError, GenerationCancelled,
                          GenerationError, LdmrtError, LoraError, ShapeError, StaleEngineError)

log = logging.getLogger(__name__)


class Status(enum.IntEnum):
    """ldmrt.h's ldmrt_status, value for value."""
    OK = 0
    INVALID_ARGUMENT = 1
    BUNDLE = 2
    STALE_ENGINE = 3
    BACKEND_UNAVAILABLE = 4
    CANCELLED = 5
    GENERATION = 6
    LORA = 7
    INSTALL = 8
    ABI = 9
    IO = 10
    OUT_OF_MEMORY = 11
    INTERNAL = 12


# ldmrt.h's ldmrt_dtype; uint8 is for images only (value / 255, as an 8-bit image file reads)
_DTYPES = {1: np.float32, 2: np.int32, 3: np.uint8}
_IMAGE_FIELDS = ("init_image", "image", "mask", "guide_image")
# ldmrt's own names for the C request's fields, where they differ
_PIPELINE_NAMES = {"layout_json": "layout", "prompts": "prompt", "negative_prompts": "negative_prompt"}
_C_NAMES = {"layout": "layout_json", "out": "path", "lora": "adapters"}

# Typed errors -> status, most specific first (a BackendUnavailableError names `backend` and is
# still "unavailable", not the caller's mistake).
_STATUSES = ((GenerationCancelled, Status.CANCELLED), (StaleEngineError, Status.STALE_ENGINE),
             (BackendUnavailableError, Status.BACKEND_UNAVAILABLE), (LoraError, Status.LORA),
             (BundleError, Status.BUNDLE), (CheckpointError, Status.BUNDLE))


def describe(error: BaseException) -> tuple[int, str, str | None]:
    """(status, message, field in the C caller's words) for an exception a call raised."""
    if isinstance(error, LdmrtError):
        field = _C_NAMES.get(error.field, error.field)
        for kind, status in _STATUSES:
            if isinstance(error, kind):
                return int(status), str(error), field
        if field is not None or isinstance(error, (ConfigError, ShapeError)):
            return int(Status.INVALID_ARGUMENT), str(error), field
        return int(Status.GENERATION if isinstance(error, GenerationError) else Status.INTERNAL), str(error), None
    if isinstance(error, MemoryError):
        return int(Status.OUT_OF_MEMORY), f"out of memory: {error}", None
    if isinstance(error, OSError):
        return int(Status.IO), str(error), None
    # A bug: the caller gets its name and where; the traceback goes to the log, never to stderr.
    where = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    place = f" at {Path(where[0].filename).name}:{where[0].lineno}" if where else ""
    log.error("unexpected error in ldmrt", exc_info=(type(error), error, error.__traceback__))
    return int(Status.INTERNAL), f"{type(error).__name__}: {error}{place} (a bug in ldmrt: please report it)", None


# --- the interpreter ------------------------------------------------------------------------

class _ToCaller(logging.Handler):
    """Log records to the C caller's ldmrt_log_fn."""

    def __init__(self, forward: Callable[[int, str], None]):
        super().__init__(logging.WARNING)
        self.forward = forward

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.forward(record.levelno, self.format(record))
        except Exception:       # a log record never fails a call
            pass


class _LogStream:
    """sys.stderr of an interpreter libldmrt started: text goes to the log, never to the host's stderr."""

    def __init__(self, handler: logging.Handler | None):
        self.handler = handler

    def write(self, text: str) -> int:
        if self.handler is not None and text.strip():
            self.handler.emit(logging.makeLogRecord({"levelno": logging.WARNING, "levelname": "WARNING",
                                                     "msg": text.rstrip("\n"), "name": "stderr"}))
        return len(text)

    def flush(self) -> None:
        pass


def configure(forward: Callable[[int, str], None] | None, own: bool, venv: str) -> None:
    """Route log records to the caller's callback. An interpreter libldmrt started is the host's
    guest: its warnings and stray stderr go to the callback (or nowhere), never to the terminal;
    a joined interpreter's logging stays its owner's."""
    handler = _ToCaller(forward) if forward is not None else None
    if handler is not None:
        logging.getLogger("ldmrt").addHandler(handler)
    if own:
        logging.captureWarnings(True)
        logging.getLogger().addHandler(handler if handler is not None else logging.NullHandler())
        logging.getLogger("ldmrt").propagate = handler is None
        sys.stderr = _LogStream(handler)
    log.debug("ldmrt %s embedded (%s interpreter, venv %r, Python %s)", _version(), "own" if own else "joined",
              venv, sys.version.split()[0])


def _version() -> str:
    from ldmrt.manifest import LDMRT_VERSION
    return LDMRT_VERSION


# --- pipelines ------------------------------------------------------------------------------

def open(bundle: bytes, backend: str | None, verify: int, components, max_cost: float,
         backend_options: str | None):
    """Pipeline.load with the C caller's options; backend_options is a JSON object."""
    from ldmrt.engines.backend import Backend
    from ldmrt.engines.dispatch import backend_options as checked_options
    from ldmrt.runtime.pipeline import Pipeline

    name = Backend.parse(backend if backend is not None else Backend.ONNXRUNTIME.value).value
    options = {}
    if backend_options is not None:
        try:
            options = json.loads(backend_options)
        except ValueError as exc:
            raise ConfigError(f"backend_options: not a JSON object ({exc})", field="backend_options") from None
    path = Path(os.fsdecode(bundle))
    if not path.is_dir():
        raise BundleError(f"bundle {path}: {'is not a folder' if path.exists() else 'does not exist'}; expected "
                          f"the folder `ldmrt export` wrote", field="bundle")
    return Pipeline.load(path, name, verify=bool(verify), components=components, max_cost=max_cost,
                         **checked_options(name, options))


def set_loras(pipeline, adapters: list[str]) -> None:
    """pipeline.loras.set from "FILE[:SCALE]" strings, each read and checked before the switch."""
    from ldmrt.lora.choice import LoraChoice

    pipeline.loras.set([LoraChoice.parse(text) for text in adapters])


# --- generation -----------------------------------------------------------------------------

def _array(name: str, value) -> np.ndarray:
    data, dtype, shape = value
    array = np.frombuffer(data, dtype=_DTYPES[dtype]).reshape(shape)
    if name in _IMAGE_FIELDS and array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    return array


def _optional(value: int, name: str, unset: int = -1):
    return None if value == unset else value


def request(fields: dict):
    """The C request's fields -> GenerationRequest (the pipeline checks every value)."""
    from ldmrt.runtime.pipeline import GenerationRequest

    values = {}
    for name, value in fields.items():
        if isinstance(value, tuple) and len(value) == 3 and isinstance(value[0], bytes):
            value = _array(name, value)
        values[_PIPELINE_NAMES.get(name, name)] = value
    tile = values.pop("tile", -1)
    if tile not in (-1, 0, 1):
        raise GenerationError(f"tile {tile}: expected LDMRT_TILE_AUTO (-1), LDMRT_TILE_NEVER (0) or "
                              f"LDMRT_TILE_ALWAYS (1)", field="tile")
    values["tile"] = None if tile == -1 else bool(tile)
    values["noise_level"] = _optional(values.get("noise_level", -1), "noise_level")
    for name in ("height", "width"):
        values[name] = _optional(values.get(name, 0), name, unset=0)
    if "layout" in values:
        try:
            values["layout"] = json.loads(values["layout"])
        except ValueError as exc:
            raise GenerationError(f"layout_json: not JSON ({exc})", field="layout_json") from None
    return GenerationRequest(**values)


def generate(pipeline, fields: dict, on_step, cancel):
    """(pixels, images, (B, H, W, C), latents, latent shape, warnings, timings JSON) as bytes and
    plain values; images are empty and the shape zeros with denoising_end (latents only)."""
    from ldmrt.runtime.images import to_pixels

    result = pipeline.generate(request(fields), on_step=on_step, cancel=cancel)
    latents = np.ascontiguousarray(result.latents, dtype=np.float32)
    if result.images is None:
        pixels, images, shape = b"", b"", (0, 0, 0, 0)
    else:
        values = np.ascontiguousarray(result.images, dtype=np.float32)
        pixels, images, shape = to_pixels(values).tobytes(), values.tobytes(), values.shape
    return (pixels, images, tuple(int(n) for n in shape), latents.tobytes(), tuple(int(n) for n in latents.shape),
            "\n".join(result.warnings), json.dumps(result.timings))


def png(pixels: bytes, height: int, width: int, channels: int) -> bytes:
    """One image's PNG file bytes, as `ldmrt generate` writes them."""
    from ldmrt.runtime.images import png_bytes

    return png_bytes(np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, channels))


def save(images: bytes, shape: tuple[int, int, int, int], path: bytes) -> list[str]:
    """write_images, as `ldmrt generate --out` (replaces only files ldmrt wrote)."""
    from ldmrt.runtime.images import check_out, write_images

    out = Path(os.fsdecode(path))
    check_out(out, shape[0])
    return [str(p) for p in write_images(np.frombuffer(images, dtype=np.float32).reshape(shape), out)]
