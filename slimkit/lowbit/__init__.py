"""Weights (and activations) below eight bits, trained: LSQ, DoReFa, PACT, ternary (TTQ) and binary weights.

::

    from slimkit.lowbit import lowbit, LowBitConfig
    r = lowbit(model, LowBitConfig(lowbit="lsq", weight_bits=4, act_bits=4), loader=train, finetune=tune, epochs=2)
    slimkit.sparse.pack(r.model, "m.slimpack")   # weights stored at their bit width (codebook codes)

The quantizers are in :mod:`slimkit.lowbit.quantizers`. Every conv and linear weight gets the
method's quantizer as a parametrization while ``finetune(model, epochs, tag)`` trains it; the first
conv and the classifier are kept at ``edge_bits`` (8 by default, uniform per tensor: they see the
input and make the decision, and hold few weights), and the output says so. With ``act_bits``,
every layer's input is quantized by an :class:`~slimkit.lowbit.quantizers.ActQuant` placed before
it (the first conv's and the classifier's at ``edge_bits``). After training the weights are baked:
each layer holds at most ``2**bits`` distinct values (ternary: ``{-Wn, 0, +Wp}``; binary:
``{-alpha_c, +alpha_c}`` per output channel), which the packed file stores at their bit width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import MethodConfig, option
from ..errors import SlimkitError
from ..pipeline import register_stage
from ..registry import Registry
from .quantizers import ActQuant, BinaryWeight, DoReFaWeight, LSQWeight, TernaryWeight, UniformWeight

__all__ = ["METHODS", "LowBitConfig", "LowBitMethod", "LowBitResult", "lowbit", "lowbit_stage"]

@dataclass(frozen=True)
class LowBitMethod:
    """A registered low-bit method and its facts."""

    name: str
    weights: str  # the weight quantizer: lsq, dorefa, ttq, binary
    activations: str  # the activation quantizer with act_bits: lsq, dorefa, pact
    default_bits: int
    paper: str


METHODS: Registry[LowBitMethod] = Registry("low-bit method")
for _m in (
    LowBitMethod("lsq", "lsq", "lsq", 4, "Esser et al., Learned Step Size Quantization, ICLR 2020"),
    LowBitMethod("dorefa", "dorefa", "dorefa", 4, "Zhou et al., DoReFa-Net, 2016"),
    LowBitMethod("pact", "dorefa", "pact", 4, "Choi et al., PACT: Parameterized Clipping Activation, 2018 "
                                              "(DoReFa weights)"),
    LowBitMethod("ttq", "ttq", "lsq", 2, "Zhu, Han, Mao & Dally, Trained Ternary Quantization, ICLR 2017"),
    LowBitMethod("binary", "binary", "lsq", 1, "Courbariaux et al., BinaryConnect, NeurIPS 2015; Rastegari et al., "
                                               "XNOR-Net, ECCV 2016 (per-channel scale)"),
):
    METHODS.register(_m.name)(_m)


@dataclass(frozen=True)
class LowBitConfig(MethodConfig):
    """Train conv and linear weights (and optionally activations) at a few bits (docs/sparse.md, "Low-bit").

    Example:
        >>> LowBitConfig(lowbit="ttq").bits
        2
    """

    family = "lowbit"

    # named for the family, as TransformConfig.transform: a recipe stage's own `method:` key names the stage
    lowbit: str = option("lsq", "the quantizer", choices=METHODS, flag="--method")
    weight_bits: int | None = option(None, "weight bits (lsq, dorefa, pact: 2-8, default 4; ttq is ternary, binary "
                                           "1 bit)", low=2, high=8)
    act_bits: int | None = option(None, "quantize every layer's input to this many bits (default: float)", low=2,
                                  high=8)
    edge_bits: int = option(8, "bits of the first conv's and the classifier's weights and inputs", low=2, high=8)
    threshold: float = option(0.05, "ttq: weights within this fraction of max|w| become 0", low=0, high=1,
                              low_inclusive=False, high_inclusive=False)

    @property
    def method(self) -> str:
        """The low-bit method (the ``lowbit`` field; ``--method`` on the command line)."""
        return self.lowbit

    def validate(self) -> None:
        if self.weight_bits is not None and self.method in ("ttq", "binary"):
            raise self.error("weight_bits", f"is fixed by method {self.method} (leave it out)")

    @property
    def bits(self) -> int:
        return self.weight_bits if self.weight_bits is not None else METHODS.get(self.method).default_bits


@dataclass
class LowBitResult:
    """A low-bit model (weights baked, activation quantizers in place) and per layer what was done."""

    model: nn.Module
    layers: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {"layers": self.layers}


def _weight_quantizer(kind: str, weight: torch.Tensor, bits: int, config: LowBitConfig) -> nn.Module:
    if kind == "lsq":
        return LSQWeight(weight, bits)
    if kind == "dorefa":
        return DoReFaWeight(weight, bits)
    if kind == "ttq":
        return TernaryWeight(weight, config.threshold)
    return BinaryWeight()


def _input_signs(model: nn.Module, x: torch.Tensor, names: set[str]) -> dict[str, bool]:
    """Whether each named layer's input takes negative values on ``x``."""
    signed: dict[str, bool] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: signed.__setitem__(
        n, signed.get(n, False) or bool((args[0] < 0).any()))) for n, m in model.named_modules() if n in names]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return signed


def lowbit(model: nn.Module, config: LowBitConfig | None = None, *, loader: Iterable | None = None,
           finetune: Callable[[nn.Module, int, str], nn.Module] | None = None, epochs: int = 0,
           **options) -> LowBitResult:
    """Quantize a copy of ``model``'s conv/linear weights (and inputs) to a few bits, trained by ``finetune``.

    Args:
        model: a float model (left untouched).
        config: a :class:`LowBitConfig`, or keyword ``options`` building one.
        loader: training batches: one batch finds which layer inputs are signed (with ``act_bits``).
        finetune: ``finetune(model, epochs, tag)``: quantization-aware training with the quantizers attached.
        epochs: training epochs (0: the quantizers' initial values, no training).

    Returns:
        A :class:`LowBitResult`.

    Raises:
        SlimkitError: ``act_bits`` without data, or a model without conv/linear layers.

    Example (Zhu et al., ICLR 2017):
        >>> import slimkit
        >>> r = lowbit(slimkit.create_model("digits_cnn"), LowBitConfig(lowbit="ttq"))
        >>> [row["values"] <= 3 for row in r.layers if not row["edge"]]
        [True, True]
    """
    from ..sparse.masks import edge_layers, prunable_layers

    config = config if config is not None else LowBitConfig.from_options(options)
    if config.act_bits is not None and loader is None:
        raise SlimkitError("lowbit: --act-bits needs data (one batch finds which layer inputs are signed)")
    from ..sparse import trainable_copy

    model = trainable_copy(model)
    layers = prunable_layers(model)
    if not layers:
        raise SlimkitError("lowbit: the model has no conv or linear layer to quantize")
    edges = edge_layers(layers)
    entry = METHODS.get(config.method)
    wkind, akind = entry.weights, entry.activations
    bits = {n: config.edge_bits if n in edges else config.bits for n, _ in layers}
    if config.act_bits is not None:
        signed = _input_signs(model, next(iter(loader))[0], {n for n, _ in layers})
        for n, m in layers:
            parent_name, _, child = n.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            a_bits = config.edge_bits if n in edges else config.act_bits
            setattr(parent, child, nn.Sequential(ActQuant(a_bits, akind, signed.get(n, False)), m))
    for n, m in layers:  # the layer objects are the same, wherever they now sit
        q = UniformWeight(bits[n]) if n in edges else _weight_quantizer(wkind, m.weight, bits[n], config)
        parametrize.register_parametrization(m, "weight", q)
    if finetune is not None and epochs:
        model = finetune(model, epochs, "lowbit")
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    rows = []
    for (n, _), (_, m) in zip(layers, prunable_layers(model)):
        w = m.weight.detach()
        rows.append({"name": n, "bits": bits[n], "edge": n in edges,
                     "method": "uniform" if n in edges else config.method, "values": int(torch.unique(w).numel())})
    model.eval()
    return LowBitResult(model, rows)


@register_stage("lowbit", config=LowBitConfig, trains=True,
                paper="Esser et al. 2020; Zhou et al. 2016; Choi et al. 2018; Zhu et al. 2017; Courbariaux et al. 2015",
                example={"lowbit": "lsq", "weight_bits": 4})
def lowbit_stage(model: nn.Module, ctx, config: LowBitConfig, recovery=None) -> nn.Module:
    """Low-bit weights (and activations); the stage's ``finetune:`` is the quantization-aware training."""
    from ..sparse import training_stage

    return training_stage(lowbit, model, ctx, config, recovery)
