"""Latency-aware channel allocation: a measured per-layer latency table and the planner that uses it.

MACs are a poor guide to what a width costs on a real CPU. On the 2-core AVX2 machine this
project is measured on, a 3x3 conv at 16x16 with 24 output channels takes as long as with 32
(oneDNN computes in blocks of 16 channels at batch 64), and at 32x32 a 16-channel conv costs
three to four times an 8-channel one, not two. A MAC-driven policy therefore spends its budget
on cuts that save nothing (a 32-wide stage cut to 24) and leaves the cuts that would
(the 16-wide stage at full resolution).

NetAdapt (Yang et al., ECCV 2018) and HALP (Shen et al., NeurIPS 2022) prune against measured
latency instead: a lookup table holds the latency of every layer at each candidate width, and
channels are removed where the least importance is lost per unit of latency saved. This module
does that for the dependency graph of :mod:`slimkit.prune.graph`:

* :class:`LatencyTable` times each prunable conv (dense or depthwise) and 2-d batch norm on its
  own, at the input resolution it sees in the model, for any (kept in, kept out) width and
  batch size, lazily and cached per distinct configuration (a ResNet's repeated blocks share
  one entry). Everything else (linear layers, activations, adds, Python overhead) is a fixed
  remainder, the whole model's measured time minus the timed layers': conservative, since
  activations and adds shrink with the widths too.
* :func:`plan_latency` removes one rounding chunk at a time (an atom's ``round_to`` lowest
  scored channels), the chunk with the least normalised importance per unit of the unmet
  budgets it saves (each budget's saving as a fraction of its starting value), until every
  budget holds: the predicted latency at each batch size and, optionally, the MACs. A chunk's
  importance counts once per pair of conv/linear layers its channels touch, so a residual
  trunk (which every block of a stage reads and writes) is weighed by what it feeds.
* :func:`closed_loop` measures the planned model against the reference and re-plans with a
  tighter target while the measurement misses, or a looser one when it overshoots (the table
  is a model of the latency, not the latency).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import SlimkitError
from ..experimental import experimental
from .graph import ChannelGraph
from .trace import hooked_forward

__all__ = ["TABLE_ROUNDS", "LatencyTable", "closed_loop", "median_seconds", "model_seconds", "plan_latency"]


def median_seconds(fn, repeats: int = 5, min_sample_s: float = 0.002) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` samples of enough calls to last ``min_sample_s``."""
    # gc paused as in slimkit.bench, but without its full collection first: a table times
    # dozens of entries, and one collection of a process holding a decoded dataset costs 0.2 s
    was = gc.isenabled()
    gc.disable()
    try:
        with torch.inference_mode():
            fn()  # warm-up: the first call of a new shape builds its kernel
            t0 = time.perf_counter()
            fn()
            iters = max(1, math.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-7)))
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                samples.append((time.perf_counter() - t0) / iters)
    finally:
        if was:
            gc.enable()
    return float(np.median(samples))


def model_seconds(model: nn.Module, example_input: torch.Tensor, batch_sizes: Sequence[int],
                  repeats: int = 5) -> dict[int, float]:
    """Median eval-mode seconds of one forward pass of ``model`` at each batch size (zeros shaped like the example)."""
    was = model.training
    model.eval()
    try:
        inputs = {b: example_input.new_zeros((b, *example_input.shape[1:])) for b in batch_sizes}
        return {b: median_seconds(lambda x=x: model(x), repeats) for b, x in inputs.items()}
    finally:
        model.train(was)


@experimental("0.1", "the planner's ranking and the closed loop's re-planning rule are still being tuned")
class LatencyTable:
    """Measured eager latency of the graph's layers at any width (NetAdapt, Yang et al. 2018; HALP, Shen et al. 2022).

    ``model`` is the model ``graph`` was built from and ``example_input`` its example input
    (batch 1; each entry is timed at every batch in ``batch_sizes``). Timings use this process's
    thread setting, so build the table with the threads the model will run with.
    ``layer_seconds(name, kin, kout, batch)`` is one layer's time (all its calls), ``predict(counts, batch)``
    the whole model's for per-layer ``{name: (kept in, kept out)}`` counts, as the measured
    full-model time minus the full-width layer times plus the layer times at those counts.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, example_input: torch.Tensor,
                 batch_sizes: Sequence[int] = (1,), repeats: int = 5) -> None:
        if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
            raise SlimkitError(f"LatencyTable: batch sizes must be positive integers, got {batch_sizes!r}")
        self.graph, self.batch_sizes, self.repeats = graph, tuple(batch_sizes), repeats
        self.cache: dict[tuple, float] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.calls: dict[str, int] = {}
        timed = {id(r.module): n for n, r in graph.layers.items() if r.kind in ("conv", "gconv", "dwconv")
                 or (r.kind == "bn" and isinstance(r.module, nn.BatchNorm2d))}
        mods = [m for m in model.modules() if id(m) in timed]

        def hook(m, args):
            name = timed[id(m)]
            self.calls[name] = self.calls.get(name, 0) + 1
            self.shapes.setdefault(name, tuple(args[0].shape))

        hooked_forward(model, example_input, [m.register_forward_pre_hook(hook) for m in mods])
        self.full = {n: self.widths(n, None) for n in timed.values()}
        self.model_seconds = model_seconds(model, example_input, self.batch_sizes, repeats)
        from ..progress import Progress

        bar = Progress(len(self.full) * len(self.batch_sizes), "latency table: layers timed")
        self.full_layers = {}
        for b in self.batch_sizes:
            total = 0.0
            for n, (kin, kout) in self.full.items():
                total += self.layer_seconds(n, kin, kout, b)
                bar.update()
            self.full_layers[b] = total
        bar.close()

    def widths(self, name: str, keep: np.ndarray | None) -> tuple[int, int]:
        """(in, out) width of layer ``name`` with the classes in ``keep`` kept (``None``: all)."""
        rec = self.graph.layers[name]
        m = rec.module
        full_in = getattr(m, "in_channels", getattr(m, "in_features", getattr(m, "num_features", 0)))
        full_out = getattr(m, "out_channels", getattr(m, "out_features", getattr(m, "num_features", 0)))
        kin = full_in if rec.in_cls is None or keep is None else int(keep[rec.in_cls].sum())
        kout = full_out if rec.out_cls is None or keep is None else int(keep[rec.out_cls].sum())
        return kin, kout

    def call_seconds(self, name: str, kin: int, kout: int, batch: int) -> float:
        """Seconds of one call of layer ``name`` with ``kin`` input and ``kout`` output channels at ``batch``."""
        rec = self.graph.layers[name]
        m = rec.module
        shape = self.shapes.get(name)
        if shape is None:  # never called on the example input: it costs nothing there
            return 0.0
        groups = {"dwconv": kin, "gconv": getattr(m, "groups", 1)}.get(rec.kind, 1)
        key = (rec.kind, kin, kout, batch, tuple(shape[2:])) + (() if rec.kind == "bn" else (
            m.kernel_size, m.stride, m.padding, m.dilation, m.bias is not None, m.padding_mode, groups))
        if key not in self.cache:
            layer = nn.BatchNorm2d(kout) if rec.kind == "bn" else nn.Conv2d(
                kin, kout, m.kernel_size, m.stride, m.padding, m.dilation, groups=groups,
                bias=m.bias is not None, padding_mode=m.padding_mode)
            layer.eval()
            x = torch.randn(batch, kin, *shape[2:])
            self.cache[key] = median_seconds(lambda: layer(x), self.repeats)
        return self.cache[key]

    def layer_seconds(self, name: str, kin: int, kout: int, batch: int) -> float:
        """Seconds of layer ``name`` over all its calls in one forward pass (0 for layers not timed)."""
        if name not in self.full:
            return 0.0
        return self.calls.get(name, 0) * self.call_seconds(name, kin, kout, batch)

    def layers_seconds(self, counts: dict[str, tuple[int, int]], batch: int) -> float:
        return sum(self.layer_seconds(n, kin, kout, batch) for n, (kin, kout) in counts.items())

    def predict(self, counts: dict[str, tuple[int, int]], batch: int) -> float:
        """Predicted seconds of the whole model at ``batch`` with the per-layer widths in ``counts``."""
        full = dict(self.full)
        full.update(counts)
        return self.model_seconds[batch] - self.full_layers[batch] + self.layers_seconds(full, batch)


def plan_latency(graph: ChannelGraph, norm: np.ndarray, table: LatencyTable, *, target_latency: float,
                 reference_seconds: dict[int, float] | None = None, round_to: int = 8,
                 macs_goal: float | None = None, macs_offset: int = 0) -> np.ndarray:
    """Classes to remove so the table's predicted latency is at most ``target_latency`` at every batch size.

    ``norm`` is the per-group normalised importance (:func:`slimkit.prune.pruner.plan`'s
    ranking); ``reference_seconds`` the latency per batch the target is a fraction of (default:
    the table's model). With ``macs_goal`` the MACs (``macs_offset`` + the cost model's
    :func:`~slimkit.prune.pruner.estimate`) must also end at most that. Greedy as NetAdapt
    (Yang et al. 2018): remove the chunk that loses the least importance per unit of the unmet
    budgets it saves; stop when all hold, or when no chunk saves anything (the caller checks).
    A chunk's importance is weighted by half the number of conv/linear layers it touches (1 for a
    channel between two convs, 4 for a stage trunk read and written by 8): per-group normalised
    scores alone price a trunk channel like an inner one while its removal saves time in every
    layer of the stage, and the planner then thins trunks first (on resnet20 at 1/1.75 of the
    latency: 57.8% after one epoch of fine-tuning without the weight, 74.9% with it).
    """
    from .cost import _layer_cost, estimate

    ref = reference_seconds or table.model_seconds
    goals = {b: target_latency * ref[b] for b in table.batch_sizes}
    removed = np.zeros(graph.num_classes, dtype=bool)
    atoms = []  # (its finite-scored classes least important first, its size, the layers it touches)
    for g in graph.groups:
        for ai, atom in enumerate(g.atoms):
            cand = atom[np.isfinite(norm[atom])]
            if len(cand):
                layers = [n for n, r in graph.layers.items() if r.kind in ("conv", "gconv", "dwconv", "linear", "bn")
                          and any(c is not None and np.isin(c, atom).any() for c in (r.in_cls, r.out_cls))]
                # a residual trunk channel leaves and enters many convs, an inner one leaves one and enters
                # one: counting its (per-group normalised) importance once per pair of layers it touches keeps
                # the planner from thinning trunks just because each trunk chunk saves a lot of time
                span = max(sum(graph.layers[n].kind in ("conv", "gconv", "dwconv", "linear") for n in layers) / 2, 1.0)
                atoms.append((cand[np.argsort(norm[cand], kind="stable")], len(atom), layers, span,
                              g.step(ai, round_to)))
    gone = [0] * len(atoms)
    counts = {n: table.widths(n, None) for a in atoms for n in a[2]}

    def cost(names, widths, batch):
        if batch is None:
            return sum(_layer_cost(graph.layers[n], *widths[n])[0] for n in names)
        return sum(table.layer_seconds(n, *widths[n], batch) for n in names)

    lat = dict(table.model_seconds)  # the prediction at full width
    start = dict(lat)
    macs = start_macs = macs_offset + estimate(graph, removed)[0]
    while True:
        unmet = [b for b in table.batch_sizes if lat[b] > goals[b]]
        if macs_goal is not None and macs > macs_goal:
            unmet.append(None)  # None: the MAC budget
        if not unmet:
            return removed
        best = None
        for i, (cand, size, layers, span, step) in enumerate(atoms):
            kept = size - gone[i]
            new_kept = (kept - 1) // step * step  # the next multiple of the rounding step below
            if new_kept < min(step, size) or gone[i] + kept - new_kept > len(cand):
                continue
            chunk = cand[gone[i]:gone[i] + kept - new_kept]
            trial = removed.copy()
            trial[chunk] = True
            new = {n: table.widths(n, ~trial) for n in layers}
            saved = sum(max(cost(layers, counts, b) - cost(layers, new, b), 0)
                        / (start[b] if b is not None else start_macs)
                        for b in unmet)
            lost = span * float(np.sum(norm[chunk]))
            if saved > 0 and (best is None or lost / saved < best[0]):
                best = (lost / saved, i, chunk, new)
        if best is None:  # nothing left that saves anything: the caller reports the shortfall
            return removed
        _, i, chunk, new = best
        layers = atoms[i][2]
        for b in table.batch_sizes:
            lat[b] -= cost(layers, counts, b) - cost(layers, new, b)
        macs -= cost(layers, counts, None) - cost(layers, new, None)
        removed[chunk] = True
        gone[i] += len(chunk)
        counts.update(new)


TABLE_ROUNDS = 4
TABLE_TOLERANCE = 0.03  # a measured ratio this close under the target is tight enough to stop


def closed_loop(graph: ChannelGraph, scores: np.ndarray, removed: np.ndarray, kw: dict,
                measure: Callable[[np.ndarray], float]) -> np.ndarray:
    """Check a latency-table plan on the real model and re-plan until the measurement meets the target tightly.

    Layers timed alone do not add up to the model exactly (caches, kernels picked per shape,
    timing noise), so the plan is built and measured (as NetAdapt measures its proposals). A
    miss re-plans with the table's target scaled by ``target / measured``, and so does an
    overshoot of more than :data:`TABLE_TOLERANCE` (a plan that runs faster than asked has cut
    channels it did not need to), up to :data:`TABLE_ROUNDS` plans in all. Kept: of the plans
    that measured within the target, the one with the most MACs left; if none did, the fastest.
    ``kw`` are :func:`~slimkit.prune.pruner.plan`'s keyword arguments (with ``latency_table``).
    """
    from .pruner import estimate, plan

    goal = target = kw["target_latency"]
    tried: list[tuple[float, int, np.ndarray]] = []  # (measured ratio, MACs left, plan)
    trial = removed
    for i in range(TABLE_ROUNDS):
        if i:
            trial = plan(graph, scores, **{**kw, "target_latency": target})
            if any((trial == t[2]).all() for t in tried):
                break  # the table gives a plan already measured: another round learns nothing
        ratio = measure(trial)
        tried.append((ratio, estimate(graph, trial)[0], trial))
        if goal * (1 - TABLE_TOLERANCE) <= ratio <= goal:
            break
        target *= goal / ratio  # tighter after a miss, looser after an overshoot
    meets = [t for t in tried if t[0] <= goal]
    return max(meets, key=lambda t: t[1])[2] if meets else min(tried, key=lambda t: t[0])[2]
