"""Unstructured sparsity: which weights are zeroed, held by masks while training, baked in before saving.

A mask is a ``torch.nn.utils.parametrize`` parametrization (``weight = original * mask``): the
optimizer keeps updating the original tensor, the masked entries stay exactly zero in every
forward and get no gradient, and baking (:func:`bake`) leaves a plain layer whose weight has the
zeros in it. The methods that choose the masks are in :mod:`slimkit.sparse.methods`.

The sparsity is counted over the weights of the conv and linear layers. ``scope="layer"`` gives
every layer the target; ``scope="global"`` ranks all of them together (each layer then gets the
sparsity its scores earn). The first conv and the classifier see the input and make the decision:
they are the layers pruning hurts most per weight removed, and they hold few weights, so by the
``edges`` rule they get half the target (``half``, the default), none (``keep``) or the target
(``same``), outside the global ranking; the output says which rule ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class Mask(nn.Module):
    """``weight = original * mask``; ``steps`` counts training forwards (the gradual schedule resumes from it)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.float32))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers whose weights sparsity counts, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE) and n]


def edge_layers(layers: list[tuple[str, nn.Module]]) -> set[str]:
    """The first conv (it sees the input) and the last linear layer (the classifier) of ``layers``."""
    edges = set()
    convs = [n for n, m in layers if not isinstance(m, nn.Linear)]
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    if convs:
        edges.add(convs[0])
    if linears:
        edges.add(linears[-1])
    return edges


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight a layer computes with (masked when a mask is attached)."""
    return module.weight.detach()


def fisher_diagonal(model: nn.Module, loader: Iterable, batches: int,
                    layers: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the cross-entropy per weight over ``batches`` batches: the empirical Fisher,
    the usual estimate of the Hessian diagonal (LeCun et al. 1990; Choi et al., ICLR 2017)."""
    import torch.nn.functional as F

    was = model.training
    model.eval()  # batch-norm statistics untouched: only gradients are read
    sums = {n: torch.zeros_like(weight_of(m)) for n, m in layers}
    seen = 0
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for n, m in layers:
            g = _weight_grad(m)
            if g is not None:
                sums[n] += g.detach() ** 2
        seen += 1
    model.zero_grad(set_to_none=True)
    model.train(was)
    return {n: s / max(seen, 1) for n, s in sums.items()}


def _weight_grad(m: nn.Module) -> torch.Tensor | None:
    if parametrize.is_parametrized(m, "weight"):
        p = m.parametrizations.weight.original
        return None if p.grad is None else p.grad * m.parametrizations.weight[0].mask
    return m.weight.grad


def scores(method: str, layers: list[tuple[str, nn.Module]], fisher: dict[str, torch.Tensor] | None
           ) -> dict[str, torch.Tensor]:
    """The importance of every weight (higher: kept longer); masked weights score 0."""
    out = {}
    for n, m in layers:
        w = weight_of(m)
        out[n] = 0.5 * fisher[n] * w**2 if method == "obd" else w.abs()
    return out


Scope = str | dict  # "global", "layer", or a plan {layer: its sparsity per unit of the target} (sensitivity)


def layer_targets(layers: list[tuple[str, nn.Module]], target: float, scope: Scope, edges_rule: str
                  ) -> tuple[dict[str, float], set[str]]:
    """Per-layer sparsity for ``scope="layer"`` or a plan (and the edges), and the layers ranked together for
    ``global``. A plan's entries scale with ``target``, so a schedule rising towards the target keeps its shape."""
    edges = edge_layers(layers) if edges_rule != "same" else set()
    edge_target = {"half": target / 2, "keep": 0.0, "same": target}[edges_rule]
    fixed = {n: edge_target for n in edges}
    ranked = {n for n, _ in layers} - edges
    if isinstance(scope, dict):
        fixed.update({n: min(MAX_LAYER_SPARSITY, scope.get(n, 1.0) * target) for n in ranked})
        ranked = set()
    elif scope == "layer":
        fixed.update({n: target for n in ranked})
        ranked = set()
    return fixed, ranked


MAX_LAYER_SPARSITY = 0.995  # a layer keeps some weights: an all-zero layer cuts the network


def compute_masks(layers: list[tuple[str, nn.Module]], score: dict[str, torch.Tensor], target: float, scope: Scope,
                  edges_rule: str) -> dict[str, torch.Tensor]:
    """Masks zeroing the lowest-scoring ``target`` fraction (per layer, or of the globally ranked layers)."""
    fixed, ranked = layer_targets(layers, target, scope, edges_rule)
    masks = {}
    for n, sparsity in fixed.items():
        flat = score[n].flatten()
        masks[n] = _keep_top(flat, round((1 - sparsity) * flat.numel())).view_as(score[n])
    if ranked:
        names = [n for n, _ in layers if n in ranked]
        flat = torch.cat([score[n].flatten() for n in names])
        keep = _keep_top(flat, round((1 - target) * flat.numel()))
        at = 0
        for n in names:
            k = score[n].numel()
            masks[n] = keep[at:at + k].view_as(score[n])
            at += k
    return masks


def _keep_top(flat: torch.Tensor, k: int) -> torch.Tensor:
    """1 at the ``k`` highest entries of ``flat`` (ties broken by position, so the count is exact), else 0."""
    mask = torch.zeros_like(flat, dtype=torch.float32)
    if k > 0:
        mask[torch.topk(flat.double(), min(k, flat.numel()), sorted=False).indices] = 1.0
    return mask


def attach(layers: list[tuple[str, nn.Module]], masks: dict[str, torch.Tensor]) -> None:
    """Hold ``masks`` on the layers' weights (replacing the mask a layer already has)."""
    for n, m in layers:
        if parametrize.is_parametrized(m, "weight"):
            m.parametrizations.weight[0].mask.copy_(masks[n])
        else:
            parametrize.register_parametrization(m, "weight", Mask(masks[n]))


def bake(model: nn.Module) -> nn.Module:
    """Remove every mask, leaving plain layers whose weights hold the zeros (in place; returns ``model``)."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], Mask):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def cubic(step: int, total: int, initial: float, final: float, ramp: float) -> float:
    """AGP's sparsity at ``step`` of ``total``: cubic from ``initial`` to ``final`` over the first ``ramp`` of it."""
    end = max(1, round(ramp * total))
    t = min(step, end) / end
    return final + (initial - final) * (1 - t) ** 3


def gradual(model: nn.Module, layers: list[tuple[str, nn.Module]], total_steps: int, every: int,
            schedule: Callable[[int], float], scope: Scope, edges_rule: str) -> Callable[[], None]:
    """Raise the masks' sparsity on ``schedule`` while ``model`` trains; returns the function that stops it.

    A forward pre-hook counts training forwards (stored in the masks, so a resumed run continues the
    schedule); every ``every`` steps the masks are recomputed from the masked weights' magnitudes, so
    a weight once removed stays removed while the sparsity rises.
    """
    counter = next(m.parametrizations.weight[0] for _, m in layers)

    def hook(module: nn.Module, args) -> None:
        if not module.training:
            return
        step = int(counter.steps) + 1
        for _, m in layers:
            m.parametrizations.weight[0].steps.fill_(step)
        if step % every == 0 or step == total_steps:
            with torch.no_grad():
                attach(layers, compute_masks(layers, scores("magnitude", layers, None), schedule(step), scope,
                                             edges_rule))

    handle = model.register_forward_pre_hook(hook)
    return handle.remove


def report(layers: list[tuple[str, nn.Module]]) -> tuple[list[dict], float]:
    """Per layer ``{name, kind, numel, nnz, sparsity}`` and the overall sparsity of these layers."""
    rows, zeros, total = [], 0, 0
    for n, m in layers:
        w = weight_of(m)
        nnz = int((w != 0).sum())
        rows.append({"name": n, "kind": type(m).__name__, "numel": w.numel(), "nnz": nnz,
                     "sparsity": 1 - nnz / max(w.numel(), 1)})
        zeros += w.numel() - nnz
        total += w.numel()
    return rows, zeros / max(total, 1)
