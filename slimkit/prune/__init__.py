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

from ..pipeline import Context, register_stage
from . import dcp  # noqa: F401  (registers the dcp criterion)
from .config import DepthConfig, PruneConfig, SensitivityConfig, SparsityConfig
from .depth import Block, DepthResult, find_blocks, prune_blocks, remove_blocks
from .graph import ChannelGraph, Group, LayerRecord, build_graph
from .importance import (
    CRITERIA,
    Criterion,
    compute_importance,
    criteria_needing_data,
    register_criterion,
    slimming_penalty,
    sparsity_term,
    ssl_penalty,
)
from .latency import LatencyTable, plan_latency
from .pruner import PrunedPadShortcut, PruneResult, apply_plan, estimate, plan, prune, prune_once
from .reconstruct import reconstruct_mode, reconstruct_weights  # registers thinet, lasso
from .sensitivity import Sensitivity, held_out_loader, sensitivity_ratios, sensitivity_scan

__all__ = ["Block", "CRITERIA", "ChannelGraph", "Criterion", "DepthConfig", "DepthResult", "Group", "LatencyTable",
           "LayerRecord", "PruneConfig", "PruneResult", "PrunedPadShortcut", "Sensitivity", "SensitivityConfig",
           "SparsityConfig", "apply_plan", "build_graph", "compute_importance", "criteria_needing_data", "estimate",
           "find_blocks", "held_out_loader", "plan", "plan_latency", "prune", "prune_blocks", "prune_blocks_stage",
           "prune_once", "prune_stage", "reconstruct_mode", "reconstruct_weights", "register_criterion",
           "remove_blocks", "sensitivity_ratios", "sensitivity_scan", "slimming_penalty", "sparsity_term",
           "ssl_penalty"]


@register_stage("prune", config=PruneConfig, paper="Li et al. 2017; Molchanov et al. 2019; Fang et al. 2023 (DepGraph)",
                example={"target_macs": 0.6, "round_to": 4})
def prune_stage(model: nn.Module, ctx: Context, config: PruneConfig) -> nn.Module:
    """Structured channel pruning (criteria of Li et al. 2017, Molchanov et al. 2017/2019, Liu et al. 2017,
    Wen et al. 2016, Luo et al. 2017, He et al. 2017, Zhuang et al. 2018, Fang et al. 2023).

    :func:`prune` on the context's data: training batches for the data-driven criteria, the
    weight reconstruction, ``sparsity`` pre-training and the fine-tunes between ``steps``
    (``step_finetune``, default one epoch at lr 0.01), the validation split for ``sensitivity``.
    The kept channel indices go into the stage's provenance and ``kept_channels.json`` in the
    stage folder.
    """
    import json
    import os

    import torch

    from ..artifact import atomic_write_text
    from ..train.config import FitConfig

    if config.steps > 1 and config.step_finetune is None:
        config = config.replace(step_finetune=FitConfig(epochs=1, lr=0.01))
    x = torch.zeros(1, *ctx.data.info.input_size, device=ctx.device)
    # each training run gets its own checkpoint folder: a shared one would be "resumed" by the
    # next run with a model of another shape
    result = prune(model, x, config, loader=ctx.data.loader("train", ctx.batch_size, seed=ctx.seed),
                   val_loader=held_out_loader(ctx.data, ctx.batch_size, ctx.seed) if config.sensitivity else None,
                   inplace=True, seed=ctx.seed, device=ctx.device, checkpoint_dir=ctx.stage_dir("prune"),
                   progress=ctx.progress)
    result.model.slimkit_prune = {"kept": result.kept, **result.summary(),
                                  **({"sensitivity": result.sensitivity, "ratios": result.ratios}
                                     if result.sensitivity else {})}
    ctx.details.update(result.model.slimkit_prune)  # kept indices go into the artifact's provenance
    atomic_write_text(os.path.join(ctx.stage_dir("prune"), "kept_channels.json"),
                      json.dumps(result.model.slimkit_prune, indent=1))
    return result.model


@register_stage("prune_blocks", config=DepthConfig, paper="Veit et al., NeurIPS 2016",
                example={"count": 1, "batches": 1, "scoring": "once"})
def prune_blocks_stage(model: nn.Module, ctx: Context, config: DepthConfig) -> nn.Module:
    """Remove whole residual blocks (depth pruning; Veit et al., NeurIPS 2016).

    :func:`prune_blocks`, the blocks scored on ``batches`` batches of the validation split
    (:func:`held_out_loader`); ``target_macs`` is a fraction of this stage's input model. The
    removed blocks and their scores go into the stage's provenance and ``removed_blocks.json``
    in the stage folder. Follow it with a ``prune`` stage to thin the remaining layers too.
    """
    import json
    import os

    import torch

    from ..artifact import atomic_write_text

    x = torch.zeros(1, *ctx.data.info.input_size, device=ctx.device)
    result = prune_blocks(model, x, held_out_loader(ctx.data, ctx.batch_size, ctx.seed), config, device=ctx.device,
                          inplace=True)
    ctx.details.update(result.summary())
    atomic_write_text(os.path.join(ctx.stage_dir("prune_blocks"), "removed_blocks.json"),
                      json.dumps(result.summary(), indent=1))
    return result.model
