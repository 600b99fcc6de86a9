"""torchvision's classification networks under plain names, built without weights.

Each name builds ``torchvision.models.get_model(name, weights=None, num_classes=...)``
(through the same path as the ``torchvision:NAME`` spec, so GoogLeNet and Inception v3 come
without their auxiliary classifiers), registered with the input size its paper uses.
"""

from __future__ import annotations

from torch import nn

from .registry import _torchvision, register_model

# name -> (paper, input size)
TORCHVISION_MODELS = {
    "alexnet": ("Krizhevsky et al. 2012, ImageNet Classification with Deep Convolutional Neural Networks", 224),
    "vgg16": ("Simonyan & Zisserman 2015, Very Deep Convolutional Networks for Large-Scale Image Recognition", 224),
    "googlenet": ("Szegedy et al. 2015, Going Deeper with Convolutions", 224),
    "inception_v3": ("Szegedy et al. 2016, Rethinking the Inception Architecture for Computer Vision", 299),
    "resnet18": ("He et al. 2016, Deep Residual Learning for Image Recognition", 224),
    "resnet50": ("He et al. 2016, Deep Residual Learning for Image Recognition", 224),
    "resnext50_32x4d": ("Xie et al. 2017, Aggregated Residual Transformations for Deep Neural Networks", 224),
    "wide_resnet50_2": ("Zagoruyko & Komodakis 2016, Wide Residual Networks", 224),
    "densenet121": ("Huang et al. 2017, Densely Connected Convolutional Networks", 224),
    "squeezenet1_1": ("Iandola et al. 2016, SqueezeNet (v1.1 from the authors' release)", 224),
    "mobilenet_v2": ("Sandler et al. 2018, MobileNetV2: Inverted Residuals and Linear Bottlenecks", 224),
    "mobilenet_v3_small": ("Howard et al. 2019, Searching for MobileNetV3", 224),
    "mobilenet_v3_large": ("Howard et al. 2019, Searching for MobileNetV3", 224),
    "shufflenet_v2_x1_0": ("Ma et al. 2018, ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design",
                           224),
}


def _make(name: str, paper: str):
    def build(num_classes: int = 1000, **kwargs) -> nn.Module:
        return _torchvision(name, num_classes, **kwargs)

    build.__name__ = name
    build.__doc__ = f"torchvision's {name} ({paper}), untrained."
    return build


for _name, (_paper, _size) in TORCHVISION_MODELS.items():
    register_model(_name, input_size=(3, _size, _size), num_classes=1000, paper=_paper)(_make(_name, _paper))
