"""The channel dependency graph: which channels of which layers must be removed together.

Structured pruning removes whole channels, and a channel of one tensor is the same channel in
every layer that reads or writes it: a conv's output filter, the batch norm behind it, the
input columns of every consumer, the other operand of a residual add, a slice of a concat.
Removing it from only some of them breaks the shapes or silently changes the function. This is
the problem DepGraph (Fang et al., CVPR 2023, "DepGraph: Towards Any Structural Pruning")
solves; the formulation here works on single channels:

* the model is traced with ``torch.fx`` and run once on an example input to learn every
  tensor's shape;
* every channel position of every tensor carries a *slot* (an integer); a conv/linear output,
  the zeros of an option-A shortcut and the model input create new slots; operations that keep
  channel identity pass slots through (BN, activations, pooling, dropout, spatial slicing);
  ``torch.cat`` on channels concatenates slot lists; ``flatten`` before a linear repeats each
  slot ``H*W`` times (each channel maps to ``H*W`` input features);
* operations that tie positions together (residual ``+``, gates ``x * s``, a depthwise conv
  whose input and output channel are the same channel, a module called more than once) merge
  slots with a union-find; a merged set is a *channel class*, the unit that is kept or removed;
* an option-A shortcut (subsample + zero channels) passes its input's slots through at the
  positions it copies and makes fresh slots for its zeros, so a stage-1 trunk channel and its
  copies in stages 2 and 3 are one channel; with ``untie_shortcuts`` every output position is
  fresh (after pruning the shortcut routes each kept input channel to its position and puts
  zeros where the source was removed) and each stage's trunk is a group of its own;
* a *group* is a set of classes joined by sharing a producing layer (so a ResNet's residual
  trunk, including the channels its option-A shortcuts zero-pad, is one group, or one per stage
  when untied); an
  *atom* is the set of classes of a group that appear in exactly the same layers, and rounding
  to a channel multiple is applied per atom, so every layer's width stays a multiple;
* anything it cannot follow exactly (a reshape across channels, channel shuffle, ``chunk``, a
  grouped non-depthwise conv, a reduction over channels, an unknown or untraceable module)
  *blocks* the classes it touches: they are never removed, and a warning names the layer. The
  model output is blocked too, so a classifier's outputs are never pruned.
"""

from __future__ import annotations

import math
import operator
import warnings as _warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import SlimkitError
from .trace import pad_types, trace

__all__ = ["ChannelGraph", "Group", "LayerRecord", "build_graph"]


class _UnionFind:
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
    i), ``gconv`` (other grouped conv, blocked), ``linear``, ``bn`` or ``pad`` (an option-A
    shortcut: PadShortcut or PrunedPadShortcut).
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


@dataclass
class Group:
    """Channel classes coupled through shared producing layers; pruned and normalised together."""

    id: int
    name: str
    classes: np.ndarray
    atoms: list[np.ndarray]
    producers: list[str]


@dataclass
class ChannelGraph:
    """The result of :func:`build_graph`: layers, channel classes, groups and warnings."""

    layers: dict[str, LayerRecord]
    num_classes: int
    blocked: np.ndarray
    groups: list[Group]
    warnings: list[str] = field(default_factory=list)
    class_group: np.ndarray | None = None

    def prunable(self) -> np.ndarray:
        """Boolean mask over classes: in a group and not blocked."""
        return (self.class_group >= 0) & ~self.blocked

    def unprunable_layers(self) -> list[str]:
        """Producing layers none of whose output channels may be removed."""
        ok = self.prunable()
        return [n for n, r in self.layers.items() if r.kind in ("conv", "linear", "gconv")
                and r.out_cls is not None and not ok[r.out_cls].any()]


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


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


class _Builder:
    def __init__(self, model: nn.Module, gm: fx.GraphModule, leaves: set[int], untie_shortcuts: bool = False) -> None:
        self.model, self.gm, self.leaves, self.untie_shortcuts = model, gm, leaves, untie_shortcuts
        self.uf = _UnionFind()
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
        if name in ("transpose", "permute", "chunk", "split", "tensor_split", "unbind", "flip", "roll", "movedim"):
            return self.opaque(node, env, f"{name} reorders or splits channels (a shuffle, chunk or permute)")
        return self.opaque(node, env, f"operation {name} is not understood by the channel graph")

    def passthrough(self, node, env, x, in_shape, out_shape, name):
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
        return self.opaque(node, env, "indexing along the channel dimension")

    def reshape(self, node, env, x, in_shape, out_shape, name):
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
        if len(node.all_input_nodes) != 1 or not isinstance(x, np.ndarray):
            if isinstance(m, _PASS_MODULES) and x is None:
                return None
            return self.opaque(node, env, f"module {type(m).__name__} with inputs the graph cannot follow")
        if isinstance(m, nn.Conv2d):
            if m.groups == 1:
                rec = self.record(name, m, "conv", x, self.uf.new(m.out_channels), math.prod(out_shape[2:])
                                  * out_shape[0] * m.kernel_size[0] * m.kernel_size[1])
            elif m.groups == m.in_channels == m.out_channels:
                rec = self.record(name, m, "dwconv", x, x, math.prod(out_shape[2:]) * out_shape[0]
                                  * m.kernel_size[0] * m.kernel_size[1])
                self.uf.union(rec.in_slots, x)
                return rec.in_slots
            else:
                rec = self.record(name, m, "gconv", x, self.uf.new(m.out_channels), 0)
                self.blocked += [rec.in_slots, rec.out_slots, x]
                self.warn(f"{name}: grouped convolution (groups={m.groups}, not depthwise): its input and output "
                          f"channels are left unprunable")
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
            return self.opaque(node, env, "channel shuffle reorders channels across groups")
        if isinstance(m, nn.Flatten):
            return self.reshape(node, env, x, in_shape, out_shape, "flatten")
        if isinstance(m, nn.PReLU) and m.num_parameters > 1:
            return self.opaque(node, env, "PReLU with per-channel slopes")
        if isinstance(m, _PASS_MODULES) or isinstance(m, nn.PReLU):
            return self.passthrough(node, env, x, in_shape, out_shape, type(m).__name__)
        return self.opaque(node, env, f"module {type(m).__name__} is not understood by the channel graph")


def build_graph(model: nn.Module, example_input: torch.Tensor, protected: list[str] | tuple[str, ...] = (),
                untie_shortcuts: bool = False) -> ChannelGraph:
    """Trace ``model`` and group its coupled channels (DepGraph, Fang et al. CVPR 2023).

    ``example_input`` fixes the spatial sizes (a batch of 1 suffices). ``protected`` names
    modules whose shape must not change: every channel class they touch is blocked. Layers
    the graph cannot follow exactly are left unprunable and listed in ``graph.warnings`` (also
    emitted as Python warnings); the returned graph never allows a removal that would change
    the function other than by dropping the chosen channels. ``untie_shortcuts`` gives every
    option-A shortcut fresh output channels, so each ResNet stage's trunk is pruned on its own
    (the shortcut then carries zeros where its source was removed); otherwise a copied channel
    stays one channel across stages. :func:`~slimkit.prune.prune` passes ``True`` by default
    (with floor rounding it kept more accuracy in our CIFAR-10 measurements, docs/prune.md).
    """
    gm, leaves = trace(model)
    b = _Builder(model, gm, leaves, untie_shortcuts)
    b.run(example_input)
    n = len(b.uf.parent)
    roots = np.fromiter((b.uf.find(i) for i in range(n)), dtype=np.int64, count=n)
    _, cls_of = np.unique(roots, return_inverse=True)
    num = int(cls_of.max()) + 1 if n else 0
    blocked = np.zeros(num, dtype=bool)
    for s in b.blocked:
        blocked[cls_of[s]] = True
    known = {n for n, _ in model.named_modules()}
    missing = [p for p in protected if p not in known]
    if missing:
        raise SlimkitError(f"protected layer(s) not in the model: {', '.join(missing)}")
    prot = set(protected)
    for rec in b.layers.values():
        rec.in_cls = cls_of[rec.in_slots] if rec.in_slots is not None else None
        rec.out_cls = cls_of[rec.out_slots] if rec.out_slots is not None else None
        if any(rec.name == p or rec.name.startswith(p + ".") for p in prot):
            for c in (rec.in_cls, rec.out_cls):
                if c is not None:
                    blocked[c] = True
    # groups: classes joined by a common producing layer
    guf = _UnionFind()
    guf.new(num)
    producers: dict[int, list[str]] = {}
    has_producer = np.zeros(num, dtype=bool)
    for rec in b.layers.values():
        if rec.kind in ("conv", "linear", "gconv", "pad") and rec.out_cls is not None and len(rec.out_cls):
            u = np.unique(rec.out_cls)
            guf.union(np.full(len(u) - 1, u[0]), u[1:])
            if rec.kind != "pad":
                has_producer[u] = True
    groot = np.fromiter((guf.find(i) for i in range(num)), dtype=np.int64, count=num)
    for rec in b.layers.values():
        if rec.kind in ("conv", "linear", "gconv") and rec.out_cls is not None and len(rec.out_cls):
            producers.setdefault(int(groot[rec.out_cls[0]]), []).append(rec.name)
    # atoms: classes of a group present in exactly the same layers
    signature: list[list[int]] = [[] for _ in range(num)]
    for li, rec in enumerate(b.layers.values()):
        for d, c in ((0, rec.in_cls), (1, rec.out_cls)):
            if c is not None:
                for k in np.unique(c).tolist():
                    signature[k].append(2 * li + d)
    class_group = np.full(num, -1, dtype=np.int64)
    groups: list[Group] = []
    by_root: dict[int, list[int]] = {}
    for k in range(num):
        if has_producer[k]:
            by_root.setdefault(int(groot[k]), []).append(k)
        else:
            blocked[k] = True  # no weights make this channel (a model input, a padding never added to anything)
    for root, members in by_root.items():
        classes = np.asarray(members, dtype=np.int64)
        atoms: dict[tuple, list[int]] = {}
        for k in members:
            atoms.setdefault(tuple(signature[k]), []).append(k)
        g = Group(len(groups), producers.get(root, ["?"])[0], classes,
                  [np.asarray(a, dtype=np.int64) for a in atoms.values()], producers.get(root, []))
        class_group[classes] = g.id
        groups.append(g)
    by_reason: dict[str, list[str]] = {}
    for w in b.warnings:
        where, _, reason = w.partition(": ")
        by_reason.setdefault(reason, []).append(where)
    for reason, where in by_reason.items():  # one warning per kind of problem, naming the layers
        shown = ", ".join(where[:6]) + (f" and {len(where) - 6} more" if len(where) > 6 else "")
        _warnings.warn(f"slimkit.prune: {shown}: {reason}", stacklevel=2)
    return ChannelGraph(b.layers, num, blocked, groups, b.warnings, class_group)
