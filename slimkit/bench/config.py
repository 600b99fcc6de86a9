"""How a recipe times its model after each stage: :class:`BenchConfig` (the recipe's ``bench:`` key)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig, option
from .runners import MODES


@dataclass(frozen=True)
class BenchConfig(MethodConfig):
    """Latency per runtime and batch size, measured after every stage of a recipe (median of interleaved samples).

    Example:
        >>> BenchConfig(runtimes=("eager", "onnxruntime")).batch_sizes
        (1,)
    """

    family = "bench"

    runtimes: tuple[str, ...] = option(("eager",), "runtimes to time in", choices=MODES)
    batch_sizes: tuple[int, ...] = option((1,), "batch sizes", low=1)
    threads: int = option(1, "intra-op threads", low=1)
    repeats: int = option(10, "samples per runtime and batch size", low=3)
