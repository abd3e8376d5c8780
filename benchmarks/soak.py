"""Concurrency soak: one loaded Pipeline (onnxruntime CPU, `tiny`) serving many threads.

    python benchmarks/soak.py                                  # 400 calls, 4 threads, 2 steps
    python benchmarks/soak.py --bundle DIR --calls 1000 --threads 8 --out /tmp/soak.json

A few distinct requests (prompts, seeds, sizes, samplers, with and without guidance) are first
generated one after another: those are the references. Then `--threads` threads share the one
Pipeline for `--calls` calls, cycling through the requests; every image and final latent must
equal its reference bit for bit. The process's resident memory (RSS) is sampled throughout:
it is reported after loading, after the warm-up calls and at the end, with the curve and the
slope after warm-up, so a leak shows as growth per call rather than as one number.

Lean runtime: numpy + onnxruntime. Only exporting the bundle (when --bundle is not given) needs
torch. Writes benchmarks/results/soak_tiny_cpu.json unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldmrt.runtime.pipeline import GenerationRequest, Pipeline  # noqa: E402

MIB = 2**20
PROMPTS = ("a red fox in the snow", "", "an astronaut riding a horse, oil painting",
           "cat " * 100)                             # the last one is truncated (a warning per call)
SAMPLERS = ("ddim", "euler-a", "dpmpp-2m")           # deterministic, ancestral (noise), multistep


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def soak_requests(count: int, sizes: tuple[int, ...], steps: int) -> list[GenerationRequest]:
    """`count` distinct requests covering prompts, seeds, sizes, samplers and guidance on/off."""
    return [GenerationRequest(prompt=PROMPTS[j % len(PROMPTS)], seed=1000 + j, steps=steps,
                              sampler=SAMPLERS[j % len(SAMPLERS)], height=sizes[j % len(sizes)],
                              width=sizes[(j // len(sizes)) % len(sizes)],
                              guidance=1.0 if j % 5 == 4 else 7.5)
            for j in range(count)]


@dataclass
class _Sampler:
    """RSS every `period` seconds in a background thread, with the number of calls done."""
    period: float
    done: list[int]

    def __post_init__(self):
        self.curve: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def sample(self) -> None:
        self.curve.append((time.perf_counter() - self._start, self.done[0], rss_bytes()))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def run_soak(bundle: str | Path, *, calls: int = 400, threads: int = 4, warmup: int = 40, steps: int = 2,
             distinct: int = 24, sizes: tuple[int, ...] = (32, 64), period: float = 0.25,
             pipeline: Pipeline | None = None) -> dict:
    """Serve `calls` generations from `threads` threads on one Pipeline; check and measure them."""
    rss_before_load = rss_bytes()
    pipeline = pipeline or Pipeline.load(bundle, "onnxruntime")
    rss_loaded = rss_bytes()
    requests = soak_requests(distinct, sizes, steps)

    references = [pipeline.generate(r) for r in requests]        # cold: first run of each shape
    start = time.perf_counter()
    repeated = [pipeline.generate(r) for r in requests]          # warm, one at a time
    sequential_seconds = time.perf_counter() - start
    sequential_repeatable = all(np.array_equal(a.images, b.images) for a, b in zip(references, repeated))
    rss_start = rss_bytes()

    done = [0]
    lock = threading.Lock()
    latencies = [0.0] * calls
    mismatches: list[dict] = []
    errors: list[str] = []
    warnings_seen = [0]
    max_abs = [0.0]

    def one(i: int) -> None:
        index = i % len(requests)
        began = time.perf_counter()
        try:
            result = pipeline.generate(requests[index])
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, the soak goes on
            with lock:
                errors.append(f"call {i}: {type(exc).__name__}: {exc}")
                done[0] += 1
            return
        latencies[i] = time.perf_counter() - began
        reference = references[index]
        same = (np.array_equal(result.images, reference.images)
                and np.array_equal(result.latents, reference.latents))
        with lock:
            if not same:
                diff = float(np.max(np.abs(result.images - reference.images)))
                max_abs[0] = max(max_abs[0], diff)
                mismatches.append({"call": i, "request": index, "max_abs_image_diff": diff})
            warnings_seen[0] += len(result.warnings)
            done[0] += 1

    with _Sampler(period, done) as sampler:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="soak") as pool:
            list(pool.map(one, range(calls)))
        wall = time.perf_counter() - start
    rss_end = rss_bytes()

    curve = sampler.curve
    after_warmup = [(t, n, rss) for t, n, rss in curve if n >= warmup]
    rss_warm = after_warmup[0][2] if after_warmup else rss_end
    slope = None
    if len({n for _, n, _ in after_warmup}) >= 3:       # MiB per 100 calls, least squares
        n = np.array([n for _, n, _ in after_warmup], np.float64)
        m = np.array([rss for _, _, rss in after_warmup], np.float64) / MIB
        slope = float(np.polyfit(n, m, 1)[0] * 100)
    measured = sorted(latencies[warmup:] if calls > warmup else latencies)
    truncating = sum(1 for i in range(calls) if requests[i % len(requests)].prompt == PROMPTS[-1])
    return {
        "calls": calls, "threads": threads, "warmup_calls": warmup, "steps": steps,
        "distinct_requests": len(requests), "sizes": list(sizes), "samplers": list(SAMPLERS),
        "calls_ok": calls - len(errors) - len(mismatches), "mismatches": mismatches[:20],
        "mismatch_count": len(mismatches), "errors": errors[:20], "error_count": len(errors),
        "max_abs_image_diff": max_abs[0], "sequential_repeatable": sequential_repeatable,
        "truncation_warnings": {"expected": truncating, "seen": warnings_seen[0]},
        "wall_seconds": round(wall, 3),
        "calls_per_s": round(calls / wall, 2),
        "sequential_calls_per_s": round(len(requests) / sequential_seconds, 2),
        "latency_ms": {"median": round(statistics.median(measured) * 1e3, 1),
                       "p90": round(measured[int(np.ceil(0.9 * len(measured))) - 1] * 1e3, 1),
                       "max": round(measured[-1] * 1e3, 1)},
        "rss_mib": {"before_load": round(rss_before_load / MIB, 1), "loaded": round(rss_loaded / MIB, 1),
                    "start": round(rss_start / MIB, 1), "after_warmup": round(rss_warm / MIB, 1),
                    "end": round(rss_end / MIB, 1),
                    "peak": round(max(r for _, _, r in curve) / MIB, 1)},
        "growth_after_warmup_mib": round((rss_end - rss_warm) / MIB, 2),
        "slope_after_warmup_mib_per_100_calls": None if slope is None else round(slope, 3),
        "curve": [[round(t, 2), n, round(rss / MIB, 1)] for t, n, rss in curve],
    }


def export_tiny(folder: Path) -> Path:
    """`ldmrt export tiny` in a child process, so that this process stays torch-free (lean runtime)."""
    import subprocess

    out = folder / "tiny"
    code = "import sys; from ldmrt.cli import app; sys.argv[0] = 'ldmrt'; app()"
    subprocess.run([sys.executable, "-c", code, "export", "tiny", "--out", str(out),
                    "--components", "text_encoder,unet,vae_decoder", "--min-size", "32", "--opt-size", "32",
                    "--max-size", "64", "--max-batch", "2"],
                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle (default: export tiny to a temp folder)")
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=40, help="calls before the 'after warm-up' RSS")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak_tiny_cpu.json")
    args = parser.parse_args()

    import logging

    import onnxruntime

    logging.basicConfig(level=logging.ERROR)     # the truncated prompt warns on every call; counted instead

    with tempfile.TemporaryDirectory() as temp:
        started = time.perf_counter()
        bundle = args.bundle or export_tiny(Path(temp))
        exported = time.perf_counter() - started
        result = run_soak(bundle, calls=args.calls, threads=args.threads, warmup=args.warmup,
                          steps=args.steps)
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    record = {
        "benchmark": "concurrency soak: one onnxruntime CPU Pipeline, many threads, results vs "
                     "sequential references, RSS over time",
        "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "versions": {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "torch_imported": "torch" in sys.modules,        # the lean runtime's RSS, without torch
        "bundle": {"name": manifest["name"], "source": manifest["source"], "precision": manifest["precision"],
                   "components": sorted(manifest["components"]),
                   "export_seconds": None if args.bundle else round(exported, 1)},
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    ok = result["mismatch_count"] == 0 and result["error_count"] == 0 and result["sequential_repeatable"]
    rss = result["rss_mib"]
    print(f"{args.calls} calls on {args.threads} threads: {result['calls_per_s']} calls/s "
          f"(sequential {result['sequential_calls_per_s']}), mismatches {result['mismatch_count']}, "
          f"errors {result['error_count']}; RSS MiB loaded {rss['loaded']}, after warm-up "
          f"{rss['after_warmup']}, end {rss['end']} (slope {result['slope_after_warmup_mib_per_100_calls']} "
          f"MiB/100 calls) -> {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
