"""The statistics every ldmrt benchmark reports: per-run summaries and their merge over rounds."""
from __future__ import annotations

import statistics

import numpy as np


def summarize(samples_s: list[float]) -> dict[str, float]:
    """Median, p90 (nearest rank), min, max in milliseconds, and the count."""
    if not samples_s:
        raise ValueError("summarize: no samples")
    ms = sorted(s * 1e3 for s in samples_s)
    rank = max(1, int(np.ceil(0.9 * len(ms))))
    return {"median_ms": float(statistics.median(ms)), "p90_ms": float(ms[rank - 1]),
            "min_ms": float(ms[0]), "max_ms": float(ms[-1]), "n": len(ms), "samples_ms": ms}


def merge_rounds(stats: list[dict]) -> dict:
    """One statistic over rounds: the median of the round medians; p90, min, max over every sample."""
    pooled = summarize([v / 1e3 for s in stats for v in s["samples_ms"]])
    medians = [s["median_ms"] for s in stats]
    return {**pooled, "median_ms": float(statistics.median(medians)), "round_medians_ms": medians}
