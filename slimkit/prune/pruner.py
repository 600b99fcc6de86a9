"""Pruning policies and the surgery that turns a channel plan into a smaller ``nn.Module``.

Policies (exactly one per call):

* ``target_macs=f`` / ``target_params=f``: global pruning to a fraction ``f`` of the original
  MACs/parameters. Channel classes are ranked by importance divided by the mean importance of
  their group (per-layer normalisation, as in Molchanov et al. 2019 and Torch-Pruning, so layers
  with large weights do not keep all their channels), and the lowest are removed, as many as
  needed: the count is found by bisection on a cost model that is exact for the profiler's
  conv/linear rules, and the result is checked with :func:`slimkit.profile.profile`.
* ``ratio=r``: uniform, every group loses the fraction ``r`` of its channels.
* ``ratios={layer: r}``: explicit per-layer ratios for the group that layer produces (others keep
  ``ratio`` or 0).

Every atom of a group (its channels present in the same layers) keeps a multiple of
``round_to`` channels, never fewer than ``round_to`` (or all of them if it has fewer), so no
layer ever loses all its channels and widths stay friendly to vectorised kernels.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..artifact import register_module
from ..errors import SlimkitError
from .graph import ChannelGraph, build_graph
from .importance import CRITERIA, compute_importance

__all__ = ["PrunedPadShortcut", "PruneResult", "apply_plan", "estimate", "plan", "prune", "prune_once"]


@register_module
class PrunedPadShortcut(nn.Module):
    """Option-A shortcut with an explicit split of the zero channels (``before`` then the rest after).

    :class:`slimkit.models.cifar_resnet.PadShortcut` always pads ``extra // 2`` channels first;
    after pruning, the kept zero channels before and after the input can be any two counts.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, before: int = 0) -> None:
        super().__init__()
        if out_channels < in_channels + before:
            raise ValueError(f"PrunedPadShortcut: {in_channels} + {before} > {out_channels}")
        self.in_channels, self.out_channels, self.stride, self.before = in_channels, out_channels, stride, before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        after = self.out_channels - self.in_channels - self.before
        if self.before or after:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, self.before, after))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, before={self.before}"


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

    def summary(self) -> dict:
        """JSON-ready counts and warnings (without the kept indices)."""
        return {"params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "macs_ratio": self.macs_after / max(self.macs_before, 1),
                "params_ratio": self.params_after / max(self.params_before, 1),
                "warnings": list(self.warnings), "unprunable": list(self.unprunable)}


# -- cost model ---------------------------------------------------------------------------------

def _counts(graph: ChannelGraph, removed: np.ndarray) -> dict[str, tuple[int, int]]:
    keep = ~removed
    out = {}
    for name, rec in graph.layers.items():
        kin = int(keep[rec.in_cls].sum()) if rec.in_cls is not None else 0
        kout = int(keep[rec.out_cls].sum()) if rec.out_cls is not None else 0
        out[name] = (kin, kout)
    return out


def _layer_cost(rec, kin: int, kout: int) -> tuple[int, int]:
    m = rec.module
    if rec.kind == "conv":
        k = m.kernel_size[0] * m.kernel_size[1]
        return rec.macs_unit * kin * kout, k * kin * kout + (kout if m.bias is not None else 0)
    if rec.kind == "dwconv":
        k = m.kernel_size[0] * m.kernel_size[1]
        return rec.macs_unit * kout, k * kout + (kout if m.bias is not None else 0)
    if rec.kind == "linear":
        return rec.macs_unit * kin * kout, kin * kout + (kout if m.bias is not None else 0)
    if rec.kind == "bn":
        return 0, (2 * kout if m.weight is not None else 0)
    return 0, 0


def estimate(graph: ChannelGraph, removed: np.ndarray) -> tuple[int, int]:
    """(MACs, params) of the prunable layers after removing the classes in ``removed`` (the cost model).

    The profiler counts a conv as ``k*k*C_in/groups*C_out*H_out*W_out`` per call and a linear as
    ``rows*in*out``; those layers and batch norms are all that pruning changes, so the total of
    the pruned model is ``profile_before - estimate(none) + estimate(removed)`` exactly. This is
    the resource model that global pruning to a budget needs (as in Molchanov et al. 2019, where
    the budget is FLOPs), computed from the graph rather than by re-running the network.
    """
    macs = params = 0
    for name, (kin, kout) in _counts(graph, removed).items():
        a, b = _layer_cost(graph.layers[name], kin, kout)
        macs, params = macs + a, params + b
    return macs, params


# -- planning -----------------------------------------------------------------------------------

def _normalised(graph: ChannelGraph, scores: np.ndarray) -> np.ndarray:
    ok = graph.prunable() & np.isfinite(scores)
    norm = np.full(graph.num_classes, np.nan)
    for g in graph.groups:
        c = g.classes[ok[g.classes]]
        if len(c):
            norm[c] = scores[c] / max(float(np.mean(np.abs(scores[c]))), 1e-12)
    return norm


def _keep_count(size: int, proposed_removals: int, round_to: int) -> int:
    kept = size - proposed_removals
    kept = int(math.ceil(kept / round_to) * round_to)
    return min(size, max(kept, min(round_to, size)))


def _removal(graph: ChannelGraph, norm: np.ndarray, proposed: np.ndarray, round_to: int) -> np.ndarray:
    """Turn a proposed set of classes into a valid removal: per-atom rounding, lowest scores first."""
    removed = np.zeros(graph.num_classes, dtype=bool)
    for g in graph.groups:
        for atom in g.atoms:
            n_prop = int(proposed[atom].sum())
            if not n_prop:
                continue
            n_remove = len(atom) - _keep_count(len(atom), n_prop, round_to)
            cand = atom[np.isfinite(norm[atom])]
            cand = cand[np.argsort(norm[cand], kind="stable")][:n_remove]
            removed[cand] = True
    return removed


def plan(graph: ChannelGraph, scores: np.ndarray, *, base_macs: int, base_params: int, target_macs: float | None = None,
         target_params: float | None = None, ratio: float | None = None, ratios: dict[str, float] | None = None,
         round_to: int = 8, reference_macs: int | None = None, reference_params: int | None = None) -> np.ndarray:
    """Boolean mask of the channel classes to remove under one policy (see the module docstring).

    Global policies rank classes by importance normalised per group (Molchanov et al., CVPR
    2019, normalise per layer for the same reason: raw scores are not comparable across layers).

    ``target_macs``/``target_params`` are fractions of ``reference_macs``/``reference_params``
    (default: this model's ``base_macs``/``base_params``, the profiler's counts), which lets
    iterative pruning aim every step at a fraction of the *original* model.
    """
    norm = _normalised(graph, scores)
    if ratio is not None or ratios:
        proposed = np.zeros(graph.num_classes, dtype=bool)
        by_layer = dict(ratios or {})
        for g in graph.groups:
            r = next((by_layer[p] for p in g.producers if p in by_layer), ratio or 0.0)
            for atom in g.atoms:
                cand = atom[np.isfinite(norm[atom])]
                n = min(len(cand), int(round(r * len(atom))))
                proposed[cand[np.argsort(norm[cand], kind="stable")][:n]] = True
        return _removal(graph, norm, proposed, round_to)
    order = np.nonzero(np.isfinite(norm))[0]
    order = order[np.argsort(norm[order], kind="stable")]
    none = np.zeros(graph.num_classes, dtype=bool)
    m0, p0 = estimate(graph, none)
    if target_macs is not None:
        goal, idx, base, fixed = target_macs * (reference_macs or base_macs), 0, base_macs, m0
    else:
        goal, idx, base, fixed = target_params * (reference_params or base_params), 1, base_params, p0

    def total(k: int) -> tuple[int, np.ndarray]:
        proposed = none.copy()
        proposed[order[:k]] = True
        removed = _removal(graph, norm, proposed, round_to)
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
    return _give_back(graph, norm, removed, round_to, goal, base - fixed, idx)


def _give_back(graph: ChannelGraph, norm: np.ndarray, removed: np.ndarray, round_to: int, goal: float, offset: int,
               idx: int) -> np.ndarray:
    """Restore whole rounding chunks, most important first, while the goal still holds.

    Rounding makes many atoms drop ``round_to`` channels at once near the bisection point, which
    can overshoot the target by far; giving back the best removed chunks undoes the overshoot.
    """
    chunks = []
    for g in graph.groups:
        for atom in g.atoms:
            gone = atom[removed[atom]]
            if not len(gone):
                continue
            gone = gone[np.argsort(-norm[gone], kind="stable")]
            kept = len(atom) - len(gone)
            n = round_to if kept + round_to <= len(atom) else len(gone)
            chunks.append((float(np.mean(norm[gone[:n]])), gone[:n]))
    chunks.sort(key=lambda c: -c[0])
    for _, chunk in chunks:
        removed[chunk] = False
        if offset + estimate(graph, removed)[idx] > goal:
            removed[chunk] = True
    return removed


# -- surgery ------------------------------------------------------------------------------------

def _idx(keep: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.nonzero(keep)[0], dtype=torch.long)


def _new_conv(m: nn.Conv2d, kin: torch.Tensor, kout: torch.Tensor, depthwise: bool) -> nn.Conv2d:
    n_in, n_out = (len(kout), len(kout)) if depthwise else (len(kin), len(kout))
    # skip_init: the weights are overwritten at once, and random init of a large layer costs seconds
    new = nn.utils.skip_init(nn.Conv2d, n_in, n_out, m.kernel_size, m.stride, m.padding, m.dilation,
                             groups=n_out if depthwise else 1, bias=m.bias is not None, padding_mode=m.padding_mode,
                             device=m.weight.device, dtype=m.weight.dtype)
    w = m.weight.detach()[kout]
    new.weight.data.copy_(w if depthwise else w[:, kin])
    if m.bias is not None:
        new.bias.data.copy_(m.bias.detach()[kout])
    new.train(m.training)
    return new


def _new_linear(m: nn.Linear, kin: torch.Tensor, kout: torch.Tensor) -> nn.Linear:
    new = nn.utils.skip_init(nn.Linear, len(kin), len(kout), bias=m.bias is not None, device=m.weight.device,
                             dtype=m.weight.dtype)
    new.weight.data.copy_(m.weight.detach()[:, kin][kout] if len(kout) < len(kin) else m.weight.detach()[kout][:, kin])
    if m.bias is not None:
        new.bias.data.copy_(m.bias.detach()[kout])
    new.train(m.training)
    return new


def _new_bn(m: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor) -> nn.Module:
    ref = m.weight if m.weight is not None else m.running_mean
    new = type(m)(len(keep), eps=m.eps, momentum=m.momentum, affine=m.affine,
                  track_running_stats=m.track_running_stats,
                  **({"device": ref.device, "dtype": ref.dtype} if ref is not None else {}))
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, name, None)
        if t is not None:
            getattr(new, name).data.copy_(t.detach()[keep])
    if m.num_batches_tracked is not None:
        new.num_batches_tracked.copy_(m.num_batches_tracked)
    new.train(m.training)
    return new


def _new_pad(m: nn.Module, keep_in: np.ndarray, keep_out: np.ndarray) -> nn.Module:
    from ..models.cifar_resnet import PadShortcut

    extra = m.out_channels - m.in_channels
    first = getattr(m, "before", extra // 2)
    kin, kout = int(keep_in.sum()), int(keep_out.sum())
    before = int(keep_out[:first].sum())
    if before == (kout - kin) // 2:
        return PadShortcut(kin, kout, m.stride)
    return PrunedPadShortcut(kin, kout, m.stride, before)


def _fix_attrs(model: nn.Module) -> None:
    """Keep registered blocks' constructor attributes true to their pruned children (artifacts read them)."""
    from ..models.layers import ConvBNAct, DepthwiseSeparable, SeparableConv, SqueezeExcite

    for m in model.modules():
        if isinstance(m, ConvBNAct):
            m.in_channels, m.out_channels, m.groups = m[0].in_channels, m[0].out_channels, m[0].groups
        elif isinstance(m, DepthwiseSeparable):
            m.in_channels, m.out_channels = m[0].in_channels, m[1].out_channels
        elif isinstance(m, SeparableConv):
            m.in_channels, m.out_channels = m[0].in_channels, m[1].out_channels
        elif isinstance(m, SqueezeExcite):
            m.channels = m.fc1.in_channels


def apply_plan(model: nn.Module, graph: ChannelGraph, removed: np.ndarray) -> dict[str, dict[str, list[int]]]:
    """Remove the classes ``removed`` from ``model`` in place; return the kept indices per changed layer.

    Every layer a channel class touches is cut at once, as DepGraph (Fang et al., CVPR 2023)
    prescribes for coupled layers.

    Each changed layer is replaced by a smaller layer of the same ``torch.nn`` type holding the
    kept slices of its weights (no masks); a module reachable under several names is replaced
    under all of them. The result maps a layer name to ``{"in": [...], "out": [...]}`` (batch
    norms and depthwise convs have only ``"out"``), indices into the layer as it was.
    """
    keep_cls = ~removed
    paths: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    kept: dict[str, dict[str, list[int]]] = {}
    for name, rec in graph.layers.items():
        m = rec.module
        kin = keep_cls[rec.in_cls] if rec.in_cls is not None else None
        kout = keep_cls[rec.out_cls] if rec.out_cls is not None else None
        if (kin is None or kin.all()) and (kout is None or kout.all()):
            continue
        if rec.kind == "conv":
            new = _new_conv(m, _idx(kin), _idx(kout), False)
        elif rec.kind == "dwconv":
            new = _new_conv(m, None, _idx(kout), True)
        elif rec.kind == "linear":
            new = _new_linear(m, _idx(kin), _idx(kout))
        elif rec.kind == "bn":
            new = _new_bn(m, _idx(kout))
        elif rec.kind == "pad":
            new = _new_pad(m, kin, kout)
        else:
            raise SlimkitError(f"internal: layer {name} ({rec.kind}) was blocked but the plan changes it")
        entry = {"out": np.nonzero(kout)[0].tolist()}
        if rec.kind in ("conv", "linear", "pad"):
            entry["in"] = np.nonzero(kin)[0].tolist()
        kept[name] = entry
        for path in paths.get(id(m), [name]):
            parent_name, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if isinstance(parent, (nn.Sequential, nn.ModuleList)) and attr.isdigit():
                parent[int(attr)] = new
            else:
                setattr(parent, attr, new)
    _fix_attrs(model)
    return kept


def _compose(old: dict, new: dict) -> dict:
    out = {k: {d: list(v) for d, v in e.items()} for k, e in old.items()}
    for name, entry in new.items():
        prev = old.get(name)
        out[name] = {d: [prev[d][i] for i in idx] if prev and d in prev else list(idx) for d, idx in entry.items()}
    return out


def _check_policy(criterion: str, target_macs, target_params, ratio, ratios, round_to, steps) -> None:
    CRITERIA.get(criterion)  # unknown names fail here, listing the known ones
    given = [n for n, v in (("target_macs", target_macs), ("target_params", target_params), ("ratio", ratio),
                            ("ratios", ratios)) if v is not None]
    if len(given) == 0:
        raise SlimkitError("prune: give one of target_macs, target_params, ratio or ratios")
    if len(given) > 1 and not (set(given) == {"ratio", "ratios"}):
        raise SlimkitError(f"prune: give only one policy, got {', '.join(given)}")
    for name, v in (("target_macs", target_macs), ("target_params", target_params)):
        if v is not None and not (isinstance(v, (int, float)) and 0 < v <= 1):
            raise SlimkitError(f"prune: {name} is a fraction of the original in (0, 1], got {v!r}")
    for name, v in [("ratio", ratio)] + [(f"ratios[{k}]", r) for k, r in (ratios or {}).items()]:
        if v is not None and not (isinstance(v, (int, float)) and 0 <= v < 1):
            raise SlimkitError(f"prune: {name} is the fraction of channels to remove, in [0, 1), got {v!r}")
    if not isinstance(round_to, int) or round_to < 1:
        raise SlimkitError(f"prune: round_to must be a positive integer, got {round_to!r}")
    if not isinstance(steps, int) or steps < 1:
        raise SlimkitError(f"prune: steps must be a positive integer, got {steps!r}")


def _profile(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    from ..profile import profile

    p = profile(model, x)
    return p.macs, p.params


def prune_once(model: nn.Module, example_input: torch.Tensor, *, criterion: str = "l1",
               target_macs: float | None = None,
               target_params: float | None = None, ratio: float | None = None, ratios: dict[str, float] | None = None,
               round_to: int = 8, protected: tuple[str, ...] | list[str] = (), reference: tuple[int, int] | None = None,
               before: tuple[int, int] | None = None, **criterion_kwargs) -> tuple[dict, ChannelGraph, tuple[int, int]]:
    """One-shot pruning of ``model`` in place: build the graph, score, plan, cut, verify MACs.

    Returns ``(kept, graph, (macs, params) after)``. ``reference`` is the (MACs, params) the
    targets are fractions of (default: this model's). Papers as in :func:`prune`.
    """
    was = model.training
    model.eval()
    graph = build_graph(model, example_input, protected)
    model.train(was)
    macs0, params0 = before or _profile(model, example_input)
    ref_m, ref_p = reference or (macs0, params0)
    scores = compute_importance(criterion, model, graph, **criterion_kwargs)
    kw = dict(base_macs=macs0, base_params=params0, target_macs=target_macs, target_params=target_params,
              ratio=ratio, ratios=ratios, round_to=round_to, reference_macs=ref_m, reference_params=ref_p)
    removed = plan(graph, scores, **kw)
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


def prune(model: nn.Module, example_input: torch.Tensor, *, criterion: str = "l1", target_macs: float | None = None,
          target_params: float | None = None, ratio: float | None = None, ratios: dict[str, float] | None = None,
          round_to: int = 8, protected: tuple[str, ...] | list[str] = (), steps: int = 1,
          finetune: Callable[[nn.Module, int], None] | None = None, inplace: bool = False,
          **criterion_kwargs) -> PruneResult:
    """Structured channel pruning with a dependency graph (Li et al. 2017; Fang et al. 2023).

    Scores every channel class with ``criterion`` (see :data:`CRITERIA`: ``l1``/``l2`` of Li et
    al. 2017, ``taylor`` of Molchanov et al. 2017/2019, ``slimming`` of Liu et al. 2017,
    ``random``), removes the least important under one policy (``target_macs``,
    ``target_params``, ``ratio`` or ``ratios``; see the module docstring), and returns a
    smaller plain ``nn.Module`` with the kept channel indices of every changed layer relative
    to the input model. With ``steps=k`` it prunes iteratively (Molchanov et al. 2017): step
    ``i`` aims at ``target**(i/k)`` of the original and ``finetune(model, i)`` runs between
    steps. ``criterion_kwargs`` go to the criterion (``loader`` for ``taylor``). The input
    model is left untouched unless ``inplace``.
    """
    _check_policy(criterion, target_macs, target_params, ratio, ratios, round_to, steps)
    work = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        macs0, params0 = _profile(work, example_input)
    kept: dict = {}
    graph = None
    after = (macs0, params0)
    for i in range(1, steps + 1):
        frac = lambda t: None if t is None else t ** (i / steps)  # noqa: E731
        part = lambda r: None if r is None else 1 - (1 - r) ** (1 / steps)  # noqa: E731  (each step on what is left)
        step_kept, graph, after = prune_once(
            work, example_input, criterion=criterion, target_macs=frac(target_macs), target_params=frac(target_params),
            ratio=part(ratio), ratios={k: part(v) for k, v in ratios.items()} if ratios else None, round_to=round_to,
            protected=protected, reference=(macs0, params0) if target_macs or target_params else None,
            before=after, **criterion_kwargs)
        kept = _compose(kept, step_kept)
        if finetune is not None and i < steps:
            finetune(work, i)
    return PruneResult(work, kept, params0, after[1], macs0, after[0], list(graph.warnings) if graph else [],
                       graph.unprunable_layers() if graph else [])
