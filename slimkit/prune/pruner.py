"""Pruning policies: which channels to remove, and the one-shot / iterative driver (surgery: :mod:`.surgery`).

Policies (exactly one per call):

* ``target_macs=f`` / ``target_params=f``: global pruning to a fraction ``f`` of the original
  MACs/parameters. Channel classes are ranked by importance divided by the mean importance of
  their group (per-layer normalisation, as in Molchanov et al. 2019 and Torch-Pruning, so layers
  with large weights do not keep all their channels), and the lowest are removed, as many as
  needed: the count is found by bisection on a cost model that is exact for the profiler's
  conv/linear rules, and the result is checked with :func:`slimkit.profile.profile`.
* ``target_latency=f``: the same ranking, to a fraction ``f`` of the original model's measured
  latency (eager, batch ``latency_batch``, this process's thread setting). Each bisection probe
  builds the candidate and times it against the original with :func:`slimkit.bench.compare`
  (interleaved pairs, median ratio), so the target is met on the machine that prunes; no
  give-back pass (timing noise would make it flip chunks at random).
  With ``latency_model="table"`` the ranking changes instead: a measured per-layer latency table
  (:mod:`slimkit.prune.latency`, NetAdapt/HALP) predicts the model's latency at every batch in
  ``latency_batch`` (an int or a tuple), and whole rounding chunks go where the least
  importance is lost per unit of latency saved, until every batch size meets the target. This
  is the one policy that may be combined with ``target_macs`` (both budgets must hold).
* ``ratio=r``: uniform, every group loses the fraction ``r`` of its channels.
* ``ratios={layer: r}``: explicit per-layer ratios for the group that layer produces (others keep
  ``ratio`` or 0).

Every atom of a group (its channels present in the same layers) keeps a multiple of
``round_to`` channels, never fewer than ``round_to`` (or all of them if it has fewer), so no
layer ever loses all its channels and widths stay friendly to vectorised kernels. ``rounding``
says which way a group's proposed width goes: ``"floor"`` (the default, Torch-Pruning's rule)
rounds the kept count down, so a group with even one channel below the global threshold loses a
whole chunk; ``"ceil"`` rounds it up, so a group loses nothing until a chunk's worth of its
channels is below the threshold. The two spread the same MAC budget differently: with floor
the cut is spread over many groups (most lose one chunk), with ceil it concentrates on the
groups whose scores are most dispersed. On the CIFAR ResNets floor was 1.5-3.2 points better
for ``l1`` and ``group_l1`` after the same fine-tune (docs/prune.md; the random control went
the other way).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import SlimkitError
from .config import PruneConfig
from .cost import _layer_cost, estimate  # noqa: F401  (estimate is public here too)
from .graph import ChannelGraph, build_graph
from .importance import CRITERIA, compute_importance
from .reconstruct import reconstruct_mode, reconstruct_weights
from .surgery import PrunedPadShortcut, apply_plan, pad_sources  # noqa: F401  (re-exported)

__all__ = ["PruneConfig", "PrunedPadShortcut", "PruneResult", "apply_plan", "estimate", "make_config", "pad_sources",
           "plan",
           "prune", "prune_once"]


@dataclass
class PruneResult:
    """A pruned model and what was done: kept indices (w.r.t. the original), counts, warnings."""

    model: nn.Module
    kept: dict[str, dict[str, list[int]]]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    warnings: list[str] = field(default_factory=list)
    unprunable: list[str] = field(default_factory=list)
    latency_ratio: float | None = None  # measured pruned/original latency, for a target_latency policy
    reconstruction: dict | None = None  # {"mode", "layers": {name: {"before", "after"}}} when weights were re-solved
    sensitivity: dict | None = None  # the sensitivity scan, when it set the ratios
    ratios: dict | None = None  # the per-group ratios the scan chose

    def summary(self) -> dict:
        """JSON-ready counts and warnings (without the kept indices)."""
        return {"params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "macs_ratio": self.macs_after / max(self.macs_before, 1),
                "params_ratio": self.params_after / max(self.params_before, 1),
                "latency_ratio": self.latency_ratio, "reconstruction": self.reconstruction,
                "warnings": list(self.warnings),
                "unprunable": list(self.unprunable)}


# -- planning -----------------------------------------------------------------------------------

def _normalised(graph: ChannelGraph, scores: np.ndarray) -> np.ndarray:
    ok = graph.prunable() & np.isfinite(scores)
    norm = np.full(graph.num_classes, np.nan)
    for g in graph.groups:
        c = g.classes[ok[g.classes]]
        if len(c):
            norm[c] = scores[c] / max(float(np.mean(np.abs(scores[c]))), 1e-12)
    return norm


ROUNDING = ("floor", "ceil")


def _keep_count(size: int, proposed_removals: int, round_to: int, rounding: str = "floor") -> int:
    kept = size - proposed_removals
    kept = int((math.floor if rounding == "floor" else math.ceil)(kept / round_to) * round_to)
    return min(size, max(kept, min(round_to, size)))


def _removal(graph: ChannelGraph, norm: np.ndarray, proposed: np.ndarray, round_to: int,
             rounding: str = "floor") -> np.ndarray:
    """Turn a proposed set of classes into a valid removal: per-atom rounding, lowest scores first."""
    removed = np.zeros(graph.num_classes, dtype=bool)
    for g in graph.groups:
        for i, atom in enumerate(g.atoms):
            n_prop = int(proposed[atom].sum())
            if not n_prop:
                continue
            n_remove = len(atom) - _keep_count(len(atom), n_prop, g.step(i, round_to), rounding)
            cand = atom[np.isfinite(norm[atom])]
            cand = cand[np.argsort(norm[cand], kind="stable")][:n_remove]
            removed[cand] = True
    return removed


def plan(graph: ChannelGraph, scores: np.ndarray, *, base_macs: int, base_params: int, target_macs: float | None = None,
         target_params: float | None = None, ratio: float | None = None, ratios: dict[str, float] | None = None,
         round_to: int = 8, reference_macs: int | None = None, reference_params: int | None = None,
         target_latency: float | None = None, latency_of: Callable[[np.ndarray], float] | None = None,
         rounding: str = "floor", latency_table=None, reference_seconds: dict[int, float] | None = None) -> np.ndarray:
    """Boolean mask of the channel classes to remove under one policy (see the module docstring).

    Global policies rank classes by importance normalised per group (Molchanov et al., CVPR
    2019, normalise per layer for the same reason: raw scores are not comparable across layers).

    ``target_macs``/``target_params`` are fractions of ``reference_macs``/``reference_params``
    (default: this model's ``base_macs``/``base_params``, the profiler's counts), which lets
    iterative pruning aim every step at a fraction of the *original* model. ``target_latency``
    needs ``latency_of(removed)``, the candidate's latency as a fraction of the original's, or
    a ``latency_table`` (:class:`~slimkit.prune.latency.LatencyTable`; ``reference_seconds``: the
    latency per batch the target is a fraction of), which ranks by importance per latency saved
    (:func:`~slimkit.prune.latency.plan_latency`) and also honours ``target_macs``.
    """
    norm = _normalised(graph, scores)
    if latency_table is not None:
        from .latency import plan_latency

        m0 = estimate(graph, np.zeros(graph.num_classes, dtype=bool))[0]
        return plan_latency(graph, norm, latency_table, target_latency=target_latency,
                            reference_seconds=reference_seconds, round_to=round_to,
                            macs_goal=None if target_macs is None else target_macs * (reference_macs or base_macs),
                            macs_offset=base_macs - m0)
    if ratio is not None or ratios:
        proposed = np.zeros(graph.num_classes, dtype=bool)
        by_layer = dict(ratios or {})
        for g in graph.groups:
            r = next((by_layer[p] for p in g.producers if p in by_layer), ratio or 0.0)
            for atom in g.atoms:
                cand = atom[np.isfinite(norm[atom])]
                n = min(len(cand), int(round(r * len(atom))))
                proposed[cand[np.argsort(norm[cand], kind="stable")][:n]] = True
        return _removal(graph, norm, proposed, round_to, rounding)
    order = np.nonzero(np.isfinite(norm))[0]
    order = order[np.argsort(norm[order], kind="stable")]
    none = np.zeros(graph.num_classes, dtype=bool)
    m0, p0 = estimate(graph, none)
    if target_latency is not None:
        if latency_of is None:
            raise SlimkitError("prune: target_latency needs a latency measurement (latency_of)")
        goal, idx, base, fixed = target_latency, -1, 0, 0
    elif target_macs is not None:
        goal, idx, base, fixed = target_macs * (reference_macs or base_macs), 0, base_macs, m0
    else:
        goal, idx, base, fixed = target_params * (reference_params or base_params), 1, base_params, p0

    def total(k: int) -> tuple[float, np.ndarray]:
        proposed = none.copy()
        proposed[order[:k]] = True
        removed = _removal(graph, norm, proposed, round_to, rounding)
        if idx < 0:
            return latency_of(removed), removed
        return base - fixed + estimate(graph, removed)[idx], removed

    lo, hi = 0, len(order)
    if total(hi)[0] > goal:
        return total(hi)[1]
    while lo < hi:  # smallest k whose cost meets the goal; cost never rises with k
        mid = (lo + hi) // 2
        if total(mid)[0] <= goal:
            hi = mid
        else:
            lo = mid + 1
    cost, removed = total(lo)
    if idx < 0:
        return removed
    return _give_back(graph, norm, removed, round_to, goal, base - fixed, idx)


def _give_back(graph: ChannelGraph, norm: np.ndarray, removed: np.ndarray, round_to: int, goal: float, offset: int,
               idx: int) -> np.ndarray:
    """Restore whole rounding chunks, most important first, while the goal still holds.

    Rounding makes many atoms drop ``round_to`` channels at once near the bisection point, which
    can overshoot the target by far; giving back the best removed chunks undoes the overshoot.
    """
    chunks = []
    for g in graph.groups:
        for i, atom in enumerate(g.atoms):
            gone = atom[removed[atom]]
            if not len(gone):
                continue
            gone = gone[np.argsort(-norm[gone], kind="stable")]
            kept = len(atom) - len(gone)
            step = g.step(i, round_to)
            n = step if kept + step <= len(atom) else len(gone)
            chunks.append((float(np.mean(norm[gone[:n]])), gone[:n]))
    chunks.sort(key=lambda c: -c[0])
    for _, chunk in chunks:
        removed[chunk] = False
        if offset + estimate(graph, removed)[idx] > goal:
            removed[chunk] = True
    return removed


def _compose(old: dict, new: dict) -> dict:
    out = {k: {d: list(v) for d, v in e.items()} for k, e in old.items()}
    for name, entry in new.items():
        prev = old.get(name)
        out[name] = {d: [prev[d][i] for i in idx] if prev and d in prev else list(idx) for d, idx in entry.items()}
    return out


def _batches(latency_batch: int | tuple[int, ...] | list[int]) -> tuple:
    return tuple(latency_batch) if isinstance(latency_batch, (tuple, list)) else (latency_batch,)


def make_config(config: PruneConfig | None, options: dict) -> PruneConfig:
    """``config``, or one built from keyword arguments (the API's older form, still supported)."""
    if config is not None:
        if options:
            raise SlimkitError(f"prune: give a PruneConfig or keyword options, not both ({', '.join(options)})")
        return config
    fields = {f.name: f for f in dataclasses.fields(PruneConfig)}
    # None stood for "the default" in the older signature (ratios=None, protected=None)
    own = {k: v for k, v in options.items() if k in fields and not (v is None and fields[k].default is not None)}
    extra = {k: v for k, v in options.items() if k not in fields}
    if extra:
        own["criterion_options"] = {**own.get("criterion_options", {}), **extra}
    if isinstance(own.get("protected"), list):
        own["protected"] = tuple(own["protected"])
    return PruneConfig(**own)


def _latency_ratio(reference: nn.Module, model: nn.Module, graph: ChannelGraph, removed: np.ndarray,
                   example_input: torch.Tensor, batch: int | tuple[int, ...],
                   candidate: nn.Module | None = None) -> float:
    """Median interleaved latency ratio (candidate / reference), eager, current threads; the worst over ``batch``."""
    from ..bench import compare

    if candidate is None:
        candidate = copy.deepcopy(model)
        apply_plan(candidate, graph, removed)
    batches = _batches(batch)
    r = compare(reference, candidate, tuple(example_input.shape[1:]), batch_sizes=batches,
                threads=torch.get_num_threads(), modes=("eager",), warmup=2, repeats=9, min_time_s=0.2,
                roofline=False)
    if r.errors:
        raise SlimkitError(f"prune: cannot time the candidate for target_latency: {r.errors}")
    return max(r.ratio("eager", b) for b in batches)


def _profile(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    from ..profile import profile

    p = profile(model, x)
    return p.macs, p.params


def prune_once(model: nn.Module, example_input: torch.Tensor, config: PruneConfig, *,
               reference: tuple[int, int] | None = None, before: tuple[int, int] | None = None,
               latency_reference: nn.Module | None = None,
               **criterion_kwargs) -> tuple[dict, ChannelGraph, tuple[int, int]]:
    """One-shot pruning of ``model`` in place under ``config``: build the graph, score, plan, cut, verify MACs.

    Returns ``(kept, graph, (macs, params) after)``. ``reference`` is the (MACs, params) the
    targets are fractions of (default: this model's); ``latency_reference`` the model whose
    latency ``target_latency`` is a fraction of (default: this model before the cut);
    ``criterion_kwargs`` (``loader``, ``batches``, ``seed``, ``device`` and the criterion's own
    options) go to the criterion. Papers as in :func:`prune`.
    """
    was = model.training
    model.eval()
    graph = build_graph(model, example_input, config.protected, config.untie_shortcuts)
    model.train(was)
    macs0, params0 = before or _profile(model, example_input)
    ref_m, ref_p = reference or (macs0, params0)
    scores = compute_importance(config.criterion, model, graph, **criterion_kwargs)
    target_macs, target_params, target_latency = config.target_macs, config.target_params, config.target_latency
    kw = dict(base_macs=macs0, base_params=params0, target_macs=target_macs, target_params=target_params,
              ratio=config.ratio, ratios=config.ratios or None, round_to=config.round_to, reference_macs=ref_m,
              reference_params=ref_p, rounding=config.rounding)
    latency_batch = config.latency_batch
    if target_latency is not None:
        ref_model = latency_reference if latency_reference is not None else copy.deepcopy(model)

        def latency_of(removed: np.ndarray) -> float:
            return _latency_ratio(ref_model, model, graph, removed, example_input, latency_batch)

        kw["target_latency"] = target_latency
        if config.latency_model == "table":
            from .latency import LatencyTable, model_seconds

            table = LatencyTable(model, graph, example_input, _batches(latency_batch))
            kw.update(latency_table=table, reference_seconds=None if latency_reference is None else
                      model_seconds(latency_reference, example_input, table.batch_sizes))
        else:
            kw["latency_of"] = latency_of
    removed = plan(graph, scores, **kw)
    if kw.get("latency_table") is not None:
        from .latency import closed_loop

        removed = closed_loop(graph, scores, removed, kw, latency_of)
    kept = apply_plan(model, graph, removed)
    macs1, params1 = _profile(model, example_input)
    predicted = macs0 - estimate(graph, np.zeros(graph.num_classes, dtype=bool))[0] + estimate(graph, removed)[0]
    goal = (target_macs * ref_m if target_macs is not None
            else target_params * ref_p if target_params is not None else None)
    if goal is not None and (macs1 if target_macs is not None else params1) > goal:
        import warnings

        warnings.warn(f"slimkit.prune: the target {target_macs or target_params:.3g} cannot be reached: every prunable "
                      f"channel is already at its minimum (MACs {macs1:,}, params {params1:,})", stacklevel=2)
    if macs1 != predicted:
        import warnings

        warnings.warn(f"slimkit.prune: profiled MACs {macs1} differ from the graph's prediction {predicted} "
                      f"(an op the cost model does not cover)", stacklevel=2)
    return kept, graph, (macs1, params1)


def prune(model: nn.Module, example_input: torch.Tensor, config: PruneConfig | None = None, *,
          loader: Iterable | None = None, val_loader: Iterable | None = None,
          finetune: Callable[[nn.Module, int], None] | None = None, inplace: bool = False,
          latency_reference: nn.Module | None = None, seed: int = 0, device: str | torch.device = "cpu",
          checkpoint_dir: str | None = None, progress: bool = False, **options) -> PruneResult:
    """Structured channel pruning with a dependency graph (Li et al., ICLR 2017; Fang et al., CVPR 2023).

    Scores every channel class with ``config.criterion`` (:data:`CRITERIA`), removes the least
    important under one policy (module docstring; :class:`~slimkit.prune.config.PruneConfig`) and
    returns a smaller plain ``nn.Module`` with the kept channel indices of every changed layer
    relative to the input model. With ``steps=k`` it prunes iteratively (Molchanov et al. 2017):
    step ``i`` aims at ``target**(i/k)`` of the original, with ``finetune(model, i)`` (or a fit
    with ``config.step_finetune`` on ``loader``) between steps. ``config.sparsity`` first trains
    with the criterion's sparsity term on ``loader``; ``config.sensitivity`` sets per-group ratios
    from a scan on ``val_loader`` (Li et al. 2017); ``config.reconstruct`` re-solves the cut
    layers' weights against the input model on ``loader`` after the last step (He et al. 2017).

    Args:
        model: the network (left untouched unless ``inplace``).
        example_input: one input batch (shapes only).
        config: the options; keyword ``options`` (``target_macs=0.5``) build one instead. Keywords
            that are no field are the criterion's own options (``aux_epochs`` of ``dcp``).
        loader: training batches, for the data-driven criteria, the reconstruction, sparsity
            training and step fine-tunes.
        val_loader: held-out batches, for the sensitivity scan.
        finetune: called as ``finetune(model, step)`` between iterative steps.
        inplace: prune ``model`` itself.
        latency_reference: the model ``target_latency`` is a fraction of (default the input
            model; e.g. the unpruned one after depth pruning).
        seed, device: for the criteria and training.
        checkpoint_dir: where training in here checkpoints (resumable); none by default.
        progress: show progress bars for that training.

    Returns:
        A :class:`PruneResult` (model, kept indices, counts before/after, warnings).

    Raises:
        SlimkitError: an invalid config, or data missing for what it asks.

    Example:
        >>> import torch, slimkit
        >>> m = slimkit.create_model("resnet20")
        >>> r = prune(m, torch.zeros(1, 3, 32, 32), PruneConfig(target_macs=0.5, criterion="l1"))
        >>> r.macs_after <= 0.5 * r.macs_before
        True
    """
    config = make_config(config, options)
    mode = reconstruct_mode(config.criterion, config.reconstruct)
    entry = CRITERIA.get(config.criterion)
    if (entry.needs_data or mode or config.sparsity or config.step_finetune) and loader is None:
        what = (f"the {config.criterion} criterion" if entry.needs_data else f"weight reconstruction ({mode})" if mode
                else "sparsity training" if config.sparsity else "step_finetune")
        raise SlimkitError(f"prune: {what} needs data: pass loader= (training batches)")
    if config.sensitivity is not None and val_loader is None:
        raise SlimkitError("prune: the sensitivity scan needs held-out data (val_loader=)")
    criterion_kwargs = dict(config.criterion_options)
    if entry.needs_data or mode:
        criterion_kwargs.update(loader=loader, batches=config.batches, device=device, seed=seed)
    elif entry.needs_seed:
        criterion_kwargs["seed"] = seed
    work = model if inplace else copy.deepcopy(model)
    if config.sparsity is not None:
        from ..train import fit
        from .importance import sparsity_term

        name, term = sparsity_term(config.criterion, work, example_input, config.sparsity.strength)
        fit(work, loader, seed=seed, device=device, progress=progress, extra_losses={name: term},
            checkpoint_dir=os.path.join(checkpoint_dir, "sparsity") if checkpoint_dir else None,
            **config.sparsity.fit_kwargs())
    scan = None
    if config.sensitivity is not None:
        from .sensitivity import sensitivity_ratios

        s = config.sensitivity
        ratios, scan = sensitivity_ratios(work, example_input, val_loader, criterion=config.criterion,
                                          target_macs=config.target_macs, max_drop=s.max_drop, steps=s.steps,
                                          batches=s.batches or config.batches, round_to=config.round_to,
                                          rounding=config.rounding,
                                          untie_shortcuts=config.untie_shortcuts, device=device,
                                          **{k: v for k, v in criterion_kwargs.items() if k not in ("batches",
                                                                                                    "device")})
        step_config = config.replace(sensitivity=None, target_macs=None, ratios=ratios)
    else:
        step_config = config
    original = copy.deepcopy(work).eval() if config.target_latency is not None or mode else None
    timing_reference = latency_reference if latency_reference is not None else original  # timed in eval mode
    with torch.no_grad():
        macs0, params0 = _profile(work, example_input)
    kept: dict = {}
    graph = None
    after = (macs0, params0)
    steps = config.steps
    for i in range(1, steps + 1):
        frac = lambda t: None if t is None else t ** (i / steps)  # noqa: E731
        part = lambda r: None if r is None else 1 - (1 - r) ** (1 / steps)  # noqa: E731  (each step on what is left)
        this = step_config.replace(
            target_macs=frac(step_config.target_macs), target_params=frac(step_config.target_params),
            target_latency=frac(step_config.target_latency), ratio=part(step_config.ratio),
            ratios={k: part(v) for k, v in step_config.ratios.items()}, steps=1)
        step_kept, graph, after = prune_once(
            work, example_input, this,
            reference=(macs0, params0) if step_config.target_macs or step_config.target_params else None,
            before=after, latency_reference=timing_reference, **criterion_kwargs)
        kept = _compose(kept, step_kept)
        if i < steps:
            if finetune is not None:
                finetune(work, i)
            elif config.step_finetune is not None:
                from ..train import fit

                fit(work, loader, seed=seed, device=device, progress=progress,
                    checkpoint_dir=os.path.join(checkpoint_dir, f"step{i}") if checkpoint_dir else None,
                    **config.step_finetune.fit_kwargs())
    rebuilt = None
    if mode:
        errors = reconstruct_weights(original, work, kept, loader, mode=mode, batches=config.batches, seed=seed,
                                     device=device)
        rebuilt = {"mode": mode, "layers": errors}
    latency = None
    if config.target_latency is not None:
        was = work.training
        latency = _latency_ratio(timing_reference, work, graph, np.zeros(0, dtype=bool), example_input,
                                 config.latency_batch, candidate=work.eval())
        work.train(was)
        if latency > config.target_latency:
            import warnings

            warnings.warn(f"slimkit.prune: measured latency ratio {latency:.3f} is above the target "
                          f"{config.target_latency:.3g} (timing noise, or every prunable channel is at its minimum)",
                          stacklevel=2)
    result = PruneResult(work, kept, params0, after[1], macs0, after[0], list(graph.warnings) if graph else [],
                         graph.unprunable_layers() if graph else [], latency, rebuilt)
    if scan is not None:
        result.sensitivity, result.ratios = scan.to_dict(), step_config.ratios
    return result
