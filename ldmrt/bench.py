"""`ldmrt bench`: latency, throughput and memory of a bundle, side by side with the alternatives.

Each contender runs in its own spawned process (clean peak RSS, its own thread pools) with
the same bundle, weights, shapes, sampler and initial noise:

    ldmrt/<backend>     the lean runtime on onnxruntime / tensorrt / torch
    torch-eager         ldmrt's PyTorch modules, eager (the torch backend without CUDA graphs)
    diffusers           diffusers' StableDiffusionPipeline (CLIP models) or StableDiffusionXLPipeline
                        (SDXL bases) with the same weights and the same request

Timings are medians (and p90) over `repeat` runs after `warmup` runs; ratios are computed
against torch-eager measured in the same run. With `rounds` > 1 every contender runs in a fresh
process per round, rounds interleaved (A B C, A B C, ...), and a case's median is the median of
its round medians (p90/min/max over all samples): on shared or virtual machines a process can
land in a slower state for its whole life (docs/cpu_speed.md, "Noise"), which one process per
contender cannot tell from a real difference. With `loras`, each ldmrt pipeline also times the
adapter switch after its cases, next to a full re-export (ldmrt.bench_lora).
"""
from __future__ import annotations

import math
import multiprocessing
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ldmrt.bench_stats import merge_rounds, summarize  # noqa: F401 (the bench's public names)
from ldmrt.bench_lora import WHAT as LORA_WHAT, check_lora_options, measure_switch, merge_switch, reexport_entry
from ldmrt.bench_reference import diffusers_coverage
from ldmrt.engines import trt_api
from ldmrt.engines.backend import Backend, names
from ldmrt.engines.ort_cache import cpu_isa
from ldmrt.errors import BackendUnavailableError, ConfigError
from ldmrt.iospec import Component
from ldmrt.lora.choice import LoraChoice
# The report files' functions live in ldmrt.report_file; callers import them from here too.
from ldmrt.report_file import REPORT_MAX_BYTES, check_report_path, is_ldmrt_report, write_report  # noqa: F401

SCHEMA = "ldmrt-bench/1"
BASELINES = ("torch-eager", "diffusers")       # contenders that are not ldmrt backends
BENCH_PROMPT = "a photograph of an astronaut riding a horse"


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
    loras: tuple[LoraChoice, ...] = ()     # adapters whose switch is timed (ldmrt.bench_lora)
    lora_reexport: bool = False            # also time a full re-export with them fused


# --- options, checked before any process starts ------------------------------------------------

def parse_contenders(text: str, *, baselines: bool) -> tuple[str, ...]:
    """A comma list of ldmrt backends (`backend`, at least one, any case) or of baselines
    (`compare`, '' for none); ConfigError naming the field for an unknown or repeated name."""
    field = "compare" if baselines else "backend"
    items = [item.strip() for item in text.split(",")] if text.strip() else []
    if not items and not baselines:
        raise ConfigError(f"backend {text!r}: expected at least one of {names(Backend)}", field=field)
    chosen: list[str] = []
    for item in items:
        if not baselines:
            name = Backend.parse(item, field=field).value
        elif item.lower() in BASELINES:
            name = item.lower()
        else:
            raise ConfigError(f"compare {item!r}: expected a comma list of {', '.join(BASELINES)} "
                              f"('' for none)", field=field)
        if name in chosen:
            raise ConfigError(f"{field} {text!r}: {name} is listed twice", field=field)
        chosen.append(name)
    return tuple(chosen)


def check_options(options: BenchOptions, manifest) -> None:
    """Every option against the bundle and this machine; ConfigError (or BackendUnavailableError)
    naming the field, so that nothing is measured with an option that cannot work."""
    from ldmrt.sampling import SAMPLERS, make_plan

    contenders = options.contenders
    known = [b.value for b in Backend] + list(BASELINES)
    if not contenders or len(set(contenders)) != len(contenders) or any(c not in known for c in contenders):
        raise ConfigError(f"contenders {list(contenders)}: expected distinct names from {', '.join(known)}",
                          field="contenders")
    for name in contenders:
        if name in (Backend.TENSORRT, Backend.TENSORRT_RTX) and not trt_api.available(name):
            raise BackendUnavailableError(f"backend {name!r}: not installed on this machine: "
                                          f"{trt_api.INSTALL_HINT[name]}", field="backend")
    if "diffusers" in contenders:
        reason = diffusers_coverage(manifest.config)
        if reason:
            raise ConfigError(f"compare 'diffusers': {reason}; compare with torch-eager only "
                              f"(--compare torch-eager)", field="compare")
    for name, value, least in (("warmup", options.warmup, 0), ("repeat", options.repeat, 1),
                               ("rounds", options.rounds, 1)):
        if not _is_int(value) or value < least:
            raise ConfigError(f"{name} {value!r}: expected an integer >= {least}", field=name)
    cores = os.cpu_count() or 1
    if options.threads is not None and (not _is_int(options.threads) or not 1 <= options.threads <= cores):
        raise ConfigError(f"threads {options.threads!r}: expected an integer in 1..{cores} (this "
                          f"machine's cores), or none for all of them", field="threads")
    _check_device(options.device)
    if not options.cases:
        raise ConfigError("cases: expected at least one (size, batch) case", field="cases")
    unet = manifest.component(Component.UNET).spec
    factor = manifest.config.downsampling_factor
    low, high = unet.ranges["latent_height"][0] * factor, unet.ranges["latent_height"][2] * factor
    max_batch = manifest.shape_ranges.max_batch
    for case in options.cases:
        if not _is_int(case.size) or not low <= case.size <= high or case.size % factor:
            raise ConfigError(f"size {case.size!r}: expected a multiple of {factor} in {low}..{high} "
                              f"pixels (the bundle's exported range)", field="size")
        if not _is_int(case.batch) or not 1 <= case.batch <= max_batch:
            raise ConfigError(f"batch {case.batch!r}: expected 1..{max_batch} images per call (the "
                              f"bundle's --max-batch)", field="batch")
        if isinstance(case.guidance, bool) or not isinstance(case.guidance, (int, float)) \
                or not math.isfinite(case.guidance):
            raise ConfigError(f"guidance {case.guidance!r}: expected a finite number", field="guidance")
        if case.sampler not in SAMPLERS:
            raise ConfigError(f"sampler {case.sampler!r}: expected one of {', '.join(SAMPLERS)}",
                              field="sampler")
        if not _is_int(case.steps) or case.steps < 1:
            raise ConfigError(f"steps {case.steps!r}: expected an integer >= 1", field="steps")
        make_plan(case.sampler, manifest.config.scheduler, case.steps)   # the sampler's own step limits
    check_lora_options(options.loras, options.lora_reexport, manifest)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_device(device: object) -> None:
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: expected cpu or cuda", field="device")
    if device == "cuda" and not _cuda_visible():
        raise BackendUnavailableError("device 'cuda': no CUDA GPU is visible to torch or onnxruntime "
                                      "on this machine; use --device cpu", field="device")


def _cuda_visible() -> bool:
    try:
        import torch
        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    try:
        import onnxruntime
        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        return False


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
                            "cpu": cpu_name(), "cpu_isa": list(cpu_isa()), "cpu_flags": cpu_flags(),
                            "cores": os.cpu_count(), "load_average_1_5_15": list(os.getloadavg())}
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


def cpu_flags() -> list[str]:
    """Every flag the CPU reports (/proc/cpuinfo's, the list `lscpu` prints as Flags); [] elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):          # x86, arm
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


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
        result["peak_rss_mib"] = peak_rss_mib()         # the cases' peak, before any adapter switch
        if options.loras and runner.pipeline is not None:     # after the cases: they run without adapters
            request = bench_request(runner.pipeline.config, options.cases[0])
            result["lora_switch"] = measure_switch(runner.pipeline, options.loras, options.repeat, request,
                                                   runner.sync, peak_rss_mib)
    except Exception as exc:  # one contender failing must not lose the others' numbers
        result = {"contender": contender, "status": "error", "error": f"{type(exc).__name__}: {exc}",
                  "peak_rss_mib": peak_rss_mib()}
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
            request = bench_request(self.impl.config, case)
            row["end_to_end"] = measure(lambda: self.impl.generate(request), options.warmup, options.repeat, self.sync)
            row["images_per_s"] = case.batch / (row["end_to_end"]["median_ms"] / 1e3)
            row[Component.UNET] = measure(lambda: self.impl.unet_call(case), options.warmup, options.repeat, self.sync)
            return row
        request = bench_request(self.pipeline.config, case)
        timings: list[dict[str, float]] = []

        def generate() -> None:
            timings.append(self.pipeline.generate(request).timings)

        row["end_to_end"] = measure(generate, options.warmup, options.repeat, self.sync)
        row["images_per_s"] = case.batch / (row["end_to_end"]["median_ms"] / 1e3)
        row["components"] = self._components(case)
        measured = timings[options.warmup:]
        unet_ms = row["components"][Component.UNET]["median_ms"]
        evaluations = _evaluations(case, self.pipeline)
        denoise = statistics.median(t["denoise"] for t in measured) * 1e3
        # Loop overhead: time in the denoising loop not spent inside the UNet. The numpy loop times
        # each UNet call; the fused torch loop does not, so there it is estimated from the separate
        # UNet measurement (noisy: can come out negative on a loaded CPU).
        timed = Component.UNET in measured[0]
        inside = (statistics.median(t[Component.UNET] for t in measured) * 1e3 if timed else unet_ms * evaluations)
        row["loop_overhead_basis"] = "timed" if timed else "estimated"
        row["denoise_ms"] = denoise
        row["loop_overhead_ms_per_step"] = (denoise - inside) / evaluations
        row["loop_overhead_fraction"] = (denoise - inside) / inside if inside > 0 else None
        return row

    def _components(self, case: BenchCase) -> dict[str, Any]:
        from ldmrt.iospec import example_inputs

        out = {}
        guided = case.guidance > 1.0        # diffusers' rule: no unconditional half at <= 1
        for name, runner in self.pipeline.runners.items():
            if name == Component.VAE_ENCODER:
                continue
            halves = guided and name in (Component.UNET, Component.TEXT_ENCODER, Component.TEXT_ENCODER_2)
            batch = case.batch * (2 if halves else 1)
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


def bench_request(config, case: BenchCase):
    """The GenerationRequest every contender runs for `case` (seed 0, the case's size, batch,
    steps, sampler and guidance). Class-conditional and unconditional models take no prompt (the
    pipeline refuses one); concat and layout models get example maps and boxes."""
    from ldmrt.runtime.pipeline import GenerationRequest
    from ldmrt.runtime.spatial import example_fields

    prompt = BENCH_PROMPT if config.is_text_conditioned and not config.is_layout_conditioned else ""
    maps = example_fields(config, case.size, case.size)     # a concat model's inputs
    if config.is_layout_conditioned:                           # a layout model's: two boxes
        maps["layout"] = [{"class": 0, "box": [0.1, 0.1, 0.6, 0.6]}, {"class": 1, "box": [0.4, 0.3, 0.9, 0.9]}]
    return GenerationRequest(prompt=prompt, steps=case.steps, guidance=case.guidance, sampler=case.sampler,
                             seed=0, height=case.size, width=case.size, batch=case.batch, **maps)


def _evaluations(case: BenchCase, pipeline) -> int:
    from ldmrt.sampling import make_plan
    return make_plan(case.sampler, pipeline.config.scheduler, case.steps).num_evaluations


# --- the whole run ---------------------------------------------------------------------------

def run_bench(bundle: Path, options: BenchOptions, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Every contender in a fresh spawned process; ratios against torch-eager; JSON-able result."""
    from ldmrt.manifest import load_manifest

    manifest = load_manifest(bundle)
    check_options(options, manifest)
    context = multiprocessing.get_context("spawn")
    per_round: dict[str, list[dict]] = {c: [] for c in options.contenders}
    for round_index in range(options.rounds):
        for contender in options.contenders:
            progress(contender if options.rounds == 1 else f"{contender} (round {round_index + 1}/{options.rounds})")
            per_round[contender].append(_in_fresh_process(context, str(bundle), contender, options))
    results = [runs[0] if len(runs) == 1 else merge_contender(runs) for runs in per_round.values()]
    report = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "bundle": {"path": str(bundle), "name": manifest.name, "precision": manifest.precision.value,
                         "random_weights": manifest.random_weights,
                         "components": {n: {"size_bytes": e.size_bytes, "dtype": e.dtype}
                                        for n, e in manifest.components.items()},
                         "engines": [r.to_dict() for r in manifest.engines]},
              "machine": machine_info(), "options": _options_dict(options), "results": results}
    report["ratios"] = ratios(results, baseline="torch-eager")
    report["failed"] = [r["contender"] for r in results if r["status"] != "ok"]
    if options.loras:
        progress("a full re-export" if options.lora_reexport else "the re-export's record")
        reexport = reexport_entry(bundle, manifest, options.loras, options.lora_reexport,
                                  lambda fn, *args, died: in_fresh_process(context, died, fn, *args))
        report["lora"] = {"adapters": [{"path": str(c.path), "scale": c.scale} for c in options.loras],
                          "what": LORA_WHAT, "reexport": reexport}
        switches = [r["contender"] for r in results if r.get("lora_switch", {}).get("status", "ok") != "ok"]
        report["switch_failed"] = switches + (["reexport"] if reexport.get("status") == "error" else [])
    return report


def _in_fresh_process(context, bundle: str, contender: str, options: BenchOptions) -> dict:
    """run_contender in a new process (its death recorded as the contender's error)."""
    died = {"contender": contender, "status": "error", "peak_rss_mib": None,
            "error": "its process died before reporting (killed for memory? a crash?)"}
    return in_fresh_process(context, died, run_contender, bundle, contender, options)


def in_fresh_process(context, died: dict, fn: Callable[..., dict], *args) -> dict:
    """fn(*args) in a new process; `died`, the reason appended to its "error", when that process dies
    (killed for memory, a crash in a native library): multiprocessing.Pool would wait for its lost
    task forever; ProcessPoolExecutor reports it."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool as exc:
            return {**died, "error": f"{died['error']}: {exc}"}


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
        if Component.UNET in first:
            case[Component.UNET] = merge_rounds([r[Component.UNET] for r in rows])
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
    if "lora_switch" in runs[0]:
        merged["lora_switch"] = merge_switch([r["lora_switch"] for r in runs])
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
            unet = case.get("components", {}).get(Component.UNET) or case.get(Component.UNET)
            base_unet = base_case.get("components", {}).get(Component.UNET) or base_case.get(Component.UNET)
            if unet and base_unet:
                row["unet_speedup"] = base_unet["median_ms"] / unet["median_ms"]
            rows.append(row)
    return rows


def _options_dict(options: BenchOptions) -> dict:
    data = asdict(options)
    data["cases"] = [asdict(c) for c in options.cases]
    data["loras"] = [{"path": str(c.path), "scale": c.scale} for c in options.loras]
    return data


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
            if "lora" in report and result["contender"] != "diffusers" and "lora_switch" not in result:
                problems.append(f"{result['contender']}: no lora_switch (the run had --lora)")
    return problems


