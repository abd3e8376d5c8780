"""`ldmrt bench --lora`: what switching LoRA adapters costs on a loaded pipeline, and its alternative.

In each contender's process, after its latency cases (which run without adapters), the switch
`pipeline.loras.set(adapters)` then `pipeline.loras.set([])` runs `cycles` times (bench's
`repeat`). Each switch is timed whole, as a caller sees it: the files read and checked, the
deltas computed, the weights written (torch) or the sessions opened with replaced initializers
(ONNX Runtime) or the engines refitted (TensorRT). The first switch of a process does more than
the rest (torch keeps a copy of every weight it touches; ONNX Runtime reads the graphs' weight
records and base values), so it is reported alone next to the median. One generation of the first
case before, during and after the switch proves it happened (the adapted image differs from the
base one) and was undone (the restored image equals it).

The alternative is a full re-export with the adapters fused. The manifest records no export
time, so it is either timed (`reexport`: the bundle's recorded model source exported again with
its recorded adapters plus these, with the bundle's precision, components and shape ranges, into a
temporary folder, in a fresh process, once) or not measured; the report says which. TensorRT
engines must then be rebuilt too: their recorded build times are listed alongside.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ldmrt.bench_stats import merge_rounds, summarize
from ldmrt.errors import ConfigError
from ldmrt.lora.choice import LoraChoice

WHAT = ("in each contender's process, after its latency cases: pipeline.loras.set(adapters) then "
        "set([]), `repeat` cycles, each switch timed whole (files read and checked, deltas computed, "
        "weights written / sessions reopened / engines refitted); first_* is a fresh process's first "
        "switch (it also keeps the base weights), the median is over every cycle")


def check_lora_options(loras: tuple[LoraChoice, ...], reexport: bool, manifest) -> None:
    """The adapters' files and the re-export's source, before anything runs; LoraError or
    ConfigError naming `lora` / `lora_reexport`."""
    from ldmrt.lora.reading import read_lora

    for choice in loras:
        if not isinstance(choice, LoraChoice):
            raise ConfigError(f"lora {choice!r}: expected a LoraChoice (FILE[:SCALE])", field="lora")
        read_lora(choice.path, "lora")              # a bad file fails before any process starts
    if not reexport:
        return
    if not loras:
        raise ConfigError("lora_reexport: times a re-export with the adapters of --lora, and none was "
                          "given: add --lora FILE[:SCALE]", field="lora_reexport")
    record = manifest.model_source
    if record is None:
        raise ConfigError(f"lora_reexport: bundle {manifest.name!r} records no model source (exported by "
                          f"an ldmrt before model_source records), so there is nothing to export again: "
                          f"drop --lora-reexport", field="lora_reexport")
    needed = [record.location] if record.kind == "checkpoint" else []
    needed += [p for p in (record.yaml, record.tokenizer) if p] + [p for p, _, _ in record.loras]
    missing = [p for p in needed if not Path(p).exists()]
    if missing:
        raise ConfigError(f"lora_reexport: the bundle's recorded source needs {missing[0]}, which is not "
                          f"there: put it back or drop --lora-reexport", field="lora_reexport")


# --- in a contender's process --------------------------------------------------------------------

def measure_switch(pipeline, choices: tuple[LoraChoice, ...], cycles: int, request,
                   sync: Callable[[], None], rss: Callable[[], float]) -> dict[str, Any]:
    """The switch none -> `choices` -> none on `pipeline`, `cycles` times (see the module docstring);
    errors are recorded, not raised (the contender's latency numbers stay)."""

    entry: dict[str, Any] = {"status": "ok", "cycles": cycles}
    try:
        base = _output(pipeline.generate(request))
        to_adapters, to_none = [], []
        for cycle in range(cycles):
            start = time.perf_counter()
            records = pipeline.loras.set(choices, "lora")
            sync()
            to_adapters.append(time.perf_counter() - start)
            if cycle == 0:
                entry["active"] = [{"path": str(c.path), "scale": c.scale} for c in pipeline.loras.active]
                adapted = _output(pipeline.generate(request))
            start = time.perf_counter()
            pipeline.loras.set([], "lora")
            sync()
            to_none.append(time.perf_counter() - start)
        restored = _output(pipeline.generate(request))
    except Exception as exc:      # e.g. TensorRT engines built without --refit
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    entry.update({
        "adapters": [r.to_dict() for r in records],
        "active_after": [str(c.path) for c in pipeline.loras.active],
        "to_adapters": summarize(to_adapters), "to_none": summarize(to_none),
        "first_to_adapters_ms": to_adapters[0] * 1e3, "first_to_none_ms": to_none[0] * 1e3,
        "image_change_max_abs": float(np.abs(adapted - base).max()),
        "restored_max_abs": float(np.abs(restored - base).max()),
        "peak_rss_mib": rss()})          # the process's peak with the switches (the cases' is the result's)
    return entry


def _output(result) -> np.ndarray:
    """What a generation made: its images, or its latents where the bundle decodes none."""
    return result.latents if result.images is None else result.images


def merge_switch(entries: list[dict]) -> dict:
    """A contender's switch over rounds: medians of the round medians (and of the first switches)."""

    failed = next((e for e in entries if e["status"] != "ok"), None)
    if failed is not None:
        return {**failed, "error": f"round {entries.index(failed) + 1} of {len(entries)}: {failed['error']}"}
    first = entries[0]
    merged = {**first, "rounds": len(entries),
              "to_adapters": merge_rounds([e["to_adapters"] for e in entries]),
              "to_none": merge_rounds([e["to_none"] for e in entries]),
              "image_change_max_abs": min(e["image_change_max_abs"] for e in entries),
              "restored_max_abs": max(e["restored_max_abs"] for e in entries),
              "peak_rss_mib": max(e["peak_rss_mib"] for e in entries)}
    for key in ("first_to_adapters_ms", "first_to_none_ms"):
        merged[key] = float(statistics.median(e[key] for e in entries))
        merged[key.replace("_ms", "_ms_per_round")] = [e[key] for e in entries]
    return merged


# --- the alternative: a full re-export -----------------------------------------------------------

def reexport_entry(bundle: Path, manifest, choices: tuple[LoraChoice, ...], timed: bool,
                   run_fresh: Callable[..., dict]) -> dict[str, Any]:
    """What a full re-export with the adapters fused costs: timed in a fresh process (`timed`), or
    not measured; with the engine builds the bundle records (TensorRT needs them again)."""
    builds = [{"component": r.component, "builder": r.builder, "key": r.key, "build_seconds": r.build_seconds}
              for r in manifest.engines]
    if not timed:
        entry = {"basis": "not measured",
                 "why": "the manifest records no export time; pass --lora-reexport to time one"}
    else:
        entry = run_fresh(time_reexport, str(bundle), choices,
                          died={"basis": "timed", "status": "error",
                                "error": "its process died before reporting (killed for memory? a crash?)"})
    entry["engine_builds_recorded"] = builds
    return entry


def time_reexport(bundle: str, choices: tuple[LoraChoice, ...]) -> dict[str, Any]:
    """The bundle's recorded source exported again with the adapters, into a temporary folder."""
    from ldmrt.checkpoints.source import checkpoint_source
    from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
    from ldmrt.iospec import Component
    from ldmrt.manifest import load_manifest

    manifest = load_manifest(bundle)
    record = manifest.model_source
    recorded = tuple(LoraChoice(path, scale) for path, _, scale in record.loras)
    decoder = manifest.components.get(Component.VAE_DECODER)
    options = ExportOptions(
        precision=manifest.precision, components=tuple(manifest.components), shape_ranges=manifest.shape_ranges,
        opset=_opset(Path(bundle) / next(iter(manifest.components.values())).file),
        validate=any(e.parity is not None for e in manifest.components.values()),
        fp32_vae_decoder=True if decoder is not None and decoder.dtype == "float32"
        and manifest.precision.value != "fp32" else None,
        loras=recorded + tuple(choices))
    entry: dict[str, Any] = {"basis": "timed", "source": record.describe(),
                             "options": {"precision": options.precision.value, "components": list(options.components),
                                         "opset": options.opset, "validate": options.validate,
                                         "adapters": [str(c.path) for c in options.loras]}}
    try:
        start = time.perf_counter()
        if record.kind == "preset":
            source = preset_source(record.location, record.seed)
        else:
            def path(value):
                return None if value is None else Path(value)
            source = checkpoint_source(Path(record.location), preset=record.preset, yaml=path(record.yaml),
                                       strict=record.strict, tokenizer=path(record.tokenizer), ema=record.ema)
        loaded = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ldmrt-bench-reexport-") as folder:
            result = export_bundle(source, Path(folder) / "bundle", options)
        entry.update({"status": "ok", "seconds": time.perf_counter() - start,
                      "source_load_seconds": loaded - start, "component_seconds": dict(result.seconds)})
    except Exception as exc:
        entry.update({"status": "error", "error": f"{type(exc).__name__}: {exc}"})
    return entry


def _opset(graph: Path) -> int:
    """The default ONNX domain's opset of a bundle's graph (its structure only, not its weights)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


# --- for the terminal ----------------------------------------------------------------------------

def switch_cells(entry: dict | None) -> list[str]:
    """A measured switch's table cells: to adapters (first), back to none (first), image change /
    restored, peak RSS with the switches."""
    if entry is None:
        return ["not measured (not an ldmrt pipeline)", "", "", ""]
    return [f"{entry['to_adapters']['median_ms']:.1f} ({entry['first_to_adapters_ms']:.1f})",
            f"{entry['to_none']['median_ms']:.1f} ({entry['first_to_none_ms']:.1f})",
            f"{entry['image_change_max_abs']:.3g} / {entry['restored_max_abs']:.3g}", f"{entry['peak_rss_mib']:.0f}"]


def reexport_line(entry: dict) -> str:
    """'instead: a full re-export ...' for the terminal."""
    if entry["basis"] != "timed":
        text = f"instead: a full re-export: not measured ({entry['why']})"
    elif entry["status"] != "ok":
        text = f"instead: a full re-export: failed: {entry['error'][:200]}"
    else:
        text = (f"instead: a full re-export: {entry['seconds']:.1f} s (timed once, fresh process: "
                f"{entry['source']} -> {', '.join(entry['options']['components'])}, "
                f"{entry['options']['precision']}{', validated' if entry['options']['validate'] else ''})")
    builds = entry["engine_builds_recorded"]
    if builds:
        text += "; then the engines again: " + ", ".join(
            f"{b['component']} ({b['builder']}) {b['build_seconds']:.0f} s" for b in builds) + " as recorded"
    return text
