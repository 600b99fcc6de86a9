"""Tracing a model for the channel graph: torch.fx with the layers the graph treats as units kept as leaves.

The option-A shortcut, channel shuffle and channel-wise convolution are leaves (the graph has a
rule for each as a whole); a submodule torch.fx cannot trace becomes an opaque leaf, whose
channels the graph then blocks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx
from torch import nn

from ..errors import SlimkitError

__all__ = ["SAME_AS_BASE", "hooked_forward", "pad_types", "same_as_base", "trace"]


def hooked_forward(model: nn.Module, example_input: torch.Tensor, handles: Iterable) -> None:
    """One eval-mode, no-grad forward pass for the hooks in ``handles``, then remove them and restore the mode."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was)


def pad_types() -> tuple[type, ...]:
    from ..models.cifar_resnet import PadShortcut
    from .surgery import PrunedPadShortcut

    return (PadShortcut, PrunedPadShortcut)


# subclasses of torch.nn layers from other libraries whose forward is the base layer's op followed by
# per-channel work (an activation, dropout, "same" padding): the graph treats them as that layer, and
# surgery keeps their type. Others (weight-standardised convs, mixed-kernel convs) are traced into.
SAME_AS_BASE = frozenset({"timm.layers.norm_act.BatchNormAct2d", "timm.layers.linear.Linear",
                          "timm.layers.conv2d_same.Conv2dSame"})


def same_as_base(m: nn.Module) -> bool:
    """Whether ``m`` is one of the :data:`SAME_AS_BASE` subclasses (traced as a leaf, pruned as its base)."""
    t = type(m)
    return f"{t.__module__}.{t.__qualname__}" in SAME_AS_BASE


def _leaf_types() -> tuple[type, ...]:
    from ..models.layers import ChannelShuffle, ChannelwiseConv

    return (*pad_types(), ChannelShuffle, ChannelwiseConv)


class _Tracer(fx.Tracer):
    def __init__(self, extra_leaves: set[int]) -> None:
        super().__init__()
        self.extra_leaves = extra_leaves
        self.leaf_types = _leaf_types()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (id(m) in self.extra_leaves or isinstance(m, self.leaf_types) or same_as_base(m)
                or super().is_leaf_module(m, qualname))


def trace(model: nn.Module) -> tuple[fx.GraphModule, set[int]]:
    """Trace ``model``; a submodule fx cannot trace becomes an opaque leaf (its channels blocked)."""
    leaves: set[int] = set()
    try:
        return fx.GraphModule(model, _Tracer(leaves).trace(model)), leaves
    except Exception as first:  # fx raises many types (TraceError, TypeError...) on dynamic code
        err = first
    failing: list[tuple[str, nn.Module]] = []
    for name, sub in model.named_modules():
        if not name or type(sub).__module__.startswith("torch.nn") or isinstance(sub, _leaf_types()):
            continue
        try:
            _Tracer(set()).trace(sub)
        except Exception:
            failing.append((name, sub))
    # the deepest untraceable modules first (an attention block, not the whole stage holding it), so the
    # graph blocks as little as it can; their parents only if tracing still fails
    deepest = {id(m) for n, m in failing if not any(o.startswith(n + ".") for o, _ in failing)}
    for candidate in (deepest, {id(m) for _, m in failing}):
        leaves = set(candidate)
        try:
            return fx.GraphModule(model, _Tracer(leaves).trace(model)), leaves
        except Exception as e:  # noqa: BLE001 - fx raises many types on dynamic code
            last = e
    raise SlimkitError(f"cannot trace {type(model).__name__} with torch.fx for pruning ({type(err).__name__}: "
                       f"{str(err).splitlines()[0] if str(err) else ''}); no single untraceable submodule "
                       f"explains it: {last}") from last
