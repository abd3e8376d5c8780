"""Typed exceptions: every message names the thing, what was expected, what was found, what to do."""
from __future__ import annotations


class LdmrtError(Exception):
    """Base of every error ldmrt raises on purpose (the CLI turns these into exit code 2).

    `field` names the caller's input at fault (a `GenerationRequest` field such as "steps" or
    "latents", an option of a library call) when the error is the caller's mistake: the message
    then starts with that field's name, the CLI swaps it for its flag (`--steps`) and Triton
    answers 400 / INVALID_ARG. None: not the caller's input (a model, a file, the machine).
    """

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ConfigError(LdmrtError, ValueError):
    """A configuration or preset is invalid."""


class CheckpointError(LdmrtError):
    """A checkpoint file or folder is missing, unsafe, corrupt or does not match the model."""


class ShapeError(LdmrtError, ValueError):
    """A tensor's shape or dtype is not what a component's I/O spec allows."""


class ExportError(LdmrtError):
    """Exporting or validating an ONNX graph failed."""


class ParityError(ExportError):
    """An exported graph disagrees with PyTorch beyond the stated tolerance."""


class BundleError(LdmrtError):
    """A bundle (manifest.json + files) is missing, corrupt or of an unknown schema."""


class EngineBuildError(LdmrtError):
    """TensorRT could not parse or build an ONNX graph."""


class StaleEngineError(LdmrtError):
    """An engine was built for another TensorRT version, GPU or ONNX graph."""


class CorruptEngineError(BundleError):
    """An engine's plan file does not match its record, or the record itself is malformed."""


class BackendUnavailableError(LdmrtError):
    """The requested backend (module, GPU) is not available on this machine."""


class GenerationError(LdmrtError, ValueError):
    """A generation request is invalid or produced non-finite values."""


class GenerationCancelled(LdmrtError):
    """A caller cancelled a generation between two denoising steps; no image was made."""


class LoraError(LdmrtError, ValueError):
    """A LoRA file that cannot be read, or does not fit the model (ldmrt.lora)."""


class EmbedError(LdmrtError):
    """libldmrt (the C ABI, ldmrt.embed) cannot be built here, or a file in its way is not ldmrt's."""
