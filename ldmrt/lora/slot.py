"""A Pipeline's LoRA adapters: the backend's switch (None where the backend cannot switch) behind a
readers-writer lock, so a request in flight finishes on the weights it started with, a switch
waits for it, and new requests wait until the weights are whole. Torch-free.

A switch is the backend's `prepare(choices, field_name) -> commit`: `prepare` reads and checks the
files and builds the new weights (or sessions) while requests keep running; only `commit`, which
puts them in place, holds the lock. A failed `prepare` leaves the previous adapters active.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Protocol, Sequence

from ldmrt.errors import LoraError
from ldmrt.lora.choice import LoraChoice


class Switch(Protocol):
    active: tuple[LoraChoice, ...]

    def prepare(self, choices: tuple[LoraChoice, ...], field_name: str) -> Callable[[], tuple]: ...


class _ReadersWriter:
    """Many readers or one writer; a writer may become a reader without letting another writer in."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._held = threading.local()          # this thread's reads (a read inside a read is fine)

    def holds_read(self) -> bool:
        return getattr(self._held, "depth", 0) > 0

    def acquire_read(self) -> None:
        with self._cond:
            if not self.holds_read():           # re-entrant: a request inside a request's callback
                self._cond.wait_for(lambda: not self._writing)
            self._readers += 1
        self._held.depth = getattr(self._held, "depth", 0) + 1

    def release_read(self) -> None:
        self._held.depth -= 1
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing)
            self._writing = True                       # new readers wait from here on
            self._cond.wait_for(lambda: self._readers == 0)

    def release_write(self, then_read: bool = False) -> None:
        with self._cond:
            self._writing = False
            if then_read:
                self._readers += 1
                self._held.depth = getattr(self._held, "depth", 0) + 1
            self._cond.notify_all()


class AdapterSlot:
    """A Pipeline's adapters: `set` switches them; `in_use` wraps one request; `using` wraps one
    request that needs given adapters (a server's per-request choice)."""

    def __init__(self, switch: Switch | None, backend: str, how: str = ""):
        self._switch, self.backend = switch, backend
        refit = (f"its engines were built without --refit: rebuild them refittable (ldmrt build BUNDLE "
                 f"--backend {backend} --refit), " if backend.startswith("tensorrt") else "")
        self._how = how or f"{refit}load the bundle with --backend torch or onnxruntime, or export it with --lora"
        self._lock = _ReadersWriter()
        self._one_switch = threading.Lock()     # prepares run one at a time, in order

    @property
    def can_switch(self) -> bool:
        """Whether this backend can switch adapters at run time (`why_not` says why not)."""
        return self._switch is not None

    @property
    def why_not(self) -> str:
        return "" if self._switch is not None else f"it runs on {self.backend}; {self._how}"

    @property
    def active(self) -> tuple[LoraChoice, ...]:
        return () if self._switch is None else self._switch.active

    def set(self, choices: Sequence[LoraChoice | str], field_name: str = "lora") -> tuple:
        """Switch to `choices` (LoraChoice or 'FILE[:SCALE]'; empty: none), without re-export;
        the records of the adapters now active."""
        parsed = self._parsed(choices, field_name)
        self._not_inside_a_request(field_name)
        with self._one_switch:
            return self._switch_to(parsed, field_name)

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """One request on whatever adapters are active."""
        self._lock.acquire_read()
        try:
            yield
        finally:
            self._lock.release_read()

    @contextlib.contextmanager
    def using(self, choices: Sequence[LoraChoice | str], field_name: str = "lora") -> Iterator[None]:
        """One request on `choices`: it runs at once when they are active, else after a switch to
        them (which waits for requests on the others, then lets this one in before any other switch)."""
        parsed = self._parsed(choices, field_name) if choices or self._switch is not None else ()
        self._lock.acquire_read()
        if self.active != parsed:
            self._lock.release_read()
            self._not_inside_a_request(field_name)
            with self._one_switch:
                if self.active == parsed:          # another request switched to them meanwhile
                    self._lock.acquire_read()
                else:
                    self._switch_to(parsed, field_name, then_read=True)
        try:
            yield
        finally:
            self._lock.release_read()

    def _switch_to(self, parsed: tuple[LoraChoice, ...], field_name: str, then_read: bool = False) -> tuple:
        """Prepare while requests run, commit under the write lock (the caller holds `_one_switch`);
        `then_read`: keep a read for the caller's request, before any other switch."""
        commit = self._switch.prepare(parsed, field_name)
        self._lock.acquire_write()
        try:
            records = commit()
        except BaseException:
            self._lock.release_write()
            raise
        self._lock.release_write(then_read=then_read)
        return records

    def _parsed(self, choices: Sequence[LoraChoice | str], field_name: str) -> tuple[LoraChoice, ...]:
        if isinstance(choices, (str, LoraChoice)) or not isinstance(choices, Sequence):
            raise LoraError(f"{field_name}: expected a list of adapters (FILE[:SCALE] or LoraChoice), found "
                            f"{type(choices).__name__}", field=field_name)
        parsed = tuple(c if isinstance(c, LoraChoice) else LoraChoice.parse(c, field_name) for c in choices)
        if self._switch is None:
            raise LoraError(f"{field_name}: this pipeline cannot switch adapters at run time: {self.why_not}",
                            field=field_name)
        return parsed

    def _not_inside_a_request(self, field_name: str) -> None:
        if self._lock.holds_read():
            raise LoraError(f"{field_name}: adapters cannot be switched from inside a request on this pipeline "
                            f"(an on_step or cancel callback): the switch would wait for that request forever",
                            field=field_name)
