"""Seeded index selection: stratified splits and class-balanced subsets.

Everything here works on label arrays and returns sorted index arrays, so a split never depends
on the order in which files were listed, and the same seed always selects the same samples.
"""

from __future__ import annotations

import numpy as np


def make_rng(*key: int) -> np.random.Generator:
    """A numpy generator that is a pure function of ``key`` (e.g. ``(seed, stream)``).

    Distinct streams for distinct purposes keep, say, the val carve unchanged when ``limit``
    changes, because each draw reads its own stream instead of sharing one sequence.
    """
    return np.random.default_rng(np.random.SeedSequence([int(k) % 2**63 for k in key]))


def _proportional(counts: np.ndarray, total: int) -> np.ndarray:
    """Spread ``total`` over classes in proportion to ``counts`` (largest remainder method)."""
    ideal = counts * (total / max(int(counts.sum()), 1))
    out = np.floor(ideal).astype(np.int64)
    rest = int(total - out.sum())
    order = np.argsort(-(ideal - out), kind="stable")
    out[order[:rest]] += 1
    return np.minimum(out, counts)


def stratified_split(labels: np.ndarray, size: float | int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(kept, held_out)`` with class proportions preserved in both parts.

    ``size`` is a fraction of all samples (float) or a sample count (int); the held-out count
    per class is allocated proportionally, so rare classes are not starved and the total is
    exact. Both returned arrays are sorted.
    """
    labels = np.asarray(labels)
    n = len(labels)
    n_held = int(round(size * n)) if isinstance(size, float) else int(size)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    per_class = _proportional(counts, min(max(n_held, 0), n))
    held = [rng.permutation(np.flatnonzero(inverse == c))[:k] for c, k in enumerate(per_class)]
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    keep = np.ones(n, dtype=bool)
    keep[held_idx] = False
    return np.flatnonzero(keep), held_idx


def balanced_subset(labels: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a random subset of ``limit`` samples with equal counts per class.

    When ``limit`` does not divide evenly, the remainder goes one each to randomly chosen
    classes; a class with too few samples gives its unused share to the others. A limit
    at least the split size keeps every index.
    """
    labels = np.asarray(labels)
    if limit >= len(labels):
        return np.arange(len(labels))
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = np.zeros_like(counts)
    left = int(limit)
    while left > 0:
        open_ = np.flatnonzero(quota < counts)
        share = left // len(open_)
        if share == 0:
            quota[rng.choice(open_, size=left, replace=False)] += 1
            break
        add = np.minimum(share, counts[open_] - quota[open_])
        quota[open_] += add
        left -= int(add.sum())
    picked = [rng.permutation(np.flatnonzero(inverse == c))[:k] for c, k in enumerate(quota)]
    return np.sort(np.concatenate(picked))
