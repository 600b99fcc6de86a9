"""Sparse execution where it pays on this machine, chosen by measurement (never assumed).

A sparse weight saves bytes on disk at any sparsity, but it saves time only when a sparse kernel
beats the dense GEMM, which on CPUs needs high sparsity, large layers and often a large batch
(docs/benchmarks.md, "When sparse execution pays"). :func:`sparse_execution` times every linear
layer and 1x1 conv of a model on its real input shape, dense against ``torch.sparse.mm`` with the
weight in CSR, and swaps in :class:`SparseLinear` / :class:`SparseConv1x1` only where the sparse
kernel is faster by ``min_speedup`` at every batch size asked for. The swapped layers keep their
dense weight as their state (artifacts and packed files store them as usual), build the CSR copy
when the weight changes, and compute densely while being traced or exported (ONNX, TorchScript),
so exporters see plain layers.

Example:
    >>> import torch
    >>> from torch import nn
    >>> lin = nn.Linear(256, 256)
    >>> with torch.no_grad():
    ...     lin.weight[torch.rand(256, 256) < 0.98] = 0
    >>> s = SparseLinear.from_dense(lin)
    >>> x = torch.randn(4, 256)
    >>> torch.allclose(s(x), lin(x), atol=1e-5)
    True
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..artifact import register_module
from ..bench import Runner, time_interleaved

__all__ = ["SparseConv1x1", "SparseLinear", "sparse_execution"]


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() or (
        hasattr(torch, "compiler") and torch.compiler.is_compiling())


class _CSRWeight:
    """The CSR copy of a dense weight, rebuilt when the weight's storage or version changes."""

    def __init__(self) -> None:
        self.key = None
        self.csr = None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        # a copy made under inference mode cannot be used where autograd records (and vice versa it is cheap)
        key = (weight.data_ptr(), weight._version, weight.shape, torch.is_inference_mode_enabled())
        if key != self.key:
            import warnings

            with warnings.catch_warnings():  # "CSR support is in beta": the equivalence tests are ours
                warnings.simplefilter("ignore", UserWarning)
                self.csr = weight.detach().reshape(weight.shape[0], -1).to_sparse_csr()
            self.key = key
        return self.csr


class _FromDense:
    """``from_dense(layer)``: the CSR version of a dense layer, same weights, same mode."""

    @classmethod
    def from_dense(cls, layer: nn.Module) -> nn.Module:
        out = cls(*cls.shape_of(layer), bias=layer.bias is not None)
        out.load_state_dict(layer.state_dict())
        return out.train(layer.training)


class SparseLinear(_FromDense, nn.Linear):
    """An ``nn.Linear`` that multiplies with its weight in CSR (``torch.sparse.mm``) outside training and export."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._csr = _CSRWeight()

    @staticmethod
    def shape_of(layer: nn.Linear) -> tuple[int, int]:
        return layer.in_features, layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or _exporting() or x.dim() != 2:
            return F.linear(x, self.weight, self.bias)
        y = torch.sparse.mm(self._csr.get(self.weight), x.t()).t()
        return y + self.bias if self.bias is not None else y


class SparseConv1x1(_FromDense, nn.Conv2d):
    """A 1x1, stride-1, ungrouped ``nn.Conv2d`` computed as a CSR matrix product outside training and export."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)
        self._csr = _CSRWeight()

    @staticmethod
    def shape_of(layer: nn.Conv2d) -> tuple[int, int]:
        return layer.in_channels, layer.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or _exporting():
            return super().forward(x)
        n, c, h, w = x.shape
        cols = x.permute(1, 0, 2, 3).reshape(c, n * h * w)
        y = torch.sparse.mm(self._csr.get(self.weight), cols).reshape(-1, n, h, w).permute(1, 0, 2, 3)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y.contiguous()


register_module(SparseLinear, config=lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                                                "bias": m.bias is not None})
register_module(SparseConv1x1, config=lambda m: {"in_channels": m.in_channels, "out_channels": m.out_channels,
                                                 "bias": m.bias is not None})


def _eligible(m: nn.Module) -> type | None:
    if type(m) is nn.Linear:
        return SparseLinear
    if (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1
            and m.padding in ((0, 0), "valid") and m.dilation == (1, 1)):
        return SparseConv1x1
    return None


def _inputs(model: nn.Module, example: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, args[0].detach()))
               for n, m in model.named_modules() if n in names]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return seen


def sparse_execution(model: nn.Module, input_size: tuple[int, ...], *, batch_sizes: Iterable[int] = (1,),
                     min_speedup: float = 1.1, min_sparsity: float = 0.5, pairs: int = 7,
                     window_s: float = 0.01) -> tuple[nn.Module, list[dict]]:
    """Swap each linear layer and 1x1 conv for its CSR version where that is measured faster, in place.

    Args:
        model: an eval-mode model, typically sparse (:func:`slimkit.sparse.sparsify`).
        input_size: one input's (C, H, W).
        batch_sizes: the sparse kernel must win at every one of these.
        min_speedup: the median of the per-pair dense/sparse time ratios must reach this.
        min_sparsity: layers less sparse than this are not timed (a CSR product cannot win there).
        pairs: interleaved dense/sparse timing rounds per layer and batch size (:func:`slimkit.bench.time_interleaved`).
        window_s: each timing sample lasts at least this long.

    Returns:
        ``(model, decisions)``: per eligible layer its sparsity, the median speed-up per batch size and
        whether it was swapped.
    """
    model.eval()
    candidates = {n: m for n, m in model.named_modules() if _eligible(m) is not None}
    decisions = []
    inputs = {b: _inputs(model, torch.zeros(b, *input_size), set(candidates)) for b in batch_sizes}
    for name, layer in candidates.items():
        sparsity = float((layer.weight == 0).float().mean())
        row = {"name": name, "kind": type(layer).__name__, "sparsity": sparsity, "speedup": {}, "sparse": False}
        if sparsity >= min_sparsity and all(name in inputs[b] for b in batch_sizes):
            fast = _eligible(layer).from_dense(layer).eval()
            for b in batch_sizes:
                x = torch.randn_like(inputs[b][name])
                runners = [Runner("eager", lambda m=m, x=x: m(x), m) for m in (layer, fast)]
                dense, sparse = time_interleaved(runners, warmup=2, repeats=pairs, min_time_s=0.0,
                                                 min_sample_s=window_s)
                row["speedup"][str(b)] = statistics.median(d / s for d, s in zip(dense, sparse))
            row["sparse"] = all(r >= min_speedup for r in row["speedup"].values())
            if row["sparse"]:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, fast)
        decisions.append(row)
    return model, decisions
