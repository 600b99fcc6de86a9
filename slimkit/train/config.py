"""The training options of :func:`slimkit.train.fit` as one config (recipes' fine-tunes, commands' training flags)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig, option
from .optim import OPTIMIZERS
from .schedules import SCHEDULES


@dataclass(frozen=True)
class FitConfig(MethodConfig):
    """How to train: optimizer, learning rate and schedule, for ``epochs`` epochs (see :func:`slimkit.train.fit`).

    Example:
        >>> FitConfig(epochs=2, lr=0.01).to_dict()["lr"]
        0.01
        >>> FitConfig(optimizer="yogy")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        slimkit.config.ConfigError: fit: optimizer: unknown optimizer 'yogy' (known: ...); did you mean 'yogi'?
    """

    family = "fit"

    epochs: int = option(1, "training epochs", low=0)
    optimizer: str = option("sgd", "optimizer", choices=OPTIMIZERS)
    lr: float = option(0.01, "learning rate (for accelegrad: the diameter D)", low=0, low_inclusive=False)
    weight_decay: float = option(5e-4, "L2 weight decay", low=0)
    momentum: float = option(0.9, "SGD momentum", low=0, high=1, high_inclusive=False)
    schedule: str = option("cosine", "learning-rate schedule, stepped per batch", choices=SCHEDULES)
    warmup_epochs: float = option(0.0, "linear warm-up epochs (cosine)", low=0)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy", low=0, high=1, high_inclusive=False)
    grad_clip: float | None = option(None, "clip the gradient norm to this value", low=0, low_inclusive=False)

    def fit_kwargs(self) -> dict:
        """The keyword arguments of :func:`slimkit.train.fit` this config sets."""
        return {name: getattr(self, name) for name in FitConfig.field_names()}
