"""MUNGE pseudo-data (Bucila, Caruana & Niculescu-Mizil, KDD 2006, "Model Compression", sec. 3.3).

For each training sample ``e`` its nearest neighbour ``e'`` is found (Euclidean distance, here
on the flattened, normalised pixels, searched in a pool drawn without looking at labels); each
attribute is, with probability ``p``, replaced by a draw from ``N(e'_a, |e_a - e'_a| / s)``
(the swap plus local noise), and otherwise kept. The teacher labels the synthetic samples and
the student learns the teacher's function on the real and the synthetic data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ..errors import SlimkitError


def _nearest(x: torch.Tensor, pool: torch.Tensor, pool_index: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    out = torch.empty(len(x), dtype=torch.long)
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], pool)
        # a sample is never its own neighbour (distance 0 would make the swap a no-op)
        own = (pool_index[None, :] == torch.arange(i, min(i + chunk, len(x)))[:, None])
        d[own] = float("inf")
        out[i:i + chunk] = d.argmin(1)
    return out


def munge(x: torch.Tensor, multiplier: int = 1, p: float = 0.5, s: float = 1.0, pool: int | None = 4096,
          seed: int = 0) -> torch.Tensor:
    """``multiplier`` MUNGE rounds over ``x`` (N, ...): ``multiplier * N`` synthetic samples (Bucila et al. 2006).

    Nearest neighbours are searched among ``pool`` samples drawn at random from ``x`` (all of
    them when ``pool`` is ``None`` or larger than N) without using labels. For each sample and
    attribute (pixel) a swap happens with probability ``p``: the value becomes the neighbour's
    value plus Gaussian noise of standard deviation ``|e_a - e'_a| / s``; other attributes are
    kept. Each round uses fresh random draws.
    """
    if not 0.0 <= p <= 1.0:
        raise SlimkitError(f"munge p must be in [0, 1], got {p}")
    if s <= 0:
        raise SlimkitError(f"munge s must be positive, got {s}")
    if len(x) < 2:
        raise SlimkitError("munge needs at least two samples to find neighbours")
    gen = torch.Generator().manual_seed(int(seed))
    flat = x.detach().float().cpu().flatten(1)
    n = len(flat)
    index = torch.randperm(n, generator=gen)[:pool] if pool and pool < n else torch.arange(n)
    neighbour = index[_nearest(flat, flat[index], index)]
    other = flat[neighbour]
    sd = (flat - other).abs() / s
    rounds = []
    for _ in range(int(multiplier)):
        swap = torch.rand(flat.shape, generator=gen) < p
        noisy = other + sd * torch.randn(flat.shape, generator=gen)
        rounds.append(torch.where(swap, noisy, flat))
    return torch.cat(rounds).reshape(-1, *x.shape[1:]).to(x.dtype)


class TensorLoader:
    """Shuffled mini-batches over in-memory tensors; the order is a function of ``(seed, epoch)``, as slimkit's."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, seed: int = 0) -> None:
        self.x, self.y, self.batch_size, self.seed, self.epoch = x, y, int(batch_size), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(seed))
        for b in range(len(self)):
            i = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.x[i], self.y[i]


@torch.no_grad()
def label_with(teacher: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The teacher's predicted classes for ``x`` (eval mode, no gradient)."""
    was = teacher.training
    teacher.eval()
    try:
        dev = next(iter(teacher.parameters()), x).device
        return torch.cat([teacher(x[i:i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)])
    finally:
        teacher.train(was)


def munge_loader(teacher: nn.Module, source: Iterable, *, multiplier: int = 1, p: float = 0.5, s: float = 1.0,
                 pool: int | None = 4096, batch_size: int = 128, seed: int = 0,
                 keep_real: bool = True) -> TensorLoader:
    """A loader over ``source``'s real samples plus their MUNGE samples, all labelled by ``teacher`` (Bucila et al.).

    ``source`` is any iterable of ``(inputs, targets)`` batches (e.g. an un-augmented,
    unshuffled train loader); its targets are ignored, because the teacher's predictions are
    what the student learns. With ``keep_real`` false only the synthetic samples are used.
    """
    real = torch.cat([x for x, _ in source])
    synthetic = munge(real, multiplier, p, s, pool, seed)
    x = torch.cat([real, synthetic]) if keep_real else synthetic
    return TensorLoader(x, label_with(teacher, x), batch_size, seed)
