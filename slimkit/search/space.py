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
With ``sparsity``, every conv/linear layer (per stage past ``FINE_LIMIT``) gets a density, the
fraction of its weights kept by magnitude, and with ``share`` the bits of its k-means codebook:
Deep Compression's two weight stages (Han et al., ICLR 2016) with the per-layer sparsity and bits
searched under a budget on the packed file's bytes, where the paper set them by hand from a
sensitivity scan (AMC, He et al. ECCV 2018, learnt per-layer sparsity the same way with RL).
:meth:`PruningSpace.apply` builds the candidate: blocks removed, then channels cut by the
criterion to the policy's ratios (:func:`slimkit.prune.prune` with ``ratios``), then the layers
whose rank fraction is below 1 decomposed at those ranks of their pruned widths (left whole when
that would not have fewer parameters), then each layer's smallest weights zeroed to its density and
its non-zeros clustered into its codebook (:func:`weight_stages`); :meth:`PruningSpace.keep_float`
names the layers of that candidate its int8 flags leave in float. The candidate is judged as any other: its batch norms
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
DENSITY_LOW, DENSITY_STEP = 0.05, 0.05  # a layer keeps at least 5% of its weights (95% sparse)
BITS_LOW, BITS_HIGH = 2, 8  # codebook bits per layer: 8 is lossless in practice, 2 the paper's floor for fc layers
UNIFORM_BITS = 4  # "uniform" codebooks: on resnet20, 4 bits cost 0.09 points more than 5 (docs/sparse.md)


@dataclass(frozen=True)
class Dimension:
    """One searched value: a float in ``[low, high]`` by ``step``, an int in ``[low, high]``, a 0/1 flag or a bit
    width."""

    name: str
    # "float" (a fraction kept: lower is smaller), "int" (a count of blocks removed: higher is smaller), "flag"
    # (0 or 1: a switch, never a count) or "bits" (a codebook's bits: lower is smaller)
    kind: str
    low: float
    high: float
    step: float | None = None

    def suggest(self, trial):
        if self.kind in ("int", "flag", "bits"):
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, self.low, self.high, step=self.step)

    def clip(self, value):
        v = min(max(value, self.low), self.high)
        if self.kind in ("int", "flag", "bits"):
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
    sparsity: bool = False
    share: bool = False
    block_order: dict[str, list] = field(default_factory=dict)  # stage -> blocks, least useful first
    groups: dict[str, str] = field(default_factory=dict)  # producer layer -> its dimension
    rank_layers: dict[str, str] = field(default_factory=dict)  # decomposable conv -> its rank dimension
    int8_layers: dict[str, str] = field(default_factory=dict)  # quantizable layer -> its int8 flag
    density_layers: dict[str, str] = field(default_factory=dict)  # conv/linear layer -> its density
    codebook_layers: dict[str, str] = field(default_factory=dict)  # conv/linear layer -> its codebook bits
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
        if self.sparsity or self.share:
            from ..sparse.masks import prunable_layers

            layers = [n for n, _ in prunable_layers(self.model)]
            fine = self.granularity == "fine" or (self.granularity == "auto" and len(layers) <= FINE_LIMIT)
            for on, prefix, table, dim in ((self.sparsity, "density", self.density_layers,
                                            lambda d: Dimension(d, "float", DENSITY_LOW, 1.0, DENSITY_STEP)),
                                           (self.share, "codebook", self.codebook_layers,
                                            lambda d: Dimension(d, "bits", BITS_LOW, BITS_HIGH))):
                if on:
                    table.update({n: f"{prefix}:{n}" if fine else f"{prefix}:{_stage(n)}" for n in layers})
                    self.dimensions.extend(dim(d) for d in dict.fromkeys(table.values()))
        if not self.dimensions:
            raise SlimkitError("search: nothing to search in this model (no prunable channel group, no removable "
                               "residual block" + (", no kxk convolution to decompose" if self.ranks else "")
                               + (", no conv or linear layer to quantize" if self.bits else "")
                               + (", no conv or linear layer to sparsify or share" if self.sparsity or self.share
                                  else "") + ")")
        return self

    @classmethod
    def from_description(cls, model: nn.Module, example: torch.Tensor, desc: dict) -> "PruningSpace":
        """The space :meth:`describe` wrote, rebuilt on ``model`` (refused when the model gives other dimensions)."""
        space = cls(model, example, criterion=desc["criterion"], round_to=int(desc["round_to"]),
                    granularity=desc["granularity"], blocks=bool(desc["blocks"]), channels=bool(desc["channels"]),
                    ranks=bool(desc.get("ranks", False)), bits=bool(desc.get("bits", False)),
                    sparsity=bool(desc.get("sparsity", False)), share=bool(desc.get("share", False)))
        space.build(order=desc["block_order"])
        if space.describe()["dimensions"] != [list(d) for d in desc["dimensions"]]:
            raise SlimkitError("search: this model does not give the described search space (its dimensions differ)")
        return space

    def describe(self) -> dict:
        """What a worker needs to rebuild this space exactly (JSON): dimensions, groups and block order."""
        return {"criterion": self.criterion, "round_to": self.round_to, "granularity": self.granularity,
                "blocks": self.blocks, "channels": self.channels, **({"ranks": True} if self.ranks else {}),
                **({"bits": True} if self.bits else {}), **({"sparsity": True} if self.sparsity else {}),
                **({"share": True} if self.share else {}),
                "dimensions": [[d.name, d.kind, d.low, d.high, d.step] for d in self.dimensions],
                "block_order": {stage: [b.name for b in blocks] for stage, blocks in self.block_order.items()}}

    def suggest(self, trial) -> dict:
        return {d.name: d.suggest(trial) for d in self.dimensions}

    def uniform(self, keep: float, blocks: int = 0, rank: float | None = None, int8: int = 1,
                bits: int = UNIFORM_BITS) -> dict:
        """The policy keeping ``keep`` of every group's channels (and of every layer's weights, with sparsity),
        removing ``blocks`` blocks per stage, decomposing at ``rank`` (default: whole when channels are searched
        too, so "uniform" stays the plain pruning control; ``keep`` when ranks are all there is), with every int8
        flag at ``int8`` (default: all layers int8, as a whole-model quantization would) and every codebook at
        ``bits``."""
        rank = rank if rank is not None else (1.0 if self.groups else keep)
        ranks = set(self.rank_layers.values())
        return {d.name: d.clip(blocks if d.kind == "int" else int8 if d.kind == "flag" else bits if d.kind == "bits"
                               else rank if d.name in ranks else keep)
                for d in self.dimensions}

    def smallest(self, int8: int = 1) -> dict:
        """The policy that removes the most this space allows (every ratio, density and codebook at its floor,
        every removable block), with every int8 flag at ``int8`` (default: every layer int8)."""
        return {d.name: d.low if d.kind in ("float", "bits") else int8 if d.kind == "flag" else d.high
                for d in self.dimensions}

    def quantized(self, policy: dict) -> bool:
        """Whether ``policy`` runs any layer on int8 kernels."""
        return any(int(policy.get(dim, 0)) for dim in set(self.int8_layers.values()))

    def keep_float(self, policy: dict, candidate: nn.Module) -> list[str]:
        """The quantizable layers of ``candidate`` (the model :meth:`apply` built) that ``policy`` leaves in float.

        A decomposed layer's factors follow the flag of the layer they replace; a layer the
        original lacks (none today) stays float.
        """
        from ..quant.core import quantizable_layers

        flags = self.owned(self.int8_layers, policy, quantizable_layers(candidate), 0)
        return [name for name, flag in flags.items() if not int(flag)]

    def clip(self, policy: dict) -> dict:
        """``policy`` restricted to this space's dimensions, each value clipped to its range and grid."""
        return {d.name: d.clip(policy[d.name]) for d in self.dimensions if d.name in policy}

    def apply(self, policy: dict, model: nn.Module | None = None, hold: bool = False) -> nn.Module:
        """The candidate model of ``policy`` (a copy; ``model`` defaults to the space's); with ``hold``, its masks
        and codebooks stay attached for a fine-tune (:func:`weight_stages`)."""
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
        if self.density_layers or self.codebook_layers:
            from ..sparse.masks import prunable_layers

            names = [n for n, _ in prunable_layers(work)]
            weight_stages(work, self.owned(self.density_layers, policy, names, 1.0),
                          self.owned(self.codebook_layers, policy, names, None), hold=hold)
        return work.eval()

    @staticmethod
    def owned(table: dict[str, str], policy: dict, names: list[str], default) -> dict:
        """Each layer of a candidate (``names``) with the value ``policy`` gives the original layer it comes from in
        ``table`` (layer -> dimension): a decomposed layer's factors follow the layer they replace; ``default``
        for a layer the original lacks or a dimension the policy does not set."""
        out = {}
        for name in names:
            owner = next((n for n in table if name == n or name.startswith(n + ".")), None)
            out[name] = policy.get(table[owner], default) if owner is not None else default
        return out


def weight_stages(model: nn.Module, densities: dict[str, float], bits: dict[str, int | None], *,
                  hold: bool = False) -> nn.Module:
    """Deep Compression's weight stages on ``model`` in place: each named layer's smallest-magnitude weights zeroed
    down to its density (1.0: none), then its non-zeros clustered into a ``2**bits`` k-means codebook (None: no
    codebook). With ``hold``, masks and codebooks stay attached as parametrizations (a fine-tune keeps zeros
    zero and trains only the centroids; :func:`slimkit.sparse.bake` and :func:`slimkit.sparse.bake_shared`
    remove them); else they are baked into plain weights.

    Example (Han et al., ICLR 2016):
        >>> import slimkit
        >>> m = weight_stages(slimkit.create_model("digits_cnn"), {"classifier": 0.1}, {"classifier": 3})
        >>> w = m.classifier.weight
        >>> bool((w != 0).float().mean() <= 0.11), len(w.unique()) <= 9
        (True, True)
    """
    from ..sparse.masks import attach, bake, compute_masks, prunable_layers, scores
    from ..sparse.share import attach_shared, bake_shared

    layers = [(n, m) for n, m in prunable_layers(model) if densities.get(n, 1.0) < 1.0]
    if layers:
        # one plan entry per layer, each its own sparsity: no global ranking, no edge rule (the search chose them)
        plan = {n: 1.0 - float(densities[n]) for n, _ in layers}
        attach(layers, compute_masks(layers, scores("magnitude", layers, None), 1.0, plan, "same"))
        if not hold:
            bake(model)
    for name, m in prunable_layers(model):
        if bits.get(name) is not None:
            # clustered from the masked weights, the mask baked first: a zero's code (-1) keeps it zero, and one
            # parametrization per layer is what bake_shared and the trainable flags expect
            bake(m)
            attach_shared(m, int(bits[name]))
    if not hold:
        bake_shared(model)
    return model


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
