"""CIFAR ResNets of He et al. 2016 ("Deep Residual Learning for Image Recognition", sec. 4.2).

Three stages of 16/32/64 channels with ``n`` basic blocks each (depth 6n+2) and option-A
shortcuts: where a block changes shape the shortcut subsamples by the stride and zero-pads the
new channels, so it has no parameters. Module and parameter names follow the public
pytorch_resnet_cifar10 checkpoints (``conv1``, ``bn1``, ``layer1.0.conv1``, ``linear``) so
those files load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..artifact import register_module
from .registry import register_model


@register_module
class PadShortcut(nn.Module):
    """Option-A shortcut: stride-``s`` subsampling, then zero channels split before and after."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"PadShortcut cannot shrink channels ({in_channels} -> {out_channels})")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (option A when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 3x3 stem, three stages, global pooling, linear head."""

    def __init__(self, n: int, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64),
                 in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        stages = []
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, w, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.pool(x), 1))


def _make(depth: int):
    def build(num_classes: int = 10) -> CifarResNet:
        return CifarResNet((depth - 2) // 6, num_classes)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"ResNet-{depth} for CIFAR (He et al. 2016, option-A shortcuts)."
    return build


for _depth in (20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}", input_size=(3, 32, 32), num_classes=10)(_make(_depth))


@register_model("digits_resnet", input_size=(1, 8, 8), num_classes=10)
def digits_resnet(num_classes: int = 10) -> CifarResNet:
    """ResNet-14 (He et al. 2016; two blocks per stage, option-A shortcuts) for the 8x8 digits: depth pruning, small."""
    return CifarResNet(2, num_classes, in_channels=1)
