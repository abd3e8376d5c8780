"""OpenCLIP text tower names -> our (transformers-style) CLIP text names, for SD 2.x's
`cond_stage_model.model.*` and SDXL's `conditioner.embedders.1.model.*`.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from ldmrt.checkpoints.state import StateDict, names, plural
from ldmrt.errors import ConfigError

_SIMPLE = {"token_embedding.weight": "embeddings.token_embedding.weight",
           "positional_embedding": "embeddings.position_embedding.weight",
           "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# OpenCLIP's fused attention input is `attn.in_proj_weight` / `attn.in_proj_bias` (no dot)
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$")
_PROJECTION = "text_projection"
_UNUSED = ("logit_scale",)          # and visual.*: the image tower


def openclip_text_to_transformers(state: Mapping[str, torch.Tensor], source: str, target: str,
                                  keep_projection: bool) -> tuple[StateDict, list[str]]:
    """OpenCLIP text tower under `source` -> our names under `target` (e.g.
    "cond_stage_model.transformer.text_model.").

    in_proj (3D, D) is split into q, k, v in that order. keep_projection: `text_projection`
    (D, P), used as x @ P, becomes the Linear weight (P, D) at `text_projection.weight` of the
    module owning `target` (`cond_stage_model.transformer.text_projection.weight`); otherwise it
    is dropped. logit_scale and visual.* are always dropped. Unknown keys under `source` keep
    their name (so a strict load reports them); keys outside `source` pass through. Key order
    is kept.
    """
    projection_key = _projection_key(target) if keep_projection else None
    out: StateDict = {}
    dropped: list[str] = []
    for key, value in state.items():
        if not key.startswith(source):
            out[key] = value
            continue
        rest = key[len(source):]
        match = _RESBLOCK.match(rest)
        if rest in _SIMPLE:
            out[target + _SIMPLE[rest]] = value
        elif match and match.group(2) == "attn.in_proj":
            layer, param = match.group(1), match.group(3)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{target}encoder.layers.{layer}.self_attn.{name}.{param}"] = part
        elif match and match.group(2) in _BLOCK:
            out[f"{target}encoder.layers.{match.group(1)}.{_BLOCK[match.group(2)]}.{match.group(3)}"] = value
        elif rest == _PROJECTION and projection_key is not None:
            out[projection_key] = value.t()                             # (D, P) -> (P, D)
        elif rest == _PROJECTION or rest in _UNUSED or rest.startswith("visual."):
            dropped.append(key)
        else:
            out[key] = value                # unknown: kept, so a strict load reports it
    notes = ["converted OpenCLIP text-encoder names (in_proj split into q/k/v)"]
    if projection_key is not None and projection_key in out:
        notes.append(f"OpenCLIP {source}{_PROJECTION} (D, P) transposed to the Linear weight "
                     f"{projection_key}")
    if dropped:
        notes.append(f"dropped {plural(len(dropped), 'OpenCLIP tensor')} text_embeddings do not use: "
                     f"{names(dropped)}")
    return out, notes


def _projection_key(target: str) -> str:
    """'a.transformer.text_model.' -> 'a.transformer.text_projection.weight' (the owner's sibling)."""
    owner, dot, _ = target.rstrip(".").rpartition(".")
    if not target.endswith(".") or not dot:
        raise ConfigError(f"target: expected a prefix ending in "
                          f"'<owner>.<text model>.' (e.g. 'cond_stage_model.transformer.text_model.') "
                          f"to place text_projection beside, found {target!r}", field="target")
    return f"{owner}.{_PROJECTION}.weight"
