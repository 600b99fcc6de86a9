"""ResNeXt for CIFAR (Xie et al. 2017, "Aggregated Residual Transformations for Deep Neural Networks").

ResNeXt-29 (C x d): three stages of three bottleneck blocks whose middle 3x3 convolution is
split into C groups of width d (times 2 per stage), the paper's sec. 5.2 CIFAR setting:
a 3x3 stem of 64 channels, stage outputs of 256/512/1024 channels, post-activation blocks
with projection shortcuts where the shape changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBNAct, init_weights
from .registry import register_model


class ResNeXtBlock(nn.Module):
    """1x1 reduce, grouped 3x3 (the aggregated transformations), 1x1 expand, added to the shortcut."""

    def __init__(self, in_planes: int, out_planes: int, width: int, cardinality: int, stride: int = 1) -> None:
        super().__init__()
        self.reduce = ConvBNAct(in_planes, width, 1)
        self.grouped = ConvBNAct(width, width, 3, stride, groups=cardinality)
        self.expand = ConvBNAct(width, out_planes, 1, act="none")
        self.shortcut = (ConvBNAct(in_planes, out_planes, 1, stride, act="none")
                         if stride != 1 or in_planes != out_planes else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.expand(self.grouped(self.reduce(x))) + self.shortcut(x))


class CifarResNeXt(nn.Module):
    """ResNeXt-(9n+2) for 32x32: block width is cardinality * base_width * 2**stage."""

    def __init__(self, cardinality: int = 8, base_width: int = 64, depth: int = 29, num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError(f"CIFAR ResNeXt depth must be 9n+2, got {depth}")
        n = (depth - 2) // 9
        self.stem = ConvBNAct(in_channels, 64, 3)
        in_planes = 64
        stages = []
        for i, out_planes in enumerate((256, 512, 1024)):
            width = cardinality * base_width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(ResNeXtBlock(in_planes, out_planes, width, cardinality, 2 if (i > 0 and j == 0) else 1))
                in_planes = out_planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("resnext29_8x64d", input_size=(3, 32, 32), num_classes=10)
def resnext29_8x64d(num_classes: int = 10, **kwargs) -> CifarResNeXt:
    """ResNeXt-29 8x64d for CIFAR (Xie et al. 2017, Table 7: 34.4M parameters)."""
    return CifarResNeXt(8, 64, 29, num_classes, **kwargs)
