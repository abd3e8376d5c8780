"""The `ldmrt` command line. The CLI owns the terminal: rich tables, progress, one-line errors."""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ldmrt.errors import LdmrtError

app = typer.Typer(help="Latent Diffusion Models: PyTorch -> ONNX -> TensorRT, a lean runtime, benchmarks.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)
console = Console(stderr=True)
out = Console()
_state = {"debug": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
         verbose: bool = typer.Option(False, "--verbose", "-v", help="Show info logs.")) -> None:
    _state["debug"] = debug
    # `kill`, `timeout` and `docker stop` send SIGTERM: unwind like Ctrl-C so nothing half-written stays.
    signal.signal(signal.SIGTERM, _interrupt)
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not debug else logging.INFO)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


# Library fields whose flag is not `--` + the field with dashes.
_FLAGS = {"class_labels": "--class-label", "out": "--out", "size": "--sizes", "profiles": "--profile",
          "optimization_level": "--opt-level", "compute_capabilities": "--compute-capability",
          "gpus": "--gpu", "preferred_batch_sizes": "--preferred-batch-size"}


def flag_for(field: str) -> str:
    """The command-line flag of a library field (`init_image` -> `--init-image`)."""
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def _message(exc: LdmrtError) -> str:
    """The error's message, its leading field name (see LdmrtError.field) swapped for the flag."""
    message = str(exc)
    field = exc.field
    if field and message.startswith(field) and message[len(field):len(field) + 1] in (" ", ":", ""):
        return flag_for(field) + message[len(field):]
    return message


@contextlib.contextmanager
def user_errors():
    """LdmrtError -> one red line and exit 2 (traceback only with --debug)."""
    try:
        yield
    except LdmrtError as exc:
        if _state["debug"]:
            raise
        # escaped: a path or prompt in the message may look like rich markup ("[red]")
        console.print(f"[bold red]error:[/] {type(exc).__name__}: {escape(_message(exc))}", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]; nothing half-written was left behind")
        raise typer.Exit(130) from None


def _csv(value: Optional[str]) -> Optional[tuple[str, ...]]:
    return None if not value else tuple(v.strip() for v in value.split(",") if v.strip())


@app.command()
def export(
    source: str = typer.Argument("tiny", help="A preset name (random weights) or a checkpoint path."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Bundle folder to create."),
    precision: str = typer.Option("fp32", help="fp32 | fp16 | bf16 (graph precision) | int8 (CPU: int8 UNet)."),
    components: Optional[str] = typer.Option(None, help="Comma list, e.g. unet,vae_decoder (default: all)."),
    min_size: Optional[int] = typer.Option(None, help="Smallest image side in pixels."),
    opt_size: Optional[int] = typer.Option(None, help="Image side the engines are tuned for."),
    max_size: Optional[int] = typer.Option(None, help="Largest image side in pixels."),
    max_batch: int = typer.Option(4, help="Most images per call (UNet batch is doubled for guidance)."),
    opset: int = typer.Option(18, help="ONNX opset (>= 18)."),
    fp32_vae_decoder: bool = typer.Option(False, "--fp32-vae-decoder", help="Keep the VAE decoder in fp32."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the ONNX Runtime parity check."),
    seed: int = typer.Option(0, help="Seed of a preset's random weights."),
    preset_name: Optional[str] = typer.Option(None, "--preset", help="Checkpoint: the preset it follows."),
    yaml_path: Optional[Path] = typer.Option(None, "--yaml", help="Checkpoint: its original inference YAML."),
    tokenizer_dir: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder for a single file."),
    no_strict: bool = typer.Option(False, "--no-strict", help="Load despite missing/unexpected weights (warned)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="Then build engines: tensorrt | tensorrt-rtx."),
) -> None:
    """Export a model to an ONNX bundle with dynamic shapes, validated against PyTorch."""
    with user_errors():
        from ldmrt.config import PRESETS
        from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
        from ldmrt.iospec import Precision, ShapeRanges

        precision_value = _enum(Precision, precision, "--precision")
        from ldmrt.commands.build import check_engine_backend
        engine = None if engine is None else check_engine_backend(engine)   # before minutes of export
        if source in PRESETS:
            model_source = preset_source(source, seed)
            console.print(f"[bold yellow]preset {source!r}: RANDOM weights (seed {seed}) — "
                          f"outputs are noise; pass a checkpoint path for a real model[/]")
        else:
            from ldmrt.checkpoints import checkpoint_source
            model_source = checkpoint_source(Path(source), preset=preset_name, yaml=yaml_path,
                                             strict=not no_strict, tokenizer=tokenizer_dir)
            if model_source.random_weights:
                console.print("[bold yellow]--no-strict left some weights RANDOM[/]")
        config = model_source.model.config
        default = ShapeRanges.for_model(config)
        ranges = ShapeRanges(min_size=min_size or default.min_size, opt_size=opt_size or default.opt_size,
                             max_size=max_size or default.max_size, max_batch=max_batch)
        options = ExportOptions(precision=precision_value, components=_csv(components), shape_ranges=ranges,
                                opset=opset, validate=not no_validate, force=force,
                                fp32_vae_decoder=fp32_vae_decoder)
        start = time.perf_counter()
        with console.status("exporting") as status:
            def progress(component: str, stage: str) -> None:
                status.update(f"[bold]{component}[/]: {stage} ({time.perf_counter() - start:.0f} s)")
            result = export_bundle(model_source, out_dir, options, progress)
        table = Table(title=f"bundle {result.path} ({time.perf_counter() - start:.1f} s)")
        for column in ("component", "weights", "size", "rel L2", "tolerance", "vs", "seconds"):
            table.add_column(column)
        int8 = result.manifest.precision == Precision.INT8
        for name, entry in result.manifest.components.items():
            parity = entry.parity
            quantized = int8 and name == "unet"
            table.add_row(name, "int8" if quantized else entry.dtype, _size(entry.size_bytes),
                          "not run" if parity is None else f"{parity.rel_l2:.2e}",
                          "" if parity is None else f"{parity.tolerance:g}",
                          "" if parity is None else ("fp32 onnx" if quantized else "torch"),
                          f"{result.seconds.get(name, 0):.1f}")
        out.print(table)
        if int8 and "unet" in result.manifest.components:
            parity = result.manifest.component("unet").parity
            if parity is not None:
                out.print(f"unet int8 (static QDQ) parity, rel L2 per call vs the {parity.reference}",
                          highlight=False)
        if engine is not None:
            from ldmrt.commands.build import build_after_export
            build_after_export(result.path, engine)


@app.command()
def inspect(path: Path = typer.Argument(..., help="A bundle folder or a checkpoint."),
            preset_name: Optional[str] = typer.Option(None, "--preset", help="Checkpoint: the preset it follows."),
            yaml_path: Optional[Path] = typer.Option(None, "--yaml", help="Checkpoint: its inference YAML.")) -> None:
    """Print what a bundle or checkpoint holds."""
    with user_errors():
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
            table = Table()
            for column in ("component", "file", "size", "inputs", "outputs", "parity"):
                table.add_column(column)
            for name, entry in manifest.components.items():
                io = lambda ts: ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in ts)  # noqa: E731
                table.add_row(name, entry.file + (" +data" if entry.external_data else ""),
                              _size(entry.size_bytes), io(entry.spec.inputs), io(entry.spec.outputs),
                              "-" if entry.parity is None else f"{entry.parity.rel_l2:.1e}")
            out.print(table)
            for record in manifest.engines:
                out.print(f"engine: {dict(record)}")
            return
        from ldmrt.checkpoints import describe_checkpoint
        out.print(describe_checkpoint(path, preset=preset_name, yaml=yaml_path), highlight=False)


def _enum(kind, value: str, option: str):
    try:
        return kind(value)
    except ValueError:
        from ldmrt.errors import ConfigError
        raise ConfigError(f"{option} {value!r}: expected one of {[k.value for k in kind]}") from None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _register_commands() -> None:
    """Commands that live in ldmrt/commands/ (each module defines one function named like its file)."""
    import importlib
    import pkgutil

    import ldmrt.commands as package
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"ldmrt.commands.{info.name}")
        command = getattr(module, info.name, None)
        if callable(command):
            app.command(info.name)(command)


_register_commands()


def run() -> None:  # pragma: no cover - console entry for `python -m ldmrt`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
