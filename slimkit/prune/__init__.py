"""Structured channel pruning with a dependency graph: real smaller models, no masks.

::

    from slimkit.prune import prune
    r = prune(model, torch.zeros(1, 3, 32, 32), criterion="l1", target_macs=0.5)
    r.model          # a plain, smaller nn.Module
    r.kept           # {"layer1.0.conv1": {"in": [...], "out": [...]}, ...} w.r.t. the original
    r.summary()      # params/MACs before and after (profiler), warnings, unprunable layers

Whole residual blocks can be removed too (depth pruning, :mod:`slimkit.prune.depth`):
``prune_blocks(model, x, val_loader, target_macs=0.5)``.

See docs/prune.md for how channels are grouped (:mod:`slimkit.prune.graph`), the criteria
(:mod:`slimkit.prune.importance`; the data-driven reconstruction criteria and the least-squares
weight reconstruction in :mod:`slimkit.prune.reconstruct`) and the policies
(:mod:`slimkit.prune.pruner`).
"""

from __future__ import annotations

from torch import nn

from ..errors import SlimkitError
from ..pipeline import Context, register_stage, run_finetune
from .graph import ChannelGraph, Group, LayerRecord, build_graph
from .importance import CRITERIA, DATA_CRITERIA, compute_importance, slimming_penalty, sparsity_term, ssl_penalty
from .pruner import PrunedPadShortcut, PruneResult, apply_plan, estimate, plan, prune, prune_once
from . import dcp  # noqa: F401  (registers the dcp criterion)
from .reconstruct import RECONSTRUCT_MODES, reconstruct_mode, reconstruct_weights  # registers thinet, lasso
from .sensitivity import Sensitivity, held_out_loader, sensitivity_ratios, sensitivity_scan
from .depth import Block, DepthResult, find_blocks, prune_blocks, remove_blocks
from .latency import LatencyTable, plan_latency

__all__ = ["Block", "DepthResult", "LatencyTable", "plan_latency", "find_blocks", "prune_blocks", "prune_blocks_stage", "remove_blocks", "CRITERIA", "DATA_CRITERIA", "RECONSTRUCT_MODES", "ChannelGraph", "Group", "LayerRecord", "PruneResult",
           "PrunedPadShortcut", "apply_plan", "build_graph", "compute_importance", "estimate", "plan", "prune",
           "prune_once", "prune_stage", "reconstruct_mode", "reconstruct_weights", "Sensitivity", "held_out_loader", "sensitivity_ratios",
           "sensitivity_scan", "slimming_penalty", "sparsity_term", "ssl_penalty"]


@register_stage("prune")
def prune_stage(model: nn.Module, ctx: Context, criterion: str = "l1", target_macs: float | None = None,
                target_params: float | None = None, ratio: float | None = None, ratios: dict | None = None,
                round_to: int = 8, protected: list[str] | None = None, steps: int = 1, step_finetune: dict | None = None,
                batches: int = 8, sparsity: dict | None = None, reconstruct: bool | str | None = None,
                target_latency: float | None = None, latency_batch: int | list[int] = 1, latency_model: str = "measure",
                untie_shortcuts: bool = True, rounding: str = "floor",
                sensitivity: dict | None = None) -> nn.Module:
    """Recipe stage: structured pruning (criteria of Li et al. 2017, Molchanov et al. 2017/2019, Liu et al. 2017,
    Wen et al. 2016, Luo et al. 2017, He et al. 2017, Zhuang et al. 2018).

    Policy and criterion as :func:`prune`. ``steps`` > 1 prunes iteratively with
    ``step_finetune`` (fit options, default one epoch at lr 0.01) between steps; ``batches``
    training batches feed the data-driven criteria (:data:`DATA_CRITERIA`) and the weight
    reconstruction; ``sparsity: {epochs, lr, strength}`` first trains with the criterion's
    sparsity term (:func:`sparsity_term`: SSL's group lasso for ``ssl``, Network Slimming's L1 on
    batch-norm scales otherwise); ``reconstruct`` (see :func:`reconstruct_mode`; by default on
    for ``thinet`` and ``lasso``) re-solves the cut layers' weights against the unpruned model
    after the last step. ``sensitivity: {max_drop, steps, batches}`` sets per-group ratios from
    a sensitivity scan on the validation split (Li et al. 2017, :func:`sensitivity_ratios`): with
    ``target_macs`` the smallest drop threshold that meets it, else ``max_drop``. The kept
    channel indices are recorded in the stage's provenance and written to the stage folder.
    """
    import dataclasses
    import json
    import os

    import torch

    from ..artifact import atomic_write_text

    x = torch.zeros(1, *ctx.data.info.input_size, device=ctx.device)

    def sub(name: str) -> Context:
        # each training run gets its own checkpoint folder: a shared one would be "resumed" by the
        # next run with a model of another shape
        return dataclasses.replace(ctx, out_dir=os.path.join(ctx.stage_dir("prune"), name), stage_index=0)

    if sparsity:
        opts = dict(sparsity)
        strength = float(opts.pop("strength", 1e-4))
        name, term = sparsity_term(criterion, model, x, strength)
        run_finetune(model, sub("sparsity"), extra_losses={name: term}, **opts)
    kwargs = {}
    if criterion in DATA_CRITERIA or reconstruct_mode(criterion, reconstruct):
        kwargs = {"loader": ctx.data.loader("train", ctx.batch_size, seed=ctx.seed), "batches": batches,
                  "device": ctx.device, "seed": ctx.seed}
    elif criterion == "random":
        kwargs = {"seed": ctx.seed}

    def between(m: nn.Module, i: int) -> None:
        run_finetune(m, sub(f"step{i}"), **(step_finetune or {"epochs": 1, "lr": 0.01}))

    scan = None
    if sensitivity is not None:
        opts = dict(sensitivity)
        unknown = set(opts) - {"max_drop", "steps", "batches"}
        if unknown:
            raise SlimkitError(f"prune stage: unknown sensitivity option(s) {', '.join(sorted(unknown))} "
                               "(max_drop, steps, batches)")
        ratios, scan = sensitivity_ratios(model, x, held_out_loader(ctx.data, ctx.batch_size, ctx.seed),
                                          criterion=criterion, target_macs=target_macs, round_to=round_to,
                                          rounding=rounding, untie_shortcuts=untie_shortcuts,
                                          **{k: opts[k] for k in ("max_drop", "steps", "batches") if k in opts},
                                          **{k: v for k, v in kwargs.items() if k != "batches"})
        target_macs = None
    result = prune(model, x, criterion=criterion, target_macs=target_macs, target_params=target_params, ratio=ratio,
                   ratios=ratios, round_to=round_to, protected=tuple(protected or ()), steps=steps,
                   finetune=between, inplace=True, reconstruct=reconstruct, target_latency=target_latency,
                   latency_batch=tuple(latency_batch) if isinstance(latency_batch, list) else latency_batch,
                   latency_model=latency_model, untie_shortcuts=untie_shortcuts, rounding=rounding, **kwargs)
    result.model.slimkit_prune = {"kept": result.kept, **result.summary(),
                                  **({"sensitivity": scan.to_dict(), "ratios": ratios} if scan else {})}
    ctx.details.update(result.model.slimkit_prune)  # kept indices go into the artifact's provenance
    atomic_write_text(os.path.join(ctx.stage_dir("prune"), "kept_channels.json"),
                      json.dumps(result.model.slimkit_prune, indent=1))
    return result.model


@register_stage("prune_blocks")
def prune_blocks_stage(model: nn.Module, ctx: Context, target_macs: float | None = None, count: int | None = None,
                       batches: int = 4, scoring: str = "greedy", protected: list[str] | None = None) -> nn.Module:
    """Recipe stage: remove whole residual blocks (depth pruning; Veit et al., NeurIPS 2016).

    Options as :func:`slimkit.prune.depth.prune_blocks`; the blocks are scored on ``batches``
    batches of the validation split (:func:`held_out_loader`). ``target_macs`` is a fraction of
    this stage's input model. The removed blocks and their scores go into the stage's provenance
    and ``removed_blocks.json`` in the stage folder. Follow it with a ``prune`` stage to thin
    the remaining layers too.
    """
    import json
    import os

    import torch

    from ..artifact import atomic_write_text

    x = torch.zeros(1, *ctx.data.info.input_size, device=ctx.device)
    result = prune_blocks(model, x, held_out_loader(ctx.data, ctx.batch_size, ctx.seed), target_macs=target_macs,
                          count=count, batches=batches, scoring=scoring, protected=tuple(protected or ()),
                          device=ctx.device, inplace=True)
    ctx.details.update(result.summary())
    atomic_write_text(os.path.join(ctx.stage_dir("prune_blocks"), "removed_blocks.json"),
                      json.dumps(result.summary(), indent=1))
    return result.model
