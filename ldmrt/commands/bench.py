"""`ldmrt bench`: latency, throughput and memory, side by side with PyTorch eager and diffusers."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def bench(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `ldmrt export`."),
    backend: str = typer.Option("onnxruntime", help="Comma list of ldmrt backends to measure."),
    compare: str = typer.Option("torch-eager,diffusers", help="Comma list of baselines ('' for none)."),
    sizes: str = typer.Option("", help="Image sides in pixels, e.g. 256,512 (default: the bundle's optimum)."),
    batch: str = typer.Option("1", help="Images per call, e.g. 1,2."),
    steps: int = typer.Option(20, help="Denoising steps per image."),
    sampler: str = typer.Option("ddim", help="Sampler."),
    guidance: float = typer.Option(7.5, help="Guidance scale (UNet batch doubles when != 1)."),
    warmup: int = typer.Option(1, help="Untimed runs first."),
    repeat: int = typer.Option(3, help="Timed runs; medians and p90 are reported."),
    rounds: int = typer.Option(1, help="Fresh processes per contender, interleaved; reports the median "
                                       "of the round medians (use >= 3 on shared or virtual machines)."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads (default: all cores)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full report here."),
) -> None:
    """Measure a bundle: per-component and end-to-end latency, images/s, loop overhead, memory."""
    from ldmrt.cli import console, out, user_errors

    with user_errors():
        from rich.table import Table

        from ldmrt.bench import (BenchCase, BenchOptions, format_overhead, format_ratio, run_bench,
                                 validate_report, write_report)
        from ldmrt.errors import ConfigError
        from ldmrt.manifest import load_manifest
        from ldmrt.runtime.samplers import SAMPLERS

        manifest = load_manifest(bundle)
        if sampler not in SAMPLERS:
            raise ConfigError(f"--sampler {sampler!r}: expected one of {list(SAMPLERS)}")
        if warmup < 0 or repeat < 1 or steps < 1 or rounds < 1:
            raise ConfigError(f"--warmup {warmup} / --repeat {repeat} / --steps {steps} / --rounds {rounds}: "
                              f"expected >= 0 / >= 1 / >= 1 / >= 1")
        f = manifest.config.downsampling_factor
        default = manifest.component("unet").spec.ranges["latent_height"][1] * f
        size_list = [_int(v, "--sizes") for v in sizes.split(",") if v.strip()] or [default]
        batch_list = [_int(v, "--batch") for v in batch.split(",") if v.strip()]
        contenders = tuple(v.strip() for v in (backend + "," + compare).split(",") if v.strip())
        cases = tuple(BenchCase(size=s, batch=b, steps=steps, sampler=sampler, guidance=guidance)
                      for s in size_list for b in batch_list)
        options = BenchOptions(contenders=contenders, cases=cases, warmup=warmup, repeat=repeat,
                               device=device, threads=threads, rounds=rounds)
        with console.status("benchmarking") as status:
            report = run_bench(bundle, options, progress=lambda c: status.update(f"measuring {c}"))
        problems = validate_report(report)
        table = Table(title=f"{manifest.name} {manifest.precision.value} — {report['machine']['cpu']} "
                            f"({report['machine']['cores']} cores), medians of {repeat}"
                            + ("" if rounds == 1 else f" x {rounds} rounds (median of round medians)"))
        for column in ("contender", "size", "batch", "end-to-end ms", "p90 ms", "img/s", "UNet ms",
                       "loop overhead", "vs torch-eager (e2e / UNet)", "peak RSS MiB"):
            table.add_column(column)
        speed = {(r["contender"], r["case"]["size"], r["case"]["batch"]): r for r in report["ratios"]}
        for result in report["results"]:
            if result["status"] != "ok":
                table.add_row(result["contender"], "", "", f"[red]{result['error'][:60]}[/]")
                continue
            for row in result["cases"]:
                case = row["case"]
                unet = row.get("components", {}).get("unet") or row.get("unet")
                ratio = speed.get((result["contender"], case["size"], case["batch"]), {})
                table.add_row(result["contender"], str(case["size"]), str(case["batch"]),
                              f"{row['end_to_end']['median_ms']:.0f}", f"{row['end_to_end']['p90_ms']:.0f}",
                              f"{row['images_per_s']:.2f}", f"{unet['median_ms']:.1f}" if unet else "",
                              format_overhead(row, result["contender"]),
                              format_ratio(ratio),
                              f"{result['peak_rss_mib']:.0f}")
        out.print(table)
        if problems:
            console.print(f"[red]report problems:[/] {problems}")
        if json_path is not None:
            write_report(report, json_path)
            console.print(f"wrote {json_path}")


def _int(value: str, option: str) -> int:
    from ldmrt.errors import ConfigError
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{option}: expected comma-separated integers, found {value!r}") from None
    if number < 1:
        raise ConfigError(f"{option}: expected positive integers, found {number}")
    return number
