"""Building blocks shared by the model zoo.

Layer classes with plain int/float/bool/str constructor arguments are registered with
:func:`slimkit.artifact.register_module` and keep each argument as a same-named attribute, so
an artifact of a compressed model can rebuild them. Block classes whose shape is fixed by the
base model (residual units and the like) are not registered: they are rebuilt from the base
spec and only their registered children change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..artifact import register_module

_ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "relu6": lambda: nn.ReLU6(inplace=True),
                "tanh": nn.Tanh, "none": nn.Identity}


def activation(name: str) -> nn.Module:
    """The activation module called ``name`` (``relu``, ``relu6``, ``tanh`` or ``none``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r} (known: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]()


@register_module
class ConvBNAct(nn.Sequential):
    """Convolution (no bias, BN follows), batch norm, activation; padding keeps the size at stride 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 act: str = "relu", padding: int = -1) -> None:
        # padding -1 means "same"; Xception's stem needs an explicit 0 ("valid")
        pad = kernel_size // 2 if padding < 0 else padding
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, stride, pad, groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels), activation(act))
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.groups, self.act, self.padding = stride, groups, act, padding


@register_module
class DepthwiseSeparable(nn.Sequential):
    """Depthwise 3x3 conv-BN-act then pointwise 1x1 conv-BN-act (MobileNet v1, Howard et al. 2017)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, act: str = "relu") -> None:
        super().__init__(ConvBNAct(in_channels, in_channels, 3, stride, groups=in_channels, act=act),
                         ConvBNAct(in_channels, out_channels, 1, act=act))
        self.in_channels, self.out_channels, self.stride, self.act = in_channels, out_channels, stride, act


@register_module
class SeparableConv(nn.Sequential):
    """Xception's separable convolution: depthwise then pointwise with nothing in between.

    Chollet (2017, sec. 4.2) found an activation between the two hurts, so neither BN nor
    ReLU sits there; the caller adds BN after the pointwise conv.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(in_channels, in_channels, kernel_size, stride, kernel_size // 2, groups=in_channels,
                                   bias=False),
                         nn.Conv2d(in_channels, out_channels, 1, bias=False))
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride


@register_module
class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle (Zhang et al. 2018): (g, c/g) -> (c/g, g) transpose of channels.

    Written with reshape/transpose rather than ``nn.ChannelShuffle`` so that it traces and
    exports to ONNX as plain Reshape/Transpose nodes.
    """

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


@register_module
class ChannelwiseConv(nn.Module):
    """A convolution along the channel axis, weights shared over positions (Gao et al. 2018).

    ``groups`` kernels of length ``kernel_size`` slide over the channels with stride
    ``groups``, so the output has as many channels as the input (with ``padding`` chosen so)
    and each output channel mixes only ``kernel_size`` neighbouring input channels: this is
    ChannelNets' fusion of the outputs of a group convolution, at ``groups * kernel_size``
    parameters instead of a dense 1x1's ``C**2``. Output channels are laid out kernel by
    kernel, so each group of a following group convolution sees one kernel's outputs over
    all channel positions, i.e. information from every input group. It is a Conv3d over
    (C, H, W) with a (k, 1, 1) kernel, which every exporter understands.
    """

    def __init__(self, groups: int, kernel_size: int, padding: int = 0, stride: int = -1, pad_end: int = -1) -> None:
        super().__init__()
        self.groups, self.kernel_size, self.padding = groups, kernel_size, padding
        self.stride, self.pad_end = stride, pad_end
        # ``pad_end`` >= 0 pads the end of the channel axis differently from its start: an even
        # kernel keeps the channel count only with TensorFlow's "same" split (k//2 - 1, k//2),
        # which Conv3d's symmetric padding cannot express (ChannelNet-v2's kernel is 64)
        self._asym = pad_end >= 0 and pad_end != padding
        self.conv = nn.Conv3d(1, groups, (kernel_size, 1, 1), (groups if stride < 0 else stride, 1, 1),
                              (0 if self._asym else padding, 0, 0), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        x = x.unsqueeze(1)
        if self._asym:
            x = F.pad(x, (0, 0, 0, 0, self.padding, self.pad_end))
        return self.conv(x).reshape(n, -1, h, w)  # (n, groups, depth, h, w) -> channels

    def extra_repr(self) -> str:
        end = f", pad_end={self.pad_end}" if self._asym else ""
        return f"groups={self.groups}, kernel_size={self.kernel_size}, padding={self.padding}{end}"


@register_module
class ConvClassifier(nn.Module):
    """ChannelNets' convolutional classification layer (Gao et al. 2018, sec. 3.4).

    Replaces global average pooling plus the fully-connected layer: one 3-D convolution over
    the final (C, H, W) feature map, seen as a single-channel volume, with a kernel of
    ``feature_size x feature_size`` spatially and ``in_channels - num_classes + 1`` along the
    channel axis, no padding, so it yields exactly ``num_classes`` outputs. Spatially it is a
    depthwise conv the size of the map (the pooling, learnt); along the channels a shared
    channel-wise conv (the classifier), so each class sees ``C - n + 1`` adjacent features with
    the same weights. Parameters: ``feature_size**2 * (C - n + 1)`` (1,225 for 7x7x1024 ->
    1000) where a 1024->1000 FC layer has 1.03M. No bias, as the paper counts none.
    """

    def __init__(self, in_channels: int, num_classes: int, feature_size: int) -> None:
        super().__init__()
        if not 0 < num_classes <= in_channels:
            raise ValueError(f"the convolutional classifier needs 0 < num_classes <= in_channels, got {num_classes} "
                             f"classes from {in_channels} channels")
        self.in_channels, self.num_classes, self.feature_size = in_channels, num_classes, feature_size
        self.conv = nn.Conv3d(1, 1, (in_channels - num_classes + 1, feature_size, feature_size), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the kernel covers the whole map only at the size it was built for; any other size would
        # silently give num_classes * (extra positions) logits, so fail loudly instead (not while
        # tracing, where the shape is fixed by the example input and the check is a constant)
        if not torch.jit.is_tracing() and (x.shape[-1] != self.feature_size or x.shape[-2] != self.feature_size):
            raise ValueError(f"ConvClassifier was built for {self.feature_size}x{self.feature_size} feature maps, "
                             f"got {tuple(x.shape[-2:])}")
        return self.conv(x.unsqueeze(1)).flatten(1)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_classes={self.num_classes}, feature_size={self.feature_size}"


@register_module
class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation gate (Hu et al. 2018): channel weights from globally pooled features."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.channels, self.reduction = channels, reduction
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.relu(self.fc1(s))))


def init_weights(model: nn.Module) -> None:
    """He-normal convs, unit BN, small-normal linear: the init the CIFAR/ImageNet papers here use."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
