"""Triton Python-backend model that runs ldmrt's Pipeline (written by `ldmrt triton` as model.py).

Each model instance is its own stub process holding one `Pipeline` over the bundle in
`<version>/bundle/` on the backend named in config.pbtxt's parameters (onnxruntime on CPU or
CUDA, or TensorRT). The torch-free part of ldmrt sits next to this file in `<version>/ldmrt/`,
so the server's Python needs only numpy and the backend's module (onnxruntime, or tensorrt +
cuda-python). A request is what `ldmrt generate` takes; a bad request gets an error response
naming the problem, and the instance keeps serving.

Request tensors (all optional; one element each unless said):
  prompt           BYTES [N]  one image per prompt (default: one empty prompt)
  negative_prompt  BYTES [1 or N]
  steps INT32, guidance FP32, sampler BYTES, seed INT64, height INT32, width INT32
Response: images FP32 [N, H, W, 3] in [0, 1], exactly GenerationResult.images.
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

OUTPUT = "images"
_SCALARS = {  # input name -> (GenerationRequest field, how to read one element)
    "steps": ("steps", int), "guidance": ("guidance", float), "seed": ("seed", int),
    "height": ("height", int), "width": ("width", int),
    "sampler": ("sampler", lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)),
}


class TritonPythonModel:
    """Triton calls initialize once per instance, then execute with lists of requests."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        gpu = args.get("model_instance_kind") == "GPU"
        if gpu:
            # One stub process per instance: pin it to its GPU before any CUDA library loads.
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args.get("model_instance_device_id", "0"))
        from ldmrt.runtime.pipeline import Pipeline

        backend = params.get("backend", "onnxruntime")
        options: dict = {}
        if backend == "onnxruntime":
            device = params.get("device", "auto")
            options["device"] = ("cuda" if gpu else "cpu") if device == "auto" else device
            threads = int(params.get("threads", "0") or 0)
            if threads:
                options["threads"] = threads
        bundle = HERE / params.get("bundle", "bundle")
        self.logger = pb_utils.Logger
        self.pipeline = Pipeline.load(bundle, backend, verify=params.get("verify", "true") == "true",
                                      **options)
        self.logger.log_info(f"ldmrt pipeline {self.pipeline.manifest.name} loaded from {bundle} on "
                             f"{backend} {options} (instance {args.get('model_instance_name')})")

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                result = self.pipeline.generate(self.generation_request(request))
                for message in result.warnings:
                    self.logger.log_warn(message)
                images = np.ascontiguousarray(result.images, dtype=np.float32)   # (N, H, W, 3)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, images)]))
            except Exception as exc:  # one bad request must not take the instance down
                self.logger.log_error(f"ldmrt pipeline: {type(exc).__name__}: {exc}")
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")))
        return responses

    def generation_request(self, request):
        """The request's tensors as a GenerationRequest (defaults where a tensor is absent)."""
        from ldmrt.errors import GenerationError
        from ldmrt.runtime.pipeline import GenerationRequest

        fields: dict = {}
        prompts = _strings(request, "prompt")
        if prompts is not None:
            if not prompts:
                raise GenerationError("prompt: expected at least one string, found an empty tensor")
            fields["prompt"] = prompts if len(prompts) > 1 else prompts[0]
            fields["batch"] = len(prompts)
        negative = _strings(request, "negative_prompt")
        if negative is not None:
            fields["negative_prompt"] = negative if len(negative) > 1 else (negative[0] if negative else "")
        for name, (field_name, read) in _SCALARS.items():
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                continue
            values = tensor.as_numpy().reshape(-1)
            if values.size != 1:
                raise GenerationError(f"{name}: expected one element, found shape {list(tensor.as_numpy().shape)}")
            fields[field_name] = read(values[0].item() if hasattr(values[0], "item") else values[0])
        return GenerationRequest(**fields)

    def finalize(self) -> None:
        self.pipeline = None


def _strings(request, name: str) -> list[str] | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1)]
