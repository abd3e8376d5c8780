"""`ldmrt export`: a model -> a validated, self-describing bundle, written atomically."""
from __future__ import annotations

import copy
import json
import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ldmrt.atomic import Ownership, describe, foreign_entries, move_into_place, work_folder
from ldmrt.checkpoints.source import ModelSource, weights_digest
from ldmrt.config import BertConfig, ClipTextConfig
from ldmrt.engine_record import RECORD_SUFFIX
from ldmrt.engines import ort_cache
from ldmrt.errors import BundleError, ConfigError, ExportError, ParityError
from ldmrt.models.components import ComponentGraph, example_inputs, to_torch
from ldmrt.export.onnx_graph import MIN_OPSET, export_graph
from ldmrt.export.quantize import Int8Options, quantize_unet, split_prompts
from ldmrt.export.lora_record import record_adaptable_weights
from ldmrt.export.step_graph import export_step_graph
from ldmrt.export.validate import shape_plan, validate_graph
from ldmrt.lora.choice import LoraChoice
from ldmrt.iospec import Component, Precision, ShapeRanges, component_specs
from ldmrt.manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, TOKENIZER_DIR, ComponentEntry, Manifest,
                            SourceRecord, TokenizerEntry, load_manifest, write_manifest)
from ldmrt.models import TORCH_DTYPES

log = logging.getLogger(__name__)

Progress = Callable[[str, str], None]   # (component, stage) -> None


@dataclass(frozen=True)
class ExportOptions:
    precision: Precision = Precision.FP32
    components: tuple[str, ...] | None = None      # None: every component the model has
    shape_ranges: ShapeRanges | None = None        # None: around the model's default size
    opset: int = MIN_OPSET
    validate: bool = True
    force: bool = False
    # True: the VAE decoder in fp32; None: the model's choice (fp32_components); False: never
    fp32_vae_decoder: bool | None = None
    optimize: bool = True
    int8: Int8Options = Int8Options()              # --precision int8: calibration and parity bounds
    loras: tuple[LoraChoice, ...] = ()             # adapters fused into the weights (--lora)


@dataclass(frozen=True)
class ExportResult:
    manifest: Manifest
    path: Path
    seconds: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()       # choices export made for the user, to be said


def fp32_components(config, options: ExportOptions) -> tuple[frozenset[str], tuple[str, ...]]:
    """(the components kept in fp32 in a reduced-precision export, why, to be said). SDXL's
    original VAE overflows in fp16: as diffusers' SDXL pipelines upcast a VAE whose config says
    force_upcast, an fp16 export keeps both VAE graphs in fp32 unless told otherwise."""
    if options.fp32_vae_decoder:
        return frozenset({Component.VAE_DECODER}), ()
    if options.fp32_vae_decoder is None and options.precision == Precision.FP16 and config.vae_needs_fp32:
        return frozenset({Component.VAE_DECODER, Component.VAE_ENCODER}), (
            "VAE kept in float32: this SDXL VAE overflows in fp16 (its config says force_upcast, as "
            "diffusers' SDXL pipelines read it); --no-fp32-vae-decoder exports it in fp16, e.g. for "
            "the fp16-fixed VAE",)
    return frozenset(), ()


def export_bundle(source: ModelSource, out: Path, options: ExportOptions = ExportOptions(),
                  progress: Progress | None = None) -> ExportResult:
    """Export, validate, then move the finished bundle into `out` (nothing half-written on failure).
    With `options.loras` the adapters are fused into the source's model for the export and its
    base weights restored afterwards, bit for bit (ldmrt.lora.WeightSwitch)."""
    if not options.loras:
        return _export(source, out, options, progress)
    from ldmrt.lora.switch import WeightSwitch

    switch = WeightSwitch(source.model)
    records = switch.set(options.loras)           # read and checked before any export work
    try:
        if source.record is not None:
            source = dataclasses.replace(source, record=dataclasses.replace(
                source.record, loras=tuple((r.path, r.sha256, r.scale) for r in records)))
        return _export(source, out, options, progress)
    finally:
        switch.set(())


def _export(source: ModelSource, out: Path, options: ExportOptions, progress: Progress | None) -> ExportResult:
    out = Path(out).absolute()
    _check_destination(out, options.force)
    if options.precision == Precision.INT8:
        split_prompts(source.prompts)        # bad calibration prompts fail before minutes of export
    config = source.model.config
    ranges = options.shape_ranges or ShapeRanges.for_model(config)
    fp32, notes = fp32_components(config, options)
    specs = component_specs(config, ranges, options.precision, fp32)
    names = options.components or tuple(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ConfigError(f"components {list(unknown)}: not in this model; expected some of {list(specs)}",
                          field="components")
    if options.precision == Precision.BF16 and options.opset < 22:
        raise ConfigError(f"precision bf16: needs opset >= 22 (ONNX Conv takes bfloat16 from opset 22), "
                          f"found opset {options.opset}", field="precision")

    report = progress or (lambda component, stage: log.info("%s: %s", component, stage))
    try:
        work = work_folder(out, replaceable=lambda folder: _check_replaceable(folder, out))
    except OSError as exc:
        raise ExportError(f"out {out}: cannot create a folder there ({exc.strerror or exc})", field="out") from None
    seconds: dict[str, float] = {}
    try:
        tokenizer = None
        if source.write_tokenizer is not None and Component.TEXT_ENCODER in names:
            # First: a missing tokenizer fails before minutes of export, not after.
            (work / TOKENIZER_DIR).mkdir()
            kind = source.write_tokenizer(work / TOKENIZER_DIR)
            tokenizer = TokenizerEntry.from_folder(work, kind)
        entries = {}
        for name in names:
            start = time.perf_counter()
            if name == Component.DENOISE_STEP:     # built from its spec, not traced from torch
                entries[name] = export_step_graph(specs[name], work, options.opset, report)
            else:
                entries[name] = _export_component(source, specs[name], work, options, report)
            seconds[name] = time.perf_counter() - start
        manifest = Manifest(name=config.name, source=source.source, random_weights=source.random_weights,
                            config=config, precision=options.precision, shape_ranges=ranges,
                            components=entries, tokenizer=tokenizer, model_source=_source_record(source))
        write_manifest(work, manifest)
        try:
            # Checked again at the rename: another export may have finished there meanwhile, or
            # the user may have put files into the bundle being replaced.
            move_into_place(work, out, (lambda folder: _check_replaceable(folder, out)) if options.force else None)
        except FileExistsError:
            raise ExportError(f"out {out}: another export finished there while this one ran; its "
                              f"bundle is kept and this one discarded (pass --force to replace it, "
                              f"or choose another folder)", field="out") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    for note in notes:
        log.info("%s", note)
    return ExportResult(manifest=manifest, path=out, seconds=seconds, notes=notes)


def _source_record(source: ModelSource) -> SourceRecord | None:
    """The source record with the digest of the weights as exported; None for a model ldmrt
    cannot load again (a test's in-memory model): the torch backend then refuses the bundle."""
    if source.record is None:
        return None
    return dataclasses.replace(source.record, weights_sha256=weights_digest(source.model))


def _export_component(source: ModelSource, spec, work: Path, options: ExportOptions,
                      report: Progress) -> ComponentEntry:
    model = source.model
    reference = ComponentGraph(model, spec).eval()
    graph_dtype = spec.outputs[0].dtype
    graph = reference if graph_dtype == "float32" else copy.deepcopy(reference).to(TORCH_DTYPES[graph_dtype])
    plan = shape_plan(spec)
    inputs = to_torch(example_inputs(model.config, spec, plan.trace, seed=0), spec, TORCH_DTYPES[graph_dtype])
    report(spec.name, "tracing")
    path = export_graph(graph, spec, inputs, work / f"{spec.name}.onnx", options.opset, options.optimize)
    if not (options.precision == Precision.INT8 and spec.name == Component.UNET):     # int8: weights quantized
        record_adaptable_weights(model, reference, graph, path, to_torch(
            example_inputs(model.config, spec, plan.trace, seed=0), spec, TORCH_DTYPES["float32"]))
    del graph
    parity = None
    if options.validate:
        report(spec.name, "validating")
        precision = Precision.FP32 if graph_dtype == "float32" else options.precision
        parity = validate_graph(path, reference, model.config, spec, precision, plan.validate)
        if not parity.passed:
            raise ParityError(
                f"{spec.name}: ONNX Runtime vs PyTorch relative L2 {parity.rel_l2:.3g} exceeds the "
                f"{graph_dtype} tolerance {parity.tolerance:g} (max abs {parity.max_abs:.3g}, "
                f"shapes {dict(parity.shapes)}); no bundle written")
    if options.precision == Precision.INT8 and spec.name == Component.UNET:
        report(spec.name, "quantizing to int8 (calibration, parity vs fp32)")
        parity = quantize_unet(path, model, spec, options.int8, source.prompts).parity_record()
    report(spec.name, "hashing")
    return ComponentEntry.from_files(work, spec, graph_dtype, parity)


def _check_destination(out: Path, force: bool) -> None:
    """Refuse to overwrite unless --force, and never replace a folder holding files ldmrt did not
    write (checked here, before any work, and again right before the swap)."""
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise ExportError(f"out {out}: expected a new folder, found an existing "
                          f"{'symbolic link' if out.is_symlink() else 'file'}; choose another path", field="out")
    if not any(out.iterdir()):
        return
    _check_replaceable(out, out)
    if not force:
        raise ExportError(f"out {out}: a bundle already exists there; pass --force to replace it", field="out")


def _check_replaceable(folder: Path, out: Path) -> None:
    """ExportError naming what in `folder` (the bundle at `out`, maybe moved aside) ldmrt did not
    write: a bundle is replaced only when it holds nothing else."""
    keep = "; choose another folder (ldmrt never deletes them, even with --force)"
    foreign, complete = [], True
    for _ in range(3):         # a racing export may move the folder away or swap another bundle in
        if not os.path.lexists(folder):
            return             # gone meanwhile (a racing export moved it): nothing there to keep
        if folder.is_symlink() or not folder.is_dir():
            raise ExportError(f"out {out}: expected a bundle folder, found something else{keep}", field="out")
        before = _manifest_bytes(folder)
        try:
            if before is None:
                raise BundleError("no manifest.json")
            manifest = load_manifest(folder)
        except BundleError as exc:
            if not os.path.lexists(folder) or _manifest_bytes(folder) != before:
                continue       # moved or swapped while it was read: look again
            if before is None:
                foreign, complete = foreign_entries(folder, lambda parts, is_dir: Ownership.FOREIGN)
                raise ExportError(f"out {out}: the folder holds files that are not an ldmrt bundle "
                                  f"({describe(foreign, complete)}){keep}", field="out") from None
            raise ExportError(f"out {out}: its manifest.json is unreadable, so ldmrt cannot tell its "
                              f"files from yours ({str(exc)[:200]}){keep}", field="out") from None
        foreign, complete = foreign_entries(folder, bundle_ownership(folder, manifest))
        if _manifest_bytes(folder) == before:
            break
    else:
        raise ExportError(f"out {out}: the folder kept changing while ldmrt checked what is in it "
                          f"(another export or a user writing there); try again", field="out")
    if not complete:           # the search stopped at its bound: what lies beyond may be the user's
        raise ExportError(f"out {out}: the bundle folder holds too many entries to check that ldmrt "
                          f"wrote them all ({describe(foreign, complete)}); move what is yours out "
                          f"first, or choose another folder (ldmrt never deletes them, even with --force)",
                          field="out")
    if foreign:
        raise ExportError(f"out {out}: the bundle folder holds files ldmrt did not write: "
                          f"{describe(foreign, complete)}; move them out first, or choose another "
                          f"folder (ldmrt never deletes them, even with --force)", field="out")


def _manifest_bytes(folder: Path) -> bytes | None:
    """manifest.json's bytes (bounded), or None where it is missing or not a regular file (a FIFO
    would block the read)."""
    if not (folder / MANIFEST_NAME).is_file():
        return None
    try:
        with open(folder / MANIFEST_NAME, "rb") as handle:
            return handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError:
        return None


ENGINES_DIR = "engines"        # ldmrt build's TensorRT engines (export/tensorrt.py writes there)


def bundle_ownership(folder: Path, manifest: Manifest):
    """What ldmrt wrote in a bundle folder, from its own records: manifest.json and the files it
    lists; tokenizer/ files the manifest lists; engines/<component>-.../ folders of the bundle's
    components with their <component>.plan and record (and what engine records name), the
    engines' timing cache; ort_cache/ entries (ort_cache.ownership). Everything else is the user's."""
    from ldmrt.export.engines import TIMING_CACHE

    top = {MANIFEST_NAME, *(name for entry in manifest.components.values() for name in entry.files)}
    tokenizer = set(manifest.tokenizer.files) if manifest.tokenizer is not None else set()
    recorded = {(r.key, r.file) for r in manifest.engines}
    recorded_keys = {r.key for r in manifest.engines}
    cache = ort_cache.ownership(folder / ort_cache.BUNDLE_CACHE_DIR)
    made = {ENGINES_DIR, ort_cache.BUNDLE_CACHE_DIR} | ({TOKENIZER_DIR} if tokenizer else set())

    def engine_folder(key: str) -> bool:
        """An engine folder of the manifest's, or one whose own record names it (a build that
        stopped before the manifest was updated); a folder of that form without either is the user's."""
        component = key.split("-", 1)[0]           # engine keys start with "<component>-"
        if "-" not in key or component not in manifest.components:
            return False
        return key in recorded_keys or _record_key(folder / ENGINES_DIR / key / f"{component}{RECORD_SUFFIX}") == key

    def engine_file(key: str, name: str) -> bool:
        component = key.split("-", 1)[0]
        return name in (f"{component}.plan", f"{component}{RECORD_SUFFIX}") or (key, name) in recorded

    def judge(parts: tuple[str, ...], is_dir: bool) -> Ownership:
        head, rest = parts[0], parts[1:]
        if head == ort_cache.BUNDLE_CACHE_DIR and rest:
            return cache(rest, is_dir)
        if is_dir:
            made_here = (not rest and head in made) or (head == ENGINES_DIR and len(rest) == 1
                                                          and engine_folder(rest[0]))
            return Ownership.FOLDER if made_here else Ownership.FOREIGN
        owned = ((not rest and head in top)
                 or (head == TOKENIZER_DIR and len(rest) == 1 and rest[0] in tokenizer)
                 or (head == ENGINES_DIR and rest == (TIMING_CACHE,))
                 or (head == ENGINES_DIR and len(rest) == 2 and engine_file(*rest)))
        return Ownership.WHOLE if owned else Ownership.FOREIGN
    return judge


def _record_key(path: Path) -> str | None:
    """The "key" of an engine record file (bounded read), or None when it is not one."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data.get("key") if isinstance(data, dict) and isinstance(data.get("key"), str) else None


def preset_source(name: str, seed: int = 0) -> ModelSource:
    """A preset with random weights from `seed` and synthetic tokenizer assets."""
    from ldmrt.presets import preset
    from ldmrt.models import build_model

    config = preset(name)
    log.info("preset %r: the weights are RANDOM (seed %d); images will be noise", name, seed)
    return ModelSource(model=build_model(config, seed=seed), source=f"preset:{name}", random_weights=True,
                       write_tokenizer=None if config.is_layout_conditioned else
                       synthetic_tokenizer_writer(config.conditioner),
                       record=SourceRecord(kind="preset", location=name, seed=seed))


def synthetic_tokenizer_writer(conditioner) -> Callable[[Path], str] | None:
    from ldmrt.synthetic_tokenizer import write_synthetic_tokenizer

    if isinstance(conditioner, (ClipTextConfig, BertConfig)):
        return lambda folder: write_synthetic_tokenizer(folder, conditioner)   # tokenizer.json
    return None


