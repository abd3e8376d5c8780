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
    opener = _opener(backend)
    if backend == "onnxruntime":
        from ldmrt.engines.ort_lora import ort_switch

        runners = opener(bundle, manifest, components, verify=verify, **options)
        return dataclasses.replace(BackendRunners.with_numpy_loop(runners), weights=ort_switch(runners))
    if verify:
        verify_graphs(bundle, manifest, components)
    if backend in ("tensorrt", "tensorrt-rtx"):
        return opener(bundle, manifest, components, backend=backend, **options)
    return opener(bundle, manifest, components, **options)


def _opener(backend: str):
    """The function that opens a bundle on `backend` (imported now: only the chosen backend loads)."""
    if backend == "onnxruntime":
        from ldmrt.engines.onnxruntime import open_onnxruntime
        return open_onnxruntime
    if backend in ("tensorrt", "tensorrt-rtx"):
        from ldmrt.engines.tensorrt import open_tensorrt
        return open_tensorrt
    try:
        from ldmrt.engines.torch import open_torch
    except ImportError as exc:
        raise BackendUnavailableError(f"backend torch: needs PyTorch ({exc}); pip install torch==2.13.0",
                                      field="backend") from None
    return open_torch


# What open_runners passes itself; every other keyword of a backend's opener is the caller's option.
_OWN_ARGUMENTS = {"bundle", "manifest", "components", "verify", "backend"}


def backend_options(backend: str, options: dict, *, field: str = "backend_options") -> dict:
    """`options` checked against `backend`'s opener (its keyword arguments): ConfigError naming
    `field`, the unknown name and every option the backend takes."""
    import inspect

    from ldmrt.errors import ConfigError

    backend = Backend.parse(backend).value
    if not isinstance(options, dict) or not all(isinstance(name, str) for name in options):
        raise ConfigError(f"{field}: expected an object of option names, found {type(options).__name__}",
                          field=field)
    opener = _opener(backend)
    taken = sorted(name for name, parameter in inspect.signature(opener).parameters.items()
                   if parameter.kind is parameter.KEYWORD_ONLY and name not in _OWN_ARGUMENTS)
    unknown = sorted(set(options) - set(taken))
    if unknown:
        raise ConfigError(f"{field}: {', '.join(map(repr, unknown))} is not an option of backend {backend}; "
                          f"expected some of {', '.join(taken) or 'none'}", field=field)
    return options
