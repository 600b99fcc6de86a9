"""FractalNet for CIFAR (Larsson, Maire & Shakhnarovich 2017, "FractalNet: Ultra-Deep Neural
Networks without Residuals", ICLR).

A block expands f_1(z) = conv(z), f_{C+1}(z) = join(f_C(f_C(z)), conv(z)): C columns of
depths 1, 2, 4, ... 2**(C-1) convolutions (conv-BN-ReLU 3x3), whose outputs are averaged by
join layers wherever columns meet. B blocks, each followed by 2x2 max-pooling, and a linear
layer make the network. Drop-path regularises training (sec. 3.1):

* local: each join drops each of its inputs with probability ``local_drop`` (at least one
  survives) and averages the survivors;
* global: a single column is chosen for the whole network and only its path is kept.
Each mini-batch is global with probability ``global_ratio`` (the paper: 50%), else local.
Sampling is per mini-batch, as the authors' Caffe implementation does. In eval mode every
join averages all its inputs, so inference is deterministic.

The paper's CIFAR network (B=5, C=3, 20 layers, widths 64/128/256/512/512, reported 38.6M
parameters) counts 33.7M parameters when built from that description (an independent
re-implementation, pytorchcv's ``fractalnet_cifar10``, counts the same 33,724,618); the
registered ``fractalnet`` is the same topology at half the widths (8.4M parameters) so it
trains on one GPU in hours; pass ``widths=(64, 128, 256, 512, 512)`` for the paper's.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from .layers import ConvBNAct, init_weights
from .registry import register_model


class FractalColumns(nn.Module):
    """f_C without its final join: returns the C column outputs, shallowest first."""

    def __init__(self, in_planes: int, planes: int, columns: int) -> None:
        super().__init__()
        self.columns = columns
        self.conv = ConvBNAct(in_planes, planes, 3)
        if columns > 1:
            self.first = FractalColumns(in_planes, planes, columns - 1)
            self.join = Join()
            self.second = FractalColumns(planes, planes, columns - 1)

    def forward(self, x: torch.Tensor, depth: int = 0) -> list[torch.Tensor]:
        # depth: this sub-fractal's shallowest column, counted in the whole block's columns
        outs = [self.conv(x)]
        if self.columns > 1:
            mid = self.join(self.first(x, depth + 1), depth + 1)
            outs += self.second(mid, depth + 1)
        return outs


class Join(nn.Module):
    """Mean of the inputs; with drop-path in training (the mode is set by :class:`FractalNet`)."""

    def __init__(self) -> None:
        super().__init__()
        self.local_drop = 0.15
        self.global_column: int | None = None  # set per mini-batch while training

    def forward(self, inputs: list[torch.Tensor], first_column: int = 0) -> torch.Tensor:
        if not self.training or len(inputs) == 1:
            return torch.stack(inputs).mean(0) if len(inputs) > 1 else inputs[0]
        if self.global_column is not None:
            keep = [first_column + i == self.global_column for i in range(len(inputs))]
        else:
            keep = [random.random() >= self.local_drop for _ in inputs]
            if not any(keep):
                keep[random.randrange(len(inputs))] = True
        kept = [t for t, k in zip(inputs, keep) if k]
        if not kept:  # this join is off the chosen column's path: its output feeds only dropped columns
            return torch.zeros_like(inputs[0])
        return torch.stack(kept).mean(0)


class FractalBlock(nn.Module):
    """A fractal block of ``columns`` columns, its final join and 2x2 max-pooling."""

    def __init__(self, in_planes: int, planes: int, columns: int) -> None:
        super().__init__()
        self.columns = FractalColumns(in_planes, planes, columns)
        self.join = Join()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.join(self.columns(x)))


class FractalNet(nn.Module):
    """FractalNet with ``len(widths)`` blocks of ``columns`` columns and drop-path in training."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128, 256, 256), columns: int = 3,
                 local_drop: float = 0.15, global_ratio: float = 0.5, in_channels: int = 3) -> None:
        super().__init__()
        self.num_columns, self.local_drop, self.global_ratio = columns, local_drop, global_ratio
        blocks, c = [], in_channels
        for w in widths:
            blocks.append(FractalBlock(c, w, columns))
            c = w
        self.features = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, Join):
                m.local_drop = local_drop
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            column = random.randrange(self.num_columns) if random.random() < self.global_ratio else None
            for m in self.modules():
                if isinstance(m, Join):
                    m.global_column = column
        return self.fc(torch.flatten(self.features(x), 1))


@register_model("fractalnet", input_size=(3, 32, 32), num_classes=10)
def fractalnet(num_classes: int = 10, **kwargs) -> FractalNet:
    """FractalNet-20 (B=5, C=3; Larsson et al. 2017) at half the paper's widths, with local+global drop-path."""
    return FractalNet(num_classes, **kwargs)
