"""Where a model's adaptable weights live in an exported ONNX graph, so that adapters can be switched
on ONNX Runtime (initializers replaced) and TensorRT (weights refitted) without PyTorch. Torch-free.

The exporter renames weights (a Linear's becomes `onnx::MatMul_123`, transposed), so names cannot
say which initializer holds which weight; their bytes do. At export (ldmrt.export.lora_record) every
initializer is hashed, and so is every Linear / Conv2d weight of the traced module as the graph
holds it (in its dtype) and, for 2-D weights, its transpose; a weight whose bytes are those of
initializers and of no other weight is recorded with them; one the graph's outputs do not depend
on (the exporter dropped it) with none, as an adapter on it changes nothing. A weight that shares its bytes with
another (e.g. two all-zero layers) or that the optimizer folded into something else is recorded as
not switchable (as is a square weight equal to its transpose: its orientation is unknown): an
adapter on it is refused by name on a switch, never applied to the wrong tensor. The record is a
JSON entry of the graph's own metadata (`ldmrt.lora_weights`), so the manifest's sha256 of the
graph covers it. Read here without the onnx package (ldmrt.onnx_wire).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ldmrt import onnx_wire
from ldmrt.errors import BundleError, LoraError
from ldmrt.lora.deltas import ModuleEntry, ModuleIndex
from ldmrt.lora.reading import Component

METADATA_KEY = "ldmrt.lora_weights"
VERSION = 1


@dataclass(frozen=True)
class Target:
    """One initializer holding a weight: as it is, or transposed (a Linear's weight under a MatMul)."""
    initializer: str
    transposed: bool


@dataclass(frozen=True)
class GraphWeights:
    """A graph's record: the index of the weights it holds, and where each is."""
    index: ModuleIndex
    targets: dict[str, tuple[Target, ...]]          # state key -> initializers
    unswitchable: tuple[str, ...]                    # state keys of the graph no initializer holds alone

    def to_json(self) -> str:
        weights = {key: {"component": entry.component.value, "names": list(entry.names), "shape": list(entry.shape),
                         "targets": [[t.initializer, t.transposed] for t in self.targets[key]]}
                   for key, entry in self.index.entries.items()}
        return json.dumps({"version": VERSION, "model": self.index.model_name,
                           "components": [c.value for c in self.index.components], "weights": weights,
                           "unswitchable": list(self.unswitchable)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, where: str) -> "GraphWeights":
        try:
            data = json.loads(text)
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
            entries, targets = {}, {}
            for key, value in data["weights"].items():
                entries[key] = ModuleEntry(Component(value["component"]), tuple(value["names"]),
                                           tuple(int(d) for d in value["shape"]))
                targets[key] = tuple(Target(str(name), bool(flag)) for name, flag in value["targets"])
            index = ModuleIndex(str(data["model"]), [Component(c) for c in data["components"]], entries)
            return cls(index, targets, tuple(data.get("unswitchable", ())))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BundleError(f"{where}: metadata {METADATA_KEY} is malformed ({exc})") from None


def read_graph_weights(path: Path) -> GraphWeights | None:
    """The graph's record; None where it has none (int8 graphs, bundles older than the record)."""
    text = onnx_wire.metadata(_read(path), str(path)).get(METADATA_KEY)
    return None if text is None else GraphWeights.from_json(text, str(path))


def base_initializers(path: Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The named initializers of the graph at `path` (external data read from beside it)."""
    data = _read(path)
    spans = onnx_wire.initializers(data, str(path))
    missing = set(names) - set(spans)
    if missing:
        raise BundleError(f"{path}: its {METADATA_KEY} record names initializers the graph lacks: "
                          f"{sorted(missing)[:5]}")
    return {name: onnx_wire.read_array(spans[name], data, path.parent, str(path)) for name in names}


def adapted(base: np.ndarray, delta: np.ndarray, target: Target, key: str, field_name: str) -> np.ndarray:
    """base + delta (the state key's shape, float32) as the initializer holds it: oriented, added in
    float32 from the base, cast to its dtype."""
    if base.dtype not in (np.float32, np.float16):
        raise LoraError(f"{field_name}: {key} is stored as {base.dtype} in this graph; run-time adapters need "
                        f"float32 or float16 weights (export with --lora to fuse them)", field=field_name)
    oriented = delta.T if target.transposed else delta
    if oriented.size != base.size:
        raise BundleError(f"{target.initializer}: holds {base.shape}, its record says {key} {delta.shape}")
    return (base.astype(np.float32) + oriented.reshape(base.shape)).astype(base.dtype)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the graph ({exc.strerror or exc})") from None
