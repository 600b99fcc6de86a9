"""The options of structured pruning, declared once: :class:`PruneConfig` (channels) and :class:`DepthConfig` (blocks).

The same objects are what :func:`slimkit.prune.prune` / :func:`slimkit.prune.prune_blocks` take, the
``prune`` / ``prune_blocks`` recipe stages' options, ``slimkit prune``'s flags and the provenance
record of a pruned artifact (see :mod:`slimkit.config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import MethodConfig, option
from ..train.config import FitConfig
from .importance import CRITERIA

ROUNDING = ("floor", "ceil")
LATENCY_MODELS = ("measure", "table")
RECONSTRUCT = ("auto", "none", "scale", "full")
SCORINGS = ("greedy", "lazy", "once")
POLICIES = ("target_macs", "target_params", "target_latency", "ratio", "ratios")


@dataclass(frozen=True)
class SensitivityConfig(MethodConfig):
    """Per-group ratios from a sensitivity scan on held-out data (Li et al., ICLR 2017).

    With the pruning's ``target_macs``: the smallest accuracy-drop threshold whose ratios meet
    it; else ``max_drop``, the top-1 drop allowed per group.
    """

    family = "sensitivity"

    max_drop: float | None = option(None, "top-1 drop allowed per group (with --sensitivity, instead of --target-macs)",
                                    low=0, high=1, flag="--max-drop")
    steps: tuple[float, ...] = option((0.25, 0.5, 0.75), "pruning ratios probed per group", low=0, high=1,
                                      high_inclusive=False)
    batches: int | None = option(None, "held-out batches each probe is evaluated on (default: the pruning's "
                                       "batches)", low=1)


@dataclass(frozen=True)
class SparsityConfig(FitConfig):
    """Train first with the criterion's sparsity term (SSL's group lasso for ``ssl``, else L1 on BN scales)."""

    family = "sparsity"

    strength: float = option(1e-4, "weight of the sparsity term", low=0)


@dataclass(frozen=True)
class PruneConfig(MethodConfig):
    """Structured channel pruning through a dependency graph (Li et al. 2017; Fang et al. 2023).

    Exactly one policy: ``target_macs``, ``target_params``, ``target_latency``, ``ratio`` and/or
    ``ratios``, or ``sensitivity`` (with ``target_macs`` or its ``max_drop``);
    ``target_latency`` may go with ``target_macs`` when ``latency_model="table"``. See
    :func:`slimkit.prune.prune` and docs/prune.md.

    Example:
        >>> PruneConfig(target_macs=0.5, criterion="group_l1").round_to
        8
        >>> PruneConfig.from_options({"target_mac": 0.5}, where="stage 2 (prune)")
        Traceback (most recent call last):
        ...
        slimkit.errors.SlimkitError: stage 2 (prune): unknown option 'target_mac' (did you mean 'target_macs'?)
    """

    family = "prune"

    criterion: str = option("l1", "channel importance", choices=CRITERIA)
    target_macs: float | None = option(None, "keep this fraction of the original MACs (e.g. 0.5)", low=0, high=1,
                                       low_inclusive=False)
    target_params: float | None = option(None, "keep this fraction of the original parameters", low=0, high=1,
                                         low_inclusive=False)
    target_latency: float | None = option(None, "keep this fraction of the original's measured eager latency on "
                                                "this machine (with latency_model table it may go with target_macs: "
                                                "both must hold)", low=0, high=1, low_inclusive=False)
    ratio: float | None = option(None, "uniform: remove this fraction of every group's channels", low=0, high=1,
                                 high_inclusive=False)
    ratios: dict[str, float] = option({}, "per-layer ratios for the group each named layer produces", cli=False)
    round_to: int = option(8, "keep channel counts multiples of this", low=1)
    rounding: str = option("floor", "round each group's kept width down (floor: Torch-Pruning's rule) or up (ceil)",
                           choices=ROUNDING)
    protected: tuple[str, ...] = option((), "layer names whose shape must not change (comma-separated)",
                                        flag="--protect")
    steps: int = option(1, "iterative pruning steps (fine-tuning in between)", low=1)
    untie_shortcuts: bool = option(True, "option-A ResNets: prune each stage's trunk on its own (shortcuts carry "
                                         "zeros); off keeps a stage-1 trunk channel and its copies together",
                                   invert_flag="--tie-shortcuts")
    latency_model: str = option("measure", "measure: bisect the global ranking timing each candidate; table: a "
                                           "measured per-layer latency table (NetAdapt/HALP)", choices=LATENCY_MODELS)
    latency_batch: int | tuple[int, ...] = option(1, "batch size(s) target_latency is timed at (several with the "
                                                     "table model, each must meet the target)", low=1)
    reconstruct: str | bool | None = option("auto",
                                            "least-squares reconstruction of the cut layers (auto: ThiNet's scale "
                                             "for thinet, He et al.'s full for lasso, none otherwise)",
                                     choices=RECONSTRUCT)
    batches: int = option(8, "training batches for the data-driven criteria and the weight reconstruction", low=1)
    criterion_options: dict[str, Any] = option({}, "the criterion's own options (aux_epochs of dcp, positions of "
                                                   "thinet, ...)", cli=False)
    sensitivity: SensitivityConfig | None = option(None, "per-group ratios from a sensitivity scan on the validation "
                                                         "split (Li et al. 2017)")
    sparsity: SparsityConfig | None = option(None, "train with the criterion's sparsity term before pruning",
                                             cli=False)
    step_finetune: FitConfig | None = option(None, "fine-tuning between iterative steps (default in the stage: one "
                                                   "epoch at lr 0.01)", cli=False)

    def validate(self) -> None:
        if self.criterion_options:
            import inspect

            params = inspect.signature(CRITERIA.get(self.criterion).score).parameters
            named = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - {"loader", "batches", "seed", "device"}
            unknown = sorted(set(self.criterion_options) - named)
            if unknown:
                raise self.error("criterion_options", f"criterion {self.criterion!r} takes no option "
                                 f"{', '.join(map(repr, unknown))} (its options: {', '.join(sorted(named)) or 'none'})")
        given = [n for n in POLICIES if getattr(self, n) not in (None, {})]
        batches = self.latency_batches
        if not batches:
            raise self.error("latency_batch", "give at least one batch size")
        if len(batches) > 1 and self.latency_model != "table":
            raise self.error("latency_batch", "with several batch sizes needs {latency_model}='table'")
        for layer, r in self.ratios.items():
            if not 0 <= r < 1:
                raise self.error(f"ratios[{layer}]", f"is the fraction of channels to remove, in [0, 1), got {r!r}")
        if self.sensitivity is not None:
            if (self.target_macs is None) == (self.sensitivity.max_drop is None):
                raise self.error("sensitivity", "takes exactly one of {target_macs} and its max_drop")
            others = [n for n in given if n != "target_macs"]
            if others:
                raise self.error("sensitivity", f"sets the ratios; it does not combine with {', '.join(others)}")
            return
        if not given:
            raise self.error(None, "give one of {target_macs}, {target_params}, {target_latency}, {ratio} or ratios")
        together = set(given) == {"target_macs", "target_latency"} and self.latency_model == "table"
        if len(given) > 1 and set(given) != {"ratio", "ratios"} and not together:
            raise self.error(None, "give only one policy, got " + ", ".join("{" + n + "}" for n in given)
                                   + (" ({target_macs} with {target_latency} needs {latency_model}='table')"
                                      if set(given) == {"target_macs", "target_latency"} else ""))

    @property
    def latency_batches(self) -> tuple[int, ...]:
        return self.latency_batch if isinstance(self.latency_batch, tuple) else (self.latency_batch,)

    @property
    def policy_given(self) -> bool:
        return any(getattr(self, n) not in (None, {}) for n in POLICIES) or self.sensitivity is not None


@dataclass(frozen=True)
class DepthConfig(MethodConfig):
    """Depth pruning: remove whole residual blocks, scored on held-out batches (Veit et al., NeurIPS 2016).

    Exactly one of ``target_macs`` (a fraction of the input model's MACs) and ``count``.

    Example:
        >>> DepthConfig(target_macs=0.5).scoring
        'greedy'
    """

    family = "prune_blocks"

    target_macs: float | None = option(None, "remove blocks until the MACs are at most this fraction of the input "
                                             "model", low=0, high=1, low_inclusive=False)
    count: int | None = option(None, "remove exactly this many blocks", low=0)
    batches: int = option(4, "held-out batches each block is scored on", low=1)
    scoring: str = option("greedy", "re-score every block after each removal (greedy), only the front of the "
                                    "ranking (lazy) or rank once", choices=SCORINGS)
    protected: tuple[str, ...] = option((), "blocks (or layers inside them) that stay", flag="--protect")

    def validate(self) -> None:
        if (self.target_macs is None) == (self.count is None):
            raise self.error(None, "give exactly one of {target_macs} (a fraction of the MACs) or {count}")
