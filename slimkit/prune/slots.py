"""Per-operation channel rules of the channel graph: how each traced operation maps channel slots.

:func:`slimkit.prune.graph.build_graph` walks a ``torch.fx`` graph and asks :class:`SlotBuilder` what
every node does to the channel *slots* of its inputs (see the module docstring of
:mod:`slimkit.prune.graph` for the formulation). Each rule either follows the channels exactly
(passing, concatenating, permuting or tying slots) or *blocks* everything the node touches and
records a warning naming the layer and the construct.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import SlimkitError
from .layout import Last, LayoutRules, Split
from .trace import pad_types

__all__ = ["LayerRecord", "SlotBuilder", "UnionFind"]

class UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)


@dataclass
class LayerRecord:
    """One module with channel-indexed parameters and the slots of its channel dimensions.

    ``kind`` is ``conv`` (dense conv), ``dwconv`` (depthwise: input channel i is output channel
    i, or output channels i*k .. i*k+k-1 with a channel multiplier k), ``gconv`` (other grouped
    conv: the same positions are kept in every group), ``linear``, ``bn`` or ``pad`` (an
    option-A shortcut: PadShortcut or PrunedPadShortcut).
    ``macs_unit`` is the per-(in, out)-channel MAC factor summed over all calls (``k*k*Hout*Wout``
    for a conv, rows for a linear), which lets the pruner predict MACs from channel counts.
    """

    name: str
    module: nn.Module
    kind: str
    in_slots: np.ndarray | None = None
    out_slots: np.ndarray | None = None
    macs_unit: int = 0
    in_cls: np.ndarray | None = None
    out_cls: np.ndarray | None = None


_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
                 nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout2d,
                 nn.AlphaDropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample,
                 nn.ZeroPad2d)
_PASS_FUNCS = {F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
               torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, F.adaptive_avg_pool2d,
               F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d, F.interpolate, torch.clamp, torch.clip,
               torch.nn.functional.dropout2d}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_max",
                 "contiguous", "clone", "detach", "float", "to", "type_as", "hardtanh", "hardtanh_"}
_BINARY_FUNCS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                 operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCE = {"mean", "sum", "amax", "amin"}
# the operations a channel shuffle is written with: followed on a split channel dimension
_LAYOUT = {"view", "reshape", "flatten", "transpose", "permute", "swapaxes", "swapdims", "contiguous"}


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


class SlotBuilder(LayoutRules):
    PASS_MODULES, PASS_FUNCS, PASS_METHODS = _PASS_MODULES, _PASS_FUNCS, _PASS_METHODS

    def __init__(self, model: nn.Module, gm: fx.GraphModule, leaves: set[int], untie_shortcuts: bool = False) -> None:
        self.model, self.gm, self.leaves, self.untie_shortcuts = model, gm, leaves, untie_shortcuts
        self.uf = UnionFind()
        self.blocked: list[np.ndarray] = []
        self.layers: dict[str, LayerRecord] = {}
        self.warnings: list[str] = []
        self.names = {id(m): n for n, m in model.named_modules()}

    def warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)

    def fresh(self, shape, block: bool = False) -> np.ndarray | None:
        if shape is None or len(shape) < 2:
            return None
        s = self.uf.new(int(shape[1]))
        if block:
            self.blocked.append(s)
        return s

    def block(self, value) -> None:
        if isinstance(value, np.ndarray):
            self.blocked.append(value)
        elif isinstance(value, (Split, Last)):
            self.blocked.append(value.slots.reshape(-1))
        elif isinstance(value, (list, tuple)):
            for v in value:
                self.block(v)

    def opaque(self, node: fx.Node, env: dict, reason: str):
        """Block every channel going in and out of an operation the graph cannot follow exactly."""
        for a in node.all_input_nodes:
            self.block(env.get(a))
        where = node.target if node.op == "call_module" else node.name
        self.warn(f"{where}: {reason}; the channels it touches are left unprunable")
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):  # TensorMetadata is a NamedTuple
            return [self.fresh(tuple(m.shape), True) if hasattr(m, "shape") else None for m in meta]
        return self.fresh(_shape(node), True)

    def tie(self, slots: np.ndarray, axis: int) -> None:
        """Make the slots that differ only in their index along ``axis`` one channel class.

        The pruned model then keeps the same positions in every slice along ``axis`` (every
        group of a grouped conv, every row of a shuffle), so the slices stay equal in size and a
        dimension fixed in code (``groups``) stays valid.
        """
        rows = np.moveaxis(slots, axis, 0).reshape(slots.shape[axis], -1)
        for r in rows[1:]:
            self.uf.union(rows[0], r)

    def record(self, name: str, module: nn.Module, kind: str, in_slots, out_slots, macs_unit: int) -> LayerRecord:
        rec = self.layers.get(name)
        if rec is None:
            rec = self.layers[name] = LayerRecord(name, module, kind, in_slots, out_slots, macs_unit)
            return rec
        # a module called again: the same weights, so its channels are the same channels
        if in_slots is not None:
            self.uf.union(rec.in_slots, in_slots)
        rec.macs_unit += macs_unit
        return rec

    def run(self, example: torch.Tensor) -> None:
        from torch.fx.passes.shape_prop import ShapeProp

        was = [m.training for m in self.gm.modules()]
        self.gm.eval()
        try:
            with torch.no_grad():
                ShapeProp(self.gm).propagate(example)
        except Exception as e:
            raise SlimkitError(f"the traced model does not run on an input of shape {tuple(example.shape)}: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        finally:
            for m, t in zip(self.gm.modules(), was):
                m.training = t
        env: dict[fx.Node, object] = {}
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = self.fresh(_shape(node), block=True)
            elif node.op == "get_attr":
                env[node] = "const"
            elif node.op == "output":
                for a in node.all_input_nodes:
                    self.block(env.get(a))
            else:
                env[node] = self.visit(node, env)

    # -- per-op rules -------------------------------------------------------------------------

    def visit(self, node: fx.Node, env: dict):
        out_shape = _shape(node)
        args = [env.get(a) if isinstance(a, fx.Node) else None for a in node.args]
        x_node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        x = env.get(x_node) if x_node is not None else None
        in_shape = _shape(x_node) if x_node is not None else None
        if node.op == "call_module":
            return self.visit_module(node, env, x, in_shape, out_shape)
        target = node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        if node.op == "call_method" and target in ("size", "dim", "numel"):
            return None
        if target is getattr or (node.op == "call_function" and target is operator.getitem and isinstance(x, list)):
            if target is getattr:
                return None
            return x[node.args[1]] if isinstance(node.args[1], int) else self.opaque(node, env, "indexing a tuple")
        if out_shape is None and node.meta.get("tensor_meta") is None:
            return None  # not a tensor (shapes, python numbers): carries no channels
        if isinstance(x, str) and x == "const" and name in _LAYOUT | {"squeeze", "unsqueeze", "to", "float"}:
            return "const"  # a parameter reshaped in code (a layer scale): judged where it meets channels
        if isinstance(x, Split) and name not in _LAYOUT:
            return self.opaque(node, env, f"{name} on a tensor whose channels a view has split")
        if isinstance(x, Last):
            return self.channels_last(node, env, x, in_shape, out_shape, name)
        if (node.op == "call_function" and target in _BINARY_FUNCS
                or node.op == "call_method" and target in _BINARY_METHODS):
            return self.binary(node, env, args)
        if node.op == "call_function" and target in _PASS_FUNCS or node.op == "call_method" and target in _PASS_METHODS:
            return self.passthrough(node, env, x, in_shape, out_shape, name)
        if node.op == "call_function" and target in (torch.cat, torch.concat):
            return self.cat(node, env)
        if node.op == "call_function" and target is operator.getitem:
            return self.getitem(node, env, x, in_shape, out_shape)
        if node.op == "call_function" and getattr(target, "__name__", "") == "stochastic_depth":
            return self.passthrough(node, env, x, in_shape, out_shape, name)
        if (node.op == "call_function" and target is torch.flatten) or (node.op == "call_method" and target in (
                "flatten", "view", "reshape", "squeeze", "unsqueeze")) or (
                node.op == "call_function" and target in (torch.reshape, torch.squeeze, torch.unsqueeze)):
            return self.reshape(node, env, x, in_shape, out_shape, name)
        if (node.op == "call_method" and target in _REDUCE) or (
                node.op == "call_function" and target in (torch.mean, torch.sum, torch.amax, torch.amin)):
            return self.reduce(node, env, x, in_shape, out_shape, name)
        if name in ("transpose", "permute", "swapaxes", "swapdims"):
            return self.transpose(node, env, x, in_shape, name)
        if name in ("chunk", "split", "tensor_split"):
            return self.pieces(node, env, x, in_shape, name)
        if name in ("unbind", "flip", "roll", "movedim"):
            return self.opaque(node, env, f"{name} reorders or splits channels")
        return self.opaque(node, env, f"operation {name} is not understood by the channel graph")

    def passthrough(self, node, env, x, in_shape, out_shape, name):
        if isinstance(x, Split) and out_shape == in_shape:
            return x  # .contiguous() between the transpose and the view of a shuffle
        if isinstance(x, np.ndarray) and out_shape is not None and in_shape is not None and len(out_shape) >= 2 \
                and out_shape[1] == in_shape[1] and out_shape[0] == in_shape[0]:
            return x
        return self.opaque(node, env, f"{name} changes the channel dimension")

    def binary(self, node, env, args):
        out_shape = _shape(node)
        if out_shape is None or len(out_shape) < 2:
            return self.opaque(node, env, "an elementwise op without a channel dimension")
        chans = []
        for a, v in zip(node.args[:2], args[:2]):
            s = _shape(a) if isinstance(a, fx.Node) else None
            if s is None:
                continue  # a python number
            i = len(s) - (len(out_shape) - 1)  # broadcasting aligns from the right
            if i < 0 or s[i] == 1:
                continue  # a scalar, or a (N,1,...) map broadcast over channels
            if isinstance(v, str) and v == "const":
                return self.opaque(node, env, "a per-channel parameter used in code (a layer scale such as "
                                              "x * self.gamma)")
            if not isinstance(v, np.ndarray) or i != 1:
                return self.opaque(node, env, "a constant or untracked tensor over channels")
            chans.append(v)
        if not chans:
            return self.fresh(out_shape, block=True)
        for v in chans[1:]:
            if len(v) != len(chans[0]):
                return self.opaque(node, env, "operands with different channel counts")
            self.uf.union(chans[0], v)
        if len(chans[0]) != out_shape[1]:
            return self.opaque(node, env, "broadcasting over channels")
        return chans[0]

    def cat(self, node, env):
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out_shape = _shape(node)
        if not isinstance(tensors, (list, tuple)):
            return self.opaque(node, env, "concatenation of a list the graph cannot see")
        vals = [env.get(t) for t in tensors]
        if out_shape is None or any(not isinstance(v, np.ndarray) for v in vals):
            return self.opaque(node, env, "concatenation of untracked tensors")
        if dim < 0:
            dim += len(out_shape)
        if dim == 1:
            return np.concatenate(vals)
        for v in vals[1:]:
            if len(v) != len(vals[0]):
                return self.opaque(node, env, "concatenation with different channel counts")
            self.uf.union(vals[0], v)
        return vals[0]

    def getitem(self, node, env, x, in_shape, out_shape):
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if isinstance(x, np.ndarray) and len(idx) >= 2 and idx[0] == slice(None) and idx[1] == slice(None) \
                and all(not isinstance(i, fx.Node) for i in idx) and out_shape is not None and in_shape is not None \
                and out_shape[:2] == in_shape[:2]:
            return x  # spatial slicing (the subsampling in an option-A shortcut)
        if isinstance(x, np.ndarray) and idx == (slice(None),):
            return x
        if isinstance(x, np.ndarray) and len(idx) >= 2 and idx[0] == slice(None) and isinstance(idx[1], slice) \
                and all(i == slice(None) or i is Ellipsis for i in idx[2:]) and in_shape is not None:
            return self.channel_slice(node, env, x, idx[1], in_shape)
        return self.opaque(node, env, "indexing along the channel dimension")

    def _size_args(self, node) -> list:
        sizes = list(node.args[1:]) if node.op == "call_method" else list(node.args[1:2])
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = list(sizes[0])
        return sizes

    def reshape(self, node, env, x, in_shape, out_shape, name):
        if in_shape is not None and out_shape is not None and len(out_shape) >= 2 and out_shape[0] == in_shape[0]:
            if isinstance(x, Split):
                return self.merge(node, env, x, in_shape, out_shape, name)
            if isinstance(x, np.ndarray) and len(out_shape) > len(in_shape) and name in ("view", "reshape"):
                for k in range(2, len(out_shape) - len(in_shape) + 3):
                    if math.prod(out_shape[1:1 + k]) == in_shape[1] and tuple(out_shape[1 + k:]) == tuple(
                            in_shape[2:]):
                        return self.split_view(node, env, x, out_shape[1:1 + k], name)
        if isinstance(x, np.ndarray) and in_shape is not None and out_shape is not None and len(out_shape) >= 2 \
                and out_shape[0] == in_shape[0]:
            if out_shape[1] == in_shape[1] and math.prod(out_shape[2:]) == math.prod(in_shape[2:]):
                return x  # only spatial dimensions change
            if len(out_shape) == 2 and len(in_shape) > 2 and out_shape[1] == math.prod(in_shape[1:]):
                return np.repeat(x, math.prod(in_shape[2:]))  # flatten: channel c -> features c*HW ... c*HW+HW-1
        return self.opaque(node, env, f"{name} mixes the channel dimension with others (a reshape/shuffle)")

    def reduce(self, node, env, x, in_shape, out_shape, name):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(x, np.ndarray) and dims is not None and in_shape is not None:
            dims = dims if isinstance(dims, (tuple, list)) else (dims,)
            dims = [d + len(in_shape) if d < 0 else d for d in dims]
            if all(isinstance(d, int) and d >= 2 for d in dims) and out_shape is not None and len(out_shape) >= 2 \
                    and out_shape[1] == in_shape[1]:
                return x
        return self.opaque(node, env, f"{name} reduces over channels")

    def visit_module(self, node, env, x, in_shape, out_shape):
        from ..models.layers import ChannelShuffle

        m = self.gm.get_submodule(node.target)
        name = self.names.get(id(m), node.target)
        if id(m) in self.leaves:
            return self.opaque(node, env, f"module {type(m).__name__} cannot be traced by torch.fx")
        if isinstance(x, Last) and len(node.all_input_nodes) == 1:
            return self.module_channels_last(node, env, m, name, x, in_shape, out_shape)
        if len(node.all_input_nodes) != 1 or not isinstance(x, np.ndarray):
            if isinstance(m, _PASS_MODULES) and x is None:
                return None
            return self.opaque(node, env, f"module {type(m).__name__} with inputs the graph cannot follow")
        if isinstance(m, nn.Conv2d):
            if m.groups == 1:
                rec = self.record(name, m, "conv", x, self.uf.new(m.out_channels), math.prod(out_shape[2:])
                                  * out_shape[0] * m.kernel_size[0] * m.kernel_size[1])
            elif m.groups == m.in_channels:
                # depthwise, with a channel multiplier when out = k*in: output channels g*k .. g*k+k-1 are
                # made from input channel g alone, so they go with it (whole groups are removed)
                mult = m.out_channels // m.in_channels
                rec = self.record(name, m, "dwconv", x, np.repeat(x, mult), math.prod(out_shape[2:]) * out_shape[0]
                                  * m.kernel_size[0] * m.kernel_size[1])
                self.uf.union(rec.in_slots, x)
                self.uf.union(rec.out_slots, np.repeat(x, mult))
                return rec.out_slots
            else:
                # grouped: the same positions are removed from every group, on both sides, so
                # ``groups`` stays valid and each output still reads only its own group's inputs
                rec = self.record(name, m, "gconv", x, self.uf.new(m.out_channels), math.prod(out_shape[2:])
                                  * out_shape[0] * m.kernel_size[0] * m.kernel_size[1])
                self.tie(rec.in_slots.reshape(m.groups, -1), 0)
                self.tie(rec.out_slots.reshape(m.groups, -1), 0)
            return rec.out_slots
        if isinstance(m, nn.Linear):
            if in_shape is None or len(in_shape) != 2:
                return self.opaque(node, env, "a linear layer on a tensor that is not (batch, features)")
            rec = self.record(name, m, "linear", x, self.uf.new(m.out_features), int(in_shape[0]))
            return rec.out_slots
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            rec = self.record(name, m, "bn", x, x, 0)
            self.uf.union(rec.in_slots, x)
            return rec.in_slots
        if isinstance(m, pad_types()):
            out = self.uf.new(m.out_channels)
            if not self.untie_shortcuts:
                # tied (default): an output position copying input channel c *is* channel c, so
                # the stages of an option-A ResNet keep their shared trunk channels together
                from .surgery import pad_sources

                src = pad_sources(m)
                out[src >= 0] = x[src[src >= 0]]
            rec = self.record(name, m, "pad", x, out, 0)
            return rec.out_slots
        if isinstance(m, (ChannelShuffle, nn.ChannelShuffle)):
            # (groups, C/groups) -> (C/groups, groups): groups is fixed, so every group keeps the same positions
            if len(x) % m.groups:
                return self.opaque(node, env, f"channel shuffle of {len(x)} channels into {m.groups} groups")
            slots = x.reshape(m.groups, -1)
            self.tie(slots, 0)
            return slots.T.reshape(-1)
        if isinstance(m, nn.Flatten):
            return self.reshape(node, env, x, in_shape, out_shape, "flatten")
        if isinstance(m, nn.PReLU) and m.num_parameters > 1:
            return self.opaque(node, env, "PReLU with per-channel slopes")
        if isinstance(m, _PASS_MODULES) or isinstance(m, nn.PReLU):
            return self.passthrough(node, env, x, in_shape, out_shape, type(m).__name__)
        return self.opaque(node, env, f"module {type(m).__name__} is not understood by the channel graph")
