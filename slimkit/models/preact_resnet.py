"""Pre-activation CIFAR ResNets (He et al. 2016b) and Wide ResNets (Zagoruyko & Komodakis 2016).

Both put BN and ReLU before each convolution, so the shortcut path stays a pure identity
from block to block. Where a block changes shape, the shortcut is a 1x1 projection that
reads the block's pre-activated input, as in the authors' released code (Torch
``fb.resnet.torch``/``resnet-1k-layers`` and ``szagoruyko/wide-residual-networks``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import init_weights
from .registry import register_model


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; optional dropout between the convs (WRN's "dropout in block")."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride, bias=False)
                         if stride != 1 or in_planes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # a projection shortcut shares the pre-activation; an identity one must not see it
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        return self.conv2(out) + sc


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1 to 4x the width (ResNet-164)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.shortcut = (nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)
                         if stride != 1 or in_planes != out_planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + sc


class PreActResNet(nn.Module):
    """Three stages of ``n`` pre-activation blocks at ``widths``, then BN-ReLU, pooling and a linear head.

    The final BN-ReLU is needed because the last block's output is un-normalised (its sum
    with the shortcut comes straight out of a conv).
    """

    def __init__(self, block: type[nn.Module], n: int, widths: tuple[int, int, int], num_classes: int = 10,
                 in_channels: int = 3, stem: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        in_planes = stem
        stages = []
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(block(in_planes, w, 2 if (i > 0 and j == 0) else 1, dropout))
                in_planes = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def wide_resnet(depth: int, widen: int, num_classes: int = 10, dropout: float = 0.0, **kwargs) -> PreActResNet:
    """WRN-``depth``-``widen`` (Zagoruyko & Komodakis 2016): (depth-4)/6 blocks per stage at 16k/32k/64k."""
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4, got {depth}")
    return PreActResNet(PreActBasicBlock, (depth - 4) // 6, (16 * widen, 32 * widen, 64 * widen), num_classes,
                        dropout=dropout, **kwargs)


@register_model("preact_resnet56", input_size=(3, 32, 32), num_classes=10)
def preact_resnet56(num_classes: int = 10, **kwargs) -> PreActResNet:
    """Pre-activation ResNet-56 (He et al. 2016, "Identity Mappings in Deep Residual Networks")."""
    return PreActResNet(PreActBasicBlock, 9, (16, 32, 64), num_classes, **kwargs)


@register_model("preact_resnet164_bottleneck", input_size=(3, 32, 32), num_classes=10)
def preact_resnet164_bottleneck(num_classes: int = 10, **kwargs) -> PreActResNet:
    """Pre-activation bottleneck ResNet-164 (He et al. 2016, "Identity Mappings...", Table 3: 1.7M)."""
    return PreActResNet(PreActBottleneck, 18, (16, 32, 64), num_classes, **kwargs)


@register_model("wrn16_4", input_size=(3, 32, 32), num_classes=10)
def wrn16_4(num_classes: int = 10, **kwargs) -> PreActResNet:
    """WRN-16-4 (Zagoruyko & Komodakis 2016, "Wide Residual Networks")."""
    return wide_resnet(16, 4, num_classes, **kwargs)


@register_model("wrn28_10", input_size=(3, 32, 32), num_classes=10)
def wrn28_10(num_classes: int = 10, **kwargs) -> PreActResNet:
    """WRN-28-10 (Zagoruyko & Komodakis 2016, "Wide Residual Networks"; 36.5M parameters)."""
    return wide_resnet(28, 10, num_classes, **kwargs)
