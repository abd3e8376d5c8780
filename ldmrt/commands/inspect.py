"""`ldmrt inspect`: what a bundle or a checkpoint holds."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ldmrt.commands.terminal import out, size_text, user_errors


def inspect(path: Path = typer.Argument(..., help="A bundle folder or a checkpoint."),
            preset_name: Optional[str] = typer.Option(None, "--preset", help="Checkpoint: the preset it follows."),
            yaml_path: Optional[Path] = typer.Option(None, "--yaml", help="Checkpoint: its inference YAML.")) -> None:
    """Print what a bundle or checkpoint holds."""
    with user_errors():
        from rich.table import Table

        from ldmrt.manifest import MANIFEST_NAME, load_manifest

        if (path / MANIFEST_NAME).is_file():
            manifest = load_manifest(path)
            out.print(f"bundle [bold]{path}[/]: {manifest.name} ({manifest.family.value}), "
                      f"precision {manifest.precision.value}, source {manifest.source}"
                      + (" [yellow](random weights)[/]" if manifest.random_weights else ""))
            sched = manifest.config.scheduler
            out.print(f"scheduler: {sched.beta_schedule.value} {sched.beta_start}..{sched.beta_end}, "
                      f"{sched.prediction_type.value}, {sched.num_train_timesteps} steps; "
                      f"latent scale {manifest.latent_scale}")
            layout = manifest.config.layout
            if layout is not None:
                out.print(f"layout tokens: {layout.max_objects} boxes on a {layout.grid}x{layout.grid} grid, "
                          f"{layout.n_classes} classes, {layout.max_length} tokens (ldmrt.layout)", highlight=False)
            if manifest.config.spatial is not None:
                out.print(f"spatial conditioning: {manifest.config.spatial.describe()}", highlight=False)
            table = Table()
            for column in ("component", "file", "size", "inputs", "outputs", "parity"):
                table.add_column(column)
            for name, entry in manifest.components.items():
                table.add_row(name, entry.file + (" +data" if entry.external_data else ""),
                              size_text(entry.size_bytes), _tensors(entry.spec.inputs),
                              _tensors(entry.spec.outputs),
                              "-" if entry.parity is None else f"{entry.parity.rel_l2:.1e}")
            out.print(table)
            for record in manifest.engines:
                out.print(f"engine: {record.to_dict()}")
            return
        from ldmrt.checkpoints import describe_checkpoint
        out.print(describe_checkpoint(path, preset=preset_name, yaml=yaml_path), highlight=False)


def _tensors(tensors) -> str:
    """'sample float32[B, 4, h, w], timestep float32[B]'."""
    return ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in tensors)
