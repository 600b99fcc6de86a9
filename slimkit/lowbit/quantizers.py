"""Low-bit quantizers trained with the straight-through estimator: weights (parametrizations) and activations.

Weights (each a ``torch.nn.utils.parametrize`` parametrization: the optimizer trains the latent
float weight, every forward uses its quantized value, baking leaves the quantized values):

* :class:`LSQWeight`: learned step size (Esser et al., ICLR 2020): ``round(clamp(w/s, -Qn, Qp)) * s``
  with ``s`` trained, its gradient scaled by ``1/sqrt(N Qp)``;
* :class:`DoReFaWeight`: ``2 q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1`` times the layer's mean
  ``|w|`` (Zhou et al. 2016; the scale keeps a pretrained layer's output range);
* :class:`TernaryWeight`: trained ternary quantization (Zhu, Han, Mao & Dally, ICLR 2017): ``+Wp``,
  ``0``, ``-Wn`` with the threshold ``t max|w|`` and ``Wp``, ``Wn`` trained;
* :class:`BinaryWeight`: ``alpha_c sign(w)`` with ``alpha_c`` the mean ``|w|`` of output channel ``c``
  (BinaryConnect, Courbariaux et al. 2015, with XNOR-Net's scale, Rastegari et al. 2016);
* :class:`UniformWeight`: symmetric per-tensor ``b``-bit rounding on the max-abs scale: the first
  conv and the classifier at 8 bits, whatever the method.

Activations (:class:`ActQuant`, a module put before a layer): LSQ's learned step, DoReFa's
``q_k(clip(x, 0, 1))`` and PACT's learned clipping level ``alpha`` (Choi et al. 2018), unsigned
after a ReLU and signed where the layer's input takes negative values (found on the first batch).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..artifact import register_module


class _Through(torch.autograd.Function):
    """``q`` forward exactly (``x + (q - x).detach()`` is off by rounding, which adds distinct values), the
    gradient to ``x`` unchanged."""

    @staticmethod
    def forward(ctx, x, q):
        return q.clone()

    @staticmethod
    def backward(ctx, g):
        return g, None


def through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The straight-through estimator (Bengio et al. 2013): the value ``q``, the gradient of ``x``."""
    if not (torch.is_grad_enabled() and x.requires_grad):  # inference and export: plain tensor ops only
        return q
    return _Through.apply(x, q.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward."""
    return through(x, torch.round(x))


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` forward, its gradient times ``scale`` backward (LSQ's step-size gradient scaling)."""
    return (x - x * scale).detach() + x * scale


def signed_range(bits: int) -> tuple[int, int]:
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


class LSQWeight(nn.Module):
    """Learned step size quantization of a weight (Esser et al., ICLR 2020)."""

    def __init__(self, weight: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.bits = bits
        qn, qp = signed_range(bits)
        self.step = nn.Parameter(torch.tensor(float(2 * weight.detach().abs().mean() / math.sqrt(qp))))
        self.gscale = 1.0 / math.sqrt(weight.numel() * qp)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        qn, qp = signed_range(self.bits)
        s = grad_scale(self.step.abs().clamp(min=1e-8), self.gscale)
        return round_ste((w / s).clamp(-qn, qp)) * s


class DoReFaWeight(nn.Module):
    """DoReFa-Net weight quantization to ``bits`` (Zhou et al. 2016), rescaled by the layer's mean |w|."""

    def __init__(self, weight: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("scale", weight.detach().abs().mean().clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        n = 2**self.bits - 1
        t = torch.tanh(w)
        x = t / (2 * t.abs().max().detach().clamp(min=1e-8)) + 0.5
        return (2 * round_ste(x * n) / n - 1) * self.scale


class _Ternary(torch.autograd.Function):
    """TTQ's forward and its gradients (Zhu et al. 2017, eq. 6-8)."""

    @staticmethod
    def forward(ctx, w, wp, wn, threshold):
        delta = threshold * w.abs().max()
        pos, neg = w > delta, w < -delta
        ctx.save_for_backward(pos, neg, wp, wn)
        return torch.where(pos, wp, torch.where(neg, -wn, torch.zeros((), dtype=w.dtype)))

    @staticmethod
    def backward(ctx, g):
        pos, neg, wp, wn = ctx.saved_tensors
        grad_w = torch.where(pos, wp * g, torch.where(neg, wn * g, g))  # scaled per region, identity at zero
        return grad_w, g[pos].sum().reshape(wp.shape), -g[neg].sum().reshape(wn.shape), None


class TernaryWeight(nn.Module):
    """Trained ternary weights {+Wp, 0, -Wn} per layer (Zhu, Han, Mao & Dally, ICLR 2017)."""

    def __init__(self, weight: torch.Tensor, threshold: float = 0.05) -> None:
        super().__init__()
        self.threshold = threshold
        w = weight.detach()
        delta = threshold * w.abs().max()
        # initial scales: the mean magnitude of each side, so the first forward is close to the float layer
        self.wp = nn.Parameter(w[w > delta].mean().reshape(()) if (w > delta).any() else torch.tensor(1e-3))
        self.wn = nn.Parameter(-w[w < -delta].mean().reshape(()) if (w < -delta).any() else torch.tensor(1e-3))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # magnitudes: the two scales stay on their sides of zero whatever training does to their sign
        return _Ternary.apply(w, self.wp.abs(), self.wn.abs(), self.threshold)


class BinaryWeight(nn.Module):
    """``alpha_c * sign(w)`` per output channel (BinaryConnect's sign with XNOR-Net's scale); clipped STE."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        alpha = w.detach().abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
        sign = torch.where(w >= 0, torch.ones((), dtype=w.dtype), -torch.ones((), dtype=w.dtype))
        return through(w.clamp(-1, 1), alpha * sign)  # BinaryConnect: no gradient once |w| > 1


class UniformWeight(nn.Module):
    """Symmetric per-tensor ``bits``-bit rounding on the max-abs scale (the first conv and classifier)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        qp = 2 ** (self.bits - 1) - 1
        s = w.detach().abs().max().clamp(min=1e-12) / qp
        return round_ste(w / s).clamp(-qp, qp) * s


@register_module
class ActQuant(nn.Module):
    """Quantize a layer's input to ``bits``: ``lsq`` (learned step), ``dorefa`` (clip to [0, 1]) or ``pact``
    (learned clip level); unsigned, or ``signed`` where the input takes negative values."""

    def __init__(self, bits: int = 8, method: str = "lsq", signed: bool = False) -> None:
        super().__init__()
        self.bits, self.method, self.signed = bits, method, signed
        self.level = nn.Parameter(torch.tensor(1.0))  # LSQ: the step; PACT: alpha; DoReFa: unused (1)
        self.register_buffer("initialized", torch.tensor(False))

    def levels(self) -> tuple[int, int]:
        return signed_range(self.bits) if self.signed else (0, 2**self.bits - 1)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, method={self.method}, signed={self.signed}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qn, qp = self.levels()
        if not bool(self.initialized):
            with torch.no_grad():  # from the first batch: LSQ's 2 mean|x| / sqrt(Qp), PACT's largest value
                if self.method == "lsq":
                    self.level.fill_(float(2 * x.abs().mean() / math.sqrt(qp)) + 1e-8)
                elif self.method == "pact":
                    self.level.fill_(float(x.abs().max()) + 1e-8)
                self.initialized.fill_(True)
        if self.method == "dorefa":
            lo = -1.0 if self.signed else 0.0
            return round_ste((x.clamp(lo, 1.0) - lo) / (1 - lo) * (2**self.bits - 1)) / (2**self.bits - 1) * (
                1 - lo) + lo
        if self.method == "pact":
            alpha = self.level.abs() + 1e-8
            low = -alpha if self.signed else torch.zeros_like(alpha)
            y = torch.minimum(torch.maximum(x, low), alpha)  # the gradient reaches alpha where x is clipped
            step = (alpha - low) / (2**self.bits - 1)
            return round_ste((y - low) / step) * step + low
        s = grad_scale(self.level.abs().clamp(min=1e-8), 1.0 / math.sqrt(x[0].numel() * qp))
        return round_ste((x / s).clamp(-qn, qp)) * s
