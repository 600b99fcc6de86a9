"""Weight sharing (Deep Compression stage 2, Han et al., ICLR 2016): per-layer k-means codebooks, fine-tuned.

Each layer's non-zero weights are clustered into ``2**bits`` values by one-dimensional k-means
(Lloyd's algorithm with the paper's linear initialisation: centroids evenly spaced between the
smallest and the largest weight, which keeps the rare large weights that density-based
initialisation loses). Zeros stay zeros (the sparsity pattern of stage 1 is kept). While
fine-tuning, a :class:`Shared` parametrization computes ``weight = codebook[codes]``: the codes are
fixed and the codebook is the trainable parameter, so autograd sums the gradients of every weight
in a cluster into its centroid, as in the paper's figure 3. With ``weighting="hessian"`` each
weight counts in the k-means by its Hessian diagonal (the empirical Fisher), as in
Hessian-weighted k-means (Choi et al., ICLR 2017): clusters are placed where errors cost most.

A one-dimensional k-means is a sort and a few vectorised passes; a general k-means package
(scikit-learn) would add a heavy dependency for it, and none supports the per-cluster gradient
parametrization, so both are written here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class Shared(nn.Module):
    """``weight = codebook[codes]`` (``codes == -1``: a pruned zero); the codebook is the trainable parameter."""

    def __init__(self, codes: torch.Tensor, codebook: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int64))
        self.codebook = nn.Parameter(codebook.to(torch.float32).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        values = self.codebook[self.codes.clamp(min=0)]
        return torch.where(self.codes >= 0, values, torch.zeros((), dtype=values.dtype)).to(weight.dtype)


def kmeans_1d(values: torch.Tensor, k: int, *, weights: torch.Tensor | None = None, iterations: int = 30,
              init: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
    """``(centroids ascending, code per value)`` of a (weighted) 1-D k-means with ``k`` clusters.

    Args:
        values: 1-D tensor.
        k: clusters; fewer are returned when ``values`` has fewer distinct values.
        weights: per-value weights of the squared error (Hessian-weighted k-means), default all 1.
        iterations: Lloyd iterations at most (it stops when no code changes).
        init: ``linear`` (evenly spaced, Han et al. 2016), ``density`` (evenly spaced quantiles) or ``random``.

    Example:
        >>> c, codes = kmeans_1d(torch.tensor([0.1, 0.11, 0.9, 1.0]), 2)
        >>> [round(v, 3) for v in c.tolist()], codes.tolist()
        ([0.105, 0.95], [0, 0, 1, 1])
    """
    v = values.detach().double().flatten()
    distinct = torch.unique(v)
    if len(distinct) <= k:
        return distinct.float(), torch.searchsorted(distinct, v)
    w = torch.ones_like(v) if weights is None else weights.detach().double().flatten().clamp(min=1e-30)
    if init == "linear":
        c = torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64)
    elif init == "density":
        c = torch.quantile(v, torch.linspace(0, 1, k, dtype=torch.float64))
    else:
        g = torch.Generator().manual_seed(0)
        c = torch.sort(v[torch.randperm(len(v), generator=g)[:k]]).values
    codes = None
    for _ in range(iterations):
        mids = (c[1:] + c[:-1]) / 2
        new = torch.bucketize(v, mids)
        if codes is not None and torch.equal(new, codes):
            break
        codes = new
        total = torch.zeros(k, dtype=torch.float64).index_add_(0, codes, w * v)
        mass = torch.zeros(k, dtype=torch.float64).index_add_(0, codes, w)
        c = torch.where(mass > 0, total / mass.clamp(min=1e-300), c)  # an empty cluster keeps its centroid
        c = torch.sort(c).values
    codes = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
    used = torch.unique(codes)  # drop centroids no value chose, renumbering codes
    remap = torch.full((k,), -1, dtype=torch.int64)
    remap[used] = torch.arange(len(used))
    return c[used].float(), remap[codes]


def attach_shared(module: nn.Module, bits: int, *, fisher: torch.Tensor | None = None, iterations: int = 30,
                  init: str = "linear") -> Shared:
    """Cluster ``module.weight``'s non-zeros into ``2**bits`` values and hold them as a :class:`Shared` weight."""
    w = module.weight.detach()
    nz = w != 0
    codes = torch.full(w.shape, -1, dtype=torch.int64)
    centroids = torch.zeros(0)
    if nz.any():
        centroids, c = kmeans_1d(w[nz], 2**bits, weights=None if fisher is None else fisher[nz],
                                 iterations=iterations, init=init)
        codes[nz] = c
    shared = Shared(codes, centroids if len(centroids) else torch.zeros(1))
    parametrize.register_parametrization(module, "weight", shared, unsafe=True)
    module.parametrizations.weight.original.requires_grad_(False)  # only the codebook trains
    return shared


def bake_shared(model: nn.Module) -> nn.Module:
    """Replace every :class:`Shared` weight by the plain tensor of its values (in place; returns ``model``)."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], Shared):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            m.weight.requires_grad_(True)
    return model
