"""The sparsity methods: each a registered :class:`Sparsifier` whose ``run`` leaves masks on the model.

Every method ends with masks at exactly the target (per layer or global, with the edge rule of
:mod:`slimkit.sparse.masks`); they differ in how weights are scored and in what happens while the
model trains:

* ``magnitude``: smallest ``|w|``, one shot or ``rounds`` of prune + retrain (Han et al., NeurIPS 2015);
* ``obd``: Optimal Brain Damage saliency ``h_ii w^2 / 2``, the Hessian diagonal estimated by the
  empirical Fisher (LeCun et al., NeurIPS 1990), also in ``rounds``;
* ``agp``: magnitude masks raised on the cubic schedule while training (Zhu & Gupta 2017);
* ``dns``: dynamic network surgery (Guo et al., NeurIPS 2016): masked weights keep receiving their
  gradient (straight through), weights below the cut are pruned and weights that grow back past a
  higher cut are spliced in again, every ``every`` steps;
* ``iht``: iterative hard thresholding / dense-sparse-dense (Jin et al. 2016; Han et al., ICLR 2017):
  sparse and dense training phases alternate, ending sparse;
* ``l1``: an L1 penalty ``strength * sum|w|`` while training, then magnitude pruning and a masked
  retrain (Han et al. 2015 compare it with L2);
* ``l0``: hard-concrete gates per weight with the expected-L0 penalty (Louizos et al., ICLR 2018),
  pruned by gate probability at the end, then a masked retrain;
* ``sensitivity``: sensitivity-driven regularisation (Tartaglione et al., NeurIPS 2018): weights the
  loss is insensitive to decay towards zero, ``w -= lr * strength * w * max(0, 1 - S)``; here the
  sensitivity ``S`` is the loss gradient's magnitude relative to the layer's largest (the paper's
  output-Jacobian version needs one backward pass per output), then pruned and retrained.

Training methods split the epochs between a shaping phase and a masked retrain (penalties: a third
shaping, two thirds retraining);
``finetune(model, epochs, tag)`` is the caller's training (slimkit's fine-tune in the CLI and stages).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..registry import Registry
from .masks import Mask, attach, compute_masks, cubic, fisher_diagonal, gradual, prunable_layers, scores


@dataclass
class Job:
    """What a method works on: the model and its layers, the config, data and the caller's training."""

    model: nn.Module
    config: object  # a SparsifyConfig
    loader: Iterable | None
    finetune: Callable[[nn.Module, int, str], nn.Module] | None
    epochs: int
    scope: object = None  # the config's scope, or the sensitivity plan {layer: sparsity per unit of target}
    layers: list[tuple[str, nn.Module]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layers = prunable_layers(self.model)
        if self.scope is None:
            self.scope = self.config.scope

    def retrain(self, epochs: int, tag: str) -> None:
        if self.finetune is not None and epochs > 0:
            self.model = self.finetune(self.model, epochs, tag)
            self.layers = prunable_layers(self.model)

    def prune(self, score: dict[str, torch.Tensor], target: float) -> None:
        with torch.no_grad():
            attach(self.layers, compute_masks(self.layers, score, target, self.scope, self.config.edges))

    def magnitude(self) -> dict[str, torch.Tensor]:
        return scores("magnitude", self.layers, None)

    def split(self, shaping_share: float) -> tuple[int, int]:
        """Epochs of the shaping phase and of the masked retrain after it (at least one of shaping)."""
        shaping = max(1, math.ceil(self.epochs * shaping_share))
        return shaping, self.epochs - shaping


@dataclass(frozen=True)
class Sparsifier:
    """A registered sparsity method and its facts."""

    name: str
    paper: str
    uses_data: bool  # reads training batches to score weights
    needs_training: bool  # only works while the model trains (retraining epochs > 0)
    summary: str
    run: Callable[[Job], None]


SPARSIFIERS: Registry[Sparsifier] = Registry("sparsity method")


def _register(name: str, paper: str, uses_data: bool, needs_training: bool, summary: str):
    def deco(fn: Callable[[Job], None]) -> Callable[[Job], None]:
        SPARSIFIERS.register(name)(Sparsifier(name, paper, uses_data, needs_training, summary, fn))
        return fn

    return deco


def _rounds(job: Job, score: Callable[[Job], dict[str, torch.Tensor]]) -> None:
    c = job.config
    for r in range(1, c.rounds + 1):
        # rising sparsity: an equal fraction of the remaining weights goes in every round
        job.prune(score(job), 1 - (1 - c.sparsity) ** (r / c.rounds))
        job.retrain(job.epochs // c.rounds + (1 if r <= job.epochs % c.rounds else 0), f"round{r}")


@_register("magnitude", "Han et al., Learning both Weights and Connections for Efficient Neural Networks, "
           "NeurIPS 2015", False, False, "smallest |w| removed; `rounds` > 1 alternates pruning and retraining")
def magnitude(job: Job) -> None:
    _rounds(job, Job.magnitude)


@_register("obd", "LeCun, Denker & Solla, Optimal Brain Damage, NeurIPS 1990", True, False,
           "saliency h_ii w^2 / 2 with the Fisher diagonal as the Hessian estimate")
def obd(job: Job) -> None:
    _rounds(job, lambda j: scores("obd", j.layers, fisher_diagonal(j.model, j.loader, j.config.batches, j.layers)))


@_register("agp", "Zhu & Gupta, To prune, or not to prune: exploring the efficacy of pruning for model "
           "compression, ICLR-W 2018", False, True, "magnitude masks raised on a cubic schedule while training")
def agp(job: Job) -> None:
    c = job.config
    steps = job.epochs * len(job.loader)
    every = c.every or max(1, len(job.loader) // 8)
    job.prune(job.magnitude(), c.initial_sparsity)
    stop = gradual(job.model, job.layers, steps, every,
                   lambda t: cubic(t, steps, c.initial_sparsity, c.sparsity, c.ramp), job.scope, c.edges)
    try:
        job.retrain(job.epochs, "agp")
    finally:
        stop()
    job.prune(job.magnitude(), c.sparsity)  # exactly the target, whatever the step count came to


# -- dynamic network surgery ------------------------------------------------------------------------

class SurgeryMask(Mask):
    """``weight * mask`` forward, but the gradient reaches every weight (Guo et al. 2016): pruned ones can return."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        masked = weight * self.mask.to(weight.dtype)
        return weight + (masked - weight).detach()


def _underlying(job: Job) -> dict[str, torch.Tensor]:
    """``|w|`` of the weights that keep training under the surgery masks (DNS scores those, masked or not)."""
    return {n: m.parametrizations.weight.original.detach().abs() for n, m in job.layers}


def _surgery_step(job: Job) -> None:
    c = job.config
    with torch.no_grad():
        w = _underlying(job)
        cut = compute_masks(job.layers, w, c.sparsity, job.scope, c.edges)  # above a: may stay
        splice = compute_masks(job.layers, w, c.sparsity + c.splice_margin * (1 - c.sparsity), job.scope, c.edges)
        for n, m in job.layers:
            mask = m.parametrizations.weight[0].mask
            mask.copy_(torch.maximum(splice[n], cut[n] * mask))  # above b: spliced back in


@_register("dns", "Guo, Yao & Chen, Dynamic Network Surgery for Efficient DNNs, NeurIPS 2016", False, True,
           "prune below a cut and splice back above a higher one while all weights keep training")
def dns(job: Job) -> None:
    c = job.config
    every = c.every or max(1, len(job.loader) // 8)
    with torch.no_grad():
        masks = compute_masks(job.layers, job.magnitude(), c.sparsity, job.scope, c.edges)
    for n, m in job.layers:
        parametrize.register_parametrization(m, "weight", SurgeryMask(masks[n]))
    counter = {"step": 0}

    def hook(module: nn.Module, args) -> None:
        if module.training:
            counter["step"] += 1
            if counter["step"] % every == 0:
                _surgery_step(job)

    handle = job.model.register_forward_pre_hook(hook)
    try:
        job.retrain(job.epochs, "dns")
    finally:
        handle.remove()
    with torch.no_grad():  # the final cut at exactly the target, on the weights as trained
        final = compute_masks(job.layers, _underlying(job), c.sparsity, job.scope, c.edges)
        for n, m in job.layers:
            m.parametrizations.weight[0].mask.copy_(final[n])


# -- iterative hard thresholding / dense-sparse-dense ------------------------------------------------

@_register("iht", "Jin et al., Training Skinny Deep Neural Networks with Iterative Hard Thresholding Methods, "
           "2016; Han et al., DSD: Dense-Sparse-Dense Training, ICLR 2017", False, True,
           "sparse and dense training phases alternate (cycles), ending sparse")
def iht(job: Job) -> None:
    c = job.config
    phases = 2 * c.cycles + 1
    for p in range(phases):
        epochs = job.epochs // phases + (1 if p < job.epochs % phases else 0)
        if p % 2 == 0:  # sparse phase: hard threshold of the current weights
            if p:  # the dense phase trained every weight: re-threshold from the unmasked ones
                for n, m in job.layers:
                    m.parametrizations.weight[0].mask.fill_(1.0)
            job.prune(job.magnitude(), c.sparsity)
            job.retrain(epochs, f"sparse{p // 2 + 1}")
        else:  # dense phase: the pruned weights start from zero and train again
            with torch.no_grad():
                for n, m in job.layers:
                    original = m.parametrizations.weight.original
                    original.mul_(m.parametrizations.weight[0].mask)
                    m.parametrizations.weight[0].mask.fill_(1.0)
            job.retrain(epochs, f"dense{p // 2 + 1}")


# -- penalties: L1, L0 gates, sensitivity ------------------------------------------------------------

def _penalise(job: Job, add: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    """Add ``add(weight, grad)`` to every layer weight's gradient after it is accumulated (any training loop)."""
    handles = []
    for _, m in job.layers:
        p = m.weight

        def hook(param: torch.Tensor) -> None:
            if param.grad is not None:
                param.grad.add_(add(param.detach(), param.grad))

        handles.append(p.register_post_accumulate_grad_hook(hook))
    return lambda: [h.remove() for h in handles]


def _shape_then_retrain(job: Job, add: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tag: str) -> None:
    shaping, rest = job.split(1 / 3)
    stop = _penalise(job, add)
    try:
        job.retrain(shaping, tag)
    finally:
        stop()
    job.prune(job.magnitude(), job.config.sparsity)
    job.retrain(rest, f"{tag}-retrain")


@_register("l1", "Han et al., Learning both Weights and Connections, NeurIPS 2015 (L1 regularisation)", False, True,
           "an L1 penalty while training, then magnitude pruning and a masked retrain")
def l1(job: Job) -> None:
    strength = job.config.penalty
    _shape_then_retrain(job, lambda w, g: strength * torch.sign(w), "l1")


@_register("sensitivity", "Tartaglione et al., Learning Sparse Neural Networks via Sensitivity-Driven "
           "Regularization, NeurIPS 2018", False, True,
           "weights the loss is insensitive to decay to zero, then pruning and a masked retrain")
def sensitivity(job: Job) -> None:
    strength = job.config.penalty

    def add(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        s = g.abs() / g.abs().max().clamp(min=1e-12)
        return strength * w * (1 - s).clamp(min=0)

    _shape_then_retrain(job, add, "sensitivity")


BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1  # Louizos et al. 2018: temperature and the stretch interval


class HardConcreteGate(nn.Module):
    """``weight * z`` with a hard-concrete gate ``z`` per weight (Louizos et al. 2018); ``log_alpha`` trains."""

    def __init__(self, shape: torch.Size, init: float = 3.0) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full(shape, init))

    def gate(self) -> torch.Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / BETA)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def p_open(self) -> torch.Tensor:
        """The probability that the gate is non-zero: the expected L0 norm per weight."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gate()


@_register("l0", "Louizos, Welling & Kingma, Learning Sparse Neural Networks through L0 Regularization, ICLR 2018",
           False, True, "hard-concrete gates with an expected-L0 penalty, pruned by the gated weights' magnitude")
def l0(job: Job) -> None:
    strength = job.config.penalty
    gates = {}
    for n, m in job.layers:
        gates[n] = HardConcreteGate(m.weight.shape)
        parametrize.register_parametrization(m, "weight", gates[n])
    def penalty(p: torch.Tensor) -> None:
        # the gradient of strength * p_open, added after the loss's own
        if p.grad is not None:
            s = torch.sigmoid(p.detach() - BETA * math.log(-GAMMA / ZETA))
            p.grad.add_(strength * s * (1 - s))

    handles = [g.log_alpha.register_post_accumulate_grad_hook(penalty) for g in gates.values()]
    shaping, rest = job.split(1 / 3)
    try:
        job.retrain(shaping, "l0")
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        score, gated = {}, {}
        for n, m in job.layers:
            gates[n].eval()
            z = gates[n].gate()
            w = m.parametrizations.weight.original.detach()
            # ranked by the gated weight's magnitude: the gates' verdict and the weight's size together (on a
            # short budget most gates are still open and the ranking falls back to magnitude)
            score[n] = (w * z).abs() + 1e-12 * gates[n].p_open()
            gated[n] = torch.where(z > 0, w * z, w)
        for n, m in job.layers:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            m.weight.copy_(gated[n])
        job.layers = prunable_layers(job.model)
    job.prune(score, job.config.sparsity)
    job.retrain(rest, "l0-retrain")
