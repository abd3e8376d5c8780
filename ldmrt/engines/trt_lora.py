"""LoRA adapters switched at run time on TensorRT: refittable engines (`ldmrt build --refit`) get
the new weights in place (ldmrt.lora.graph_switch computes them from the ONNX graph the engine was
built from; TensorRT's ONNX parser names an engine's weights after the graph's initializers).

The switch checks, before any weight changes, that every initializer it will set is a refittable
weight of its engine; the refit itself runs at the commit, under the pipeline's adapter lock (no
request in flight), and then drops every captured CUDA graph of that engine and of the denoising
loop over it, so no replay runs on what the engine held before. Engines built without --refit
cannot switch: the pipeline's slot says so (`AdapterSlot`), naming `ldmrt build --refit`.

Not run here: CI has no GPU and TensorRT-RTX 1.7 builds no refittable engine on a CPU-only machine,
so this module is tested against a stand-in refitter (tests/test_lora_runtime.py), not TensorRT.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ldmrt.errors import BackendUnavailableError, LoraError
from ldmrt.lora.graph_switch import GraphSwitch


@dataclass(frozen=True)
class _BuiltFrom:
    """The ONNX graph an engine was built from (checked with the engines when the bundle opened)."""
    path: Path

    def verify(self) -> None:
        pass


def trt_switch(api: Any, graph_of: Callable[[str], Path], engines: Mapping[str, Any],
               after_refit: Callable[[str], None] = lambda component: None) -> GraphSwitch | None:
    """The switch over `engines` (component -> TensorRTRunner: `.engine`, `.drop_graphs()`), each
    built from the ONNX graph at `graph_of(component)`; None when no engine is refittable.
    `after_refit(component)` runs after each refit (the denoiser drops its loop graphs there)."""
    refittable = {name: runner for name, runner in engines.items() if getattr(runner.engine, "refittable", False)}
    if not refittable:
        return None

    def stage(component: str, values: dict[str, np.ndarray], adapted: bool, field_name: str):
        runner = refittable[component]
        refitter = api.module.Refitter(runner.engine, api.logger)
        known = set(refitter.get_all_weights())
        unknown = sorted(set(values) - known)
        if unknown:
            raise LoraError(f"{field_name}: the {component} engine has no refittable weights named {unknown[:3]}"
                            f"{' ...' if len(unknown) > 3 else ''} (TensorRT folded them into others); fuse "
                            f"these adapters at export instead (ldmrt export ... --lora FILE[:SCALE])",
                            field=field_name)
        arrays = {name: np.ascontiguousarray(value) for name, value in values.items()}

        def refit() -> None:
            for name, array in arrays.items():
                if not refitter.set_named_weights(name, api.module.Weights(array)):
                    raise BackendUnavailableError(f"{component}: TensorRT refused the weights of {name} "
                                                  f"{array.dtype} {list(array.shape)}; reload the pipeline")
            if not refitter.refit_cuda_engine():
                raise BackendUnavailableError(f"{component}: TensorRT could not refit the engine (its weights "
                                              f"may be partly replaced); reload the pipeline")
            runner.drop_graphs()
            after_refit(component)

        return refit

    return GraphSwitch({name: _BuiltFrom(graph_of(name)) for name in refittable}, stage)
