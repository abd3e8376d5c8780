"""Bounded load test of the generated Triton repository on this machine (CPU, localhost only).

For 1 and 2 instances of the pipeline model (1 instance twice: all cores, one thread): start PyTriton's tritonserver on 127.0.0.1, send a
fixed number of identical requests (HTTP, then gRPC) from a fixed number of client threads,
stop at the count or the time limit, and record requests/s and p50/p90/p99 latency. The same
request run in-process through the Pipeline API (one at a time, with as many onnxruntime
threads as each server instance gets) is the reference for what serving adds.

    python benchmarks/triton_load.py [--bundle DIR] [--out benchmarks/results/triton_load_cpu.json]

Needs the environment of scripts/triton_env.sh (LDMRT_TRITON_ENV or ~/.cache/ldmrt/triton-env).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldmrt.bench import machine_info, write_report  # noqa: E402
from ldmrt.manifest import utc_now  # noqa: E402
from ldmrt.triton.config import InstanceGroup, InstanceKind  # noqa: E402
from ldmrt.triton.repository import PipelineModelOptions, RepositoryOptions, write_repository  # noqa: E402
from ldmrt.triton.server import TritonEnvironment, TritonServer  # noqa: E402


def export_tiny(folder: Path) -> Path:
    from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source

    out = folder / "tiny"
    export_bundle(preset_source("tiny"), out, ExportOptions(validate=False))
    return out


def in_process(bundle: Path, request: dict, repeat: int, threads: int) -> dict:
    """The same request through the Pipeline API, sequentially: the no-server reference."""
    from ldmrt.runtime.pipeline import GenerationRequest, Pipeline

    pipeline = Pipeline.load(bundle, threads=threads)
    fields = dict(request)
    prompts = fields.pop("prompt", [""])
    generation = GenerationRequest(prompt=prompts[0], **fields)
    pipeline.generate(generation)                       # warm-up
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        pipeline.generate(generation)
        seconds.append(time.perf_counter() - start)
    ms = sorted(s * 1e3 for s in seconds)
    return {"requests": repeat, "onnxruntime_threads": threads, "latency_ms": {
            "p50": statistics.median(ms), "min": ms[0], "max": ms[-1]},
            "requests_per_second": repeat / sum(seconds), "load_average_after": os.getloadavg()}


def serve_and_load(env: TritonEnvironment, bundle: Path, work: Path, instances: int, threads: int,
                   request: dict, args) -> dict:
    repo = work / f"repo-{instances}x{threads}"
    cpu = InstanceGroup(instances, InstanceKind.CPU)
    write_repository(bundle, repo, RepositoryOptions(
        instances=InstanceGroup(1, InstanceKind.CPU),
        pipeline=PipelineModelOptions(instances=cpu, threads=threads), force=True))
    runs = []
    with TritonServer(env, repo, work / f"server-{instances}x{threads}") as server:
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            result = env.run_module("ldmrt.triton.client", [
                "load", "--url", url, "--protocol", protocol, "--request", json.dumps(request),
                "--count", str(args.count), "--concurrency", str(args.concurrency),
                "--max-seconds", str(args.max_seconds), "--warmup", str(args.warmup)],
                timeout=args.max_seconds + 120)
            if result.returncode != 0:
                raise SystemExit(f"load run failed ({protocol}, {instances} instances):\n"
                                 f"{result.stdout}\n{result.stderr}\n{server.log_tail()}")
            runs.append({**json.loads(result.stdout), "load_average_after": os.getloadavg()})
            print(f"{instances} instance(s) x {threads} thread(s), {protocol}: {runs[-1]['requests_per_second']:.2f} req/s, "
                  f"p50 {runs[-1]['latency_ms']['p50']:.0f} ms, p99 {runs[-1]['latency_ms']['p99']:.0f} ms",
                  file=sys.stderr)
    return {"instances": instances, "onnxruntime_threads_per_instance": threads, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="default: export the tiny preset (random weights)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "triton_load_cpu.json")
    parser.add_argument("--count", type=int, default=20, help="requests per run (after warm-up)")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop a run after this")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    args = parser.parse_args()

    env = TritonEnvironment.locate()
    cores = os.cpu_count() or 1
    request = {"prompt": ["a red fox in the snow"], "steps": args.steps, "seed": 1, "height": args.size,
               "width": args.size, "sampler": "ddim", "guidance": 7.5}
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ldmrt-triton-load-") as temp:
        work = Path(temp)
        start = time.perf_counter()
        bundle = args.bundle or export_tiny(work)
        reference = [in_process(bundle, request, repeat=5, threads=t) for t in sorted({cores, 1})]
        # 1 instance with all cores, 1 instance with one thread (onnxruntime's intra-op threads
        # lose badly when the machine is oversubscribed), 2 instances with a share each.
        shapes = list(dict.fromkeys([(1, cores), (1, 1), (2, max(1, cores // 2))]))
        configs = [serve_and_load(env, bundle, work, n, threads, request, args) for n, threads in shapes]
        total = time.perf_counter() - start
    report = {
        "schema": "ldmrt.triton_load/1", "created": utc_now(),
        "machine": {**machine_info(), "accelerator": "none (CPU only)"},
        "server": {"tritonserver": "nvidia-pytriton 0.7.0 (tritonserver 2.51.0, Python backend)",
                   "environment_python": env.python_version, "address": "127.0.0.1"},
        "bundle": "tiny preset (random weights), fp32, onnxruntime CPU" if args.bundle is None else str(args.bundle),
        "request": request, "count_per_run": args.count, "client_concurrency": args.concurrency,
        "warmup_per_run": args.warmup, "in_process_pipeline": reference, "triton": configs,
        "seconds_total": total, "load_average_at_start": load_at_start,
        "note": "the machine is shared: load_average_* is the 1/5/15-minute load when each run ended; "
                "with a load above the core count the numbers are lower bounds. Instances split the "
                "cores (onnxruntime intra-op threads = cores / instances).",
    }
    write_report(report, args.out)
    print(f"wrote {args.out} ({total:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
