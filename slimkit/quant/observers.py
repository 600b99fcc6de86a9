"""Calibration observers: how the clipping range of each activation tensor is chosen.

Every observer is a ``torch.ao`` observer subclass, so ``prepare_fx``/``convert_fx`` use it like
the stock ones; the scale and zero point always come from torch's own
``_calculate_qparams(min, max)`` (Jacob et al. 2018, eq. 1-2), only the *range* differs:

* ``minmax``     -- the running min and max (what the stock flow does);
* ``ema``        -- moving-average min/max, ``m <- m + c (batch_m - m)`` (Jacob et al. 2018);
* ``percentile`` -- the p-th percentile of ``|x|`` (e.g. 99.99; calibration study of Wu et al. 2020);
* ``entropy``    -- the threshold minimising KL(P || Q) between the ``|x|`` histogram and its
  quantised version (Migacz 2017, "8-bit Inference with TensorRT");
* ``mse``        -- the threshold minimising the expected squared error (rounding noise inside
  the range, ``step^2 / 12`` per value, plus clipping error outside it).

The histogram methods keep a histogram of ``|x|`` with a fixed bin width that grows by whole
bins when a later batch exceeds it (as NVIDIA's pytorch-quantization calibrators do), so the
result does not depend on how the calibration set is cut into batches beyond float rounding.
They return a symmetric threshold ``T``: the range is ``[0, T]`` for non-negative tensors (ReLU
outputs, most of a CNN) and ``[-T, T]`` otherwise, then intersected with the observed min/max.
"""

from __future__ import annotations

import inspect
import math
from abc import abstractmethod
from typing import Any

import torch
from torch.ao.quantization.observer import MinMaxObserver, MovingAverageMinMaxObserver

from ..errors import SlimkitError
from ..registry import Registry

OBSERVERS: Registry[type] = Registry("observer")  # each class carries its facts: ``paper``


@OBSERVERS.register("minmax")
class MinMax(MinMaxObserver):
    """Running min/max over all calibration batches (the stock PyTorch observer)."""

    paper = "Jacob et al., CVPR 2018"

    def clip_range(self) -> tuple[float, float]:
        return float(self.min_val), float(self.max_val)


@OBSERVERS.register("ema")
class EMA(MovingAverageMinMaxObserver):
    """Moving-average min/max: ``min <- min + c * (batch_min - min)``, first batch taken as is."""

    paper = "Jacob et al., CVPR 2018"

    def __init__(self, averaging_constant: float = 0.01, **kwargs: Any) -> None:
        super().__init__(averaging_constant=averaging_constant, **kwargs)

    def clip_range(self) -> tuple[float, float]:
        return float(self.min_val), float(self.max_val)


class HistogramClip(MinMaxObserver):
    """Base of the histogram observers: min/max plus a growing fixed-width ``|x|`` histogram."""

    def __init__(self, bins: int = 2048, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bins = int(bins)
        # Plain attributes, not buffers: their shape changes while calibrating, and the
        # calibrated state that matters (scale, zero point) lives in the converted model.
        self.hist: torch.Tensor | None = None
        self.width = 0.0

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        super().forward(x_orig)
        x = x_orig.detach().abs().float().flatten()
        top = float(x.max())
        if self.hist is None:
            if top == 0.0:
                return x_orig  # nothing to learn from an all-zero batch
            self.width = top / self.bins
            self.hist = torch.zeros(self.bins, dtype=torch.float64)
        n = max(len(self.hist), math.ceil(top / self.width))
        if n > len(self.hist):
            self.hist = torch.cat([self.hist, torch.zeros(n - len(self.hist), dtype=torch.float64)])
        # histc puts values equal to the upper edge in the last bin, so nothing is dropped.
        self.hist += torch.histc(x, bins=n, min=0.0, max=n * self.width).double()
        return x_orig

    @abstractmethod
    def threshold(self) -> float:
        """The chosen ``|x|`` clipping threshold; each subclass is one method of choosing it."""

    def levels(self) -> int:
        """Quantization levels on one side of zero for this tensor's sign pattern."""
        full = self.quant_max - self.quant_min + 1
        return full if float(self.min_val) >= 0 else full // 2

    def clip_range(self) -> tuple[float, float]:
        lo, hi = float(self.min_val), float(self.max_val)
        if self.hist is None:
            return lo, hi
        t = self.threshold()
        return max(lo, -t), min(hi, t)

    def calculate_qparams(self):  # type: ignore[override]
        lo, hi = self.clip_range()
        return self._calculate_qparams(torch.tensor(lo), torch.tensor(hi))

    def _edges(self) -> torch.Tensor:
        return torch.arange(1, len(self.hist) + 1, dtype=torch.float64) * self.width


@OBSERVERS.register("percentile")
class Percentile(HistogramClip):
    """Clip ``|x|`` at its ``percentile``-th percentile (default 99.99; Wu et al. 2020 compare 99.9-99.9999)."""

    paper = "Wu et al., arXiv 2020, Integer Quantization for Deep Learning Inference"

    def __init__(self, percentile: float = 99.99, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = float(percentile)

    def threshold(self) -> float:
        cdf = torch.cumsum(self.hist, 0)
        target = cdf[-1] * self.percentile / 100
        i = int(torch.searchsorted(cdf, target))
        return float(self._edges()[min(i, len(self.hist) - 1)])


@OBSERVERS.register("entropy")
class Entropy(HistogramClip):
    """TensorRT's KL-divergence calibration (Migacz 2017), searched over histogram bin edges.

    For each candidate threshold ``i`` bins: P is the histogram clipped at ``i`` (outliers added
    to the last bin), Q is the first ``i`` bins merged into as many groups as there are
    quantization levels and expanded back over the bins that are non-empty in P; the threshold
    minimising KL(P || Q) wins. At most ``max_candidates`` thresholds are tried, evenly spaced.
    """

    paper = "Migacz, GTC 2017, 8-bit Inference with TensorRT"

    def __init__(self, max_candidates: int = 512, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_candidates = int(max_candidates)

    def threshold(self) -> float:
        import numpy as np

        hist = self.hist.numpy().copy()
        if len(hist) > 1:
            # The exact zeros of ReLU outputs pile up in bin 0; left in, that spike dominates KL
            # and drives the threshold to the smallest candidate (NVIDIA's calibrator does the same).
            hist[0] = hist[1]
        tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = hist[i:].sum()
        levels = self.levels()
        n = len(hist)
        if n <= levels:
            return float(n * self.width)
        stride = max(1, (n - levels) // self.max_candidates)
        candidates = list(range(levels, n + 1, stride))
        if candidates[-1] != n:
            candidates.append(n)
        best_i, best_kl = n, math.inf
        for i in candidates:
            p = hist[:i].copy()
            p[i - 1] += tail[i]  # outliers are clipped into the last bin
            nonzero = p != 0
            edges = np.linspace(0, i, levels + 1)
            group = np.minimum(np.searchsorted(edges, np.arange(i), side="right") - 1, levels - 1)
            mass = np.bincount(group, weights=hist[:i], minlength=levels)
            count = np.bincount(group, weights=nonzero.astype(np.float64), minlength=levels)
            q = np.where(nonzero, mass[group] / np.maximum(count[group], 1), 0.0)
            if p.sum() == 0 or q.sum() == 0:
                continue
            p, q = p / p.sum(), q / q.sum()
            m = p > 0
            # Q is empty where P holds only clipped outliers; a floor keeps KL finite there
            # (MXNet smooths for the same reason) while still charging for the clipped mass.
            kl = float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))))
            if kl < best_kl:
                best_kl, best_i = kl, i
        return float(best_i * self.width)


@OBSERVERS.register("mse")
class MSE(HistogramClip):
    """MSE-optimal clipping: minimise rounding noise (step^2/12 inside) plus clipping error (Wu et al. 2020)."""

    paper = "Wu et al., arXiv 2020, Integer Quantization for Deep Learning Inference"

    def __init__(self, candidates: int = 512, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.candidates = int(candidates)

    def threshold(self) -> float:
        hist = self.hist
        centers = (torch.arange(len(hist), dtype=torch.float64) + 0.5) * self.width
        top = len(hist) * self.width
        ts = torch.linspace(top / self.candidates, top, self.candidates, dtype=torch.float64)
        levels = self.levels()
        step = ts / (levels - 1)
        inside = centers[None, :] <= ts[:, None]
        rounding = (hist[None, :] * inside).sum(1) * step ** 2 / 12
        clipping = (hist[None, :] * (~inside) * (centers[None, :] - ts[:, None]) ** 2).sum(1)
        return float(ts[int(torch.argmin(rounding + clipping))])


def observer_class(name: str) -> type:
    """The observer class registered as ``name`` (``minmax``, ``ema``, ``percentile``, ``entropy``, ``mse``)."""
    return OBSERVERS.get(name)


_OBSERVER_LIMITS = {"bins": 1 << 16, "candidates": 1 << 16, "max_candidates": 1 << 16}


def check_observer_kwargs(observer: type, kwargs: dict, where: str) -> dict:
    """The observer's own options: names it takes, finite numbers, histogram sizes of at most 65,536 bins."""
    named = set()
    for cls in observer.__mro__:
        if "__init__" in vars(cls):
            named |= {n for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"
                      and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for k, v in kwargs.items():
        if k not in named:
            raise SlimkitError(f"{where}: {observer.__name__} takes no option {k!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SlimkitError(f"{where}: {k} must be a finite number, got {v!r}")
        if k in _OBSERVER_LIMITS and not 1 <= v <= _OBSERVER_LIMITS[k]:
            raise SlimkitError(f"{where}: {k} must be in [1, {_OBSERVER_LIMITS[k]:,}], got {v!r}")
    return kwargs
