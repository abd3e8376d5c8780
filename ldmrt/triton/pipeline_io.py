"""The pipeline model's request and response tensors, declared once.

config.pbtxt (repository.py), model.py's reading of a request (pipeline_model.py), the client's
data types (client.py) and the repository check (check.py) all take them from here. Each input
but `lora` (which adapters to run on) is named as the GenerationRequest field it fills, so an
error naming the field names the Triton input. Torch-free and numpy-free; vendored with the runtime.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Form(str, enum.Enum):
    """How model.py reads one request tensor into its GenerationRequest field."""
    TEXTS = "texts"      # BYTES [-1]: UTF-8 strings (prompt; negative_prompt: 1 or one per prompt)
    TEXT = "text"        # BYTES [1]: one UTF-8 string
    JSON = "json"        # BYTES [1]: one JSON text (a layout, as `ldmrt generate --layout` reads)
    NUMBER = "number"    # [1]: one number, int or float as its data type
    PAIR = "pair"        # INT32 [2]: (height, width) in pixels
    ARRAY = "array"      # an array, as the field takes it


@dataclass(frozen=True)
class RequestTensor:
    """One optional input of the pipeline model."""
    name: str                       # the Triton input and the GenerationRequest field
    data_type: str                  # Triton's TYPE_FP32, ...
    dims: tuple[int, ...]
    form: Form
    field_dtype: str | None = None  # ARRAY: the numpy dtype the field takes, where it differs


@dataclass(frozen=True)
class ResponseTensor:
    name: str
    data_type: str
    dims: tuple[int, ...]


_ONE = (1,)
GENERATION = (
    RequestTensor("prompt", "TYPE_STRING", (-1,), Form.TEXTS),
    RequestTensor("negative_prompt", "TYPE_STRING", (-1,), Form.TEXTS),
    RequestTensor("steps", "TYPE_INT32", _ONE, Form.NUMBER),
    RequestTensor("guidance", "TYPE_FP32", _ONE, Form.NUMBER),
    RequestTensor("sampler", "TYPE_STRING", _ONE, Form.TEXT),
    RequestTensor("seed", "TYPE_INT64", _ONE, Form.NUMBER),
    RequestTensor("height", "TYPE_INT32", _ONE, Form.NUMBER),
    RequestTensor("width", "TYPE_INT32", _ONE, Form.NUMBER),
)
CONCAT_MAPS = (   # a concat model's maps, [B or 1, ...] as GenerationRequest takes them
    RequestTensor("image", "TYPE_FP32", (-1, -1, -1, 3), Form.ARRAY, "float32"),
    RequestTensor("mask", "TYPE_FP32", (-1, -1, -1), Form.ARRAY, "float32"),
    RequestTensor("noise_level", "TYPE_INT32", _ONE, Form.NUMBER),
    RequestTensor("segmentation", "TYPE_INT32", (-1, -1, -1), Form.ARRAY, "int64"),
)
LAYOUT = (RequestTensor("layout", "TYPE_STRING", _ONE, Form.JSON),)
# SDXL's size ids (ldmrt.runtime.text.SizeConditioning): the base takes original_size, the crop and
# target_size, the refiner original_size, the crop and the aesthetic scores (size_fields); a
# bundle's pipeline model declares those its model takes
SIZE_IDS = (
    RequestTensor("original_size", "TYPE_INT32", (2,), Form.PAIR),
    RequestTensor("crops_coords_top_left", "TYPE_INT32", (2,), Form.PAIR),
    RequestTensor("target_size", "TYPE_INT32", (2,), Form.PAIR),
    RequestTensor("aesthetic_score", "TYPE_FP32", _ONE, Form.NUMBER),
    RequestTensor("negative_aesthetic_score", "TYPE_FP32", _ONE, Form.NUMBER),
)
# The base -> refiner hand-off (any model): denoising_end returns latents and no images; the
# refiner continues them, given as init_latents [B, C, h, w], from denoising_start
HAND_OFF = (
    RequestTensor("denoising_end", "TYPE_FP32", _ONE, Form.NUMBER),
    RequestTensor("denoising_start", "TYPE_FP32", _ONE, Form.NUMBER),
    RequestTensor("init_latents", "TYPE_FP32", (-1, -1, -1, -1), Form.ARRAY, "float32"),
)
EVERY_REQUEST_TENSOR: dict[str, RequestTensor] = {   # the GenerationRequest fields
    tensor.name: tensor for tensor in GENERATION + CONCAT_MAPS + LAYOUT + SIZE_IDS + HAND_OFF}
# Not a GenerationRequest field: the repository's LoRA adapters the request runs on, "NAME" or
# "NAME:SCALE" each (ldmrt.triton.adapters); absent or empty: the base weights. Every pipeline
# model declares it, so a request for adapters that a repository lacks is refused by ldmrt, by name.
ADAPTERS = RequestTensor("lora", "TYPE_STRING", (-1,), Form.TEXTS)
EVERY_INPUT: dict[str, RequestTensor] = {**EVERY_REQUEST_TENSOR, ADAPTERS.name: ADAPTERS}   # the client's

IMAGES, LATENTS, WARNINGS = "images", "latents", "warnings"
RESPONSE_TENSORS = (
    ResponseTensor(IMAGES, "TYPE_FP32", (-1, -1, -1, 3)),     # GenerationResult.images; absent with denoising_end
    ResponseTensor(LATENTS, "TYPE_FP32", (-1, -1, -1, -1)),   # GenerationResult.latents [N, C, h, w]
    ResponseTensor(WARNINGS, "TYPE_STRING", (-1,)),           # GenerationResult.warnings (K may be 0)
)


def request_tensors(config) -> tuple[RequestTensor, ...]:
    """The inputs a bundle's pipeline model declares: those its model (a ModelConfig) takes."""
    from ldmrt.runtime.spatial import needed_fields
    from ldmrt.runtime.text import size_fields

    taken = needed_fields(config)[1]
    tensors = GENERATION + tuple(tensor for tensor in CONCAT_MAPS if tensor.name in taken)
    if config.is_layout_conditioned:
        tensors += LAYOUT
    sizes = size_fields(config)
    return tensors + tuple(tensor for tensor in SIZE_IDS if tensor.name in sizes) + HAND_OFF + (ADAPTERS,)
