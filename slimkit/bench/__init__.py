"""Measure: latency, throughput and roofline context that users can trust.

* :func:`bench` times one model per execution mode (eager, frozen TorchScript, torch.compile,
  ONNX Runtime) and batch size at a fixed thread count, with robust statistics;
* :func:`compare` times two models interleaved and reports the per-pair latency ratio, which
  cancels the drift of a shared machine;
* :func:`machine_peak` measures the achieved matmul peak, the roof for "fraction of peak";
* :func:`stats` is the summary (median, p10, p90, mean, CV) used for every benchmark table.
"""

from .core import DEFAULT_MODES, bench, compare, run_bench_cli, time_interleaved
from .peak import MachinePeak, count_macs, machine_peak
from .results import BenchResult, CompareResult
from .runners import MODES, Runner, build_runner, default_threads, fixed_threads, onnxruntime_available
from .stats import percentile, stats

__all__ = ["DEFAULT_MODES", "MODES", "BenchResult", "CompareResult", "MachinePeak", "Runner", "bench",
           "build_runner", "compare", "count_macs", "default_threads", "fixed_threads", "machine_peak",
           "onnxruntime_available", "percentile", "run_bench_cli", "stats", "time_interleaved"]
