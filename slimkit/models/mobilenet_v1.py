"""MobileNet v1 (Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks for
Mobile Vision Applications").

A strided 3x3 conv and 13 depthwise-separable layers (Table 1), global average pooling and a
linear classifier. The width multiplier alpha thins every layer (sec. 3.3); 1.0-224 has 4.2M
parameters and 569M mult-adds (Table 8); we count 4.23M (BN included) and 568.7M.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ConvBNAct, DepthwiseSeparable, init_weights
from .registry import register_model

# (output channels, stride) of the 13 depthwise-separable layers of Table 1
CFG = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
       (1024, 2), (1024, 1))


class MobileNetV1(nn.Module):
    """MobileNet v1; ``stem_stride=1`` keeps 32x32 inputs at 2x2 before pooling instead of 1x1."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3, stem_stride: int = 2,
                 dropout: float = 0.0) -> None:
        super().__init__()
        c = int(32 * width_mult)
        layers: list[nn.Module] = [ConvBNAct(in_channels, c, 3, stem_stride)]
        for out, stride in CFG:
            layers.append(DepthwiseSeparable(c, int(out * width_mult), stride))
            c = int(out * width_mult)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


@register_model("mobilenet_v1", input_size=(3, 224, 224), num_classes=1000)
def mobilenet_v1(num_classes: int = 1000, **kwargs) -> MobileNetV1:
    """MobileNet v1 for ImageNet 224 (Howard et al. 2017); ``width_mult`` is the paper's alpha."""
    return MobileNetV1(num_classes, **kwargs)


@register_model("mobilenet_v1_cifar", input_size=(3, 32, 32), num_classes=10)
def mobilenet_v1_cifar(num_classes: int = 10, **kwargs) -> MobileNetV1:
    """MobileNet v1 (Howard et al. 2017) for 32x32: the stem conv has stride 1 (16x down-sampling in all).

    The paper has no CIFAR version; this is the common adaptation (e.g. kuangliu/pytorch-cifar
    and the network-slimming literature), with the same layers and parameters as ImageNet's
    except the classifier.
    """
    kwargs.setdefault("stem_stride", 1)
    return MobileNetV1(num_classes, **kwargs)
