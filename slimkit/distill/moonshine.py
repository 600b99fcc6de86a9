"""Moonshine (Crowley, Gray & Storkey, NeurIPS 2018): a student made from the teacher with cheap convolutions.

Every full 3x3 convolution of the teacher is replaced by a grouped 3x3 convolution (``G``
groups) followed by a pointwise 1x1 convolution, the paper's ``G(g) + pointwise`` block; the
rest of the network is unchanged, so the student has the teacher's stages and attention
transfer pairs them automatically.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from ..errors import SlimkitError
from ..models.layers import ChannelShuffle


def cheap_conv_params(conv: nn.Conv2d, groups: int) -> int:
    """Weights of the grouped + pointwise replacement of ``conv`` (plus its bias, if any)."""
    o, c, kh, kw = conv.weight.shape
    return o * c * kh * kw // groups + o * o + (o if conv.bias is not None else 0)


def _eligible(conv: nn.Conv2d, groups: int) -> str | None:
    if conv.kernel_size != (3, 3):
        return f"kernel {conv.kernel_size} is not 3x3"
    if conv.groups != 1:
        return f"already grouped (groups={conv.groups})"
    if conv.in_channels % groups or conv.out_channels % groups:
        return f"channels {conv.in_channels}->{conv.out_channels} not divisible by {groups}"
    if cheap_conv_params(conv, groups) >= conv.weight.numel() + (0 if conv.bias is None else conv.out_channels):
        return "the replacement would not be smaller"
    return None


def _cheap(conv: nn.Conv2d, groups: int, init: str) -> nn.Sequential:
    o = conv.out_channels
    if init == "teacher":
        # reuse slimkit.transform's grouped initialisation (the block-diagonal part of the
        # teacher's kernel, with a channel shuffle after it); the shuffle is a permutation, so a
        # pointwise conv set to that permutation reproduces the grouped_shuffle output exactly
        from ..transform.methods import TRANSFORMS, LayerInfo

        built = TRANSFORMS.get("grouped_shuffle").build(conv, None, LayerInfo(), {"groups": groups, "refine": False})
        grouped = built.conv
        src = ChannelShuffle(groups)(torch.arange(o, dtype=torch.float32).view(1, o, 1, 1)).flatten().long()
        pointwise = nn.Conv2d(o, o, 1, bias=False).to(conv.weight.device, conv.weight.dtype)
        with torch.no_grad():
            pointwise.weight.zero_()
            pointwise.weight[torch.arange(o), src, 0, 0] = 1
    elif init == "scratch":
        # the paper trains the cheap student from scratch with attention transfer
        grouped = nn.Conv2d(conv.in_channels, o, 3, conv.stride, conv.padding, conv.dilation, groups=groups,
                            bias=conv.bias is not None)
        pointwise = nn.Conv2d(o, o, 1, bias=False)
        for m in (grouped, pointwise):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        grouped.to(conv.weight.device, conv.weight.dtype)
        pointwise.to(conv.weight.device, conv.weight.dtype)
    else:
        raise SlimkitError(f"moonshine init must be 'teacher' or 'scratch', got {init!r}")
    return nn.Sequential(OrderedDict(grouped=grouped, pointwise=pointwise))


def moonshine_student(teacher: nn.Module, groups: int = 4, init: str = "teacher") -> nn.Module:
    """A copy of ``teacher``, each eligible 3x3 conv now grouped (``groups``) + pointwise convs (Crowley et al.).

    A 3x3 conv ``c -> o`` has ``9co`` weights, its replacement ``9co/G + o^2``. Convs whose
    channels ``groups`` does not divide (e.g. an RGB stem), that are already grouped, or whose
    replacement would not be smaller are kept; ``student.slimkit_last_moonshine`` lists the
    replaced and kept layers. ``init="teacher"`` starts from the teacher's weights through
    :mod:`slimkit.transform`'s grouped initialisation; ``"scratch"`` is the paper's random start.
    The teacher is not modified.
    """
    if int(groups) < 2:
        raise SlimkitError(f"moonshine groups must be at least 2, got {groups}")
    student = copy.deepcopy(teacher)
    replaced, kept = [], {}
    for name, m in list(student.named_modules()):
        if not isinstance(m, nn.Conv2d) or not name:
            continue
        why = _eligible(m, int(groups))
        if why:
            kept[name] = why
            continue
        parent, _, child = name.rpartition(".")
        new = _cheap(m, int(groups), init)
        new.train(m.training)
        student.get_submodule(parent)._modules[child] = new
        replaced.append({"name": name, "params_before": sum(p.numel() for p in m.parameters()),
                         "params_after": sum(p.numel() for p in new.parameters())})
    if not replaced:
        raise SlimkitError(f"moonshine: no 3x3 conv of {type(teacher).__name__} can take groups={groups} "
                           f"({'; '.join(f'{k}: {v}' for k, v in list(kept.items())[:4]) or 'no convs'})")
    student.slimkit_history = list(getattr(teacher, "slimkit_history", []))  # its own list, not the teacher's
    student.slimkit_last_moonshine = {"groups": int(groups), "init": init, "replaced": replaced, "kept": kept}
    return student
