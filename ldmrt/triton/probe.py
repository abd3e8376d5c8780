"""Liveness probe for ldmrt's pipeline model: can every instance still make an image?

`/v2/health/ready` and the model's ready endpoint stay 200 when a pipeline instance's stub process
has died (killed, out of memory): Triton 2.51 never restarts it, and every request that instance
takes fails with "Stub process ... is not healthy". This probe asks what readiness does not: it
sends the cheapest real request (1 step, the smallest image, no guidance) once per instance per
round, all instances at once, and fails unless every answer is an image. Standard library only,
so it runs in any container; `ldmrt triton` ships a copy as REPO/<prefix>pipeline/probe.py:

    python3 /models/pipeline/probe.py --url 127.0.0.1:8000 --model pipeline --timeout 20

Exit 0: every request answered with an image; 1: the pipeline cannot answer (the line says why);
2: bad arguments. The whole probe is bounded by --timeout. Recovery (docs/triton.md): restart the
server (a failing Kubernetes liveness probe does that), or, with --model-control-mode=explicit,
reload the model: POST /v2/repository/models/<model>/load restarts its stubs.
"""
from __future__ import annotations

import argparse
import array
import http.client
import json
import math
import sys
import threading
import time
from dataclasses import dataclass


class ProbeFailure(Exception):
    """The pipeline model did not answer the probe with an image."""


@dataclass(frozen=True)
class ProbeResult:
    requests: int
    instances: int
    seconds: float


def instance_count(config: dict) -> int:
    """Execution instances a model config declares: each group's `count` on each GPU it lists
    (Triton puts `count` instances on every GPU of `gpus`), at least 1."""
    return sum(int(group.get("count", 1)) * max(1, len(group.get("gpus") or ()))
               for group in config.get("instance_group", [])) or 1


def probe(url: str, model: str = "pipeline", timeout: float = 20.0, rounds: int = 2) -> ProbeResult:
    """Send `rounds` x (instances) minimal requests, one per instance at a time; ProbeFailure
    naming the first failure unless every one returns an image, within `timeout` seconds."""
    start = time.monotonic()
    deadline = start + timeout
    try:
        config = _call(url, "GET", f"/v2/models/{model}/config", None, deadline)[0]
    except (OSError, ValueError) as exc:
        raise ProbeFailure(f"{model}: no model configuration from {url}: {type(exc).__name__}: {exc}") from None
    instances = instance_count(config)
    limits = json.loads(config.get("parameters", {}).get("limits", {}).get("string_value", "{}") or "{}")
    height = (limits.get("height") or [None])[0]
    width = (limits.get("width") or [None])[0]
    body = _request_body(height, width)
    failures: list[str] = []
    for _ in range(rounds):
        threads = [threading.Thread(target=_one, args=(url, model, body, deadline, failures), daemon=True)
                   for _ in range(instances)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            raise ProbeFailure(f"{model}: no answer within {timeout:g} s (a request may be stuck on a "
                               f"dead stub process)")
        if failures:
            raise ProbeFailure(f"{model}: {failures[0]}")
    return ProbeResult(rounds * instances, instances, time.monotonic() - start)


def _request_body(height: int | None, width: int | None) -> bytes:
    inputs = [{"name": "steps", "datatype": "INT32", "shape": [1], "data": [1]},
              {"name": "guidance", "datatype": "FP32", "shape": [1], "data": [1.0]}]
    for name, value in (("height", height), ("width", width)):
        if value:
            inputs.append({"name": name, "datatype": "INT32", "shape": [1], "data": [int(value)]})
    outputs = [{"name": "images", "parameters": {"binary_data": True}}]
    return json.dumps({"inputs": inputs, "outputs": outputs}).encode()


def _one(url: str, model: str, body: bytes, deadline: float, failures: list[str]) -> None:
    try:
        header, data = _call(url, "POST", f"/v2/models/{model}/infer", body, deadline)
        (output,) = [o for o in header.get("outputs", []) if o.get("name") == "images"]
        shape = output["shape"]
        values = array.array("f")
        values.frombytes(data[:output["parameters"]["binary_data_size"]])
        if len(shape) != 4 or shape[3] != 3 or len(values) != math.prod(shape):
            raise ProbeFailure(f"images of shape {shape} with {len(values)} values")
        if not all(math.isfinite(v) for v in values):
            raise ProbeFailure("the image has non-finite pixels")
    except (ProbeFailure, OSError, ValueError, KeyError) as exc:
        failures.append(f"{type(exc).__name__}: {exc}" if not isinstance(exc, ProbeFailure) else str(exc))


def _call(url: str, method: str, path: str, body: bytes | None, deadline: float) -> tuple[dict, bytes]:
    """(JSON header, binary tail) of one HTTP call; ProbeFailure on a non-200 answer."""
    host, _, port = url.removeprefix("http://").partition(":")
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ProbeFailure("out of time")
    connection = http.client.HTTPConnection(host, int(port or 80), timeout=remaining)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        split = response.getheader("Inference-Header-Content-Length")
    finally:
        connection.close()
    header_bytes, tail = (payload[:int(split)], payload[int(split):]) if split else (payload, b"")
    header = json.loads(header_bytes or b"{}")
    if response.status != 200:
        raise ProbeFailure(f"HTTP {response.status} from {method} {path}: {header.get('error', header)}")
    return header, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probe.py", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="Triton's HTTP address")
    parser.add_argument("--model", default="pipeline")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds for the whole probe")
    parser.add_argument("--rounds", type=int, default=2, help="requests per instance")
    args = parser.parse_args(argv)
    if not args.timeout > 0 or args.rounds < 1:
        parser.error("--timeout must be > 0 and --rounds >= 1")
    try:
        result = probe(args.url, args.model, args.timeout, args.rounds)
    except ProbeFailure as exc:
        sys.stderr.write(f"probe failed: {exc}\n")
        return 1
    sys.stdout.write(f"ok: {args.model} made {result.requests} images on {result.instances} "
                     f"instance(s) in {result.seconds:.2f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
