"""Rank allocation across the network: which layers to decompose, at which rank, to meet one global budget.

Each decomposable layer has a list of candidate ranks, each with its cost (closed-form MACs or
parameters, or measured time) and an error estimate (the weight-space relative error of
:class:`~slimkit.decompose.methods.Decomposition`). Starting from every layer whole, the planner
repeatedly takes the move that adds the least error per unit of cost saved -- for one layer, the
step to whichever lower candidate has the best ratio (the lower convex hull of its error-cost
curve, so a layer can jump past ranks that save little) -- until the budget holds. A candidate that
costs no less than the whole layer (times ``1 - min_saving``) is never offered: such a layer stays
whole. This is the greedy of budgeted low-rank selection (as in Zhang et al. 2016's rank selection
and the pruner's latency planner, :mod:`slimkit.prune.latency`), with costs that are exact for
MACs and parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import SlimkitError


@dataclass
class Candidate:
    rank: object
    cost: float
    error: float


@dataclass
class LayerPlan:
    """One layer's options: its whole cost and the candidates, largest rank first."""

    name: str
    whole: float
    candidates: list[Candidate] = field(default_factory=list)
    choice: int = -1  # -1: whole

    @property
    def cost(self) -> float:
        return self.whole if self.choice < 0 else self.candidates[self.choice].cost

    @property
    def error(self) -> float:
        return 0.0 if self.choice < 0 else self.candidates[self.choice].error

    def best_move(self) -> tuple[float, int] | None:
        """(error added per unit saved, candidate index) of the best step down, or None."""
        best = None
        for j in range(self.choice + 1, len(self.candidates)):
            c = self.candidates[j]
            saved = self.cost - c.cost
            if saved <= 0:
                continue
            ratio = max(c.error - self.error, 0.0) / saved
            if best is None or ratio < best[0]:
                best = (ratio, j)
        return best


def allocate(layers: list[LayerPlan], fixed: float, budget: float, what: str) -> list[LayerPlan]:
    """Choose each layer's candidate so that ``fixed + sum(costs) <= budget`` with the least added error.

    Args:
        layers: the decomposable layers and their candidates.
        fixed: the cost of everything that is not one of these layers.
        budget: the total allowed.
        what: the budget's name for the error message (``MACs``).

    Raises:
        SlimkitError: no choice meets the budget (the message says the smallest reachable total).
    """
    total = fixed + sum(p.cost for p in layers)
    while total > budget:
        moves = [(m, i) for i, p in enumerate(layers) if (m := p.best_move()) is not None]
        if not moves:
            smallest = fixed + sum(min([p.whole] + [c.cost for c in p.candidates]) for p in layers)
            raise SlimkitError(f"decompose: the {what} target cannot be reached: with every layer at its lowest rank "
                               f"the model keeps {_fmt(smallest)} of the budget's {_fmt(budget)}")
        (_, j), i = min(moves, key=lambda m: m[0][0])
        total -= layers[i].cost - layers[i].candidates[j].cost
        layers[i].choice = j
    return layers


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 or x == math.floor(x) else f"{x:.4g}"
