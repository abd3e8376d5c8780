"""One interface over every backend: a runner per component, opened from a bundle.

Torch-free. A runner takes numpy arrays named and typed as the component's I/O spec says,
checks them against the spec before running, and returns the first output as numpy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from ldmrt.engines.backend import Backend
from ldmrt.errors import BackendUnavailableError
from ldmrt.iospec import ComponentSpec
from ldmrt.manifest import Manifest

BACKENDS = tuple(b.value for b in Backend)


class ComponentRunner(Protocol):
    spec: ComponentSpec

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray: ...


def open_runners(backend: str, bundle: Path, manifest: Manifest, components: tuple[str, ...],
                 **options) -> dict[str, ComponentRunner]:
    """Runners for `components` of the bundle on `backend`; BackendUnavailableError if it cannot load."""
    if backend == "onnxruntime":
        from ldmrt.engines.onnxruntime import open_onnxruntime
        return open_onnxruntime(bundle, manifest, components, **options)
    if backend in ("tensorrt", "tensorrt-rtx"):
        from ldmrt.engines.tensorrt import open_tensorrt
        return open_tensorrt(bundle, manifest, components, backend=backend, **options)
    if backend == "torch":
        try:
            from ldmrt.engines.torch import open_torch
        except ImportError as exc:
            raise BackendUnavailableError(f"--backend torch needs PyTorch: {exc}; "
                                          f"pip install torch==2.13.0") from None
        return open_torch(bundle, manifest, components, **options)
    raise BackendUnavailableError(f"--backend {backend!r}: expected one of {list(BACKENDS)}")
