"""Send requests to the generated pipeline model with tritonclient, over HTTP or gRPC.

Runs where tritonclient is installed (the environment of scripts/triton_env.sh):

    python -m ldmrt.triton.client generate --http 127.0.0.1:8000 --grpc 127.0.0.1:8001 \\
        --requests requests.json --out images.npz          # concurrent, one file of images;
                                                           # stdout: seconds and warnings per request
    python -m ldmrt.triton.client load --url 127.0.0.1:8000 --protocol http \\
        --request '{"prompt": ["a fox"], "steps": 4}' --count 20 --concurrency 2   # bounded load

A request is a JSON object with the pipeline model's inputs (ldmrt/triton/pipeline_io.py):
prompt (list), negative_prompt, steps, guidance, sampler, seed, height, width; SDXL's size ids
(original_size [h, w], crops_coords_top_left, target_size, aesthetic_score, ...); the hand-off's
denoising_end, denoising_start and init_latents (nested lists [N, C, h, w]); lora (a list of
"NAME" or "NAME:SCALE", the repository's adapters; see docs/triton.md); in `generate` also
"protocol": "http" | "grpc". `generate` writes images_<i> and latents_<i> (with denoising_end,
latents alone) into the .npz.
Each worker thread has its own client (tritonclient clients are not shared across threads).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ldmrt.triton.pipeline_io import EVERY_INPUT, IMAGES, LATENTS, WARNINGS

_NUMPY = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32}


def _client_type(data_type: str) -> str:
    """config.pbtxt's TYPE_INT32 -> the client's INT32 (TYPE_STRING -> BYTES)."""
    name = data_type.removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


INPUTS = {  # name -> (Triton datatype, numpy dtype)
    name: (_client_type(tensor.data_type), _NUMPY[_client_type(tensor.data_type)])
    for name, tensor in EVERY_INPUT.items()}


@dataclass(frozen=True)
class Reply:
    images: np.ndarray | None   # [N, H, W, 3] in [0, 1]; None with denoising_end
    latents: np.ndarray | None  # [N, C, h, w]: GenerationResult.latents
    warnings: list[str]


def protocol_module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol {protocol!r}: expected http or grpc")
    return module


class Clients:
    """One tritonclient client per (thread, protocol)."""

    def __init__(self, urls: Mapping[str, str], timeout: float):
        self.urls, self.timeout, self.local = dict(urls), timeout, threading.local()

    def get(self, protocol: str):
        clients = self.local.__dict__.setdefault("clients", {})
        if protocol not in clients:
            module = protocol_module(protocol)
            if protocol == "http":
                clients[protocol] = module.InferenceServerClient(
                    self.urls[protocol], connection_timeout=self.timeout, network_timeout=self.timeout)
            else:
                clients[protocol] = module.InferenceServerClient(self.urls[protocol])
        return clients[protocol]


def infer(clients: Clients, protocol: str, model: str, request: Mapping[str, Any]) -> Reply:
    """One pipeline request: its images, latents and warnings (tritonclient raises on an error
    response)."""
    module = protocol_module(protocol)
    inputs = []
    for name, value in request.items():
        if name == "protocol":
            continue
        datatype, dtype = INPUTS[name]
        values = value if isinstance(value, (list, np.ndarray)) else [value]
        array = np.array([v.encode("utf-8") for v in values] if dtype is np.object_ else values, dtype=dtype)
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [module.InferRequestedOutput(name) for name in (IMAGES, LATENTS, WARNINGS)]
    kwargs = {"client_timeout": clients.timeout} if protocol == "grpc" else {}
    result = clients.get(protocol).infer(model, inputs, outputs=outputs, **kwargs)
    warnings = result.as_numpy(WARNINGS)
    return Reply(result.as_numpy(IMAGES), result.as_numpy(LATENTS), [] if warnings is None else
                 [w.decode("utf-8") if isinstance(w, bytes) else str(w) for w in warnings.reshape(-1)])


def generate(urls: Mapping[str, str], model: str, requests: list[dict], concurrency: int,
             timeout: float) -> tuple[list[Reply], list[float]]:
    """Send `requests` (each with its "protocol") from `concurrency` threads; replies and seconds."""
    clients = Clients(urls, timeout)

    def one(request: dict) -> tuple[Reply, float]:
        start = time.perf_counter()
        reply = infer(clients, request.get("protocol", "http"), model, request)
        return reply, time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, requests))
    return [reply for reply, _ in results], [seconds for _, seconds in results]


def load(url: str, protocol: str, model: str, request: dict, count: int, concurrency: int,
         max_seconds: float, warmup: int, timeout: float) -> dict[str, Any]:
    """`count` identical requests (fewer if `max_seconds` runs out) from `concurrency` threads:
    requests/s and latency percentiles. Warm-up requests are sent first and not counted."""
    clients = Clients({protocol: url}, timeout)
    for _ in range(warmup):
        infer(clients, protocol, model, request)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    issued = [0]
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        while True:
            with lock:
                if issued[0] >= count or time.monotonic() >= deadline:
                    return
                issued[0] += 1
            start = time.perf_counter()
            try:
                infer(clients, protocol, model, request)
                with lock:
                    latencies.append(time.perf_counter() - start)
            except Exception as exc:  # recorded, not fatal: the report counts errors
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {"protocol": protocol, "concurrency": concurrency, "requests": len(latencies),
            "errors": len(errors), "first_error": errors[0] if errors else None,
            "seconds": wall, "requests_per_second": len(latencies) / wall if wall else 0.0,
            "latency_ms": {"p50": float(np.percentile(ms, 50)) if ms.size else None,
                           "p90": float(np.percentile(ms, 90)) if ms.size else None,
                           "p99": float(np.percentile(ms, 99)) if ms.size else None,
                           "mean": float(ms.mean()) if ms.size else None,
                           "max": float(ms.max()) if ms.size else None}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldmrt.triton.client", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pipeline")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="concurrent requests; images to an .npz")
    gen.add_argument("--http", required=True)
    gen.add_argument("--grpc", required=True)
    gen.add_argument("--requests", required=True, help="JSON file: a list of requests")
    gen.add_argument("--concurrency", type=int, default=4)
    gen.add_argument("--out", required=True, help=".npz: images_0, latents_0, images_1, ...")
    bench = sub.add_parser("load", help="bounded load: requests/s, p50/p99 latency as JSON")
    bench.add_argument("--url", required=True)
    bench.add_argument("--protocol", choices=("http", "grpc"), default="http")
    bench.add_argument("--request", required=True, help="one request as JSON")
    bench.add_argument("--count", type=int, default=20)
    bench.add_argument("--concurrency", type=int, default=2)
    bench.add_argument("--max-seconds", type=float, default=60.0)
    bench.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "generate":
        with open(args.requests) as handle:
            requests = json.load(handle)
        replies, seconds = generate({"http": args.http, "grpc": args.grpc}, args.model, requests,
                                    args.concurrency, args.timeout)
        np.savez(args.out, **{f"{name}_{i}": array for i, reply in enumerate(replies)
                              for name, array in ((IMAGES, reply.images), (LATENTS, reply.latents))
                              if array is not None})
        sys.stdout.write(json.dumps({"seconds": seconds,
                                     "warnings": [reply.warnings for reply in replies]}) + "\n")
        return 0
    report = load(args.url, args.protocol, args.model, json.loads(args.request), args.count,
                  args.concurrency, args.max_seconds, args.warmup, args.timeout)
    sys.stdout.write(json.dumps(report) + "\n")
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
