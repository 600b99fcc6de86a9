"""DenseNet-BC for CIFAR (Huang et al. 2017, "Densely Connected Convolutional Networks").

DenseNet-BC-100 with growth rate k = 12: a 3x3 stem of 2k channels, three dense blocks of
(100 - 4) / 6 = 16 bottleneck layers (BN-ReLU-1x1 to 4k, BN-ReLU-3x3 to k, concatenated to
the input) and transitions that halve the channels (compression 0.5) and the resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import init_weights
from .registry import register_model


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (4k) then BN-ReLU-conv3x3 (k); the k new maps are appended to the input."""

    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1 compressing the channels, then 2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__(nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True), nn.Conv2d(in_planes, out_planes, 1,
                                                                                     bias=False),
                         nn.AvgPool2d(2))


class DenseNetBC(nn.Module):
    """DenseNet-BC-``depth`` with growth ``growth`` and ``compression`` for 32x32 inputs."""

    def __init__(self, depth: int = 100, growth: int = 12, compression: float = 0.5, num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        n = (depth - 4) // 6
        planes = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, planes, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        for i in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(planes, growth))
                planes += growth
            blocks.append(nn.Sequential(*layers))
            if i < 2:
                out = int(planes * compression)
                blocks.append(Transition(planes, out))
                planes = out
        self.features = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.features(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("densenet_bc100", input_size=(3, 32, 32), num_classes=10)
def densenet_bc100(num_classes: int = 10, **kwargs) -> DenseNetBC:
    """DenseNet-BC-100, k=12 (Huang et al. 2017, Table 2: 0.8M parameters)."""
    return DenseNetBC(100, 12, 0.5, num_classes, **kwargs)
