"""Channel-graph rules for operations that move channels between dimensions or pieces.

A channel shuffle (a view splitting the channels, a transpose, a view merging them), a
``chunk``/``split`` into pieces, a channel slice fixed in code and a channels-last block
(ConvNeXt's permute -> LayerNorm -> MLP -> permute). :class:`LayoutRules` is mixed into
:class:`slimkit.prune.slots.SlotBuilder`, which provides ``opaque``, ``tie``, ``block``,
``record`` and the union-find these rules use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch.fx as fx
from torch import nn

__all__ = ["Last", "LayoutRules", "Split"]


@dataclass
class Split:
    """Slots of a tensor whose channel dimension a view has split into ``slots.ndim`` dims (1..k).

    Only the moves of a channel shuffle are followed on it (a transpose or permute among those
    dims, then a view merging them back); anything else using it blocks its channels.
    """

    slots: np.ndarray


@dataclass
class Last:
    """Slots of a channels-last tensor ``(N, H, W, C)``: a ConvNeXt block between its two permutes.

    Linear layers, activations and dropout are followed on it; a layer norm over the channels
    ties every channel to the statistics of the others (removing one changes the rest), so the
    channels it normalises are blocked and only the MLP's hidden width is pruned there.
    """

    slots: np.ndarray


class LayoutRules:
    """The layout rules of the slot builder (see the module docstring).

    ``PASS_MODULES``/``PASS_FUNCS``/``PASS_METHODS``: the channel-preserving operations, set by
    the builder (element-wise work is followed on a channels-last tensor too).
    """

    PASS_MODULES: tuple = ()
    PASS_FUNCS: set = set()
    PASS_METHODS: set = set()

    def channel_slice(self, node, env, x, sl: slice, in_shape):
        """``x[:, a:b]`` with ``a`` and ``b`` fixed in code (GhostNet keeps the first ``oup`` channels).

        The pruned model slices the same positions of a narrower tensor, so every channel before
        ``b`` must stay (they are blocked); channels after ``b`` are dropped by the slice and may go.
        """
        c = int(in_shape[1])
        if any(isinstance(v, fx.Node) for v in (sl.start, sl.stop, sl.step)) or sl.step not in (None, 1):
            return self.opaque(node, env, "a channel slice with a computed bound or a step")
        start, stop, _ = sl.indices(c)
        if stop >= c:
            if start == 0:
                return x
            self.blocked.append(x[:start])
            return x[start:]
        self.blocked.append(x[:stop])
        return x[start:stop]

    def split_view(self, node, env, x, dims, name):
        """A view splitting the channels into ``dims`` (a shuffle's ``(groups, C/groups)``).

        The sizes written as constants in the code stay fixed after pruning, so the slots are
        tied along those axes (every group keeps the same positions); exactly one size must be
        computed (``-1`` or from ``x.size()``) to absorb the smaller width.
        """
        sizes = self._size_args(node)
        if node.op != "call_method" and name != "reshape" or len(sizes) < 1 + len(dims):
            return self.opaque(node, env, f"{name} splitting channels with sizes the graph cannot read")
        fixed = [isinstance(v, int) and v != -1 for v in sizes[1:1 + len(dims)]]
        if sum(not f for f in fixed) != 1:
            return self.opaque(node, env, f"{name} splits the channels into sizes fixed in code {tuple(dims)}")
        slots = x.reshape(tuple(int(d) for d in dims))
        for axis, f in enumerate(fixed):
            if f:
                self.tie(slots, axis)
        return Split(slots)

    def merge(self, node, env, x: Split, in_shape, out_shape, name):
        """The view closing a shuffle: the split channel dims merged back into one, in memory order."""
        k = x.slots.ndim
        if out_shape[1] != x.slots.size or tuple(out_shape[2:]) != tuple(in_shape[1 + k:]):
            return self.opaque(node, env, f"{name} of a split channel dimension into another shape")
        sizes = self._size_args(node)
        if name != "flatten" and len(sizes) > 1 and isinstance(sizes[1], int) and sizes[1] != -1:
            return self.opaque(node, env, f"{name} merges the channels back into a count fixed in code")
        return x.slots.reshape(-1)

    def transpose(self, node, env, x, in_shape, name):
        """A transpose or permute: followed among the split dims of a shuffle or over spatial dims."""
        if in_shape is None or not isinstance(x, (np.ndarray, Split, Last)):
            return self.opaque(node, env, f"{name} of untracked channels")
        n = len(in_shape)
        if name == "permute":
            perm = self._size_args(node)
        else:
            a, b = (list(node.args[1:3]) + [node.kwargs.get("dim0"), node.kwargs.get("dim1")])[:2]
            perm = list(range(n))
            if isinstance(a, int) and isinstance(b, int):
                perm[a % n], perm[b % n] = perm[b % n], perm[a % n]
        if len(perm) != n or not all(isinstance(p, int) for p in perm):
            return self.opaque(node, env, f"{name} with dims the graph cannot read")
        perm = [p % n for p in perm]
        if isinstance(x, Last):  # back to channels-first: (N, ..., C) -> (N, C, ...)
            if perm == [0, n - 1, *range(1, n - 1)]:
                return x.slots
            return self.opaque(node, env, f"{name} of a channels-last tensor into another layout")
        if isinstance(x, np.ndarray) and n > 2 and perm == [0, *range(2, n), 1]:
            return Last(x)  # channels-first -> channels-last (ConvNeXt)
        k = x.slots.ndim if isinstance(x, Split) else 1
        inner = perm[1:1 + k]
        if perm[0] != 0 or sorted(inner) != list(range(1, 1 + k)) or perm[1 + k:] != list(range(1 + k, n)):
            if isinstance(x, np.ndarray) and perm[1] == 1:
                return x  # only spatial dims move
            return self.opaque(node, env, f"{name} moves the channel dimension (channels-last layout)")
        if isinstance(x, np.ndarray):
            return x
        return Split(x.slots.transpose([p - 1 for p in inner]))

    def channels_last(self, node, env, x: Last, in_shape, out_shape, name):
        """An operation on a channels-last tensor: the permute back, element-wise work, a layer norm."""
        if name in ("permute", "transpose", "swapaxes", "swapdims"):
            return self.transpose(node, env, x, in_shape, name)
        if name == "layer_norm" and in_shape is not None and out_shape == in_shape:
            self.block(x)  # normalised over the channels: removing one changes every other
            return x
        passes = (node.op == "call_function" and (node.target in self.PASS_FUNCS or name == "stochastic_depth")) or (
            node.op == "call_method" and node.target in self.PASS_METHODS)
        if passes and out_shape == in_shape:
            return x
        return self.opaque(node, env, f"{name} on a channels-last tensor")

    def pieces(self, node, env, x, in_shape, name):
        """``chunk``/``split``/``tensor_split`` along channels (ShuffleNet v2, GhostNet, CSP blocks).

        Each piece is an offset range of the slots. The pruned model splits its narrower tensor
        the same way only if the pieces stay equal, so the pieces are tied position by position
        and their count must be what the code fixes (``chunk(2)``, or a size computed from
        ``x.size()``); sizes written as constants cannot shrink, so they block.
        """
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        arg = node.args[1] if len(node.args) > 1 else node.kwargs.get(
            "chunks", node.kwargs.get("split_size_or_sections", node.kwargs.get("indices_or_sections")))
        meta = node.meta.get("tensor_meta")
        if not isinstance(x, np.ndarray) or in_shape is None or not isinstance(meta, (tuple, list)):
            return self.opaque(node, env, f"{name} of untracked channels")
        if not isinstance(dim, int) or dim % len(in_shape) != 1:
            return self.opaque(node, env, f"{name} along a dimension the graph does not follow") \
                if isinstance(dim, fx.Node) else self._split_other(node, env, x, meta, name)
        sizes = [int(m.shape[1]) for m in meta]
        if (name == "split" and not isinstance(arg, fx.Node)) or (name == "tensor_split" and not isinstance(arg, int)) \
                or len(set(sizes)) != 1:
            return self.opaque(node, env, f"{name} into channel sizes fixed in code {tuple(sizes)}")
        slots = x.reshape(len(sizes), sizes[0])
        self.tie(slots, 0)
        return list(slots)

    def _split_other(self, node, env, x, meta, name):
        """A split along a spatial dimension: every piece has all the channels."""
        return [x if hasattr(m, "shape") and len(m.shape) > 1 and int(m.shape[1]) == len(x) else None for m in meta]

    def module_channels_last(self, node, env, m, name, x: Last, in_shape, out_shape):
        """A module on a channels-last tensor: linear layers (the MLP of a ConvNeXt block), norms, activations."""
        if isinstance(m, nn.Linear) and in_shape is not None and in_shape[-1] == len(x.slots):
            rec = self.record(name, m, "linear", x.slots, self.uf.new(m.out_features), math.prod(in_shape[:-1]))
            return Last(rec.out_slots)
        if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (len(x.slots),):
            self.block(x)  # normalised over the channels: removing one changes every other
            return x
        pools = (nn.MaxPool2d, nn.AvgPool2d)  # would pool over the wrong dims of a channels-last tensor
        if isinstance(m, self.PASS_MODULES) and out_shape == in_shape and not isinstance(m, pools):
            return x
        return self.opaque(node, env, f"module {type(m).__name__} on a channels-last tensor")
