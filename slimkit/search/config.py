"""The options of the policy search, declared once: :class:`SearchConfig` (API, CLI, provenance)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import MethodConfig, option
from .study import SAMPLERS

SPACES = ("prune", "blocks", "rank", "bits", "sparsity", "share")
RUNTIMES = ("eager", "torchscript", "compile", "onnxruntime", "openvino")


def parse_duration(text: str | None) -> float | None:
    """``"2h"``, ``"30m"``, ``"90s"``, ``"1h30m"`` -> seconds (None stays None)."""
    if text is None:
        return None
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", str(text))
    if not parts or not any(parts.groups()):
        raise ValueError(f"a duration looks like 2h, 30m, 90s or 1h30m, got {text!r}")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    return h * 3600 + m * 60 + s


@dataclass(frozen=True)
class SearchConfig(MethodConfig):
    """Search a per-layer compression policy under a budget measured on the target runtime (docs/search.md).

    Example:
        >>> SearchConfig(target_latency=0.5, runtime="onnxruntime", batch_sizes=(1, 64)).sampler
        'tpe'
    """

    family = "search"

    target_latency: float | None = option(None, "latency budget: this fraction of the original's, measured on "
                                                "--runtime at every --batch-sizes", low=0, high=1,
                                          low_inclusive=False)
    target_macs: float | None = option(None, "MAC budget: this fraction of the original's", low=0, high=1,
                                       low_inclusive=False)
    target_params: float | None = option(None, "parameter budget: this fraction of the original's", low=0, high=1,
                                         low_inclusive=False)
    target_size: float | None = option(None, "size budget: this fraction of the original's bytes on disk, the "
                                             "candidate written as `slimkit pack` writes it (sparse indices, "
                                             "codebooks, Huffman) against the original's safetensors file",
                                       low=0, high=1, low_inclusive=False)
    runtime: str = option("eager", "the runtime the latency budget is measured on", choices=RUNTIMES)
    batch_sizes: tuple[int, ...] = option((1,), "batch sizes the latency budget holds at", low=1)
    threads: int = option(1, "runtime threads while timing", low=1)
    latency_model: str = option("table", "how a trial's latency is known: table (per-layer times measured on the "
                                         "runtime, fitted to a few whole-model measurements) or measure (every "
                                         "candidate timed whole: exact, a few seconds more per trial)",
                                choices=("table", "measure"))
    max_drop: float | None = option(None, "accuracy the final model may lose (a fraction: 0.005 = half a point); "
                                          "a larger loss is reported", low=0, high=1)
    trials: int = option(100, "trials in the study (all workers together)", low=1)
    time_budget: str | None = option(None, "stop the search after this long (2h, 30m, 90s), whatever the trials")
    space: tuple[str, ...] = option(("prune", "blocks"), "what is searched: prune (channel keep ratios), blocks "
                                                        "(residual blocks to remove), rank (Tucker-2 decomposition "
                                                        "rank per kxk conv, 1 = whole), bits (int8 or float per "
                                                        "conv/linear layer, timed whole on the runtime), sparsity "
                                                        "(fraction of each conv/linear layer's weights kept, by "
                                                        "magnitude), share (k-means codebook bits per layer, 2-8)",
                                  choices=SPACES)
    granularity: str = option("auto", "fine: a ratio per channel group; coarse: per stage; auto: fine up to 24 "
                                      "groups", choices=("auto", "fine", "coarse"))
    criterion: str = option("group_l1", "channel importance that decides which channels a ratio removes")
    round_to: int = option(8, "kept channel counts are multiples of this", low=1)
    sampler: str = option("tpe", "Optuna sampler", choices=SAMPLERS)
    seed: int = option(0, "sampler and data seed: one worker with one seed repeats its study exactly")
    study: str | None = option(None, "study name (default: from the model)")
    storage: str | None = option(None, "Optuna storage URL (default: a SQLite file in --out); postgresql://... "
                                       "lets workers on several machines join")
    workers: int = option(1, "worker processes on this machine", low=1)
    calib_batches: int = option(4, "training batches of 128 that re-estimate a candidate's batch norms", low=1)
    val_batches: int = option(4, "validation batches of 256 its accuracy proxy is taken on", low=1)
    trial_steps: int = option(0, "a short fine-tune of each candidate within budget: this many SGD steps, reported "
                                 "in two halves so Optuna's median pruner stops the ones falling behind", low=0)
    finalists: int = option(5, "best candidates measured whole on the runtime before one is chosen", low=1)
    warm_start: tuple[str, ...] = option(("uniform",), "trials enqueued first: uniform, sensitivity, depth, or a "
                                                       "results.json of an earlier search")
    finetune_epochs: int = option(0, "final fine-tune epochs with KD from the original (0: stop after the search "
                                     "with the policy applied)", low=0)
    finetune_procs: int = option(1, "processes of the final fine-tune (data-parallel under torchrun, gloo)", low=1)
    lr: float = option(0.01, "learning rate of the final fine-tune", low=0, low_inclusive=False)
    quantize: str = option("auto", "int8 after the fine-tune: auto (when the runtime runs it faster and accuracy "
                                   "holds), always, never; with --space bits the policy decides, layer by layer",
                           choices=("auto", "always", "never"))

    def validate(self) -> None:
        if not (self.target_latency or self.target_macs or self.target_params or self.target_size):
            raise self.error(None, "give a budget: {target_latency}, {target_macs}, {target_params} or "
                                   "{target_size}")
        try:
            parse_duration(self.time_budget)
        except ValueError as e:
            raise self.error("time_budget", str(e)) from None
        from ..prune.importance import CRITERIA

        if self.criterion not in CRITERIA:
            raise self.error("criterion", CRITERIA.unknown(self.criterion))
        if CRITERIA.get(self.criterion).needs_data:
            raise self.error("criterion", f"{self.criterion!r} needs training data for every candidate; the search "
                                          "ranks channels with a data-free criterion (l1, l2, group_l1, ...)")
        if "bits" in self.space and self.target_latency is None:
            raise self.error("space", "bits searches int8 per layer, which changes neither MACs nor parameters: it "
                                      "needs a latency budget ({target_latency})")
        if "bits" in self.space and self.runtime == "compile":
            raise self.error("space", "bits needs a runtime that runs int8 kernels: eager, torchscript, onnxruntime "
                                      "or openvino, not compile")
        weights = [s for s in ("sparsity", "share") if s in self.space]
        if weights and self.target_size is None:
            raise self.error("space", f"searching {' and '.join(weights)} changes only the bytes on disk (the "
                                      "layers stay dense for every runtime and MAC count): it needs a size "
                                      "budget ({target_size})")
        if weights and "bits" in self.space:
            raise self.error("space", "bits (int8 kernels) and sparsity/share (a packed file) make different "
                                      "models: search one or the other")
        if weights and self.quantize == "always":
            raise self.error("quantize", "int8 would re-quantize a shared-weight model's values and the packed file "
                                         "is what a size budget ships: not with sparsity or share")
        if weights and self.finetune_procs > 1:
            raise self.error("finetune_procs", f"the fine-tune of a {' and '.join(weights)} policy holds masks or "
                                               "codebooks in this process: use one process")
        for w in self.warm_start:
            if w not in ("uniform", "sensitivity", "depth") and not w.endswith(".json"):
                raise self.error("warm_start", f"{w!r} is not uniform, sensitivity, depth or a results.json")

    @property
    def seconds(self) -> float | None:
        return parse_duration(self.time_budget)
