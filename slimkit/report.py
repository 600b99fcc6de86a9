"""Trade-off plots and per-layer views, as in Canziani, Paszke & Culurciello, "An Analysis of Deep
Neural Network Models for Practical Applications" (2016).

* accuracy vs MACs, bubble area proportional to parameters (their Fig. 2);
* accuracy vs measured latency (the claim that matters: operation counts do not predict time);
* per-layer bars of MACs and measured latency, so a model's bottleneck layers stand out.

Plots are PNG files written atomically with matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from .artifact import atomic_write, atomic_write_text


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")

    atomic_write(path, write)
    _pyplot().close(fig)
    return path


def layer_latency(model: nn.Module, example: torch.Tensor, repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median wall time (ms) of each leaf module's forward over ``repeats`` runs at batch ``example``.

    Timed with pre/post forward hooks under ``torch.inference_mode``; the hooks add a few
    microseconds per layer, so read the bars relative to each other.
    """
    model.eval()
    current: dict[str, float] = {}
    starts: dict[str, float] = {}
    handles = []
    for name, m in model.named_modules():
        if next(m.children(), None) is not None:
            continue

        def pre(mod, inp, name=name):
            starts[name] = time.perf_counter()

        def post(mod, inp, out, name=name):
            # a module called k times per forward contributes the sum of its k calls
            current[name] = current.get(name, 0.0) + (time.perf_counter() - starts[name]) * 1e3

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    runs: list[dict[str, float]] = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                current.clear()
                model(example)
                if i >= warmup:
                    runs.append(dict(current))
    finally:
        for h in handles:
            h.remove()
    return {name: statistics.median(r.get(name, 0.0) for r in runs) for name in runs[0]}


def plot_tradeoff(entries: Sequence[dict], path: str, x: str = "macs", title: str | None = None) -> str:
    """Accuracy (``top1``) against ``x`` (``macs`` or ``latency_ms``); bubble area ~ ``params``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    biggest = max(e["params"] for e in entries) or 1
    for e in entries:
        size = 40 + 1500 * e["params"] / biggest
        ax.scatter(e[x] / (1e6 if x == "macs" else 1), 100 * e["top1"], s=size, alpha=0.5)
        ax.annotate(e["name"], (e[x] / (1e6 if x == "macs" else 1), 100 * e["top1"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("MACs (millions)" if x == "macs" else "latency at batch 1 (ms, measured)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or ("accuracy vs MACs (bubble area = parameters)" if x == "macs"
                           else "accuracy vs measured latency (bubble area = parameters)"))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_layers(layers: Sequence[dict], path: str, latency_ms: dict[str, float] | None = None,
                title: str = "") -> str:
    """Per-layer bars of MACs (and measured latency when given), in execution order."""
    plt = _pyplot()
    rows = [row for row in layers if row.get("macs") or (latency_ms and row["name"] in latency_ms)]
    names = [row["name"] or "<root>" for row in rows]
    panels = 2 if latency_ms else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(8, 0.22 * len(rows)), 3.2 * panels), squeeze=False)
    axes[0][0].bar(range(len(rows)), [row.get("macs", 0) / 1e6 for row in rows], color="tab:blue")
    axes[0][0].set_ylabel("MACs (M)")
    axes[0][0].set_title(title or "per-layer MACs" + (" and latency" if latency_ms else ""))
    if latency_ms:
        axes[1][0].bar(range(len(rows)), [latency_ms.get(row["name"], 0.0) for row in rows], color="tab:orange")
        axes[1][0].set_ylabel("latency (ms, batch 1)")
    for i, (ax,) in enumerate(axes):
        ax.set_xticks(range(len(rows)))
        # only the bottom panel carries names: rotated labels would run into the panel below
        ax.set_xticklabels(names if i == panels - 1 else [], rotation=90, fontsize=6)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def write_report(entries: Sequence[dict], out_dir: str) -> dict:
    """Write the trade-off plots and ``report.json`` for measured ``entries`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    files = {"accuracy_vs_macs": plot_tradeoff(entries, os.path.join(out_dir, "accuracy_vs_macs.png"))}
    if all(e.get("latency_ms") for e in entries):
        files["accuracy_vs_latency"] = plot_tradeoff(entries, os.path.join(out_dir, "accuracy_vs_latency.png"),
                                                     x="latency_ms")
    report = {"models": list(entries), "files": files}
    atomic_write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2))
    return report
