"""How many components to keep: empirical variational Bayesian matrix factorisation (EVBMF), energy, ratio.

EVBMF (Nakajima, Sugiyama, Babacan & Tomioka, JMLR 2013, "Global analytic solution of
fully-observed variational Bayesian matrix factorization") has a closed-form solution: for an
``L x M`` matrix (``L <= M``) with singular values ``s_h`` and noise variance ``sigma^2``, a
component survives iff ``s_h`` exceeds ``sqrt(M sigma^2 (1 + tau)(1 + alpha / tau))`` with
``alpha = L / M`` and ``tau = 2.5129 sqrt(alpha)``, and ``sigma^2`` itself is the minimiser of
the analytic free energy (their Theorem 11 and eq. 39 ff.) on a bracket known in closed form.
Kim et al. (ICLR 2016) pick Tucker-2 ranks with it on the mode unfoldings of each kernel. No
maintained package ships it, so it is implemented here (and tested on synthetic low-rank plus
noise matrices, where it finds the true rank).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import SlimkitError

_TAU_CONST = 2.5129  # the paper's numerical constant: the root of tau*log(1+tau) = ... (their eq. 30)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """tau(x; alpha): the positive root of the quadratic in the VB posterior (Nakajima et al., eq. 35)."""
    d = x - (1 + alpha)
    return 0.5 * (d + np.sqrt(np.maximum(d * d - 4 * alpha, 0.0)))


def _free_energy(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, x_bar: float) -> float:
    """The EVBMF free energy as a function of the noise variance (up to constants), eq. 39-41."""
    alpha = L / M
    x = s * s / (M * sigma2)
    big, small = x[x > x_bar], x[x <= x_bar]
    t = _tau(big, alpha)
    energy = (np.sum(small - np.log(small)) + np.sum(big - t) + np.sum(np.log((t + 1) / big))
              + alpha * np.sum(np.log(t / alpha + 1)))
    return float(energy + residual / (M * sigma2) + (L - len(s)) * math.log(sigma2))


def evbmf(Y: np.ndarray, sigma2: float | None = None) -> tuple[int, float]:
    """(rank, noise variance) of ``Y`` by the analytic EVBMF solution.

    Args:
        Y: a 2-D matrix (any orientation).
        sigma2: the noise variance if known; estimated by EVBMF otherwise.

    Returns:
        The number of components EVBMF keeps and the noise variance it used.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> Y = rng.normal(size=(60, 5)) @ rng.normal(size=(5, 80)) + 0.1 * rng.normal(size=(60, 80))
        >>> evbmf(Y)[0]
        5
    """
    from scipy.optimize import minimize_scalar

    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim != 2 or min(Y.shape) < 1:
        raise SlimkitError(f"evbmf needs a 2-D matrix, got shape {Y.shape}")
    if Y.shape[0] > Y.shape[1]:
        Y = Y.T
    L, M = Y.shape
    s = np.linalg.svd(Y, compute_uv=False)
    alpha = L / M
    tau_bar = _TAU_CONST * math.sqrt(alpha)
    threshold_factor = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = max(float(np.sum(Y * Y) - np.sum(s * s)), 0.0)  # zero for a full SVD; kept for clarity
    if sigma2 is None:
        if not np.any(s > 0):
            return 0, 0.0
        x_bar = threshold_factor
        h_ub = int(min(math.ceil(L / (1 + alpha)) - 1, L)) - 1  # the largest rank the bracket allows
        upper = (np.sum(s * s) + residual) / (L * M)
        tail = s[h_ub + 1:] if h_ub + 1 < len(s) else s[-1:]
        lower = max(float(s[min(h_ub + 1, len(s) - 1)] ** 2 / (M * x_bar)), float(np.mean(tail * tail) / M))
        lower = max(lower, upper * 1e-12)
        if lower >= upper:
            sigma2 = upper
        else:
            sigma2 = float(minimize_scalar(_free_energy, args=(L, M, s, residual, x_bar), bounds=(lower, upper),
                                           method="bounded").x)
    threshold = math.sqrt(M * sigma2 * threshold_factor)
    return int(np.sum(s > threshold)), float(sigma2)


def energy_rank(s: np.ndarray, fraction: float) -> int:
    """The fewest leading components whose squared singular values hold ``fraction`` of the total."""
    e = np.cumsum(np.asarray(s, dtype=np.float64) ** 2)
    if e[-1] <= 0:
        return 1
    return int(np.searchsorted(e / e[-1], fraction - 1e-12) + 1)


def parse_rank(text: str | int) -> tuple[str, float]:
    """``"vbmf"`` / ``"energy:0.9"`` / ``"ratio:0.5"`` / ``"full"`` / ``12`` -> (kind, value)."""
    if text == "full":
        return "full", 1.0
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 1:
            raise SlimkitError(f"rank must be a positive integer, got {text}")
        return "fixed", float(text)
    kind, _, value = str(text).partition(":")
    if kind == "vbmf" and not value:
        return "vbmf", 0.0
    if kind in ("energy", "ratio") and value:
        try:
            v = float(value)
        except ValueError:
            v = float("nan")
        if not 0 < v <= 1:
            raise SlimkitError(f"rank {text!r}: {kind} is a fraction in (0, 1]")
        return kind, v
    if kind.isdigit() and not value:
        return parse_rank(int(kind))
    raise SlimkitError(f"rank must be vbmf, energy:F, ratio:F, full or a positive integer, got {text!r}")
