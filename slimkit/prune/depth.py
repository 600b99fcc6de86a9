"""Depth pruning: remove whole residual blocks (block-level structured pruning).

Veit et al. (NeurIPS 2016, "Residual Networks Behave Like Ensembles of Relatively Shallow
Networks") showed that deleting a single residual block from a trained ResNet costs little
accuracy, and that blocks differ widely in how much. Removing the cheapest blocks is the other
axis of structured pruning, next to channels: the model keeps its widths, so every layer left
runs exactly as efficiently as before and the measured speed-up follows the MACs removed. On a
CPU, narrow layers of already-thin networks (CIFAR ResNets: 16-64 channels) run far below peak,
so thinning them further saves much less time than MACs (see docs/prune.md).

A block is a submodule whose traced forward is ``x + f(x)`` or ``act(x + f(x))`` with an
identity shortcut (the input itself, ``nn.Identity``, an empty ``nn.Sequential`` or a stride-1
option-A shortcut that pads nothing) and output shaped like its input: torchvision's
``BasicBlock``/``Bottleneck`` without downsampling, ``InvertedResidual`` with its residual,
ConvNeXt and EfficientNet blocks, the zoo's ResNets. Removing it means ``f = 0``: the block is
replaced by ``act`` (``nn.ReLU()``) or by ``nn.Identity()``, which is exact for that case.

Which blocks go: each candidate is bypassed on its own on held-out batches and scored by the
rise of the cross-entropy, divided by the share of the model's MACs it holds (loss per MAC
saved); the lowest goes, and the rest are re-scored on the thinned model before the next one
goes (Veit et al.'s single-block deletions, taken greedily), until the MAC target is met.
``scoring="lazy"`` re-scores only the front of the ranking (lazy greedy), ``"once"`` never.

    r = prune_blocks(model, x, data.loader("val", 256), target_macs=0.5)
    r.model, r.removed, r.summary()
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import SlimkitError
from .config import SCORINGS, DepthConfig  # noqa: F401  (SCORINGS re-exported)
from .trace import hooked_forward

__all__ = ["Block", "DepthResult", "find_blocks", "prune_blocks", "remove_blocks"]

_ADDS = {operator.add, operator.iadd, torch.add}
_RELUS = {F.relu, torch.relu}


@dataclass
class Block:
    """A removable residual block: its module path, what replaces it (``"relu"`` or ``"identity"``) and its MACs."""

    name: str
    replacement: str
    macs: int = 0


@dataclass
class DepthResult:
    """A depth-pruned model, the blocks removed in order, and the score of each when it went."""

    model: nn.Module
    removed: list[str]
    scores: dict[str, float]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    candidates: list[str] = field(default_factory=list)
    probes: int = 0

    def summary(self) -> dict:
        """JSON-ready counts, the removed blocks and their scores."""
        return {"removed_blocks": list(self.removed), "block_scores": dict(self.scores),
                "candidate_blocks": list(self.candidates), "probes": self.probes,
                "params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "macs_ratio": self.macs_after / max(self.macs_before, 1),
                "params_ratio": self.params_after / max(self.params_before, 1)}


def _identity_like(gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> bool:
    """Whether ``node`` is ``x`` itself or ``x`` passed through modules that return it unchanged."""
    from .trace import pad_types

    while node is not x:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            return False
        m = gm.get_submodule(node.target)
        same_pad = (isinstance(m, pad_types()) and m.stride == 1 and m.in_channels == m.out_channels
                    and getattr(m, "sources", None) in (None, list(range(m.out_channels))))
        if not (isinstance(m, nn.Identity) or (isinstance(m, nn.Sequential) and len(m) == 0) or same_pad):
            return False
        node = node.args[0]
    return True


def _residual_form(module: nn.Module) -> str | None:
    """``"relu"`` / ``"identity"`` when ``module`` computes ``relu(x + f(x))`` / ``x + f(x)``, else None."""
    from .trace import _Tracer

    try:
        gm = fx.GraphModule(module, _Tracer(set()).trace(module))
    except Exception:  # fx fails in many ways on dynamic code; such a module is simply not a candidate
        return None
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    outputs = [n for n in nodes if n.op == "output"]
    if len(inputs) != 1 or len(outputs) != 1 or not isinstance(outputs[0].args[0], fx.Node):
        return None
    x, out = inputs[0], outputs[0].args[0]
    form = "identity"
    is_relu = ((out.op == "call_module" and type(gm.get_submodule(out.target)) is nn.ReLU)
               or (out.op == "call_function" and out.target in _RELUS)
               or (out.op == "call_method" and out.target in ("relu", "relu_")))
    if is_relu and out.args:
        form, out = "relu", out.args[0]
    if not isinstance(out, fx.Node):
        return None
    add = ((out.op == "call_function" and out.target in _ADDS)
           or (out.op == "call_method" and out.target in ("add", "add_")))
    if (not add or len(out.args) != 2 or out.kwargs or len(out.users) != 1
            or not all(isinstance(a, fx.Node) for a in out.args)):
        return None
    a, b = out.args
    if _identity_like(gm, a, x) == _identity_like(gm, b, x):  # exactly one operand must be the shortcut
        return None
    return form


def find_blocks(model: nn.Module, example_input: torch.Tensor) -> list[Block]:
    """Removable residual blocks of ``model``, outermost first, with their MACs (see the module docstring).

    A candidate must keep its input's shape on ``example_input``; a block nested inside another
    candidate is listed too, but :func:`prune_blocks` never removes both.
    """
    from ..profile import profile

    shapes: dict[str, tuple] = {}
    hooks = []
    forms = {}
    for name, m in model.named_modules():
        if not name or type(m).__module__.startswith("torch.nn"):
            continue
        form = _residual_form(m)
        if form is None:
            continue
        forms[name] = form

        def hook(mod, args, output, name=name):
            if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                shapes.setdefault(name, (tuple(args[0].shape), tuple(output.shape)))
        hooks.append(m.register_forward_hook(hook))
    hooked_forward(model, example_input, hooks)
    prof = profile(model, example_input)
    blocks = []
    for name, form in forms.items():
        if name not in shapes or shapes[name][0] != shapes[name][1]:
            continue
        macs = sum(r.macs for r in prof.layers if r.name == name or r.name.startswith(name + "."))
        blocks.append(Block(name, form, macs))
    return blocks


def remove_blocks(model: nn.Module, blocks: Iterable[Block], inplace: bool = False) -> nn.Module:
    """Replace each block by what it computes with its residual branch at zero (``nn.ReLU()`` or ``nn.Identity()``)."""
    m = model if inplace else copy.deepcopy(model)
    for b in blocks:
        parent, _, attr = b.name.rpartition(".")
        owner = m.get_submodule(parent) if parent else m
        # not inplace: the block's input may have other readers
        setattr(owner, attr, nn.ReLU() if b.replacement == "relu" else nn.Identity())
    return m


def prune_blocks(model: nn.Module, example_input: torch.Tensor, loader: Iterable, config: DepthConfig | None = None,
                 *, device: str | torch.device = "cpu", inplace: bool = False, **options) -> DepthResult:
    """Remove the residual blocks whose loss on held-out data rises least per MAC saved (Veit et al., NeurIPS 2016).

    Stops once the profiled MACs are at most ``target_macs`` of the original, or after ``count``
    blocks (one of the two is required). ``loader`` yields ``(input, label)`` batches of
    held-out data (use the validation split); the first ``batches`` of them score every probe.
    ``scoring``: ``"greedy"`` re-scores every remaining block after each removal (``n`` probes
    per removal); ``"lazy"`` gives the same picks when removing a block never makes another one
    cheaper to remove, at a fraction of the probes (Minoux's lazy greedy, as in CELF: an old
    score is a lower bound, so only the front of the ranking is re-probed); ``"once"`` ranks
    once on the input model (``n`` probes in all). Blocks named in ``protected`` (or inside one)
    stay. Raises if the target cannot be met by removing every candidate.

    Args:
        model: a network with residual blocks (left untouched unless ``inplace``).
        example_input: one input batch (shapes only).
        loader: held-out ``(input, label)`` batches.
        config: a :class:`~slimkit.prune.config.DepthConfig`, or keyword ``options`` building one.
        device: where the probes run.
        inplace: remove the blocks from ``model`` itself.

    Returns:
        A :class:`DepthResult` (model, removed blocks, scores, counts).

    Example:
        >>> import torch, slimkit
        >>> m = slimkit.create_model("resnet20").eval()
        >>> batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))]
        >>> r = prune_blocks(m, torch.zeros(1, 3, 32, 32), batches, DepthConfig(count=2, batches=1))
        >>> len(r.removed)
        2
    """
    from ..profile import profile
    from ..train import evaluate
    from .sensitivity import first_batches

    if config is None:
        if isinstance(options.get("protected"), list):
            options["protected"] = tuple(options["protected"])
        config = DepthConfig(**options)
    elif options:
        raise SlimkitError(f"prune_blocks: give a DepthConfig or keyword options, not both ({', '.join(options)})")
    target_macs, count, batches, scoring, protected = (config.target_macs, config.count, config.batches,
                                                       config.scoring, config.protected)

    def loss(m: nn.Module) -> float:
        return evaluate(m, data, device=device)["loss"]

    base = profile(model, example_input)
    protected = tuple(protected)
    candidates = [b for b in find_blocks(model, example_input)
                  if not any(b.name == p or b.name.startswith(p + ".") for p in protected)]
    if not candidates:
        raise SlimkitError(f"prune_blocks: {type(model).__name__} has no removable residual block (a module computing "
                           "x + f(x) or relu(x + f(x)) with an identity shortcut and unchanged shape)")
    budget = None if target_macs is None else target_macs * base.macs
    if budget is not None and base.macs - sum(b.macs for b in _outermost(candidates)) > budget:
        raise SlimkitError(f"prune_blocks: removing all {len(candidates)} removable blocks leaves "
                           f"{1 - sum(b.macs for b in _outermost(candidates)) / base.macs:.3f} of the MACs, "
                           f"above target_macs={target_macs}")
    was_training = model.training
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    data = first_batches(loader, batches, "prune_blocks")
    removed: list[Block] = []
    scores: dict[str, float] = {}
    macs = base.macs
    ref = loss(work)
    probes = 0

    def probe(b: Block) -> tuple[float, float, Block]:
        nonlocal probes
        probes += 1
        v = loss(remove_blocks(work, [b]))
        # loss rise per share of the MACs saved: a cheap block must be much less useful to go first
        return (v - ref) / max(b.macs / base.macs, 1e-12), v, b

    ranking: list[tuple[float, float, Block]] = []  # (score, loss without the block, block)
    fresh: set[str] = set()  # the blocks whose score was probed on the current model
    while (budget is not None and macs > budget) or (count is not None and len(removed) < count):
        left = [b for b in candidates if not any(_inside(b.name, r.name) or _inside(r.name, b.name) for r in removed)]
        if not left:
            break
        if not ranking or scoring == "greedy":
            ranking, fresh = [probe(b) for b in left], {b.name for b in left}
        ranking = sorted((t for t in ranking if t[2] in left), key=lambda t: t[0])
        while scoring == "lazy" and ranking[0][2].name not in fresh:
            ranking[0] = probe(ranking[0][2])  # a stale score is re-probed until the front is fresh
            fresh.add(ranking[0][2].name)
            ranking.sort(key=lambda t: t[0])
        score, probed, pick = ranking[0]
        if scoring != "once":  # the probe was this very model: its loss is the next reference
            ref, fresh = probed, set()
        remove_blocks(work, [pick], inplace=True)
        removed.append(pick)
        scores[pick.name] = float(score)
        macs -= pick.macs
    work.train(was_training)
    after = profile(work, example_input)
    return DepthResult(work, [b.name for b in removed], scores, base.params, after.params, base.macs, after.macs,
                       [b.name for b in candidates], probes)


def _inside(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer + ".")


def _outermost(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if not any(o is not b and _inside(b.name, o.name) for o in blocks)]
