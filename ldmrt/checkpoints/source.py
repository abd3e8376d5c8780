"""A bundle's model source: what export takes (ModelSource), the digest of its weights, and the
rebuild the torch backend runs on it.

Export records where the weights came from and how they were loaded (a SourceRecord in the
manifest) with the digest of the weights as exported; the torch backend rebuilds the model from
that record and refuses it unless the digest agrees, so it never runs other weights than the
bundle's ONNX graphs hold. Bundles written before the record are refused on the torch backend:
their `source` string ("preset:tiny", a relative path) lost the seed and the loading options,
so nothing proves which weights a rebuild would give.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ldmrt.checkpoints.loading import LoadedCheckpoint, load_checkpoint
from ldmrt.checkpoints.tokenizer_assets import write_runtime_assets
from ldmrt.config import BertConfig, ClipTextConfig
from ldmrt.errors import BackendUnavailableError, BundleError, CheckpointError, LdmrtError
from ldmrt.manifest import Manifest
from ldmrt.models import LatentDiffusion, build_model
from ldmrt.source_record import SourceRecord


@dataclass(frozen=True)
class ModelSource:
    """What to export: the model, where it came from, and how to write its tokenizer assets."""
    model: LatentDiffusion
    source: str                                    # "preset:tiny" or the absolute checkpoint path
    random_weights: bool
    write_tokenizer: Callable[[Path], str] | None = None   # folder -> tokenizer kind
    record: SourceRecord | None = None             # how to load the weights again (the torch backend)
    # Prompts in the model's own domain, when known (a built-in model's): int8 calibration uses
    # all but the last, its held-out parity run the last. None: generic prompts.
    prompts: tuple[str, ...] | None = None
    unet_weights: str | None = None                # a checkpoint's: which UNet set loaded (EMA or not)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict in key order: each tensor's name, dtype and shape, then its bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous().reshape(-1)
        header = json.dumps([name, str(value.dtype).removeprefix("torch."), list(tensor.shape)])
        digest.update(header.encode() + b"\0")
        digest.update(value.view(torch.uint8).numpy())     # the raw bytes, any dtype (bf16 too)
    return digest.hexdigest()


def checkpoint_record(path: Path, *, preset: str | None, yaml: Path | None, strict: bool,
                      tokenizer: Path | None, ema: bool | None = None) -> SourceRecord:
    """What `ldmrt export PATH` loaded, with every path absolute (the export's working directory
    is not the runtime's); the digest is filled in at export."""
    def absolute(value: Path | None) -> str | None:
        return None if value is None else str(Path(value).absolute())
    return SourceRecord(kind="checkpoint", location=absolute(path), preset=preset, yaml=absolute(yaml),
                        tokenizer=absolute(tokenizer), strict=strict, ema=ema)


def checkpoint_source(path: Path, *, preset: str | None = None, yaml: Path | None = None,
                      strict: bool = True, tokenizer: Path | None = None, ema: bool | None = None) -> ModelSource:
    """What `ldmrt export PATH` exports: the loaded model and a writer for its tokenizer assets."""
    loaded = load_checkpoint(path, preset=preset, yaml=yaml, strict=strict, tokenizer=tokenizer, ema=ema)
    record = checkpoint_record(path, preset=preset, yaml=yaml, strict=strict, tokenizer=tokenizer, ema=ema)
    return ModelSource(model=loaded.model, source=record.location, random_weights=loaded.partially_random,
                       write_tokenizer=tokenizer_writer(loaded), record=record, unet_weights=loaded.unet_weights)


def tokenizer_writer(loaded: LoadedCheckpoint) -> Callable[[Path], str] | None:
    """folder -> "clip"/"wordpiece", copying the checkpoint's tokenizer; None without a text encoder.

    Without tokenizer assets the writer raises when called: a bundle whose text encoder has no
    tokenizer is useless, but exporting only the UNet or VAE needs none.
    """
    conditioner = loaded.config.conditioner
    if not isinstance(conditioner, (ClipTextConfig, BertConfig)) or loaded.config.is_layout_conditioned:
        return None          # layout tokens come from ldmrt.layout, not from tokenizer files
    source = loaded.tokenizer_dir

    def write(folder: Path) -> str:
        if source is None:
            files = "vocab.json + merges.txt (CLIP)" if isinstance(conditioner, ClipTextConfig) else \
                "vocab.txt (BERT WordPiece)"
            raise CheckpointError(
                f"{loaded.path}: holds no tokenizer, and the text encoder needs one: supply {files} or a "
                f"tokenizer.json in a folder named tokenizer/ next to the checkpoint (e.g. the tokenizer/ "
                f"folder of the matching diffusers repository), or pass tokenizer=PATH")
        return write_runtime_assets(source, Path(folder), conditioner)
    return write


def rebuild_model(manifest: Manifest, bundle: Path | str | None = None) -> LatentDiffusion:
    """The fp32 model of the bundle's recorded source, proven by its weights digest.

    BundleError when the manifest has no record or the weights found differ from the exported
    ones; BackendUnavailableError when the recorded checkpoint cannot be loaded here.
    """
    where = f"bundle {bundle if bundle is not None else repr(manifest.name)}"
    record = manifest.model_source
    if record is None:
        raise BundleError(
            f"{where}: the torch backend cannot prove which weights to run: the manifest names its "
            f"source only as {manifest.source!r} (written by an ldmrt before model_source records, "
            f"without the seed or loading options); re-export the bundle with this ldmrt, or use "
            f"the onnxruntime backend")
    if record.kind == "preset":
        model = build_model(manifest.config, seed=record.seed)
    else:
        model = _load_checkpoint(record, where)
        if model.config != manifest.config:
            raise BundleError(
                f"{where}: the torch backend loaded {record.describe()} as another model "
                f"configuration than the bundle's ({_first_difference(model.config, manifest.config)}); "
                f"the checkpoint or its YAML changed since export: re-export the bundle, or use the "
                f"onnxruntime backend")
    if record.loras:
        _fuse_recorded(model, record, where)
    found = weights_digest(model)
    changed = ("the checkpoint changed since export" if record.kind == "checkpoint" else
               "this PyTorch draws other random weights from that seed than the exporting one did")
    if found != record.weights_sha256:
        raise BundleError(
            f"{where}: model_source.weights_sha256: the weights the torch backend rebuilt from "
            f"{record.describe()} are not the ones the bundle was exported from: expected sha256 "
            f"{record.weights_sha256}, found {found}; {changed}: re-export the bundle from it, or use "
            f"the onnxruntime backend")
    return model


def _fuse_recorded(model: LatentDiffusion, record: SourceRecord, where: str) -> None:
    """The LoRA adapters the bundle was exported with, fused again from their files (unchanged)."""
    from ldmrt.errors import LoraError
    from ldmrt.lora.choice import LoraChoice
    from ldmrt.lora.switch import WeightSwitch

    try:
        found = WeightSwitch(model).set([LoraChoice(Path(path), scale) for path, _, scale in record.loras])
    except LoraError as exc:
        raise BackendUnavailableError(
            f"{where}: the torch backend fuses the LoRA adapters the bundle was exported with and could not: "
            f"{str(exc)[:400]}; put the files back where they were, or use the onnxruntime backend") from None
    for (path, digest, _), used in zip(record.loras, found):
        if used.sha256 != digest:
            raise BundleError(f"{where}: model_source.loras: {path} changed since export (sha256 {digest} "
                              f"expected, {used.sha256} found); re-export the bundle, or use the onnxruntime backend")


def _load_checkpoint(record: SourceRecord, where: str) -> LatentDiffusion:
    def path(value: str | None) -> Path | None:
        return None if value is None else Path(value)
    try:
        return load_checkpoint(Path(record.location), preset=record.preset, yaml=path(record.yaml),
                               strict=record.strict, tokenizer=path(record.tokenizer), ema=record.ema).model
    except LdmrtError as exc:
        raise BackendUnavailableError(
            f"{where}: the torch backend rebuilds the model from {record.describe()}, the source the "
            f"bundle was exported from, and could not load it: {str(exc)[:400]}; put the checkpoint "
            f"back where it was, or use the onnxruntime backend") from None


def _first_difference(found, expected) -> str:
    found_dict, expected_dict = found.to_dict(), expected.to_dict()
    for key in expected_dict:
        if found_dict.get(key) != expected_dict[key]:
            return f"config.{key} differs"
    return "the configurations differ"
