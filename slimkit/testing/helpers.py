"""Shared test helpers: non-trivial batch norm, the zeroed copy of a pruned model, small data.

Kept in the package (not in ``tests/``) because the contract suites of :mod:`slimkit.testing.contracts`
use them, and so would a plug-in that registers its own methods.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine terms in eval mode (a fresh BN is the identity, hiding wrong channel maps)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


class MaskedPad(nn.Module):
    """A shortcut whose removed output channels are zeroed (stands for a pruned shortcut in the zeroed copy)."""

    def __init__(self, pad: nn.Module, keep: list[int]) -> None:
        super().__init__()
        self.pad = pad
        mask = torch.zeros(pad.out_channels, dtype=torch.float64)
        mask[keep] = 1
        self.register_buffer("mask", mask.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pad(x) * self.mask.to(x.dtype)


def zeroed_copy(model: nn.Module, kept: dict, pads: dict | None = None) -> nn.Module:
    """A copy in which every removed channel is zeroed where it is made (filters, bias, BN gamma/beta, shortcut).

    Structured pruning is exact when the pruned model computes what this copy computes: that is
    the equivalence every pruning test asserts.
    """
    from ..models.cifar_resnet import PadShortcut
    from ..prune import PrunedPadShortcut

    z = copy.deepcopy(model)
    mods = dict(z.named_modules())
    pads = dict(pads or {})
    for name, entry in kept.items():
        m = mods[name]
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            drop = sorted(set(range(m.weight.shape[0])) - set(entry["out"]))
            with torch.no_grad():
                m.weight[drop] = 0
                if m.bias is not None:
                    m.bias[drop] = 0
        elif isinstance(m, (PadShortcut, PrunedPadShortcut)):
            pads.setdefault(name, entry["out"])
    for name, keep in pads.items():  # a shortcut "makes" its output channels: mask the removed ones
        parent, _, attr = name.rpartition(".")
        setattr(z.get_submodule(parent), attr, MaskedPad(mods[name], keep))
    return z


def random_batches(n: int = 2, batch: int = 8, shape: tuple[int, ...] = (1, 8, 8), classes: int = 10,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` seeded ``(inputs, labels)`` batches: a loader for criteria, calibration and one training step."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]
