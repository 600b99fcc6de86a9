"""The cost model of structured pruning: MACs and parameters of the pruned layers from channel counts.

Global pruning to a budget (Molchanov et al. 2019: the budget in FLOPs) needs the cost of a
candidate removal without re-running the network; every prunable layer's cost is a product of
its kept input and output widths, read from the channel graph.
"""

from __future__ import annotations

import numpy as np

from .graph import ChannelGraph

__all__ = ["estimate"]


def _counts(graph: ChannelGraph, removed: np.ndarray) -> dict[str, tuple[int, int]]:
    keep = ~removed
    out = {}
    for name, rec in graph.layers.items():
        kin = int(keep[rec.in_cls].sum()) if rec.in_cls is not None else 0
        kout = int(keep[rec.out_cls].sum()) if rec.out_cls is not None else 0
        out[name] = (kin, kout)
    return out


def _layer_cost(rec, kin: int, kout: int) -> tuple[int, int]:
    m = rec.module
    if rec.kind == "conv":
        k = m.kernel_size[0] * m.kernel_size[1]
        return rec.macs_unit * kin * kout, k * kin * kout + (kout if m.bias is not None else 0)
    if rec.kind == "gconv":  # the same positions leave every group: groups is unchanged
        k, g = m.kernel_size[0] * m.kernel_size[1], m.groups
        return rec.macs_unit * kin * kout // g, k * kin * kout // g + (kout if m.bias is not None else 0)
    if rec.kind == "dwconv":
        k = m.kernel_size[0] * m.kernel_size[1]
        return rec.macs_unit * kout, k * kout + (kout if m.bias is not None else 0)
    if rec.kind == "linear":
        return rec.macs_unit * kin * kout, kin * kout + (kout if m.bias is not None else 0)
    if rec.kind == "bn":
        return 0, (2 * kout if m.weight is not None else 0)
    return 0, 0


def estimate(graph: ChannelGraph, removed: np.ndarray) -> tuple[int, int]:
    """(MACs, params) of the prunable layers after removing the classes in ``removed`` (the cost model).

    The profiler counts a conv as ``k*k*C_in/groups*C_out*H_out*W_out`` per call and a linear as
    ``rows*in*out``; those layers and batch norms are all that pruning changes, so the total of
    the pruned model is ``profile_before - estimate(none) + estimate(removed)`` exactly. This is
    the resource model that global pruning to a budget needs (as in Molchanov et al. 2019, where
    the budget is FLOPs), computed from the graph rather than by re-running the network.
    """
    macs = params = 0
    for name, (kin, kout) in _counts(graph, removed).items():
        a, b = _layer_cost(graph.layers[name], kin, kout)
        macs, params = macs + a, params + b
    return macs, params
