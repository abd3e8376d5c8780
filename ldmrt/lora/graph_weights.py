"""Where a model's adaptable weights live in an exported ONNX graph, so that adapters can be switched
on ONNX Runtime (initializers replaced) and TensorRT (weights refitted) without PyTorch. Torch-free.

The exporter renames weights (a Linear's becomes `onnx::MatMul_123`, transposed), so names cannot
say which initializer holds which weight; their bytes do. At export (`record_graph_weights`) every
initializer is hashed, and so is every Linear / Conv2d weight of the traced module as the graph
holds it (in its dtype) and, for 2-D weights, its transpose; a weight whose bytes are those of
initializers and of no other weight is recorded with them; one the graph's outputs do not depend
on (the exporter dropped it) with none, as an adapter on it changes nothing. A weight that shares its bytes with
another (e.g. two all-zero layers) or that the optimizer folded into something else is recorded as
not switchable (as is a square weight equal to its transpose: its orientation is unknown): an
adapter on it is refused by name on a switch, never applied to the wrong tensor. The record is a
JSON entry of the graph's own metadata (`ldmrt.lora_weights`), so the manifest's sha256 of the
graph covers it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

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


def record_graph_weights(path: Path, index: ModuleIndex, keys: Iterable[str],
                         weight: Callable[[str], np.ndarray],
                         unused: Callable[[list[str]], set[str]] = lambda keys: set()) -> GraphWeights:
    """Find `keys` (weights of the traced module, in `index`) among the initializers of the graph at
    `path` and store the record in its metadata. `weight(key)`: the weight as the graph holds it
    (its dtype; bf16 as uint16 bits). `unused(keys)`: those of the keys no initializer holds that
    the graph's outputs do not depend on (the exporter dropped them: SDXL's first text encoder
    ends at its penultimate layer); an adapter's change to them changes nothing, so they are
    recorded with no initializer, not as unswitchable. The graph is rewritten in place (weights in
    `.data` untouched)."""
    keys = list(keys)
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    by_bytes: dict[tuple, list[str]] = {}
    for tensor in model.graph.initializer:
        by_bytes.setdefault(_fingerprint(_initializer_bytes(tensor, path.parent), tuple(tensor.dims)),
                            []).append(tensor.name)
    found: dict[str, list[Target]] = {}
    claimed: dict[tuple, list[str]] = {}
    for key in keys:
        array = np.ascontiguousarray(weight(key))
        forms = [(array, False)] + ([(np.ascontiguousarray(array.T), True)] if array.ndim == 2 else [])
        for form, transposed in forms:
            fingerprint = _fingerprint(form.tobytes(), form.shape)
            claimed.setdefault(fingerprint, []).append(key)
            for name in by_bytes.get(fingerprint, ()):
                found.setdefault(key, []).append(Target(name, transposed))
    shared = {key for keys_ in claimed.values() if len(set(keys_)) > 1 for key in keys_}
    # a symmetric weight matches one initializer both ways: which way it is held is unknown
    shared |= {key for key, t in found.items() if len({x.initializer for x in t}) < len(t)}
    targets = {key: tuple(t) for key, t in found.items() if key not in shared}
    absent = [key for key in keys if key not in found]
    targets.update({key: () for key in (unused(absent) if absent else set()) & set(absent)})
    entries = {key: index.entries[key] for key in targets}
    record = GraphWeights(ModuleIndex(index.model_name, index.components, entries), targets,
                          tuple(sorted(set(keys) - set(targets))))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    for key, value in kept + [(METADATA_KEY, record.to_json())]:
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save_model(model, str(path))
    return record


def read_graph_weights(path: Path) -> GraphWeights | None:
    """The graph's record; None where it has none (int8 graphs, bundles older than the record)."""
    model = _load_structure(path)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return GraphWeights.from_json(prop.value, str(path))
    return None


def base_initializers(path: Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The named initializers of the graph at `path` (external data read from beside it)."""
    from onnx import numpy_helper

    wanted = set(names)
    model = _load_structure(path)
    found = {t.name: numpy_helper.to_array(t, str(path.parent)) for t in model.graph.initializer if t.name in wanted}
    missing = wanted - set(found)
    if missing:
        raise BundleError(f"{path}: its {METADATA_KEY} record names initializers the graph lacks: "
                          f"{sorted(missing)[:5]}")
    return found


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


def _fingerprint(data: bytes, shape) -> tuple:
    return tuple(int(d) for d in shape), hashlib.blake2b(data, digest_size=16).digest()


def _initializer_bytes(tensor, folder: Path) -> bytes:
    import onnx
    from onnx import numpy_helper

    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        fields = {kv.key: kv.value for kv in tensor.external_data}
        with open(folder / fields["location"], "rb") as file:
            file.seek(int(fields.get("offset", 0)))
            return file.read(int(fields["length"])) if "length" in fields else file.read()
    if tensor.raw_data:
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _load_structure(path: Path):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:                   # protobuf raises its own DecodeError
        raise BundleError(f"{path}: not a readable ONNX graph ({exc})") from None
