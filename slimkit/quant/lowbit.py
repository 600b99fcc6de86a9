"""Simulated low-bit arithmetic for 8-bit training (Banner et al., NeurIPS 2018): quantizers and layer functions.

Values are put on a symmetric integer grid times a float scale and stored back as float, so
float kernels compute what an integer kernel with a wide accumulator would. The straight-through
estimator (Bengio et al. 2013) carries gradients through forward rounding; the backward pass of
the conv/linear functions quantizes the output gradient twice ("Gradients Bifurcation", Banner
et al. 2018, section 5): an 8-bit stochastically rounded copy for the error-propagation product
and a higher-precision copy for the weight gradient. Used by :mod:`slimkit.quant.train8`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import SlimkitError

__all__ = ["quantize_grad", "quantize_ste", "quantize_symmetric"]


# ---------------------------------------------------------------------------------------------
# Quantizers (simulated: values on an integer grid times a float scale, stored as float)

def _qmax(bits: int, signed: bool) -> int:
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def quantize_symmetric(x: torch.Tensor, bits: int, *, stochastic: bool = False, dim: int | None = None,
                       max_abs: torch.Tensor | None = None, signed: bool | None = None) -> torch.Tensor:
    """Symmetric (zero point 0) uniform quantize-dequantize of ``x`` to ``bits`` bits (Banner et al. 2018).

    The scale is ``max|x| / qmax`` per tensor, or per slice along ``dim`` (per output channel for
    weights); ``max_abs`` overrides the measured maximum (running estimates in eval mode), and
    values beyond it are clipped. Signed tensors use ``[-(2^(b-1)-1), 2^(b-1)-1]`` (restricted,
    so the grid is symmetric like the PTQ weights in :mod:`slimkit.quant.core`); non-negative
    ones (``signed=False``, by default when ``x.min() >= 0``) use ``[0, 2^b-1]``, the full range
    for ReLU outputs. Round-to-nearest by default; ``stochastic`` rounds up with probability
    equal to the fractional part (``floor(y + u)``, ``u ~ U[0, 1)``), which is unbiased:
    ``E[q(x)] = x`` inside the range (Gupta et al. 2015, used by the paper for gradients).
    """
    with torch.no_grad():
        if signed is None:
            signed = bool(x.min() < 0)
        qmax = _qmax(bits, signed)
        if max_abs is None:
            if dim is None:
                max_abs = x.abs().amax()
            else:
                dims = [d for d in range(x.dim()) if d != dim]
                max_abs = x.abs().amax(dim=dims, keepdim=True)
        # an all-zero tensor (or channel) would give scale 0; any positive scale maps it to 0
        scale = torch.where(max_abs > 0, max_abs / qmax, torch.ones_like(max_abs))
        y = x / scale
        y = torch.floor(y + torch.rand_like(y)) if stochastic else torch.round(y)
        return y.clamp_(-qmax if signed else 0, qmax) * scale


class _STE(torch.autograd.Function):
    """Round-to-nearest in forward, identity in backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, bits, dim, max_abs, signed):
        return quantize_symmetric(x, bits, dim=dim, max_abs=max_abs, signed=signed)

    @staticmethod
    def backward(ctx, g):
        # STE: the rounding has zero derivative almost everywhere; pass the gradient through
        # unchanged so the float "shadow" weights keep learning (Bengio et al. 2013)
        return g, None, None, None, None


def quantize_ste(x: torch.Tensor, bits: int, dim: int | None = None, max_abs: torch.Tensor | None = None,
                 signed: bool | None = None) -> torch.Tensor:
    """:func:`quantize_symmetric` (round-to-nearest) with a straight-through gradient (Banner et al. 2018)."""
    return _STE.apply(x, bits, dim, max_abs, signed)


class _GradQuant(torch.autograd.Function):
    """Identity in forward; quantizes the incoming gradient with stochastic rounding in backward."""

    @staticmethod
    def forward(ctx, x, bits):
        ctx.bits = bits
        return x.clone()  # a fresh tensor, so a following in-place ReLU does not modify our output view

    @staticmethod
    def backward(ctx, g):
        return quantize_symmetric(g, ctx.bits, stochastic=True, signed=True), None


def quantize_grad(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Identity whose backward rounds the gradient to ``bits`` bits stochastically (Banner et al. 2018)."""
    return _GradQuant.apply(x, bits)


def _bifurcate(g: torch.Tensor, grad_bits: int, weight_grad_bits: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    # Gradients Bifurcation (Banner et al. 2018, sec. 5): the error propagated to the previous
    # layer tolerates 8 bits with unbiased (stochastic) rounding, while the weight gradient is a
    # sum over the whole batch whose small components 8 bits would wipe out, so it gets a wider copy.
    g_err = quantize_symmetric(g, grad_bits, stochastic=True, signed=True)
    g_w = g if weight_grad_bits is None else quantize_symmetric(g, weight_grad_bits, signed=True)
    return g_err, g_w


class _QConv2dFn(torch.autograd.Function):
    """conv2d on already-quantized input and weight, with the bifurcated gradient in backward."""

    @staticmethod
    def forward(ctx, xq, wq, bias, stride, padding, dilation, groups, grad_bits, weight_grad_bits):
        ctx.save_for_backward(xq, wq)
        ctx.conf = (stride, padding, dilation, groups, grad_bits, weight_grad_bits, bias is not None)
        return F.conv2d(xq, wq, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        xq, wq = ctx.saved_tensors
        stride, padding, dilation, groups, grad_bits, weight_grad_bits, has_bias = ctx.conf
        g_err, g_w = _bifurcate(g, grad_bits, weight_grad_bits)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(xq.shape, wq, g_err, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            gw = torch.nn.grad.conv2d_weight(xq, wq.shape, g_w, stride, padding, dilation, groups)
        if has_bias and ctx.needs_input_grad[2]:
            gb = g_w.sum(dim=(0, 2, 3))
        return gx, gw, gb, None, None, None, None, None, None


class _QLinearFn(torch.autograd.Function):
    """linear on already-quantized input and weight, with the bifurcated gradient in backward."""

    @staticmethod
    def forward(ctx, xq, wq, bias, grad_bits, weight_grad_bits):
        ctx.save_for_backward(xq, wq)
        ctx.conf = (grad_bits, weight_grad_bits, bias is not None)
        return F.linear(xq, wq, bias)

    @staticmethod
    def backward(ctx, g):
        xq, wq = ctx.saved_tensors
        grad_bits, weight_grad_bits, has_bias = ctx.conf
        g_err, g_w = _bifurcate(g, grad_bits, weight_grad_bits)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g_err @ wq
        if ctx.needs_input_grad[1]:
            gw = g_w.reshape(-1, g_w.shape[-1]).t() @ xq.reshape(-1, xq.shape[-1])
        if has_bias and ctx.needs_input_grad[2]:
            gb = g_w.reshape(-1, g_w.shape[-1]).sum(0)
        return gx, gw, gb, None, None


def _check_bits(name: str, value: int | None, low: int = 2, high: int = 16, allow_none: bool = False) -> None:
    # 1 bit leaves no symmetric grid ([-0, 0]); past 16 bits this is no longer low-precision
    # training, and past 24 float32 could not hold the integer grid exactly
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        extra = " or None" if allow_none else ""
        raise SlimkitError(f"{name} must be an integer in [{low}, {high}]{extra}, got {value!r}")


def _check_layer_bits(bits: int, grad_bits: int, weight_grad_bits: int | None) -> None:
    _check_bits("bits", bits)
    _check_bits("grad_bits", grad_bits)
    _check_bits("weight_grad_bits", weight_grad_bits, high=24, allow_none=True)  # float32 holds 24-bit integers
