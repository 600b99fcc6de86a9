"""Least squares on sampled activations, shared by the transforms.

Every fit here is linear least squares: the replacement is a chain of linear layers, and with
all but one of them fixed the remaining one enters the output linearly. Sizes are kept small
on purpose: inputs are recorded for at most ``max_images`` images per layer, output positions
are sub-sampled, and the problem is solved through accumulated normal equations (in float64,
with a tiny ridge so a rank-deficient design still has a unique, minimum-norm-like solution),
so fitting a CIFAR ResNet takes seconds on one core.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 4096  # output positions kept per chunk of images: enough for a few hundred unknowns
CHUNK = 8  # images unfolded at once, bounding the memory of im2col


def batches_from(calib_loader: Iterable | None, example_input: torch.Tensor | None, num_batches: int) -> list:
    """Up to ``num_batches`` input tensors from the loader (``(x, y)`` pairs or tensors), else ``[example_input]``."""
    out = []
    if calib_loader is not None:
        for batch in calib_loader:
            out.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
            if len(out) >= num_batches:
                break
    elif example_input is not None:
        out.append(example_input)
    return out


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def run_with_hooks(model: nn.Module, batches: list, hooks: dict[str, Callable]) -> None:
    """Run ``batches`` through ``model`` in eval mode with forward pre-hooks on named modules.

    Eval mode because the replacement must match the layer as it is used at inference (batch
    norm with running statistics); the training flags are restored afterwards.
    """
    modules = dict(model.named_modules())
    flags = {m: m.training for m in model.modules()}
    handles = [modules[n].register_forward_pre_hook(fn) for n, fn in hooks.items()]
    dev = _device(model)
    try:
        model.eval()
        with torch.no_grad():
            for x in batches:
                model(x.to(dev))
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag


def record_inputs(model: nn.Module, names: list[str], batches: list, max_images: int = 64) -> dict[str, torch.Tensor]:
    """The inputs each named layer receives on ``batches``, at most ``max_images`` images per layer."""
    if not batches or not names:
        return {}
    per_batch = max(1, max_images // len(batches))
    store: dict[str, list] = {n: [] for n in names}

    def hook(name: str) -> Callable:
        def fn(module, args):
            # clone: a later in-place op (ReLU(inplace=True)) must not rewrite what was recorded
            store[name].append(args[0][:per_batch].detach().clone())
        return fn

    run_with_hooks(model, batches, {n: hook(n) for n in names})
    return {n: torch.cat(v)[:max_images] for n, v in store.items() if v}


class Normal:
    """Normal equations ``Z^T Z w = Z^T Y`` accumulated over row blocks, solved once."""

    def __init__(self) -> None:
        self.G: torch.Tensor | None = None
        self.B: torch.Tensor | None = None

    def add(self, Z: torch.Tensor, Y: torch.Tensor) -> None:
        Z, Y = Z.double(), Y.double()
        G, B = Z.T @ Z, Z.T @ Y
        self.G = G if self.G is None else self.G + G
        self.B = B if self.B is None else self.B + B

    def solve(self, ridge: float = 1e-9) -> torch.Tensor:
        G = self.G
        lam = ridge * float(G.diagonal().mean().clamp_min(1e-30))
        eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        return torch.linalg.lstsq((G + lam * eye).cpu(), self.B.cpu()).solution.to(G.device)


def _pick(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.arange(n) if n <= k else torch.randperm(n, generator=gen)[:k]


def fit_conv(x: torch.Tensor, features: Callable, target: Callable, kernel: tuple[int, int], stride=1, padding=0,
             dilation=1, seed: int = 0) -> torch.Tensor:
    """Weight ``(O, R, kh, kw)`` of a bias-free conv on ``features(x)`` best reproducing ``target(x)``.

    Ordinary least squares over sampled output positions (im2col rows of the features against
    the target's values there), as in Zhang et al. 2016's response reconstruction.
    """
    ne, gen = Normal(), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for xb in x.split(CHUNK):
            z, y = features(xb), target(xb)
            P = F.unfold(z, kernel, dilation=dilation, padding=padding, stride=stride)
            P = P.transpose(1, 2).reshape(-1, P.shape[1])
            Y = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
            idx = _pick(P.shape[0], MAX_ROWS, gen).to(P.device)
            ne.add(P[idx], Y[idx])
    sol = ne.solve()
    return sol.T.reshape(sol.shape[1], -1, *kernel)


def moments(x: torch.Tensor, fn: Callable | None = None, seed: int = 0) -> torch.Tensor:
    """Uncentred second moment ``E[v v^T]`` of the channel vectors ``v`` of ``fn(x)`` (or ``x``) over positions."""
    total, n, gen = None, 0, torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for xb in x.split(CHUNK):
            v = fn(xb) if fn is not None else xb
            v = v.transpose(0, 1).reshape(v.shape[1], -1).T.double()
            v = v[_pick(v.shape[0], MAX_ROWS, gen).to(v.device)]
            s = v.T @ v
            total, n = (s if total is None else total + s), n + v.shape[0]
    return total / max(n, 1)


def top_eigvecs(S: torch.Tensor, m: int) -> torch.Tensor:
    """The ``m`` leading eigenvectors (columns) of a symmetric matrix."""
    _, vecs = torch.linalg.eigh(S)
    return vecs[:, -m:].flip(1)
