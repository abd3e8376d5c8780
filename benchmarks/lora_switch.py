"""What switching LoRA adapters costs at run time, on torch and ONNX Runtime, next to a re-export.

    python benchmarks/lora_switch.py [--rounds 3] [--presets tiny,sd15] [--rank 16] [--export-timeout 360]

Once per preset, untimed except for the export's wall time: two random kohya files of rank `rank`
(seeds 1 and 2) on every attention projection, GEGLU and proj_in/out of the UNet and q/k/v/out of
the text encoder, and a plain bundle (`ldmrt export PRESET --components text_encoder,unet,
vae_decoder`, validated; a preset whose export runs past `export_timeout` seconds is left out and
the report says so). Then each round runs, in fresh processes and interleaved, for each preset and
backend (torch, onnxruntime): `Pipeline.load(bundle, backend)` and `pipeline.loras.set` none -> A,
A -> B, B -> none, each switch timed whole (files read and checked, deltas, weights written in
place / ONNX Runtime sessions opened with replaced initializers); and the alternative, a fresh
`ldmrt export tiny --lora A` process (validated, wall time). Medians over the rounds into
benchmarks/results/lora_switch_cpu.json with the machine (CPU model, ISA flags, every lscpu flag,
load average).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("torch", "onnxruntime")
COMPONENTS = "text_encoder,unet,vae_decoder"
WRITE = """
import json, sys
import torch
from safetensors.torch import save_file
from ldmrt.models import build_model
from ldmrt.presets import PRESETS

preset, rank, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = build_model(PRESETS[preset], seed=0).eval()
suffixes = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
            "q_proj", "k_proj", "v_proj", "out_proj")
prefixes = {"model.diffusion_model.": "lora_unet_", "cond_stage_model.transformer.": "lora_te_"}
for seed in (1, 2):
    g, tensors = torch.Generator().manual_seed(seed), {}
    for name, module in model.named_modules():
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None or not name.endswith(suffixes) or not hasattr(module, "weight"):
            continue
        key = prefixes[prefix] + name[len(prefix):].replace(".", "_")
        out, inp = module.weight.shape[:2]
        tail = (1, 1) if module.weight.dim() == 4 else ()
        tensors[key + ".lora_down.weight"] = torch.randn(rank, inp, *tail, generator=g) * 0.01
        tensors[key + ".lora_up.weight"] = torch.randn(out, rank, *tail, generator=g) * 0.01
        tensors[key + ".alpha"] = torch.tensor(float(rank))
    save_file(tensors, f"{folder}/{preset}-{seed}.safetensors")
print(json.dumps({"modules": len(tensors) // 3}))
"""
SWITCH = """
import json, sys, time
from ldmrt.bench import peak_rss_mib
from ldmrt.lora.choice import LoraChoice
from ldmrt.runtime.pipeline import Pipeline

bundle, backend, a, b = sys.argv[1:5]
start = time.perf_counter()
pipeline = Pipeline.load(bundle, backend)
times = {"load": time.perf_counter() - start, "peak_rss_mib_loaded": peak_rss_mib()}
for label, choices in (("none_to_a", [a]), ("a_to_b", [b]), ("b_to_none", [])):
    start = time.perf_counter()
    pipeline.loras.set([LoraChoice(p) for p in choices])
    times[label] = time.perf_counter() - start
assert pipeline.loras.active == ()
times["peak_rss_mib"] = peak_rss_mib()
print(json.dumps(times))
"""
MEASURES = ("none_to_a", "a_to_b", "b_to_none", "load")


def child(args: list[str], timeout: float | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    if done.returncode:
        raise SystemExit(f"{args[:4]} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, done.stdout


def lscpu_flags() -> list[str]:
    """`lscpu`'s Flags line (the same list as /proc/cpuinfo's flags); [] without lscpu."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("Flags:")), [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--presets", default="tiny,sd15")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--export-timeout", type=float, default=360.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora_switch_cpu.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from ldmrt.bench import machine_info, write_report

    ldmrt = str(Path(sys.executable).with_name("ldmrt"))
    python = [sys.executable, "-c"]
    presets, modules, plain_export, left_out = args.presets.split(","), {}, {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for preset in list(presets):
            _, out = child(python + [WRITE, preset, str(args.rank), folder])
            modules[preset] = json.loads(out.strip().splitlines()[-1])["modules"]
            try:
                plain_export[preset], _ = child([ldmrt, "export", preset, "--out", f"{folder}/{preset}",
                                                 "--components", COMPONENTS], timeout=args.export_timeout)
            except subprocess.TimeoutExpired:
                presets.remove(preset)
                left_out[preset] = (f"its export ({COMPONENTS}) ran past {args.export_timeout:.0f} s here; "
                                    f"left out")
                continue
            print(f"{preset}: {modules[preset]} modules adapted; plain export {plain_export[preset]:.1f} s",
                  flush=True)
        runs = {p: {b: [] for b in BACKENDS} for p in presets}
        exports = []
        for round_ in range(args.rounds):
            for preset in presets:
                files = [f"{folder}/{preset}-{seed}.safetensors" for seed in (1, 2)]
                for backend in BACKENDS:
                    _, out = child(python + [SWITCH, f"{folder}/{preset}", backend, *files])
                    runs[preset][backend].append(json.loads(out.strip().splitlines()[-1]))
            seconds, _ = child([ldmrt, "export", "tiny", "--out", f"{folder}/tiny-fused", "--force",
                                "--components", COMPONENTS, "--lora", f"{folder}/tiny-1.safetensors"])
            exports.append(seconds)
            print(f"round {round_ + 1}: " + "; ".join(
                f"{p} {b} " + ", ".join(f"{k} {runs[p][b][-1][k]:.3f}" for k in MEASURES)
                for p in presets for b in BACKENDS) + f"; tiny export --lora {seconds:.1f} s", flush=True)
    machine = machine_info()
    machine["lscpu_flags"] = lscpu_flags()
    report = {
        "schema": "ldmrt-lora-switch/2", "machine": machine, "rounds": args.rounds, "rank": args.rank,
        "switch_s_median": {p: {b: {k: statistics.median(r[k] for r in rs) for k in MEASURES}
                                for b, rs in by_backend.items()} for p, by_backend in runs.items()},
        "switch_s_per_round": runs,
        "peak_rss_mib_max": {p: {b: max(r["peak_rss_mib"] for r in rs) for b, rs in by_backend.items()}
                             for p, by_backend in runs.items()},
        "modules_adapted": modules,
        "plain_export_s_once": plain_export,
        "tiny_export_with_lora_s_median": statistics.median(exports),
        "left_out": left_out,
        "note": "switch: Pipeline.load(bundle, backend).loras.set in a fresh process per round and backend, "
                "each switch whole (files read and checked, deltas in float32, torch: weights written in place, "
                "the first switch also keeps the bases; onnxruntime: sessions opened with the replaced "
                "initializers, the first switch also reads the graphs' weight records and bases); load: "
                "Pipeline.load; export: a fresh `ldmrt export tiny --lora` process per round, validated, wall "
                "time; plain_export_s_once: the setup's one `ldmrt export PRESET` (validated, no adapters)",
    }
    write_report(report, args.out, "--out")
    print(json.dumps(report["switch_s_median"], indent=1), report["tiny_export_with_lora_s_median"])


if __name__ == "__main__":
    main()
