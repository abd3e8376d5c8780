"""From weights under CompVis names to a loaded LatentDiffusion: dtype casting and the strict match."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from ldmrt.config import ModelConfig
from ldmrt.errors import CheckpointError
from ldmrt.models import LatentDiffusion, build_model

StateDict = dict[str, torch.Tensor]
COMPONENT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "cond_stage_model_2.")
SHOWN = 5   # names listed per kind of problem


@dataclass
class Assembly:
    """What a format reader produces: the config, and every weight under its CompVis name."""
    format: str                    # "diffusers", "safetensors", "torch-zip", "torch-legacy"
    config: ModelConfig
    state: StateDict
    config_source: str             # where the config came from, for messages
    detected: str                  # the family and how it was detected
    notes: list[str] = field(default_factory=list)       # benign, done knowingly
    warnings: list[str] = field(default_factory=list)    # the user should look at these
    tokenizer_dir: Path | None = None
    dtypes: dict[str, Counter] = field(default_factory=dict)   # component -> stored dtypes
    ema_tensors: int = 0                                       # model_ema.* tensors in the file
    unet_weights: str = "the file's UNet weights"               # which set loaded (EMA or not), for the export table
    # when the weights do not fit the config: which config fields are at fault (a YAML's), or None
    explain_mismatch: Callable[[], str | None] | None = None


def dtype_counts(state: StateDict) -> dict[str, Counter]:
    """component -> Counter of the dtypes the file stored (before the cast to float32)."""
    counts: dict[str, Counter] = {}
    for key, value in state.items():
        counts.setdefault(component_of(key), Counter())[str(value.dtype).removeprefix("torch.")] += 1
    return counts


def component_of(key: str) -> str:
    """The top-level component a key belongs to ("model.diffusion_model", ..., or "other")."""
    return next((p[:-1] for p in COMPONENT_PREFIXES if key.startswith(p)), "other")


def names(keys: Iterable[str], limit: int = SHOWN) -> str:
    """'a, b, c and 7 more' with a per-component count when keys span several components."""
    keys = list(keys)
    shown = ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
    counts = Counter(component_of(k) for k in keys)
    if len(counts) > 1:
        shown += " [" + ", ".join(f"{c}: {n}" for c, n in counts.items()) + "]"
    return shown


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def cast_to_float32(state: StateDict, origin: str = "checkpoint") -> tuple[StateDict, str | None]:
    """Every tensor as contiguous float32; a note naming what was cast (half, bf16, fp64).

    Every weight of our models is a float: an integer or bool tensor is refused, not cast.
    """
    integral = [k for k, v in state.items() if not v.is_floating_point()]
    if integral:
        shown = ", ".join(f"{k} ({str(state[k].dtype).removeprefix('torch.')})" for k in integral[:SHOWN])
        raise CheckpointError(f"{origin}: expected float tensors for every weight, found "
                              f"{plural(len(integral), 'non-float tensor')}: {shown}")
    cast = Counter(str(v.dtype).removeprefix("torch.") for v in state.values() if v.dtype != torch.float32)
    out = {k: v.to(torch.float32).contiguous() if v.dtype != torch.float32 else v.contiguous()
           for k, v in state.items()}
    if not cast:
        return out, None
    detail = ", ".join(f"{n} {dtype}" for dtype, n in sorted(cast.items()))
    return out, f"cast {detail} tensors to float32 (ldmrt loads in fp32; precision is chosen at export)"


def non_finite(state: StateDict) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def load_model(path: Path, assembly: Assembly, strict: bool) -> tuple[LatentDiffusion, list[str]]:
    """Build the model of `assembly.config` and load its weights; strict: any mismatch fails."""
    with torch.device("meta"):
        skeleton = LatentDiffusion(assembly.config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    state = assembly.state
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [k for k in sorted(expected.keys() & state.keys()) if tuple(state[k].shape) != expected[k]]
    if not (missing or unexpected or mismatched):
        skeleton.load_state_dict(state, strict=True, assign=True)
        return skeleton.eval().requires_grad_(False), []
    problems = []
    if missing:
        problems.append(f"{plural(len(missing), 'missing key')}: {names(missing)}")
    if unexpected:
        problems.append(f"{plural(len(unexpected), 'unexpected key')}: {names(unexpected)}")
    if mismatched:
        shown = [f"{k} (file {list(state[k].shape)}, model {list(expected[k])})" for k in mismatched[:SHOWN]]
        more = f" and {len(mismatched) - SHOWN} more" if len(mismatched) > SHOWN else ""
        problems.append(f"{plural(len(mismatched), 'shape mismatch')}" + ": " + ", ".join(shown) + more)
    report = "; ".join(problems)
    fault = assembly.explain_mismatch() if assembly.explain_mismatch else None
    described = assembly.config_source if fault is None else f"{assembly.config_source} ({fault})"
    if strict:
        raise CheckpointError(
            f"{path}: the weights do not fit the model described by {described}: {report}. "
            f"Check the preset or YAML (or the file); strict=False loads anyway, leaving missing "
            f"and mismatched weights random")
    model = build_model(assembly.config, seed=0)
    usable = {k: v for k, v in state.items() if k in expected and tuple(v.shape) == expected[k]}
    model.load_state_dict(usable, strict=False)
    return model.eval().requires_grad_(False), [
        f"strict=False: {report}{'' if fault is None else f' ({fault})'}; missing and mismatched weights are "
        f"RANDOM (seed 0), unexpected ones were ignored"]
