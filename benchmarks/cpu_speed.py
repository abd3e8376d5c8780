"""SD 1.5 UNet step and cold start on this CPU: PyTorch eager vs plain ONNX Runtime vs ldmrt.

    python benchmarks/cpu_speed.py --fp32 out/sd15 --int8 out/sd15-int8 \
        --json benchmarks/results/cpu_speed_sd15.json

Both bundles come from `ldmrt export sd15` (random weights; speed does not depend on their
values), the second with `--precision int8`. Contenders for one UNet call at the CFG batch
(batch 2, 256x256 image = 32x32 latent by default), each in its own spawned process and
interleaved over rounds (A B C D, A B C D, ...) so that a change in machine load hits all alike:

    torch-eager      ldmrt's PyTorch UNet in fp32 (the torch backend, no CUDA graphs): the
                     baseline of every ratio, as in `ldmrt bench`
    ort-fp32-plain   a plain InferenceSession on the exported fp32 graph, default options:
                     what a plain ONNX export gets
    ldmrt-fp32       ldmrt's ONNX Runtime runner on the fp32 bundle
    ldmrt-int8       ldmrt's ONNX Runtime runner on the int8 bundle

Cold start (ldmrt on ONNX Runtime, fresh process): Pipeline.load (sha256 verification on) ->
first image -> second image, with the ORT graph cache cold (its folder is removed first: the
bundle's ort_cache/ or $LDMRT_ORT_CACHE) and warm;
cold-start overhead = load + first image - second image. Loop overhead = (denoising loop -
time inside the UNet) / time inside the UNet, from the second image's timings.
The load average is recorded around every measurement: this machine is shared.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = "ldmrt-cpu-speed/1"
CONTENDERS = ("torch-eager", "ort-fp32-plain", "ldmrt-fp32", "ldmrt-int8")


def measure_unet(contender: str, bundle: str, size: int, batch: int, warmup: int, repeat: int) -> dict:
    """One contender's UNet calls, in this (fresh) process."""
    from ldmrt.bench import summarize
    from ldmrt.iospec import example_inputs
    from ldmrt.manifest import load_manifest

    load_before = os.getloadavg()[0]
    manifest = load_manifest(bundle)
    spec = manifest.component("unet").spec
    latent = size // manifest.config.downsampling_factor
    feeds = example_inputs(manifest.config, spec, {"batch": batch, "latent_height": latent,
                                                    "latent_width": latent}, seed=0)
    start = time.perf_counter()
    if contender == "torch-eager":
        from ldmrt.engines.torch import open_torch
        call = open_torch(Path(bundle), manifest, ("unet",), device="cpu", cuda_graphs=False).runners["unet"]
    elif contender == "ort-fp32-plain":
        import onnxruntime as ort
        session = ort.InferenceSession(str(Path(bundle) / "unet.onnx"), providers=["CPUExecutionProvider"])
        call = lambda x: session.run(None, x)[0]  # noqa: E731
    else:
        from ldmrt.engines.onnxruntime import open_onnxruntime
        call = open_onnxruntime(Path(bundle), manifest, ("unet",))["unet"]
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    output = call(feeds)
    first_s = time.perf_counter() - start
    for _ in range(warmup):
        call(feeds)
    wall, cpu = [], []
    for _ in range(repeat):
        start, cpu_start = time.perf_counter(), time.process_time()
        call(feeds)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return {"contender": contender, "bundle": bundle, "load_s": load_s, "first_call_s": first_s,
            **summarize(wall), "cpu_s_per_call": statistics.median(cpu),
            "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
            "output_finite": bool(np.isfinite(output).all())}


def measure_cold_start(bundle: str, steps: int, size: int, cache_cold: bool) -> dict:
    """Bundle -> first image in this (fresh) process."""
    from ldmrt.engines.ort_cache import cache_folder

    folder = cache_folder(Path(bundle))
    if folder is None:
        raise SystemExit(f"{bundle}: no ONNX Runtime cache folder (read-only bundle or LDMRT_ORT_CACHE=off); "
                         f"the cold-start measurement needs one (or pass --skip-cold-start)")
    if cache_cold:
        shutil.rmtree(folder, ignore_errors=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
    import_s = time.perf_counter() - start
    start = time.perf_counter()
    pipeline = Pipeline.load(bundle, "onnxruntime")
    load_s = time.perf_counter() - start
    request = GenerationRequest(prompt="a photograph of an astronaut riding a horse", steps=steps,
                                seed=0, height=size, width=size)
    start = time.perf_counter()
    pipeline.generate(request)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    second = pipeline.generate(request)
    second_s = time.perf_counter() - start
    timings = second.timings
    return {"bundle": bundle, "cache": "cold" if cache_cold else "warm", "steps": steps, "size": size,
            "import_s": import_s, "load_s": load_s, "first_image_s": first_s, "second_image_s": second_s,
            "cold_start_overhead_s": load_s + first_s - second_s,
            "timings_second_image_s": timings,
            "loop_overhead_fraction": (timings["denoise"] - timings["unet"]) / timings["unet"],
            "loop_overhead_ms_per_step": (timings["denoise"] - timings["unet"]) * 1e3 / steps,
            "load_average_before": load_before, "load_average_after": os.getloadavg()[0]}


def _in_fresh_process(function, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def _parity(bundle: str) -> dict:
    from ldmrt.export.quantize import read_report
    from ldmrt.manifest import load_manifest

    manifest = load_manifest(bundle)
    report = read_report(Path(bundle) / "unet.onnx")
    parity = manifest.component("unet").parity
    return {"precision": manifest.precision.value,
            "manifest_unet_parity": None if parity is None else parity.to_dict(),
            "int8_report": None if report is None else dataclasses.asdict(report)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", required=True, help="bundle from `ldmrt export sd15`")
    parser.add_argument("--int8", required=True, help="bundle from `ldmrt export sd15 --precision int8`")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with CFG)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per contender and round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the contenders")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--cold-steps", type=int, default=20, help="steps of the cold-start images")
    parser.add_argument("--skip-cold-start", action="store_true")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()

    from ldmrt.bench import machine_info, merge_rounds, write_report

    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    bundles = {"torch-eager": args.fp32, "ort-fp32-plain": args.fp32, "ldmrt-fp32": args.fp32,
               "ldmrt-int8": args.int8}
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    for round_index in range(args.rounds):
        for contender in contenders:
            result = _in_fresh_process(measure_unet, contender, bundles[contender], args.size, args.batch,
                                       args.warmup, args.repeat)
            runs[contender].append(result)
            print(f"round {round_index + 1} {contender:15s} median {result['median_ms']:8.0f} ms  "
                  f"(cpu {result['cpu_s_per_call'] * 1e3:6.0f} ms/call, load {result['load_s']:.1f} s, "
                  f"load average {result['load_average_before']:.2f} -> {result['load_average_after']:.2f})",
                  flush=True)
    unet = {}
    for contender, results in runs.items():
        merged = merge_rounds(results)
        unet[contender] = {**merged, "best_round_ms": min(merged["round_medians_ms"]), "rounds": results}
    ratios = {}
    if "torch-eager" in unet:
        base = unet["torch-eager"]
        for contender, row in unet.items():
            ratios[contender] = {"unet_speedup_vs_torch_eager": base["median_ms"] / row["median_ms"],
                                 "per_round": [b / r for b, r in zip(base["round_medians_ms"],
                                                                     row["round_medians_ms"])]}
    if "ort-fp32-plain" in unet:
        for contender, row in unet.items():
            ratios.setdefault(contender, {})["unet_speedup_vs_ort_fp32_plain"] = \
                unet["ort-fp32-plain"]["median_ms"] / row["median_ms"]
    cold = []
    if not args.skip_cold_start:
        for bundle in (args.int8, args.fp32):
            for cache_cold in (True, False):
                result = _in_fresh_process(measure_cold_start, bundle, args.cold_steps, args.size, cache_cold)
                cold.append(result)
                print(f"cold start {Path(bundle).name} cache {result['cache']}: load {result['load_s']:.2f} s, "
                      f"first image {result['first_image_s']:.2f} s, second {result['second_image_s']:.2f} s, "
                      f"overhead {result['cold_start_overhead_s']:.2f} s, loop overhead "
                      f"{result['loop_overhead_fraction'] * 100:.2f}%", flush=True)
    report = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine_info(), "case": {"size": args.size, "unet_batch": args.batch,
                                                  "repeat": args.repeat, "warmup": args.warmup,
                                                  "rounds": args.rounds},
              "unet": unet, "ratios": ratios, "cold_start": cold,
              "parity": {"fp32": _parity(args.fp32), "int8": _parity(args.int8)}}
    for contender, row in ratios.items():
        print(f"{contender:15s} {unet[contender]['median_ms']:8.0f} ms  "
              + "  ".join(f"{k} {v:.2f}x" for k, v in row.items() if isinstance(v, float)))
    if args.json:
        write_report(report, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
