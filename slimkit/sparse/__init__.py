"""Deep Compression in slimkit: unstructured sparsity, weight sharing, and a file that is as small as they allow.

::

    from slimkit.sparse import sparsify, SparsifyConfig, share, ShareConfig, pack
    r = sparsify(model, SparsifyConfig(sparsify="magnitude", sparsity=0.9), loader=train, finetune=tune, epochs=4)
    s = share(r.model, ShareConfig(conv_bits=5, linear_bits=4), finetune=tune, epochs=2)
    pack(s.model, "model.slimpack")            # sparse indices + codes + codebooks, Huffman/lzma coded
    slimkit.load("model.slimpack")             # the same model, bit for bit

Methods: :mod:`slimkit.sparse.masks` (which weights go, :data:`SPARSIFIERS`),
:mod:`slimkit.sparse.share` (k-means codebooks), :mod:`slimkit.sparse.pack` (the file),
:mod:`slimkit.sparse.coding` (Huffman, bits, lzma). ``finetune(model, epochs, tag)`` is the
retraining the caller supplies (the CLI and the recipe stages pass slimkit's fine-tune, with
distillation when asked); masks and shared codebooks hold while it runs, so zeros stay zeros and
shared values stay shared. See docs/sparse.md for the measurements.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from ..errors import SlimkitError
from .config import ShareConfig, SparsifyConfig
from .masks import bake, prunable_layers
from .methods import SPARSIFIERS, Sparsifier
from .pack import is_packed, pack, read_packed
from .share import bake_shared, kmeans_1d
from .sizes import size_table, sizes

__all__ = ["SPARSIFIERS", "ShareConfig", "ShareResult", "SparseResult", "SparsifyConfig", "Sparsifier", "bake",
           "finetuner", "is_packed", "kmeans_1d", "pack", "read_packed", "share", "share_stage", "size_table", "sizes",
           "sparsify",
           "sparsify_stage", "trainable_copy", "training_stage"]

Finetune = Callable[[nn.Module, int, str], nn.Module]


@dataclass
class SparseResult:
    """A sparse model (masks baked in) and its per-layer sparsity."""

    model: nn.Module
    layers: list[dict] = field(default_factory=list)
    sparsity: float = 0.0  # over the conv and linear weights
    edges: dict[str, float] = field(default_factory=dict)  # the first conv / classifier and their target
    scan: dict | None = None  # scope sensitivity: the scan, the plan and the accuracy drop it tolerates

    def summary(self) -> dict:
        out = {"sparsity": self.sparsity, "edges": self.edges, "layers": self.layers}
        if self.scan is not None:
            out["sensitivity"] = self.scan
        return out


def trainable_copy(model: nn.Module) -> nn.Module:
    """A CPU copy whose parameters all train, whatever the input's flags (a teacher is frozen, its copy must not be)."""
    out = copy.deepcopy(model).cpu()
    for p in out.parameters():
        p.requires_grad_(True)
    return out


def _check_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = prunable_layers(model)
    if not layers:
        raise SlimkitError("sparsify: the model has no conv or linear layer to sparsify")
    return layers


def sparsify(model: nn.Module, config: SparsifyConfig | None = None, *, loader: Iterable | None = None,
             finetune: Finetune | None = None, epochs: int = 0, val: Iterable | None = None,
             **options) -> SparseResult:
    """Zero ``config.sparsity`` of the conv and linear weights of a copy of ``model`` (:mod:`~.methods`).

    Args:
        model: a float model (left untouched).
        config: a :class:`SparsifyConfig`, or keyword ``options`` building one.
        loader: training batches ``(x, y)``: OBD's Fisher estimate; the training methods count its steps.
        finetune: ``finetune(model, epochs, tag)`` retrains with the masks held (required by the methods
            that prune while training: agp, dns, iht, l1, l0, sensitivity).
        epochs: retraining epochs in all (each method splits them as its docstring says).
        val: held-out batches for ``scope="sensitivity"``'s scan (default: ``loader``).

    Returns:
        A :class:`SparseResult`; its model has plain layers whose weights hold the zeros.

    Raises:
        SlimkitError: a method that needs data or training without it, or a model without conv/linear layers.

    Example (Han et al., NeurIPS 2015):
        >>> import torch, slimkit
        >>> r = sparsify(slimkit.create_model("digits_cnn"), SparsifyConfig(sparsity=0.8, scope="layer", edges="same"))
        >>> round(r.sparsity, 2), r.layers[0]["sparsity"] > 0.79
        (0.8, True)
    """
    from .masks import edge_layers, layer_targets, report
    from .methods import Job

    config = config if config is not None else SparsifyConfig.from_options(options)
    entry = SPARSIFIERS.get(config.method)
    if entry.uses_data and loader is None:
        raise SlimkitError(f"sparsify: method {config.method} needs training data (--data)")
    if entry.needs_training and (finetune is None or epochs < 1 or loader is None):
        raise SlimkitError(f"sparsify: method {config.method} prunes while training: give --data and "
                           "--finetune-epochs of at least 1")
    if config.scope == "sensitivity" and (val or loader) is None:
        raise SlimkitError("sparsify: scope sensitivity scans every layer on data: give --data")
    copied = trainable_copy(model)
    layers = _check_layers(copied)
    scope, scanned = config.scope, None
    if scope == "sensitivity":
        from .sensitivity import plan, scan

        scanned = scan(copied, val if val is not None else loader, batches=config.scan_batches)
        scope, tolerance = plan(scanned, config.sparsity, config.edges, copied)
        scanned.update(plan={n: f * config.sparsity for n, f in scope.items()}, tolerance=tolerance)
    fixed, _ = layer_targets(layers, config.sparsity, scope, config.edges)
    edges = {n: fixed[n] for n in edge_layers(layers) if n in fixed and config.edges != "same"}
    job = Job(copied, config, loader, finetune, epochs, scope=scope)
    entry.run(job)
    model = bake(job.model)
    rows, overall = report(prunable_layers(model))
    model.eval()
    return SparseResult(model, rows, overall, edges, scanned)


@dataclass
class ShareResult:
    """A shared-weight model (codebooks baked in) and per layer its bits and distinct values."""

    model: nn.Module
    layers: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {"layers": self.layers}


def share(model: nn.Module, config: ShareConfig | None = None, *, loader: Iterable | None = None,
          finetune: Finetune | None = None, epochs: int = 0, **options) -> ShareResult:
    """Cluster each conv/linear layer's non-zero weights into ``2**bits`` shared values (Han et al., ICLR 2016).

    Args:
        model: a float model, typically sparse (:func:`sparsify`); zeros stay zeros.
        config: a :class:`ShareConfig`, or keyword ``options`` building one.
        loader: training batches, for ``weighting="hessian"``.
        finetune: ``finetune(model, epochs, tag)`` retrains with the codes fixed: only centroids (and the
            layers that are not shared: BN, biases) move.
        epochs: centroid fine-tuning epochs.

    Returns:
        A :class:`ShareResult`; each shared layer's weight has at most ``2**bits`` distinct non-zero values.

    Example:
        >>> import slimkit
        >>> r = share(slimkit.create_model("digits_cnn"), ShareConfig(conv_bits=3, linear_bits=2, edge_bits=3))
        >>> all(row["values"] <= 2 ** row["bits"] for row in r.layers)
        True
    """
    import torch

    from .masks import edge_layers, fisher_diagonal
    from .share import attach_shared

    config = config if config is not None else ShareConfig.from_options(options)
    if config.weighting == "hessian" and loader is None:
        raise SlimkitError("share: weighting hessian needs training data (--data)")
    model = trainable_copy(model)
    layers = _check_layers(model)
    edges = edge_layers(layers)
    fisher = fisher_diagonal(model, loader, config.batches, layers) if config.weighting == "hessian" else {}
    bits = {n: config.bits_for(type(m).__name__, n in edges) for n, m in layers}
    for n, m in layers:
        attach_shared(m, bits[n], fisher=fisher.get(n), iterations=config.iterations, init=config.init)
    if finetune is not None and epochs:
        model = finetune(model, epochs, "share")
        layers = prunable_layers(model)
    bake_shared(model)
    rows = []
    for n, m in layers:
        w = m.weight.detach()
        rows.append({"name": n, "bits": bits[n], "edge": n in edges,
                     "values": int(torch.unique(w[w != 0]).numel()), "nnz": int((w != 0).sum()), "numel": w.numel()})
    model.eval()
    return ShareResult(model, rows)


def finetuner(ctx, recovery, teacher: nn.Module | None) -> Finetune | None:
    """The ``finetune(model, epochs, tag)`` of a recipe stage or command: slimkit's fine-tune as ``recovery`` says
    (with distillation from ``teacher``, the model before the stage, when ``recovery.distill`` is set and
    no other teacher is named), each call checkpointed in its own folder under the stage's."""
    import dataclasses

    from ..pipeline import recover

    if recovery is None:
        return None

    def run(model: nn.Module, epochs: int, tag: str) -> nn.Module:
        sub = dataclasses.replace(ctx, out_dir=os.path.join(ctx.out_dir, "sparse", tag))
        return recover(model, sub, dataclasses.replace(recovery, epochs=epochs), teacher)

    return run


from ..pipeline import register_stage  # noqa: E402  (the stages below need the functions above)


def training_stage(method: Callable, model: nn.Module, ctx, config, recovery) -> nn.Module:
    """Run ``method(model, config, loader=, finetune=, epochs=)`` as a recipe stage that trains while it holds
    its masks, codebooks or quantizers: the recipe's ``finetune:`` is that training (distilled from the model
    before the stage with ``distill``), and the method's summary goes into the stage's provenance."""
    teacher = model if recovery is not None and recovery.distill and not recovery.teacher else None
    result = method(model, config, loader=ctx.data.loader("train", ctx.batch_size, seed=ctx.seed),
                    finetune=finetuner(ctx, recovery, teacher), epochs=recovery.epochs if recovery else 0)
    ctx.details.update(result.summary())
    return result.model


@register_stage("sparsify", config=SparsifyConfig, trains=True,
                paper="Han et al. 2015; Zhu & Gupta 2017; LeCun et al. 1990; Guo et al. 2016; Jin et al. 2016; "
                      "Louizos et al. 2018; Tartaglione et al. 2018",
                example={"sparsify": "magnitude", "sparsity": 0.8})
def sparsify_stage(model: nn.Module, ctx, config: SparsifyConfig, recovery=None) -> nn.Module:
    """Unstructured sparsity (magnitude, AGP, OBD, DNS, IHT, L1, L0, sensitivity); the stage's ``finetune:``
    retrains with the masks held."""
    return training_stage(sparsify, model, ctx, config, recovery)


@register_stage("share", config=ShareConfig, trains=True, paper="Han et al. 2016; Choi et al. 2017",
                example={"conv_bits": 4, "linear_bits": 3})
def share_stage(model: nn.Module, ctx, config: ShareConfig, recovery=None) -> nn.Module:
    """Weight sharing by per-layer k-means; the stage's ``finetune:`` trains the centroids (codes fixed)."""
    return training_stage(share, model, ctx, config, recovery)
