"""ChannelNet-v1 (Gao, Wang & Ji 2018, "ChannelNets: Compact and Efficient Convolutional Neural
Networks via Channel-Wise Convolutions", NeurIPS).

ChannelNets replace dense connections between feature maps by channel-wise convolutions:
1-D convolutions along the channel axis with weights shared over positions. ChannelNet-v1
uses them in its group channel-wise modules (GCWM): two depthwise-separable layers whose
1x1 convs are grouped (g = 2), preceded by a group channel-wise convolution that lets every
group see all input groups at a few parameters, where a dense 1x1 conv would cost C**2.
The rest follows MobileNet v1 with DenseNet-style concatenation inside the early units:
the layer table (channels 32/64, 128, 256 concatenated; 512 with two GCWM units; 1024)
follows the authors' TensorFlow release as re-implemented in pytorchcv. The paper's
ChannelNet-v2 (a depthwise-separable channel-wise conv replacing the last layer) and -v3
(the convolutional classification layer) are not built here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ChannelwiseConv, ConvBNAct, init_weights
from .registry import register_model


class DWSConv(nn.Module):
    """Depthwise 3x3 (linear) then a possibly grouped 1x1 conv with BN and ReLU6, as in the release."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.dw = nn.Conv2d(in_planes, in_planes, 3, stride, 1, groups=in_planes, bias=False)
        self.pw = ConvBNAct(in_planes, out_planes, 1, groups=groups, act="relu6")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class ConcatUnit(nn.Module):
    """Two layers in sequence whose outputs are concatenated (the early units of ChannelNet-v1)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.first(x)
        return torch.cat([a, self.second(a)], 1)


class GCWM(nn.Module):
    """Group channel-wise module: [channel-wise fusion], then two grouped depthwise-separable layers."""

    def __init__(self, channels: int, groups: int = 2, fuse: bool = True) -> None:
        super().__init__()
        # kernel 4g, stride g, padding 2g-1 keeps the channel count (see ChannelwiseConv)
        self.fuse = ChannelwiseConv(groups, 4 * groups, 2 * groups - 1) if fuse else nn.Identity()
        self.layers = nn.Sequential(DWSConv(channels, channels, groups=groups), DWSConv(channels, channels, groups=groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.fuse(x))


class AddUnit(nn.Module):
    """Two layers in sequence whose outputs are summed (the GCWM units at 512 channels)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.first(x)
        return a + self.second(a)


class ChannelNetV1(nn.Module):
    """ChannelNet-v1; ``strides`` are the five stages' down-sampling (all 2 at 224, fewer for 32x32)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, groups: int = 2,
                 strides: tuple[int, ...] = (2, 2, 2, 2, 2), width_mult: float = 1.0) -> None:
        super().__init__()

        def w(c: int) -> int:
            return max(groups, int(c * width_mult) // groups * groups)

        s1, s2, s3, s4, s5 = strides
        c1 = w(32) + w(64)
        c2 = 2 * w(128)
        c3 = 2 * w(256)
        self.features = nn.Sequential(
            ConcatUnit(ConvBNAct(in_channels, w(32), 3, s1, act="none"), DWSConv(w(32), w(64))),
            ConcatUnit(DWSConv(c1, w(128), s2), DWSConv(w(128), w(128))),
            ConcatUnit(DWSConv(c2, w(256), s3), DWSConv(w(256), w(256))),
            AddUnit(DWSConv(c3, w(512), s4), GCWM(w(512), groups, fuse=False)),
            AddUnit(GCWM(w(512), groups), GCWM(w(512), groups)),
            DWSConv(w(512), w(1024), s5), DWSConv(w(1024), w(1024)))
        self.fc = nn.Linear(w(1024), num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


@register_model("channelnet_v1", input_size=(3, 224, 224), num_classes=1000)
def channelnet_v1(num_classes: int = 1000, **kwargs) -> ChannelNetV1:
    """ChannelNet-v1 for ImageNet 224 (Gao et al. 2018, Table 3: 3.7M parameters, 407M FLOPs).

    Built from the released layer table, this counts 3.88M parameters and 535M MACs; see
    docs/zoo.md for why it differs from the paper's figures.
    """
    return ChannelNetV1(num_classes, **kwargs)


@register_model("channelnet_v1_cifar", input_size=(3, 32, 32), num_classes=10)
def channelnet_v1_cifar(num_classes: int = 10, **kwargs) -> ChannelNetV1:
    """ChannelNet-v1 (Gao et al. 2018) for 32x32: the first two stages keep the resolution (8x down-sampling)."""
    kwargs.setdefault("strides", (1, 1, 2, 2, 2))
    return ChannelNetV1(num_classes, **kwargs)
