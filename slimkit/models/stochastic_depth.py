"""ResNet-110 with stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth").

While training, each residual block's branch is skipped for the whole mini-batch with
probability 1 - p_l, where the survival probability decays linearly from 1 at the input to
p_L = 0.5 at the last block (the paper's "linear decay" rule, sec. 3). At test time every
branch runs, scaled by its p_l, so the output is the expectation of the training network
and is deterministic. Architecture otherwise as the CIFAR ResNet-110 of He et al. (option-A
zero-padding shortcuts, 16/32/64 channels), so its parameters equal ``resnet110``'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cifar_resnet import PadShortcut
from .layers import ConvBNAct
from .registry import register_model


class StochasticBlock(nn.Module):
    """A basic residual block whose branch survives with probability ``survival`` in training."""

    def __init__(self, in_planes: int, planes: int, stride: int, survival: float) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_planes, planes, 3, stride)
        self.conv2 = ConvBNAct(planes, planes, 3, act="none")
        self.shortcut = PadShortcut(in_planes, planes, stride) if stride != 1 or in_planes != planes else nn.Identity()
        self.survival = survival

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sc = self.shortcut(x)
        if self.training:
            if torch.rand(()).item() >= self.survival:
                return F.relu(sc)  # dropped: the block is the identity and its branch costs nothing
            return F.relu(sc + self.conv2(self.conv1(x)))
        return F.relu(sc + self.survival * self.conv2(self.conv1(x)))

    def extra_repr(self) -> str:
        return f"survival={self.survival:.4f}"


class StochasticDepthResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 with linearly decaying survival from 1 to ``last_survival``."""

    def __init__(self, depth: int = 110, num_classes: int = 10, last_survival: float = 0.5,
                 in_channels: int = 3) -> None:
        super().__init__()
        n = (depth - 2) // 6
        total = 3 * n
        self.stem = ConvBNAct(in_channels, 16, 3)
        in_planes, idx, stages = 16, 0, []
        for i, w in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                idx += 1
                survival = 1.0 - idx / total * (1.0 - last_survival)
                blocks.append(StochasticBlock(in_planes, w, 2 if (i > 0 and j == 0) else 1, survival))
                in_planes = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("resnet110_stochastic_depth", input_size=(3, 32, 32), num_classes=10)
def resnet110_stochastic_depth(num_classes: int = 10, **kwargs) -> StochasticDepthResNet:
    """ResNet-110 with stochastic depth, linear decay to p_L = 0.5 (Huang et al. 2016)."""
    return StochasticDepthResNet(110, num_classes, **kwargs)
