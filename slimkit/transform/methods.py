"""The transforms: for each, an eligibility check and a builder of the initialised replacement.

A builder gets the original layer, the inputs it saw on a few batches (``x``, or ``None`` when
no data was given: then only the weight-level closed forms are used) and the options; it
returns a new module computing approximately the same function. Replacements are made only
of ``torch.nn`` layers and the layers registered in :mod:`slimkit.models.layers`, so
artifacts of transformed models load without importing this package.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import ChannelShuffle, ChannelwiseConv, SeparableConv
from ..registry import Registry
from .fit import fit_conv, moments, top_eigvecs


@dataclass(frozen=True)
class LayerInfo:
    """Shapes seen on the probe pass: the layer's input, and for a Linear the map flattened into it."""

    input_shape: tuple[int, ...] | None = None
    flat_from: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Transform:
    """A registered transform: the layer types it replaces, its options, check and builder."""

    name: str
    types: tuple[type, ...]
    defaults: dict
    check: Callable[[nn.Module, LayerInfo, dict], str | None]
    build: Callable[[nn.Module, torch.Tensor | None, LayerInfo, dict], nn.Module]
    uses_data: bool = True
    paper: str = ""


TRANSFORMS: Registry[Transform] = Registry("transform")


def _register(name: str, types: tuple[type, ...], defaults: dict, paper: str, uses_data: bool = True):
    def deco(pair):
        check, build = pair
        TRANSFORMS.register(name)(Transform(name, types, defaults, check, build, uses_data, paper))
        return pair
    return deco


# ---------------------------------------------------------------- shared checks and helpers

def _pad(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Numeric symmetric padding of a conv, or None when it is not expressible so ('same' with even taps)."""
    p = conv.padding
    if p == "valid":
        return (0, 0)
    if p == "same":
        span = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return None if any(s % 2 for s in span) else (span[0] // 2, span[1] // 2)
    return tuple(p)


def _conv_problem(conv: nn.Conv2d) -> str | None:
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} (only zero padding splits exactly)"
    if _pad(conv) is None:
        return "asymmetric 'same' padding"
    return None


def _params(conv: nn.Conv2d) -> int:
    return conv.weight.numel()


def _bigger(new_params: int, conv: nn.Conv2d) -> str | None:
    # at stride 1 the MAC ratio equals this parameter ratio: a transform that grows it only costs
    if new_params >= _params(conv):
        return f"would not reduce weights ({new_params} >= {_params(conv)})"
    return None


def _like(conv: nn.Module, new: nn.Module) -> nn.Module:
    return new.to(device=conv.weight.device, dtype=conv.weight.dtype)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype).reshape(param.shape))


def _minus_bias(conv: nn.Conv2d) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda xb: conv(xb) if conv.bias is None else conv(xb) - conv.bias.view(1, -1, 1, 1)


# ---------------------------------------------------------------- depthwise_separable

def _dws_check(conv: nn.Conv2d, info: LayerInfo, opt: dict) -> str | None:
    if conv.kernel_size == (1, 1):
        return "1x1 kernel: nothing to separate"
    o, c = conv.out_channels, conv.in_channels
    return _conv_problem(conv) or _bigger(c * conv.weight[0, 0].numel() + c * o, conv)


def _dws_build(conv: nn.Conv2d, x: torch.Tensor | None, info: LayerInfo, opt: dict) -> nn.Module:
    W = conv.weight.detach().double()
    o, c, kh, kw = W.shape
    # per input channel c, W[:, c] (o x kh*kw) is best approximated in Frobenius norm by its top
    # singular pair (Eckart-Young): pointwise[:, c] * depthwise[c]; the scale is split evenly
    U, S, Vh = torch.linalg.svd(W.transpose(0, 1).reshape(c, o, kh * kw), full_matrices=False)
    s = S[:, 0].sqrt()
    pw, dw = U[:, :, 0] * s[:, None], Vh[:, 0, :] * s[:, None]  # (c, o), (c, kh*kw)
    pad = _pad(conv)
    if kh == kw and pad == (kh // 2, kw // 2) and conv.stride[0] == conv.stride[1] and conv.dilation == (1, 1) \
            and conv.bias is None:
        new = SeparableConv(c, o, kh, conv.stride[0])  # the shared Xception block, when it fits
    else:
        new = nn.Sequential(OrderedDict(
            depthwise=nn.Conv2d(c, c, (kh, kw), conv.stride, pad, conv.dilation, groups=c, bias=False),
            pointwise=nn.Conv2d(c, o, 1, bias=conv.bias is not None)))
    new = _like(conv, new)
    depthwise, pointwise = new[0], new[1]
    _set(depthwise.weight, dw)
    _set(pointwise.weight, pw.T)
    if conv.bias is not None:
        _set(pointwise.bias, conv.bias.detach())
    if opt["refine"] and x is not None:
        # with the depthwise filters fixed the pointwise conv enters linearly: fit it on activations
        _set(pointwise.weight, fit_conv(x, depthwise, _minus_bias(conv), (1, 1)))
    return new


_register("depthwise_separable", (nn.Conv2d,), {"refine": True}, "Howard et al. 2017 (MobileNets)")(
    (_dws_check, _dws_build))


# ---------------------------------------------------------------- factorize_kxk

def _kxk_rank(conv: nn.Conv2d, opt: dict) -> int:
    o, c, kh, kw = conv.weight.shape
    # beyond min(o*kh, c*kw) the SVD has no more directions; extra channels would start dead
    return max(1, min(opt["rank"] or o, o * kh, c * kw))


def _kxk_check(conv: nn.Conv2d, info: LayerInfo, opt: dict) -> str | None:
    o, c, kh, kw = conv.weight.shape
    if kh < 2 or kw < 2:
        return f"kernel {kh}x{kw} is already one-dimensional"
    r = _kxk_rank(conv, opt)
    return _conv_problem(conv) or _bigger(r * c * kw + o * r * kh, conv)


def _kxk_build(conv: nn.Conv2d, x: torch.Tensor | None, info: LayerInfo, opt: dict) -> nn.Module:
    W = conv.weight.detach().double()
    o, c, kh, kw = W.shape
    r = _kxk_rank(conv, opt)
    # the 1xk-then-kx1 composite has kernel K[o,c,i,j] = sum_r V[o,r,i] H[r,c,j]: a rank-r
    # factorisation of W viewed as an (o*kh) x (c*kw) matrix (Jaderberg et al. 2014, scheme 2)
    U, S, Vh = torch.linalg.svd(W.permute(0, 2, 1, 3).reshape(o * kh, c * kw), full_matrices=False)
    s = S[:r].sqrt()
    vert = (U[:, :r] * s).reshape(o, kh, r).permute(0, 2, 1)  # (o, r, kh)
    horiz = (s[:, None] * Vh[:r]).reshape(r, c, kw)
    (ph, pw), (sh, sw), (dh, dw) = _pad(conv), conv.stride, conv.dilation
    new = _like(conv, nn.Sequential(OrderedDict(
        horizontal=nn.Conv2d(c, r, (1, kw), (1, sw), (0, pw), (1, dw), bias=False),
        vertical=nn.Conv2d(r, o, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=conv.bias is not None))))
    _set(new.horizontal.weight, horiz)
    _set(new.vertical.weight, vert)
    if conv.bias is not None:
        _set(new.vertical.bias, conv.bias.detach())
    return new


_register("factorize_kxk", (nn.Conv2d,), {"rank": None}, "Szegedy et al. 2016 (Inception v3); Jaderberg et al. 2014",
          uses_data=False)((_kxk_check, _kxk_build))


# ---------------------------------------------------------------- factorize_5x5

def _shift(device) -> torch.Tensor:
    """S[i,j,a,b,u,v] = 1 iff (i+a, j+b) == (u, v): composing two 3x3 cross-correlations."""
    S = torch.zeros(3, 3, 3, 3, 5, 5, dtype=torch.float64, device=device)
    for i in range(3):
        for j in range(3):
            for a in range(3):
                for b in range(3):
                    S[i, j, a, b, i + a, j + b] = 1
    return S


def _f5_check(conv: nn.Conv2d, info: LayerInfo, opt: dict) -> str | None:
    if conv.kernel_size != (5, 5):
        return f"kernel {conv.kernel_size[0]}x{conv.kernel_size[1]} is not 5x5"
    if conv.dilation != (1, 1):
        return f"dilation {conv.dilation}"
    o, c = conv.out_channels, conv.in_channels
    r = opt["rank"] or o
    return _conv_problem(conv) or _bigger(9 * r * (c + o), conv)


def _f5_build(conv: nn.Conv2d, x: torch.Tensor | None, info: LayerInfo, opt: dict) -> nn.Module:
    W = conv.weight.detach().double().cpu()
    o, c = W.shape[:2]
    r = opt["rank"] or o
    S = _shift("cpu")
    # the composite kernel is bilinear in the two 3x3 kernels: alternate the two linear least
    # squares problems on the weights (from a seeded random start) for a data-free init
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(r, c, 3, 3, generator=gen, dtype=torch.float64) / (3 * c ** 0.5)
    Wflat = W.reshape(o, c * 25)
    Wcols = W.permute(0, 2, 3, 1).reshape(o * 25, c)
    for _ in range(opt["iterations"]):
        A = torch.einsum("rcab,ijabuv->rijcuv", first, S).reshape(r * 9, c * 25)
        second = torch.linalg.lstsq(A.T, Wflat.T, driver="gelsd").solution.T.reshape(o, r, 3, 3)
        B = torch.einsum("orij,ijabuv->ouvrab", second, S).reshape(o * 25, r * 9)
        first = torch.linalg.lstsq(B, Wcols, driver="gelsd").solution.reshape(r, 3, 3, c).permute(0, 3, 1, 2)
    (ph, pw), s = _pad(conv), conv.stride
    p1 = ((ph + 1) // 2, (pw + 1) // 2)  # the two paddings must add up to the original
    p2 = (ph - p1[0], pw - p1[1])
    new = _like(conv, nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(c, r, 3, 1, p1, bias=False),
        conv2=nn.Conv2d(r, o, 3, s, p2, bias=conv.bias is not None))))
    _set(new.conv1.weight, first)
    _set(new.conv2.weight, second)
    if conv.bias is not None:
        _set(new.conv2.bias, conv.bias.detach())
    if x is not None:
        # on data the border effects of the split padding and the input statistics count too:
        # refit the second conv on the first one's outputs (linear given the first)
        _set(new.conv2.weight, fit_conv(x, new.conv1, _minus_bias(conv), (3, 3), s, p2))
    return new


_register("factorize_5x5", (nn.Conv2d,), {"rank": None, "iterations": 30}, "Szegedy et al. 2016 (Inception v3)")(
    (_f5_check, _f5_build))


# ---------------------------------------------------------------- grouped_shuffle

def _gs_check(conv: nn.Conv2d, info: LayerInfo, opt: dict) -> str | None:
    g = opt["groups"]
    if g < 2:
        return f"groups={g} (need at least 2)"
    if conv.in_channels % g or conv.out_channels % g:
        return f"channels {conv.in_channels}->{conv.out_channels} not divisible by groups={g}"
    return _conv_problem(conv)


def _gs_build(conv: nn.Conv2d, x: torch.Tensor | None, info: LayerInfo, opt: dict) -> nn.Module:
    g, W = opt["groups"], conv.weight.detach()
    o, c, kh, kw = W.shape
    og, cg = o // g, c // g
    # after ChannelShuffle(g), output position i*g+j comes from grouped channel j*og+i, i.e. from
    # input group j = position mod g; so the assignment is fixed and the block-diagonal init
    # keeps, for each output, the weights on its group's inputs
    q = torch.arange(o).reshape(og, g).T.reshape(-1)  # grouped channel -> final output position
    grp = torch.arange(o) // og
    Wg = W[q].reshape(o, g, cg, kh, kw)[torch.arange(o), grp]
    new = _like(conv, nn.Sequential(OrderedDict(
        conv=nn.Conv2d(c, o, (kh, kw), conv.stride, _pad(conv), conv.dilation, groups=g, bias=conv.bias is not None),
        shuffle=ChannelShuffle(g))))
    if opt["refine"] and x is not None:
        # per group, the best weights given only that group's inputs: least squares on activations
        target = _minus_bias(conv)
        for j in range(g):
            rows = q[j * og:(j + 1) * og].to(W.device)
            Wg[j * og:(j + 1) * og] = fit_conv(x, lambda xb, j=j: xb[:, j * cg:(j + 1) * cg],
                                               lambda xb, rows=rows: target(xb)[:, rows], (kh, kw), conv.stride,
                                               _pad(conv), conv.dilation).to(Wg.dtype)
    _set(new.conv.weight, Wg)
    if conv.bias is not None:
        _set(new.conv.bias, conv.bias.detach()[q.to(W.device)])
    return new


_register("grouped_shuffle", (nn.Conv2d,), {"groups": 2, "refine": True},
          "Zhang et al. 2018 (ShuffleNet); Crowley et al. 2018 (Moonshine)")((_gs_check, _gs_build))


# ---------------------------------------------------------------- bottleneck

def _bn_width(conv: nn.Conv2d, opt: dict) -> int:
    return max(1, min(conv.out_channels // opt["ratio"], conv.in_channels, conv.out_channels))


def _bn_check(conv: nn.Conv2d, info: LayerInfo, opt: dict) -> str | None:
    if conv.kernel_size == (1, 1):
        return "1x1 kernel: no spatial conv to put between reduce and expand"
    o, c, kh, kw = conv.weight.shape
    m = _bn_width(conv, opt)
    return _conv_problem(conv) or _bigger(c * m + m * m * kh * kw + m * o, conv)


def _bn_build(conv: nn.Conv2d, x: torch.Tensor | None, info: LayerInfo, opt: dict) -> nn.Module:
    W = conv.weight.detach().double()
    o, c, kh, kw = W.shape
    m = _bn_width(conv, opt)
    target = _minus_bias(conv)
    # output side: the principal subspace U of the responses (Zhang et al. 2016). Input side: the
    # reduce P = V^T Sigma^-1/2 with V the top eigenvectors of Sigma^1/2 G Sigma^1/2, G = sum over
    # taps of W^T W; for a 1x1 conv this is exactly the optimal rank-m reduce U^T W up to a basis
    # change, and with a white input (Sigma = I, the data-free case) it is the weights' own subspace
    sigma = moments(x) if x is not None else torch.eye(c, dtype=W.dtype, device=W.device)
    vals, vecs = torch.linalg.eigh(sigma)
    vals = vals.clamp_min(1e-6 * float(vals.max().clamp_min(1e-30)))
    half, inv_half = (vecs * vals.sqrt()) @ vecs.T, (vecs * vals.rsqrt()) @ vecs.T
    V = top_eigvecs(half @ torch.einsum("ocij,odij->cd", W, W) @ half, m)
    reduce, right_inv = V.T @ inv_half, half @ V  # reduce @ right_inv = I
    s_out = (W.reshape(o, -1) @ W.reshape(o, -1).T) if x is None else moments(x, target)
    U = top_eigvecs(s_out, m)  # (o, m)
    new = _like(conv, nn.Sequential(OrderedDict(
        reduce=nn.Conv2d(c, m, 1, bias=False),
        conv=nn.Conv2d(m, m, (kh, kw), conv.stride, _pad(conv), conv.dilation, bias=False),
        expand=nn.Conv2d(m, o, 1, bias=conv.bias is not None))))
    _set(new.reduce.weight, reduce)
    _set(new.conv.weight, torch.einsum("oa,ocij,cb->abij", U, W, right_inv))
    _set(new.expand.weight, U)
    if conv.bias is not None:
        _set(new.expand.bias, conv.bias.detach())
    if opt["refine"] and x is not None:
        # then, in order, each later layer is linear given the earlier ones: refit on activations
        Ut = U.T.to(conv.weight.dtype)[:, :, None, None]
        _set(new.conv.weight, fit_conv(x, new.reduce, lambda xb: F.conv2d(target(xb), Ut), (kh, kw), conv.stride,
                                       _pad(conv), conv.dilation))
        _set(new.expand.weight, fit_conv(x, lambda xb: new.conv(new.reduce(xb)), target, (1, 1)))
    return new


_register("bottleneck", (nn.Conv2d,), {"ratio": 4, "refine": True}, "He et al. 2016 (ResNet bottleneck)")(
    (_bn_check, _bn_build))


# ---------------------------------------------------------------- channelwise

def channelwise_geometry(c: int, o: int, dc: int) -> tuple[int, int, int] | None:
    """``(groups, stride, padding)`` of a :class:`ChannelwiseConv` with kernel ``dc`` mapping ``c`` to ``o`` channels.

    Fewest kernels first (fewest parameters), then the stride that spreads the windows evenly
    over the channels, then padding closest to centred; ``None`` if no geometry fits.
    """
    for g in [g for g in range(1, o + 1) if o % g == 0]:
        depth = o // g
        best = None
        for s in range(1, c + 1):
            for p in range(dc):
                if (c + 2 * p - dc) >= 0 and (c + 2 * p - dc) // s + 1 == depth:
                    key = (abs(s * depth - c), abs(2 * p - (dc - 1)))
                    if best is None or key < best[0]:
                        best = (key, (g, s, p))
        if best is not None:
            return best[1]
    return None


def _cw_check(conv: nn.Conv2d, info: LayerInfo, opt: dict) -> str | None:
    if conv.kernel_size != (1, 1):
        return f"kernel {conv.kernel_size[0]}x{conv.kernel_size[1]} is not 1x1"
    if conv.stride != (1, 1) or _pad(conv) != (0, 0):
        return "strided or padded 1x1 conv"
    if conv.bias is not None:
        return "has a bias (ChannelwiseConv has none)"
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups})"
    geo = channelwise_geometry(conv.in_channels, conv.out_channels, opt["dc"])
    if geo is None:
        return f"no channel-wise geometry maps {conv.in_channels} to {conv.out_channels} channels with dc={opt['dc']}"
    return _bigger(geo[0] * opt["dc"], conv)


def _cw_build(conv: nn.Conv2d, x: torch.Tensor | None, info: LayerInfo, opt: dict) -> nn.Module:
    dc, W = opt["dc"], conv.weight.detach().double()[:, :, 0, 0]
    o, c = W.shape
    g, s, p = channelwise_geometry(c, o, dc)
    depth = o // g
    # the channel-wise conv is the o x c matrix M(w) = sum_k w_k E_k (banded, weights shared
    # along the band); minimise E||W v - M(w) v||^2 = tr((W-M) Sigma (W-M)^T), linear in w,
    # with Sigma the inputs' second moment (identity without data: plain weight least squares)
    E = torch.zeros(g * dc, o, c, dtype=W.dtype, device=W.device)
    for k in range(g):
        for t in range(dc):
            for d in range(depth):
                ch = d * s + t - p
                if 0 <= ch < c:
                    E[k * dc + t, k * depth + d, ch] = 1
    sigma = moments(x) if x is not None else torch.eye(c, dtype=W.dtype, device=W.device)
    ES = E @ sigma
    G = torch.einsum("koc,loc->kl", ES, E)
    b = torch.einsum("oc,koc->k", W, ES)
    G = G + 1e-9 * G.diagonal().mean().clamp_min(1e-30) * torch.eye(len(b), dtype=G.dtype, device=G.device)
    w = torch.linalg.lstsq(G.cpu(), b.cpu()[:, None]).solution[:, 0]
    new = _like(conv, ChannelwiseConv(g, dc, p, s))
    _set(new.conv.weight, w)
    return new


_register("channelwise", (nn.Conv2d,), {"dc": 7}, "Gao et al. 2018 (ChannelNets)")((_cw_check, _cw_build))


# ---------------------------------------------------------------- gap_head

def _gap_shape(lin: nn.Linear, info: LayerInfo, opt: dict) -> tuple[int, int, int] | None:
    if opt["shape"] is not None:
        return tuple(int(v) for v in opt["shape"])
    return info.flat_from if info is not None else None


def _gap_check(lin: nn.Linear, info: LayerInfo, opt: dict) -> str | None:
    shape = _gap_shape(lin, info, opt)
    if shape is None:
        if info is None or info.input_shape is None:
            return "needs an example input (or shape=(C,H,W)) to find the feature map flattened into it"
        return "its input is not a flattened feature map"
    c, h, w = shape
    if c * h * w != lin.in_features:
        return f"shape {shape} does not flatten to in_features={lin.in_features}"
    if h * w == 1:
        return "its input is already globally pooled (1x1 map)"
    return None


def _gap_build(lin: nn.Linear, x: torch.Tensor | None, info: LayerInfo, opt: dict) -> nn.Module:
    c, h, w = _gap_shape(lin, info, opt)
    k = lin.out_features
    # average then 1x1 conv equals 1x1 conv then average (both linear), at 1/(h*w) of the MACs;
    # with weight w'[k,c] = h*w * mean_hw W[k,c,h,w] outputs match exactly for spatially constant W
    new = _like(lin, nn.Sequential(OrderedDict(
        unflatten=nn.Unflatten(1, (c, h, w)), pool=nn.AdaptiveAvgPool2d(1),
        conv=nn.Conv2d(c, k, 1, bias=lin.bias is not None), flatten=nn.Flatten())))
    _set(new.conv.weight, lin.weight.detach().reshape(k, c, h * w).sum(2))
    if lin.bias is not None:
        _set(new.conv.bias, lin.bias.detach())
    return new


_register("gap_head", (nn.Linear,), {"shape": None}, "Lin et al. 2014 (Network in Network)", uses_data=False)(
    (_gap_check, _gap_build))
