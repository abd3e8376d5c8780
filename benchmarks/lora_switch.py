"""What switching LoRA adapters costs, next to what a re-export costs, on this machine.

    python benchmarks/lora_switch.py [--rounds 3] [--presets tiny,sd15] [--rank 16]

Each round runs, in fresh processes and interleaved: (a) the torch backend's run-time switch
(ldmrt.lora.switch.WeightSwitch: none -> A, A -> B, B -> none) on each preset's model (random
weights; a kohya file of rank `rank` on every attention projection, GEGLU and proj_in/out of the
UNet and on q/k/v/out of the text encoder), and (b) the alternative, `ldmrt export --lora` of the
tiny preset (text encoder, UNet, VAE decoder, validated). Medians over rounds into
benchmarks/results/lora_switch_cpu.json with the machine (CPU model and ISA flags).
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
SWITCH = """
import json, sys, time
import torch
from safetensors.torch import save_file
from ldmrt.lora.choice import LoraChoice
from ldmrt.lora.switch import WeightSwitch
from ldmrt.models import build_model
from ldmrt.presets import PRESETS

preset, rank, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = build_model(PRESETS[preset], seed=0).eval()
suffixes = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
            "q_proj", "k_proj", "v_proj", "out_proj")
prefixes = {"model.diffusion_model.": "lora_unet_", "cond_stage_model.transformer.": "lora_te_"}
paths = []
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
    paths.append(f"{folder}/{preset}-{seed}.safetensors")
    save_file(tensors, paths[-1])
switch, times = WeightSwitch(model), {}
for label, choices in (("none_to_a", [paths[0]]), ("a_to_b", [paths[1]]), ("b_to_none", [])):
    start = time.perf_counter()
    switch.set([LoraChoice(p) for p in choices])
    times[label] = time.perf_counter() - start
times["modules"] = len(tensors) // 3
print(json.dumps(times))
"""


def child(code_or_args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(code_or_args, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{code_or_args[:4]} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--presets", default="tiny,sd15")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora_switch_cpu.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from ldmrt.bench import machine_info

    presets = args.presets.split(",")
    switches = {p: [] for p in presets}
    exports = []
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for preset in presets:
                _, out = child([sys.executable, "-c", SWITCH, preset, str(args.rank), folder])
                switches[preset].append(json.loads(out.strip().splitlines()[-1]))
            lora = f"{folder}/tiny-1.safetensors"
            seconds, _ = child([str(Path(sys.executable).with_name("ldmrt")), "export", "tiny", "--out", f"{folder}/bundle",
                                "--force", "--components", "text_encoder,unet,vae_decoder", "--lora", lora])
            exports.append(seconds)
            print(f"round {round_ + 1}: " + ", ".join(f"{p} {switches[p][-1]}" for p in presets)
                  + f"; tiny export --lora {seconds:.1f} s", flush=True)
    report = {
        "machine": machine_info(), "rounds": args.rounds, "rank": args.rank,
        "switch_s_median": {p: {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "modules"}
                            for p, runs in switches.items()},
        "modules_adapted": {p: runs[0]["modules"] for p, runs in switches.items()},
        "tiny_export_with_lora_s_median": statistics.median(exports),
        "note": "switch: in one process, files read and checked, deltas in float32, weights written in "
                "place; export: a fresh `ldmrt export tiny --lora` process, validated, wall time",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["switch_s_median"]), report["tiny_export_with_lora_s_median"])


if __name__ == "__main__":
    main()
