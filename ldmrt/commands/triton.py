"""`ldmrt triton`: a Triton Inference Server model repository from a bundle."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import List, Optional

import typer

from ldmrt.commands.terminal import choice, console, out as stdout, user_errors


def triton(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `ldmrt export` (and `ldmrt build`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model repository folder to create."),
    prefix: str = typer.Option("", help="Model name prefix, e.g. 'sd15_' -> sd15_unet, sd15_pipeline."),
    platform: str = typer.Option("auto", help="Component models: auto (tensorrt_plan where a TensorRT "
                                              "engine exists), onnxruntime or tensorrt."),
    instances: int = typer.Option(1, help="Instances of each component model."),
    kind: str = typer.Option("auto", help="Component instances: auto | cpu | gpu."),
    gpus: Optional[List[int]] = typer.Option(None, "--gpu", help="GPU index for kind gpu (repeatable)."),
    dynamic_batching: bool = typer.Option(True, "--dynamic-batching/--no-dynamic-batching",
                                          help="Triton's dynamic batcher on batched component models."),
    max_queue_delay_us: int = typer.Option(100, help="Dynamic batching: longest wait for a fuller batch, "
                                                     "0 to 1000000 microseconds."),
    preferred_batch_size: Optional[List[int]] = typer.Option(None, help="Dynamic batching (repeatable)."),
    pipeline_instances: int = typer.Option(1, help="Instances (stub processes) of the pipeline model."),
    pipeline_kind: str = typer.Option("auto", help="Pipeline instances: auto | cpu | gpu."),
    pipeline_backend: str = typer.Option("onnxruntime", help="What the pipeline model runs on: "
                                                             "onnxruntime | tensorrt | tensorrt-rtx."),
    pipeline_device: str = typer.Option("auto", help="onnxruntime device: auto (cuda on GPU instances) | cpu | cuda."),
    threads: int = typer.Option(0, help="onnxruntime intra-op threads per pipeline instance (0: default)."),
    max_cost: float = typer.Option(0.0, help="Pipeline: refuse (HTTP 400) requests over steps x images x "
                                             "megapixels, e.g. 60 (0: no limit)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Pipeline instances check the bundle's "
                                                                   "sha256 when they load."),
    lora: Optional[List[str]] = typer.Option(
        None, "--lora", help="NAME=FILE[:SCALE] LoRA adapter the pipeline model may load (repeatable): "
                             "a request's `lora` input selects it by NAME (NAME:SCALE for another scale "
                             "than SCALE, default 1). The file is put into the repository."),
    files: str = typer.Option("hardlink", help="How bundle files enter the repository: hardlink (copy "
                                               "across file systems) | copy | symlink."),
    force: bool = typer.Option(False, "--force", help="Replace the models ldmrt wrote in --out before "
                                                      "(never other models or files)."),
) -> None:
    """Write a Triton model repository: one model per component and a Python-backend pipeline."""
    with user_errors():
        from rich.table import Table

        from ldmrt.triton.config import DynamicBatching, InstanceGroup, InstanceKind
        from ldmrt.triton.repository import (ComponentPlatform, FileMode, PipelineModelOptions,
                                             RepositoryOptions, write_repository)

        from ldmrt.triton.adapters import NamedAdapter, adapter_tuple, check_adapter_files

        # Read and checked before the bundle is (field "lora": the message names --lora).
        adapters = adapter_tuple(tuple(NamedAdapter.parse(text, "lora") for text in lora or ()), "lora")
        check_adapter_files(adapters, "lora")
        component_kind = choice(InstanceKind, kind, "--kind")
        options = RepositoryOptions(
            prefix=prefix, platform=choice(ComponentPlatform, platform, "--platform"),
            instances=InstanceGroup(instances, component_kind, tuple(gpus or ())),
            batching=DynamicBatching(dynamic_batching, max_queue_delay_us, tuple(preferred_batch_size or ())),
            pipeline=PipelineModelOptions(
                backend=pipeline_backend, device=pipeline_device, threads=threads, verify=verify,
                max_cost=max_cost, loras=adapters,
                instances=InstanceGroup(pipeline_instances, choice(InstanceKind, pipeline_kind, "--pipeline-kind"))),
            files=choice(FileMode, files, "--files"), force=force)
        with console.status(f"checking {bundle} and writing {out}"):
            result = write_repository(bundle, out, options)
        table = Table(title=f"Triton model repository {result.path}")
        for column in ("model", "platform / backend", "max batch", "instances", "dynamic batching", "files"):
            table.add_column(column, overflow="fold")
        for model in result.models:
            config = model.config
            group = config.instance_group
            batching = config.dynamic_batching
            table.add_row(config.name, config.platform or config.backend, str(config.max_batch_size),
                          f"{group.count} x {group.kind.value}",
                          f"{batching.max_queue_delay_us} us" if batching else "-",
                          model.note if config.backend else ", ".join(model.files))
        stdout.print(table)
        for note in result.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        if result.replaced or result.removed:
            console.print(f"replaced ldmrt's models {result.replaced}"
                          + (f", removed ldmrt's models {result.removed} (no longer in the bundle)"
                             if result.removed else "") + "; nothing else in the repository was touched",
                          highlight=False)
        repository = shlex.quote(f"--model-repository={result.path.resolve()}")
        console.print(f"serve: tritonserver {repository} (see docs/triton.md)", highlight=False, soft_wrap=True)
