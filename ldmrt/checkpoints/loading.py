"""The public entry points: a path (diffusers folder or original single file) -> a loaded model."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ldmrt.config import Family, ModelConfig
from ldmrt.errors import CheckpointError, ConfigError
from ldmrt.models import LatentDiffusion
from ldmrt.checkpoints.diffusers_folder import MODEL_INDEX, read_diffusers_folder
from ldmrt.weight_files import PICKLE_SUFFIXES, SINGLE_FILE_SUFFIXES
from ldmrt.checkpoints.single_file import read_single_file
from ldmrt.checkpoints.state import Assembly, load_model, names, non_finite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint loaded into ldmrt's modules, and what was detected and done on the way."""
    path: Path
    format: str                         # "diffusers", "safetensors", "torch-zip", "torch-legacy"
    config: ModelConfig
    model: LatentDiffusion
    family: Family
    detected: str                       # the family and the evidence for it
    config_source: str                  # preset, YAML, diffusers configs or tensor shapes
    warnings: tuple[str, ...]           # things to look at (assumptions, strict=False, NaNs)
    notes: tuple[str, ...]              # benign things done knowingly (dropped buffers, casts)
    tokenizer_dir: Path | None          # where the tokenizer assets are, if any
    partially_random: bool = False      # strict=False left some weights random
    unet_weights: str = "the file's UNet weights"   # which set loaded (EMA or not)


def assemble(path: Path, *, preset: str | None = None, yaml: Path | None = None,
             tokenizer: Path | None = None, ema: bool | None = None) -> Assembly:
    """Config + CompVis-named fp32 weights of `path`, before any model is built."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not found; expected a diffusers folder (with {MODEL_INDEX}) or an "
                              f"original checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})")
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise CheckpointError(f"{tokenizer}: tokenizer folder not found")
    if path.is_dir():
        if not (path / MODEL_INDEX).is_file():
            raise CheckpointError(f"{path}: a folder without {MODEL_INDEX}; expected a diffusers pipeline "
                                  f"folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        if preset is not None or yaml is not None:
            raise ConfigError(f"{path}: a diffusers folder describes itself; preset/YAML apply to single files")
        if ema is not None:
            raise ConfigError(f"{path}: ema={ema} (--ema/--no-ema) chooses between an original file's two UNet "
                              f"weight sets; a diffusers folder holds one (its unet/): drop the option", field="ema")
        assembly = read_diffusers_folder(path)
        assembly.unet_weights = "the folder's unet/ (a diffusers folder holds one set)"
        if tokenizer is not None:
            assembly.tokenizer_dir = Path(tokenizer)
        return assembly
    suffix = path.suffix.lower()
    if suffix not in SINGLE_FILE_SUFFIXES:
        hint = (" (.bin files are diffusers/transformers components: pass the diffusers folder)"
                if suffix in PICKLE_SUFFIXES else
                " (a YAML describes a checkpoint: pass the checkpoint and yaml=this file)"
                if suffix in (".yaml", ".yml") else "")
        raise CheckpointError(f"{path}: unsupported file type {suffix or '(no extension)'!r}; expected "
                              f"{', '.join(SINGLE_FILE_SUFFIXES)} or a diffusers folder{hint}")
    if tokenizer is None and (path.parent / "tokenizer").is_dir():
        tokenizer = path.parent / "tokenizer"
    return read_single_file(path, preset_name=preset, yaml_path=None if yaml is None else Path(yaml),
                            tokenizer_dir=None if tokenizer is None else Path(tokenizer), ema=ema)


def load_checkpoint(path: Path, *, preset: str | None = None, yaml: Path | None = None, strict: bool = True,
                    tokenizer: Path | None = None, ema: bool | None = None) -> LoadedCheckpoint:
    """Load a diffusers folder or an original .safetensors/.ckpt into ldmrt's LatentDiffusion (fp32, eval).

    strict (default): any missing, unexpected or mis-shaped weight raises a CheckpointError that
    lists them; strict=False logs them and leaves missing weights random. ema: which UNet weights
    an original file with both sets gives (None: the non-EMA set, as diffusers; True: the EMA set).
    """
    path = Path(path)
    assembly = assemble(path, preset=preset, yaml=yaml, tokenizer=tokenizer, ema=ema)
    warnings = list(assembly.warnings)
    bad = non_finite(assembly.state)
    if bad:
        warnings.append(f"non-finite values (NaN/inf) in {len(bad)} tensors: {names(bad)}")
    model, load_warnings = load_model(path, assembly, strict)
    warnings += load_warnings
    log.info("%s: %s; config from %s", path, assembly.detected, assembly.config_source)
    for note in assembly.notes:
        log.info("%s: %s", path, note)
    for warning in warnings:
        log.warning("%s: %s", path, warning)
    return LoadedCheckpoint(path=path, format=assembly.format, config=assembly.config, model=model,
                            family=assembly.config.family, detected=assembly.detected,
                            config_source=assembly.config_source, warnings=tuple(warnings),
                            notes=tuple(assembly.notes), tokenizer_dir=assembly.tokenizer_dir,
                            partially_random=bool(load_warnings), unet_weights=assembly.unet_weights)
