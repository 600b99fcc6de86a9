"""ChannelNets (Gao, Wang & Ji 2018, "ChannelNets: Compact and Efficient Convolutional Neural
Networks via Channel-Wise Convolutions", NeurIPS; arXiv 1809.01330).

ChannelNets replace dense connections between feature maps by channel-wise convolutions:
1-D convolutions along the channel axis with weights shared over positions. The paper builds
three networks on MobileNet v1's layout (its architecture table, v1/v2/v3 side by side):

* **ChannelNet-v1**: MobileNet's 14x14 stack of 512-channel depthwise-separable layers becomes
  two group channel-wise modules (GCWM) and one group module (GM). A GM is two depthwise-
  separable layers whose 1x1 convs are grouped (g = 2) with a skip connection; a GCWM adds a
  group channel-wise convolution (kernel 8 = 4g, stride g) that lets every group see all
  groups at g * 8 parameters, where a dense 1x1 conv would cost C**2. Everything else is
  MobileNet's: 3x3 conv/2 (32), DWS 64, DWS/2 128, DWS 128, DWS/2 256, DWS 256, DWS/2 512,
  [GCWM, GCWM, GM], DWS/2 1024, DWS 1024, average pool, FC.
* **ChannelNet-v2**: the last depthwise-separable layer (7x7x1024) becomes a depthwise-
  separable *channel-wise* conv: depthwise 3x3, then one shared channel-wise kernel of
  length 64 instead of the 1024x1024 1x1 conv (64 parameters instead of 1.05M).
* **ChannelNet-v3**: v2 with the convolutional classification layer (a 7x7x25 3-D conv over
  the 7x7x1024 map, :class:`ConvClassifier`) instead of average pooling and the FC layer.

The authors' TensorFlow release (HongyangGao/ChannelNets, re-implemented in pytorchcv) differs
from the paper's table: its early units concatenate the two layers' outputs (96/256/512
channels into the next strided layer) and it orders the 512-channel modules GM, GCWM, GCWM
with the channel-wise fusion before a GCWM's layers. That network is kept as
``channelnet_v1_release``; the plain names follow the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ChannelwiseConv, ConvBNAct, ConvClassifier, init_weights
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


class ReleaseGCWM(nn.Module):
    """The release's group channel-wise module: [channel-wise fusion], then two grouped DWS layers."""

    def __init__(self, channels: int, groups: int = 2, fuse: bool = True) -> None:
        super().__init__()
        # kernel 4g, stride g, padding 2g-1 keeps the channel count (see ChannelwiseConv)
        self.fuse = ChannelwiseConv(groups, 4 * groups, 2 * groups - 1) if fuse else nn.Identity()
        self.layers = nn.Sequential(DWSConv(channels, channels, groups=groups), DWSConv(channels, channels,
                                                                                        groups=groups))

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


class ChannelNetV1Release(nn.Module):
    """ChannelNet-v1 as in the authors' TensorFlow release (Gao et al. 2018; see the module docstring).

    ``strides`` are the five stages' down-sampling (all 2 at 224, fewer for 32x32).
    """

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
            AddUnit(DWSConv(c3, w(512), s4), ReleaseGCWM(w(512), groups, fuse=False)),
            AddUnit(ReleaseGCWM(w(512), groups), ReleaseGCWM(w(512), groups)),
            DWSConv(w(512), w(1024), s5), DWSConv(w(1024), w(1024)))
        self.fc = nn.Linear(w(1024), num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class GroupModule(nn.Module):
    """The paper's GM, or its GCWM with ``fuse_kernel`` > 0 (Gao et al. 2018, sec. 3.5, Fig. 3).

    Two depthwise-separable layers with g-grouped 1x1 convs and a skip connection around them.
    The GCWM follows the second grouped 1x1 conv with a group channel-wise conv (``g`` kernels
    of length ``fuse_kernel`` at stride ``g``), the fusion layer the paper places after group
    convolutions so the next module's groups each see every group; the skip connection adds
    after it. (The release applies the fusion before the two layers; the counts are the same.)
    """

    def __init__(self, channels: int, groups: int = 2, fuse_kernel: int = 0) -> None:
        super().__init__()
        self.layers = nn.Sequential(DWSConv(channels, channels, groups=groups),
                                    DWSConv(channels, channels, groups=groups))
        # padding 2g-1 with kernel 4g and stride g keeps C channels (see ChannelwiseConv)
        self.fuse = ChannelwiseConv(groups, fuse_kernel, 2 * groups - 1) if fuse_kernel else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fuse(self.layers(x))


class DWSCWConv(nn.Module):
    """Depthwise-separable channel-wise conv (Gao et al. 2018, sec. 3.3): depthwise 3x3, then one
    channel-wise kernel shared by all output channels in place of the dense 1x1 conv, BN, ReLU6.

    TensorFlow "same" padding of the channel axis, so an even kernel (the paper's 64) keeps
    the channel count.
    """

    def __init__(self, channels: int, kernel_size: int = 64) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False)
        self.cw = ChannelwiseConv(1, kernel_size, (kernel_size - 1) // 2, 1, kernel_size // 2)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.cw(self.dw(x))))


class ChannelNet(nn.Module):
    """ChannelNet-v1/v2/v3 as the paper's architecture table defines them (Gao et al. 2018).

    ``version`` 1: DWS last layer, pool + FC; 2: DWSCWConv last layer (kernel ``cw_kernel``),
    pool + FC; 3: DWSCWConv last layer and the convolutional classification layer. ``strides``
    are the down-sampling of the stem and of the four strided DWS layers (all 2 at 224); v3's
    classifier is sized for the final map of a ``input_size`` input.
    """

    def __init__(self, num_classes: int = 1000, version: int = 1, in_channels: int = 3, groups: int = 2,
                 strides: tuple[int, ...] = (2, 2, 2, 2, 2), width_mult: float = 1.0, gcw_kernel: int = 8,
                 cw_kernel: int = 64, input_size: int = 224) -> None:
        super().__init__()
        if version not in (1, 2, 3):
            raise ValueError(f"ChannelNet version must be 1, 2 or 3, got {version}")

        def w(c: int) -> int:
            return max(groups, int(c * width_mult) // groups * groups)

        s1, s2, s3, s4, s5 = strides
        c512, c1024 = w(512), w(1024)
        self.version = version
        self.features = nn.Sequential(
            ConvBNAct(in_channels, w(32), 3, s1, act="relu6"),
            DWSConv(w(32), w(64)),
            DWSConv(w(64), w(128), s2), DWSConv(w(128), w(128)),
            DWSConv(w(128), w(256), s3), DWSConv(w(256), w(256)),
            DWSConv(w(256), c512, s4),
            # the paper's six 512-channel layers at 14x14, as two GCWMs then one GM
            GroupModule(c512, groups, gcw_kernel), GroupModule(c512, groups, gcw_kernel), GroupModule(c512, groups),
            DWSConv(c512, c1024, s5),
            DWSConv(c1024, c1024) if version == 1 else DWSCWConv(c1024, cw_kernel))
        if version == 3:
            size = input_size
            for s in strides:
                size = (size + 2 - 3) // s + 1  # each strided 3x3 conv has padding 1
            self.classifier: nn.Module = ConvClassifier(c1024, num_classes, size)
        else:
            self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(c1024, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# The CIFAR variants keep the resolution in the stem and the first strided layer (8x down-
# sampling, a 4x4 final map): our adaptation, the paper defines none.
_CIFAR_STRIDES = (1, 1, 2, 2, 2)


@register_model("channelnet_v1", input_size=(3, 224, 224), num_classes=1000)
def channelnet_v1(num_classes: int = 1000, **kwargs) -> ChannelNet:
    """ChannelNet-v1 for ImageNet 224 (Gao et al. 2018): the paper's table, 3.7M parameters, 407M FLOPs.

    We count 3.71M parameters and 467M MACs; docs/zoo.md explains the MAC difference.
    """
    return ChannelNet(num_classes, 1, **kwargs)


@register_model("channelnet_v2", input_size=(3, 224, 224), num_classes=1000)
def channelnet_v2(num_classes: int = 1000, **kwargs) -> ChannelNet:
    """ChannelNet-v2 for ImageNet 224 (Gao et al. 2018): v1 with a depthwise-separable channel-wise last layer."""
    return ChannelNet(num_classes, 2, **kwargs)


@register_model("channelnet_v3", input_size=(3, 224, 224), num_classes=1000)
def channelnet_v3(num_classes: int = 1000, **kwargs) -> ChannelNet:
    """ChannelNet-v3 for ImageNet 224 (Gao et al. 2018): v2 with the convolutional classification layer."""
    return ChannelNet(num_classes, 3, **kwargs)


@register_model("channelnet_v1_cifar", input_size=(3, 32, 32), num_classes=10)
def channelnet_v1_cifar(num_classes: int = 10, **kwargs) -> ChannelNet:
    """ChannelNet-v1 (Gao et al. 2018) for 32x32: stem and first strided layer unstrided (8x down-sampling)."""
    kwargs.setdefault("strides", _CIFAR_STRIDES)
    return ChannelNet(num_classes, 1, **kwargs)


@register_model("channelnet_v2_cifar", input_size=(3, 32, 32), num_classes=10)
def channelnet_v2_cifar(num_classes: int = 10, **kwargs) -> ChannelNet:
    """ChannelNet-v2 (Gao et al. 2018) for 32x32: stem and first strided layer unstrided (8x down-sampling)."""
    kwargs.setdefault("strides", _CIFAR_STRIDES)
    return ChannelNet(num_classes, 2, **kwargs)


@register_model("channelnet_v3_cifar", input_size=(3, 32, 32), num_classes=10)
def channelnet_v3_cifar(num_classes: int = 10, **kwargs) -> ChannelNet:
    """ChannelNet-v3 (Gao et al. 2018) for 32x32: 8x down-sampling, so a 4x4x1015 convolutional classifier."""
    kwargs.setdefault("strides", _CIFAR_STRIDES)
    kwargs.setdefault("input_size", 32)
    return ChannelNet(num_classes, 3, **kwargs)


@register_model("channelnet_v1_release", input_size=(3, 224, 224), num_classes=1000)
def channelnet_v1_release(num_classes: int = 1000, **kwargs) -> ChannelNetV1Release:
    """ChannelNet-v1 as the authors' TensorFlow release builds it (Gao et al. 2018; pytorchcv's table).

    Concatenating early units: 3.88M parameters and 535M MACs against the paper's 3.7M / 407M.
    """
    return ChannelNetV1Release(num_classes, **kwargs)


@register_model("channelnet_v1_release_cifar", input_size=(3, 32, 32), num_classes=10)
def channelnet_v1_release_cifar(num_classes: int = 10, **kwargs) -> ChannelNetV1Release:
    """The released ChannelNet-v1 (Gao et al. 2018) for 32x32: the first two stages keep the resolution."""
    kwargs.setdefault("strides", (1, 1, 2, 2, 2))
    return ChannelNetV1Release(num_classes, **kwargs)
