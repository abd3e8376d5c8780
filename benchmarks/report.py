"""Turn recorded `ldmrt bench --json` files into the README table and a latency plot.

    python benchmarks/report.py benchmarks/results/bench_*.json   # prints markdown, writes latency.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rows(report: dict) -> list[dict]:
    ratios = {(r["contender"], r["case"]["size"], r["case"]["batch"]): r for r in report.get("ratios", [])}
    out = []
    for result in report["results"]:
        if result["status"] != "ok":
            out.append({"bundle": report["bundle"]["name"], "contender": result["contender"],
                        "error": result["error"]})
            continue
        for case in result["cases"]:
            key = (result["contender"], case["case"]["size"], case["case"]["batch"])
            unet = case.get("components", {}).get("unet") or case.get("unet") or {}
            rounds = result.get("rounds", 1)
            precision = report["bundle"]["precision"] + ("" if rounds == 1 else f", {rounds} rounds")
            out.append({"bundle": report["bundle"]["name"], "precision": precision,
                        "contender": result["contender"], "size": case["case"]["size"],
                        "batch": case["case"]["batch"], "steps": case["case"]["steps"],
                        "e2e_ms": case["end_to_end"]["median_ms"], "p90_ms": case["end_to_end"]["p90_ms"],
                        "unet_ms": unet.get("median_ms"), "overhead": case.get("loop_overhead_fraction"),
                        # files written before the basis was recorded: torch's fused loop was estimated
                        "estimated": case.get("loop_overhead_basis",
                                              "estimated" if result["contender"].startswith("torch") else "timed")
                        == "estimated",
                        "speedup": ratios.get(key, {}).get("end_to_end_speedup"),
                        "unet_speedup": ratios.get(key, {}).get("unet_speedup"),
                        "rss": result.get("peak_rss_mib")})
    return out


def markdown(all_rows: list[dict]) -> str:
    lines = ["| model | contender | size | batch | steps | end-to-end ms (p90) | UNet ms | loop overhead | "
             "vs torch-eager (e2e / UNet) | peak RSS MiB |", "|---" * 10 + "|"]
    for r in all_rows:
        if "error" in r:
            lines.append(f"| {r['bundle']} | {r['contender']} | error: {r['error'][:60]} |||||||")
            continue
        overhead = "" if r["overhead"] is None else ("~" if r["estimated"] else "") + f"{r['overhead'] * 100:.2f}%"
        speed = "" if r["speedup"] is None else f"{r['speedup']:.2f}x / " + (
            f"{r['unet_speedup']:.2f}x" if r["unet_speedup"] else "-")
        unet = "" if r["unet_ms"] is None else f"{r['unet_ms']:.1f}"
        lines.append(f"| {r['bundle']} {r['precision']} | {r['contender']} | {r['size']} | {r['batch']} | "
                     f"{r['steps']} | {r['e2e_ms']:.0f} ({r['p90_ms']:.0f}) | {unet} | {overhead} | {speed} | "
                     f"{r['rss']:.0f} |")
    return "\n".join(lines)


def plot(all_rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["bundle"], r["precision"], r["size"], r["batch"]) for r in all_rows if "error" not in r})
    contenders = sorted({r["contender"] for r in all_rows if "error" not in r})
    fig, ax = plt.subplots(figsize=(max(6, 2 * len(groups)), 4))
    width = 0.8 / max(1, len(contenders))
    for i, contender in enumerate(contenders):
        values = [next((r["e2e_ms"] for r in all_rows if "error" not in r and r["contender"] == contender
                        and (r["bundle"], r["precision"], r["size"], r["batch"]) == g), 0) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=contender)
    ax.set_xticks([j + width * (len(contenders) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{b} {p}\n{s}px x{n}" for b, p, s, n in groups])
    ax.set_ylabel("end-to-end ms per call (median)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("ldmrt bench: latency by backend and size (2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(paths: list[str]) -> None:
    all_rows = []
    for p in paths:
        all_rows.extend(rows(json.loads(Path(p).read_text())))
    print(markdown(all_rows))
    plot(all_rows, HERE / "results" / "latency.png")


if __name__ == "__main__":
    main(sys.argv[1:])
