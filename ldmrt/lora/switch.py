"""Adapters on a live model: fused at export, switched at run time.

`WeightSwitch` changes a torch model's weights in place: the base value of every weight an adapter
touched is kept, and each switch writes base + sum(deltas) (computed in float32 from the base, then
cast), or the base itself, so removing adapters restores the base bit for bit; nothing is ever
subtracted. The new set is read and checked before any weight changes. Weights keep their storage,
so captured CUDA graphs read the new values on their next replay (they hold addresses, not values).

A Pipeline holds it through ldmrt.lora.slot.AdapterSlot (the switch behind a readers-writer lock).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ldmrt.lora.choice import LoraChoice, LoraRecord
from ldmrt.lora.reading import read_lora
from ldmrt.lora.targets import lora_deltas


class WeightSwitch:
    """The adapters applied to one torch model, switchable; see the module docstring."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._base: dict[str, torch.Tensor] = {}
        self.active: tuple[LoraChoice, ...] = ()
        self.records: tuple[LoraRecord, ...] = ()

    def set(self, choices: Sequence[LoraChoice], field_name: str = "lora") -> tuple[LoraRecord, ...]:
        """Make `choices` the active adapters (empty: the base weights); their records."""
        return self.prepare(tuple(choices), field_name)()

    def prepare(self, choices: tuple[LoraChoice, ...], field_name: str = "lora") -> Callable[[], tuple[LoraRecord, ...]]:
        """Read and check `choices` and compute their deltas; the returned call writes the weights."""
        files = {c.path: read_lora(c.path, field_name) for c in choices}
        deltas = lora_deltas(self.model, choices, field_name, files)
        records = tuple(LoraRecord(str(c.path.absolute()), files[c.path].sha256, c.scale) for c in choices)
        return lambda: self._write(choices, records, deltas)

    def _write(self, choices, records, deltas: dict[str, np.ndarray]) -> tuple[LoraRecord, ...]:
        state = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for key in sorted(set(self._base) | set(deltas)):
                weight = state[key]
                if key not in self._base:
                    self._base[key] = weight.detach().clone()
                base = self._base[key]
                delta = None if key not in deltas else torch.from_numpy(deltas[key]).to(weight.device)
                if delta is None:
                    weight.copy_(base)
                elif weight.dtype == torch.float32:         # base + delta in float32, in place
                    weight.copy_(base).add_(delta)
                else:
                    weight.copy_((base.float() + delta).to(weight.dtype))
        self.active, self.records = choices, records
        return records
