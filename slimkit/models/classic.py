"""Plain (non-residual) classics for 32x32 inputs: LeNet-5, Network-in-Network and VGG-16."""

from __future__ import annotations

import torch
from torch import nn

from .layers import ConvBNAct, init_weights
from .registry import register_model


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998, "Gradient-Based Learning Applied to Document Recognition").

    The paper's layer sizes: C1 6@5x5, S2, C3 16@5x5, S4, C5 120, F6 84, output. As modern
    reimplementations do, C3 connects to all six S2 maps (the paper's partial connection
    table was a symmetry-breaking device for 1998 hardware), subsampling is max pooling
    without trainable coefficients, and the RBF output is a linear layer. With 1 input channel
    this has 61,706 parameters against the paper's ~60k (C3's table saves 900 weights).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class NIN(nn.Module):
    """Network in Network for CIFAR (Lin, Chen & Yan 2014, "Network In Network").

    Three mlpconv layers (a spatial conv followed by two 1x1 convs, the "micro MLP") and
    global average pooling over the last mlpconv's ``num_classes`` maps in place of fully
    connected layers, as in the authors' CIFAR-10 configuration (192/160/96, 192/192/192,
    192/192/classes; dropout after the first two). No batch norm, as in the paper.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()

        def mlpconv(cin: int, cout: int, k: int, c1: int, c2: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU(inplace=True),
                    nn.Conv2d(cout, c1, 1), nn.ReLU(inplace=True), nn.Conv2d(c1, c2, 1), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *mlpconv(in_channels, 192, 5, 160, 96), nn.MaxPool2d(3, 2, 1), nn.Dropout(dropout),
            *mlpconv(96, 192, 5, 192, 192), nn.AvgPool2d(3, 2, 1), nn.Dropout(dropout),
            *mlpconv(192, 192, 3, 192, num_classes)[:-1],  # no ReLU on the class maps: they are logits
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.05)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16Cifar(nn.Module):
    """VGG-16 with batch norm for CIFAR (Simonyan & Zisserman 2015, adapted for 32x32).

    The variant of Li et al. 2017 ("Pruning Filters for Efficient ConvNets", Table 1: 1.5e7
    parameters, 3.13e8 FLOPs, i.e. MACs) taken from Zagoruyko's cifar.torch: the 13 conv
    layers with BN, and after five poolings a 512-d feature feeding a 512-unit hidden layer
    (BN, ReLU, dropout) and the output layer instead of the 4096-4096 ImageNet head.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(ConvBNAct(c, int(v * width_mult), 3))
                c = int(v * width_mult)
        self.features = nn.Sequential(*layers)
        hidden = int(512 * width_mult)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c, hidden), nn.BatchNorm1d(hidden),
                                        nn.ReLU(inplace=True),
                                        nn.Dropout(0.5), nn.Linear(hidden, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("lenet5", input_size=(3, 32, 32), num_classes=10)
def lenet5(num_classes: int = 10, **kwargs) -> LeNet5:
    """LeNet-5 (LeCun et al. 1998) for 32x32 inputs; ``in_channels=1`` for MNIST-style data."""
    return LeNet5(num_classes, **kwargs)


class LeNet300100(nn.Module):
    """The fully connected LeNet-300-100 (LeCun et al. 1998): two hidden layers of 300 and 100 units."""

    def __init__(self, num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        self.in_features = in_features
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 300), nn.ReLU(inplace=True),
                                        nn.Linear(300, 100), nn.ReLU(inplace=True), nn.Linear(100, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


@register_model("lenet_300_100", input_size=(1, 28, 28), num_classes=10)
def lenet_300_100(num_classes: int = 10, **kwargs) -> LeNet300100:
    """LeNet-300-100 (LeCun et al. 1998), the MLP of Deep Compression's first table; ``in_features=64`` for digits."""
    return LeNet300100(num_classes, **kwargs)


@register_model("nin", input_size=(3, 32, 32), num_classes=10)
def nin(num_classes: int = 10, **kwargs) -> NIN:
    """Network in Network (Lin et al. 2014), CIFAR configuration."""
    return NIN(num_classes, **kwargs)


@register_model("vgg16_cifar", input_size=(3, 32, 32), num_classes=10)
def vgg16_cifar(num_classes: int = 10, **kwargs) -> VGG16Cifar:
    """VGG-16-BN for CIFAR with a 512-unit hidden layer (Simonyan & Zisserman 2015; Li et al. 2017)."""
    return VGG16Cifar(num_classes, **kwargs)
