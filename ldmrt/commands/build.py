"""`ldmrt build`: compile a bundle's ONNX graphs into TensorRT / TensorRT-RTX engines, or store
ONNX Runtime's optimized CPU graphs for this machine (`--backend onnxruntime`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ldmrt.commands.terminal import comma_list, console, out, size_text, user_errors

if TYPE_CHECKING:   # the heavy modules load inside the command
    from ldmrt.engine_record import EngineRecord
    from ldmrt.export.engines import BundleBuildOptions


def build(
    bundle: Path = typer.Argument(..., help="A bundle folder written by `ldmrt export`."),
    backend: str = typer.Option(..., "--backend", "-b", help="tensorrt | tensorrt-rtx | onnxruntime "
                                                             "(caches the optimized CPU graphs); any case"),
    components: Optional[str] = typer.Option(None, help="Comma list, e.g. unet,vae_decoder (default: all)."),
    static_size: Optional[str] = typer.Option(None, "--static-size",
                                              help="One fixed image size H or HxW in pixels."),
    static_batch: Optional[int] = typer.Option(None, "--static-batch",
                                               help="One fixed batch (images per call; doubled for CFG)."),
    profile: Optional[list[str]] = typer.Option(
        None, "--profile", help="Extra profile MIN,OPT,MAX[,MAX_BATCH] in pixels (repeatable); "
                                "default: one profile over the bundle's ranges."),
    opt_level: int = typer.Option(3, "--opt-level", help="Builder optimization level 0..5."),
    compute_capability: Optional[list[str]] = typer.Option(
        None, "--compute-capability", help="TensorRT-RTX targets, e.g. 8.6,8.9 or sm120 "
                                           "(default: Ampere, Ada and Blackwell RTX)."),
    refit: bool = typer.Option(False, "--refit", help="Build refittable engines."),
    weight_streaming: bool = typer.Option(False, "--weight-streaming",
                                          help="Build engines that can stream weights from host memory."),
    no_timing_cache: bool = typer.Option(False, "--no-timing-cache",
                                         help="Do not use engines/timing.cache (tensorrt only)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even engines that verify."),
) -> None:
    """Build an engine per component; reuses engines whose key and plan sha256 still match."""
    with user_errors():
        from ldmrt.engines.backend import BUILD_BACKENDS, Backend

        chosen = Backend.parse(backend, choices=BUILD_BACKENDS)
        if chosen == Backend.ONNXRUNTIME:
            trt_only = {"--static-size": static_size is not None,
                        "--static-batch": static_batch is not None, "--profile": profile,
                        "--compute-capability": compute_capability, "--refit": refit,
                        "--weight-streaming": weight_streaming, "--no-timing-cache": no_timing_cache,
                        "--opt-level": opt_level != 3}
            given = [flag for flag, value in trt_only.items() if value]
            if given:
                from ldmrt.errors import ConfigError
                raise ConfigError(f"{', '.join(given)}: TensorRT options; --backend onnxruntime only "
                                  f"caches ONNX Runtime's optimized graphs (options: --components, --force)")
            prepare_ort_cache(bundle, comma_list(components), force)
            return
        from ldmrt.export.engines import BundleBuildOptions

        options = BundleBuildOptions(
            backend=chosen.value, components=comma_list(components), profiles=_profiles(profile or []),
            static_size=_static_size(static_size), static_batch=static_batch,
            optimization_level=opt_level,
            compute_capabilities=_compute_capabilities(compute_capability or []),
            refit=refit, weight_streaming=weight_streaming, timing_cache=not no_timing_cache,
            force=force)
        build_with_progress(bundle, options)


def check_engine_backend(engine: str) -> str:
    """For `ldmrt export --engine`: the engine backend's name, known and installed, checked before
    the export (which takes minutes) rather than after it."""
    from ldmrt.engines import trt_api
    from ldmrt.engines.backend import ENGINE_BACKENDS, Backend

    name = Backend.parse(engine, field="engine", choices=ENGINE_BACKENDS).value
    trt_api.load(name)          # BackendUnavailableError with the pip line
    return name


def build_after_export(bundle_path: Path, backend: str,
                       options: "BundleBuildOptions | None" = None) -> "list[EngineRecord]":
    """For `ldmrt export --engine BACKEND`: build every engine of the fresh bundle, with the
    same progress and table as `ldmrt build`. Raises LdmrtError (call inside `user_errors`);
    the message says the bundle itself was exported and how to retry the build."""
    from dataclasses import replace

    from ldmrt.errors import LdmrtError
    from ldmrt.export.engines import BundleBuildOptions

    options = replace(options or BundleBuildOptions(backend=backend), backend=backend)
    try:
        return build_with_progress(bundle_path, options)
    except LdmrtError as exc:
        raise type(exc)(f"the bundle {bundle_path} was exported, but building its {backend} "
                        f"engines failed: {exc} (retry with: ldmrt build {bundle_path} --backend "
                        f"{backend})") from exc


def build_with_progress(bundle: Path, options: "BundleBuildOptions") -> "list[EngineRecord]":
    """Run build_bundle with a status line per component, then print the summary table."""
    from rich.table import Table

    from ldmrt.export.engines import BuildEvent, build_bundle

    start = time.perf_counter()
    reused: set[str] = set()
    with console.status(f"building {options.backend} engines") as status:
        def progress(event: BuildEvent) -> None:
            elapsed = f"{time.perf_counter() - start:.0f} s"
            if event.stage == "reused" and event.record is not None:
                reused.add(event.record.key)
                console.print(f"{event.component}: reusing {event.detail}", highlight=False)
            elif event.stage == "built" and event.record is not None:
                console.print(f"{event.component}: built in {event.record.build_seconds:.1f} s",
                              highlight=False)
            status.update(f"[bold]{event.component or 'bundle'}[/]: {event.stage} ({elapsed})")
        records = build_bundle(bundle, options, progress)
    table = Table(title=f"{options.backend} engines in {bundle}/engines "
                        f"({time.perf_counter() - start:.1f} s)")
    for column in ("component", "key", "size", "build seconds", "reused"):
        table.add_column(column, overflow="fold")
    for record in records:
        table.add_row(record.component, record.key, size_text(record.size),
                      f"{record.build_seconds:.1f}", "yes" if record.key in reused else "no")
    out.print(table)
    return records


def prepare_ort_cache(bundle: Path, components: Optional[tuple[str, ...]], force: bool) -> None:
    """Optimize every graph with ONNX Runtime for this CPU and store the result (ort_cache.py),
    so the first `Pipeline.load` on this machine skips graph optimization."""
    from rich.table import Table

    from ldmrt.engines.onnxruntime import prepare_cache
    from ldmrt.export.engines import select_components
    from ldmrt.manifest import load_manifest

    manifest = load_manifest(bundle)
    names = tuple(select_components(manifest, components))
    start = time.perf_counter()
    with console.status("onnxruntime: optimizing graphs") as status:
        def progress(component: str, stage: str) -> None:
            status.update(f"[bold]{component}[/]: {stage} ({time.perf_counter() - start:.0f} s)")
        results = prepare_cache(bundle, manifest, names, force=force, progress=progress)
    table = Table(title=f"onnxruntime optimized graphs for this CPU ({time.perf_counter() - start:.1f} s)")
    for column in ("component", "cache entry", "size", "seconds", "reused"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(r.component, str(r.folder), size_text(r.size_bytes), f"{r.seconds:.1f}", "yes" if r.reused else "no")
    out.print(table)


def _static_size(value: Optional[str]) -> Optional[tuple[int, int]]:
    """'512' -> (512, 512); '512x768' -> (512, 768) (height x width)."""
    if value is None:
        return None
    from ldmrt.errors import ConfigError

    parts = value.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"--static-size {value!r}: expected H or HxW in pixels, e.g. 512 or 512x768")
    height = int(parts[0])
    return height, int(parts[-1])


def _profiles(values: list[str]):
    """'256,512,768[,4]' -> SizeProfile(min, opt, max, max_batch) per --profile."""
    from ldmrt.errors import ConfigError
    from ldmrt.export.engines import SizeProfile

    profiles = []
    for value in values:
        parts = [p.strip() for p in value.split(",")]
        if len(parts) not in (3, 4) or not all(p.isdigit() for p in parts):
            raise ConfigError(f"--profile {value!r}: expected MIN,OPT,MAX[,MAX_BATCH] in pixels "
                              f"(and images), e.g. 256,512,768 or 512,512,512,2")
        profiles.append(SizeProfile(*(int(p) for p in parts)))
    return tuple(profiles)


def _compute_capabilities(values: list[str]) -> tuple[str, ...]:
    """'8.6,8.9' or 'sm86' (repeatable) -> ('sm86', 'sm89')."""
    from ldmrt.errors import ConfigError

    targets = []
    for item in (v.strip().lower() for value in values for v in value.split(",")):
        if not item:
            continue
        digits = item[2:] if item.startswith("sm") else item.replace(".", "")
        if not digits.isdigit() or ("." in item and len(item.split(".")) != 2):
            raise ConfigError(f"--compute-capability {item!r}: expected a compute capability "
                              f"such as 8.6, 8.9, 12.0 or sm86")
        targets.append(f"sm{digits}")
    return tuple(targets)
