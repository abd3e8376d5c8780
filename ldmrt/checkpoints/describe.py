"""`ldmrt inspect PATH` for checkpoints: what a file or diffusers folder holds, and what is unusual."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from ldmrt.config import AutoencoderKind, BertConfig, ClassEmbedderConfig, ClipTextConfig, ModelConfig
from ldmrt.errors import CheckpointError
from ldmrt.models import LatentDiffusion
from ldmrt.checkpoints.diffusers_folder import MODEL_INDEX, read_json
from ldmrt.weight_files import read_weights
from ldmrt.checkpoints.loading import assemble
from ldmrt.checkpoints.schedule import describe_schedule
from ldmrt.checkpoints.state import Assembly, component_of, dtype_counts, names, non_finite, plural

_COMPONENTS = {"model.diffusion_model": "UNet", "first_stage_model": "autoencoder",
               "cond_stage_model": "conditioner", "other": "outside the model"}


def describe_checkpoint(path: Path, *, preset: str | None = None, yaml: Path | None = None) -> str:
    """A plain-text report: family, components with parameter counts and dtypes, scheduler, oddities."""
    path = Path(path)
    lines = [f"checkpoint {path}"]
    if path.is_dir() and (path / MODEL_INDEX).is_file():
        index = read_json(path / MODEL_INDEX)
        lines.append(f"format: diffusers folder ({index.get('_class_name', 'unknown pipeline')})")
        for name, spec in index.items():
            if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2:
                lines.append(f"  {name}/: {spec[1] or 'absent'}")
    try:
        assembly = assemble(path, preset=preset, yaml=yaml)
    except CheckpointError as exc:
        if path.is_dir() or not path.is_file():
            raise
        return "\n".join(lines + _raw_report(path) + [f"cannot derive a model config: {exc}"])
    return "\n".join(lines + _report(assembly))


def _report(assembly: Assembly) -> list[str]:
    config = assembly.config
    if assembly.format != "diffusers":
        lines = [f"format: original single file ({assembly.format})"]
    else:
        lines = []
    lines += [f"family: {assembly.detected}", f"config from: {assembly.config_source}",
              "components:"]
    params = Counter()
    for key, value in assembly.state.items():
        params[component_of(key)] += value.numel()
    for component, count in sorted(params.items(), key=lambda item: list(_COMPONENTS).index(item[0])):
        dtypes = ", ".join(f"{n} {d}" for d, n in sorted(assembly.dtypes.get(component, Counter()).items()))
        lines.append(f"  {component}: {_what(component, config)}, {_millions(count)} parameters ({dtypes})")
    lines.append(f"scheduler: {describe_schedule(config.scheduler)}")
    lines.append(f"latent scale: {config.scale_factor:g}; default image size {config.default_image_size}")
    if config.spatial is not None:
        lines.append(f"spatial conditioning: {config.spatial.describe()}")
    text = isinstance(config.conditioner, (ClipTextConfig, BertConfig))
    if assembly.tokenizer_dir:
        lines.append(f"tokenizer: {assembly.tokenizer_dir}")
    else:
        lines.append("tokenizer: none found (exporting the text encoder needs one)" if text else
                     "tokenizer: not needed")
    unusual = list(assembly.warnings) + _mismatch(assembly)
    if assembly.ema_tensors:
        unusual.append(f"EMA weights: {plural(assembly.ema_tensors, 'tensor')} under model_ema.* "
                       f"(see below for which UNet weights are loaded)")
    bad = non_finite(assembly.state)
    if bad:
        unusual.append(f"non-finite values (NaN/inf) in {plural(len(bad), 'tensor')}: {names(bad)}")
    lines.append("unusual:" if unusual else "unusual: nothing")
    lines += [f"  - {item}" for item in unusual]
    if assembly.notes:
        lines.append("handled on load:")
        lines += [f"  - {note}" for note in assembly.notes]
    return lines


def _mismatch(assembly: Assembly) -> list[str]:
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LatentDiffusion(assembly.config).state_dict().items()}
    state = assembly.state
    out = []
    missing = sorted(expected.keys() - state.keys())
    extra = sorted(state.keys() - expected.keys())
    shapes = [k for k in sorted(expected.keys() & state.keys()) if tuple(state[k].shape) != expected[k]]
    if missing:
        out.append(f"{plural(len(missing), 'missing key')} (a strict load fails): {names(missing)}")
    if extra:
        out.append(f"{plural(len(extra), 'extra key')} (a strict load fails): {names(extra)}")
    if shapes:
        out.append(f"{plural(len(shapes), 'shape mismatch')} (a strict load fails): {names(shapes)}")
    fault = assembly.explain_mismatch() if out and assembly.explain_mismatch else None
    return out + ([f"fields at fault: {fault}"] if fault else [])


def _what(component: str, config: ModelConfig) -> str:
    if component == "model.diffusion_model":
        u = config.unet
        widths = f"{u.model_channels}x{list(u.channel_mult)}" if u.channel_mult else f"widths {list(u.level_channels)}"
        return (f"UNet {widths}, attention at {list(u.attention_resolutions)}, context {u.context_dim}"
                + (f", text_time ({u.time_ids} time ids)" if u.time_ids else ""))
    if component == "first_stage_model":
        a = config.autoencoder
        kind = f"VQ ({a.n_embed} codes)" if a.kind == AutoencoderKind.VQ else "KL"
        return f"{kind} autoencoder f{a.downsampling_factor}, {a.embed_dim} latent channels"
    if component == "cond_stage_model":
        c = config.conditioner
        if isinstance(c, ClipTextConfig):
            return f"CLIP text {c.num_hidden_layers}x{c.hidden_size}, {c.layer.value} layer, {c.hidden_act}"
        if isinstance(c, BertConfig):
            return f"BERT-like text {c.n_layer}x{c.n_embed}"
        if isinstance(c, ClassEmbedderConfig):
            return f"class embedder ({c.n_classes} classes)"
    return _COMPONENTS.get(component, component)


def _raw_report(path: Path) -> list[str]:
    """What can be said about a file whose model config cannot be derived."""
    weights = read_weights(path)
    lines = [f"format: {weights.format}, {len(weights.tensors)} tensors"]
    params = Counter()
    for key, value in weights.tensors.items():
        params[key.split(".")[0]] += value.numel()
    for prefix, count in params.most_common(8):
        lines.append(f"  {prefix}.*: {_millions(count)} parameters")
    for component, dtypes in dtype_counts(weights.tensors).items():
        lines.append(f"  dtypes of {component}: {dict(dtypes)}")
    return lines


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count:,}"
