"""A Pipeline's LoRA adapters: the backend's switch (ldmrt.lora.switch; None where the backend cannot
switch) behind a readers-writer lock, so a request in flight finishes on the weights it started
with, a switch waits for it, and new requests wait until the weights are whole. Torch-free.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

from ldmrt.errors import LoraError
from ldmrt.lora.choice import LoraChoice


class _ReadersWriter:
    """Many readers or one writer."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing)
            self._writing = True                       # new readers wait from here on
            self._cond.wait_for(lambda: self._readers == 0)
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class AdapterSlot:
    """A Pipeline's adapters: `set` switches them; `in_use` wraps one request."""

    def __init__(self, switch, backend: str):
        self._switch, self.backend = switch, backend
        self._lock = _ReadersWriter()

    @property
    def active(self) -> tuple[LoraChoice, ...]:
        return () if self._switch is None else self._switch.active

    def set(self, choices: Sequence[LoraChoice | str], field_name: str = "lora") -> tuple:
        """Switch to `choices` (LoraChoice or 'FILE[:SCALE]'; empty: none), without re-export."""
        parsed = tuple(c if isinstance(c, LoraChoice) else LoraChoice.parse(c, field_name) for c in choices)
        if self._switch is None:
            raise LoraError(f"{field_name}: switching adapters at run time is supported on the torch backend; "
                            f"this pipeline runs on {self.backend} (export the bundle with --lora to fuse "
                            f"them, or load it with --backend torch)", field=field_name)
        with self._lock.writing():
            return self._switch.set(parsed, field_name)

    def in_use(self):
        return self._lock.reading()
