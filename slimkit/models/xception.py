"""Xception (Chollet 2017, "Xception: Deep Learning with Depthwise Separable Convolutions").

Entry flow (two plain convs, three strided blocks to 128/256/728 channels), middle flow
(eight residual blocks of three separable convs at 728), exit flow (a block to 1024, then
separable convs to 1536 and 2048), global pooling and a linear layer (Fig. 5). Every
separable conv is followed by BN; blocks that down-sample have a strided 1x1 conv-BN
shortcut. At 299x299 this is the paper's network: 22,855,952 parameters (Table 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBNAct, SeparableConv, init_weights
from .registry import register_model


class XceptionBlock(nn.Module):
    """``reps`` x (ReLU, separable conv, BN), an optional 3x3/2 max-pool, plus a shortcut.

    ``relu_first=False`` only for the first entry-flow block, whose input has just been
    through ReLU already (Fig. 5).
    """

    def __init__(self, in_planes: int, out_planes: int, reps: int, stride: int = 1, relu_first: bool = True,
                 grow_first: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_planes
        for i in range(reps):
            # the exit-flow block keeps the input width for all but its last conv
            out = out_planes if (grow_first and i == 0) or (not grow_first and i == reps - 1) else c
            if i > 0 or relu_first:
                layers.append(nn.ReLU(inplace=False))
            layers += [SeparableConv(c, out), nn.BatchNorm2d(out)]
            c = out
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, 1))
        self.body = nn.Sequential(*layers)
        self.shortcut = (ConvBNAct(in_planes, out_planes, 1, stride, act="none")
                         if stride != 1 or in_planes != out_planes else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class Xception(nn.Module):
    """Xception; ``cifar=True`` removes the stem's strides and pads its convs for 32x32 inputs."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, middle_blocks: int = 8, cifar: bool = False,
                 width_mult: float = 1.0) -> None:
        super().__init__()

        def w(c: int) -> int:
            return int(c * width_mult)

        # the paper's stem convs are unpadded ("valid"), 299 -> 149 -> 147
        pad, s = (1, 1) if cifar else (0, 2)
        self.stem = nn.Sequential(ConvBNAct(in_channels, w(32), 3, s, padding=pad), ConvBNAct(w(32), w(64), 3,
                                                                                              padding=pad))
        self.entry = nn.Sequential(XceptionBlock(w(64), w(128), 2, 2, relu_first=False),
                                   XceptionBlock(w(128), w(256), 2, 2), XceptionBlock(w(256), w(728), 2, 2))
        self.middle = nn.Sequential(*[XceptionBlock(w(728), w(728), 3) for _ in range(middle_blocks)])
        self.exit = XceptionBlock(w(728), w(1024), 2, 2, grow_first=False)
        self.head = nn.Sequential(SeparableConv(w(1024), w(1536)), nn.BatchNorm2d(w(1536)), nn.ReLU(inplace=True),
                                  SeparableConv(w(1536), w(2048)), nn.BatchNorm2d(w(2048)), nn.ReLU(inplace=True))
        self.fc = nn.Linear(w(2048), num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.exit(self.middle(self.entry(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("xception", input_size=(3, 299, 299), num_classes=1000)
def xception(num_classes: int = 1000, **kwargs) -> Xception:
    """Xception for ImageNet 299x299 (Chollet 2017), the full paper network."""
    return Xception(num_classes, **kwargs)


@register_model("xception_cifar", input_size=(3, 32, 32), num_classes=10)
def xception_cifar(num_classes: int = 10, **kwargs) -> Xception:
    """Xception (Chollet 2017) for 32x32: a "small" variant, documented here as ours, not the paper's.

    Same block structure with the stem unstrided and padded (32 -> 4x4 through the four
    pooling blocks), half the widths and four middle-flow blocks instead of eight, so it
    trains on CIFAR in reasonable time (about 3.6M parameters instead of the full network's 21M).
    """
    kwargs.setdefault("width_mult", 0.5)
    kwargs.setdefault("middle_blocks", 4)
    return Xception(num_classes, cifar=True, **kwargs)
