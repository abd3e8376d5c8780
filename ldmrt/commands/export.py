"""`ldmrt export`: a preset or a checkpoint -> an ONNX bundle with dynamic shapes, validated against
PyTorch (and, with --engine, its TensorRT engines)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ldmrt.commands.terminal import choice, comma_list, console, out, size_text, user_errors
from ldmrt.errors import ConfigError
from ldmrt.iospec import Component


def export(
    source: str = typer.Argument("digits", help="A built-in trained model (digits, digits-vq, digits-sr, "
                                              "digits-inpaint, digits-layout), a preset name (random weights) or a "
                                              "checkpoint path."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Bundle folder to create."),
    precision: str = typer.Option("fp32", help="fp32 | fp16 | bf16 (graph precision) | int8 (CPU: int8 UNet)."),
    components: Optional[str] = typer.Option(None, help="Comma list, e.g. unet,vae_decoder (default: all)."),
    min_size: Optional[int] = typer.Option(None, help="Smallest image side in pixels."),
    opt_size: Optional[int] = typer.Option(None, help="Image side the engines are tuned for."),
    max_size: Optional[int] = typer.Option(None, help="Largest image side in pixels."),
    max_batch: int = typer.Option(4, help="Most images per call (UNet batch is doubled for guidance)."),
    vae_max_size: Optional[int] = typer.Option(None, help="Largest side the VAE graphs take (default --max-size); "
                                                          "larger images are decoded in tiles (upscalers)."),
    opset: int = typer.Option(18, help="ONNX opset (>= 18)."),
    fp32_vae_decoder: Optional[bool] = typer.Option(
        None, "--fp32-vae-decoder/--no-fp32-vae-decoder",
        help="Keep the VAE decoder in fp32 (default: only where the model's VAE overflows in fp16: "
             "SDXL's force_upcast VAE, both VAE graphs, with --precision fp16)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the ONNX Runtime parity check."),
    seed: int = typer.Option(0, help="Seed of a preset's random weights."),
    preset_name: Optional[str] = typer.Option(None, "--preset", help="Checkpoint: the preset it follows."),
    yaml_path: Optional[Path] = typer.Option(None, "--yaml", help="Checkpoint: its original inference YAML."),
    tokenizer_dir: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder for a single file."),
    no_strict: bool = typer.Option(False, "--no-strict", help="Load despite missing/unexpected weights (warned)."),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Checkpoint with EMA and non-EMA UNet weights: "
                                       "which to export (default: non-EMA, as diffusers)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="Then build engines: tensorrt | tensorrt-rtx."),
    int8_calibration_size: str = typer.Option(
        "opt", help="int8: calibrate at the optimal size (most accurate there) or min (less memory and time)."),
    lora: Optional[list[str]] = typer.Option(
        None, "--lora", help="FILE[:SCALE] LoRA safetensors (diffusers/PEFT or kohya) fused into the weights; "
                             "repeat for several."),
) -> None:
    """Export a model to an ONNX bundle with dynamic shapes, validated against PyTorch."""
    with user_errors():
        from rich.table import Table

        from ldmrt.checkpoints.builtin import BUILTIN_NAMES, builtin_source
        from ldmrt.commands.build import build_after_export, check_engine_backend
        from ldmrt.presets import PRESETS
        from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
        from ldmrt.export.quantize import CalibrationSize, Int8Options
        from ldmrt.iospec import Precision, ShapeRanges

        precision_value = choice(Precision, precision, "--precision")
        calibration_size = choice(CalibrationSize, int8_calibration_size, "--int8-calibration-size")
        engine = None if engine is None else check_engine_backend(engine)   # before minutes of export
        from ldmrt.lora.choice import LoraChoice
        from ldmrt.lora.reading import read_lora

        loras = tuple(LoraChoice.parse(text) for text in lora or ())
        for choice_ in loras:
            read_lora(choice_.path)          # a bad file fails before the model loads
        builtin = source in BUILTIN_NAMES and not Path(source).exists()
        if ema is not None and (builtin or source in PRESETS):
            flag = "--ema" if ema else "--no-ema"
            raise ConfigError(f"{flag}: chooses between a checkpoint file's EMA and non-EMA UNet weights; "
                              f"{source!r} is a built-in name, not a file", field=flag)
        if builtin:
            model_source = builtin_source(source)          # a trained model shipped with ldmrt
            console.print(f"built-in model {source!r}: trained here on scikit-learn's digits "
                          f"({model_source.source})")
        elif source in PRESETS:
            model_source = preset_source(source, seed)
            console.print(f"[bold yellow]preset {source!r}: RANDOM weights (seed {seed}) — "
                          f"outputs are noise; pass a checkpoint path for a real model[/]")
        else:
            from ldmrt.checkpoints import checkpoint_source
            model_source = checkpoint_source(Path(source), preset=preset_name, yaml=yaml_path,
                                             strict=not no_strict, tokenizer=tokenizer_dir, ema=ema)
            if model_source.random_weights:
                console.print("[bold yellow]--no-strict left some weights RANDOM[/]")
        config = model_source.model.config
        default = ShapeRanges.for_model(config)
        ranges = ShapeRanges(min_size=min_size or default.min_size, opt_size=opt_size or default.opt_size,
                             max_size=max_size or default.max_size, max_batch=max_batch,
                             vae_max_size=vae_max_size or 0)
        options = ExportOptions(precision=precision_value, components=comma_list(components) or None,
                                shape_ranges=ranges, opset=opset, validate=not no_validate, force=force,
                                fp32_vae_decoder=fp32_vae_decoder, loras=loras,
                                int8=Int8Options(calibration_size=calibration_size))
        start = time.perf_counter()
        with console.status("exporting") as status:
            def progress(component: str, stage: str) -> None:
                status.update(f"[bold]{component}[/]: {stage} ({time.perf_counter() - start:.0f} s)")
            result = export_bundle(model_source, out_dir, options, progress)
        table = Table(title=f"bundle {result.path} ({time.perf_counter() - start:.1f} s)",
                      caption=None if model_source.unet_weights is None else
                      f"UNet weights: {model_source.unet_weights}")
        for column in ("component", "weights", "size", "rel L2", "tolerance", "vs", "seconds"):
            table.add_column(column)
        int8 = result.manifest.precision == Precision.INT8
        for name, entry in result.manifest.components.items():
            parity = entry.parity
            quantized = int8 and name == Component.UNET
            table.add_row(name, "int8" if quantized else entry.dtype, size_text(entry.size_bytes),
                          "not run" if parity is None else f"{parity.rel_l2:.2e}",
                          "" if parity is None else f"{parity.tolerance:g}",
                          "" if parity is None else ("fp32 onnx" if quantized else
                                                     "numpy" if name == Component.DENOISE_STEP else "torch"),
                          f"{result.seconds.get(name, 0):.1f}")
        out.print(table)
        for note in result.notes:
            out.print(note, highlight=False)
        record = result.manifest.model_source
        for path, digest, scale in (record.loras if record is not None else ()):
            out.print(f"LoRA fused: {path} x {scale:g} (sha256 {digest[:12]}...)", highlight=False)
        if int8 and Component.UNET in result.manifest.components:
            parity = result.manifest.component(Component.UNET).parity
            if parity is not None:
                out.print(f"unet int8 (static QDQ) parity, rel L2 per call vs the {parity.reference}",
                          highlight=False)
        if engine is not None:
            build_after_export(result.path, engine)
