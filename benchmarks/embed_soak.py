"""Issue 21's soak: libldmrt (the C ABI) generating from C, next to the same loop in Python.

    python benchmarks/embed_soak.py                       # 3 rounds, 200 generations, 4 threads x 8
    python benchmarks/embed_soak.py --rounds 5 --count 400 --out /tmp/embed_soak.json

Builds libldmrt against this interpreter and tests/embed/probe.c against it, exports the built-in
`digits` bundle, then runs per round, each in a fresh process, interleaved:

- `c-soak`: `probe soak BUNDLE COUNT`, COUNT generations through ldmrt_generate (10 steps, seeds 1..N,
  two prompts alternating, each image also encoded as PNG with ldmrt_result_png, every result freed);
  the process's RSS after the 1st and every 10th generation, and the seconds;
- `python-soak`: the same requests through `Pipeline.generate` + `png_bytes` in a plain Python process
  (what the ABI adds over calling the runtime from Python);
- `c-threads`: `probe threads BUNDLE 4 8`, 32 requests sequentially and then from 4 C threads on one
  pipeline (every threaded image must equal its sequential one; the probe exits 1 otherwise).

Reports medians over rounds, RSS growth from generation 20 to COUNT (the warm-up is over by 20), and
the machine with every CPU flag. Writes benchmarks/results/embed_soak_cpu.json unless --out says
otherwise. Needs cc (gcc), Python's headers and a shared libpython (`ldmrt embed` says what is missing).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "embed" / "probe.c"
PROMPTS = ("a red 7 on a white background", "a blue 3 on a yellow background")   # probe.c's, by seed parity
STEPS = 10

# The python-soak contender: argv = bundle, count; prints "rss I KIB SECONDS" lines as the probe does.
PYTHON_SOAK = f"""
import sys, time
from pathlib import Path
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
from ldmrt.runtime.images import png_bytes, to_pixels
def rss_kib():
    import os
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
prompts = {PROMPTS!r}
pipeline = Pipeline.load(Path(sys.argv[1]), "onnxruntime")
start = time.perf_counter()
for i in range(1, int(sys.argv[2]) + 1):
    result = pipeline.generate(GenerationRequest(prompt=prompts[i % 2], seed=i, steps={STEPS}, guidance=7.5))
    png_bytes(to_pixels(result.images[0]))
    if i % 10 == 0 or i == 1:
        print(f"rss {{i}} {{rss_kib()}} {{time.perf_counter() - start:.3f}}", flush=True)
"""


def child(args: list[str], timeout: float) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise SystemExit(f"{[str(a) for a in args[:3]]} exited {done.returncode}:\n{done.stdout[-2000:]}\n"
                         f"{done.stderr[-2000:]}")
    return time.perf_counter() - start, done.stdout


def soak_record(stdout: str, count: int, wall: float) -> dict:
    """The probe's (or the Python loop's) "rss I KIB SECONDS" lines -> curve, growth, seconds."""
    curve = [(int(i), int(kib), float(s)) for i, kib, s in re.findall(r"^rss (\d+) (\d+) ([\d.]+)", stdout,
                                                                      re.MULTILINE)]
    if not curve or curve[-1][0] != count:
        raise SystemExit(f"soak printed no RSS line for generation {count}:\n{stdout[-2000:]}")
    by_index = {i: kib for i, kib, _ in curve}
    warm = min(20, count)
    return {"generations": count, "seconds": curve[-1][2], "process_wall_s": round(wall, 3),
            "ms_per_generation": round(1000 * curve[-1][2] / count, 2),
            "rss_kib_first": curve[0][1], "rss_kib_at_20": by_index[warm], "rss_kib_last": curve[-1][1],
            "rss_growth_kib_20_to_last": curve[-1][1] - by_index[warm],
            "rss_curve_kib": [[i, kib] for i, kib, _ in curve]}


def threads_record(stdout: str) -> dict:
    found = re.search(r"threads (\d+) x (\d+): (\d+) differ .*sequential ([\d.]+) s, threaded ([\d.]+) s", stdout)
    if found is None:
        raise SystemExit(f"probe threads printed no summary:\n{stdout[-2000:]}")
    threads, requests, differ, sequential, threaded = found.groups()
    return {"threads": int(threads), "requests_per_thread": int(requests), "differing_images": int(differ),
            "sequential_s": float(sequential), "threaded_s": float(threaded),
            "speedup": round(float(sequential) / float(threaded), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=200, help="generations per soak process")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8, help="requests per thread")
    parser.add_argument("--bundle", type=Path, help="a digits bundle (default: exported into a temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "embed_soak_cpu.json")
    args = parser.parse_args()
    if args.rounds < 1 or args.count < 20 or args.threads < 1 or args.requests < 1:
        parser.error("--rounds, --threads and --requests must be >= 1 and --count >= 20")
    sys.path.insert(0, str(ROOT))
    from ldmrt.bench import machine_info, write_report
    from ldmrt.embed.info import abi_version, build_library, cflags, libs

    ldmrt = Path(sys.executable).with_name("ldmrt")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        library_dir = folder / "lib"
        library_dir.mkdir()
        build_library(library_dir)
        probe = folder / "probe"
        child(["cc", "-std=c99", "-O2", "-D_POSIX_C_SOURCE=200809L", *cflags(), PROBE, "-o", probe,
               *libs(library_dir)], timeout=300)
        bundle = args.bundle
        if bundle is None:
            bundle = folder / "digits"
            child([ldmrt, "export", "digits", "--out", bundle], timeout=900)
        runs: dict[str, list[dict]] = {"c-soak": [], "python-soak": [], "c-threads": []}
        for round_ in range(args.rounds):
            wall, out = child([probe, "soak", bundle, args.count], timeout=3600)
            runs["c-soak"].append(soak_record(out, args.count, wall))
            wall, out = child([sys.executable, "-c", PYTHON_SOAK, bundle, args.count], timeout=3600)
            runs["python-soak"].append(soak_record(out, args.count, wall))
            _, out = child([probe, "threads", bundle, args.threads, args.requests], timeout=3600)
            runs["c-threads"].append(threads_record(out))
            print(f"round {round_ + 1}: " + "; ".join(
                f"{name} {r[-1]['seconds']:.2f} s, RSS +{r[-1]['rss_growth_kib_20_to_last']} KiB"
                for name, r in runs.items() if name.endswith("soak"))
                + f"; threads sequential {runs['c-threads'][-1]['sequential_s']:.2f} s, "
                  f"threaded {runs['c-threads'][-1]['threaded_s']:.2f} s", flush=True)
    median = statistics.median
    report = {
        "schema": "ldmrt-embed-soak/1", "machine": machine_info(), "abi_version": abi_version(),
        "rounds": args.rounds, "generations_per_soak": args.count, "steps": STEPS, "backend": "onnxruntime",
        "model": "digits (32x32, guidance 7.5)",
        "median": {
            "c_soak_s": median(r["seconds"] for r in runs["c-soak"]),
            "python_soak_s": median(r["seconds"] for r in runs["python-soak"]),
            "c_over_python": round(median(c["seconds"] / p["seconds"]
                                          for c, p in zip(runs["c-soak"], runs["python-soak"])), 3),
            "c_rss_growth_kib_20_to_last": median(r["rss_growth_kib_20_to_last"] for r in runs["c-soak"]),
            "python_rss_growth_kib_20_to_last": median(r["rss_growth_kib_20_to_last"] for r in runs["python-soak"]),
            "threads_sequential_s": median(r["sequential_s"] for r in runs["c-threads"]),
            "threads_threaded_s": median(r["threaded_s"] for r in runs["c-threads"]),
            "threads_speedup": median(r["speedup"] for r in runs["c-threads"]),
        },
        "runs": runs,
    }
    write_report(report, args.out)
    print(json.dumps(report["median"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
