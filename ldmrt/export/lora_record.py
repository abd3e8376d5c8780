"""At export: which initializers of a written graph hold the model's LoRA-adaptable weights
(ldmrt.lora.graph_weights says how they are found and what the record means), stored in the
graph's metadata for the runtime to switch adapters without PyTorch or the onnx package."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ldmrt.lora.deltas import ModuleIndex
from ldmrt.lora.graph_weights import METADATA_KEY, GraphWeights, Target
from ldmrt.lora.targets import module_index


def record_adaptable_weights(model, reference, graph, path: Path, inputs) -> None:
    """Which initializers of the graph at `path` hold the model's LoRA-adaptable weights
    (ldmrt.lora.graph_weights), for switching adapters at run time without PyTorch. `inputs`:
    float32 example inputs of `reference`, run only to tell dropped weights (see `unused`)."""
    index = module_index(model)
    key_of = {id(value): key for key, value in model.state_dict(keep_vars=True).items() if key in index.entries}
    traced = dict(graph.named_parameters())           # `reference`'s names; `graph` may be a cast copy
    keys = {key_of[id(p)]: name for name, p in reference.named_parameters() if id(p) in key_of}
    if not keys:
        return

    def as_stored(key: str):
        value = traced[keys[key]].detach().cpu().contiguous()
        return value.view(torch.int16).numpy() if value.dtype == torch.bfloat16 else value.numpy()

    def unused(absent: list[str]) -> set[str]:
        """The absent weights no output depends on: no gradient reaches them."""
        params = dict(reference.named_parameters())
        wanted = [params[keys[key]] for key in absent]
        flags = [p.requires_grad for p in wanted]
        try:
            for p in wanted:
                p.requires_grad_(True)
            with torch.enable_grad():
                outputs = reference(*inputs)
                outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                total = sum(o.float().sum() for o in outputs if o.is_floating_point())
                grads = (torch.autograd.grad(total, wanted, allow_unused=True) if total.requires_grad
                         else [None] * len(wanted))          # no output depends on any of them
        finally:
            for p, flag in zip(wanted, flags):
                p.requires_grad_(flag)
        return {key for key, grad in zip(absent, grads) if grad is None}

    record_graph_weights(path, index, keys, as_stored, unused)


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




def _fingerprint(data: bytes, shape) -> tuple:
    return tuple(int(d) for d in shape), hashlib.blake2b(data, digest_size=16).digest()


def _initializer_bytes(tensor, folder: Path) -> bytes:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        fields = {kv.key: kv.value for kv in tensor.external_data}
        with open(folder / fields["location"], "rb") as file:
            file.seek(int(fields.get("offset", 0)))
            return file.read(int(fields["length"])) if "length" in fields else file.read()
    if tensor.raw_data:
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()
