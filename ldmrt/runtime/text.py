"""Prompts -> the UNet's text inputs, as diffusers' pipelines make them.

SD 1.x/2.x and the LDM text models: one encoder, `encoder_hidden_states` (B, L, D). SDXL
(StableDiffusionXLPipeline.encode_prompt): each encoder's penultimate hidden states, concatenated
on the last axis in encoder order; the pooled embedding of the encoder with the projection
(`text_embeds`); and the size ids (`time_ids`, `_get_add_time_ids`): original size, crop
top-left and target size (the refiner: original size, crop top-left and an aesthetic score).
With guidance and no negative prompt, a model with force_zeros_for_empty_prompt takes zero
embeddings for the negative half, as diffusers does; the size ids are the same in both halves,
but for the refiner's negative aesthetic score. Torch-free.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ldmrt.config import SDXL_REFINER_TIME_IDS, SDXL_TIME_IDS, ModelConfig
from ldmrt.errors import GenerationError
from ldmrt.iospec import TEXT_ENCODER_COMPONENTS, Component, numpy_dtype
from ldmrt.runtime.checks import is_integer, real, show
from ldmrt.tokenizer import load_tokenizer

AESTHETIC_SCORE = 6.0            # the refiner's defaults (diffusers StableDiffusionXLImg2ImgPipeline)
NEGATIVE_AESTHETIC_SCORE = 2.5
MAX_SIZE_ID = 16384              # sizes and crops beyond any image the ids were trained on
# the SizeConditioning fields each kind of size ids takes
_USED = {SDXL_TIME_IDS: ("original_size", "crops_coords_top_left", "target_size"),
         SDXL_REFINER_TIME_IDS: ("original_size", "crops_coords_top_left", "aesthetic_score",
                                 "negative_aesthetic_score")}
OutputCheck = Callable[[np.ndarray, str, str], None]     # (array, component, what): raises if non-finite
Runner = Callable[[Mapping[str, np.ndarray]], np.ndarray]   # ldmrt.engines.base.ComponentRunner


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning, in pixels, (height, width) order; None: the image's size."""
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = AESTHETIC_SCORE                  # the refiner only
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE

    @classmethod
    def of(cls, request) -> "SizeConditioning":
        """The fields of the same names of a request."""
        return cls(**{f.name: getattr(request, f.name) for f in dataclasses.fields(cls)})


class TextEncoders:
    """A bundle's text encoders with their tokenizers: SDXL's two share one tokenizer folder, each
    padding with its own encoder's pad token."""

    def __init__(self, config: ModelConfig, tokenizers: Sequence):
        """`tokenizers`: one per encoder (anything with `encode(texts) -> TokenizedBatch`)."""
        self.config = config
        self.tokenizers = list(tokenizers)
        self.components = [Component(name) for name in TEXT_ENCODER_COMPONENTS[:len(self.tokenizers)]]

    @staticmethod
    def encoders(config: ModelConfig) -> tuple:
        """The text encoders' configs, in context order."""
        return config.text_encoders or (config.conditioner,)

    @classmethod
    def from_folder(cls, config: ModelConfig, folder: Path) -> "TextEncoders":
        """With the bundle's tokenizer folder, loaded for each encoder's pad token."""
        return cls(config, [load_tokenizer(folder, encoder) for encoder in cls.encoders(config)])

    def encode(self, runners: Mapping[str, Runner], texts: list[str], names: list[str], warnings: list[str],
               check: OutputCheck) -> tuple[np.ndarray, np.ndarray | None]:
        """(context (N, L, D) [first | second encoder], pooled (N, P) or None) of `texts`."""
        contexts, pooled = [], None
        for i, (tokenizer, component) in enumerate(zip(self.tokenizers, self.components)):
            tokens = tokenizer.encode(texts)
            if i == 0:
                warnings += [f"{name} truncated to {tokenizer.max_length} tokens: {text[:60]!r}..."
                             for name, text, cut in zip(names, texts, tokens.truncated) if cut]
            runner, feeds = runners[component], {"input_ids": tokens.input_ids}
            outputs = runner.run_all(feeds) if len(runner.spec.outputs) > 1 else {"text_embeddings": runner(feeds)}
            check(outputs["text_embeddings"], component, "text embeddings")
            contexts.append(outputs["text_embeddings"])
            if "pooled" in outputs:
                check(outputs["pooled"], component, "pooled text embeddings")
                pooled = outputs["pooled"]
        return (contexts[0] if len(contexts) == 1 else np.concatenate(contexts, axis=-1)), pooled

    def conditioning(self, runners: Mapping[str, Runner], prompts: list[str], negatives: list[str] | None,
                     guided: bool, sizes: SizeConditioning,
                     image_size: tuple[int, int], warnings: list[str], check: OutputCheck,
                     unet_dtypes: Mapping[str, str]) -> dict[str, np.ndarray]:
        """The UNet's text inputs, [negative; positive] halves when guided. `negatives` None with
        guidance: zero embeddings (force_zeros_for_empty_prompt)."""
        batch = len(prompts)
        zeros = guided and negatives is None
        texts = prompts if not guided or zeros else negatives + prompts
        names = ["prompt"] * batch if texts is prompts else ["negative prompt"] * batch + ["prompt"] * batch
        context, pooled = self.encode(runners, texts, names, warnings, check)
        if zeros:
            context = np.concatenate([np.zeros_like(context), context])
            pooled = None if pooled is None else np.concatenate([np.zeros_like(pooled), pooled])
        inputs = {"encoder_hidden_states": context}
        if self.config.unet.time_ids:
            ids = size_ids(self.config, sizes, image_size, negative=False)
            rows = [ids] * batch
            if guided:
                rows = [size_ids(self.config, sizes, image_size, negative=True)] * batch + rows
            inputs["text_embeds"] = pooled.astype(numpy_dtype(unet_dtypes["text_embeds"]))
            inputs["time_ids"] = np.stack(rows).astype(np.float32)
        return inputs


def size_fields(config: ModelConfig) -> tuple[str, ...]:
    """The SizeConditioning fields the model's size ids take (none for a model without them)."""
    return _USED.get(config.unet.time_ids, ())


def size_ids(config: ModelConfig, sizes: SizeConditioning, image_size: tuple[int, int], negative: bool) -> np.ndarray:
    """One row of SDXL's time ids: (original h, w, crop top, left, target h, w), or the refiner's
    (original h, w, crop top, left, aesthetic score)."""
    original = sizes.original_size or image_size
    if config.unet.time_ids == SDXL_REFINER_TIME_IDS:
        score = sizes.negative_aesthetic_score if negative else sizes.aesthetic_score
        values = (*original, *sizes.crops_coords_top_left, score)
    else:
        values = (*original, *sizes.crops_coords_top_left, *(sizes.target_size or image_size))
    return np.asarray(values, dtype=np.float32)


def check_sizes(config: ModelConfig, sizes: SizeConditioning) -> SizeConditioning:
    """The request's size conditioning with Python numbers; GenerationError naming the field, and
    refused by name where the model does not take it (the base takes no aesthetic score, the
    refiner no target size, other models none of them)."""
    pairs = {name: _pair(name, getattr(sizes, name), low)
             for name, low in (("original_size", 1), ("crops_coords_top_left", 0), ("target_size", 1))}
    scores = {name: real(name, getattr(sizes, name)) for name in ("aesthetic_score", "negative_aesthetic_score")}
    checked = SizeConditioning(**pairs, **scores)
    used = size_fields(config)
    for name in _USED[SDXL_TIME_IDS] + _USED[SDXL_REFINER_TIME_IDS]:
        value = getattr(checked, name)
        if name not in used and value != getattr(SizeConditioning(), name):
            takes = f"its size ids are {', '.join(used)}" if used else "it takes no size ids"
            raise GenerationError(f"{name} {show(value)}: this bundle's model ({config.name}) does not use it; "
                                  f"{takes}", field=name)
    return checked


def _pair(name: str, value, low: int) -> tuple[int, int] | None:
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if values is None or len(values) != 2 or not all(is_integer(v) and low <= int(v) <= MAX_SIZE_ID for v in values):
        raise GenerationError(f"{name} {show(value)}: expected (height, width) integers in [{low}, {MAX_SIZE_ID}] "
                              f"pixels", field=name)
    return int(values[0]), int(values[1])


def expand(prompt, batch: int, name: str) -> list[str]:
    """A prompt or one per image -> `batch` strings; GenerationError naming `name`."""
    if not isinstance(prompt, (str, list, tuple)):
        raise GenerationError(f"{name}: expected a string or a list of strings, found {type(prompt).__name__}",
                              field=name)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if len(prompts) == 1:
        prompts = prompts * batch
    if len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
        raise GenerationError(f"{name}: expected 1 or {batch} strings, found {len(prompts)}", field=name)
    return prompts



