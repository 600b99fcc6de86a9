"""Channel importance criteria, one score per channel class of a :class:`ChannelGraph`.

A channel class may live in several layers at once (a residual trunk's channel is written by
every block's last conv). Every criterion therefore scores a class by aggregating over all its
member layers, as stated per criterion below; a class none of whose members the criterion can
measure (for ``slimming``: no batch norm) gets ``NaN`` and is never removed.

Registered in :data:`CRITERIA` (``fn(model, graph, *, loader, batches, seed, device) -> scores``):

* ``l1`` / ``l2``: filter norms (Li et al., ICLR 2017, "Pruning Filters for Efficient ConvNets").
* ``random``: uniform random scores, the control every criterion must beat.
* ``taylor``: first-order Taylor expansion of the loss (Molchanov et al., ICLR 2017 and CVPR 2019).
* ``slimming``: batch-norm ``|gamma|`` (Liu et al., ICCV 2017, "Learning Efficient Convolutional
  Networks through Network Slimming"); :func:`slimming_penalty` is its L1 training term.
* ``ssl``: group L2 norm of all weights that go with a channel (Wen et al., NIPS 2016, "Learning
  Structured Sparsity in Deep Neural Networks"); :func:`ssl_penalty` is its group-lasso term.
* ``thinet``, ``lasso``, ``dcp``: data-driven reconstruction criteria of the next layer, in
  :mod:`slimkit.prune.reconstruct` (Luo et al. 2017, He et al. 2017, Zhuang et al. 2018).

Each entry (:class:`Criterion`) carries its facts: whether it needs data (callers then pass
``loader``, ``batches``, ``device`` and ``seed``), a seed, which weight reconstruction its paper
uses, and the paper. Register a new one with :func:`register_criterion`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry
from .graph import ChannelGraph


@dataclass(frozen=True)
class Criterion:
    """A registered criterion and its facts: what it needs, which reconstruction its paper uses, the paper.

    Calling the entry scores: ``CRITERIA.get("l1")(model, graph) -> scores``.
    """

    name: str
    score: Callable[..., np.ndarray]
    needs_data: bool = False  # reads batches: callers pass loader, batches, device, seed
    needs_seed: bool = False  # random draws: callers pass seed
    reconstruct: str | None = None  # the weight reconstruction its paper runs after the cut ("scale", "full")
    paper: str = ""

    def __call__(self, model: nn.Module, graph: ChannelGraph, **kwargs) -> np.ndarray:
        return self.score(model, graph, **kwargs)


CRITERIA: Registry[Criterion] = Registry("pruning criterion")
_PRODUCERS = ("conv", "gconv", "dwconv", "linear")

__all__ = ["CRITERIA", "Criterion", "compute_importance", "criteria_needing_data", "register_criterion",
           "slimming_penalty", "sparsity_term", "ssl_penalty"]


def register_criterion(name: str, *, needs_data: bool = False, needs_seed: bool = False,
                       reconstruct: str | None = None, paper: str = "") -> Callable[[Callable], Callable]:
    """Register ``fn(model, graph, **kwargs) -> scores`` (one per channel class; NaN = keep) with its facts.

    Args:
        name: the criterion's name (``--criterion NAME``, ``criterion: NAME`` in a recipe).
        needs_data: it reads batches of training data.
        needs_seed: it draws random numbers.
        reconstruct: the weight reconstruction its paper runs after the cut (``"scale"``, ``"full"``).
        paper: the citation.

    Example:
        >>> sorted(n for n in CRITERIA.names() if CRITERIA.get(n).needs_data)
        ['dcp', 'lasso', 'taylor', 'thinet']
    """

    def deco(fn: Callable) -> Callable:
        CRITERIA.register(name)(Criterion(name, fn, needs_data, needs_seed, reconstruct, paper))
        return fn

    return deco


def criteria_needing_data() -> set[str]:
    """Names of the criteria that read batches (the facts of their registry entries)."""
    return {n for n in CRITERIA.names() if CRITERIA.get(n).needs_data}


def _mean_over_members(graph: ChannelGraph, per_member: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    total = np.zeros(graph.num_classes)
    count = np.zeros(graph.num_classes)
    for cls, values in per_member:
        np.add.at(total, cls, values)
        np.add.at(count, cls, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _filter_norms(graph: ChannelGraph, p: int) -> np.ndarray:
    members = []
    for rec in graph.layers.values():
        if rec.kind in _PRODUCERS:
            w = rec.module.weight.detach().flatten(1)
            norms = (w.abs().sum(1) if p == 1 else w.pow(2).sum(1).sqrt()).double().cpu().numpy()
            # each layer's norms divided by their mean, so a 1x1 conv with 512 inputs and a 3x3
            # depthwise filter with 9 weights count equally where they share a channel
            members.append((rec.out_cls, norms / max(norms.mean(), 1e-12)))
    return _mean_over_members(graph, members)


@register_criterion("l1", paper="Li et al., ICLR 2017, Pruning Filters for Efficient ConvNets")
def l1_importance(model: nn.Module, graph: ChannelGraph, **_) -> np.ndarray:
    """L1 norm of each channel's filters (Li et al., ICLR 2017, "Pruning Filters for Efficient ConvNets").

    A class's score is the mean, over the layers that produce it (convs, depthwise convs,
    linears), of its filter's L1 norm divided by that layer's mean filter norm; with a single
    producer this orders channels exactly as Li et al.'s ``sum |W_i|``.
    """
    return _filter_norms(graph, 1)


@register_criterion("l2", paper="Li et al., ICLR 2017, Pruning Filters for Efficient ConvNets")
def l2_importance(model: nn.Module, graph: ChannelGraph, **_) -> np.ndarray:
    """L2 norm of each channel's filters (Li et al., ICLR 2017), aggregated as for ``l1``."""
    return _filter_norms(graph, 2)


def _column_norms(w: torch.Tensor, p: int, groups: int = 1) -> np.ndarray:
    """Per-input-channel norm of a conv (out, in/groups, kh, kw) or linear (out, in) weight.

    With ``groups > 1`` input channel ``g*win + j`` is read only by the filters of group ``g``,
    through their column ``j``.
    """
    w = w.detach()
    if groups > 1:
        per = w.abs().flatten(2).sum(2) if p == 1 else w.pow(2).flatten(2).sum(2)  # (out, win)
        per = per.reshape(groups, -1, per.shape[1]).sum(1).reshape(-1)
        return (per if p == 1 else per.sqrt()).double().cpu().numpy()
    cols = w.transpose(0, 1).flatten(1)
    return (cols.abs().sum(1) if p == 1 else cols.pow(2).sum(1).sqrt()).double().cpu().numpy()


@register_criterion("group_l1", paper="Fang et al., CVPR 2023, DepGraph")
def group_l1_importance(model: nn.Module, graph: ChannelGraph, **_) -> np.ndarray:
    """Group L1 magnitude over *every* parameter a channel class couples (Fang et al., CVPR 2023, DepGraph).

    Where ``l1`` (Li et al. 2017) looks only at the filters that *produce* a channel, this is
    the mean, over all coupled layers, of the channel's slice norm: producer filter rows,
    consumer input columns (a linear after ``flatten`` sums the ``H*W`` columns of a channel),
    depthwise filters and batch-norm ``|gamma|``, each raw (not layer-normalised), as
    Torch-Pruning's ``MagnitudeImportance(p=1)`` with mean group reduction does; the planner then
    divides by the group mean. A channel that feeds an important consumer (e.g. a residual trunk
    channel read by the classifier) is therefore kept even if its producing filters are small.
    """
    members = []
    for rec in graph.layers.values():
        w = getattr(rec.module, "weight", None)
        if w is None:
            continue
        if rec.kind in ("conv", "gconv", "linear") and rec.out_cls is not None:
            rows = w.detach().flatten(1)
            members.append((rec.out_cls, rows.abs().sum(1).double().cpu().numpy()))
        if rec.kind in ("conv", "gconv", "linear") and rec.in_cls is not None:
            cols = _column_norms(w, 1, rec.module.groups if rec.kind == "gconv" else 1)
            per_class = np.zeros(graph.num_classes)
            np.add.at(per_class, rec.in_cls, cols)  # flatten -> linear: a class owns H*W columns
            cls = np.unique(rec.in_cls)
            members.append((cls, per_class[cls]))
        if rec.kind == "dwconv":
            members.append((rec.out_cls, w.detach().flatten(1).abs().sum(1).double().cpu().numpy()))
        if rec.kind == "bn":
            members.append((rec.out_cls, w.detach().abs().double().cpu().numpy()))
    return _mean_over_members(graph, members)


@register_criterion("random", needs_seed=True, paper="control (Li et al. 2017)")
def random_importance(model: nn.Module, graph: ChannelGraph, *, seed: int = 0, **_) -> np.ndarray:
    """Uniform random scores (seeded): the control baseline of Li et al. 2017 and of later studies."""
    return np.random.default_rng(seed).random(graph.num_classes)


@register_criterion("slimming", paper="Liu et al., ICCV 2017, Network Slimming")
def slimming_importance(model: nn.Module, graph: ChannelGraph, **_) -> np.ndarray:
    """Batch-norm scale ``|gamma|`` (Liu et al., ICCV 2017, "Network Slimming").

    A class's score is the mean ``|gamma|`` over every batch norm it passes through (raw, not
    layer-normalised: Liu et al. compare scales across layers); classes without a batch norm
    score ``NaN`` and stay. Train with :func:`slimming_penalty` first for the method as published.
    """
    members = [(rec.out_cls, rec.module.weight.detach().abs().double().numpy())
               for rec in graph.layers.values() if rec.kind == "bn" and rec.module.weight is not None]
    return _mean_over_members(graph, members)


@register_criterion("taylor", needs_data=True,
                    paper="Molchanov et al., ICLR 2017 / CVPR 2019, Importance Estimation")
def taylor_importance(model: nn.Module, graph: ChannelGraph, *, loader: Iterable | None = None, batches: int = 8,
                      device: str | torch.device = "cpu", **_) -> np.ndarray:
    """First-order Taylor importance (Molchanov et al., ICLR 2017; CVPR 2019 "Importance Estimation").

    For each minibatch the cross-entropy gradient is taken and a class's score is
    ``(sum g * w)^2`` over *all* parameters that create the channel in every member layer
    (producer filter rows and biases, depthwise filters, batch-norm ``gamma`` and ``beta``):
    that sum is the first-order change of the loss when the whole class is zeroed, which is
    what removing it does. Scores are averaged over ``batches`` minibatches of ``loader``.
    """
    from ..errors import SlimkitError

    if loader is None:
        raise SlimkitError("the taylor criterion needs data (a loader of (inputs, targets) batches)")
    was = model.training
    model.eval()  # batch statistics would make the estimate depend on the batch composition
    total = np.zeros(graph.num_classes)
    seen = 0
    params = [p for p in model.parameters()]
    grad_state = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for x, y in loader:
                if seen >= batches:
                    break
                model.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                loss.backward()
                s = np.zeros(graph.num_classes)
                for rec in graph.layers.values():
                    if rec.kind not in _PRODUCERS + ("bn",):
                        continue
                    for t in (rec.module.weight, getattr(rec.module, "bias", None)):
                        if t is None or t.grad is None:
                            continue
                        gw = (t.grad * t).detach().double().reshape(t.shape[0], -1).sum(1).cpu().numpy()
                        np.add.at(s, rec.out_cls, gw)
                total += s ** 2
                seen += 1
    finally:
        model.zero_grad(set_to_none=True)
        for p, r in zip(params, grad_state):
            p.requires_grad_(r)
        model.train(was)
    if seen == 0:
        raise SlimkitError("the taylor criterion got no batches from its loader")
    return total / seen


def compute_importance(criterion: str, model: nn.Module, graph: ChannelGraph, **kwargs) -> np.ndarray:
    """Scores (one per channel class of ``graph``) by the registered criterion ``criterion``.

    Criteria and papers: ``l1``/``l2`` (Li et al. 2017), ``taylor`` (Molchanov et al. 2017/2019),
    ``slimming`` (Liu et al. 2017), ``ssl`` (Wen et al. 2016), ``thinet`` (Luo et al. 2017),
    ``lasso`` (He et al. 2017), ``dcp`` (Zhuang et al. 2018), ``random`` (control).

    Higher means more important; ``NaN`` means "cannot be measured, keep". ``kwargs`` go to the
    criterion (``loader``/``batches``/``device``/``seed`` for those whose entry ``needs_data``,
    ``seed`` for those that ``needs_seed``).
    """
    return np.asarray(CRITERIA.get(criterion)(model, graph, **kwargs), dtype=np.float64)


def slimming_penalty(strength: float = 1e-4) -> Callable[..., torch.Tensor]:
    """The L1 sparsity term on batch-norm scales of Network Slimming (Liu et al., ICCV 2017, eq. 1).

    Returns ``term(batch) -> strength * sum |gamma|`` over every batch norm of ``batch.model``,
    the form :func:`slimkit.train.fit` takes in ``extra_losses`` (Liu et al. use 1e-4 on CIFAR).
    """
    def term(batch) -> torch.Tensor:
        gammas = [m.weight.abs().sum() for m in batch.model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
        if not gammas:
            return torch.zeros((), device=batch.logits.device)
        return strength * torch.stack(gammas).sum()

    return term


# -- structured sparsity learning (Wen et al., NIPS 2016) -------------------------------------------

def _index(cache: dict, name: str, side: str, cls: np.ndarray, device: torch.device) -> torch.Tensor:
    key = (name, side, device)
    if key not in cache:
        cache[key] = torch.as_tensor(cls, dtype=torch.long, device=device)
    return cache[key]


def _class_sq_norms(graph: ChannelGraph, cache: dict | None = None) -> torch.Tensor:
    """Per class, the sum of squares of every weight removed with it (differentiable).

    That is its producers' filter rows and biases, depthwise filters, batch-norm gamma and beta,
    and its consumers' input columns: SSL's filter-wise and channel-wise groups of one channel
    joined, because structured pruning removes them together.
    """
    total: torch.Tensor | None = None
    cache = {} if cache is None else cache  # index tensors, reused across training steps
    for rec in graph.layers.values():
        m = rec.module
        w = getattr(m, "weight", None)
        if w is None or rec.kind not in ("conv", "dwconv", "linear", "bn"):
            continue
        if total is None:
            total = torch.zeros(graph.num_classes, dtype=w.dtype, device=w.device)
        if rec.out_cls is not None:
            rows = w.pow(2).reshape(w.shape[0], -1).sum(1)
            b = getattr(m, "bias", None)
            if b is not None:
                rows = rows + b.pow(2)
            total = total.index_add(0, _index(cache, rec.name, "out", rec.out_cls, w.device), rows)
        if rec.kind in ("conv", "linear") and rec.in_cls is not None:
            cols = w.pow(2).sum(0)
            cols = cols.reshape(cols.shape[0], -1).sum(1)
            total = total.index_add(0, _index(cache, rec.name, "in", rec.in_cls, w.device), cols)
    return total if total is not None else torch.zeros(graph.num_classes)


@register_criterion("ssl", paper="Wen et al., NIPS 2016, Structured Sparsity Learning")
def ssl_importance(model: nn.Module, graph: ChannelGraph, **_) -> np.ndarray:
    """Group L2 norm of each channel (Wen et al., NIPS 2016, "Learning Structured Sparsity in DNNs").

    A class's score is the L2 norm over every weight that is removed with it in all member layers
    (producer rows and biases, depthwise filters, BN gamma/beta, consumer input columns). Raw, not
    layer-normalised: after training with :func:`ssl_penalty` the groups driven to zero go first.
    """
    with torch.no_grad():
        return _class_sq_norms(graph).double().sqrt().cpu().numpy()


def ssl_penalty(model: nn.Module, graph_or_example: ChannelGraph | torch.Tensor,
                strength: float = 1e-4) -> Callable[..., torch.Tensor]:
    """The group-lasso term of Structured Sparsity Learning (Wen et al., NIPS 2016, eq. 2) over channels.

    Returns ``term(batch) -> strength * sum_k ||W_k||_2`` over the prunable channel classes ``k``
    of ``model``'s :class:`ChannelGraph` (given, or built from an example input), where ``W_k`` is
    every weight removed with class ``k`` (see ``ssl`` above); the form :func:`slimkit.train.fit`
    takes in ``extra_losses``. The term reads ``model``'s live weights, so build it for the model
    being trained (and again after pruning changes its shape).
    """
    from .graph import build_graph

    graph = graph_or_example if isinstance(graph_or_example, ChannelGraph) else build_graph(model, graph_or_example)
    mask = torch.as_tensor(graph.prunable())
    cache: dict = {}

    def term(batch) -> torch.Tensor:
        sq = _class_sq_norms(graph, cache)
        # the epsilon keeps the gradient finite once a group reaches zero
        return strength * (sq[mask.to(sq.device)] + 1e-12).sqrt().sum()

    return term


def sparsity_term(criterion: str, model: nn.Module, example: torch.Tensor,
                  strength: float = 1e-4) -> tuple[str, Callable[..., torch.Tensor]]:
    """The sparsity-training term that suits ``criterion``, as ``(name, term)`` for ``extra_losses``.

    ``ssl`` gets its group lasso (Wen et al., NIPS 2016); every other criterion gets Network
    Slimming's L1 term on batch-norm scales (Liu et al., ICCV 2017), the recipe stage's
    historical ``sparsity:`` behaviour.
    """
    if criterion == "ssl":
        return "ssl", ssl_penalty(model, example, strength)
    return "slimming", slimming_penalty(strength)
