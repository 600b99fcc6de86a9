"""Which families a target calls for, and how the time budget is shared out (printed first, recorded).

* ``latency`` on a runtime: the search over channel keep ratios and residual blocks, with each
  candidate's latency taken from a per-layer table measured on that runtime and the finalists
  timed whole; the searched model timed as it will be delivered (int8 included) and searched again at a
  budget tightened by the shortfall when it misses; a KD fine-tune from the original; int8 when that
  runtime runs it measurably faster and accuracy holds; export and verification in the runtime.
* ``macs``: the same search under a MAC budget (counted, so no timing), and beside it low-rank
  decomposition (Tucker-2, Kim et al. 2016) with ranks allocated to the same budget and re-fitted
  layer by layer; both get the same short KD pilot and the better on validation is fine-tuned with
  KD (on thin CIFAR ResNets decomposition keeps more accuracy at half the MACs, pruning is what runs
  faster: docs/decompose.md). int8 does not change MACs, so it is not applied.
* ``size``: Deep Compression (Han et al., ICLR 2016): global magnitude sparsity and per-layer k-means
  weight sharing, each retrained with KD, stored as a packed file (sparse indices, codebooks,
  Huffman); the sparsity and bits are chosen by packing candidates for real and keeping the one
  that fits with the best validation accuracy.

The time budget: the fine-tune's epochs are what the budget leaves after the search, at the
training speed measured on a few batches; the search gets its share as a deadline.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from .config import CompressConfig
from .search_step import RESEARCH_SHARE

SEARCH_SHARE = 0.35  # of the time budget; the fine-tune gets FINETUNE_SHARE, the rest measures, exports, reports
FINETUNE_SHARE = 0.5
SIZE_FINETUNE_SHARE = 0.75  # a size target has no search: the sparse and shared retraining get most of it
MAX_EPOCHS = 40
PILOT_EPOCHS = 1  # of a MACs target's fine-tune: each candidate (pruned, decomposed) gets this many before the choice


def epoch_seconds(model: nn.Module, data, batch_size: int = 128, steps: int = 3) -> float:
    """Seconds of one KD training epoch of ``model`` (teacher forward + student step), timed on a few batches."""
    loader = data.loader("train", batch_size, seed=0)
    student = copy.deepcopy(model).train().requires_grad_(True)  # the model may be a frozen teacher elsewhere
    teacher = model.eval()
    opt = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    times = []
    batches = iter(loader)
    for _ in range(steps + 1):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        t0 = time.perf_counter()
        with torch.no_grad():
            teacher(x)
        loss = torch.nn.functional.cross_entropy(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * len(loader)


INT8_MARGIN = 0.9  # int8 gains less on a pruned (thinner, less compute-bound) model than on the original


def int8_ratios(model: nn.Module, data, example: torch.Tensor, runtime: str, batch_sizes, threads: int,
                seed: int = 0) -> dict[int, float] | None:
    """int8 / float latency of ``model`` itself in ``runtime`` per batch size (measured interleaved), or None
    when it does not quantize there."""
    from ..errors import SlimkitError
    from ..quant import calibration_loader, quantize
    from ..search.evaluate import measured_ratios

    try:
        q = quantize(model, calibration_loader(data, 256, 64, seed))
        return measured_ratios(model, q, example, runtime, batch_sizes, threads)
    except SlimkitError:
        return None


def make_plan(model: nn.Module, config: CompressConfig, example: torch.Tensor, data, threads: int = 1) -> dict:
    """The plan for ``config``'s target on ``model``: families, steps, why, and the share of the time budget.

    Example:
        >>> import slimkit
        >>> from slimkit.data import load
        >>> p = make_plan(slimkit.create_model("digits_cnn"), CompressConfig(target="size=0.1", time_budget="60s"),
        ...               torch.zeros(1, 1, 8, 8), load("digits"))
        >>> p["steps"][:3]
        ['sparsity', 'sparsify', 'share']
    """
    from ..progress import duration
    from ..prune import find_blocks
    from ..search import INT8_FASTER

    kind, fraction = config.kind, config.fraction
    budget = config.seconds
    per_epoch = epoch_seconds(model, data)
    blocks = len(find_blocks(model.eval(), example)) if kind != "size" else 0
    plan = {"target": config.target, "kind": kind, "fraction": fraction, "runtime": config.runtime,
            "batch_sizes": list(config.batch_sizes), "time_budget_s": budget, "epoch_seconds": per_epoch}
    if kind == "size":
        from ..sparse.sizes import SPARSE_EPOCH_SHARE

        epochs = config.finetune_epochs if config.finetune_epochs is not None else _epochs(
            budget * SIZE_FINETUNE_SHARE, per_epoch)
        sparse_epochs = max(1, round(epochs * SPARSE_EPOCH_SHARE)) if epochs else 0
        plan.update(families=["sparsity", "sharing", "huffman", "kd"],
                    steps=["sparsity", "sparsify", "share", "pack", "export", "measure", "report"],
                    finetune_epochs=epochs, sparse_epochs=sparse_epochs, share_epochs=max(epochs - sparse_epochs, 0),
                    why=[f"a size target: the bytes on disk are what count, and Deep Compression's sparsity + "
                         f"sharing + Huffman coding shrinks a CNN file 10-50x (structure-preserving pruning and "
                         f"int8 stop near 4x); sparsity and codebook bits are chosen by packing candidates to reach "
                         f"{fraction:g} of the original file",
                         f"each step retrained with KD from the original, {epochs} epochs in all "
                         f"(~{duration(per_epoch)} each, measured here)"])
        return plan
    search_s = budget * SEARCH_SHARE
    epochs = config.finetune_epochs if config.finetune_epochs is not None else _epochs(budget * FINETUNE_SHARE,
                                                                                         per_epoch)
    int8 = kind == "latency" and config.quantize != "never" and config.runtime != "compile"
    search_fraction, ratios = fraction, None
    if int8:
        # int8 and pruning multiply: the search only needs to find what int8 will not give, so its budget is the
        # target over int8's measured gain on this model (the weakest batch size), with a margin
        ratios = int8_ratios(model, data, example, config.runtime, config.batch_sizes, threads, config.seed)
        if ratios and max(ratios.values()) < INT8_FASTER:
            search_fraction = min(0.95, fraction / max(ratios.values()) * INT8_MARGIN)
    families = ["channels"] + (["blocks"] if blocks else []) + (["int8"] if int8 else []) + ["kd"]
    why = [f"a {kind} target on {config.runtime if kind == 'latency' else 'the counted MACs'}: structured pruning "
           "keeps dense layers, so what it removes is time on every runtime; the search chooses per-group channel "
           "keep ratios" + (f" and which of the {blocks} residual blocks to remove" if blocks else "")
           + (f", each candidate's latency from a per-layer table measured on {config.runtime} at batch "
              f"{', '.join(map(str, config.batch_sizes))}, the finalists timed whole" if kind == "latency" else ""),
           f"KD fine-tune from the original, {epochs} epochs (~{duration(per_epoch)} each, measured here)"]
    if int8 and search_fraction != fraction:
        why.append(f"int8 runs this model {1 / max(ratios.values()):.2f}x faster in {config.runtime} (measured, "
                   f"weakest batch size), so the search aims at {search_fraction:.3f} of the float latency and int8 "
                   f"makes up the rest; int8 is kept if it measures at least 10% faster on the result and validation "
                   "accuracy holds")
    elif int8:
        why.append(f"int8 if {config.runtime} runs it at least 10% faster (measured) and validation accuracy holds"
                   + ("" if ratios is None else f" (on the original it measured "
                      f"{', '.join(f'bs{b} {r:.2f}x' for b, r in ratios.items())} the float latency)"))
    elif kind == "latency":
        why.append(f"no int8: {'--quantize never' if config.quantize == 'never' else config.runtime} "
                   + ("was asked" if config.quantize == "never" else "has no int8 path in slimkit"))
    if kind == "latency":
        as_int8 = " (int8 where it gains)" if int8 else ""
        why.append(f"the searched model is then timed whole as it will be delivered{as_int8}; "
                   f"if it misses the target, the search runs again at a budget tightened by the shortfall "
                   f"({RESEARCH_SHARE:.0%} of the search time is kept for it)")
    steps = ["search", "finetune", "quantize", "export", "measure", "report"]
    pilot = 0
    if kind == "macs":
        pilot = min(PILOT_EPOCHS, epochs)
        families.insert(-1, "decomposition")
        steps[1:1] = ["decompose", "choose"]
        why.insert(1, "beside the search, low-rank decomposition (Tucker-2, Kim et al. 2016) with ranks allocated to "
                      f"{fraction:g} of the MACs and re-fitted layer by layer; "
                      + (f"both get the same {pilot}-epoch KD pilot and the better on validation continues"
                         if pilot else "the better on validation before any fine-tune continues")
                      + " (decomposition often keeps more accuracy per MAC; pruning is what runs faster)")
    plan.update(families=families, steps=steps, pilot_epochs=pilot,
                search_seconds=None if config.trials else search_s, trials=config.trials,
                search_fraction=search_fraction,
                int8_ratios=None if ratios is None else {str(b): r for b, r in ratios.items()},
                finetune_epochs=epochs, residual_blocks=blocks, int8=int8, why=why)
    return plan


def _epochs(seconds: float, per_epoch: float) -> int:
    return int(max(1, min(MAX_EPOCHS, seconds // max(per_epoch, 1e-6))))


def plan_text(plan: dict) -> str:
    """The plan as the lines printed before any work starts."""
    from ..progress import duration

    lines = [f"plan for {plan['target']} (time budget {duration(plan['time_budget_s'])}): "
             + " -> ".join(plan["steps"])]
    lines += [f"  - {w}" for w in plan["why"]]
    return "\n".join(lines)
