"""What a compression policy is, how Optuna proposes one, and how it becomes a model.

A :class:`Dimension` is one searched number (a channel keep ratio, how many blocks of a stage go,
a decomposition rank);
a policy is ``{dimension name: value}``. :class:`PruningSpace` derives the dimensions from the
model itself: every channel group of its dependency graph (:mod:`slimkit.prune.graph`) gets a keep
ratio ("fine"), or one ratio per stage for inner and trunk channels ("coarse", chosen when the
model has more groups than ``FINE_LIMIT``: fewer dimensions for the sampler to learn); each stage
of removable residual blocks gets a count, the blocks removed in the order of a one-pass score on
held-out data (loss increase per MAC saved, as :func:`slimkit.prune.prune_blocks` ranks them).
With ``ranks``, every kxk convolution Tucker-2 can split (Kim et al., ICLR 2016) gets a rank
fraction (per layer, or per stage past ``FINE_LIMIT``): 1.0 leaves it whole, F < 1 replaces it by
1x1 -> kxk -> 1x1 convs whose inner widths are F of its output and input channels.
With ``bits``, every conv/linear layer (per stage past ``FINE_LIMIT``) gets a flag: 1 runs it on int8
kernels, 0 keeps it in float (mixed precision as partial quantization, Wu et al. 2020): the
search learns which layers int8 speeds up in the runtime and which cost the accuracy it is worth.
:meth:`PruningSpace.apply` builds the candidate: blocks removed, then channels cut by the
criterion to the policy's ratios (:func:`slimkit.prune.prune` with ``ratios``), then the layers
whose rank fraction is below 1 decomposed at those ranks of their pruned widths (left whole when
that would not have fewer parameters); :meth:`PruningSpace.keep_float` names the layers of that
candidate its int8 flags leave in float. The candidate is judged as any other: its batch norms
re-estimated, its accuracy proxy, MACs and latency measured, so the search weighs cutting channels
against splitting layers on the same budget.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SlimkitError

FINE_LIMIT = 24  # more groups than this: one ratio per stage
KEEP_LOW, KEEP_STEP = 0.25, 0.125
RANK_ITERATIONS = 10  # Tucker's ALS iterations per layer of a candidate: from the SVD start a few suffice


@dataclass(frozen=True)
class Dimension:
    """One searched value: a float in ``[low, high]`` by ``step``, an int in ``[low, high]`` or a 0/1 flag."""

    name: str
    kind: str  # "float", "int" (a count) or "flag" (0 or 1: a switch, never a count)
    low: float
    high: float
    step: float | None = None

    def suggest(self, trial):
        if self.kind in ("int", "flag"):
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, self.low, self.high, step=self.step)

    def clip(self, value):
        v = min(max(value, self.low), self.high)
        if self.kind in ("int", "flag"):
            return int(round(v))
        return round((v - self.low) / self.step) * self.step + self.low if self.step else float(v)


def _stage(name: str) -> str:
    """The stage a layer belongs to: its first path component (``layer2`` of ``layer2.3.conv1``)."""
    return name.split(".")[0]


@dataclass
class PruningSpace:
    """Channel keep ratios per group or stage, and residual blocks to remove per stage (module docstring)."""

    model: nn.Module
    example: torch.Tensor
    criterion: str = "l1"
    round_to: int = 8
    granularity: str = "auto"  # "fine", "coarse" or "auto"
    blocks: bool = True
    channels: bool = True
    ranks: bool = False
    bits: bool = False
    block_order: dict[str, list] = field(default_factory=dict)  # stage -> blocks, least useful first
    groups: dict[str, str] = field(default_factory=dict)  # producer layer -> its dimension
    rank_layers: dict[str, str] = field(default_factory=dict)  # decomposable conv -> its rank dimension
    int8_layers: dict[str, str] = field(default_factory=dict)  # quantizable layer -> its int8 flag
    dimensions: list[Dimension] = field(default_factory=list)

    def build(self, held_out: Iterable | None = None, batches: int = 2,
              order: dict[str, list[str]] | None = None) -> "PruningSpace":
        """Derive the dimensions; with blocks, rank them on ``held_out`` (or take ``order``: stage -> block names).

        A worker process rebuilds the space its coordinator described with ``order`` from
        :meth:`describe`, so every worker removes the same blocks for the same policy.
        """
        from ..prune import build_graph, find_blocks

        self.model.eval()
        if self.channels:
            graph = build_graph(self.model, self.example, (), True)
            prunable = graph.prunable()
            groups = [g for g in graph.groups if prunable[g.classes].any() and len(g.classes) > self.round_to]
            fine = self.granularity == "fine" or (self.granularity == "auto" and len(groups) <= FINE_LIMIT)
            for g in groups:
                if fine:
                    dim = f"keep:{g.name}"
                else:  # a trunk group spans several producers; an inner one has one
                    kind = "trunk" if len(g.producers) > 1 else "inner"
                    dim = f"keep:{_stage(g.name)}:{kind}"
                self.groups[g.name] = dim
            for dim in dict.fromkeys(self.groups.values()):
                self.dimensions.append(Dimension(dim, "float", KEEP_LOW, 1.0, KEEP_STEP))
        if self.blocks:
            found = find_blocks(self.model, self.example)
            outer = [b for b in found if not any(b.name != o.name and b.name.startswith(o.name + ".") for o in found)]
            if outer and order is not None:
                by_name = {b.name: b for b in outer}
                missing = [n for names in order.values() for n in names if n not in by_name]
                if missing:
                    raise SlimkitError(f"search: the described space names blocks this model lacks: {missing[:3]}")
                self.block_order = {stage: [by_name[n] for n in names] for stage, names in order.items()}
            elif outer:
                if held_out is None:
                    raise SlimkitError("search: ranking residual blocks needs held-out data")
                scores = _block_scores(self.model, self.example, outer, held_out, batches)
                for b in sorted(outer, key=lambda b: scores[b.name]):
                    self.block_order.setdefault(_stage(b.name), []).append(b)
            for stage, blocks in self.block_order.items():
                # keep at least one removable block per stage: a stage of shortcuts alone learns nothing
                if len(blocks) > 1:
                    self.dimensions.append(Dimension(f"blocks:{stage}", "int", 0, len(blocks) - 1))
        if self.ranks:
            from ..decompose.methods import applies

            convs = [n for n, m in self.model.named_modules()
                     if isinstance(m, nn.Conv2d) and applies("tucker", m) is None]
            fine = self.granularity == "fine" or (self.granularity == "auto" and len(convs) <= FINE_LIMIT)
            self.rank_layers = {n: f"rank:{n}" if fine else f"rank:{_stage(n)}" for n in convs}
            for dim in dict.fromkeys(self.rank_layers.values()):
                self.dimensions.append(Dimension(dim, "float", KEEP_LOW, 1.0, KEEP_STEP))
        if self.bits:
            from ..quant.core import quantizable_layers

            layers = quantizable_layers(self.model)
            fine = self.granularity == "fine" or (self.granularity == "auto" and len(layers) <= FINE_LIMIT)
            self.int8_layers = {n: f"int8:{n}" if fine else f"int8:{_stage(n)}" for n in layers}
            for dim in dict.fromkeys(self.int8_layers.values()):
                self.dimensions.append(Dimension(dim, "flag", 0, 1))
        if not self.dimensions:
            raise SlimkitError("search: nothing to search in this model (no prunable channel group, no removable "
                               "residual block" + (", no kxk convolution to decompose" if self.ranks else "")
                               + (", no conv or linear layer to quantize" if self.bits else "") + ")")
        return self

    @classmethod
    def from_description(cls, model: nn.Module, example: torch.Tensor, desc: dict) -> "PruningSpace":
        """The space :meth:`describe` wrote, rebuilt on ``model`` (refused when the model gives other dimensions)."""
        space = cls(model, example, criterion=desc["criterion"], round_to=int(desc["round_to"]),
                    granularity=desc["granularity"], blocks=bool(desc["blocks"]), channels=bool(desc["channels"]),
                    ranks=bool(desc.get("ranks", False)), bits=bool(desc.get("bits", False)))
        space.build(order=desc["block_order"])
        if space.describe()["dimensions"] != [list(d) for d in desc["dimensions"]]:
            raise SlimkitError("search: this model does not give the described search space (its dimensions differ)")
        return space

    def describe(self) -> dict:
        """What a worker needs to rebuild this space exactly (JSON): dimensions, groups and block order."""
        return {"criterion": self.criterion, "round_to": self.round_to, "granularity": self.granularity,
                "blocks": self.blocks, "channels": self.channels, **({"ranks": True} if self.ranks else {}),
                **({"bits": True} if self.bits else {}),
                "dimensions": [[d.name, d.kind, d.low, d.high, d.step] for d in self.dimensions],
                "block_order": {stage: [b.name for b in blocks] for stage, blocks in self.block_order.items()}}

    def suggest(self, trial) -> dict:
        return {d.name: d.suggest(trial) for d in self.dimensions}

    def uniform(self, keep: float, blocks: int = 0, rank: float | None = None, int8: int = 1) -> dict:
        """The policy keeping ``keep`` of every group's channels, removing ``blocks`` blocks per stage,
        decomposing at ``rank`` (default: whole when channels are searched too, so "uniform" stays the plain
        pruning control; ``keep`` when ranks are all there is) and with every int8 flag at ``int8`` (default: all
        layers int8, as a whole-model quantization would)."""
        rank = rank if rank is not None else (1.0 if self.groups else keep)
        ranks = set(self.rank_layers.values())
        return {d.name: d.clip(blocks if d.kind == "int" else int8 if d.kind == "flag" else rank if d.name in ranks
                               else keep)
                for d in self.dimensions}

    def smallest(self, int8: int = 1) -> dict:
        """The policy that removes the most this space allows (every ratio at its floor, every removable block),
        with every int8 flag at ``int8`` (default: every layer int8)."""
        return {d.name: d.low if d.kind == "float" else int8 if d.kind == "flag" else d.high for d in self.dimensions}

    def quantized(self, policy: dict) -> bool:
        """Whether ``policy`` runs any layer on int8 kernels."""
        return any(int(policy.get(dim, 0)) for dim in set(self.int8_layers.values()))

    def keep_float(self, policy: dict, candidate: nn.Module) -> list[str]:
        """The quantizable layers of ``candidate`` (the model :meth:`apply` built) that ``policy`` leaves in float.

        A decomposed layer's factors follow the flag of the layer they replace; a layer the
        original lacks (none today) stays float.
        """
        from ..quant.core import quantizable_layers

        out = []
        for name in quantizable_layers(candidate):
            owner = next((n for n in self.int8_layers if name == n or name.startswith(n + ".")), None)
            if owner is None or not int(policy.get(self.int8_layers[owner], 0)):
                out.append(name)
        return out

    def clip(self, policy: dict) -> dict:
        """``policy`` restricted to this space's dimensions, each value clipped to its range and grid."""
        return {d.name: d.clip(policy[d.name]) for d in self.dimensions if d.name in policy}

    def apply(self, policy: dict, model: nn.Module | None = None) -> nn.Module:
        """The candidate model of ``policy`` (a copy; ``model`` defaults to the space's)."""
        from ..prune import PruneConfig, prune, remove_blocks

        work = copy.deepcopy(model if model is not None else self.model).eval()
        removed = [b for stage, blocks in self.block_order.items()
                   for b in blocks[:int(policy.get(f"blocks:{stage}", 0))]]
        if removed:
            work = remove_blocks(work, removed, inplace=True)
        gone = [b.name for b in removed]
        ratios = {producer: 1.0 - float(policy[dim]) for producer, dim in self.groups.items()
                  if dim in policy and policy[dim] < 1.0 and not any(producer.startswith(g + ".") for g in gone)}
        if ratios:
            config = PruneConfig(criterion=self.criterion, ratios=ratios, round_to=self.round_to)
            work = prune(work, self.example, config, inplace=True).model
        ranks = {n: float(policy[dim]) for n, dim in self.rank_layers.items()
                 if dim in policy and policy[dim] < 1.0 and not any(n.startswith(g + ".") for g in gone)}
        if ranks:
            _decompose(work, ranks)
        return work.eval()


def _decompose(model: nn.Module, fractions: dict[str, float]) -> None:
    """Tucker-2 each named conv of ``model`` in place at ``fraction`` of its (pruned) output and input widths, unless
    that would not have fewer parameters than the layer itself."""
    from ..decompose import set_module
    from ..decompose.methods import DECOMPOSITIONS

    tucker = DECOMPOSITIONS.get("tucker")
    modules = dict(model.named_modules())
    for name, f in fractions.items():
        m = modules[name]
        o, c = m.weight.shape[:2]
        r = (max(1, round(f * o)), max(1, round(f * c)))
        if tucker.cost(m, r, (1, 1), (1, 1))[1] >= sum(p.numel() for p in m.parameters()):  # params: no spatial term
            continue
        set_module(model, name, tucker.build(m, r, None, {"iterations": RANK_ITERATIONS, "seed": 0}))


def _block_scores(model: nn.Module, example: torch.Tensor, blocks: list, held_out: Iterable, batches: int) -> dict:
    """Loss increase per share of MACs saved when each block alone is removed (one pass, as ``scoring="once"``)."""
    from ..profile import profile
    from ..prune import remove_blocks
    from ..prune.sensitivity import first_batches
    from ..train import evaluate

    data = first_batches(held_out, batches, "search")
    total = profile(model, example).macs
    ref = evaluate(model, data)["loss"]
    return {b.name: (evaluate(remove_blocks(model, [b]), data)["loss"] - ref) / max(b.macs / total, 1e-12)
            for b in blocks}


def policy_text(policy: dict) -> str:
    """A policy on one line, dimensions in order."""
    def short(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{re.sub(r'^(keep|blocks):', '', k)}={short(v)}" for k, v in policy.items())
