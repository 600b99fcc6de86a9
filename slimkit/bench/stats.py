"""Summary statistics for repeated timings."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics.

    This is numpy's default ("linear") method, written out so that summarising a benchmark does
    not depend on numpy and gives the same number everywhere in the project.
    """
    if not samples:
        raise ValueError("percentile of an empty sample list")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(float(s) for s in samples)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats(samples: Sequence[float]) -> dict[str, float]:
    """Median, p10, p90, mean, coefficient of variation (and n, min, max, std) of timing samples.

    Latency distributions are right-skewed (a preempted run is much slower, never much faster),
    so the median and the p10..p90 band are the numbers to report and compare, the mean is
    kept for completeness, and the CV (sample standard deviation / mean) is the noise indicator:
    above ~10% a single measurement should not be trusted (see Hoefler & Belli 2015, "Scientific
    benchmarking of parallel computing systems", on reporting medians and spread rather than
    means alone). The result is a plain dict of floats so it can go straight into JSON.
    """
    if not samples:
        raise ValueError("stats of an empty sample list")
    xs = [float(s) for s in samples]
    n = len(xs)
    mean = sum(xs) / n
    # Sample (n-1) standard deviation: the samples estimate the spread of future runs.
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return {
        "median": percentile(xs, 50),
        "p10": percentile(xs, 10),
        "p90": percentile(xs, 90),
        "mean": mean,
        "cv": std / mean if mean else 0.0,
        "std": std,
        "min": min(xs),
        "max": max(xs),
        "n": n,
    }
