"""What every backend offers: a runner per component and a denoiser (ldmrt.engines.dispatch opens
them from a bundle; each backend module implements them).

Torch-free. A runner takes numpy arrays named and typed as the component's I/O spec says,
checks them against the spec before running, and returns the first output as numpy (`run_all`:
every output by name, for components with more than one, e.g. SDXL's pooled embedding). The
denoiser runs the whole loop (ldmrt.sampling.denoise): every backend offers one, the numpy
reference over its UNet runner unless it does better on its device.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol

import numpy as np

from ldmrt.engines.backend import Backend
from ldmrt.iospec import Component, ComponentSpec
from ldmrt.manifest import Manifest, verify_bundle
from ldmrt.sampling.denoise import Denoiser, NumpyDenoiser
from ldmrt.sampling.image_guide import GuideGradient

BACKENDS = tuple(b.value for b in Backend)


class ComponentRunner(Protocol):
    spec: ComponentSpec

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray: ...

    def run_all(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class BackendRunners:
    """What a backend opens from a bundle: a runner per component, and the loop on that backend."""
    runners: dict[str, ComponentRunner]
    denoiser: Denoiser | None          # None when the UNet was not opened
    # post-hoc image guidance: target (B, 3, h, w) in [0, 1] -> the gradient of its guide loss
    # (ldmrt.sampling.image_guide); None where the backend cannot differentiate its decoder
    image_gradient: Callable[[np.ndarray], GuideGradient] | None = None
    weights: object | None = None      # its LoRA switch (ldmrt.lora.slot.Switch); None: it cannot switch

    @classmethod
    def with_numpy_loop(cls, runners: dict[str, ComponentRunner]) -> "BackendRunners":
        """The runners with the reference loop over their UNet runner (guidance, update on the host)."""
        unet = runners.get(Component.UNET)
        return cls(runners, None if unet is None else NumpyDenoiser(unet, unet.spec))


def verify_graphs(bundle: Path, manifest: Manifest, components: Iterable[str]) -> None:
    """BundleError naming the file unless every file of `components` has the manifest's size and
    sha256. The graphs only: the tokenizer is the pipeline's to check (Pipeline.load), once."""
    verify_bundle(bundle, dataclasses.replace(manifest, tokenizer=None), components=list(components))
