"""LoRA adapters switched at run time on ONNX Runtime: a new session of each graph whose weights
change, with those initializers replaced (ldmrt.lora.graph_switch computes them; the runner opens
the session, OnnxRuntimeRunner.reopened). A graph back at its base weights gets its base session
again (from the optimized-graph cache where there is one). Sessions are built while requests keep
running; the commit only swaps them. Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ldmrt.lora.graph_switch import GraphSwitch


@dataclass(frozen=True)
class _RunnerGraph:
    runner: object

    @property
    def path(self) -> Path:
        return self.runner.source.path

    def verify(self) -> None:
        self.runner.verify_source()


def ort_switch(runners: Mapping[str, object]) -> GraphSwitch:
    """The switch over ONNX Runtime runners (component -> OnnxRuntimeRunner)."""

    def stage(component: str, values, adapted: bool, field_name: str):
        runner = runners[component]
        session, held = runner.reopened(values if adapted else None)
        return lambda: runner.use(session, held, adapted)

    return GraphSwitch({name: _RunnerGraph(r) for name, r in runners.items()}, stage)
