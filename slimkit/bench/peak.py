"""Roofline context: the machine's achieved matmul peak and a model's multiply-accumulates."""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .runners import default_threads, fixed_threads
from .stats import stats


@dataclass(frozen=True)
class MachinePeak:
    """Achieved dense-matmul throughput at a thread count: the compute roof for this process.

    ``fp32_best_gflops`` is the fastest run, the roof used for "fraction of peak": a roof is what
    the machine can attain, and on a shared machine the median absorbs other jobs' contention
    (a median roof let fast runtimes exceed 100 %). ``fp32_gflops`` is the median rate.
    ``int8_gops`` is None when the backend has no int8 matmul that runs here; ``int8_note``
    then says why (otherwise it names the kernel that was timed).
    """

    threads: int
    size: int
    fp32_gflops: float
    fp32_best_gflops: float
    int8_gops: float | None
    int8_note: str

    def to_dict(self) -> dict:
        return asdict(self)


_PEAKS: dict[tuple[int, int], MachinePeak] = {}


def _rates(fn, ops: float, runs: int) -> tuple[float, float]:
    fn()  # first call allocates and picks kernels; it is not the steady state
    fn()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return ops / stats(times)["median"] / 1e9, ops / min(times) / 1e9


def machine_peak(threads: int | None = None, size: int = 1024, runs: int = 5) -> MachinePeak:
    """Measure this machine's achieved fp32 (and, where available, int8) matmul GFLOP/s.

    The roofline model (Williams, Waterman & Patterson 2009, "Roofline: an insightful visual
    performance model for multicore architectures") bounds a kernel's speed by the machine's
    peak compute; instead of a datasheet number this uses the *achieved* peak of a large square
    matmul (``size`` x ``size``, median of ``runs`` timings at ``threads`` threads), which is
    what the BLAS on this box can actually sustain and so the honest denominator for a model's
    "fraction of peak". int8 uses ``torch._int_mm`` (int8 x int8 -> int32) when it runs on this
    CPU and reports None with the reason otherwise. Results are cached per process for each
    (threads, size), since the measurement takes about a second.
    """
    threads = threads or default_threads()
    key = (threads, size)
    if key in _PEAKS:
        return _PEAKS[key]
    ops = 2.0 * size ** 3
    gen = torch.Generator().manual_seed(0)
    with fixed_threads(threads), torch.inference_mode():
        a = torch.randn(size, size, generator=gen)
        b = torch.randn(size, size, generator=gen)
        c = torch.empty(size, size)
        fp32, fp32_best = _rates(lambda: torch.mm(a, b, out=c), ops, runs)
        int8: float | None
        try:
            if not hasattr(torch, "_int_mm"):
                raise RuntimeError(f"torch {torch.__version__} has no torch._int_mm")
            ai = torch.randint(-128, 128, (size, size), dtype=torch.int8, generator=gen)
            bi = torch.randint(-128, 128, (size, size), dtype=torch.int8, generator=gen)
            int8 = _rates(lambda: torch._int_mm(ai, bi), ops, runs)[0]
            note = "torch._int_mm (int8 x int8 -> int32)"
        except Exception as e:  # any backend refusal means "no int8 matmul here", with its reason
            int8, note = None, f"torch._int_mm unavailable on this CPU: {type(e).__name__}: {e}".strip()
    peak = MachinePeak(threads=threads, size=size, fp32_gflops=fp32, fp32_best_gflops=fp32_best,
                       int8_gops=int8, int8_note=note)
    _PEAKS[key] = peak
    return peak


def _hook_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of the convolutions and linear layers in one forward pass."""
    total = 0

    def conv_hook(m: nn.modules.conv._ConvNd, inputs, out) -> None:
        nonlocal total
        k = 1
        for s in m.kernel_size:
            k *= s
        # Each output element is a dot product over (in_channels / groups) * kernel taps.
        total += out.numel() * (m.in_channels // m.groups) * k

    def linear_hook(m: nn.Linear, inputs, out) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return total


def count_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, str, str | None]:
    """MACs of one forward pass on ``example``: ``(macs, source, warning or None)``.

    Uses :func:`slimkit.profile.profile` when that module exists (it knows every layer type);
    otherwise, or if it fails on this model, counts Conv/Linear MACs with forward hooks, which
    covers the bulk of a CNN's arithmetic and is enough for a roofline fraction.
    """
    warning = None
    try:
        from ..profile import profile  # imported lazily: the profiler is an optional sibling module

        return int(profile(model, example).macs), "slimkit.profile", None
    except ImportError as e:
        if getattr(e, "name", None) not in ("slimkit.profile", None):
            warning = f"slimkit.profile could not be imported ({e}); MACs counted from Conv/Linear layers only"
    except Exception as e:
        warning = f"slimkit.profile failed ({type(e).__name__}: {e}); MACs counted from Conv/Linear layers only"
    return _hook_macs(model, example), "conv/linear hooks", warning
