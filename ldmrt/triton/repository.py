"""`ldmrt triton`: a Triton model repository generated from a bundle.

    REPO/<prefix>pipeline/config.pbtxt       Python backend: ldmrt's Pipeline (pipeline_model.py)
    REPO/<prefix>pipeline/probe.py           liveness probe (probe.py): a minimal request per instance
    REPO/<prefix>pipeline/1/model.py
    REPO/<prefix>pipeline/1/ldmrt/           the torch-free runtime, vendored (vendor.py)
    REPO/<prefix>pipeline/1/bundle/          the whole bundle: manifest, graphs, tokenizer, engines
    REPO/<prefix>pipeline/1/loras/           LoRA adapters a request may select (adapters.py)
    REPO/<prefix><component>/config.pbtxt    tensorrt_plan where a usable TensorRT engine exists,
    REPO/<prefix><component>/1/...           onnxruntime_onnx otherwise; dims from the I/O spec

Files come from the bundle as hard links (copies across file systems), copies, or symlinks;
a component model's files are links to the pipeline's bundle copy, so nothing is stored twice.
LoRA adapter files are hard-linked or copied as the bundle's are, and copied with symlink, so the
repository holds them whatever the server mounts.
A new repository is written into a temporary sibling folder and renamed into place; into an
existing (shared) one, each model folder is renamed into place, and only model folders that ldmrt
wrote (ownership.py's marker) and that hold nothing else are ever replaced.
"""
from __future__ import annotations

import enum
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ldmrt.atomic import move_into_place, remove_dead_leftovers, work_folder
from ldmrt.engine_record import EngineRecord, check_plan, engine_plan_path, engines_for
from ldmrt.engines.backend import ENGINE_BACKENDS, Backend
from ldmrt.engines.ort_cache import BUNDLE_CACHE_DIR
from ldmrt.errors import BundleError, ConfigError, CorruptEngineError
from ldmrt.iospec import Component, ComponentSpec, parse_dim
from ldmrt.manifest import MANIFEST_NAME, ComponentEntry, Manifest, load_manifest, verify_bundle
from ldmrt.triton.adapters import (ADAPTER_DIR, PARAMETER, NamedAdapter, adapter_tuple, adapters_parameter,
                                   check_adapter_files)
from ldmrt.triton.config import (BATCH, DynamicBatching, InstanceGroup, InstanceKind,
                                 TritonModelConfig, TritonTensor, component_tensors)
from ldmrt.triton.ownership import claim_models, record_model, refuse_foreign
from ldmrt.triton.pipeline_io import RESPONSE_TENSORS, request_tensors
from ldmrt.triton.server import check_serving_path
from ldmrt.triton.vendor import vendor_runtime
from ldmrt.writable import check_folder_writable

log = logging.getLogger(__name__)

VERSION = "1"                         # every model has one version folder
PIPELINE = "pipeline"
BUNDLE_DIR = "bundle"                 # <pipeline>/1/bundle
PIPELINE_BACKENDS = tuple(b.value for b in (Backend.ONNXRUNTIME,) + ENGINE_BACKENDS)   # not torch: a stub has none
MODEL_TEMPLATE = Path(__file__).with_name("pipeline_model.py")   # imports Triton's pb_utils: copy, don't import
PROBE = Path(__file__).with_name("probe.py")        # shipped as <pipeline>/probe.py: the liveness probe
_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{0,64}$")


class FileMode(str, enum.Enum):
    HARDLINK = "hardlink"   # no extra space; falls back to a copy across file systems
    COPY = "copy"
    SYMLINK = "symlink"     # <pipeline>/1/bundle links to the bundle: mount it at the same path


class ComponentPlatform(str, enum.Enum):
    AUTO = "auto"                  # tensorrt_plan where a usable TensorRT engine exists
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


@dataclass(frozen=True)
class PipelineModelOptions:
    """The Python-backend model that runs ldmrt's Pipeline in each instance's stub process."""
    backend: str = "onnxruntime"       # onnxruntime | tensorrt | tensorrt-rtx
    device: str = "auto"               # onnxruntime: auto (cuda on KIND_GPU) | cpu | cuda
    threads: int = 0                   # onnxruntime intra-op threads per instance; 0: its default
    verify: bool = True                # check the bundle's sha256 when an instance loads
    instances: InstanceGroup = InstanceGroup()
    max_cost: float = 0.0              # refuse requests over steps x images x megapixels; 0: no limit
    loras: tuple[NamedAdapter, ...] = ()   # adapters a request may select by name (--lora NAME=FILE[:SCALE])

    def __post_init__(self) -> None:
        object.__setattr__(self, "loras", adapter_tuple(self.loras, "loras"))
        if isinstance(self.max_cost, bool) or not isinstance(self.max_cost, (int, float)) \
                or not 0 <= self.max_cost < float("inf"):
            raise ConfigError(f"max_cost {self.max_cost!r}: expected a finite number >= 0 "
                              f"(steps x images x megapixels; 0: no limit)", field="max_cost")
        backend = Backend.parse(self.backend, field="pipeline_backend",     # any case, as everywhere
                                choices=[Backend(name) for name in PIPELINE_BACKENDS])
        object.__setattr__(self, "backend", backend.value)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"pipeline_device {self.device!r}: expected auto, cpu or cuda", field="pipeline_device")
        if self.threads < 0:
            raise ConfigError(f"threads {self.threads}: expected >= 0", field="threads")


@dataclass(frozen=True)
class RepositoryOptions:
    prefix: str = ""                   # model names: <prefix>unet, <prefix>pipeline, ...
    platform: ComponentPlatform = ComponentPlatform.AUTO
    instances: InstanceGroup = InstanceGroup()          # every component model
    batching: DynamicBatching = DynamicBatching()       # batched component models
    pipeline: PipelineModelOptions = PipelineModelOptions()
    files: FileMode = FileMode.HARDLINK
    force: bool = False

    def __post_init__(self) -> None:
        if not _PREFIX.match(self.prefix):
            raise ConfigError(f"prefix {self.prefix!r}: expected letters, digits, '_', '.' or '-'", field="prefix")


@dataclass(frozen=True)
class ModelPlan:
    """One model to write: its configuration and its files (path in the version folder -> source)."""
    config: TritonModelConfig
    files: Mapping[str, Path]
    note: str = ""


@dataclass
class RepositoryResult:
    path: Path
    models: list[ModelPlan]
    notes: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)    # ldmrt's model folders written over (--force)
    removed: list[str] = field(default_factory=list)     # ldmrt's models of this group no longer written


# --- the public call -------------------------------------------------------------------------------

def write_repository(bundle_dir: str | os.PathLike, out: str | os.PathLike,
                     options: RepositoryOptions = RepositoryOptions()) -> RepositoryResult:
    """Check the bundle (sha256), plan every model, write its model folders into REPO; returns what
    was written. REPO may be shared: only model folders ldmrt wrote are ever replaced or removed."""
    bundle, out = Path(bundle_dir), Path(out)
    check_output(out)
    if options.files == FileMode.SYMLINK:      # the stubs then open the bundle at its own path
        check_serving_path(bundle, "bundle_dir", "bundle")     # the CLI's BUNDLE argument
    group = f"{options.prefix}{PIPELINE}"
    check_adapter_files(options.pipeline.loras, "loras")       # each file read and checked
    manifest = load_manifest(bundle)
    verify_bundle(bundle, manifest)
    notes: list[str] = []
    models = [pipeline_model(bundle, manifest, options)]
    for entry in manifest.components.values():
        if entry.name != Component.DENOISE_STEP:   # the update graph: the pipeline runs the numpy loop
            models.append(component_model(bundle, manifest, entry, options, notes))
    names = [model.config.name for model in models]
    for name in names:
        remove_dead_leftovers(out / name, refuse_foreign)   # a killed run's moved-aside model folders
    claim = claim_models(out, names, group, options.force)
    # A new REPO is built beside it and renamed in whole; into an existing one (often a mount
    # point) each model folder is built inside it, so every rename stays on its file system.
    fresh = not out.exists()
    temp = work_folder(out if fresh else out / group)
    try:
        notes += _write(temp, bundle, models, options.files, group)
        if fresh:
            move_into_place(temp, out, None)            # another run's new REPO is never replaced
        else:
            for name in names:
                # Judged again at the swap (names and sizes): a file added meanwhile is kept.
                move_into_place(temp / name, out / name,
                                (lambda folder: refuse_foreign(folder, contents=False))
                                if name in claim.replace else None)
            for name in claim.stale:
                refuse_foreign(out / name, contents=False)
                shutil.rmtree(out / name)
    except FileExistsError as exc:
        raise ConfigError(f"out {out}: {exc.filename} was created by someone else while this run "
                          f"wrote; it was left as it is: run again (with --force to replace ldmrt's "
                          f"models)", field="out") from None
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return RepositoryResult(out, models, notes, replaced=list(claim.replace), removed=list(claim.stale))


def check_output(out: Path) -> None:
    """Before any work: REPO is a folder (or can be made) where new folders can be created, on a
    path Triton's Python backend can start a model from."""
    check_serving_path(out, "out")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"out {out}: exists and is not a folder; choose another --out", field="out")
    if out.is_dir() and any(out.iterdir()) and not any(out.glob("*/config.pbtxt")):
        raise ConfigError(f"out {out}: the folder holds files that are not a Triton model repository; "
                          f"choose another folder (ldmrt never deletes them, even with --force)",
                          field="out")
    check_folder_writable(out, f"out {out}", ConfigError, field="out")


# --- models ----------------------------------------------------------------------------------------

def pipeline_model(bundle: Path, manifest: Manifest, options: RepositoryOptions) -> ModelPlan:
    """The Python-backend model: the request tensors of `ldmrt generate` that the bundle's model
    takes (pipeline_io.py), images and latents out."""
    inputs = tuple(TritonTensor(t.name, t.data_type, t.dims, optional=True)
                   for t in request_tensors(manifest.config))
    outputs = tuple(TritonTensor(t.name, t.data_type, t.dims) for t in RESPONSE_TENSORS)
    pipe = options.pipeline
    parameters = {"bundle": BUNDLE_DIR, "backend": pipe.backend, "device": pipe.device,
                  "threads": str(pipe.threads), "verify": "true" if pipe.verify else "false",
                  "ldmrt_bundle_name": manifest.name, "max_cost": f"{pipe.max_cost:g}",
                  "limits": json.dumps(request_limits(manifest, pipe.max_cost), sort_keys=True),
                  PARAMETER: adapters_parameter(pipe.loras)}
    config = TritonModelConfig(name=f"{options.prefix}{PIPELINE}", backend="python", max_batch_size=0,
                               inputs=inputs, outputs=outputs, instance_group=pipe.instances,
                               parameters=parameters)
    files = {f"{BUNDLE_DIR}/{relative}": bundle / relative for relative in _bundle_files(bundle)}
    files.update({f"{ADAPTER_DIR}/{adapter.file}": adapter.path for adapter in pipe.loras})
    adapters = f", LoRA {', '.join(a.name for a in pipe.loras)}" if pipe.loras else ""
    return ModelPlan(config, files, note=f"ldmrt Pipeline on {pipe.backend}{adapters}")


def request_limits(manifest: Manifest, max_cost: float) -> dict[str, Any]:
    """What the pipeline model accepts, as the library checks it (config parameter `limits`, for
    clients and the probe): steps per sampler, image sides in pixels, images per request."""
    from ldmrt.sampling import SAMPLERS, max_steps

    spec = manifest.component(Component.UNET).spec
    f = manifest.config.downsampling_factor
    scheduler = manifest.config.scheduler
    sides = {side: [spec.ranges[f"latent_{side}"][0] * f, spec.ranges[f"latent_{side}"][1] * f,
                    spec.ranges[f"latent_{side}"][2] * f] for side in ("height", "width")}
    return {"steps": {name: [1, max_steps(name, scheduler)] for name in SAMPLERS},
            "default_sampler": scheduler.default_sampler,
            "height": sides["height"], "width": sides["width"], "multiple_of": f,   # [min, default, max]
            "images": [1, manifest.shape_ranges.max_batch], "max_cost": max_cost}


def component_model(bundle: Path, manifest: Manifest, entry: ComponentEntry,
                    options: RepositoryOptions, notes: list[str]) -> ModelPlan:
    """tensorrt_plan over the component's usable TensorRT engines, else onnxruntime_onnx."""
    name = f"{options.prefix}{entry.name}"
    engines, skipped = usable_engines(bundle, manifest, entry)
    notes += [f"{entry.name}: {reason}" for reason in skipped]
    if options.platform == ComponentPlatform.TENSORRT and not engines:
        raise ConfigError(f"--platform tensorrt: the bundle has no usable TensorRT engine for "
                          f"{entry.name} ({'; '.join(skipped) or 'none built'}); build one: "
                          f"ldmrt build {bundle} --backend tensorrt")
    use_trt = bool(engines) and options.platform != ComponentPlatform.ONNXRUNTIME
    group = options.instances
    if use_trt:
        if group.kind == InstanceKind.CPU:
            raise ConfigError(f"{name}: TensorRT engines run on GPUs only; use --kind gpu or auto, "
                              f"or --platform onnxruntime for CPU instances")
        engines, fixed, max_batch = _one_signature(entry, engines, notes)
        versions = sorted({record.builder_version for record, _ in engines})
        notes.append(f"{entry.name}: TensorRT {', '.join(versions)} engines; serve them with a Triton "
                     f"release whose TensorRT is that version")
    else:
        fixed, max_batch = {}, entry.spec.ranges.get(BATCH, (0, 0, 0))[2]
    batched, inputs, outputs = component_tensors(entry.spec, fixed)
    batching = options.batching if batched and options.batching.enabled else None
    if options.batching.enabled and not batched:
        notes.append(f"{entry.name}: not batched (a tensor does not start with the batch axis, or "
                     f"an engine pins it), so no dynamic batching")
    common: dict[str, Any] = dict(name=name, inputs=inputs, outputs=outputs,
                                  max_batch_size=max_batch if batched else 0,
                                  instance_group=group, dynamic_batching=batching)
    if use_trt:
        files: dict[str, Path] = {}
        cc: dict[str, str] = {}
        default = None
        for record, plan in engines:
            for target in record.targets:
                file = f"{entry.name}.{target.replace('+', '_plus')}.plan"
                files[file] = plan
                if target.startswith("sm") and target[2:].isdigit():
                    cc[f"{target[2:-1]}.{target[-1]}"] = file          # sm90 -> "9.0"
                else:
                    default = file                                   # ampere+: any GPU >= sm80
        config = TritonModelConfig(platform="tensorrt_plan", cc_model_filenames=cc,
                                   default_model_filename=default, **common)
        return ModelPlan(config, files, note="TensorRT")
    files = {file: bundle / file for file in entry.files}
    config = TritonModelConfig(platform="onnxruntime_onnx", default_model_filename=entry.file, **common)
    return ModelPlan(config, files, note="ONNX Runtime")


def usable_engines(bundle: Path, manifest: Manifest, entry: ComponentEntry
                   ) -> tuple[list[tuple[EngineRecord, Path]], list[str]]:
    """The newest `tensorrt` engine per GPU target built from this ONNX graph with an intact
    plan file (its record's targets narrowed to those it serves), and why the others were left
    out (Triton's TensorRT backend cannot run TensorRT-RTX engines)."""
    engines: list[tuple[EngineRecord, Path]] = []
    served: set[str] = set()                       # GPU targets that already have a plan
    skipped: list[str] = []
    for record in engines_for(manifest.engines, entry.name):   # newest first: it wins its targets
        targets = tuple(t for t in record.targets if t not in served)
        if record.builder != Backend.TENSORRT.value:
            skipped.append(f"engine {record.key} is a {record.builder} engine, which Triton's "
                           f"TensorRT backend cannot load")
        elif record.onnx_sha256 != entry.digest:
            skipped.append(f"engine {record.key} was built from another ONNX graph (stale)")
        elif targets:                              # else newer engines serve all its targets
            plan = engine_plan_path(bundle, record)
            try:
                check_plan(record, plan, bundle)
            except CorruptEngineError as exc:
                skipped.append(str(exc))
                continue
            served.update(targets)
            engines.append((replace(record, targets=targets), plan))
    return engines, skipped


def engine_shapes(spec: ComponentSpec, record: EngineRecord) -> tuple[dict[str, int], int]:
    """(symbols the engine's profiles pin to one value, the largest batch they accept)."""
    spans: dict[str, tuple[int, int]] = {}
    for profile in record.profiles:
        for tensor in spec.inputs:
            if tensor.name not in profile:
                continue
            low, _, high = profile[tensor.name]
            for axis, dim in enumerate(tensor.shape):
                factor, symbol = parse_dim(dim)
                if symbol is not None:
                    lo, hi = low[axis] // factor, high[axis] // factor
                    old = spans.get(symbol, (lo, hi))
                    spans[symbol] = (min(old[0], lo), max(old[1], hi))
    pinned = {symbol: lo for symbol, (lo, hi) in spans.items() if lo == hi}
    return pinned, spans.get(BATCH, (0, spec.ranges.get(BATCH, (0, 0, 0))[2]))[1]


def _one_signature(entry: ComponentEntry, engines, notes: list[str]):
    """One Triton model has one shape signature: keep the engines that pin the same symbols to
    the same values as the newest; the batch is what all of them accept."""
    pinned, _ = engine_shapes(entry.spec, engines[0][0])
    kept = []
    for record, plan in engines:
        pins, _ = engine_shapes(entry.spec, record)
        if pins == pinned:
            kept.append((record, plan))
        else:
            notes.append(f"{entry.name}: engine {record.key} left out: its profiles fix "
                         f"{pins or 'no shape'}, the newest engine {engines[0][0].key} fixes "
                         f"{pinned or 'no shape'}, and one Triton model has one shape signature")
    return kept, pinned, min(engine_shapes(entry.spec, record)[1] for record, _ in kept)


# --- files -----------------------------------------------------------------------------------------

def _bundle_files(bundle: Path) -> list[str]:
    """Every regular file of the bundle (relative paths), leaving out hidden temporary files and the
    ONNX Runtime cache (optimized for the CPU that wrote it; the server's machine writes its own)."""
    files = []
    for path in sorted(bundle.rglob("*")):
        relative = path.relative_to(bundle)
        if any(part.startswith(".") for part in relative.parts) or relative.parts[0] == BUNDLE_CACHE_DIR:
            continue
        if path.is_file():
            files.append(relative.as_posix())
    if MANIFEST_NAME not in files:
        raise BundleError(f"bundle {bundle}: no {MANIFEST_NAME}")
    return files


def _write(root: Path, bundle: Path, models: list[ModelPlan], mode: FileMode, group: str) -> list[str]:
    notes: list[str] = []
    pipeline = models[0]
    pipeline_dir = root / pipeline.config.name / VERSION
    pipeline_dir.mkdir(parents=True)
    if mode == FileMode.SYMLINK:
        # One link to the bundle folder, not one per file: the manifest loader refuses files
        # whose links lead outside their bundle. The adapters are copied (see the docstring).
        (pipeline_dir / BUNDLE_DIR).symlink_to(bundle.resolve(), target_is_directory=True)
    for relative, source in pipeline.files.items():
        if mode != FileMode.SYMLINK:
            _place(source, pipeline_dir / relative, mode, notes)
        elif not _in_bundle(relative):
            _place(source, pipeline_dir / relative, FileMode.COPY, notes)
    shutil.copyfile(MODEL_TEMPLATE, pipeline_dir / "model.py")
    shutil.copyfile(PROBE, root / pipeline.config.name / PROBE.name)
    vendor_runtime(pipeline_dir)
    (root / pipeline.config.name / "config.pbtxt").write_text(pipeline.config.to_pbtxt())
    for model in models[1:]:
        version_dir = root / model.config.name / VERSION
        version_dir.mkdir(parents=True, exist_ok=True)
        for file, source in model.files.items():
            target = version_dir / file
            copy = _in_bundle_copy(source, pipeline.files, pipeline_dir)
            if mode == FileMode.SYMLINK:
                # Inside the repository: relative links, so a mounted repository still resolves.
                target.symlink_to(os.path.relpath(copy, target.parent))
            else:
                _place(copy, target, FileMode.HARDLINK, notes)
        (root / model.config.name / "config.pbtxt").write_text(model.config.to_pbtxt())
    digests: dict[tuple[int, int], str] = {}
    for model in models:   # last: each marker lists exactly what its folder holds
        record_model(root / model.config.name, group, digests)
    return sorted(set(notes))


def _in_bundle(relative: str) -> bool:
    """Whether a file of the pipeline model (a path in its version folder) is in its bundle copy."""
    return relative.startswith(f"{BUNDLE_DIR}/")


def _in_bundle_copy(source: Path, pipeline_files: Mapping[str, Path], pipeline_dir: Path) -> Path:
    for relative, original in pipeline_files.items():
        if original == source and _in_bundle(relative):
            return pipeline_dir / relative
    raise BundleError(f"{source} is not a file of the bundle")  # cannot happen: plans and graphs are


def _place(source: Path, target: Path, mode: FileMode, notes: list[str]) -> None:
    """Hard link (a copy where links fail) or copy `source` to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode == FileMode.HARDLINK:
        try:
            os.link(source, target)
            return
        except OSError as exc:
            notes.append(f"hard links failed ({exc.strerror}); files were copied instead")
    shutil.copy2(source, target)
