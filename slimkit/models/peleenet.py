"""PeleeNet (Wang, Li & Ling 2018, "Pelee: A Real-Time Object Detection System on Mobile
Devices", NeurIPS).

A DenseNet variant for mobile devices (sec. 2.1, Table 1):

* a stem block: a 3x3/2 conv, then a 1x1-3x3/2 conv branch and a 2x2 max-pool branch
  concatenated and fused by a 1x1 conv, cheaply reaching 56x56 at 32 channels;
* two-way dense layers: each layer adds k/2 maps from a 1x1-3x3 branch and k/2 from a
  1x1-3x3-3x3 branch (two receptive-field scales), k = 32;
* dynamic bottleneck widths: the 1x1 width is 1, 2, 4, 4 times k/2 in the four stages,
  capped at half the layer's input channels so early layers are not wider than their input;
* transition layers (1x1 conv, then 2x2 average pooling except after the last stage) without
  compression, i.e. keeping the channel count;
* post-activation conv-BN-ReLU throughout.
Stages have 3, 4, 8 and 6 dense layers; the head is global pooling and a linear layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBNAct, init_weights
from .registry import register_model


class StemBlock(nn.Module):
    """Stem: conv 3x3/s, then (1x1 -> 3x3/s) and max-pool/s concatenated, then a 1x1 conv."""

    def __init__(self, in_channels: int, planes: int = 32, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, planes, 3, stride)
        self.branch_a = nn.Sequential(ConvBNAct(planes, planes // 2, 1), ConvBNAct(planes // 2, planes, 3, stride))
        self.pool = nn.MaxPool2d(2, 2) if stride == 2 else nn.MaxPool2d(3, 1, 1)
        self.fuse = ConvBNAct(2 * planes, planes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.fuse(torch.cat([self.branch_a(x), self.pool(x)], 1))


class TwoWayDenseLayer(nn.Module):
    """Appends k/2 maps from a 1x1-3x3 branch and k/2 from a 1x1-3x3-3x3 branch to its input."""

    def __init__(self, in_planes: int, growth: int, bottleneck_width: int) -> None:
        super().__init__()
        half = growth // 2
        inter = half * bottleneck_width // 4 * 4
        if inter > in_planes / 2:  # the dynamic bottleneck: never wider than half the input
            inter = in_planes // 8 * 4
        self.branch1 = nn.Sequential(ConvBNAct(in_planes, inter, 1), ConvBNAct(inter, half, 3))
        self.branch2 = nn.Sequential(ConvBNAct(in_planes, inter, 1), ConvBNAct(inter, half, 3),
                                     ConvBNAct(half, half, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.branch1(x), self.branch2(x)], 1)


class PeleeNet(nn.Module):
    """PeleeNet; ``stem_stride=1`` (with the stage poolings) suits 32x32 inputs."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, growth: int = 32,
                 blocks: tuple[int, ...] = (3, 4, 8, 6), bottleneck_widths: tuple[int, ...] = (1, 2, 4, 4),
                 stem_planes: int = 32, stem_stride: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [StemBlock(in_channels, stem_planes, stem_stride)]
        c = stem_planes
        for i, (n, bw) in enumerate(zip(blocks, bottleneck_widths)):
            for _ in range(n):
                layers.append(TwoWayDenseLayer(c, growth, bw))
                c += growth
            layers.append(ConvBNAct(c, c, 1))  # transition without compression
            if i < len(blocks) - 1:
                layers.append(nn.AvgPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)))


@register_model("peleenet", input_size=(3, 224, 224), num_classes=1000)
def peleenet(num_classes: int = 1000, **kwargs) -> PeleeNet:
    """PeleeNet for ImageNet 224 (Wang et al. 2018, Table 3: 2.8M parameters, 508M MACs)."""
    return PeleeNet(num_classes, **kwargs)


@register_model("peleenet_cifar", input_size=(3, 32, 32), num_classes=10)
def peleenet_cifar(num_classes: int = 10, **kwargs) -> PeleeNet:
    """PeleeNet (Wang et al. 2018) for 32x32: unstrided stem, so only the three transitions down-sample (to 4x4)."""
    kwargs.setdefault("stem_stride", 1)
    return PeleeNet(num_classes, **kwargs)
