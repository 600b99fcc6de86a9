"""ShuffleNet v1 (Zhang et al. 2018, "ShuffleNet: An Extremely Efficient Convolutional Neural
Network for Mobile Devices").

A 3x3/2 conv to 24 channels and a 3x3/2 max-pool, three stages of 4/8/4 ShuffleNet units
(Table 1), global pooling and a linear layer. A unit is a grouped 1x1 conv to a bottleneck
of a quarter of the stage width, channel shuffle, a 3x3 depthwise conv, and a grouped 1x1
conv back; stride-2 units concatenate an average-pooled shortcut instead of adding it. The
first grouped conv of stage 2 is a plain 1x1 conv because its input has only 24 channels
(sec. 3.3). The scale factor s multiplies every width ("ShuffleNet s x").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ChannelShuffle, ConvBNAct, init_weights
from .registry import register_model

# stage output channels for g = 1, 2, 3, 4, 8 (Table 1)
STAGE_WIDTHS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960), 4: (272, 544, 1088), 8: (384, 768, 1536)}


class ShuffleUnit(nn.Module):
    """One ShuffleNet unit (Fig. 2 b/c)."""

    def __init__(self, in_planes: int, out_planes: int, groups: int, stride: int, first_groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        branch_out = out_planes - in_planes if stride == 2 else out_planes
        self.gconv1 = ConvBNAct(in_planes, mid, 1, groups=first_groups)
        self.shuffle = ChannelShuffle(first_groups) if first_groups > 1 else nn.Identity()
        self.dwconv = ConvBNAct(mid, mid, 3, stride, groups=mid, act="none")
        self.gconv2 = ConvBNAct(mid, branch_out, 1, groups=groups, act="none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gconv2(self.dwconv(self.shuffle(self.gconv1(x))))
        if self.stride == 2:
            return F.relu(torch.cat([F.avg_pool2d(x, 3, 2, 1), out], 1))
        return F.relu(x + out)


class ShuffleNetV1(nn.Module):
    """ShuffleNet v1 with ``groups`` and scale ``width_mult``; ``cifar=True`` drops the stem's down-sampling."""

    def __init__(self, num_classes: int = 1000, groups: int = 3, width_mult: float = 1.0, in_channels: int = 3,
                 cifar: bool = False) -> None:
        super().__init__()
        # widths are kept divisible by 4 * groups so the bottleneck splits evenly into groups
        widths = [int(w * width_mult) // (4 * groups) * (4 * groups) for w in STAGE_WIDTHS[groups]]
        stem = max(groups, int(24 * width_mult))
        self.stem = nn.Sequential(ConvBNAct(in_channels, stem, 3, 1 if cifar else 2),
                                  nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1))
        c = stem
        stages = []
        for i, (w, n) in enumerate(zip(widths, (4, 8, 4))):
            units = []
            for j in range(n):
                first_groups = 1 if (i == 0 and j == 0) else groups
                units.append(ShuffleUnit(c, w, groups, 2 if j == 0 else 1, first_groups))
                c = w
            stages.append(nn.Sequential(*units))
        self.stage2, self.stage3, self.stage4 = stages
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("shufflenet_v1", input_size=(3, 224, 224), num_classes=1000)
def shufflenet_v1(num_classes: int = 1000, **kwargs) -> ShuffleNetV1:
    """ShuffleNet v1 1x, g=3 for ImageNet 224 (Zhang et al. 2018, Table 2: 140 MFLOPs)."""
    return ShuffleNetV1(num_classes, **kwargs)


@register_model("shufflenet_v1_cifar", input_size=(3, 32, 32), num_classes=10)
def shufflenet_v1_cifar(num_classes: int = 10, **kwargs) -> ShuffleNetV1:
    """ShuffleNet v1 1x, g=3 (Zhang et al. 2018) for 32x32: stem stride 1 and no max-pool (8x down-sampling)."""
    return ShuffleNetV1(num_classes, cifar=True, **kwargs)
