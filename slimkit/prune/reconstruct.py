"""Data-driven criteria that judge a channel by what the *next* layer loses without it.

Registered in :data:`slimkit.prune.importance.CRITERIA` (with ``needs_data``: they need a
``loader`` of ``(inputs, targets)`` batches, of which they read ``batches``):

* ``thinet``: ThiNet (Luo et al., ICCV 2017, "ThiNet: A Filter Level Pruning Method for Deep
  Neural Network Compression"): greedy removal of the channels that add the least squared error
  to the consuming layers' outputs.
* ``lasso``: LASSO channel selection (He et al., ICCV 2017, "Channel Pruning for Accelerating
  Very Deep Neural Networks"): the order in which channels leave the LASSO solution as the
  penalty grows.
* ``dcp`` (in :mod:`slimkit.prune.dcp`, on the same machinery): discrimination-aware channel
  pruning (Zhuang et al., NeurIPS 2018): gradient norm of an auxiliary classifier's loss plus
  the reconstruction loss w.r.t. each channel's weights.

and :func:`reconstruct_weights`, the least-squares step that both ThiNet and He et al. run after
the cut: the layers that lost input channels get new weights that best reproduce the original
model's outputs from the pruned model's inputs (``mode="scale"``: ThiNet's one factor per kept
input channel; ``mode="full"``: He et al.'s full re-solve of the kept weights).

Shared machinery: the inputs of a consuming layer (a dense conv or a linear) are sampled at a
fixed number of random output positions per image (ThiNet and He et al. both use 10); at each
sample the layer's output is split into per-input-channel *contributions* ``z_c`` (the output
computed from channel ``c`` alone, bias excluded), whose Gram matrix ``G = sum z z^T`` is all the
reconstruction criteria need: the squared error of removing a set ``T`` is ``1_T^T G 1_T``. A
channel class read by several consumers (a residual trunk) sums their Gram matrices, each divided
by its layer's output energy so that every consumer's *relative* error counts the same.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlimkitError
from .graph import ChannelGraph, LayerRecord
from .importance import CRITERIA, register_criterion

__all__ = ["lasso_importance", "reconstruct_mode", "reconstruct_weights", "thinet_importance"]

#: the post-pruning reconstruction each paper prescribes (used when a stage or CLI says "auto")

_CHUNK = 1 << 22  # elements of one contribution tensor: bounds memory on wide layers


# -- data, sampling, capture -----------------------------------------------------------------------

def _take(loader: Iterable | None, batches: int, name: str, targets: bool = False) -> list[tuple]:
    if loader is None:
        raise SlimkitError(f"the {name} criterion needs data (a loader of (inputs, targets) batches)")
    out = []
    for item in loader:
        if len(out) >= batches:
            break
        x, y = (item[0], item[1]) if isinstance(item, (tuple, list)) and len(item) > 1 else (item, None)
        if targets and y is None:
            raise SlimkitError(f"the {name} criterion needs labelled batches (inputs, targets)")
        out.append((x, y))
    if not out:
        raise SlimkitError(f"the {name} criterion got no batches from its loader")
    return out


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def _run(model: nn.Module, x: torch.Tensor, modules: list[nn.Module],
         stop: nn.Module | None = None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """Forward ``x``; return (input, output) of the first call of each of ``modules``, and the model output.

    With ``stop`` the pass ends after that module (the output is then ``None``): layers behind
    the one being measured would only cost time.
    """
    box: dict[int, tuple] = {}
    hooks = []
    targets = {id(m): m for m in [*modules, *([stop] if stop is not None else [])]}
    for m in targets.values():  # one hook per module, even when it is both measured and the stop
        idx = [i for i, t in enumerate(modules) if t is m]

        def hook(mod, inp, out, idx=idx, halt=m is stop):
            for i in idx:
                box.setdefault(i, (inp[0], out))
            if halt:
                raise _Stop

        hooks.append(m.register_forward_hook(hook))
    out = None
    try:
        out = model(x)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    missing = [i for i in range(len(modules)) if i not in box]
    if missing:
        raise SlimkitError(f"{type(modules[missing[0]]).__name__} layer is not called by the model's forward")
    return [box[i] for i in range(len(modules))], out


def _positions(n: int, hw: int, positions: int | None, gen: torch.Generator) -> torch.Tensor | None:
    """(n, positions) flat output positions per image, distinct within an image; ``None`` = all."""
    if positions is None or positions >= hw:
        return None
    return torch.rand(n, hw, generator=gen).argsort(1)[:, :positions]


def _patches(m: nn.Module, x: torch.Tensor, out: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """Layer inputs at the sampled output positions as ``(S, C, K)``, matching ``_weight3(m)``."""
    if isinstance(m, nn.Linear):
        return x.reshape(x.shape[0], -1, 1)
    n, c = x.shape[:2]
    ho, wo = out.shape[2:]
    x = F.pad(x, m._reversed_padding_repeated_twice, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    if pos is None:
        pos = torch.arange(ho * wo).expand(n, -1)
    pos = pos.to(x.device)
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    ih = (pos // wo)[..., None] * sh + torch.arange(kh, device=x.device) * dh  # (N, P, kh)
    iw = (pos % wo)[..., None] * sw + torch.arange(kw, device=x.device) * dw  # (N, P, kw)
    ni = torch.arange(n, device=x.device)[:, None, None, None]
    p = x.permute(0, 2, 3, 1)[ni, ih[..., :, None], iw[..., None, :]]  # (N, P, kh, kw, C)
    return p.permute(0, 1, 4, 2, 3).reshape(-1, c, kh * kw)


def _outputs_at(y: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """Layer outputs at the sampled positions as ``(S, O)``, rows in the order of :func:`_patches`."""
    if y.dim() == 2:
        return y
    n, o = y.shape[:2]
    y = y.flatten(2)
    if pos is not None:
        y = y.gather(2, pos.to(y.device)[:, None, :].expand(n, o, -1))
    return y.transpose(1, 2).reshape(-1, o)


def _weight3(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach()
    return w.reshape(w.shape[0], w.shape[1], -1)


def _contributions(p: torch.Tensor, w3: torch.Tensor):
    """Yield ``(rows, z)``: per-input-channel output contributions ``z[s, o, c]`` in memory-bounded chunks."""
    o, c, _ = w3.shape
    step = max(1, _CHUNK // max(1, o * c))
    for i in range(0, p.shape[0], step):
        yield slice(i, i + step), torch.einsum("sck,ock->soc", p[i:i + step], w3)


def _consumers(graph: ChannelGraph) -> list[LayerRecord]:
    """Layers whose weights read channel classes: dense convs and linears (depthwise convs keep the class)."""
    return [r for r in graph.layers.values()
            if r.kind in ("conv", "linear") and r.in_cls is not None and len(r.in_cls)]


def _modules_eval(*models: nn.Module):
    states = [[mod.training for mod in m.modules()] for m in models]
    for m in models:
        m.eval()  # batch statistics would make every measurement depend on the batch composition

    def restore() -> None:
        for m, st in zip(models, states):
            for mod, t in zip(m.modules(), st):
                mod.training = t

    return restore


# -- the contribution Gram matrices (ThiNet, LASSO) ------------------------------------------------

def _collect_grams(model: nn.Module, graph: ChannelGraph, data: list, positions: int | None, max_outputs: int,
                   seed: int, device) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per consumer: its input classes and the Gram matrix of their contributions over the samples."""
    consumers = _consumers(graph)
    gen = torch.Generator().manual_seed(seed)
    acc: dict[str, list] = {}
    for rec in consumers:
        uniq, inv = np.unique(rec.in_cls, return_inverse=True)
        # a flattened channel feeds a linear through H*W features: their contributions add up
        inv_t = torch.as_tensor(inv, device=rec.module.weight.device) if len(uniq) < len(inv) else None
        acc[rec.name] = [uniq, inv_t, None]

    def hook_for(rec: LayerRecord):
        def hook(m, inp, out):
            uniq, inv, gram = acc[rec.name]
            x = inp[0].detach()
            pos = _positions(x.shape[0], out[0, 0].numel() if out.dim() == 4 else 1, positions, gen)
            w3 = _weight3(m)
            if w3.shape[0] > max_outputs:  # ThiNet samples output channels as well as positions
                w3 = w3[torch.randperm(w3.shape[0], generator=gen)[:max_outputs].to(w3.device)]
            if gram is None:
                gram = torch.zeros(len(uniq), len(uniq), dtype=torch.float64, device=w3.device)
            for _, z in _contributions(_patches(m, x, out, pos), w3):
                if inv is not None:
                    z = z.new_zeros(*z.shape[:2], len(uniq)).index_add_(2, inv, z)
                z = z.reshape(-1, z.shape[-1]).double()
                gram += z.T @ z
            acc[rec.name][2] = gram
        return hook

    restore = _modules_eval(model)
    hooks = [rec.module.register_forward_hook(hook_for(rec)) for rec in consumers]
    try:
        with torch.no_grad():
            for x, _ in data:
                model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
        restore()
    return {name: (uniq, gram.cpu().numpy()) for name, (uniq, _, gram) in acc.items() if gram is not None}


def _group_grams(graph: ChannelGraph, grams: dict[str, tuple[np.ndarray, np.ndarray]]):
    """Yield ``(classes, G)`` per group: prunable measured classes and their summed relative Gram."""
    ok = graph.prunable()
    local = np.full(graph.num_classes, -1)
    sums: dict[int, np.ndarray] = {}
    seen: dict[int, np.ndarray] = {}
    members: dict[int, np.ndarray] = {}
    for g in graph.groups:
        cls = g.classes[ok[g.classes]]
        local[cls] = np.arange(len(cls))
        members[g.id] = cls
    for uniq, gram in grams.values():
        energy = gram.sum()  # ||output - bias||^2 over the samples, from all of the layer's inputs
        if not energy > 0:
            continue
        gid = np.where(ok[uniq], graph.class_group[uniq], -1)
        for g in np.unique(gid[gid >= 0]).tolist():
            li = np.nonzero(gid == g)[0]
            gi = local[uniq[li]]
            n = len(members[g])
            sums.setdefault(g, np.zeros((n, n)))[np.ix_(gi, gi)] += gram[np.ix_(li, li)] / energy
            seen.setdefault(g, np.zeros(n, dtype=bool))[gi] = True
    for g, total in sums.items():
        m = seen[g]
        yield members[g][m], total[np.ix_(m, m)]


def _greedy_removal(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ThiNet's greedy selection: the removal order and the squared error after each removal.

    Removing set ``T`` costs ``1_T^T G 1_T``; adding ``i`` to it costs ``err + 2 G[i, T].sum() + G[i, i]``.
    """
    n = len(gram)
    removed = np.zeros(n, dtype=bool)
    cross = np.zeros(n)
    diag = np.diag(gram).copy()
    err = 0.0
    order, errs = np.empty(n, dtype=np.int64), np.empty(n)
    for step in range(n):
        cost = np.where(removed, np.inf, err + 2 * cross + diag)
        i = int(np.argmin(cost))
        err = float(cost[i])
        removed[i] = True
        cross += gram[:, i]
        order[step], errs[step] = i, err
    return order, errs


@register_criterion("thinet", needs_data=True, needs_seed=True, reconstruct="scale",
                    paper="Luo et al., ICCV 2017, ThiNet")
def thinet_importance(model: nn.Module, graph: ChannelGraph, *, loader: Iterable | None = None, batches: int = 8,
                      positions: int | None = 10, max_outputs: int = 64, seed: int = 0,
                      device: str | torch.device = "cpu", **_) -> np.ndarray:
    """ThiNet channel importance (Luo et al., ICCV 2017, "ThiNet: A Filter Level Pruning Method").

    On ``batches`` batches of ``loader``, at ``positions`` random output positions per image (and at
    most ``max_outputs`` random output channels), each consuming layer's output is split into its
    input channels' contributions; per group, channels are removed greedily, each time the one
    that adds the least squared error (relative to each consumer's output energy, summed over
    consumers). A class's score is the cumulative relative error once it is removed (made
    non-decreasing), so earlier-removed channels score lower and a channel that contributes
    nothing scores ~0. Classes no dense conv or linear reads score ``NaN`` (kept).
    """
    data = _take(loader, batches, "thinet")
    scores = np.full(graph.num_classes, np.nan)
    grams = _collect_grams(model, graph, data, positions, max_outputs, seed, device)
    for cls, gram in _group_grams(graph, grams):
        order, errs = _greedy_removal(gram)
        s = np.maximum.accumulate(errs)
        # a rank term far below any error difference keeps ties (zero-contribution channels) ordered
        s = s + np.arange(1, len(s) + 1) * 1e-9 * max(float(s[-1]), 1e-30) / len(s)
        scores[cls[order]] = s
    return scores


# -- LASSO channel selection (He et al. 2017) ------------------------------------------------------

def _lasso(gram: np.ndarray, b: np.ndarray, lam: float, beta: np.ndarray, lip: float, iters: int = 500) -> np.ndarray:
    """FISTA on ``1/2 beta^T G beta - b^T beta + lam |beta|_1`` (the LASSO objective written with the Gram)."""
    x, y, t = beta.copy(), beta.copy(), 1.0
    for _ in range(iters):
        z = y - (gram @ y - b) / lip
        new = np.sign(z) * np.maximum(np.abs(z) - lam / lip, 0.0)
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        y = new + (t - 1) / t_new * (new - x)
        done = np.max(np.abs(new - x)) <= 1e-7 * max(1.0, float(np.max(np.abs(new))))
        x, t = new, t_new
        if done:
            break
    return x


def _lasso_path_scores(gram: np.ndarray, penalties: int) -> np.ndarray:
    """Rank channels by the largest penalty at which their LASSO coefficient is still non-zero.

    The target is the full output, ``G @ 1`` in Gram form. Penalties run down a geometric grid
    from ``lambda_max`` (all zero) to ``1e-4 lambda_max``; a channel entering at grid step ``k``
    scores ``penalties - k`` plus its ``|beta|`` there relative to the others entering at ``k``
    (a tie-break in ``(0, 1]``); channels that never enter score ``|b_i| / lambda_max`` in [0, 1).
    """
    b = gram.sum(1)
    lam_max = float(np.max(np.abs(b))) if len(b) else 0.0
    if lam_max <= 0:
        return np.zeros(len(b))
    lip = max(float(np.linalg.eigvalsh(gram)[-1]), 1e-30)
    beta = np.zeros(len(b))
    entry = np.full(len(b), -1)
    mag = np.zeros(len(b))
    for k, lam in enumerate(lam_max * np.logspace(0, -4, penalties)):
        beta = _lasso(gram, b, lam, beta, lip)
        new = (beta != 0) & (entry < 0)
        if new.any():
            entry[new] = k
            mag[new] = np.abs(beta[new]) / np.abs(beta[new]).max()
    return np.where(entry >= 0, penalties - entry + mag, np.abs(b) / lam_max * (1 - 1e-9))


@register_criterion("lasso", needs_data=True, needs_seed=True, reconstruct="full",
                    paper="He et al., ICCV 2017, Channel Pruning")
def lasso_importance(model: nn.Module, graph: ChannelGraph, *, loader: Iterable | None = None, batches: int = 8,
                     positions: int | None = 10, max_outputs: int = 64, penalties: int = 32, seed: int = 0,
                     device: str | torch.device = "cpu", **_) -> np.ndarray:
    """LASSO channel selection (He et al., ICCV 2017, "Channel Pruning for Accelerating Very Deep Neural Networks").

    Per group, the coefficients ``beta`` of ``min ||Y - sum_c beta_c z_c||^2 + lambda |beta|_1``
    (``z_c``: channel ``c``'s contribution to its consumers' outputs on sampled positions, as
    for ``thinet``) are solved along ``penalties`` increasing values of ``lambda``. He et al.
    raise ``lambda`` until the wanted number of coefficients is zero; since the planner decides
    that number later, the whole path is kept instead: a channel scores by the largest penalty
    at which it survives, so any cut the planner makes is the paper's selection at some
    ``lambda``. Pair with :func:`reconstruct_weights` (``mode="full"``), the paper's second step.
    """
    data = _take(loader, batches, "lasso")
    scores = np.full(graph.num_classes, np.nan)
    grams = _collect_grams(model, graph, data, positions, max_outputs, seed, device)
    for cls, gram in _group_grams(graph, grams):
        scores[cls] = _lasso_path_scores(gram, penalties)
    return scores


# -- least-squares weight reconstruction (ThiNet, He et al.) ---------------------------------------

def reconstruct_weights(original: nn.Module, pruned: nn.Module, kept: dict[str, dict[str, list[int]]],
                        loader: Iterable | None, *, mode: str = "full", batches: int = 8,
                        positions: int | None = 10, ridge: float = 1e-3, seed: int = 0,
                        device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """Least-squares reconstruction of the layers that lost input channels (ThiNet 2017; He et al. 2017).

    For every dense conv or linear of ``pruned`` whose inputs were cut (per ``kept``, as returned
    by :func:`slimkit.prune.prune`, relative to ``original``), in forward order, the weights are
    re-solved so the layer's output on the pruned model's *actual* inputs (earlier layers already
    reconstructed, as in He et al.) best matches the original model's output for the kept output
    channels, on ``batches`` batches at ``positions`` random positions per image (``None``: all).
    ``mode="scale"`` fits one factor per kept input channel (ThiNet, eq. 6); ``mode="full"``
    re-solves every kept weight (He et al., the second step). ``ridge`` (relative to the mean
    diagonal) pulls the solution toward the current weights, so the sampled error never rises;
    ``mode="full"`` draws more positions where needed to have 4 samples per unknown.
    Changes ``pruned`` in place; returns ``{layer: {"before": e0, "after": e1}}``, the relative
    squared errors on the samples.
    """
    if mode not in ("scale", "full"):
        raise SlimkitError(f"reconstruct: mode must be 'scale' or 'full', got {mode!r}")
    data = _take(loader, batches, "weight reconstruction")
    layers = []
    for name, entry in kept.items():
        try:
            m_p, m_o = pruned.get_submodule(name), original.get_submodule(name)
        except AttributeError:
            continue
        dense = isinstance(m_p, nn.Linear) or (isinstance(m_p, nn.Conv2d) and m_p.groups == 1)
        if dense and "in" in entry and len(entry["in"]) < m_o.weight.shape[1]:
            layers.append((name, m_p, m_o, torch.as_tensor(entry["out"], dtype=torch.long)))
    if not layers:
        return {}
    restore = _modules_eval(original, pruned)
    report = {}
    try:
        with torch.no_grad():
            order: list[nn.Module] = []
            hooks = [m.register_forward_pre_hook(lambda mod, inp: order.append(mod)) for _, m, _, _ in layers]
            try:
                pruned(data[0][0].to(device))
            finally:
                for h in hooks:
                    h.remove()
            rank: dict[int, int] = {}
            for i, m in enumerate(order):
                rank.setdefault(id(m), i)
            layers.sort(key=lambda t: rank.get(id(t[1]), len(order)))
            for li, (name, m_p, m_o, keep_out) in enumerate(layers):
                report[name] = _reconstruct_layer(original, pruned, m_o, m_p, keep_out, data, mode, positions,
                                                  ridge, seed * 1000003 + li, device)
    finally:
        restore()
    return report


def _reconstruct_layer(original, pruned, m_o, m_p, keep_out, data, mode, positions, ridge, seed, device) -> dict:
    w = m_p.weight
    bias = m_o.bias.detach()[keep_out.to(w.device)] if m_o.bias is not None else None
    if mode == "full" and positions is not None:
        # a full re-solve has C_in*k*k unknowns per output: draw enough positions for at least
        # 4 samples per unknown, or it fits the samples and not the layer
        images = sum(int(x.shape[0]) for x, _ in data)
        positions = max(positions, -(-4 * w[0].numel() // images))
    ata = aty = None
    yty = 0.0
    for b, (x, _) in enumerate(data):
        x = x.to(device)
        ((_, y_o),), _ = _run(original, x, [m_o], stop=m_o)
        ((x_p, y_p),), _ = _run(pruned, x, [m_p], stop=m_p)
        gen = torch.Generator().manual_seed(seed * 7919 + b)
        pos = _positions(x_p.shape[0], y_p[0, 0].numel() if y_p.dim() == 4 else 1, positions, gen)
        target = _outputs_at(y_o, pos)[:, keep_out.to(y_o.device)]
        if bias is not None:
            target = target - bias
        target = target.double()
        p = _patches(m_p, x_p, y_p, pos)
        if mode == "full":
            a = p.reshape(p.shape[0], -1).double()
            ata = (0 if ata is None else ata) + a.T @ a
            aty = (0 if aty is None else aty) + a.T @ target
        else:
            for rows, z in _contributions(p, _weight3(m_p)):
                z = z.double()
                zz = z.reshape(-1, z.shape[-1])
                ata = (0 if ata is None else ata) + zz.T @ zz
                aty = (0 if aty is None else aty) + torch.einsum("soc,so->c", z, target[rows])[:, None]
        yty += float(target.pow(2).sum())
    # current solution: the pruned weights (full) or unit scales (scale)
    x0 = (w.detach().reshape(w.shape[0], -1).T if mode == "full" else torch.ones(ata.shape[0], 1)).to(ata)
    lam = ridge * float(torch.diagonal(ata).mean())
    eye = torch.eye(ata.shape[0], dtype=ata.dtype, device=ata.device)
    sol = torch.linalg.solve(ata + lam * eye, aty + lam * x0) if lam > 0 else x0

    def err(v: torch.Tensor) -> float:
        return (yty - 2 * float((v * aty).sum()) + float((v * (ata @ v)).sum())) / max(yty, 1e-30)

    before, after = err(x0), err(sol)
    if after < before:
        if mode == "full":
            w.data.copy_(sol.T.reshape(w.shape).to(w.dtype))
        else:
            w.data.mul_(sol[:, 0].to(w.dtype).reshape(1, -1, *([1] * (w.dim() - 2))))
    return {"before": before, "after": min(after, before)}


def reconstruct_mode(criterion: str, reconstruct: bool | str | None = None) -> str | None:
    """The weight reconstruction to run after pruning with ``criterion``: ``"scale"``, ``"full"`` or ``None``.

    ``None``/``"auto"`` gives the criterion's paper's own step (ThiNet: ``scale``, He et al.'s
    ``lasso``: ``full``; none for the others), ``False``/``"none"`` none, ``True`` the paper's
    step or ``full``, and ``"scale"``/``"full"`` that mode.
    """
    own = CRITERIA.get(criterion).reconstruct  # the criterion's paper's step (an entry fact)
    if reconstruct is None or reconstruct == "auto":
        return own
    if reconstruct is False or reconstruct == "none":
        return None
    if reconstruct is True:
        return own or "full"
    if reconstruct in ("scale", "full"):
        return reconstruct
    raise SlimkitError(f"prune: reconstruct must be auto, none, scale, full or a boolean, got {reconstruct!r}")
