"""Surgery: turn a channel plan into a smaller ``nn.Module`` (no masks left).

Every layer a removed channel class touches is rebuilt as a smaller layer of the same
``torch.nn`` type holding the kept slices of its weights, as DepGraph (Fang et al., CVPR 2023)
prescribes for coupled layers. The option-A shortcut of CIFAR ResNets gets its own pruned form,
:class:`PrunedPadShortcut`, which routes each kept input channel to its output position.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..artifact import register_module
from ..errors import SlimkitError
from .graph import ChannelGraph
from .trace import same_as_base

__all__ = ["PrunedPadShortcut", "apply_plan", "pad_sources"]


@register_module
class PrunedPadShortcut(nn.Module):
    """Option-A shortcut after pruning: subsample, then place each input channel at its output position.

    :class:`slimkit.models.cifar_resnet.PadShortcut` always pads ``extra // 2`` zero channels
    first. After pruning, the kept zero channels before and after the input can be any two counts
    (``before``), and, because the stages of the trunk are pruned independently, an input channel
    can be removed while its output position stays (it then carries zeros) or the reverse:
    ``sources`` then gives, per output channel, the input channel it copies or -1 for zeros.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, before: int = 0,
                 sources: list[int] | None = None) -> None:
        super().__init__()
        if sources is None and out_channels < in_channels + before:
            raise ValueError(f"PrunedPadShortcut: {in_channels} + {before} > {out_channels}")
        if sources is not None:
            sources = [int(s) for s in sources]
            if len(sources) != out_channels or any(not -1 <= s < in_channels for s in sources):
                raise ValueError(f"PrunedPadShortcut: sources must be {out_channels} input indices in "
                                 f"[-1, {in_channels}), got {sources}")
            # index in_channels is the zero channel appended in forward
            self.register_buffer("index", torch.tensor([s if s >= 0 else in_channels for s in sources]),
                                 persistent=False)
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.before, self.sources = before, sources

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.sources is not None:
            return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 1)).index_select(1, self.index)
        after = self.out_channels - self.in_channels - self.before
        if self.before or after:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, self.before, after))
        return x

    def extra_repr(self) -> str:
        tail = f", sources={self.sources}" if self.sources is not None else f", before={self.before}"
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}{tail}"


def pad_sources(m: nn.Module) -> np.ndarray:
    """Per output channel of an option-A shortcut, the input channel it copies (-1: zeros)."""
    sources = getattr(m, "sources", None)
    if sources is not None:
        return np.asarray(sources, dtype=np.int64)
    extra = m.out_channels - m.in_channels
    first = getattr(m, "before", extra // 2)
    out = np.full(m.out_channels, -1, dtype=np.int64)
    out[first:first + m.in_channels] = np.arange(m.in_channels)
    return out


def _idx(keep: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.nonzero(keep)[0], dtype=torch.long)


def _same_type(m: nn.Module, tensors: dict[str, torch.Tensor], **attrs) -> nn.Module:
    """A copy of a :data:`~slimkit.prune.trace.SAME_AS_BASE` layer (e.g. timm's BatchNormAct2d) with new tensors.

    Rebuilding it as its ``torch.nn`` base would drop what its forward adds (the activation,
    "same" padding), so the module is copied without its tensors and given the kept slices.
    """
    saved = {k: getattr(m, k) for k in tensors}
    for k in tensors:  # the big tensors are not copied only to be replaced
        m._parameters.pop(k, None) if k in m._parameters else m._buffers.pop(k, None)
    try:
        new = copy.deepcopy(m)
    finally:
        for k, v in saved.items():
            (m._parameters if isinstance(v, nn.Parameter) else m._buffers)[k] = v
    for k, v in tensors.items():
        if isinstance(saved[k], nn.Parameter):
            new._parameters[k] = nn.Parameter(v.clone(), requires_grad=saved[k].requires_grad)
        else:
            new._buffers[k] = v.clone()
    for k, v in attrs.items():
        setattr(new, k, v)
    return new


def _new_conv(m: nn.Conv2d, kin: np.ndarray, kout: np.ndarray, kind: str) -> nn.Conv2d:
    """The conv holding the kept slices of ``m``: dense, grouped (same positions kept in every group) or depthwise."""
    n_in, n_out = int(kin.sum()), int(kout.sum())
    groups = {"conv": 1, "gconv": m.groups, "dwconv": n_in}[kind]
    w = m.weight.detach()[_idx(kout)]
    if kind == "conv":
        w = w[:, _idx(kin)]
    elif kind == "gconv":  # the weight's input axis is the position within a group
        w = w[:, _idx(kin[:m.in_channels // m.groups])]
    if same_as_base(m):
        tensors = {"weight": w} | ({"bias": m.bias.detach()[_idx(kout)]} if m.bias is not None else {})
        return _same_type(m, tensors, in_channels=n_in, out_channels=n_out, groups=groups)
    # skip_init: the weights are overwritten at once, and random init of a large layer costs seconds
    new = nn.utils.skip_init(nn.Conv2d, n_in, n_out, m.kernel_size, m.stride, m.padding, m.dilation,
                             groups=groups, bias=m.bias is not None, padding_mode=m.padding_mode,
                             device=m.weight.device, dtype=m.weight.dtype)
    new.weight.data.copy_(w)
    if m.bias is not None:
        new.bias.data.copy_(m.bias.detach()[_idx(kout)])
    new.train(m.training)
    return new


def _new_linear(m: nn.Linear, kin: torch.Tensor, kout: torch.Tensor) -> nn.Linear:
    if same_as_base(m):
        tensors = {"weight": m.weight.detach()[kout][:, kin]} | (
            {"bias": m.bias.detach()[kout]} if m.bias is not None else {})
        return _same_type(m, tensors, in_features=len(kin), out_features=len(kout))
    new = nn.utils.skip_init(nn.Linear, len(kin), len(kout), bias=m.bias is not None, device=m.weight.device,
                             dtype=m.weight.dtype)
    new.weight.data.copy_(m.weight.detach()[:, kin][kout] if len(kout) < len(kin) else m.weight.detach()[kout][:, kin])
    if m.bias is not None:
        new.bias.data.copy_(m.bias.detach()[kout])
    new.train(m.training)
    return new


def _new_bn(m: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor) -> nn.Module:
    if same_as_base(m):
        tensors = {k: getattr(m, k).detach()[keep] for k in ("weight", "bias", "running_mean", "running_var")
                   if getattr(m, k, None) is not None}
        return _same_type(m, tensors, num_features=len(keep))
    ref = m.weight if m.weight is not None else m.running_mean
    new = type(m)(len(keep), eps=m.eps, momentum=m.momentum, affine=m.affine,
                  track_running_stats=m.track_running_stats,
                  **({"device": ref.device, "dtype": ref.dtype} if ref is not None else {}))
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, name, None)
        if t is not None:
            getattr(new, name).data.copy_(t.detach()[keep])
    if m.num_batches_tracked is not None:
        new.num_batches_tracked.copy_(m.num_batches_tracked)
    new.train(m.training)
    return new


def _new_pad(m: nn.Module, keep_in: np.ndarray, keep_out: np.ndarray) -> nn.Module:
    from ..models.cifar_resnet import PadShortcut

    renumber = np.where(keep_in, np.cumsum(keep_in) - 1, -1)
    src = pad_sources(m)[keep_out]
    src = np.where(src >= 0, renumber[np.maximum(src, 0)], -1)
    kin, kout = int(keep_in.sum()), int(keep_out.sum())
    placed = np.nonzero(src >= 0)[0]
    before = int(placed[0]) if len(placed) else 0
    if len(placed) == kin and (src[placed] == np.arange(kin)).all() and (placed == before + np.arange(kin)).all():
        # every kept input in one block in order: a plain pad, no gather
        if before == (kout - kin) // 2:
            return PadShortcut(kin, kout, m.stride)
        return PrunedPadShortcut(kin, kout, m.stride, before)
    return PrunedPadShortcut(kin, kout, m.stride, sources=src.tolist())


def _fix_attrs(model: nn.Module) -> None:
    """Keep registered blocks' constructor attributes true to their pruned children (artifacts read them)."""
    from ..models.layers import ConvBNAct, DepthwiseSeparable, SeparableConv, SqueezeExcite

    for m in model.modules():
        if isinstance(m, ConvBNAct):
            m.in_channels, m.out_channels, m.groups = m[0].in_channels, m[0].out_channels, m[0].groups
        elif isinstance(m, DepthwiseSeparable):
            m.in_channels, m.out_channels = m[0].in_channels, m[1].out_channels
        elif isinstance(m, SeparableConv):
            m.in_channels, m.out_channels = m[0].in_channels, m[1].out_channels
        elif isinstance(m, SqueezeExcite):
            m.channels = m.fc1.in_channels


def apply_plan(model: nn.Module, graph: ChannelGraph, removed: np.ndarray) -> dict[str, dict[str, list[int]]]:
    """Remove the classes ``removed`` from ``model`` in place; return the kept indices per changed layer.

    Every layer a channel class touches is cut at once, as DepGraph (Fang et al., CVPR 2023)
    prescribes for coupled layers.

    Each changed layer is replaced by a smaller layer of the same ``torch.nn`` type holding the
    kept slices of its weights (no masks); a module reachable under several names is replaced
    under all of them. The result maps a layer name to ``{"in": [...], "out": [...]}`` (batch
    norms and depthwise convs have only ``"out"``), indices into the layer as it was.
    """
    keep_cls = ~removed
    paths: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    kept: dict[str, dict[str, list[int]]] = {}
    for name, rec in graph.layers.items():
        m = rec.module
        kin = keep_cls[rec.in_cls] if rec.in_cls is not None else None
        kout = keep_cls[rec.out_cls] if rec.out_cls is not None else None
        if (kin is None or kin.all()) and (kout is None or kout.all()):
            continue
        if rec.kind in ("conv", "gconv", "dwconv"):
            new = _new_conv(m, kin, kout, rec.kind)
        elif rec.kind == "linear":
            new = _new_linear(m, _idx(kin), _idx(kout))
        elif rec.kind == "bn":
            new = _new_bn(m, _idx(kout))
        elif rec.kind == "pad":
            new = _new_pad(m, kin, kout)
        else:
            raise SlimkitError(f"internal: layer {name} ({rec.kind}) was blocked but the plan changes it")
        entry = {"out": np.nonzero(kout)[0].tolist()}
        if rec.kind in ("conv", "gconv", "linear", "pad"):
            entry["in"] = np.nonzero(kin)[0].tolist()
        kept[name] = entry
        for path in paths.get(id(m), [name]):
            parent_name, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if isinstance(parent, (nn.Sequential, nn.ModuleList)) and attr.isdigit():
                parent[int(attr)] = new
            else:
                setattr(parent, attr, new)
    _fix_attrs(model)
    return kept
