"""`ldmrt bench`: latency, throughput and memory, side by side with PyTorch eager and diffusers."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ldmrt.commands.terminal import console, out, user_errors
from ldmrt.iospec import Component


def bench(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `ldmrt export`."),
    backend: str = typer.Option("onnxruntime", help="Comma list of ldmrt backends to measure (any case)."),
    compare: Optional[str] = typer.Option(
        None, help="Comma list of baselines: torch-eager, diffusers ('' for none; default: both, "
                   "diffusers only for the CLIP-conditioned KL models it covers)."),
    sizes: str = typer.Option("", help="Image sides in pixels, e.g. 256,512 (default: the bundle's optimum)."),
    batch: str = typer.Option("1", help="Images per call, e.g. 1,2."),
    steps: int = typer.Option(20, help="Denoising steps per image."),
    sampler: Optional[str] = typer.Option(None, help="Sampler (default: the bundle's own, from its "
                                                    "checkpoint's scheduler)."),
    guidance: float = typer.Option(7.5, help="Guidance scale (UNet batch doubles when != 1)."),
    warmup: int = typer.Option(1, help="Untimed runs first."),
    repeat: int = typer.Option(3, help="Timed runs; medians and p90 are reported."),
    rounds: int = typer.Option(1, help="Fresh processes per contender, interleaved; reports the median "
                                       "of the round medians (use >= 3 on shared or virtual machines)."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads (default: all cores)."),
    json_path: Optional[Path] = typer.Option(
        None, "--json", help="Write the full report here (strict JSON; replaces only a report ldmrt wrote)."),
    lora: Optional[list[str]] = typer.Option(
        None, "--lora", help="FILE[:SCALE] LoRA adapter (repeatable). Each ldmrt pipeline, after its cases (so "
                             "the latency table and its peak RSS are without adapters), also times the run-time "
                             "switch none -> these adapters -> none: --repeat cycles, median and a fresh "
                             "process's first switch (which also keeps the base weights), each switch whole "
                             "(files read and checked, deltas, weights written / ONNX Runtime sessions "
                             "reopened / TensorRT engines refitted); one generation of the first case before, "
                             "during and after shows the image changed and came back. Not the diffusers "
                             "baseline. A bad file or scale is refused before anything runs."),
    lora_reexport: bool = typer.Option(
        False, "--lora-reexport", help="With --lora: also time the alternative, a full re-export of the "
                                       "bundle's recorded model source with its recorded adapters plus these "
                                       "fused (same precision, components, shape ranges, opset, validation), "
                                       "once, in a fresh process, into a temporary folder (deleted). Without "
                                       "it the re-export is reported as not measured: bundles record no "
                                       "export time. TensorRT engines would need building again too: their "
                                       "recorded build times are listed, not re-measured."),
) -> None:
    """Measure a bundle: per-component and end-to-end latency, images/s, loop overhead, memory.

    With --lora, also what switching LoRA adapters costs on each loaded pipeline, next to a full
    re-export with them fused (--lora-reexport times one; otherwise it is not measured).

    Exit 0 when every contender ran; 3 when one failed or none ran, or an adapter switch or the
    re-export failed (the tables and the report say which and why); 2 for a bad option, before
    anything runs."""
    with user_errors():
        from rich.markup import escape
        from rich.table import Table

        from ldmrt.bench import (BenchCase, BenchOptions, check_report_path,
                                 diffusers_coverage, format_overhead, format_ratio, parse_contenders,
                                 run_bench, validate_report, write_report)
        from ldmrt.lora.choice import LoraChoice
        from ldmrt.manifest import load_manifest

        # Every option is checked before the first process starts (a run can take hours).
        size_list = _ints(sizes, "--sizes", allow_empty=True)
        batch_list = _ints(batch, "--batch", allow_empty=False)
        manifest = load_manifest(bundle)
        f = manifest.config.downsampling_factor
        size_list = size_list or [manifest.component(Component.UNET).spec.ranges["latent_height"][1] * f]
        if compare is None:
            compare = "torch-eager" + ("" if diffusers_coverage(manifest.config) else ",diffusers")
        contenders = parse_contenders(backend, baselines=False) + parse_contenders(compare, baselines=True)
        chosen_sampler = manifest.config.scheduler.default_sampler if sampler is None else sampler
        cases = tuple(BenchCase(size=s, batch=b, steps=steps, sampler=chosen_sampler, guidance=guidance)
                      for s in size_list for b in batch_list)
        loras = tuple(LoraChoice.parse(text, "lora") for text in lora or ())     # "lora": the CLI says --lora
        options = BenchOptions(contenders=contenders, cases=cases, warmup=warmup, repeat=repeat,
                               device=device.strip().lower(), threads=threads, rounds=rounds, loras=loras,
                               lora_reexport=lora_reexport)
        if json_path is not None:
            check_report_path(json_path, "--json")
        with console.status("benchmarking") as status:    # run_bench checks the options first
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
                table.add_row(result["contender"], "", "", f"[red]{escape(result['error'][:60])}[/]")
                continue
            for row in result["cases"]:
                case = row["case"]
                unet = row.get("components", {}).get(Component.UNET) or row.get(Component.UNET)
                ratio = speed.get((result["contender"], case["size"], case["batch"]), {})
                table.add_row(result["contender"], str(case["size"]), str(case["batch"]),
                              f"{row['end_to_end']['median_ms']:.0f}", f"{row['end_to_end']['p90_ms']:.0f}",
                              f"{row['images_per_s']:.2f}", f"{unet['median_ms']:.1f}" if unet else "",
                              format_overhead(row, result["contender"]),
                              format_ratio(ratio),
                              f"{result['peak_rss_mib']:.0f}")
        out.print(table)
        if loras:
            _print_switch(report)
        if problems:
            console.print(f"[red]report problems:[/] {problems}")
        if json_path is not None:
            write_report(report, json_path, "--json")
            console.print(f"wrote {json_path}", highlight=False)
    where = "; the errors are in the table" + (" and the report" if json_path else "")
    if report["failed"]:
        # Measured numbers without the contender that failed are no comparison: not a success.
        ran = [r["contender"] for r in report["results"] if r["status"] == "ok"]
        console.print(f"[bold red]error:[/] bench: {', '.join(report['failed'])} failed"
                      + (f" (ran: {', '.join(ran)})" if ran else "; nothing ran") + where,
                      highlight=False, soft_wrap=True)
    if report.get("switch_failed"):      # asked for and not measured: not a success either
        console.print(f"[bold red]error:[/] bench: the LoRA switch or re-export failed: "
                      f"{', '.join(report['switch_failed'])}" + where, highlight=False, soft_wrap=True)
    if report["failed"] or report.get("switch_failed"):
        raise typer.Exit(3)


def _print_switch(report: dict) -> None:
    """The LoRA switch table under the latency table, and the re-export's line."""
    from rich.markup import escape
    from rich.table import Table

    from ldmrt.bench_lora import reexport_line, switch_cells

    adapters = ", ".join(f"{escape(a['path'])} x {a['scale']:g}" for a in report["lora"]["adapters"])
    table = Table(title=f"LoRA switch on the loaded pipeline ({adapters}): ms, median of --repeat cycles "
                        f"(a fresh process's first)")
    for column in ("contender", "none -> adapters ms", "adapters -> none ms", "image change / restored (max abs)",
                   "peak RSS MiB"):
        table.add_column(column)
    for result in report["results"]:
        if result["status"] == "ok":
            entry = result.get("lora_switch")
            if entry is not None and entry["status"] != "ok":
                table.add_row(result["contender"], f"[red]{escape(entry['error'][:70])}[/]")
            else:
                table.add_row(result["contender"], *switch_cells(entry))
    out.print(table)
    out.print(escape(reexport_line(report["lora"]["reexport"])), highlight=False)


def _ints(value: str, option: str, allow_empty: bool) -> list[int]:
    """'256, 512' -> [256, 512]: distinct integers (ranges are the bundle's, checked later)."""
    from ldmrt.errors import ConfigError

    items = [v.strip() for v in value.split(",")] if value.strip() else []
    if not items and not allow_empty:
        raise ConfigError(f"{option} {value!r}: expected comma-separated integers, e.g. 1,2")
    numbers = []
    for item in items:
        try:
            number = int(item)
        except ValueError:
            raise ConfigError(f"{option} {value!r}: expected comma-separated integers, found "
                              f"{item!r}") from None
        if number in numbers:
            raise ConfigError(f"{option} {value!r}: {number} is listed twice")
        numbers.append(number)
    return numbers
