"""LoRA pairs -> the weights they change, and the changes, in float32 numpy. Torch-free.

A `ModuleIndex` lists a model's Linear / Conv2d weights (by state key, e.g.
`model.diffusion_model.input_blocks.1.1.proj_in.weight`) under every name a LoRA file may use for
them: the UNet's CompVis name (SGM / kohya SDXL) or diffusers' name (diffusers, kohya SD 1.x), the
text encoders' transformers names; kohya's with dots written as underscores. It is built from a
torch model (ldmrt.lora.targets.module_index) or read back from a bundle's graphs
(ldmrt.lora.graph_weights), so the runtime finds modules without the model.

The delta of a pair is scale * alpha / rank * up @ down in float32, reshaped to the weight (a linear
pair fits a 1x1 convolution and back). Every pair must land on a weight of the right shape, or the
LoraError names its tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ldmrt.errors import LoraError
from ldmrt.lora.choice import LoraChoice
from ldmrt.lora.reading import Component, LoraFile, read_lora


@dataclass(frozen=True)
class ModuleEntry:
    """One weight an adapter may change."""
    component: Component
    names: tuple[str, ...]          # as tools write the module (without `.weight`), dotted
    shape: tuple[int, ...]


class ModuleIndex:
    """A model's adaptable weights, found by any of their names; see the module docstring."""

    def __init__(self, model_name: str, components: Iterable[Component], entries: dict[str, ModuleEntry],
                 missing_why: str = ""):
        self.model_name = model_name
        self.components = tuple(components)           # the parts the model has, in diffusers' names
        self.entries = entries                          # state key -> entry
        self.missing_why = missing_why                  # why a module may be absent here (said in errors)
        self._names: dict[tuple[Component, str], str] = {}
        for key, entry in entries.items():
            for name in entry.names:
                self._names[(entry.component, name)] = key
                self._names[(entry.component, name.replace(".", "_"))] = key

    def key(self, component: Component, module: str) -> str | None:
        return self._names.get((component, module))


def adapter_deltas(index: ModuleIndex, choices: Sequence[LoraChoice], field_name: str = "lora",
                   files: dict[Path, LoraFile] | None = None) -> dict[str, np.ndarray]:
    """state key -> the summed float32 change of every chosen adapter; LoraError naming the input
    for a tensor that lands on nothing or does not fit. `files`: already read ones, by path."""
    deltas: dict[str, np.ndarray] = {}
    for choice in choices:
        lora = (files or {}).get(choice.path) or read_lora(choice.path, field_name)
        for (component, module), pair in lora.pairs.items():
            where = f"{field_name} {lora.path}: {', '.join(sorted(pair.keys))}"
            if component not in index.components:
                raise LoraError(f"{where}: targets the {component.value}, which this model ({index.model_name}) "
                                f"does not have; it has {[c.value for c in index.components]}", field=field_name)
            key = index.key(component, module)
            if key is None:
                raise LoraError(f"{where}: no {component.value} Linear or Conv2d module named {module!r} in this "
                                f"model ({index.model_name}){index.missing_why}", field=field_name)
            delta = _delta(pair.down * np.float32(choice.scale * pair.scaling), pair.up,
                           index.entries[key].shape, where, field_name)
            if key in deltas:
                deltas[key] += delta
            else:
                deltas[key] = delta
    return deltas


def _delta(down: np.ndarray, up: np.ndarray, shape: tuple[int, ...], where: str, field_name: str) -> np.ndarray:
    product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)     # (out, in * kh * kw)
    kernel = tuple(down.shape[2:]) if down.ndim == 4 else ()
    natural = (product.shape[0], down.shape[1], *kernel)
    squeezed = lambda s: tuple(d for i, d in enumerate(s) if i < 2 or d != 1)   # noqa: E731 (1x1 conv ~ linear)
    if squeezed(natural) != squeezed(tuple(shape)):
        raise LoraError(f"{where}: the pair's update has shape {list(natural)}, the weight it targets "
                        f"{list(shape)}", field=field_name)
    return product.astype(np.float32, copy=False).reshape(shape)
