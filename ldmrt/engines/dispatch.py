"""open_runners: the one place that picks a backend module for a bundle (every backend imports
ldmrt.engines.base; this module imports the backends, each only when it is chosen, so a service
loads numpy + one backend and no torch)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ldmrt.engines.backend import Backend
from ldmrt.engines.base import BackendRunners, verify_graphs
from ldmrt.errors import BackendUnavailableError
from ldmrt.manifest import Manifest


def open_runners(backend: str, bundle: Path, manifest: Manifest, components: tuple[str, ...], *,
                 verify: bool = True, **options) -> BackendRunners:
    """Runners for `components` of the bundle on `backend`, and its denoiser;
    BackendUnavailableError if it cannot load.

    `verify`: each component's files are checked (verify_graphs) before the backend reads them.
    Here is where it is decided by what: ONNX Runtime reads a source graph only when its
    optimized-graph cache cannot serve the component, so it checks that graph right before reading
    it (open_onnxruntime: those without an entry before any is loaded), and a cache hit is checked
    through its own entry, whose key is the manifest's digest; every other backend reads (or
    rebuilds from) every graph, so all are checked here first."""
    backend = Backend.parse(backend).value          # any case; ConfigError naming `backend` otherwise
    if backend == "onnxruntime":
        from ldmrt.engines.onnxruntime import open_onnxruntime
        from ldmrt.engines.ort_lora import ort_switch

        runners = open_onnxruntime(bundle, manifest, components, verify=verify, **options)
        return dataclasses.replace(BackendRunners.with_numpy_loop(runners), weights=ort_switch(runners))
    if verify:
        verify_graphs(bundle, manifest, components)
    if backend in ("tensorrt", "tensorrt-rtx"):
        from ldmrt.engines.tensorrt import open_tensorrt
        return open_tensorrt(bundle, manifest, components, backend=backend, **options)
    try:
        from ldmrt.engines.torch import open_torch
    except ImportError as exc:
        raise BackendUnavailableError(f"backend torch: needs PyTorch ({exc}); pip install torch==2.13.0",
                                      field="backend") from None
    return open_torch(bundle, manifest, components, **options)
