"""The full-size `sdxl` preset on this machine: export the UNet (fp32, 1024x1024, batch 1) and
time one UNet call on ONNX Runtime CPU at 1024x1024, each in a fresh process; wall time and
peak RSS (the child's ru_maxrss) into benchmarks/results/sdxl_full_size.json with the CPU.

    python benchmarks/sdxl_full_size.py [--out DIR] [--calls N]

Random weights (the preset): the numbers are sizes, memory and time, not images. Needs ~20 GB of
RAM and ~11 GB of disk; takes ~6 minutes to export and ~a minute or more per call on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CALL = """
import json, sys, time
import numpy as np
from ldmrt.iospec import example_inputs
from ldmrt.runtime.pipeline import Pipeline
start = time.perf_counter()
pipeline = Pipeline.load(sys.argv[1], "onnxruntime", components=("unet",), verify=False)
loaded = time.perf_counter() - start
runner = pipeline.runners["unet"]
feeds = example_inputs(pipeline.config, runner.spec, {"batch": 1, "latent_height": 128, "latent_width": 128}, 0)
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    output = runner(feeds)
    times.append(time.perf_counter() - start)
print(json.dumps({"load_s": loaded, "call_s": times, "finite": bool(np.isfinite(output).all())}))
"""


def cpu() -> dict:
    info = {"machine": platform.machine(), "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["model"] = next(l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name"))
        flags = next(l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags"))
        info["flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")))
        info["cores"] = text.count("processor\t:")
    except (OSError, StopIteration):
        pass
    return info


def child(command: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of the children so far, stdout) of one fresh process."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{command[:3]} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/ldmrt-sdxl"), help="bundle folder (replaced)")
    parser.add_argument("--calls", type=int, default=2)
    args = parser.parse_args()
    ldmrt = str(Path(sys.executable).with_name("ldmrt"))
    export_s, export_rss, _ = child([ldmrt, "export", "sdxl", "--out", str(args.out), "--force",
                                     "--components", "unet", "--no-validate", "--min-size", "1024",
                                     "--opt-size", "1024", "--max-size", "1024", "--max-batch", "1"])
    files = {p.name: p.stat().st_size for p in args.out.iterdir()}
    call_wall, call_rss, stdout = child([sys.executable, "-c", CALL, str(args.out), str(args.calls)])
    report = {"cpu": cpu(), "preset": "sdxl", "component": "unet", "precision": "fp32",
              "export": {"seconds": round(export_s, 1), "peak_rss_gib": round(export_rss / 2 ** 30, 2),
                         "files_bytes": files, "options": "--components unet --no-validate, 1024 px, batch 1"},
              "onnxruntime_cpu_call": {**json.loads(stdout.strip().splitlines()[-1]),
                                       "process_seconds": round(call_wall, 1),
                                       "peak_rss_gib_of_all_children": round(call_rss / 2 ** 30, 2),
                                       "inputs": "batch 1, 128x128 latents (1024x1024 px), no guidance"}}
    out = ROOT / "benchmarks" / "results" / "sdxl_full_size.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
