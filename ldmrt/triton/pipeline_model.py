"""Triton Python-backend model that runs ldmrt's Pipeline (written by `ldmrt triton` as model.py).

Each model instance is its own stub process holding one `Pipeline` over the bundle in
`<version>/bundle/` on the backend named in config.pbtxt's parameters (onnxruntime on CPU or
CUDA, or TensorRT). The torch-free part of ldmrt sits next to this file in `<version>/ldmrt/`,
so the server's Python needs only numpy and the backend's module (onnxruntime, or tensorrt +
cuda-python). A request is what `ldmrt generate` takes; a bad request gets an error response
naming the problem, and the instance keeps serving.

Request tensors (all optional; one element each unless said; declared in pipeline_io.py, each
named as the GenerationRequest field it fills):
  prompt           BYTES [N]  one image per prompt (default: one empty prompt)
  negative_prompt  BYTES [1 or N]  (absent: "", or SDXL's zero embeddings)
  steps INT32, guidance FP32, sampler BYTES, seed INT64, height INT32, width INT32
  SDXL: original_size, crops_coords_top_left, target_size INT32 [2] (height, width);
        aesthetic_score, negative_aesthetic_score FP32 (the refiner)
  hand-off: denoising_end, denoising_start FP32; init_latents FP32 [N, C, h, w]
  lora             BYTES [K]  "NAME" or "NAME:SCALE": LoRA adapters of config.pbtxt's parameter
                   `loras` (adapters.py) the request runs on; absent or empty: the base weights
Response: images FP32 [N, H, W, 3] in [0, 1], exactly GenerationResult.images (absent with
denoising_end), latents FP32 [N, C, h, w] (GenerationResult.latents, what a refiner continues),
and warnings BYTES [K] (GenerationResult.warnings, e.g. a truncated prompt; K may be 0).

Errors: the caller's mistakes (an error with `field`, a tensor that does not decode, a request
over the repository's `max_cost`) are INVALID_ARG (HTTP 400); a request its gRPC client cancelled
is CANCELLED; anything else is INTERNAL (HTTP 500). Each failure also counts in the custom counter
`ldmrt_pipeline_failures{model, reason}` on Triton's /metrics: this Python backend (2.51) counts
error responses as successes in nv_inference_request_success (measured), and raising from
`execute` instead would fail every request of the batch with a 500.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if (HERE / "ldmrt").is_dir() and str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))   # the vendored runtime wins over any installed ldmrt

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from ldmrt.triton.pipeline_io import (ADAPTERS, EVERY_REQUEST_TENSOR, IMAGES, LATENTS,  # noqa: E402
                                     WARNINGS, Form, RequestTensor)

FAILURE_REASONS = ("invalid_argument", "cancelled", "internal")


class TritonPythonModel:
    """Triton calls initialize once per instance, then execute with lists of requests."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        gpu = args.get("model_instance_kind") == "GPU"
        if gpu:
            # One stub process per instance: pin it to its GPU before any CUDA library loads.
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args.get("model_instance_device_id", "0"))
        self.logger = pb_utils.Logger
        _log_through_triton(self.logger)
        from ldmrt.runtime.pipeline import Pipeline
        from ldmrt.triton.adapters import PARAMETER, parse_adapters, served_adapters

        verify = params.get("verify", "true") == "true"
        # Checked before the bundle loads: a missing or changed adapter file fails the model's load.
        self.adapters = served_adapters(parse_adapters(params.get(PARAMETER, "{}"), str(HERE.parent)),
                                        HERE, verify)
        backend = params.get("backend", "onnxruntime")
        options: dict = {}
        if backend == "onnxruntime":
            device = params.get("device", "auto")
            options["device"] = ("cuda" if gpu else "cpu") if device == "auto" else device
            threads = int(params.get("threads", "0") or 0)
            if threads:
                options["threads"] = threads
        bundle = HERE / params.get("bundle", "bundle")
        self.pipeline = Pipeline.load(bundle, backend, verify=verify,
                                      max_cost=float(params.get("max_cost", "0") or 0), **options)
        if self.adapters and not self.pipeline.loras.can_switch:
            from ldmrt.errors import LoraError

            # at load, not as a 400 on every request that names one
            raise LoraError(f"loras: adapters {sorted(self.adapters)} are configured, but this pipeline "
                            f"cannot switch adapters: {self.pipeline.loras.why_not}", field="loras")
        self.failures = _failure_counters(config.get("name", args.get("model_name", "pipeline")))
        self.logger.log_info(f"ldmrt pipeline {self.pipeline.manifest.name} loaded from {bundle} on "
                             f"{backend} {options}, adapters {sorted(self.adapters)} "
                             f"(instance {args.get('model_instance_name')})")

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                generation = self.generation_request(request)
                # Runs on exactly the chosen adapters: switched to first if others are active
                # (after the requests in flight on those), at once if they are.
                with self.pipeline.loras.using(self.adapter_choices(request)):
                    result = self.pipeline.generate(generation, **self.cancel_options(request))
                outputs = [pb_utils.Tensor(name, np.ascontiguousarray(array, dtype=np.float32))
                           for name, array in ((IMAGES, result.images), (LATENTS, result.latents))
                           if array is not None]       # images (N, H, W, 3): None with denoising_end
                warnings = np.array([m.encode("utf-8") for m in result.warnings], dtype=np.object_)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    *outputs, pb_utils.Tensor(WARNINGS, warnings)]))
            except Exception as exc:  # one bad request must not take the instance down
                responses.append(self.error_response(exc))
        return responses

    def error_response(self, exc: Exception):
        """INVALID_ARG for the caller's mistakes, CANCELLED, else INTERNAL; counted per reason."""
        from ldmrt.errors import GenerationCancelled

        if isinstance(exc, GenerationCancelled):
            reason, code, message = "cancelled", pb_utils.TritonError.CANCELLED, str(exc)
            self.logger.log_info(f"ldmrt pipeline: {exc}")
        elif getattr(exc, "field", None) is not None:
            reason, code, message = "invalid_argument", pb_utils.TritonError.INVALID_ARG, str(exc)
            self.logger.log_info(f"ldmrt pipeline: bad request: {exc}")
        else:
            reason, code = "internal", pb_utils.TritonError.INTERNAL
            message = f"{type(exc).__name__}: {exc}"
            self.logger.log_error(f"ldmrt pipeline: {message}")
        if self.failures:
            self.failures[reason].increment(1)
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))

    def cancel_options(self, request) -> dict:
        """The Pipeline's cancel check: this request's is_cancelled (its gRPC client went away)."""
        is_cancelled = getattr(request, "is_cancelled", None)     # Python backends before 23.10 lack it
        return {} if is_cancelled is None else {"cancel": is_cancelled}

    def adapter_choices(self, request) -> tuple:
        """The request's `lora` input as LoraChoices of the configured adapters (() without one)."""
        from ldmrt.triton.adapters import requested_adapters

        tensor = pb_utils.get_input_tensor_by_name(request, ADAPTERS.name)
        if tensor is None:
            return ()
        return requested_adapters(_read(ADAPTERS, tensor.as_numpy()), self.adapters)

    def generation_request(self, request):
        """The request's tensors as a GenerationRequest (defaults where a tensor is absent). Every
        known input is read, declared or not: the Pipeline refuses, by name, a field its model
        does not take (Triton itself refuses an input config.pbtxt does not declare)."""
        from ldmrt.errors import LdmrtError
        from ldmrt.runtime.pipeline import GenerationRequest

        fields: dict = {}
        for name, declared in EVERY_REQUEST_TENSOR.items():
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:       # shapes and ranges: checked by the Pipeline, named by field
                fields[name] = _read(declared, tensor.as_numpy())
        prompts = fields.pop("prompt", None)
        if prompts is not None:
            if not prompts:
                raise LdmrtError("prompt: expected at least one string, found an empty tensor", field="prompt")
            fields["prompt"] = prompts if len(prompts) > 1 else prompts[0]
            fields["batch"] = len(prompts)
        negative = fields.pop("negative_prompt", None)
        if negative is not None:
            fields["negative_prompt"] = negative if len(negative) > 1 else (negative[0] if negative else "")
        return GenerationRequest(**fields)

    def finalize(self) -> None:
        self.pipeline = None


def _read(declared: RequestTensor, array: np.ndarray):
    """One request tensor as its GenerationRequest field takes it."""
    from ldmrt.errors import LdmrtError

    name, form = declared.name, declared.form
    if form == Form.ARRAY:
        return array.astype(declared.field_dtype or array.dtype, copy=False)
    if form == Form.PAIR:       # as sent: the runtime checks two integers in range, naming the field
        return array.tolist()
    values = array.reshape(-1)
    if form == Form.TEXTS:
        return [_text(value, name, i) for i, value in enumerate(values)]
    if values.size != 1:
        raise LdmrtError(f"{name}: expected one element, found shape {list(array.shape)}", field=name)
    if form == Form.NUMBER:
        return values[0].item() if hasattr(values[0], "item") else values[0]
    text = _text(values[0], name, 0)
    if form == Form.TEXT:
        return text
    try:
        return json.loads(text)
    except ValueError as exc:
        raise LdmrtError(f"{name}: not JSON ({exc})", field=name) from None


def _text(value, name: str, index: int) -> str:
    """One BYTES element as text; a caller's mistake (INVALID_ARG) when it is not UTF-8."""
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        from ldmrt.errors import LdmrtError

        raise LdmrtError(f"{name}: element {index} is not UTF-8 text (byte {exc.start}: "
                         f"{value[exc.start:exc.start + 1]!r}); send UTF-8", field=name) from None


_FAMILIES: list = []


def _failure_counters(model: str) -> dict | None:
    """One counter per failure reason, shown on Triton's /metrics; None where the backend has no
    custom metrics (before 23.05)."""
    family_type = getattr(pb_utils, "MetricFamily", None)
    if family_type is None:
        return None
    family = family_type(name="ldmrt_pipeline_failures",
                         description="Failed ldmrt pipeline requests by reason "
                                     "(invalid_argument: HTTP 400, cancelled, internal: HTTP 500)",
                         kind=family_type.COUNTER)
    counters = {reason: family.Metric(labels={"model": model, "reason": reason}) for reason in FAILURE_REASONS}
    _FAMILIES.append(family)           # a family must outlive its metrics
    return counters


def _log_through_triton(logger) -> None:
    """ldmrt's own log records (e.g. a truncated prompt) go to Triton's log once, through its
    logger, instead of also reaching the stub's stderr through Python's last-resort handler."""
    import logging

    class TritonHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            write = (logger.log_error if record.levelno >= logging.ERROR else
                     logger.log_warn if record.levelno >= logging.WARNING else logger.log_info)
            write(f"{record.name}: {self.format(record)}")

    root = logging.getLogger("ldmrt")
    root.handlers = [TritonHandler()]
    root.setLevel(logging.WARNING)
    root.propagate = False
