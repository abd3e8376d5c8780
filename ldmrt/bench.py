"""`ldmrt bench`: latency, throughput and memory of a bundle, side by side with the alternatives.

Each contender runs in its own spawned process (clean peak RSS, its own thread pools) with
the same bundle, weights, shapes, sampler and initial noise:

    ldmrt/<backend>     the lean runtime on onnxruntime / tensorrt / torch
    torch-eager         ldmrt's PyTorch modules, eager (the torch backend without CUDA graphs)
    diffusers           diffusers' StableDiffusionPipeline with the same weights (CLIP models)

Timings are medians (and p90) over `repeat` runs after `warmup` runs; ratios are computed
against torch-eager measured in the same run. With `rounds` > 1 every contender runs in a fresh
process per round, rounds interleaved (A B C, A B C, ...), and a case's median is the median of
its round medians (p90/min/max over all samples): on shared or virtual machines a process can
land in a slower state for its whole life (docs/cpu_speed.md, "Noise"), which one process per
contender cannot tell from a real difference.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ldmrt.atomic import atomic_write
from ldmrt.errors import ConfigError

SCHEMA = "ldmrt-bench/1"


@dataclass(frozen=True)
class BenchCase:
    size: int                  # image side in pixels
    batch: int                 # images per call
    steps: int
    sampler: str = "ddim"
    guidance: float = 7.5


@dataclass(frozen=True)
class BenchOptions:
    contenders: tuple[str, ...] = ("onnxruntime", "torch-eager", "diffusers")
    cases: tuple[BenchCase, ...] = (BenchCase(size=64, batch=1, steps=10),)
    warmup: int = 1
    repeat: int = 3
    device: str = "cpu"
    threads: int | None = None
    rounds: int = 1                # fresh processes per contender, interleaved


def summarize(samples_s: list[float]) -> dict[str, float]:
    """Median, p90 (nearest rank), min, max in milliseconds, and the count."""
    if not samples_s:
        raise ValueError("summarize: no samples")
    ms = sorted(s * 1e3 for s in samples_s)
    rank = max(1, int(np.ceil(0.9 * len(ms))))
    return {"median_ms": float(statistics.median(ms)), "p90_ms": float(ms[rank - 1]),
            "min_ms": float(ms[0]), "max_ms": float(ms[-1]), "n": len(ms), "samples_ms": ms}


def merge_rounds(stats: list[dict]) -> dict:
    """One statistic over rounds: the median of the round medians; p90, min, max over every sample."""
    pooled = summarize([v / 1e3 for s in stats for v in s["samples_ms"]])
    medians = [s["median_ms"] for s in stats]
    return {**pooled, "median_ms": float(statistics.median(medians)), "round_medians_ms": medians}


def measure(fn: Callable[[], Any], warmup: int, repeat: int, sync: Callable[[], None] = lambda: None) -> dict:
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return summarize(samples)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu": cpu_name(), "cores": os.cpu_count(),
                            "load_average_1_5_15": list(os.getloadavg())}
    for module in ("numpy", "onnxruntime", "torch", "diffusers", "transformers", "tensorrt",
                   "tensorrt_rtx_bindings"):
        try:
            info[module] = getattr(__import__(module), "__version__", "importable")
        except Exception:
            pass
    if "torch" in info:
        import torch
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- one contender, in its own process ------------------------------------------------------

def run_contender(bundle: str, contender: str, options: BenchOptions) -> dict[str, Any]:
    """Measure one contender on every case; returns a JSON-able dict (errors recorded, not raised)."""
    started = time.perf_counter()
    try:
        runner = _ContenderRunner(Path(bundle), contender, options)
        load_s = time.perf_counter() - started
        cases = [runner.measure_case(case) for case in options.cases]
        result = {"contender": contender, "status": "ok", "load_seconds": load_s, "cases": cases}
        result.update(runner.memory())
    except Exception as exc:  # one contender failing must not lose the others' numbers
        result = {"contender": contender, "status": "error", "error": f"{type(exc).__name__}: {exc}"}
    result["peak_rss_mib"] = peak_rss_mib()
    return result


class _ContenderRunner:
    def __init__(self, bundle: Path, contender: str, options: BenchOptions):
        from ldmrt.runtime.pipeline import Pipeline

        self.contender, self.options = contender, options
        self.sync: Callable[[], None] = lambda: None
        if contender == "diffusers":
            from ldmrt.bench_reference import DiffusersContender
            self.impl = DiffusersContender(bundle, options.device)
            self.sync = self.impl.sync
            self.pipeline = None
            return
        backend, extra = contender, {}
        if contender == "torch-eager":
            backend, extra = "torch", {"cuda_graphs": False, "device": options.device}
        elif contender == "torch":
            extra = {"device": options.device}
        elif contender == "onnxruntime":
            extra = {"device": options.device, "threads": options.threads}
        self.pipeline = Pipeline.load(bundle, backend, **extra)
        if backend == "torch":
            import torch
            if torch.cuda.is_available() and options.device == "cuda":
                self.sync = torch.cuda.synchronize

    def measure_case(self, case: BenchCase) -> dict[str, Any]:
        options = self.options
        row: dict[str, Any] = {"case": asdict(case)}
        if self.pipeline is None:
            row["end_to_end"] = measure(lambda: self.impl.generate(case), options.warmup, options.repeat, self.sync)
            row["images_per_s"] = case.batch / (row["end_to_end"]["median_ms"] / 1e3)
            row["unet"] = measure(lambda: self.impl.unet_call(case), options.warmup, options.repeat, self.sync)
            return row
        from ldmrt.runtime.pipeline import GenerationRequest

        request = GenerationRequest(prompt="a photograph of an astronaut riding a horse", steps=case.steps,
                                    guidance=case.guidance, sampler=case.sampler, seed=0,
                                    height=case.size, width=case.size, batch=case.batch)
        timings: list[dict[str, float]] = []

        def generate() -> None:
            timings.append(self.pipeline.generate(request).timings)

        row["end_to_end"] = measure(generate, options.warmup, options.repeat, self.sync)
        row["images_per_s"] = case.batch / (row["end_to_end"]["median_ms"] / 1e3)
        row["components"] = self._components(case)
        measured = timings[options.warmup:]
        unet_ms = row["components"]["unet"]["median_ms"]
        evaluations = _evaluations(case, self.pipeline)
        denoise = statistics.median(t["denoise"] for t in measured) * 1e3
        # Loop overhead: time in the denoising loop not spent inside the UNet. The numpy loop times
        # each UNet call; the fused torch loop does not, so there it is estimated from the separate
        # UNet measurement (noisy: can come out negative on a loaded CPU).
        timed = "unet" in measured[0]
        inside = (statistics.median(t["unet"] for t in measured) * 1e3 if timed else unet_ms * evaluations)
        row["loop_overhead_basis"] = "timed" if timed else "estimated"
        row["denoise_ms"] = denoise
        row["loop_overhead_ms_per_step"] = (denoise - inside) / evaluations
        row["loop_overhead_fraction"] = (denoise - inside) / inside if inside > 0 else None
        return row

    def _components(self, case: BenchCase) -> dict[str, Any]:
        from ldmrt.iospec import example_inputs

        out = {}
        guided = case.guidance != 1.0
        for name, runner in self.pipeline.runners.items():
            if name == "vae_encoder":
                continue
            batch = case.batch * (2 if guided and name in ("unet", "text_encoder") else 1)
            f = self.pipeline.config.downsampling_factor
            values = {"batch": batch, "latent_height": case.size // f, "latent_width": case.size // f}
            feeds = example_inputs(self.pipeline.config, runner.spec, values, seed=0)
            out[name] = measure(lambda r=runner, x=feeds: r(x), self.options.warmup, self.options.repeat, self.sync)
        return out

    def memory(self) -> dict[str, Any]:
        try:
            import torch
            if torch.cuda.is_available() and self.options.device == "cuda":
                return {"device_peak_mib": torch.cuda.max_memory_allocated() / 2**20}
        except ImportError:
            pass
        return {}


def _evaluations(case: BenchCase, pipeline) -> int:
    from ldmrt.runtime.samplers import make_plan
    return make_plan(case.sampler, pipeline.config.scheduler, case.steps).num_evaluations


# --- the whole run ---------------------------------------------------------------------------

def run_bench(bundle: Path, options: BenchOptions, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Every contender in a fresh spawned process; ratios against torch-eager; JSON-able result."""
    from ldmrt.manifest import load_manifest

    manifest = load_manifest(bundle)
    if options.rounds < 1:
        raise ConfigError(f"rounds {options.rounds}: expected >= 1")
    context = multiprocessing.get_context("spawn")
    per_round: dict[str, list[dict]] = {c: [] for c in options.contenders}
    for round_index in range(options.rounds):
        for contender in options.contenders:
            progress(contender if options.rounds == 1 else f"{contender} (round {round_index + 1}/{options.rounds})")
            with context.Pool(1) as pool:
                per_round[contender].append(pool.apply(run_contender, (str(bundle), contender, options)))
    results = [runs[0] if len(runs) == 1 else merge_contender(runs) for runs in per_round.values()]
    report = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "bundle": {"path": str(bundle), "name": manifest.name, "precision": manifest.precision.value,
                         "random_weights": manifest.random_weights,
                         "components": {n: {"size_bytes": e.size_bytes, "dtype": e.dtype}
                                        for n, e in manifest.components.items()},
                         "engines": [dict(r) for r in manifest.engines]},
              "machine": machine_info(), "options": _options_dict(options), "results": results}
    report["ratios"] = ratios(results, baseline="torch-eager")
    return report


def merge_contender(runs: list[dict]) -> dict:
    """A contender's rounds as one result (the first failed round's error, if any failed)."""
    failed = next((r for r in runs if r["status"] != "ok"), None)
    if failed is not None:
        return {**failed, "error": f"round {runs.index(failed) + 1} of {len(runs)}: {failed['error']}"}
    cases = []
    for i, first in enumerate(runs[0]["cases"]):
        rows = [r["cases"][i] for r in runs]
        case = {"case": first["case"], "end_to_end": merge_rounds([r["end_to_end"] for r in rows])}
        case["images_per_s"] = first["case"]["batch"] / (case["end_to_end"]["median_ms"] / 1e3)
        if "unet" in first:
            case["unet"] = merge_rounds([r["unet"] for r in rows])
        if "components" in first:
            case["components"] = {name: merge_rounds([r["components"][name] for r in rows])
                                  for name in first["components"]}
        for key in ("denoise_ms", "loop_overhead_ms_per_step", "loop_overhead_fraction"):
            values = [r.get(key) for r in rows]
            if all(v is not None for v in values) and key in first:
                case[key] = float(statistics.median(values))
        if "loop_overhead_basis" in first:
            case["loop_overhead_basis"] = first["loop_overhead_basis"]
        cases.append(case)
    merged = {"contender": runs[0]["contender"], "status": "ok", "rounds": len(runs),
              "load_seconds": float(statistics.median(r["load_seconds"] for r in runs)),
              "load_seconds_per_round": [r["load_seconds"] for r in runs], "cases": cases,
              "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}
    peaks = [r["device_peak_mib"] for r in runs if "device_peak_mib" in r]
    if peaks:
        merged["device_peak_mib"] = max(peaks)
    return merged


def ratios(results: list[dict], baseline: str) -> list[dict]:
    """Per case: baseline median / contender median (>1 means faster than the baseline)."""
    base = next((r for r in results if r["contender"] == baseline and r["status"] == "ok"), None)
    if base is None:
        return []
    rows = []
    for i, base_case in enumerate(base["cases"]):
        for result in results:
            if result["status"] != "ok":
                continue
            case = result["cases"][i]
            row = {"case": base_case["case"], "contender": result["contender"],
                   "end_to_end_speedup": base_case["end_to_end"]["median_ms"] / case["end_to_end"]["median_ms"]}
            unet = case.get("components", {}).get("unet") or case.get("unet")
            base_unet = base_case.get("components", {}).get("unet") or base_case.get("unet")
            if unet and base_unet:
                row["unet_speedup"] = base_unet["median_ms"] / unet["median_ms"]
            rows.append(row)
    return rows


def _options_dict(options: BenchOptions) -> dict:
    data = asdict(options)
    data["cases"] = [asdict(c) for c in options.cases]
    return data


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(report, indent=2, default=str) + "\n").encode())


def format_overhead(case: dict, contender: str) -> str:
    """A case's loop overhead in percent; '~' where it was estimated rather than timed inside the
    loop (files from before the basis was recorded: the torch contenders' fused loop was estimated)."""
    overhead = case.get("loop_overhead_fraction")
    if overhead is None:
        return ""
    basis = case.get("loop_overhead_basis", "estimated" if contender.startswith("torch") else "timed")
    return ("~" if basis == "estimated" else "") + f"{overhead * 100:.2f}%"


def format_ratio(ratio: dict) -> str:
    """'E2Ex / UNETx' against the baseline ('' without a ratio row, '-' without a UNet ratio)."""
    if not ratio:
        return ""
    unet = ratio.get("unet_speedup")
    return f"{ratio['end_to_end_speedup']:.2f}x / " + ("-" if unet is None else f"{unet:.2f}x")


def validate_report(report: dict) -> list[str]:
    """Problems with a report's structure (empty when it follows the schema)."""
    problems = []
    for key in ("schema", "created", "bundle", "machine", "options", "results", "ratios"):
        if key not in report:
            problems.append(f"missing {key}")
    if report.get("schema") != SCHEMA:
        problems.append(f"schema {report.get('schema')!r} != {SCHEMA!r}")
    for result in report.get("results", []):
        if result.get("status") == "ok":
            for case in result["cases"]:
                for key in ("case", "end_to_end", "images_per_s"):
                    if key not in case:
                        problems.append(f"{result['contender']}: case missing {key}")
                stats = case.get("end_to_end", {})
                if not stats.get("min_ms", 0) <= stats.get("median_ms", 0) <= stats.get("p90_ms", 0) <= stats.get("max_ms", 0):
                    problems.append(f"{result['contender']}: statistics out of order {stats}")
    return problems


