"""`ldmrt build`: every component of a bundle -> a TensorRT / TensorRT-RTX engine, recorded in
the manifest.

    build_bundle(bundle_dir, BundleBuildOptions(...)) -> list[EngineRecord]

Profiles come from the bundle's own shape ranges, through the same `component_specs` that
wrote them (so the UNet's batch is doubled for classifier-free guidance exactly as at export).
Each engine is written atomically into engines/<key>/ (plan, then its record); the manifest is
rewritten atomically after each engine, so it only ever lists complete engines. An engine whose
key matches and whose plan still has the recorded sha256 is reused, not rebuilt.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

from ldmrt.engine_record import (RECORD_SUFFIX, EngineRecord, engine_plan_path, engines_for,
                                 read_engine_record)
from ldmrt.engines import trt_api
from ldmrt.engines.backend import ENGINE_BACKENDS, Backend
from ldmrt.engines.tensorrt import RuntimeInfo, check_engine_record
from ldmrt.engines.trt_api import TrtApi
from ldmrt.errors import BundleError, ConfigError, StaleEngineError
from ldmrt.export.tensorrt import (BuildOptions, EnginePlan, build_engine, check_optimization_level,
                                   plan_engine, resolve_profiles)
from ldmrt.iospec import ComponentSpec, ShapeRanges, component_specs
from ldmrt.manifest import ComponentEntry, Manifest, load_manifest, verify_bundle, write_manifest
from ldmrt.writable import check_folder_writable

log = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"     # engines/timing.cache, shared by every component's build


@dataclass(frozen=True)
class SizeProfile:
    """One optimization profile in image terms: sides in pixels (square), and at most
    `max_batch` images per call (None: the bundle's)."""
    min_size: int
    opt_size: int
    max_size: int
    max_batch: int | None = None

    def __post_init__(self) -> None:
        sizes = (self.min_size, self.opt_size, self.max_size)
        if not all(_is_count(v) for v in sizes) or not sizes[0] <= sizes[1] <= sizes[2] \
                or not (self.max_batch is None or _is_count(self.max_batch)):
            raise ConfigError(f"profiles {','.join(map(str, sizes))}"
                              f"{'' if self.max_batch is None else f',{self.max_batch}'}: expected "
                              f"MIN <= OPT <= MAX image sides >= 1 and MAX_BATCH >= 1",
                              field="profiles")


@dataclass(frozen=True)
class BundleBuildOptions:
    """How to build a bundle's engines. Sizes are image pixels and batches are images per call,
    as at export; guided components (text encoder, UNet) get twice the batch for CFG.

    profiles: () = one profile per component from the bundle's shape ranges; else one profile
    per SizeProfile (each inside the bundle's ranges). static_size / static_batch: one fixed shape
    (the other one takes the bundle's opt value)."""
    backend: str = trt_api.TENSORRT_RTX
    components: tuple[str, ...] | None = None          # None: every component in the bundle
    profiles: tuple[SizeProfile, ...] = ()
    static_size: tuple[int, int] | None = None         # (height, width) in pixels
    static_batch: int | None = None                    # images per call
    optimization_level: int = 3
    compute_capabilities: tuple[str, ...] = ()         # RTX AOT targets ("sm86", ...)
    refit: bool = False
    weight_streaming: bool = False
    timing_cache: bool = True                          # engines/timing.cache (tensorrt only)
    force: bool = False                                # rebuild even when a verified engine exists

    @property
    def static(self) -> bool:
        return self.static_size is not None or self.static_batch is not None

    def __post_init__(self) -> None:
        # Every check that needs no bundle, so a bad option fails before any file is read.
        backend = Backend.parse(self.backend, choices=ENGINE_BACKENDS)
        object.__setattr__(self, "backend", backend.value)    # 'TensorRT-RTX' -> 'tensorrt-rtx'
        check_optimization_level(self.optimization_level)
        if self.static_batch is not None and not _is_count(self.static_batch):
            raise ConfigError(f"static_batch {self.static_batch!r}: expected an integer >= 1 "
                              f"(images per call)", field="static_batch")
        if self.static_size is not None and not (
                len(self.static_size) == 2 and all(_is_count(v) for v in self.static_size)):
            shown = "x".join(map(str, self.static_size)) if isinstance(self.static_size, tuple) \
                else repr(self.static_size)
            raise ConfigError(f"static_size {shown}: expected (height, width) in "
                              f"pixels, each >= 1", field="static_size")
        if self.static and self.profiles:
            raise ConfigError("static_size/static_batch fix one shape; profiles add dynamic "
                              "profiles: give one or the other", field="profiles")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class BuildEvent:
    """Progress of one component: verifying (the whole bundle), building, built or reused."""
    component: str                 # "" for bundle-wide steps
    stage: str                     # verifying | building | built | reused
    record: EngineRecord | None = None
    detail: str = ""


Progress = Callable[[BuildEvent], None]


def build_bundle(bundle_dir: str | Path, options: BundleBuildOptions = BundleBuildOptions(),
                 progress: Progress | None = None) -> list[EngineRecord]:
    """Build (or reuse) an engine per selected component; returns their records in bundle order."""
    bundle = Path(bundle_dir)
    report = progress or (lambda event: log.info("%s: %s %s", event.component or "bundle",
                                                 event.stage, event.detail))
    api = trt_api.load(options.backend)        # fail fast, with the pip line, before hashing
    manifest = load_manifest(bundle)
    names = select_components(manifest, options.components)
    # Every option error, and an unwritable bundle, before hashing the graphs (minutes for SD).
    api.resolve_targets(options.compute_capabilities)
    engine_options = {name: component_options(manifest, manifest.component(name).spec, options,
                                              bundle / "engines" / TIMING_CACHE)
                      for name in names}
    for name in names:
        resolve_profiles(manifest.component(name).spec, engine_options[name])
    check_writable(bundle)
    report(BuildEvent("", "verifying", detail=f"sha256 of {', '.join(names)}"))
    verify_bundle(bundle, manifest, names)
    records = []
    for name in names:
        entry = manifest.component(name)
        plan = plan_engine(bundle / entry.file, entry.spec, engine_options[name], api)
        _check_onnx_identity(bundle, entry, plan)
        _check_engine_folder(bundle / "engines" / plan.key)
        record = None if options.force else reusable_engine(bundle, manifest, plan, api)
        if record is not None:
            report(BuildEvent(name, "reused", record, f"engines/{record.key}: plan sha256 verified"))
        else:
            report(BuildEvent(name, "building", detail=plan.key))
            record = build_engine(bundle / entry.file, entry.spec, bundle, engine_options[name],
                                  api=api, plan=plan)
            report(BuildEvent(name, "built", record, f"engines/{record.key}"))
        manifest = record_engine(bundle, manifest, record)
        records.append(record)
    return records


def check_writable(bundle: Path) -> None:
    """The build writes engines/<key>/ and rewrites manifest.json: both must be possible before
    the first (slow) build, or the engines built would be lost with a traceback."""
    engines = bundle / "engines"
    if os.path.lexists(engines) and not engines.is_dir():
        raise BundleError(f"bundle {bundle}: engines is not a folder (a file or a dangling link); "
                          f"ldmrt writes engines into {engines}/: move it away first")
    for folder in (bundle, engines) if engines.is_dir() else (bundle,):
        check_folder_writable(folder, f"bundle {bundle}", BundleError)


def _check_engine_folder(folder: Path) -> None:
    if os.path.lexists(folder) and not folder.is_dir():
        raise BundleError(f"{folder}: expected ldmrt's engine folder of that name, found a file; "
                          f"move it away (ldmrt does not replace files it did not write)")


def component_options(manifest: Manifest, spec: ComponentSpec, options: BundleBuildOptions,
                      timing_cache: Path | None) -> BuildOptions:
    """The engine-level options for one component: its profiles in its own symbols."""
    profiles: tuple[Mapping[str, tuple[int, int, int]], ...] = ()
    static = None
    if options.static:
        static = static_shape(manifest, spec, options.static_size, options.static_batch)
        if set(static) != set(spec.ranges):    # one profile: the fixed shape, the other symbols' ranges
            profiles, static = ({**spec.ranges, **{s: (v, v, v) for s, v in static.items()}},), None
    else:
        profiles = tuple(profile_ranges(manifest, spec, ranges) for ranges in options.profiles)
    return BuildOptions(backend=options.backend, optimization_level=options.optimization_level,
                        profiles=profiles, static_shape=static,
                        timing_cache=timing_cache if options.timing_cache else None,
                        compute_capabilities=options.compute_capabilities, refit=options.refit,
                        weight_streaming=options.weight_streaming)


def profile_ranges(manifest: Manifest, spec: ComponentSpec, profile: SizeProfile
                   ) -> dict[str, tuple[int, int, int]]:
    """Symbol -> (min, opt, max) of `spec` for an image-level profile, derived as at export."""
    exported = manifest.shape_ranges
    max_batch = exported.max_batch if profile.max_batch is None else profile.max_batch
    sizes = f"{profile.min_size},{profile.opt_size},{profile.max_size},{max_batch}"
    if not (exported.min_size <= profile.min_size and profile.max_size <= exported.max_size
            and 1 <= max_batch <= exported.max_batch):
        raise ConfigError(f"profiles {sizes}: expected sizes within the bundle's "
                          f"{exported.min_size}..{exported.max_size} px and 1..{exported.max_batch} "
                          f"images; re-export with wider --min-size/--max-size/--max-batch",
                          field="profiles")
    ranges = ShapeRanges(min_size=profile.min_size, opt_size=profile.opt_size,
                         max_size=profile.max_size, max_batch=max_batch,
                         opt_batch=min(exported.opt_batch, max_batch))
    try:
        derived = component_specs(manifest.config, ranges, manifest.precision)[spec.name]
    except ConfigError as exc:
        raise ConfigError(f"profiles {sizes}: {exc}", field="profiles") from None
    return {symbol: derived.ranges[symbol] for symbol in spec.ranges}


def static_shape(manifest: Manifest, spec: ComponentSpec, size: tuple[int, int] | None,
                 batch: int | None) -> dict[str, int]:
    """Symbol -> value of `spec` for one image size (pixels) and batch (images per call)."""
    exported = manifest.shape_ranges
    height, width = size or (exported.opt_size, exported.opt_size)
    images = exported.opt_batch if batch is None else batch
    factor = manifest.config.downsampling_factor
    for side, value in (("height", height), ("width", width)):
        if not exported.min_size <= value <= exported.max_size or value % factor:
            raise ConfigError(f"static_size: {side} {value} px: expected a multiple of "
                              f"{factor} within the bundle's {exported.min_size}.."
                              f"{exported.max_size} px; re-export with wider --min-size/--max-size",
                              field="static_size")
    if not 1 <= images <= exported.max_batch:
        raise ConfigError(f"static_batch {images}: expected 1..{exported.max_batch} images "
                          f"(the bundle's --max-batch); re-export with a larger --max-batch",
                          field="static_batch")
    # The same derivation as at export decides which components see a doubled (CFG) batch.
    at_batch = replace(exported, max_batch=images, opt_batch=images)
    derived = component_specs(manifest.config, at_batch, manifest.precision)[spec.name]
    values = {"batch": derived.ranges["batch"][1] if "batch" in derived.ranges else images,
              "latent_height": height // factor, "latent_width": width // factor}
    if "unet_batch" in derived.ranges:     # the update graph: the UNet's rows; its step count stays dynamic
        values["unet_batch"] = derived.ranges["unet_batch"][1]
    unknown = [symbol for symbol in spec.ranges if symbol not in values and symbol != "evaluations"]
    if unknown:
        raise ConfigError(f"{spec.name}: symbols {unknown} have no static value; build it "
                          f"without --static-size/--static-batch")
    return {symbol: values[symbol] for symbol in spec.ranges if symbol in values}


def reusable_engine(bundle: Path, manifest: Manifest, plan: EnginePlan,
                    api: TrtApi) -> EngineRecord | None:
    """The record of an engine with `plan.key` whose plan verifies, from the manifest or (after
    an interrupted build) from engines/<key>/; None when there is none."""
    runtime = RuntimeInfo(api.name, api.version, None)   # the GPU target is part of the key
    listed = engines_for(manifest.engines, plan.component, key=plan.key)
    on_disk = bundle / "engines" / plan.key / f"{plan.component}{RECORD_SUFFIX}"
    for source in (*listed, on_disk) if on_disk.is_file() else listed:
        try:
            record = source if isinstance(source, EngineRecord) else read_engine_record(source)
            if (record.component, record.key) != (plan.component, plan.key):
                continue
            check_engine_record(record, runtime, onnx_sha256=plan.facts.sha256,
                                plan_path=engine_plan_path(bundle, record), bundle=bundle)
            return record
        except (BundleError, StaleEngineError) as exc:    # CorruptEngineError is a BundleError
            log.warning("%s: not reusing engines/%s: %s", plan.component, plan.key, exc)
    return None


def record_engine(bundle: Path, manifest: Manifest, record: EngineRecord) -> Manifest:
    """Add `record` to manifest.json (replacing one with the same key), atomically."""
    if engines_for(manifest.engines, key=record.key) == (record,):
        return manifest                        # a reused engine: nothing to write
    updated = manifest.with_engine(record)
    write_manifest(bundle, updated)
    return updated


def select_components(manifest: Manifest, components: tuple[str, ...] | None) -> list[str]:
    """The bundle's components named in `components` (None: all), in the order given, once each."""
    if components is None:
        return list(manifest.components)
    unknown = [name for name in components if name not in manifest.components]
    if unknown or not components:
        raise ConfigError(f"components {','.join(components)!r}: {unknown or 'none'} not in this "
                          f"bundle; expected some of {', '.join(manifest.components)}",
                          field="components")
    return list(dict.fromkeys(components))


def _check_onnx_identity(bundle: Path, entry: ComponentEntry, plan: EnginePlan) -> None:
    """The graph the engine is built from must be exactly the files the manifest lists."""
    expected = entry.digest
    if plan.facts.sha256 != expected:
        raise BundleError(f"bundle {bundle}: {entry.file} and its external data hash to "
                          f"{plan.facts.sha256[:12]}…, manifest.json lists {list(entry.files)} "
                          f"({expected[:12]}…): the graph changed during the build or refers to "
                          f"files the manifest does not list; re-export the bundle")
