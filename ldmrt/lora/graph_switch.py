"""Adapters switched on exported graphs' weights, without PyTorch: the part every graph backend
shares (ONNX Runtime: ldmrt.engines.ort_lora; TensorRT refit: ldmrt.engines.trt_lora).

Each graph's record (ldmrt.lora.graph_weights, written at export) says which initializer holds
which weight. `prepare` reads and checks the files, computes base + sum(deltas) in float32 for
every weight the adapters touch, cast to the initializer's dtype, and hands each graph whose
values change to the backend's `stage(component, values, adapted, field_name)`: `values` holds the new value
of every initializer that differs from what the graph holds now, the touched ones adapted and
those the previous adapters touched, and these do not, their base value (read from the graph and
kept, so the base comes back bit for bit: nothing is ever subtracted); `adapted` says whether any
of them is not the base. `stage` builds what it can while requests run and returns the call that
puts it in place, which the commit runs under the pipeline's adapter lock. Torch-free.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Protocol

import numpy as np

from ldmrt.errors import LoraError
from ldmrt.lora.choice import LoraChoice, LoraRecord
from ldmrt.lora.deltas import ModuleIndex, adapter_deltas
from ldmrt.lora.graph_weights import GraphWeights, adapted, base_initializers, read_graph_weights
from ldmrt.lora.reading import read_lora

Stage = Callable[[str, dict[str, np.ndarray], bool, str], Callable[[], None]]


class GraphFile(Protocol):
    """A component's source graph: its path, and the check of its files before they are read."""
    path: Path

    def verify(self) -> None: ...


class GraphSwitch:
    """The adapters on a backend's graphs (component -> GraphFile); see the module docstring."""

    def __init__(self, graphs: Mapping[str, GraphFile], stage: Stage):
        self._files, self._stage = dict(graphs), stage
        self._graphs: dict[str, GraphWeights] | None = None          # read on the first switch
        self._base: dict[tuple[str, str], np.ndarray] = {}           # (component, initializer) -> base value
        self._applied: dict[str, frozenset[str]] = {}                # component -> initializers not at base
        self.active: tuple[LoraChoice, ...] = ()
        self.records: tuple[LoraRecord, ...] = ()

    def prepare(self, choices: tuple[LoraChoice, ...], field_name: str = "lora") -> Callable[[], tuple]:
        files = {c.path: read_lora(c.path, field_name) for c in choices}
        graphs = self._records()
        index, home = _merged(graphs, field_name)
        deltas = adapter_deltas(index, choices, field_name, files)
        touched: dict[str, dict[str, np.ndarray]] = {}
        for key, delta in deltas.items():
            touched.setdefault(home[key], {})[key] = delta
        staged, applied = [], dict(self._applied)
        for component in self._files:
            values = self._adapted(component, touched.get(component, {}), field_name)
            now = frozenset(values)
            restored = self._applied.get(component, frozenset()) - now
            if not values and not restored:
                continue
            values.update(self._bases(component, restored))
            staged.append(self._stage(component, values, bool(now), field_name))
            applied[component] = now
        records = tuple(LoraRecord(str(c.path.absolute()), files[c.path].sha256, c.scale) for c in choices)

        def commit() -> tuple[LoraRecord, ...]:
            for put in staged:
                put()
            self._applied, self.active, self.records = applied, choices, records
            return records

        return commit

    def _adapted(self, component: str, deltas: dict[str, np.ndarray], field_name: str) -> dict[str, np.ndarray]:
        """initializer -> its adapted value, for the weights of `component`'s graph in `deltas`."""
        if not deltas:
            return {}
        targets = self._graphs[component].targets
        bases = self._bases(component, {t.initializer for key in deltas for t in targets[key]})
        return {t.initializer: adapted(bases[t.initializer], delta, t, key, field_name)
                for key, delta in deltas.items() for t in targets[key]}

    def _bases(self, component: str, names) -> dict[str, np.ndarray]:
        missing = [n for n in names if (component, n) not in self._base]
        if missing:
            graph = self._files[component]
            graph.verify()
            for name, array in base_initializers(graph.path, missing).items():
                self._base[(component, name)] = array
        return {n: self._base[(component, n)] for n in names}

    def _records(self) -> dict[str, GraphWeights]:
        if self._graphs is None:
            graphs = {}
            for component, graph in self._files.items():
                graph.verify()                     # the record is read from the source graph
                record = read_graph_weights(graph.path)
                if record is not None:
                    graphs[component] = record
            self._graphs = graphs
        return self._graphs


def _merged(graphs: Mapping[str, GraphWeights], field_name: str) -> tuple[ModuleIndex, dict[str, str]]:
    """One index over every loaded graph's switchable weights, and the graph each lives in."""
    if not graphs:
        raise LoraError(f"{field_name}: this bundle's graphs record no switchable weights (int8 weights, or an "
                        f"export older than run-time adapters); re-export it, or fuse the adapters at export "
                        f"with --lora", field=field_name)
    entries, home, components = {}, {}, []
    for component, record in graphs.items():
        for key, entry in record.index.entries.items():
            entries[key], home[key] = entry, component
        components += [c for c in record.index.components if c not in components]
    unswitchable = sorted({k for r in graphs.values() for k in r.unswitchable})
    why = (f" that its loaded graphs hold separately ({', '.join(graphs)}"
           + (f"; not switchable here: {len(unswitchable)} weights that share their values with another or "
              f"were folded at export, e.g. {unswitchable[0]}" if unswitchable else "")
           + "; fuse such adapters at export with --lora)")
    first = next(iter(graphs.values())).index
    return ModuleIndex(first.model_name, components, entries, why), home
