"""The decompositions: each turns one layer into a sequence of standard layers computing (nearly) the same map.

Every method is a :class:`Decomposition` registered in :data:`DECOMPOSITIONS` with its facts: the
layer kinds it applies to, the largest rank a layer allows, the closed-form MACs and parameters at
a rank, a weight-space error estimate (what rank allocation trades against MACs), how ``vbmf`` /
``energy:F`` / ``ratio:F`` turn into a rank, and the builder. Replacements are ``nn.Sequential``
of ``nn.Conv2d`` / ``nn.Linear``, so artifacts, the profiler, quantization, pruning and export
treat them like any other layers.

* ``svd``: truncated SVD of a linear layer or 1x1 conv, two thin layers (Denton et al. 2014).
* ``cp``: CP decomposition of a kxk conv (tensorly's ALS) into 1x1 -> kx1 depthwise -> 1xk
  depthwise -> 1x1 (Lebedev et al. 2015).
* ``tucker``: Tucker-2 of the output and input channel modes (tensorly's HOOI) into 1x1 -> kxk
  core -> 1x1 (Kim et al. 2016).
* ``separable``: kx1 + 1xk by SVD of the kernel seen as an (O kh) x (C kw) matrix (Jaderberg et
  al. 2014, scheme 2; the same closed form as the ``factorize_kxk`` transform).
* ``asym``: the data-driven decomposition of Zhang et al. 2016: a kxk conv to R channels spanning
  the principal subspace of the layer's responses on sampled data, then a 1x1 back (and, in the
  sequential procedure, the 1x1 re-fitted asymmetrically on the decomposed model's own inputs).
  Their nonlinear (ReLU-aware, GSVD) variant is not implemented: responses are reconstructed
  before the nonlinearity.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import SlimkitError
from ..registry import Registry
from .ranks import energy_rank, evbmf

Rank = int | tuple[int, int]


@dataclass(frozen=True)
class Decomposition:
    """A registered decomposition and its facts (see the module docstring)."""

    name: str
    paper: str
    uses_data: bool
    check: Callable[[nn.Module], str | None]  # why this layer cannot be decomposed, or None
    max_rank: Callable[[nn.Module], Rank]
    rank_for: Callable[[nn.Module, str, float, torch.Tensor | None], Rank]  # (layer, kind, value, responses)
    scale: Callable[[nn.Module, float], Rank]  # the rank at a fraction t of the largest, for allocation
    cost: Callable[[nn.Module, Rank, tuple[int, int], tuple[int, int]], tuple[int, int]]  # (MACs, params)
    error: Callable[[nn.Module, Rank, torch.Tensor | None], float]  # relative squared error estimate
    build: Callable[..., nn.Module]  # (layer, rank, inputs or None, options) -> replacement
    skeleton: Callable[[nn.Module, Rank], nn.Module]  # the replacement's structure, untrained: for timing it


DECOMPOSITIONS: Registry[Decomposition] = Registry("decomposition")


def _register(d: Decomposition) -> Decomposition:
    return DECOMPOSITIONS.register(d.name)(d)


# -- shared --------------------------------------------------------------------------------------------

def _is_conv(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d


def conv_problem(conv: nn.Conv2d, need_spatial: bool) -> str | None:
    """Why a conv cannot be split (grouped, odd padding), or None."""
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding {conv.padding!r} (give numbers)"
    kh, kw = conv.kernel_size
    if need_spatial and (kh < 2 or kw < 2):
        return f"a {kh}x{kw} kernel (this method splits kxk kernels)"
    return None


_CACHE: dict[tuple, object] = {}  # singular values and response moments per layer, cleared by each decompose()


def clear_cache() -> None:
    _CACHE.clear()


def _cached(key: tuple, compute: Callable[[], object]):
    if key not in _CACHE:
        _CACHE[key] = compute()
    return _CACHE[key]


def _sv(matrix: torch.Tensor) -> np.ndarray:
    # rank allocation asks for the same spectra once per candidate rank: compute each once
    key = ("sv", matrix.data_ptr(), tuple(matrix.shape), tuple(matrix.stride()), matrix._version)
    return _cached(key, lambda: torch.linalg.svdvals(matrix.detach().double()).cpu().numpy())


def _kept_energy(s: np.ndarray, r: int) -> float:
    e = s ** 2
    return float(e[:r].sum() / max(e.sum(), 1e-300))


def _rank_from(kind: str, value: float, s: np.ndarray, matrix: torch.Tensor, ratio_rank: Callable[[float], int]) -> int:
    if kind == "vbmf":
        return max(1, evbmf(matrix.detach().double().cpu().numpy())[0])
    if kind == "energy":
        return energy_rank(s, value)
    if kind == "ratio":
        return max(1, ratio_rank(value))
    return int(value)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype).reshape(param.shape))


def _seq(*named: tuple[str, nn.Module], like: nn.Module) -> nn.Sequential:
    seq = nn.Sequential(OrderedDict(named))
    w = like.weight
    return seq.to(device=w.device, dtype=w.dtype).train(like.training)


def _out(in_hw: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int]:
    """The output size of ``conv`` on an ``in_hw`` input."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    return ((in_hw[0] + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (in_hw[1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


# -- svd: linear layers and 1x1 convs (Denton et al. 2014) ---------------------------------------------

def _svd_matrix(m: nn.Module) -> torch.Tensor:
    return m.weight.detach().reshape(m.weight.shape[0], -1)


def _svd_check(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return None
    if _is_conv(m):
        if m.kernel_size != (1, 1):
            return f"a {m.kernel_size[0]}x{m.kernel_size[1]} conv (svd splits linear layers and 1x1 convs)"
        return conv_problem(m, need_spatial=False)
    return f"a {type(m).__name__} (svd splits linear layers and 1x1 convs)"


def _svd_max(m: nn.Module) -> int:
    return min(_svd_matrix(m).shape)


def _svd_cost(m, r, in_hw, out_hw):
    o, i = _svd_matrix(m).shape
    bias = o if m.bias is not None else 0
    positions = out_hw[0] * out_hw[1] if _is_conv(m) else 1
    return r * (i + o) * positions, r * (i + o) + bias


def _svd_rank(m, kind, value, responses):
    o, i = _svd_matrix(m).shape
    return _rank_from(kind, value, _sv(_svd_matrix(m)), _svd_matrix(m), lambda f: int(f * o * i / (o + i)))


def _svd_error(m, r, responses):
    return 1 - _kept_energy(_sv(_svd_matrix(m)), r)


def _svd_layers(m, r):
    if isinstance(m, nn.Linear):
        return nn.Linear(m.in_features, r, bias=False), nn.Linear(r, m.out_features, bias=m.bias is not None)
    # the 1x1 conv's stride and padding go first: zero padding stays zero through a bias-free 1x1
    return (nn.Conv2d(m.in_channels, r, 1, m.stride, m.padding, bias=False),
            nn.Conv2d(r, m.out_channels, 1, bias=m.bias is not None))


def _svd_skeleton(m, r):
    a, b = _svd_layers(m, r)
    return _seq(("first", a), ("second", b), like=m)


def _svd_build(m, r, x, opts):
    U, S, Vh = torch.linalg.svd(_svd_matrix(m).double(), full_matrices=False)
    root = S[:r].sqrt()
    first, second = root[:, None] * Vh[:r], U[:, :r] * root
    seq = _svd_skeleton(m, r)
    _set(seq.first.weight, first)
    _set(seq.second.weight, second)
    if m.bias is not None:
        _set(seq.second.bias, m.bias.detach())
    return seq


_register(Decomposition("svd", "Denton et al., NIPS 2014", False, _svd_check, _svd_max, _svd_rank,
                        lambda m, t: max(1, math.ceil(t * _svd_max(m))), _svd_cost, _svd_error, _svd_build,
                        _svd_skeleton))


# -- separable: kx1 + 1xk (Jaderberg et al. 2014) ------------------------------------------------------

def _sep_matrix(m: nn.Conv2d) -> torch.Tensor:
    o, c, kh, kw = m.weight.shape
    W = m.weight.detach()
    return _cached(("sep", W.data_ptr(), W._version), lambda: W.permute(0, 2, 1, 3).reshape(o * kh, c * kw))


def _sep_max(m):
    o, c, kh, kw = m.weight.shape
    return min(o * kh, c * kw)


def _sep_cost(m, r, in_hw, out_hw):
    o, c, kh, kw = m.weight.shape
    bias = o if m.bias is not None else 0
    # horizontal 1xk keeps the rows (stride 1 vertically), the vertical kx1 strides them
    return r * c * kw * in_hw[0] * out_hw[1] + o * r * kh * out_hw[0] * out_hw[1], r * c * kw + o * r * kh + bias


def _sep_rank(m, kind, value, responses):
    o, c, kh, kw = m.weight.shape
    return _rank_from(kind, value, _sv(_sep_matrix(m)), _sep_matrix(m),
                      lambda f: int(f * o * c * kh * kw / (c * kw + o * kh)))


def _sep_build(m, r, x, opts):
    from ..transform import TRANSFORMS
    from ..transform.methods import LayerInfo

    return TRANSFORMS.get("factorize_kxk").build(m, None, LayerInfo(), {"rank": r})


_register(Decomposition("separable", "Jaderberg et al., BMVC 2014 (scheme 2, closed form)", False,
                        lambda m: conv_problem(m, True) if _is_conv(m) else f"a {type(m).__name__}", _sep_max,
                        _sep_rank, lambda m, t: max(1, math.ceil(t * _sep_max(m))), _sep_cost,
                        lambda m, r, resp: 1 - _kept_energy(_sv(_sep_matrix(m)), r), _sep_build,
                        lambda m, r: _sep_build(m, r, None, {})))


# -- tucker-2 (Kim et al. 2016) ------------------------------------------------------------------------

def _unfold(m: nn.Conv2d, mode: int) -> torch.Tensor:
    W = m.weight.detach()
    # cached, so the spectra cache sees the same tensor for every candidate rank
    return _cached(("unfold", W.data_ptr(), W._version, mode), lambda: W.reshape(W.shape[0], -1) if mode == 0
                   else W.transpose(0, 1).reshape(W.shape[1], -1))


def _tucker_cost(m, r, in_hw, out_hw):
    r1, r2 = r
    o, c, kh, kw = m.weight.shape
    out_pos = out_hw[0] * out_hw[1]
    bias = o if m.bias is not None else 0
    macs = r2 * c * in_hw[0] * in_hw[1] + r1 * r2 * kh * kw * out_pos + o * r1 * out_pos
    return macs, r2 * c + r1 * r2 * kh * kw + o * r1 + bias


def _tucker_rank(m, kind, value, responses):
    o, c, kh, kw = m.weight.shape
    if kind == "ratio":  # a common fraction t of both modes, solving for the parameters
        target = value * o * c * kh * kw
        t = _solve_fraction(lambda t: _tucker_cost(m, _tucker_scale(m, t), (1, 1), (1, 1))[1], target)
        return _tucker_scale(m, t)
    if kind == "fixed":
        return (int(value), int(value))
    return tuple(_rank_from(kind, value, _sv(_unfold(m, mode)), _unfold(m, mode), lambda f: 1) for mode in (0, 1))


def _tucker_scale(m, t):
    o, c = m.weight.shape[:2]
    return (max(1, math.ceil(t * o)), max(1, math.ceil(t * c)))


def _solve_fraction(cost: Callable[[float], float], target: float) -> float:
    lo, hi = 1e-3, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid)
    return lo


def _tucker_error(m, r, responses):
    # HOSVD estimate: the energy the two truncated modes leave out (an upper bound for HOOI's)
    return 1 - _kept_energy(_sv(_unfold(m, 0)), r[0]) * _kept_energy(_sv(_unfold(m, 1)), r[1])


def _tucker_skeleton(m, r):
    r1, r2 = r
    o, c, kh, kw = m.weight.shape
    return _seq(("first", nn.Conv2d(c, r2, 1, bias=False)),
                ("core", nn.Conv2d(r2, r1, (kh, kw), m.stride, m.padding, m.dilation, bias=False)),
                ("last", nn.Conv2d(r1, o, 1, bias=m.bias is not None)), like=m)


def _tucker_build(m, r, x, opts):
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    r1, r2 = r
    o, c, kh, kw = m.weight.shape
    tl.set_backend("numpy")
    W = m.weight.detach().double().cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tensorly's note when a rank equals a dimension
        (core, (u_out, u_in)), _ = partial_tucker(W, rank=[r1, r2], modes=[0, 1], init="svd", tol=1e-6,
                                                  n_iter_max=opts.get("iterations", 100))
    seq = _tucker_skeleton(m, r)
    _set(seq.first.weight, torch.from_numpy(u_in.T.copy()))
    _set(seq.core.weight, torch.from_numpy(np.ascontiguousarray(core)))
    _set(seq.last.weight, torch.from_numpy(u_out.copy()))
    if m.bias is not None:
        _set(seq.last.bias, m.bias.detach())
    return seq


_register(Decomposition("tucker", "Kim et al., ICLR 2016 (Tucker-2 with VBMF ranks)", False,
                        lambda m: conv_problem(m, True) if _is_conv(m) else f"a {type(m).__name__}",
                        lambda m: tuple(m.weight.shape[:2]), _tucker_rank, _tucker_scale, _tucker_cost, _tucker_error,
                        _tucker_build, _tucker_skeleton))


# -- cp (Lebedev et al. 2015) --------------------------------------------------------------------------

def _cp_cost(m, r, in_hw, out_hw):
    o, c, kh, kw = m.weight.shape
    bias = o if m.bias is not None else 0
    mid_h = out_hw[0]  # the vertical kx1 strides the rows, the horizontal 1xk the columns
    macs = r * c * in_hw[0] * in_hw[1] + r * kh * mid_h * in_hw[1] + r * kw * out_hw[0] * out_hw[1] \
        + o * r * out_hw[0] * out_hw[1]
    return macs, r * c + r * kh + r * kw + o * r + bias


def _cp_max(m):
    o, c = m.weight.shape[:2]
    return o * c  # no more components than that can help; ALS beyond the tensor's rank only fits noise


def _cp_rank(m, kind, value, responses):
    o, c, kh, kw = m.weight.shape
    if kind == "ratio":
        return max(1, int(value * o * c * kh * kw / (c + kh + kw + o)))
    if kind == "fixed":
        return int(value)
    # vbmf / energy on the two channel unfoldings; CP needs at least the larger of the two ranks
    return max(_rank_from(kind, value, _sv(_unfold(m, mode)), _unfold(m, mode), lambda f: 1) for mode in (0, 1))


def _cp_error(m, r, responses):
    # a CP of rank r is a Tucker-2 with both ranks r and a diagonal core: the Tucker estimate bounds it below
    o, c = m.weight.shape[:2]
    return _tucker_error(m, (min(r, o), min(r, c)), responses)


def _cp_skeleton(m, r):
    o, c, kh, kw = m.weight.shape
    (sh, sw), (ph, pw), (dh, dw) = m.stride, m.padding, m.dilation
    return _seq(("first", nn.Conv2d(c, r, 1, bias=False)),
                ("vertical", nn.Conv2d(r, r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=r, bias=False)),
                ("horizontal", nn.Conv2d(r, r, (1, kw), (1, sw), (0, pw), (1, dw), groups=r, bias=False)),
                ("last", nn.Conv2d(r, o, 1, bias=m.bias is not None)), like=m)


def _cp_build(m, r, x, opts):
    import tensorly as tl
    from tensorly.decomposition import parafac

    tl.set_backend("numpy")
    W = m.weight.detach().double().cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # SVD start (tensorly fills modes shorter than r randomly, from random_state): repeatable
        cp = parafac(W, r, n_iter_max=opts.get("iterations", 100), init="svd", random_state=opts.get("seed", 0),
                     normalize_factors=True, tol=1e-6)
    a, b, cv, d = cp.factors
    # spread the component weights evenly over the four factors: no layer carries a huge scale in fp32
    lam = np.abs(cp.weights) ** 0.25
    sign = np.sign(cp.weights)
    a, b, cv, d = a * lam * sign, b * lam, cv * lam, d * lam
    seq = _cp_skeleton(m, r)
    _set(seq.first.weight, torch.from_numpy(b.T.copy()))
    _set(seq.vertical.weight, torch.from_numpy(cv.T.copy()))
    _set(seq.horizontal.weight, torch.from_numpy(d.T.copy()))
    _set(seq.last.weight, torch.from_numpy(a.copy()))
    if m.bias is not None:
        _set(seq.last.bias, m.bias.detach())
    return seq


_register(Decomposition("cp", "Lebedev et al., ICLR 2015 (CP-decomposition, ALS from tensorly)", False,
                        lambda m: conv_problem(m, True) if _is_conv(m) else f"a {type(m).__name__}", _cp_max,
                        _cp_rank, lambda m, t: max(1, math.ceil(t * min(m.weight.shape[:2]))), _cp_cost, _cp_error,
                        _cp_build, _cp_skeleton))


# -- asym: data-driven, on the responses (Zhang et al. 2016) -------------------------------------------

def _asym_cost(m, r, in_hw, out_hw):
    o, c, kh, kw = m.weight.shape
    pos = out_hw[0] * out_hw[1]
    return r * c * kh * kw * pos + o * r * pos, r * c * kh * kw + o * r + o  # the 1x1 always has a bias


def _response_moments(m: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) of the layer's bias-free responses over sampled positions of ``x``."""
    key = ("moments", m.weight.data_ptr(), m.weight._version, x.data_ptr(), tuple(x.shape))
    return _cached(key, lambda: _compute_moments(m, x))


def _compute_moments(m: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ..transform.fit import moments

    def resp(xb):
        return torch.nn.functional.conv2d(xb, m.weight, None, m.stride, m.padding, m.dilation)

    with torch.no_grad():
        mean = torch.stack([resp(xb).mean((0, 2, 3)) for xb in x.split(8)]).mean(0).double()
    second = moments(x, resp)
    return mean, second - mean[:, None] * mean[None, :]


def _asym_rank(m, kind, value, responses):
    o, c, kh, kw = m.weight.shape
    if kind == "ratio":
        return max(1, int(value * o * c * kh * kw / (c * kh * kw + o)))
    if kind == "fixed":
        return int(value)
    if kind == "energy":
        if responses is None:
            raise SlimkitError("asym ranks by the energy of the layer's responses: it needs data")
        eig = torch.linalg.eigvalsh(_response_moments(m, responses)[1]).clamp_min(0).flip(0).sqrt().numpy()
        return energy_rank(eig, value)
    return max(1, evbmf(m.weight.detach().reshape(o, -1).double().cpu().numpy())[0])


def _asym_error(m, r, responses):
    if responses is None:
        return 1 - _kept_energy(_sv(m.weight.detach().reshape(m.weight.shape[0], -1)), r)
    eig = torch.linalg.eigvalsh(_response_moments(m, responses)[1]).clamp_min(0).flip(0).numpy()
    return float(1 - eig[:r].sum() / max(eig.sum(), 1e-300))


def _asym_skeleton(m, r):
    o, c, kh, kw = m.weight.shape
    return _seq(("reduce", nn.Conv2d(c, r, (kh, kw), m.stride, m.padding, m.dilation, bias=False)),
                ("expand", nn.Conv2d(r, o, 1, bias=True)), like=m)


def _asym_build(m, r, x, opts):
    from ..transform.fit import top_eigvecs

    if x is None:
        raise SlimkitError("asym is data-driven (Zhang et al. 2016): it needs data (--data, a loader)")
    o, c, kh, kw = m.weight.shape
    mean, cov = _response_moments(m, x)
    M = top_eigvecs(cov, r).to(m.weight.device)  # (o, r), orthonormal: the responses' principal subspace
    W = m.weight.detach().double().reshape(o, -1)
    seq = _asym_skeleton(m, r)
    _set(seq.reduce.weight, (M.T @ W).reshape(r, c, kh, kw))
    _set(seq.expand.weight, M)
    bias = m.bias.detach().double() if m.bias is not None else torch.zeros(o, dtype=torch.float64)
    # y ~ M M^T (y0 - mean) + mean + b: the part of the mean outside the subspace goes into the bias
    _set(seq.expand.bias, bias.to(M.device) + mean.to(M.device) - M @ (M.T @ mean.to(M.device)))
    return seq


_register(Decomposition("asym", "Zhang et al., TPAMI 2016 (response PCA, asymmetric reconstruction; linear case)",
                        True, lambda m: conv_problem(m, False) if _is_conv(m) else f"a {type(m).__name__}",
                        lambda m: m.weight.shape[0], _asym_rank,
                        lambda m, t: max(1, math.ceil(t * m.weight.shape[0])), _asym_cost, _asym_error, _asym_build,
                        _asym_skeleton))


def applies(name: str, module: nn.Module) -> str | None:
    """Why ``module`` cannot take decomposition ``name`` (None: it can)."""
    return DECOMPOSITIONS.get(name).check(module)


def check_rank(name: str, module: nn.Module, rank: Rank, layer: str) -> Rank:
    """``rank`` if the layer allows it, else a one-line error naming the layer and the most it allows."""
    most = DECOMPOSITIONS.get(name).max_rank(module)
    ranks, limits = (rank, most) if isinstance(rank, tuple) else ((rank,), (most,))
    for r, limit in zip(ranks, limits):
        if not isinstance(r, int) or r < 1 or r > limit:
            raise SlimkitError(f"{name}: layer {layer}: rank {rank} is more than it allows ({most} for "
                               f"{tuple(module.weight.shape)})" if isinstance(r, int) and r > limit else
                               f"{name}: layer {layer}: rank {rank} is not a positive integer")
    return rank
