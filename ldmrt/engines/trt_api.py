"""The one place where the `tensorrt` and TensorRT-RTX Python modules differ.

Both modules share the TensorRT 10/11 API (builder, ONNX parser, runtime, execution context).
They differ in: the import name, what the builder may target (RTX compiles ahead of time for
a list of compute capabilities, on a machine without a GPU; `tensorrt` builds for the GPU it
runs on, or for "Ampere and later" with hardware compatibility), whether a timing cache does
anything (a no-op in RTX), and which flags exist. Everything else in ldmrt talks to `TrtApi`.
Lean: imports only the standard library until a backend is loaded.
"""
from __future__ import annotations

import importlib
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterator, Sequence

from ldmrt.engines.backend import ENGINE_BACKENDS
from ldmrt.errors import BackendUnavailableError, ConfigError

log = logging.getLogger(__name__)

TENSORRT = "tensorrt"
TENSORRT_RTX = "tensorrt-rtx"
BACKENDS = tuple(b.value for b in ENGINE_BACKENDS)      # (TENSORRT, TENSORRT_RTX)

# Import names, first found wins. NVIDIA's SDK archive ships `tensorrt_rtx`; the PyPI wheels
# tensorrt-rtx-cu13-bindings / -cu12-bindings ship `tensorrt_rtx_bindings`.
MODULE_NAMES = {TENSORRT: ("tensorrt",), TENSORRT_RTX: ("tensorrt_rtx", "tensorrt_rtx_bindings")}
INSTALL_HINT = {
    TENSORRT: "pip install tensorrt (needs an NVIDIA GPU to build and to run)",
    TENSORRT_RTX: "pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs",
}

# An RTX engine built with no target runs on Ampere, Ada and Blackwell RTX GPUs (TensorRT-RTX
# 1.x documentation); Turing (sm75) only when asked for. Not on Hopper: an H100 (sm90) reported
# UNSUPPORTED_CC for such an engine. tensorrt's "ampere+" covers every GPU from sm80 on.
RTX_DEFAULT = "default"
RTX_DEFAULT_CAPABILITIES = (80, 86, 89, 120, 121)
AMPERE_PLUS = "ampere+"


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1,
             "uint8": 1, "bool": 1}
_NUMPY_NAME = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64",
               "INT32": "int32", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def target_name(major: int, minor: int) -> str:
    """'sm86' for compute capability 8.6."""
    return f"sm{major}{minor}"


def target_capability(target: str) -> int | None:
    """86 for 'sm86'; None for a symbolic target ('default', 'ampere+')."""
    return int(target[2:]) if target.startswith("sm") and target[2:].isdigit() else None


def numpy_dtype_name(trt_dtype: Any) -> str:
    """numpy's name for a TensorRT DataType (by enum name, so fakes and both modules work)."""
    name = getattr(trt_dtype, "name", str(trt_dtype))
    try:
        return _NUMPY_NAME[name]
    except KeyError:
        raise ConfigError(f"TensorRT dtype {name} has no numpy equivalent in ldmrt") from None


def itemsize(dtype_name: str) -> int:
    return _ITEMSIZE[dtype_name]


def _severity_level(module: ModuleType, severity: Any) -> int:
    s = module.ILogger.Severity
    return {s.INTERNAL_ERROR: logging.CRITICAL, s.ERROR: logging.ERROR, s.WARNING: logging.WARNING,
            s.INFO: logging.DEBUG, s.VERBOSE: logging.DEBUG}.get(severity, logging.DEBUG)


def _make_logger(module: ModuleType) -> Any:
    """An ILogger that forwards to `logging` and lets a thread capture its messages."""

    class CapturingLogger(module.ILogger):  # type: ignore[name-defined, misc]
        def __init__(self) -> None:
            module.ILogger.__init__(self)
            self.local = threading.local()

        def log(self, severity: Any, msg: str) -> None:
            level = _severity_level(module, severity)
            log.log(level, "[%s] %s", module.__name__, msg)
            captured = getattr(self.local, "messages", None)
            if captured is not None and level >= logging.WARNING:
                captured.append(msg)

    return CapturingLogger()


@dataclass(frozen=True)
class TrtApi:
    """A loaded TensorRT module and what its flavour can do."""
    name: str                  # builder name recorded in engine records: tensorrt | tensorrt-rtx
    module: ModuleType

    @property
    def version(self) -> str:
        return str(getattr(self.module, "__version__", "unknown"))

    @property
    def is_rtx(self) -> bool:
        return self.name == TENSORRT_RTX

    @property
    def logger(self) -> Any:
        """One process-wide logger per module: TensorRT warns when builders get different ones."""
        cached = _LOGGERS.get(self.module.__name__)
        if cached is None:
            cached = _LOGGERS.setdefault(self.module.__name__, _make_logger(self.module))
        return cached

    @contextmanager
    def capture(self) -> Iterator[list[str]]:
        """Collect this thread's warnings and errors from TensorRT (for error messages)."""
        local = self.logger.local
        previous, local.messages = getattr(local, "messages", None), []
        try:
            yield local.messages
        finally:
            local.messages = previous

    def network_flags(self) -> int:
        """Strongly typed networks: precision comes from the ONNX graph, never from flags."""
        flags = self.module.NetworkDefinitionCreationFlag
        return 1 << int(flags.STRONGLY_TYPED) if hasattr(flags, "STRONGLY_TYPED") else 0

    def has_flag(self, flag: str) -> bool:
        return hasattr(self.module.BuilderFlag, flag)

    def set_flag(self, config: Any, flag: str) -> None:
        """Set BuilderFlag `flag` (REFIT, WEIGHT_STREAMING, VERSION_COMPATIBLE, ...)."""
        if not self.has_flag(flag):
            raise ConfigError(f"{self.name} {self.version}: builder flag {flag} does not exist in "
                              f"this version; drop the option or use another backend")
        config.set_flag(getattr(self.module.BuilderFlag, flag))

    @property
    def strongly_typed(self) -> bool:
        """Whether networks are strongly typed: by flag, or because it is the only kind (11, RTX)."""
        major = self.version.split(".")[0]
        return self.network_flags() != 0 or self.is_rtx or (major.isdigit() and int(major) >= 11)

    def check_build_flags(self, version_compatible: bool) -> None:
        """Refuse up front what this flavour cannot build (else TensorRT fails deep in the build)."""
        if self.is_rtx and version_compatible:
            raise ConfigError(f"{self.name} {self.version}: version-compatible engines need "
                              f"TensorRT's lean runtime (libnvinfer_lean), which TensorRT-RTX does "
                              f"not ship; build without version_compatible")

    def build_failure_hint(self, refit: bool) -> str:
        """What to try when build_serialized_network returned nothing."""
        if self.is_rtx and refit:
            return (" TensorRT-RTX 1.7 built no REFIT engine in ldmrt's checks, neither on a CPU-only "
                    "machine nor next to an unsupported GPU (H100): build on a machine with an RTX "
                    "GPU, or without refit.")
        return ""

    @property
    def timing_cache_effective(self) -> bool:
        """TensorRT-RTX keeps the timing-cache API as a no-op (deprecated in RTX 1.2)."""
        return not self.is_rtx

    def resolve_targets(self, targets: Sequence[str]) -> tuple[str, ...]:
        """What an engine built for the requested GPU targets records (checked, no builder needed).

        RTX: compute capabilities ("sm86", "sm89", "sm120", ...), compiled ahead of time without
        a GPU; none means the builder's default portable set. tensorrt: none means the GPU this
        process sees; "ampere+" means hardware compatibility with Ampere and later.
        """
        targets = tuple(dict.fromkeys(t.lower() for t in targets))
        if self.is_rtx:
            if not targets or targets == (RTX_DEFAULT,):
                return (RTX_DEFAULT,)
            known = self._compute_capabilities()
            unknown = [t for t in targets if t not in known]
            if unknown:
                raise ConfigError(f"{self.name} {self.version}: unknown compute capabilities "
                                  f"{unknown}; expected some of {sorted(known)}")
            return targets
        if targets == (AMPERE_PLUS,):
            return targets
        if targets:
            raise ConfigError(f"tensorrt builds for the GPU it runs on or for {AMPERE_PLUS!r}; "
                              f"found targets {list(targets)}. Compile for other compute "
                              f"capabilities with --backend tensorrt-rtx")
        return (current_gpu_target(),)

    def set_targets(self, config: Any, targets: Sequence[str]) -> tuple[str, ...]:
        """Apply the requested GPU targets to `config`; return what the engine record says."""
        resolved = self.resolve_targets(targets)
        if self.is_rtx and resolved != (RTX_DEFAULT,):
            known = self._compute_capabilities()
            config.num_compute_capabilities = len(resolved)
            for index, target in enumerate(resolved):
                if not config.set_compute_capability(known[target], index):
                    raise ConfigError(f"{self.name}: set_compute_capability({target}, {index}) failed")
        elif resolved == (AMPERE_PLUS,):
            config.hardware_compatibility_level = self.module.HardwareCompatibilityLevel.AMPERE_PLUS
        return resolved

    def _compute_capabilities(self) -> dict[str, Any]:
        return {m.lower(): v for m, v in self.module.ComputeCapability.__members__.items()
                if m.startswith("SM")}

    def engine_validity(self, runtime: Any, plan: bytes) -> tuple[str, list[str]] | None:
        """RTX only: ("VALID"|"SUBOPTIMAL"|"INVALID", reasons) from the plan header; else None."""
        check = getattr(runtime, "get_engine_validity", None)
        if check is None:
            return None
        validity, diagnostics = check(plan)
        reasons = [name for name, bit in
                   getattr(self.module, "EngineInvalidityDiagnostics").__members__.items()
                   if int(diagnostics) & int(bit)]
        return validity.name, reasons


_LOGGERS: dict[str, Any] = {}


def load(backend: str) -> TrtApi:
    """Import the module behind `backend`; BackendUnavailableError names the pip packages."""
    if backend not in MODULE_NAMES:
        raise ConfigError(f"backend {backend!r}: expected one of {list(BACKENDS)}")
    errors = []
    for module_name in MODULE_NAMES[backend]:
        try:
            return TrtApi(backend, importlib.import_module(module_name))
        except (ImportError, OSError) as exc:   # OSError: a wheel without its shared libraries
            errors.append(f"{module_name}: {exc}")
    raise BackendUnavailableError(f"backend {backend}: no module {' or '.join(MODULE_NAMES[backend])} "
                                  f"could be imported ({'; '.join(errors)}); {INSTALL_HINT[backend]}")


def available(backend: str) -> bool:
    try:
        load(backend)
    except BackendUnavailableError:
        return False
    return True


def wrap(module: ModuleType, backend: str) -> TrtApi:
    """A TrtApi around an already imported (or fake) module."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}: expected one of {list(BACKENDS)}")
    return TrtApi(backend, module)


# --- CUDA (cuda-python), imported lazily ----------------------------------------------------

def cudart() -> Any:
    """cuda-python's runtime module; BackendUnavailableError when it is not installed."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BackendUnavailableError("cuda-python is not installed: the TensorRT runtime needs it for "
                                  "device buffers and streams; pip install cuda-python")


def check_cuda(result: Any, what: str) -> Any:
    """Unpack a cuda-python (err, value...) tuple; BackendUnavailableError on an error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise BackendUnavailableError(f"CUDA {what} failed: {name}; is an NVIDIA GPU with a "
                                      f"recent driver present?")
    return values[0] if len(values) == 1 else tuple(values) or None


def current_gpu_target(device: int = 0) -> str:
    """'sm90' for the GPU this process sees; BackendUnavailableError without one."""
    rt = cudart()
    count = check_cuda(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if count < 1:
        raise BackendUnavailableError("no CUDA GPU is visible to this process")
    attr = rt.cudaDeviceAttr
    major = check_cuda(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device),
                       "cudaDeviceGetAttribute")
    minor = check_cuda(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device),
                       "cudaDeviceGetAttribute")
    return target_name(int(major), int(minor))
