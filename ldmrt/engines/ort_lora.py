"""LoRA adapters switched at run time on ONNX Runtime: the affected initializers replaced.

Each graph's record (ldmrt.lora.graph_weights, written at export) says which initializer holds
which weight. A switch computes base + sum(deltas) in float32 for every weight the adapters touch,
cast to the initializer's dtype, and opens a new session of the source graph with those
initializers replaced (SessionOptions.add_initializer); graphs the adapters do not touch keep
their session, and one whose adapters are all removed gets its base session back (from the
optimized-graph cache where there is one), so the base is restored bit for bit: nothing is
subtracted. The sessions are built while requests keep running; the commit only swaps them, under
the pipeline's adapter lock (ldmrt.lora.slot). Torch-free.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from ldmrt.errors import LoraError
from ldmrt.lora.choice import LoraChoice, LoraRecord
from ldmrt.lora.deltas import ModuleIndex, adapter_deltas
from ldmrt.lora.graph_weights import GraphWeights, adapted, base_initializers, read_graph_weights
from ldmrt.lora.reading import read_lora


class OrtWeightSwitch:
    """The adapters on a set of ONNX Runtime runners (component -> OnnxRuntimeRunner)."""

    def __init__(self, runners: Mapping[str, object]):
        self._runners = dict(runners)
        self._graphs: dict[str, GraphWeights] | None = None          # read on the first switch
        self._base: dict[tuple[str, str], np.ndarray] = {}           # (component, initializer) -> base value
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
        opened = {}
        for component, runner in self._runners.items():
            if component in touched:
                opened[component] = (*runner.reopened(self._initializers(component, touched[component], field_name)),
                                     True)
            elif runner.adapted:
                opened[component] = (*runner.reopened(), False)
        records = tuple(LoraRecord(str(c.path.absolute()), files[c.path].sha256, c.scale) for c in choices)

        def commit() -> tuple[LoraRecord, ...]:
            for component, (session, held, is_adapted) in opened.items():
                self._runners[component].use(session, held, is_adapted)
            self.active, self.records = choices, records
            return records

        return commit

    def _initializers(self, component: str, deltas: dict[str, np.ndarray], field_name: str) -> dict[str, np.ndarray]:
        """initializer -> its adapted value, for the weights of `component`'s graph in `deltas`."""
        targets = self._graphs[component].targets
        names = [t.initializer for key in deltas for t in targets[key]]
        runner = self._runners[component]
        missing = [n for n in names if (component, n) not in self._base]
        if missing:
            runner.verify_source()
            for name, array in base_initializers(runner.source.path, missing).items():
                self._base[(component, name)] = array
        return {t.initializer: adapted(self._base[(component, t.initializer)], delta, t, key, field_name)
                for key, delta in deltas.items() for t in targets[key]}

    def _records(self) -> dict[str, GraphWeights]:
        if self._graphs is None:
            graphs = {}
            for component, runner in self._runners.items():
                runner.verify_source()                    # its metadata is read from the source graph
                record = read_graph_weights(runner.source.path)
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
