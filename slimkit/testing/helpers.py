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


class ShuffleGateNet(nn.Module):
    """A small CNN whose middle is concat -> channel shuffle -> SE gate -> grouped conv, then a channel split.

    The constructs that "pruning breaks on my model" reports are about (Torch-Pruning's and
    NNI's trackers) in one network: it is the pruning benchmark and test of grouped, shuffled
    and split channels (``benchmarks/prune_any.py``, ``tests/test_prune_grouped.py``).
    """

    def __init__(self, num_classes: int = 10, width: int = 32, groups: int = 4) -> None:
        super().__init__()

        def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, g: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU())

        self.stem = cbr(3, width, stride=2)
        self.left, self.right = cbr(width, width), cbr(width, width, k=1)
        self.shuffle = nn.ChannelShuffle(groups)
        self.se_reduce = nn.Conv2d(2 * width, width // 2, 1)
        self.se_expand = nn.Conv2d(width // 2, 2 * width, 1)
        self.grouped = cbr(2 * width, 2 * width, g=groups)
        self.dw = cbr(width, 2 * width, g=width)  # depthwise with a channel multiplier of 2
        self.tail = cbr(3 * width, 4 * width, stride=2)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.shuffle(torch.cat([self.left(x), self.right(x)], 1))
        gate = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        x = self.grouped(x * gate)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.dw(b)], 1)
        return self.head(self.tail(x).mean((2, 3)))
