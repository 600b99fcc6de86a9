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
* a grouped conv, a channel shuffle and a ``chunk``/``split`` into equal pieces *tie* slots
  across groups or pieces (position ``j`` of every group is one class), so the same positions
  leave every group and the sizes the code fixes (``groups``, ``chunk(2)``) stay valid; a
  channels-last block (ConvNeXt) is followed through its permutes (:mod:`slimkit.prune.slots`);
* anything it cannot follow exactly (a reshape across channels with sizes fixed in code, a
  reduction over channels, a per-channel parameter used in code, a layer norm over channels, an
  unknown or untraceable module) *blocks* the classes it touches: they are never removed, and a
  warning names the layer and the construct. The model output is blocked too, so a
  classifier's outputs are never pruned.
"""

from __future__ import annotations

import warnings as _warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import SlimkitError
from .slots import LayerRecord, SlotBuilder, UnionFind
from .trace import trace

__all__ = ["ChannelGraph", "Group", "LayerRecord", "build_graph"]


@dataclass
class Group:
    """Channel classes coupled through shared producing layers; pruned and normalised together."""

    id: int
    name: str
    classes: np.ndarray
    atoms: list[np.ndarray]
    producers: list[str]
    widths: list[int] = field(default_factory=list)

    def step(self, atom: int, round_to: int) -> int:
        """Classes per rounding chunk of atom ``atom``: ``round_to`` channels, where a class can be several.

        A class tied across the groups of a grouped conv or a shuffle is one position in each of
        ``widths[atom]`` groups, so it already removes that many channels.
        """
        return max(1, round_to // max(1, self.widths[atom] if self.widths else 1))


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
    b = SlotBuilder(model, gm, leaves, untie_shortcuts)
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
    guf = UnionFind()
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
    # channels per class: how often a class appears in the output of a layer that makes or normalises it
    width = np.full(num, np.iinfo(np.int64).max, dtype=np.int64)
    for rec in b.layers.values():
        if rec.out_cls is not None and len(rec.out_cls) and rec.kind != "pad":
            cnt = np.bincount(rec.out_cls, minlength=num)
            width = np.where(cnt > 0, np.minimum(width, cnt), width)
    width[width == np.iinfo(np.int64).max] = 1
    for root, members in by_root.items():
        classes = np.asarray(members, dtype=np.int64)
        atoms: dict[tuple, list[int]] = {}
        for k in members:
            atoms.setdefault(tuple(signature[k]), []).append(k)
        g = Group(len(groups), producers.get(root, ["?"])[0], classes,
                  [np.asarray(a, dtype=np.int64) for a in atoms.values()], producers.get(root, []),
                  [int(width[a[0]]) for a in atoms.values()])
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
