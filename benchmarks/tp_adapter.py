"""Torch-Pruning adapter for benchmarks/prune.py: option-A shortcuts as a gather it can prune, and its ratio search.

Torch-Pruning does not understand the option-A shortcut (``F.pad`` over channels: unmodified it
returns a broken model), so every ``PadShortcut`` is first swapped for an equivalent
``IndexPad`` (cat a zero channel + index_select) with a customised pruner; ``tp_search``
bisects its global ``pruning_ratio`` to a MAC target.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from slimkit.profile import profile


class IndexPad(nn.Module):
    """Option-A shortcut as a gather: output channel i is input channel ``index[i]``, or zero where it is -1."""

    def __init__(self, stride: int, index: list[int], in_channels: int) -> None:
        super().__init__()
        self.stride, self.in_channels = stride, in_channels
        self.register_buffer("index", torch.tensor(index, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        zero = x.new_zeros(x.shape[0], 1, x.shape[2], x.shape[3])
        src = torch.where(self.index < 0, torch.full_like(self.index, self.in_channels), self.index)
        return torch.cat([x, zero], 1).index_select(1, src)


def _swap_pads(model: nn.Module) -> None:
    from slimkit.models.cifar_resnet import PadShortcut
    from slimkit.prune import PrunedPadShortcut

    for name, m in list(model.named_modules()):
        if isinstance(m, (PadShortcut, PrunedPadShortcut)) and m.out_channels != m.in_channels:
            before = getattr(m, "before", (m.out_channels - m.in_channels) // 2)
            after = m.out_channels - m.in_channels - before
            index = [-1] * before + list(range(m.in_channels)) + [-1] * after
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr,
                    IndexPad(m.stride, index, m.in_channels))


def _index_pad_pruner():
    import torch_pruning as tp

    class IndexPadPruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer: IndexPad, idxs):
            drop = {int(i) for i in idxs}
            layer.index = layer.index[[i for i in range(len(layer.index)) if i not in drop]]
            return layer

        def prune_in_channels(self, layer: IndexPad, idxs):
            drop = sorted({int(i) for i in idxs})
            old = layer.index.tolist()
            new = []
            for v in old:  # a removed input channel leaves a zero channel; later ones shift down
                new.append(-1 if v in drop else (v - sum(1 for d in drop if d < v) if v >= 0 else -1))
            layer.index = torch.tensor(new, dtype=torch.long)
            layer.in_channels -= len(drop)
            return layer

        def get_out_channels(self, layer: IndexPad):
            return len(layer.index)

        def get_in_channels(self, layer: IndexPad):
            return layer.in_channels

    return IndexPadPruner()


def tp_prune(model: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    _swap_pads(m)
    pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.MagnitudeImportance(p=1), global_pruning=True,
                                  pruning_ratio=ratio, ignored_layers=[m.linear], round_to=8,
                                  customized_pruners={IndexPad: _index_pad_pruner()})
    pruner.step()
    return m


def tp_search(model: nn.Module, target: float, macs0: int, example: torch.Tensor,
              iters: int = 12) -> tuple[nn.Module, float, list]:
    """Bisection on Torch-Pruning's global pruning_ratio: the smallest ratio whose profiled MACs meet the target."""
    lo, hi, best, trace = 0.0, 0.95, None, []
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = tp_prune(model, mid, example)
        macs = profile(m, example).macs
        trace.append((round(mid, 4), macs / macs0))
        if macs <= target * macs0:
            hi, best = mid, (m, mid)
        else:
            lo = mid
    if best is None:
        m = tp_prune(model, hi, example)
        best = (m, hi)
    return best[0], best[1], trace
