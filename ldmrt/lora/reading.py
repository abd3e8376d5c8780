"""LoRA files -> low-rank pairs per module, in the two layouts tools write.

diffusers / PEFT: `<component>.<module>.lora_A.weight` (down, r x in) and `.lora_B.weight` (up,
out x r), `<component>` unet / text_encoder / text_encoder_2; diffusers' pre-PEFT `.lora.down` /
`.lora.up` (`.lora_linear_layer.down/up` in text encoders) and attention processors'
`<module>.processor.to_q_lora.down` (UNet) too; alpha from
`<component>.<module>.alpha` tensors or diffusers' `lora_adapter_metadata` (lora_alpha, r and
their per-module patterns), none meaning alpha = rank.

kohya / A1111: `lora_unet_<module>` / `lora_te_` (SD 1.x/2.x) / `lora_te1_`, `lora_te2_` (SDXL),
module names with dots written as underscores, `.lora_down.weight`, `.lora_up.weight` and an
`.alpha` scalar; conv layers (LoCon) with down (r, in, kh, kw) and up (out, r, 1, 1).

Safetensors only (a pickle could run code). Every tensor must belong to a pair; anything else is a
LoraError naming the tensor. Torch-free: the pairs are float32 numpy arrays (BF16 widened exactly),
so the runtime switches adapters on ONNX Runtime and TensorRT without PyTorch.
"""
from __future__ import annotations

import enum
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ldmrt.errors import CheckpointError, LoraError
from ldmrt.safetensors_file import SAFETENSORS_SUFFIXES, read_float32


class Layout(str, enum.Enum):
    DIFFUSERS = "diffusers"      # diffusers / PEFT
    KOHYA = "kohya"              # kohya-ss / A1111


class Component(str, enum.Enum):
    """The model part an adapter targets, in diffusers' names."""
    UNET = "unet"
    TEXT_ENCODER = "text_encoder"
    TEXT_ENCODER_2 = "text_encoder_2"


_KOHYA_PREFIXES = {"unet": Component.UNET, "te": Component.TEXT_ENCODER, "te1": Component.TEXT_ENCODER,
                   "te2": Component.TEXT_ENCODER_2}
_KOHYA = re.compile(r"^lora_(unet|te1|te2|te)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^(unet|text_encoder_2|text_encoder)\.(.+?)\.(lora_A\.weight|lora_B\.weight|"
                   r"lora\.down\.weight|lora\.up\.weight|lora_linear_layer\.down\.weight|"
                   r"lora_linear_layer\.up\.weight|alpha)$")
_PROCESSOR = re.compile(r"^(?:unet\.)?(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
          "lora.down.weight": "down", "lora.up.weight": "up", "lora_linear_layer.down.weight": "down",
          "lora_linear_layer.up.weight": "up", "alpha": "alpha"}
# what other adapter kinds write: refused by name rather than read as something else
_OTHER_KINDS = ("lora_mid", "hada_", "lokr_", "dora_scale", ".diff", "oft_", "lora_magnitude_vector")
METADATA_KEY = "lora_adapter_metadata"      # diffusers >= 0.33: {component}.lora_alpha, .r, patterns


@dataclass
class LoraPair:
    """One module's low-rank update: delta W = alpha / rank * up @ down."""
    down: np.ndarray | None = None               # float32
    up: np.ndarray | None = None
    alpha: float | None = None                  # None: alpha = rank
    keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scaling(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass(frozen=True)
class LoraFile:
    path: Path
    sha256: str
    layout: Layout
    pairs: dict[tuple[Component, str], LoraPair]     # (component, module name as the file writes it)


def read_lora(path: Path | str, field_name: str = "lora") -> LoraFile:
    """The pairs of a LoRA safetensors file; LoraError (field `field_name`) naming what is wrong."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise LoraError(f"{field_name} {path}: expected a .safetensors LoRA file, found {path.suffix or 'no suffix'!r} "
                        f"(pickled LoRA files could run code and are not read)", field=field_name)
    try:
        tensors, metadata = read_float32(path)
    except CheckpointError as exc:
        raise LoraError(f"{field_name} {exc}", field=field_name) from None
    if not tensors:
        raise LoraError(f"{field_name} {path}: holds no tensors", field=field_name)
    pairs: dict[tuple[Component, str], LoraPair] = {}
    layouts: set[Layout] = set()
    for key, tensor in tensors.items():
        component, module, part, layout = _parse(key, path, field_name)
        layouts.add(layout)
        if not np.isfinite(tensor).all():
            raise LoraError(f"{field_name} {path}: tensor {key!r} holds NaN or infinite values", field=field_name)
        pair = pairs.setdefault((component, module), LoraPair())
        pair.keys.append(key)
        if part == "alpha":
            if tensor.size != 1:
                raise LoraError(f"{field_name} {path}: {key!r}: expected one alpha value, found shape "
                                f"{list(tensor.shape)}", field=field_name)
            pair.alpha = float(tensor.reshape(()))
        else:
            setattr(pair, part, tensor)
    if len(layouts) > 1:
        raise LoraError(f"{field_name} {path}: mixes the diffusers and kohya layouts; expected one", field=field_name)
    _apply_metadata(pairs, metadata, path, field_name)
    for pair in pairs.values():
        _check_pair(pair, path, field_name)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return LoraFile(path, digest, layouts.pop(), pairs)


def _parse(key: str, path: Path, field_name: str) -> tuple[Component, str, str, Layout]:
    """(component, module, down|up|alpha, layout) of one tensor name."""
    found = _KOHYA.match(key)
    if found:
        return _KOHYA_PREFIXES[found.group(1)], found.group(2), _PARTS[found.group(3)], Layout.KOHYA
    found = _PEFT.match(key)
    if found:
        return Component(found.group(1)), found.group(2), _PARTS[found.group(3)], Layout.DIFFUSERS
    found = _PROCESSOR.match(key)
    if found:
        projection = "to_out.0" if found.group(2) == "to_out" else found.group(2)
        return Component.UNET, f"{found.group(1)}.{projection}", found.group(3), Layout.DIFFUSERS
    kind = next((k for k in _OTHER_KINDS if k in key), None)
    why = (f"a {kind.strip('._')} tensor: only plain LoRA (down/up pairs and alpha) is supported" if kind else
           "expected unet./text_encoder(_2).<module>.lora_A/lora_B (diffusers) or "
           "lora_unet_/lora_te(1|2)_<module>.lora_down/lora_up/alpha (kohya)")
    raise LoraError(f"{field_name} {path}: tensor {key!r}: {why}", field=field_name)


def _apply_metadata(pairs: dict[tuple[Component, str], LoraPair], metadata: dict[str, str], path: Path,
                    field_name: str) -> None:
    """diffusers' adapter metadata: per component lora_alpha (and alpha_pattern by module) where
    the file has no alpha tensor."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraError(f"{field_name} {path}: metadata {METADATA_KEY} is not JSON ({exc})", field=field_name) from None
    if not isinstance(data, dict):
        raise LoraError(f"{field_name} {path}: metadata {METADATA_KEY}: expected a JSON object", field=field_name)
    for (component, module), pair in pairs.items():
        if pair.alpha is not None or pair.down is None:
            continue
        prefix = f"{component.value}."
        patterns = data.get(prefix + "alpha_pattern") or {}
        ranks = data.get(prefix + "rank_pattern") or {}
        alpha = next((v for k, v in patterns.items() if _pattern_matches(k, module)), data.get(prefix + "lora_alpha"))
        rank = next((v for k, v in ranks.items() if _pattern_matches(k, module)), data.get(prefix + "r"))
        if alpha is None:
            continue
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise LoraError(f"{field_name} {path}: metadata {prefix}lora_alpha {alpha!r}: expected a number",
                            field=field_name)
        if rank is not None and rank != pair.rank:
            raise LoraError(f"{field_name} {path}: {module}: metadata says rank {rank}, the tensors have "
                            f"{pair.rank}", field=field_name)
        pair.alpha = float(alpha)


def _pattern_matches(pattern: str, module: str) -> bool:
    """PEFT's pattern keys: a module name suffix (or a regex over the full name)."""
    return module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module) is not None


def _check_pair(pair: LoraPair, path: Path, field_name: str) -> None:
    where = f"{field_name} {path}: {', '.join(sorted(pair.keys))}"
    if pair.down is None or pair.up is None:
        missing = "down (lora_A / lora_down)" if pair.down is None else "up (lora_B / lora_up)"
        raise LoraError(f"{where}: the {missing} half of the pair is missing", field=field_name)
    if pair.down.ndim not in (2, 4) or pair.up.ndim != pair.down.ndim:
        raise LoraError(f"{where}: expected 2-D (linear) or 4-D (conv) down and up weights, found "
                        f"{list(pair.down.shape)} and {list(pair.up.shape)}", field=field_name)
    if pair.up.shape[1] != pair.down.shape[0] or (pair.up.ndim == 4 and tuple(pair.up.shape[2:]) != (1, 1)):
        raise LoraError(f"{where}: ranks do not match: down {list(pair.down.shape)}, up {list(pair.up.shape)} "
                        f"(expected up (out, rank{', 1, 1' if pair.up.ndim == 4 else ''}))", field=field_name)
    if pair.rank == 0:
        raise LoraError(f"{where}: rank 0", field=field_name)
