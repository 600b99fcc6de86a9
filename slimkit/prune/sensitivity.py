"""Per-layer pruning sensitivity (Li et al., ICLR 2017, "Pruning Filters for Efficient ConvNets", sec. 3.3).

Li et al. prune each layer on its own at growing ratios, measure the accuracy of the result
without retraining, and then prune the sensitive layers less (or not at all). Here the unit is
a *group* of the dependency graph (a layer's output channels together with everything coupled
to them, e.g. a whole residual trunk), named by its first producing layer, which is the key
``prune(ratios=...)`` takes:

    scan = sensitivity_scan(model, x, data.loader("val"), criterion="l1")
    print(scan.table())
    r = prune(model, x, criterion="l1", ratios=scan.ratios(max_drop=0.02))

:meth:`Sensitivity.ratios` gives each group the largest scanned ratio whose drop (and every
smaller scanned ratio's drop) stays within ``max_drop``; :meth:`Sensitivity.ratios_for_macs`
bisects on ``max_drop`` until the resulting model meets a MAC budget.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import SlimkitError
from ..train import evaluate
from .graph import build_graph
from .importance import CRITERIA, compute_importance
from .pruner import apply_plan, estimate, plan

__all__ = ["Sensitivity", "held_out_loader", "sensitivity_ratios", "sensitivity_scan"]


@dataclass
class Sensitivity:
    """Result of :func:`sensitivity_scan`: top-1 of the unpruned model and of each group pruned alone."""

    base_top1: float
    top1: dict[str, dict[float, float]]  # group (its first producing layer) -> ratio -> top-1
    criterion: str
    steps: tuple[float, ...]

    def ratios(self, max_drop: float) -> dict[str, float]:
        """Per-group ratios for ``prune(ratios=...)``: the largest scanned ratio whose top-1 drop and
        the drops of all smaller scanned ratios are at most ``max_drop`` (a fraction, 0.02 = 2 points)."""
        if not (isinstance(max_drop, (int, float)) and max_drop >= 0):
            raise SlimkitError(f"sensitivity: max_drop is a non-negative fraction of top-1, got {max_drop!r}")
        out = {}
        for layer, by_ratio in self.top1.items():
            best = 0.0
            for r in sorted(by_ratio):
                if self.base_top1 - by_ratio[r] > max_drop:
                    break
                best = r
            out[layer] = best
        return out

    def ratios_for_macs(self, model: nn.Module, example_input: torch.Tensor, target_macs: float, *,
                        round_to: int = 8, untie_shortcuts: bool = True, rounding: str = "floor") -> dict[str, float]:
        """The ratios of the smallest ``max_drop`` whose pruned ``model`` has at most ``target_macs`` of its MACs.

        The MACs come from the planner's exact cost model (no model is built); ``model`` and the
        options must be those the ratios will be used with. Raises when even the largest scanned
        ratios everywhere cannot reach the target.
        """
        from .pruner import _profile

        graph = build_graph(model.eval(), example_input, (), untie_shortcuts)
        scores = np.ones(graph.num_classes)  # under a ratio policy the count removed, not which, sets the MACs
        none = np.zeros(graph.num_classes, dtype=bool)
        total = _profile(model, example_input)[0]
        fixed = total - estimate(graph, none)[0]

        def frac(max_drop: float) -> float:
            removed = plan(graph, scores, base_macs=total, base_params=1, ratios=self.ratios(max_drop),
                           round_to=round_to, rounding=rounding)
            return (fixed + estimate(graph, removed)[0]) / total

        drops = sorted({max(0.0, self.base_top1 - t) for v in self.top1.values() for t in v.values()})
        if not drops or frac(drops[-1]) > target_macs:
            raise SlimkitError(f"sensitivity: even the largest scanned ratios ({max(self.steps)}) everywhere leave "
                               f"{frac(drops[-1]) if drops else 1.0:.3f} of the MACs, above the target "
                               f"{target_macs}; scan larger steps")
        lo, hi = 0, len(drops) - 1  # smallest drop threshold that meets the target
        while lo < hi:
            mid = (lo + hi) // 2
            if frac(drops[mid]) <= target_macs:
                hi = mid
            else:
                lo = mid + 1
        return self.ratios(drops[lo])

    def table(self) -> str:
        """Markdown table: one row per group, top-1 at each scanned ratio (drop from the unpruned model)."""
        head = "| group (first producer) | " + " | ".join(f"ratio {r:g}" for r in self.steps) + " |"
        rows = [head, "|---|" + "---|" * len(self.steps)]
        for layer, by_ratio in self.top1.items():
            cells = [f"{100 * by_ratio[r]:.2f} ({100 * (by_ratio[r] - self.base_top1):+.2f})" if r in by_ratio else "-"
                     for r in self.steps]
            rows.append(f"| {layer} | " + " | ".join(cells) + " |")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        """JSON-ready form (ratios as strings, JSON keys must be)."""
        return {"criterion": self.criterion, "base_top1": self.base_top1, "steps": list(self.steps),
                "top1": {k: {str(r): v for r, v in d.items()} for k, d in self.top1.items()}}


def held_out_loader(data, batch_size: int, seed: int = 0):
    """The scan's evaluation data: the validation split (test when there is none), unaugmented, shuffled once by
    ``seed`` so the first batches mix the classes."""
    split = "val" if len(data.split("val")) else "test"
    return data.loader(split, batch_size, shuffle=True, augment=False, seed=seed)


def first_batches(loader: Iterable, n: int, what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` ``(input, label)`` batches of ``loader``, kept so every probe sees the same images."""
    data = [(batch[0], batch[1]) for _, batch in zip(range(n), loader)]
    if not data:
        raise SlimkitError(f"{what}: the evaluation loader gave no batches")
    return data


def sensitivity_scan(model: nn.Module, example_input: torch.Tensor, loader: Iterable, *, criterion: str = "l1",
                     steps: Sequence[float] = (0.25, 0.5, 0.75), batches: int = 4, round_to: int = 1,
                     rounding: str = "floor", protected: Sequence[str] = (), untie_shortcuts: bool = True,
                     device: str | torch.device = "cpu", **criterion_kwargs) -> Sensitivity:
    """Prune every group of ``model`` alone at each ratio in ``steps`` and measure top-1 (Li et al., ICLR 2017).

    The criterion (any name in :data:`CRITERIA`; ``criterion_kwargs`` as for :func:`prune`)
    scores channels once on the unpruned model; each probe removes the lowest-scored fraction
    of one group from a copy, with no retraining, and evaluates on the first ``batches``
    batches of ``loader`` (held-out data: use the validation split), the same images for every
    probe. ``round_to=1`` by default so the scanned ratios are the ratios probed. Cost:
    ``len(steps) * groups`` evaluations of ``batches`` batches.
    """
    CRITERIA.get(criterion)
    steps = tuple(float(s) for s in steps)
    if not steps or any(not 0 < s < 1 for s in steps):
        raise SlimkitError(f"sensitivity: steps are fractions of channels in (0, 1), got {list(steps)!r}")
    data = first_batches(loader, batches, "sensitivity")
    model = copy.deepcopy(model).to(device).eval()
    graph = build_graph(model, example_input.to(device), tuple(protected), untie_shortcuts)
    scores = compute_importance(criterion, model, graph, **criterion_kwargs)
    base = evaluate(model, data, device=device)["top1"]
    ok = graph.prunable()
    top1: dict[str, dict[float, float]] = {}
    for g in graph.groups:
        if not g.producers or not ok[g.classes].any():
            continue
        key = g.producers[0]
        for r in steps:
            removed = plan(graph, scores, base_macs=1, base_params=1, ratios={key: r}, round_to=round_to,
                           rounding=rounding)
            if not removed.any():
                continue
            probe_model, probe_graph = copy.deepcopy((model, graph))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                apply_plan(probe_model, probe_graph, removed)
            top1.setdefault(key, {})[r] = evaluate(probe_model, data, device=device)["top1"]
    return Sensitivity(base, top1, criterion, steps)


def sensitivity_ratios(model: nn.Module, example_input: torch.Tensor, loader: Iterable, *, criterion: str = "l1",
                       target_macs: float | None = None, max_drop: float | None = None,
                       steps: Sequence[float] = (0.25, 0.5, 0.75), batches: int = 4, round_to: int = 8,
                       rounding: str = "floor", untie_shortcuts: bool = True, device: str | torch.device = "cpu",
                       **criterion_kwargs) -> tuple[dict[str, float], Sensitivity]:
    """Scan (:func:`sensitivity_scan`) and turn the scan into ``prune(ratios=...)`` (Li et al., ICLR 2017).

    Exactly one of ``target_macs`` (the smallest drop threshold whose ratios meet that fraction
    of the MACs, :meth:`Sensitivity.ratios_for_macs`) and ``max_drop`` (:meth:`Sensitivity.ratios`).
    The probes use the same ``round_to`` and ``rounding`` as the ratios will be applied with, so
    each probe is the width the final model gets. The one entry point the recipe stage and ``slimkit prune
    --sensitivity`` share.
    """
    if (target_macs is None) == (max_drop is None):
        raise SlimkitError("sensitivity: give exactly one of target_macs and max_drop")
    scan = sensitivity_scan(model, example_input, loader, criterion=criterion, steps=steps, batches=batches,
                            round_to=round_to, rounding=rounding, untie_shortcuts=untie_shortcuts, device=device,
                            **criterion_kwargs)
    if target_macs is not None:
        ratios = scan.ratios_for_macs(model, example_input, target_macs, round_to=round_to,
                                      untie_shortcuts=untie_shortcuts, rounding=rounding)
    else:
        ratios = scan.ratios(max_drop)
    return ratios, scan
