"""One interface over every backend: a runner per component and a denoiser, opened from a bundle.

Torch-free. A runner takes numpy arrays named and typed as the component's I/O spec says,
checks them against the spec before running, and returns the first output as numpy. The
denoiser runs the whole loop (ldmrt.sampling.denoise): every backend offers one, the numpy
reference over its UNet runner unless it does better on its device.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Protocol

import numpy as np

from ldmrt.engines.backend import Backend
from ldmrt.errors import BackendUnavailableError
from ldmrt.iospec import ComponentSpec
from ldmrt.manifest import Manifest, verify_bundle
from ldmrt.sampling.denoise import Denoiser, NumpyDenoiser

BACKENDS = tuple(b.value for b in Backend)


class ComponentRunner(Protocol):
    spec: ComponentSpec

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray: ...


@dataclass(frozen=True)
class BackendRunners:
    """What a backend opens from a bundle: a runner per component, and the loop on that backend."""
    runners: dict[str, ComponentRunner]
    denoiser: Denoiser | None          # None when the UNet was not opened

    @classmethod
    def with_numpy_loop(cls, runners: dict[str, ComponentRunner]) -> "BackendRunners":
        """The runners with the reference loop over their UNet runner (guidance, update on the host)."""
        unet = runners.get("unet")
        return cls(runners, None if unet is None else NumpyDenoiser(unet, unet.spec))


def verify_graphs(bundle: Path, manifest: Manifest, components: Iterable[str]) -> None:
    """BundleError naming the file unless every file of `components` has the manifest's size and
    sha256. The graphs only: the tokenizer is the pipeline's to check (Pipeline.load), once."""
    verify_bundle(bundle, dataclasses.replace(manifest, tokenizer=None), components=list(components))


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
        return BackendRunners.with_numpy_loop(
            open_onnxruntime(bundle, manifest, components, verify=verify, **options))
    if verify:
        verify_graphs(bundle, manifest, components)
    if backend in ("tensorrt", "tensorrt-rtx"):
        from ldmrt.engines.tensorrt import open_tensorrt
        return BackendRunners.with_numpy_loop(
            open_tensorrt(bundle, manifest, components, backend=backend, **options))
    try:
        from ldmrt.engines.torch import open_torch
    except ImportError as exc:
        raise BackendUnavailableError(f"backend torch: needs PyTorch ({exc}); pip install torch==2.13.0",
                                      field="backend") from None
    return open_torch(bundle, manifest, components, **options)
