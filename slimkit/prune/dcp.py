"""Discrimination-aware channel pruning (Zhuang et al., NeurIPS 2018) as the ``dcp`` criterion.

A channel matters if removing it hurts both the reconstruction of the next layer's output and
the discriminative power of the features at its stage. Auxiliary classifiers (BN-ReLU-global
pool-linear) are attached at the end of every spatial stage and trained briefly on the frozen
model; a channel's score is the squared norm of the gradient of (reconstruction loss +
``dcp_lambda`` x auxiliary cross-entropy) w.r.t. its weights in the consuming layer, taken where
the consuming layer's weights are zero -- the first step of the paper's greedy selection, used
to rank every channel at once. Sampling and capture are shared with
:mod:`slimkit.prune.reconstruct`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .graph import ChannelGraph, LayerRecord
from .importance import _mean_over_members, register_criterion
from .reconstruct import _consumers, _modules_eval, _run, _take

__all__ = ["dcp_importance"]



def _stage_ends(model: nn.Module, x: torch.Tensor, consumers: list[LayerRecord]) -> tuple[dict, int]:
    """Map each consumer to the module ending its spatial stage (``None``: the model output) and get the class count.

    A stage is a spatial resolution; its end is the last module, in completion order, whose
    output has that resolution (a ResNet's ``layer1``, a VGG's last ReLU before a pool).
    """
    done: list[tuple[str, nn.Module, tuple | None]] = []
    hooks = [m.register_forward_hook(
        lambda mod, inp, out, n=n: done.append((n, mod, tuple(out.shape) if torch.is_tensor(out) else None)))
        for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    last = {s[2:]: i for i, (_, _, s) in enumerate(done) if s is not None and len(s) == 4}
    first = {}
    for i, (n, _, _) in enumerate(done):
        first.setdefault(n, i)
    ends = {}
    for rec in consumers:
        i = first.get(rec.name)
        s = done[i][2] if i is not None else None
        j = last.get(s[2:], -1) if s is not None and len(s) == 4 else -1
        ends[rec.name] = (done[j][0], done[j][1], done[j][2][1]) if i is not None and j >= i else None
    return ends, int(logits.shape[1])


def _train_heads(model: nn.Module, ends: dict, data: list, num_classes: int, epochs: int, lr: float, seed: int,
                 device) -> dict[str, nn.Module]:
    """One auxiliary classifier (BN-ReLU-global pool-linear) per stage end, trained on the frozen model."""
    stages = {e[0]: e for e in ends.values() if e is not None}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = {n: nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(c, num_classes)).to(device) for n, (_, _, c) in stages.items()}
    if not heads:
        return heads
    opt = torch.optim.Adam([p for h in heads.values() for p in h.parameters()], lr=lr)
    mods = [stages[n][1] for n in heads]
    for _ in range(epochs):
        for x, y in data:
            with torch.no_grad():
                feats, _ = _run(model, x.to(device), mods)
            with torch.enable_grad():
                loss = sum(F.cross_entropy(h(f[1].detach()), y.to(device)) for h, f in zip(heads.values(), feats))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    for h in heads.values():
        h.eval()
    return heads


@register_criterion("dcp", needs_data=True, needs_seed=True,
                    paper="Zhuang et al., NeurIPS 2018, Discrimination-aware Channel Pruning")
def dcp_importance(model: nn.Module, graph: ChannelGraph, *, loader: Iterable | None = None, batches: int = 8,
                   dcp_lambda: float = 1.0, aux_epochs: int = 10, aux_lr: float = 0.05, seed: int = 0,
                   device: str | torch.device = "cpu", **_) -> np.ndarray:
    """Discrimination-aware channel importance (Zhuang et al., NeurIPS 2018, "Discrimination-aware Channel Pruning").

    One auxiliary head (BN-ReLU-global average pool-linear) per spatial stage is trained with Adam
    (``aux_lr``) for ``aux_epochs`` passes over ``batches`` batches on the frozen model. For each
    consuming layer (dense conv or linear), at DCP's first greedy step (no channel selected yet, so
    the layer's weights are zero), the loss ``L_rec + dcp_lambda * L_aux`` is taken: ``L_rec`` half
    the mean squared difference between the layer's output and its original output, ``L_aux`` the
    cross-entropy of the head of the layer's stage (of the model itself for layers behind the last
    stage). A channel's score in that layer is the squared Frobenius norm of the gradient w.r.t.
    its weights there, summed over batches; layers' scores are divided by their mean and averaged
    over a class's consumers. The cost is two partial forward passes and one backward pass per
    consuming layer and batch, plus the head training.
    """
    data = _take(loader, batches, "dcp", targets=True)
    consumers = _consumers(graph)
    restore = _modules_eval(model)
    params = list(model.parameters())
    grad_state = [p.requires_grad for p in params]
    members = []
    try:
        for p in params:
            p.requires_grad_(False)  # the model is frozen; only one layer's weights get a gradient at a time
        ends, num_classes = _stage_ends(model, data[0][0].to(device), consumers)
        heads = _train_heads(model, ends, data, num_classes, aux_epochs, aux_lr, seed, device)
        for rec in consumers:
            m, end = rec.module, ends[rec.name]
            w = m.weight
            total = torch.zeros(w.shape[1], dtype=torch.float64, device=w.device)
            saved = w.detach().clone()
            for x, y in data:
                x, y = x.to(device), y.to(device)
                with torch.no_grad():
                    ((_, base),), _ = _run(model, x, [m], stop=m)
                try:
                    w.data.zero_()
                    w.requires_grad_(True)
                    with torch.enable_grad():
                        mods = [m] + ([end[1]] if end is not None else [])
                        got, logits = _run(model, x, mods, stop=end[1] if end is not None else None)
                        out = got[0][1]
                        rec_loss = (out - base).pow(2).mean() / 2
                        aux = heads[end[0]](got[1][1]) if end is not None else logits
                        (g,) = torch.autograd.grad(rec_loss + dcp_lambda * F.cross_entropy(aux, y), w)
                finally:
                    w.data.copy_(saved)
                    w.requires_grad_(False)
                total += g.detach().double().pow(2).sum(0).reshape(w.shape[1], -1).sum(1)
            per_class = np.zeros(graph.num_classes)
            np.add.at(per_class, rec.in_cls, total.cpu().numpy())
            cls = np.unique(rec.in_cls)
            vals = per_class[cls]
            members.append((cls, vals / max(float(vals.mean()), 1e-30)))
    finally:
        for p, r in zip(params, grad_state):
            p.requires_grad_(r)
        restore()
    return _mean_over_members(graph, members)
