"""A small CNN for the embedded 8x8 digits data: the model `slimkit demo` trains in a minute."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU layers (32, 64, 128 channels), one max-pool, global pooling, linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width),
            *_conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
            *_conv_bn_relu(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("digits_cnn", input_size=(1, 8, 8), num_classes=10)
def digits_cnn(num_classes: int = 10) -> DigitsCNN:
    """Small CNN for scikit-learn's 8x8 digits (about 100k parameters)."""
    return DigitsCNN(num_classes)
