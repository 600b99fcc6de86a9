"""Benchmark results: JSON-ready dicts and aligned text tables."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

from .peak import MachinePeak
from .runners import default_threads
from .stats import stats

NOISY_CV = 0.10  # above this a single run's median is not trustworthy on its own


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, core counts, OS."""
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": default_threads(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def measurement(batch_size: int, samples_s: list[float], iters: int, macs: int | None,
                peak: MachinePeak | None) -> dict[str, Any]:
    """Summarise one mode at one batch size: latency stats in ms, throughput, roofline fraction."""
    s = stats(samples_s)
    median = s["median"]
    gflops = 2.0 * macs * batch_size / median / 1e9 if macs else None
    return {
        "batch_size": batch_size,
        "median_ms": median * 1e3,
        "p10_ms": s["p10"] * 1e3,
        "p90_ms": s["p90"] * 1e3,
        "mean_ms": s["mean"] * 1e3,
        "cv": s["cv"],
        "samples": s["n"],
        "iters_per_sample": iters,
        "throughput_ips": batch_size / median,
        "gflops": gflops,
        "peak_fraction": gflops / peak.fp32_best_gflops if gflops is not None and peak else None,
        "max_abs_diff": None,
        "samples_ms": [t * 1e3 for t in samples_s],
    }


def _public(m: dict[str, Any], include_samples: bool) -> dict[str, Any]:
    return {k: v for k, v in m.items() if include_samples or k != "samples_ms"}


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _align(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    # First column (mode) left-aligned, numbers right-aligned so digits line up.
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def _size(input_size: tuple[int, ...]) -> str:
    return "x".join(map(str, input_size))


def _header(result: BenchResult | CompareResult) -> str:
    m = result.machine
    peak = f", fp32 peak {result.peak.fp32_best_gflops:.1f} GFLOP/s" if result.peak else ""
    return (f"input {_size(result.input_size)}, threads {result.threads}, torch {result.torch_version}, "
            f"{m['cpu_model']} ({m['usable_cpus']} usable cpus){peak}")


def _footer(result: BenchResult | CompareResult) -> list[str]:
    lines = [f"failed {mode}: {msg}" for mode, msg in result.errors.items()]
    return lines + [f"WARNING: {w}" for w in result.warnings]


@dataclass
class BenchResult:
    """Latency/throughput of one model per mode and batch size (see :func:`slimkit.bench.bench`).

    ``results[mode][batch_size]`` is a dict with ``median_ms, p10_ms, p90_ms, mean_ms, cv,
    samples, iters_per_sample, throughput_ips, gflops, peak_fraction, max_abs_diff`` (the last
    is the largest difference of the timed callable's output from eager's) and the raw
    ``samples_ms``. ``errors[mode]`` holds the message of a mode that could not be built.
    """

    model: str | None
    input_size: tuple[int, ...]
    threads: int
    macs: int | None
    macs_source: str | None
    peak: MachinePeak | None
    settings: dict[str, Any]
    results: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    torch_version: str = torch.__version__
    machine: dict[str, Any] = field(default_factory=machine_info)

    def to_dict(self, include_samples: bool = False) -> dict[str, Any]:
        """JSON-ready dict (batch sizes become string keys); raw samples only when asked."""
        return {
            "model": self.model,
            "input_size": list(self.input_size),
            "threads": self.threads,
            "torch_version": self.torch_version,
            "machine": dict(self.machine),
            "macs_per_image": self.macs,
            "macs_source": self.macs_source,
            "peak": self.peak.to_dict() if self.peak else None,
            "settings": dict(self.settings),
            "results": {mode: {str(bs): _public(m, include_samples) for bs, m in per.items()}
                        for mode, per in self.results.items()},
            "errors": dict(self.errors),
            "warnings": list(self.warnings),
        }

    def table(self) -> str:
        """Aligned text table, one row per mode and batch size, then failures and warnings."""
        macs = f", {self.macs / 1e6:.2f} MMACs/image" if self.macs else ""
        lines = [f"{self.model or 'model'}: {_header(self)}{macs}"]
        rows = [["mode", "batch", "median ms", "p10 ms", "p90 ms", "cv", "img/s", "GFLOP/s", "% peak"]]
        for mode, per in self.results.items():
            for bs, m in per.items():
                noisy = "!" if m["cv"] > NOISY_CV else ""
                rows.append([mode, str(bs), f"{m['median_ms']:.3f}", f"{m['p10_ms']:.3f}", f"{m['p90_ms']:.3f}",
                             f"{m['cv']:.1%}{noisy}", f"{m['throughput_ips']:.1f}", _fmt(m["gflops"], ".2f"),
                             _fmt(None if m["peak_fraction"] is None else 100 * m["peak_fraction"], ".1f")])
        if len(rows) > 1:
            lines += _align(rows)
        return "\n".join(lines + _footer(self))

    def __str__(self) -> str:
        return self.table()


@dataclass
class CompareResult:
    """Interleaved A/B comparison (see :func:`slimkit.bench.compare`).

    ``results[mode][batch_size]`` is ``{"a": ..., "b": ..., "ratio": ...}``: each model's own
    measurement (as in :class:`BenchResult`) and the statistics (median, p10, p90, mean, cv, n)
    of the per-pair latency ratios B/A; a ratio above 1 means B is slower.
    """

    model_a: str | None
    model_b: str | None
    input_size: tuple[int, ...]
    threads: int
    macs_a: int | None
    macs_b: int | None
    peak: MachinePeak | None
    settings: dict[str, Any]
    results: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    torch_version: str = torch.__version__
    machine: dict[str, Any] = field(default_factory=machine_info)

    def ratio(self, mode: str, batch_size: int) -> float:
        """Median per-pair latency ratio B/A for one mode and batch size."""
        return self.results[mode][batch_size]["ratio"]["median"]

    def speedups(self, mode: str) -> dict[str, dict[str, float]]:
        """``{"bs1": {"A_ms": ..., "B_ms": ..., "speedup": A/B}, ...}`` for one mode, named by the models."""
        return {f"bs{bs}": {f"{self.model_a}_ms": r["a"]["median_ms"], f"{self.model_b}_ms": r["b"]["median_ms"],
                            "speedup": 1 / r["ratio"]["median"]} for bs, r in self.results[mode].items()}

    def speedup_text(self, mode: str) -> str:
        """``speed-up bs1 x1.93, bs64 x2.01`` (the A/B ratio per batch size)."""
        return "speed-up " + ", ".join(f"{k} x{v['speedup']:.2f}" for k, v in self.speedups(mode).items())

    def to_dict(self, include_samples: bool = False) -> dict[str, Any]:
        """JSON-ready dict (batch sizes become string keys); raw samples only when asked."""
        results = {}
        for mode, per in self.results.items():
            results[mode] = {}
            for bs, r in per.items():
                ratio = {k: v for k, v in r["ratio"].items() if include_samples or k != "samples"}
                results[mode][str(bs)] = {"a": _public(r["a"], include_samples), "b": _public(r["b"], include_samples),
                                          "ratio": ratio}
        return {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "input_size": list(self.input_size),
            "threads": self.threads,
            "torch_version": self.torch_version,
            "machine": dict(self.machine),
            "macs_per_image": {"a": self.macs_a, "b": self.macs_b},
            "peak": self.peak.to_dict() if self.peak else None,
            "settings": dict(self.settings),
            "results": results,
            "errors": dict(self.errors),
            "warnings": list(self.warnings),
        }

    def table(self) -> str:
        """Aligned text table: each model's median latency and throughput, and the B/A ratio."""
        lines = [f"A = {self.model_a or 'model A'}, B = {self.model_b or 'model B'} (interleaved): {_header(self)}"]
        rows = [["mode", "batch", "A ms", "B ms", "B/A", "p10..p90", "ratio cv", "A img/s", "B img/s", "A cv", "B cv"]]
        for mode, per in self.results.items():
            for bs, r in per.items():
                a, b, q = r["a"], r["b"], r["ratio"]
                rows.append([mode, str(bs), f"{a['median_ms']:.3f}", f"{b['median_ms']:.3f}", f"{q['median']:.3f}",
                             f"{q['p10']:.3f}..{q['p90']:.3f}", f"{q['cv']:.1%}{'!' if q['cv'] > NOISY_CV else ''}",
                             f"{a['throughput_ips']:.1f}", f"{b['throughput_ips']:.1f}", f"{a['cv']:.1%}",
                             f"{b['cv']:.1%}"])
        if len(rows) > 1:
            lines += _align(rows)
        return "\n".join(lines + _footer(self))

    def __str__(self) -> str:
        return self.table()
