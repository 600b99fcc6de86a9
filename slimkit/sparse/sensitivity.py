"""Per-layer sensitivity scan for unstructured sparsity, and per-layer sparsities for a global target.

Han et al. (NeurIPS 2015, figure 5) and Distiller choose each layer's sparsity from a scan: prune
one layer at a time to each level (by magnitude, the rest of the network dense), evaluate, and
plot accuracy against sparsity per layer. :func:`scan` does that on a few held-out batches;
:func:`plan` turns it into per-layer sparsities for a global target: every layer goes to the
highest scanned level whose accuracy drop stays within a tolerance, with the tolerance bisected
to the smallest one that meets the target (the first conv and the classifier follow the edge
rule, as in every other scope). The plan is what ``scope="sensitivity"`` prunes to.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from .masks import MAX_LAYER_SPARSITY, compute_masks, edge_layers, prunable_layers, scores

LEVELS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def _accuracy(model: nn.Module, batches: list) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1)


def scan(model: nn.Module, loader: Iterable, *, batches: int = 4, levels: Iterable[float] = LEVELS) -> dict:
    """Accuracy on ``batches`` batches of ``loader`` with each conv/linear layer alone pruned to each level.

    Returns:
        ``{"base": accuracy, "levels": [...], "layers": {name: {"numel": n, "accuracy": [per level]}}}``.

    Example (Han et al. 2015):
        >>> import slimkit, torch
        >>> from slimkit.data import load
        >>> s = scan(slimkit.create_model("digits_cnn").eval(), load("digits", limit=60).loader("val", 30), batches=1)
        >>> len(s["layers"]["features.0"]["accuracy"]) == len(LEVELS)
        True
    """
    model.eval()
    held = [b for _, b in zip(range(batches), loader)]
    levels = list(levels)
    out = {"base": _accuracy(model, held), "levels": levels, "layers": {}}
    layers = prunable_layers(model)
    for name, layer in layers:
        original = layer.weight.detach().clone()
        accs = []
        for level in levels:
            mask = compute_masks([(name, layer)], scores("magnitude", [(name, layer)], None), level, "layer", "same")
            with torch.no_grad():
                layer.weight.copy_(original * mask[name])
            accs.append(_accuracy(model, held))
        with torch.no_grad():
            layer.weight.copy_(original)
        out["layers"][name] = {"numel": original.numel(), "accuracy": accs}
    return out


def plan(result: dict, target: float, edges_rule: str, model: nn.Module) -> tuple[dict[str, float], float]:
    """Per-layer sparsities meeting ``target`` over the non-edge layers, from a :func:`scan`.

    Returns:
        ``(plan, tolerance)``: ``plan[layer]`` is the layer's sparsity divided by ``target`` (the form
        ``scope`` takes, so a rising schedule keeps the shape), and the accuracy drop tolerated.
    """
    layers = prunable_layers(model)
    edges = edge_layers(layers) if edges_rule != "same" else set()
    rest = {n: result["layers"][n] for n, _ in layers if n not in edges}
    levels = np.array([0.0, *result["levels"]])
    total = sum(r["numel"] for r in rest.values())

    def choose(tol: float) -> dict[str, float]:
        out = {}
        for n, r in rest.items():
            ok = [lv for lv, acc in zip(levels, [result["base"], *r["accuracy"]]) if result["base"] - acc <= tol]
            out[n] = max(ok)
        return out

    def reached(choice: dict[str, float]) -> float:
        return sum(choice[n] * rest[n]["numel"] for n in rest) / max(total, 1)

    lo, hi = 0.0, 1.0
    if reached(choose(hi)) < target:  # even at any drop the scanned levels fall short: scale all up
        choice = choose(hi)
        scale = target / max(reached(choice), 1e-9)
        return {n: min(MAX_LAYER_SPARSITY, s * scale) / target for n, s in choice.items()}, hi
    for _ in range(30):
        mid = (lo + hi) / 2
        if reached(choose(mid)) >= target:
            hi = mid
        else:
            lo = mid
    choice = choose(hi)
    # the levels are coarse: scale down so the plan meets the target, not overshoots it
    scale = target / max(reached(choice), 1e-9)
    return {n: min(MAX_LAYER_SPARSITY, s * scale) / target for n, s in choice.items()}, hi


def plot(result: dict, path: str, chosen: dict[str, float] | None = None, title: str = "") -> str:
    """Accuracy against sparsity per layer (the chosen sparsity marked), written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..artifact import atomic_write

    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=120)
    levels = [0.0, *result["levels"]]
    for name, r in result["layers"].items():
        line, = ax.plot(levels, [result["base"], *r["accuracy"]], marker="o", ms=2.5, lw=1, label=name)
        if chosen and name in chosen:
            ax.axvline(chosen[name], color=line.get_color(), lw=0.5, ls=":")
    ax.set_xlabel("sparsity of the layer alone")
    ax.set_ylabel("accuracy (held-out batches)")
    ax.set_title(title or "per-layer sensitivity to magnitude pruning")
    if len(result["layers"]) <= 24:
        ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
