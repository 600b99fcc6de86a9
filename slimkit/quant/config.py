"""The options of int8 quantization (:class:`QuantConfig`) and of simulated 8-bit training (:class:`Train8Config`).

Declared once and used by :func:`slimkit.quant.quantize`, the ``quantize`` / ``train8`` recipe stages,
``slimkit quantize``'s flags and the provenance of a quantized artifact (see :mod:`slimkit.config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import MethodConfig, option
from ..errors import SlimkitError
from ..train.config import FitConfig
from .observers import OBSERVERS


@dataclass(frozen=True)
class QuantConfig(MethodConfig):
    """Static int8 post-training quantization (Jacob et al., CVPR 2018), optionally QAT-fine-tuned (Esser et al. 2020).

    Example:
        >>> QuantConfig(observer="entropy", max_drop=0.003).keep_float
        ()
    """

    family = "quantize"

    observer: str = option("minmax", "activation range method", choices=OBSERVERS)
    calib: int = option(512, "class-balanced train images for calibration", low=1)
    batch_size: int = option(64, "calibration batch size", low=1, flag="--calib-batch-size")
    max_drop: float | None = option(None, "accuracy guard: keep the most sensitive layers float until the validation "
                                          "top-1 drop is at most this (fraction, e.g. 0.003)", low=0, high=1)
    keep_float: tuple[str, ...] = option((), "layer names to keep in float (comma-separated)")
    reduce_range: bool | None = option(None, "7-bit activations (default: where this CPU lacks VNNI)", cli=False)
    observer_kwargs: dict[str, Any] = option({}, "the observer's own options (percentile, bins, ...)", cli=False)
    qat_epochs: int = option(0, "quantization-aware training epochs on the train split after calibration "
                                "(0 = PTQ only)", low=0)
    qat_lr: float = option(1e-3, "QAT learning rate", low=0, low_inclusive=False)

    def validate(self) -> None:
        from .observers import check_observer_kwargs

        try:
            check_observer_kwargs(OBSERVERS.get(self.observer), self.observer_kwargs, "observer_kwargs")
        except SlimkitError as e:  # its message, under this config's name
            raise self.error("observer_kwargs", str(e).split(": ", 1)[-1]) from None


@dataclass(frozen=True)
class Train8Config(FitConfig):
    """Training in simulated 8 bits: weights, activations and gradients (Banner et al., NeurIPS 2018).

    Example:
        >>> Train8Config(epochs=2).bits, Train8Config().lr
        (8, 0.01)
    """

    family = "train8"

    bits: int = option(8, "weight and activation bits", low=2, high=16)
    grad_bits: int = option(8, "bits of the gradients of the layer outputs", low=2, high=16)
    weight_grad_bits: int | None = option(16, "bits of the weight gradients (none: float)", low=2, high=16)
    range_bn: bool = option(True, "range batch norm (Banner et al.'s low-precision-friendly BN)")
    exact_constant: bool = option(True, "the exact Gaussian range constant instead of the paper's approximation")
    batch_size: int | None = option(None, "training batch size (default: the recipe's)", low=1, cli=False)
