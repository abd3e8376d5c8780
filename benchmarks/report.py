"""Turn recorded `ldmrt bench --json` files into the README table and a latency plot.

    python benchmarks/report.py benchmarks/results/bench_*.json   # prints markdown, writes latency.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ldmrt.bench import format_overhead, format_ratio  # noqa: E402


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
            out.append({"bundle": report["bundle"]["name"], "precision": report["bundle"]["precision"],
                        "rounds": result.get("rounds", 1),
                        "contender": result["contender"], "size": case["case"]["size"],
                        "batch": case["case"]["batch"], "steps": case["case"]["steps"],
                        "e2e_ms": case["end_to_end"]["median_ms"], "p90_ms": case["end_to_end"]["p90_ms"],
                        "unet_ms": unet.get("median_ms"), "overhead": format_overhead(case, result["contender"]),
                        "speed": format_ratio(ratios.get(key, {})),
                        "rss": result.get("peak_rss_mib")})
    return out


def markdown(all_rows: list[dict]) -> str:
    lines = ["| model | contender | size | batch | steps | end-to-end ms (p90) | UNet ms | loop overhead | "
             "vs torch-eager (e2e / UNet) | peak RSS MiB |", "|---" * 10 + "|"]
    for r in all_rows:
        if "error" in r:
            lines.append(f"| {r['bundle']} | {r['contender']} | error: {r['error'][:60]} |||||||")
            continue
        lines.append(f"| {_label(r)} | {r['contender']} | {r['size']} | {r['batch']} | "
                     f"{r['steps']} | {_number(r['e2e_ms'])} ({_number(r['p90_ms'])}) | "
                     f"{_number(r['unet_ms'], '.1f', '')} | {r['overhead']} | {r['speed']} | "
                     f"{_number(r['rss'])} |")
    return "\n".join(lines)


def _number(value, spec: str = ".0f", missing: str = "n/a") -> str:
    """A measured number; reports record a non-finite one as null (strict JSON, see its notes)."""
    return missing if value is None else format(value, spec)


def _label(r: dict) -> str:
    return f"{r['bundle']} {r['precision']}" + ("" if r["rounds"] == 1 else f", {r['rounds']} rounds")


def plot(all_rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(_label(r), r["size"], r["batch"]) for r in all_rows if "error" not in r})
    contenders = sorted({r["contender"] for r in all_rows if "error" not in r})
    fig, ax = plt.subplots(figsize=(max(6, 2 * len(groups)), 4))
    width = 0.8 / max(1, len(contenders))
    for i, contender in enumerate(contenders):
        values = [next((r["e2e_ms"] for r in all_rows if "error" not in r and r["contender"] == contender
                        and (_label(r), r["size"], r["batch"]) == g), 0) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=contender)
    ax.set_xticks([j + width * (len(contenders) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{label}\n{s}px x{n}" for label, s, n in groups])
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
