"""A latency budget for decomposition: per-layer times measured on this machine, then a closed-loop check.

Each candidate (a layer whole, or decomposed at a rank) is timed on its own at the input shape it
sees in the model, at every batch size of the budget (:func:`slimkit.prune.latency.median_seconds`,
the pruner's table idea; entries are cached by layer configuration, so a ResNet's repeated blocks
are timed once). Costs are fractions of the whole model's measured time, averaged over the batch
sizes; a candidate that is not faster than the whole layer is dropped, which is how a layer whose
decomposition does not pay on this CPU stays whole. After planning, the decomposed model is timed
against the original (interleaved); on a miss the target is tightened by the miss and the plan
redone, at most three times.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..prune.latency import median_seconds, model_seconds
from .allocate import LayerPlan, allocate


def _key(m: nn.Module, shape: tuple, rank, batch: int) -> tuple:
    return (type(m).__name__, tuple(m.weight.shape), getattr(m, "stride", None), getattr(m, "padding", None),
            getattr(m, "dilation", None), m.bias is not None, tuple(shape[1:]), rank, batch)


def allocate_latency(work: nn.Module, example: torch.Tensor, plans: list[LayerPlan], modules: dict, shapes: dict,
                     method, config) -> list[LayerPlan]:
    """Re-cost ``plans`` in measured time and allocate for ``config.target_latency`` (see the module docstring)."""
    batches = config.latency_batches
    totals = model_seconds(work, example, batches)
    cache: dict[tuple, float] = {}

    def seconds(module: nn.Module, name: str, rank, layer: nn.Module) -> float:
        shape = shapes[name][0]
        out = 0.0
        for b in batches:
            key = _key(layer, shape, rank, b)
            if key not in cache:
                x = torch.randn(b, *shape[1:])
                module.eval()
                cache[key] = median_seconds(lambda: module(x))
            out += cache[key] / totals[b]
        return out / len(batches)

    for p in plans:
        layer = modules[p.name]
        p.whole = seconds(layer, p.name, None, layer)
        for c in p.candidates:
            c.cost = seconds(method.skeleton(layer, c.rank), p.name, c.rank, layer)
        p.candidates = [c for c in p.candidates if c.cost < p.whole * (1 - config.min_saving)]
    fixed = 1.0 - sum(p.whole for p in plans)
    target = config.target_latency
    best = None
    for _ in range(3):
        for p in plans:
            p.choice = -1
        allocate(plans, fixed, target, "latency")
        trial = copy.deepcopy(work)
        for p in plans:
            if p.choice >= 0:
                parent, _, child = p.name.rpartition(".")
                trial.get_submodule(parent)._modules[child] = method.skeleton(modules[p.name],
                                                                             p.candidates[p.choice].rank)
        ratio = measured_ratio(work, trial, example, batches)
        choices = [p.choice for p in plans]
        if best is None or (ratio <= config.target_latency) > (best[0] <= config.target_latency) or (
                (ratio <= config.target_latency) == (best[0] <= config.target_latency) and ratio < best[0]):
            best = (ratio, choices)
        if ratio <= config.target_latency:
            break
        target *= config.target_latency / ratio  # tighten by the miss and plan again
    for p, choice in zip(plans, best[1]):
        p.choice = choice
    return plans


def measured_ratio(reference: nn.Module, candidate: nn.Module, example: torch.Tensor, batches) -> float:
    """Median interleaved latency ratio candidate / reference, eager, this process's threads; the worst batch size."""
    from ..bench import compare

    r = compare(reference, candidate, tuple(example.shape[1:]), batch_sizes=tuple(batches),
                threads=torch.get_num_threads(), modes=("eager",), warmup=2, repeats=9, min_time_s=0.2,
                roofline=False)
    return max(r.ratio("eager", b) for b in batches)
