"""8-bit training (Banner et al., "Scalable Methods for 8-bit Training of Neural Networks", NeurIPS 2018).

**Simulated quantization**: every tensor the paper keeps in 8 bits is rounded to an 8-bit grid
and stored back in float32, and every GEMM/convolution runs in float32 on those values (like an
int8 x int8 product with a wide accumulator). The model trains at float speed or slower; what
this module reproduces is the *numerics* of 8-bit training, not its speed or memory.

What is quantized, per conv/linear layer (:class:`QuantConv2d`, :class:`QuantLinear`):

* forward: weights (per-output-channel symmetric, signed ``[-(2^(b-1)-1), 2^(b-1)-1]``) and input
  activations (per-tensor symmetric, zero point 0: unsigned ``[0, 2^b-1]`` when the tensor is
  non-negative, e.g. after a ReLU, signed otherwise), round-to-nearest, gradient passed
  straight through (STE, Bengio et al. 2013);
* backward, "Gradients Bifurcation" (Banner et al. 2018, section 5): the gradient w.r.t. the
  layer output is quantized twice. An 8-bit copy with **stochastic rounding** (per-tensor
  symmetric) feeds the error-propagation GEMM (the gradient w.r.t. the layer input), a
  ``weight_grad_bits`` copy (16 bits, round-to-nearest, by default; ``None`` keeps float32)
  feeds the weight-gradient GEMM and the bias gradient.

Batch norm becomes :class:`RangeBatchNorm2d` (section 4): it normalises by a range-based
estimate of the standard deviation instead of the square root of a sum of squares, on an 8-bit
quantized input, and its output gradient is quantized like a layer gradient.

:func:`to_8bit_training` converts a float model, :func:`from_8bit_training` converts it back to
plain float modules (so PTQ, :func:`slimkit.quant.quantize` and artifacts work on the result),
and the recipe stage ``train8`` does convert -> :func:`slimkit.train.fit` -> convert back.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlimkitError
from ..pipeline import Context, register_stage
from ..train import FitResult, fit
from .config import Train8Config
from .lowbit import _check_layer_bits, _QConv2dFn, _QLinearFn, quantize_grad, quantize_ste, quantize_symmetric

__all__ = ["QuantConv2d", "QuantLinear", "RangeBatchNorm2d", "expected_gaussian_range", "from_8bit_training",
           "quantize_grad", "quantize_ste", "quantize_symmetric", "range_constant", "to_8bit_training",
           "train8_stage", "train_8bit"]


# ---------------------------------------------------------------------------------------------
# Modules

class ActRange(nn.Module):
    """Per-tensor activation range for quantization: the batch's in training, a running one in eval.

    Training quantizes with the current batch's ``max|x|`` (the paper's dynamic scaling), and
    keeps an exponential moving average (``momentum``) of it plus the running minimum, so eval
    mode quantizes with fixed parameters and a prediction does not depend on the other samples
    in its batch.
    """

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("max_abs", torch.zeros(()))
        self.register_buffer("min", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        if self.training or not bool(self.seen):
            with torch.no_grad():
                max_abs, lo = x.abs().amax(), x.amin()
            if self.training:
                with torch.no_grad():
                    m = 1.0 if not bool(self.seen) else self.momentum
                    self.max_abs.lerp_(max_abs.to(self.max_abs.dtype), m)
                    self.min.lerp_(lo.to(self.min.dtype), m)
                    self.seen.fill_(True)
            return quantize_ste(x, bits, max_abs=max_abs, signed=bool(lo < 0))
        return quantize_ste(x, bits, max_abs=self.max_abs, signed=bool(self.min < 0))


def _quant_setup(layer: nn.Module, bits: int, grad_bits: int, weight_grad_bits: int | None) -> None:
    """The bit widths and input-range tracker :class:`QuantConv2d` and :class:`QuantLinear` share."""
    _check_layer_bits(bits, grad_bits, weight_grad_bits)
    layer.bits, layer.grad_bits, layer.weight_grad_bits = bits, grad_bits, weight_grad_bits
    layer.act = ActRange()


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` trained in simulated 8 bits (Banner et al. 2018).

    Forward: input per-tensor and weight per-output-channel symmetric round-to-nearest to
    ``bits`` bits (straight-through gradient). Backward: the output gradient is stochastically
    rounded to ``grad_bits`` bits for the input gradient and kept at ``weight_grad_bits`` (None:
    float32) for the weight and bias gradients. Parameters are the ordinary ``weight``/``bias``
    in float32, so the state dict is that of ``nn.Conv2d`` plus the activation-range buffers.
    """

    def __init__(self, *args, bits: int = 8, grad_bits: int = 8, weight_grad_bits: int | None = 16, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _quant_setup(self, bits, grad_bits, weight_grad_bits)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **q) -> QuantConv2d:
        """A quantized conv with the same geometry sharing ``conv``'s weight and bias parameters."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                  dtype=conv.weight.dtype, **q)
        new.weight, new.bias = conv.weight, conv.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            # explicit padding first, so the custom backward only ever sees numeric zero padding
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        xq = self.act(x, self.bits)
        wq = quantize_ste(self.weight, self.bits, dim=0, signed=True)
        return _QConv2dFn.apply(xq, wq, self.bias, self.stride, padding, self.dilation, self.groups,
                                self.grad_bits, self.weight_grad_bits)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}, grad_bits={self.grad_bits}, " \
                                      f"weight_grad_bits={self.weight_grad_bits}"


class QuantLinear(nn.Linear):
    """``nn.Linear`` trained in simulated 8 bits (Banner et al. 2018); quantization as :class:`QuantConv2d`."""

    def __init__(self, *args, bits: int = 8, grad_bits: int = 8, weight_grad_bits: int | None = 16, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _quant_setup(self, bits, grad_bits, weight_grad_bits)

    @classmethod
    def from_float(cls, linear: nn.Linear, **q) -> QuantLinear:
        """A quantized linear layer sharing ``linear``'s weight and bias parameters."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                  dtype=linear.weight.dtype, **q)
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.act(x, self.bits)
        wq = quantize_ste(self.weight, self.bits, dim=0, signed=True)
        return _QLinearFn.apply(xq, wq, self.bias, self.grad_bits, self.weight_grad_bits)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}, grad_bits={self.grad_bits}, " \
                                      f"weight_grad_bits={self.weight_grad_bits}"


@functools.lru_cache(maxsize=256)
def expected_gaussian_range(n: int) -> float:
    """E[max - min] of ``n`` i.i.d. N(0, 1) samples (the constant d2(n) of quality control).

    ``E[R] = integral of 1 - Phi(x)^n - (1 - Phi(x))^n dx``, by the trapezoid rule in float64 on
    [-12, 12] (the integrand is below 1e-30 outside for any n a batch can have). Its large-n
    asymptote is ``2 sqrt(2 ln n)``, the expected-maximum argument of Banner et al. 2018.
    """
    if n < 2:
        raise SlimkitError(f"range batch norm needs at least 2 values per channel, got {n}")
    x = torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64)
    f = 1 - torch.exp(n * torch.special.log_ndtr(x)) - torch.exp(n * torch.special.log_ndtr(-x))
    return float(torch.trapezoid(f, x))


def range_constant(n: int, exact: bool = True) -> float:
    """C(n), the factor that turns a batch range of ``n`` values into a standard deviation estimate.

    Banner et al. 2018 (Range BN, eq. 3) use ``C(n) = 1 / sqrt(2 ln n)``, from the asymptotic
    expected maximum ``sigma sqrt(2 ln n)`` of n Gaussians. Applied to the full range
    ``max - min`` that estimates about ``1.8 sigma`` for n = 10^4 (the range spans two maxima and
    the asymptote is loose at finite n): a constant factor that the BN gain absorbs when training
    from scratch, but not when converting from or to a standard BN. ``exact`` (default) therefore
    uses ``1 / E[range of n N(0, 1)]``, which makes ``C(n) (max - min)`` an unbiased estimate of
    sigma for Gaussian data; ``exact=False`` gives the paper's formula literally.
    """
    if n < 2:
        raise SlimkitError(f"range batch norm needs at least 2 values per channel, got {n}")
    return 1.0 / expected_gaussian_range(n) if exact else 1.0 / math.sqrt(2.0 * math.log(n))


class RangeBatchNorm2d(nn.BatchNorm2d):
    """Range Batch-Norm (Banner et al. 2018, sec. 4) on an 8-bit input, a drop-in for ``nn.BatchNorm2d``.

    Training normalises each channel by ``sigma_hat = C(n) (max - min)`` over the ``n = N*H*W``
    values of the batch instead of the standard deviation (a max and a min need no squares or
    square roots, and tolerate low precision), with ``C(n)`` from :func:`range_constant`
    (``exact_constant``). The input is quantized to ``bits`` bits (per tensor, round-to-nearest,
    STE) and the output gradient to ``grad_bits`` bits with stochastic rounding. The running
    estimates are the ordinary ``running_mean`` and ``running_var`` buffers, with ``running_var``
    an average of ``sigma_hat^2``, so eval mode is exactly ``nn.BatchNorm2d``'s on the quantized
    input and converting back (:func:`from_8bit_training`) is a plain copy. gamma/beta are float.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, bits: int = 8, grad_bits: int = 8,
                 exact_constant: bool = True, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)
        _check_layer_bits(bits, grad_bits, None)
        self.bits, self.grad_bits, self.exact_constant = bits, grad_bits, exact_constant
        self.act = ActRange()

    @classmethod
    def from_float(cls, bn: nn.BatchNorm2d, **q) -> RangeBatchNorm2d:
        """A Range BN with ``bn``'s options, parameters (shared) and running estimates (copied)."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  device=bn.running_mean.device if bn.running_mean is not None else None, **q)
        if bn.affine:
            new.weight, new.bias = bn.weight, bn.bias
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean)
            new.running_var.copy_(bn.running_var)
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        xq = self.act(x, self.bits)
        use_batch = self.training or not self.track_running_stats
        if not use_batch:
            return F.batch_norm(xq, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        n = x.numel() // x.shape[1]
        mean = xq.mean(dim=(0, 2, 3))
        # max - min is shift invariant, so the range of x - mean is that of x (no extra pass)
        sigma = range_constant(n, self.exact_constant) * (xq.amax(dim=(0, 2, 3)) - xq.amin(dim=(0, 2, 3)))
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(sigma.detach() ** 2, m)
        y = (xq - mean[None, :, None, None]) / torch.sqrt(sigma ** 2 + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return quantize_grad(y, self.grad_bits) if self.training else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}, grad_bits={self.grad_bits}, " \
                                      f"exact_constant={self.exact_constant}"


# ---------------------------------------------------------------------------------------------
# Conversion

def _swap(model: nn.Module, convert: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replace every module for which ``convert`` returns a new one (shared modules stay shared)."""
    done: dict[int, nn.Module] = {}

    def visit(parent: nn.Module) -> None:
        # _modules, not named_children(): the latter yields a module shared by two names only once
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in done:
                new = convert(child)
                done[id(child)] = child if new is None else new
                if new is None:
                    visit(child)
            if done[id(child)] is not child:
                setattr(parent, name, done[id(child)])  # Sequential/ModuleDict children are attributes too

    root = convert(model)
    if root is not None:
        return root
    visit(model)
    return model


def to_8bit_training(model: nn.Module, bits: int = 8, grad_bits: int = 8, range_bn: bool = True, *,
                     weight_grad_bits: int | None = 16, exact_constant: bool = True) -> nn.Module:
    """A copy of ``model`` set up for simulated 8-bit training (Banner et al., NeurIPS 2018).

    Every ``nn.Conv2d`` becomes a :class:`QuantConv2d` and every ``nn.Linear`` a
    :class:`QuantLinear` (``bits``-bit weights and activations in forward, ``grad_bits``-bit
    stochastically rounded layer gradients and ``weight_grad_bits``-bit weight-gradient inputs in
    backward), and with ``range_bn`` every ``nn.BatchNorm2d`` a :class:`RangeBatchNorm2d`; the
    parameters and running statistics are those of the copy, so ``model`` itself is untouched.
    Only these exact types are replaced (subclasses and other layers stay float). Train the
    result with :func:`slimkit.train.fit` and turn it back with :func:`from_8bit_training`.
    """
    _check_layer_bits(bits, grad_bits, weight_grad_bits)  # before the copy, so a typo fails fast
    if any(type(m).__module__.startswith("torch.ao.nn") for m in model.modules()):
        raise SlimkitError("to_8bit_training needs a float model, not an int8-converted one")
    q = {"bits": bits, "grad_bits": grad_bits}

    def convert(m: nn.Module) -> nn.Module | None:
        if type(m) is nn.Conv2d:
            return QuantConv2d.from_float(m, weight_grad_bits=weight_grad_bits, **q)
        if type(m) is nn.Linear:
            return QuantLinear.from_float(m, weight_grad_bits=weight_grad_bits, **q)
        if range_bn and type(m) is nn.BatchNorm2d:
            return RangeBatchNorm2d.from_float(m, exact_constant=exact_constant, **q)
        return None

    out = _swap(copy.deepcopy(model), convert)
    out.train(model.training)
    return out


def from_8bit_training(model: nn.Module) -> nn.Module:
    """A copy of an 8-bit-training model with plain float ``nn.Conv2d``/``nn.Linear``/``nn.BatchNorm2d``.

    Inverse of :func:`to_8bit_training` (Banner et al., NeurIPS 2018): the float32 master weights
    are kept as they are (not rounded; quantize them with :func:`slimkit.quant.quantize` for int8
    inference) and a :class:`RangeBatchNorm2d` becomes an ``nn.BatchNorm2d`` with the same
    gamma/beta and running estimates, i.e. ``running_var`` is the running range-based
    ``sigma_hat^2``. The activation-range buffers are dropped. The result is an ordinary model
    for PTQ, export and artifacts; its eval output differs from the 8-bit model's only by the
    8-bit rounding of weights and activations.
    """

    def convert(m: nn.Module) -> nn.Module | None:
        if isinstance(m, QuantConv2d):
            new = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            m.groups, m.bias is not None, m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)
        elif isinstance(m, QuantLinear):
            new = nn.Linear(m.in_features, m.out_features, m.bias is not None, device=m.weight.device,
                            dtype=m.weight.dtype)
        elif isinstance(m, RangeBatchNorm2d):
            new = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                 device=m.running_mean.device if m.running_mean is not None else None)
            if m.track_running_stats:
                new.running_mean, new.running_var = m.running_mean, m.running_var
                new.num_batches_tracked = m.num_batches_tracked
        else:
            return None
        if getattr(m, "weight", None) is not None:
            new.weight = m.weight
        if getattr(m, "bias", None) is not None:
            new.bias = m.bias
        return new

    out = _swap(copy.deepcopy(model), convert)
    out.train(model.training)
    return out


def train_8bit(model: nn.Module, loader: Iterable, epochs: int, *, bits: int = 8, grad_bits: int = 8,
               weight_grad_bits: int | None = 16, range_bn: bool = True, exact_constant: bool = True,
               **fit_options) -> tuple[nn.Module, FitResult]:
    """Train a copy of ``model`` for ``epochs`` epochs in simulated 8 bits (Banner et al., NeurIPS 2018).

    :func:`to_8bit_training`, then :func:`slimkit.train.fit` on ``loader`` (``fit_options`` are
    its keyword options: ``lr``, ``optimizer``, ``seed``, ``checkpoint_dir``, ...), then
    :func:`from_8bit_training`. Returns the plain float model and the training log; ``model``
    itself is not modified.
    """
    q = to_8bit_training(model, bits, grad_bits, range_bn, weight_grad_bits=weight_grad_bits,
                         exact_constant=exact_constant)
    result = fit(q, loader, epochs=int(epochs), **fit_options)
    return from_8bit_training(q), result


@register_stage("train8", config=Train8Config, paper="Banner et al., NeurIPS 2018, Scalable Methods for 8-bit Training",
                example={"epochs": 1, "lr": 0.01})
def train8_stage(model: nn.Module, ctx: Context, config: Train8Config) -> nn.Module:
    """Train ``epochs`` epochs in simulated 8 bits (Banner et al., NeurIPS 2018) and return the float model.

    :func:`train_8bit` on the context's train split (the fit options as the ``finetune`` stage:
    ``lr`` (default 0.01), ``optimizer``, ``schedule``, ...; checkpointed and resumable in this
    stage's folder), so the next stage (e.g. ``quantize``) and the artifact see a plain float
    model.
    """
    loader = ctx.data.loader("train", config.batch_size or ctx.batch_size, seed=ctx.seed)
    fit_options = config.fit_kwargs()
    epochs = fit_options.pop("epochs")
    # its own checkpoint folder: a `finetune:` recovery after this stage uses "finetune" and a
    # different (float) state dict, so the two must not find each other's checkpoints
    out, result = train_8bit(model, loader, epochs, bits=config.bits, grad_bits=config.grad_bits,
                             weight_grad_bits=config.weight_grad_bits, range_bn=config.range_bn,
                             exact_constant=config.exact_constant, seed=ctx.seed, device=ctx.device,
                             progress=ctx.progress, checkpoint_dir=ctx.stage_dir("train8"), **fit_options)
    ctx.details["train8"] = {"bits": config.bits, "grad_bits": config.grad_bits,
                             "weight_grad_bits": config.weight_grad_bits, "range_bn": config.range_bn,
                             "exact_constant": config.exact_constant, "last_epoch": result.last}
    return out
