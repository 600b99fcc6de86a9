"""The latency harness: :func:`bench`, the interleaved :func:`compare`, and the CLI entry point."""

from __future__ import annotations

import gc
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import SlimkitError
from .peak import count_macs, machine_peak
from .results import NOISY_CV, BenchResult, CompareResult, measurement
from .runners import MODES, Runner, build_runner, default_threads, fixed_threads, max_abs_diff, output_scale
from .stats import stats

DEFAULT_MODES = ("eager", "torchscript")
MAX_SAMPLES = 2000
# A mode whose output differs from eager's by more than this (relative to the output's scale)
# is flagged: timing a transformation that computes something else proves nothing.
OUTPUT_RTOL = 1e-3


# ---------------------------------------------------------------- argument checks (user input)

def _input_size(input_size: Any) -> tuple[int, ...]:
    if isinstance(input_size, str):
        parts = input_size.replace("x", ",").split(",")
        try:
            input_size = [int(p) for p in parts if p.strip()]
        except ValueError:
            raise SlimkitError(f"input size {input_size!r} is not like 3,32,32 or 3x32x32") from None
    try:
        size = tuple(int(s) for s in input_size)
    except (TypeError, ValueError):
        raise SlimkitError(f"input size must be a sequence of positive ints like (3, 32, 32), got {input_size!r}") \
            from None
    if not size or any(s <= 0 for s in size):
        raise SlimkitError(f"input size must be positive ints like (3, 32, 32), got {input_size!r}")
    return size


def _batch_sizes(batch_sizes: Any) -> tuple[int, ...]:
    if isinstance(batch_sizes, int):
        batch_sizes = (batch_sizes,)
    if isinstance(batch_sizes, str):
        batch_sizes = [b for b in batch_sizes.split(",") if b.strip()]
    try:
        sizes = tuple(int(b) for b in batch_sizes)
    except (TypeError, ValueError):
        raise SlimkitError(f"batch sizes must be positive ints like 1,64, got {batch_sizes!r}") from None
    if not sizes or any(b <= 0 for b in sizes):
        raise SlimkitError(f"batch sizes must be positive ints like 1,64, got {batch_sizes!r}")
    return tuple(dict.fromkeys(sizes))


def _modes(modes: Any) -> tuple[str, ...]:
    if isinstance(modes, str):
        modes = [m.strip() for m in modes.split(",") if m.strip()]
    modes = tuple(dict.fromkeys(modes))
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise SlimkitError(f"unknown benchmark mode(s) {', '.join(map(repr, unknown)) or '(none given)'} "
                           f"(known: {', '.join(MODES)})")
    return modes


def _threads(threads: int | None, warnings: list[str]) -> int:
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0:
        raise SlimkitError(f"threads must be a positive int, got {threads!r}")
    if threads > default_threads():
        warnings.append(f"threads={threads} exceeds the {default_threads()} usable cpus: threads will contend, "
                        "latencies will be inflated and noisy")
    return threads


def _check_model(model: Any, what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if devices - {"cpu"}:
        raise SlimkitError(f"{what} has tensors on {', '.join(sorted(devices - {'cpu'}))}: this harness measures "
                           "CPU latency, move the model to the CPU first")
    return model


def _name(model: nn.Module, name: str | None) -> str:
    if name:
        return name
    base = getattr(model, "slimkit_base", None)
    return base["spec"] if isinstance(base, dict) and base.get("spec") else type(model).__name__


def _example(batch_size: int, input_size: tuple[int, ...]) -> torch.Tensor:
    # Fixed seed: every mode and every model in a comparison sees the same input.
    return torch.randn(batch_size, *input_size, generator=torch.Generator().manual_seed(0))


def _error_text(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first}"[:400]


# ---------------------------------------------------------------- timing

@contextmanager
def _timing_region() -> Iterator[None]:
    # inference_mode skips autograd bookkeeping (what deployment does); a garbage collection
    # landing inside one sample would be noise that belongs to neither model, as timeit knows, so
    # collection is off while timing. The young generations are swept first; a full collection
    # costs ~0.1 s in a large process (a test session, a search timing hundreds of layers) and buys
    # nothing more, since nothing is collected while disabled.
    gc_was_enabled = gc.isenabled()
    gc.collect(1)
    gc.disable()
    try:
        with torch.inference_mode():
            yield
    finally:
        if gc_was_enabled:
            gc.enable()


def _sample(runner: Runner, iters: int) -> float:
    """Seconds per iteration over ``iters`` back-to-back calls."""
    call = runner.call
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    return (time.perf_counter() - t0) / iters


def _warm(runner: Runner, warmup: int) -> Any:
    # The last warm-up output is the one checked against eager: for TorchScript the profiling
    # executor only settles on its optimised graph after a couple of runs, and that graph is
    # the one being timed.
    out = None
    for _ in range(max(1, warmup)):
        out = runner.call()
    return out


def _iters_per_sample(runners: Sequence[Runner], min_sample_s: float) -> int:
    """Iterations per sample so each sample of the fastest runner lasts at least ``min_sample_s``.

    Timer resolution and the cost of reading the clock are negligible against ~1 ms, not against
    a 20 us forward pass of a tiny model.
    """
    fastest = min(min(_sample(r, 1) for _ in range(3)) for r in runners)
    return max(1, math.ceil(min_sample_s / max(fastest, 1e-9)))


def _collect(runners: Sequence[Runner], iters: int, repeats: int, min_time_s: float) -> list[list[float]]:
    """Interleaved samples: each round times every runner once, in a random order.

    Taking the runners' samples next to each other in time cancels the slow drift of a shared
    machine, which separate runs would attribute to the models. The order within a round is
    shuffled (seeded, so runs are repeatable) rather than alternated: a fixed A B / B A pattern
    can alias with periodic interference (the scheduler slicing a core between this process and
    a neighbour's), which this box showed as a self-comparison reading 2.5x.
    """
    samples: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    rng = random.Random(0)
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - start < min_time_s and rounds < MAX_SAMPLES):
        rng.shuffle(order)
        for i in order:
            samples[i].append(_sample(runners[i], iters))
        rounds += 1
    return samples


def _prepare(model: nn.Module, mode: str, x: torch.Tensor, threads: int, warmup: int, reference: Any,
             label: str, warnings: list[str]) -> tuple[Runner, float]:
    """Build and warm one runner and check its output against eager's; raises if unusable."""
    runner = build_runner(model, mode, x, threads)
    with torch.inference_mode():
        out = _warm(runner, warmup)
    diff = max_abs_diff(reference, out)
    if math.isinf(diff):
        raise RuntimeError("its output does not have the shape/structure of the eager output")
    scale = max(1.0, output_scale(reference))
    if not diff <= OUTPUT_RTOL * scale:
        warnings.append(f"{label}: output differs from eager by {diff:.3g} (output scale {scale:.3g})")
    return runner, diff


def _noise_warning(label: str, cv: float, warnings: list[str], what: str = "latency") -> None:
    if cv > NOISY_CV:
        warnings.append(f"{label}: {what} CV {cv:.0%} > {NOISY_CV:.0%}: timings are noisy (shared or throttled "
                        "machine?); use more repeats, fewer threads, or an interleaved compare()")


def _above_peak(label: str, m: dict[str, Any], warnings: list[str]) -> None:
    if m["peak_fraction"] is not None and m["peak_fraction"] > 1.0:
        # Seen on a shared box: ONNX Runtime's GEMM beats torch.mm's, and a peak timed while a
        # neighbour held the core is low. Either way the roof is approximate, so say so.
        warnings.append(f"{label}: {m['peak_fraction']:.0%} of the measured fp32 matmul peak: that peak is low "
                        "(measured under contention, or this runtime's GEMM beats torch.mm); treat it as approximate")


def _roofline(models: Sequence[nn.Module], input_size: tuple[int, ...], threads: int, roofline: bool,
              warnings: list[str]) -> tuple[list[int | None], list[str | None], Any]:
    macs, sources = [], []
    for model in models:
        try:
            n, source, warning = count_macs(model, _example(1, input_size))
        except Exception as e:  # the same failure will show up, with its message, as a failed mode
            n, source, warning = None, None, f"MACs not counted: {_error_text(e)}"
        macs.append(n)
        sources.append(source)
        if warning:
            warnings.append(warning)
    peak = machine_peak(threads) if roofline else None
    return macs, sources, peak


# ---------------------------------------------------------------- public API

def time_interleaved(runners: Sequence[Runner], *, warmup: int = 5, repeats: int = 20, min_time_s: float = 0.5,
                     min_sample_s: float = 1e-3) -> list[list[float]]:
    """Seconds per call of each runner, sampled in interleaved rounds (each round times every runner once).

    The building block of :func:`compare` for any number of runners of any runtimes (eager
    PyTorch against ONNX Runtime, say): per-round ratios between two of them cancel the drift of
    a shared machine. Every sample averages the same number of calls for all runners.

    Args:
        runners: built runners (:func:`slimkit.bench.build_runner`, or any ``Runner(mode, call, timed)``).
        warmup: calls of each before timing.
        repeats, min_time_s: at least this many rounds and seconds.
        min_sample_s: each sample of the fastest runner lasts at least this long.

    Returns:
        One list of per-call seconds per runner, aligned by round.
    """
    with torch.inference_mode():
        for r in runners:
            _warm(r, warmup)
    with _timing_region():
        iters = _iters_per_sample(runners, min_sample_s)
        return _collect(runners, iters, repeats, min_time_s)


def bench(model: nn.Module, input_size: Sequence[int], batch_sizes: Sequence[int] = (1, 64),
          threads: int | None = None, modes: Sequence[str] = DEFAULT_MODES, warmup: int = 5, repeats: int = 20,
          min_time_s: float = 0.5, min_sample_s: float = 1e-3, name: str | None = None,
          roofline: bool = True) -> BenchResult:
    """Measure a model's CPU latency and throughput per execution mode and batch size.

    Operation counts do not predict latency (Canziani, Paszke & Culurciello 2016, "An analysis
    of deep neural network models for practical applications", found inference time and FLOPs
    related only loosely across architectures, and the execution mode changes it again), so this
    times the model: with ``threads`` intra-op threads (default all usable cores; the caller's
    setting is restored), in eval mode under ``torch.inference_mode()``, after ``warmup`` calls,
    collecting at least ``repeats`` samples and at least ``min_time_s`` seconds of them, each
    sample averaging enough back-to-back calls to last ``min_sample_s``. Each mode (``eager``,
    ``torchscript`` = trace + freeze + optimize_for_inference, ``compile`` = torch.compile,
    ``onnxruntime`` when installed) is checked against eager's output on the timed callable; a
    mode that fails to build is recorded in ``result.errors`` and skipped. The result gives
    median/p10/p90/mean/CV latency, throughput = batch / median, and, as roofline context
    (Williams et al. 2009), achieved GFLOP/s = 2 * MACs / latency as a fraction of
    :func:`machine_peak`; a CV above 10% adds a warning.
    """
    _check_model(model, "model")
    input_size, batch_sizes, modes = _input_size(input_size), _batch_sizes(batch_sizes), _modes(modes)
    warnings: list[str] = []
    threads = _threads(threads, warnings)
    settings = {"warmup": warmup, "repeats": repeats, "min_time_s": min_time_s, "min_sample_s": min_sample_s}
    was_training = model.training
    model.eval()
    try:
        with fixed_threads(threads):
            (macs,), (source,), peak = _roofline([model], input_size, threads, roofline, warnings)
            result = BenchResult(model=_name(model, name), input_size=input_size, threads=threads, macs=macs,
                                 macs_source=source, peak=peak, settings=settings, warnings=warnings)
            for bs in batch_sizes:
                x = _example(bs, input_size)
                try:
                    with torch.inference_mode():
                        reference = model(x)
                except Exception as e:
                    for mode in modes:
                        result.errors.setdefault(mode, f"batch {bs}: eager forward failed: {_error_text(e)}")
                    continue
                for mode in modes:
                    if mode in result.errors:  # a mode that failed once would fail at every size
                        continue
                    label = f"{mode} batch {bs}"
                    try:
                        runner, diff = _prepare(model, mode, x, threads, warmup, reference, label, warnings)
                    except Exception as e:
                        result.errors[mode] = f"batch {bs}: {_error_text(e)}"
                        continue
                    with _timing_region():
                        iters = _iters_per_sample([runner], min_sample_s)
                        (samples,) = _collect([runner], iters, repeats, min_time_s)
                    m = measurement(bs, samples, iters, macs, peak)
                    m["max_abs_diff"] = diff
                    result.results.setdefault(mode, {})[bs] = m
                    _noise_warning(label, m["cv"], warnings)
                    _above_peak(label, m, warnings)
                    del runner  # free a compiled/traced copy before building the next one
    finally:
        model.train(was_training)
    return result


def compare(model_a: nn.Module, model_b: nn.Module, input_size: Sequence[int], batch_sizes: Sequence[int] = (1, 64),
            threads: int | None = None, modes: Sequence[str] = DEFAULT_MODES, warmup: int = 5, repeats: int = 20,
            min_time_s: float = 0.5, min_sample_s: float = 1e-3, names: tuple[str | None, str | None] = (None, None),
            roofline: bool = True) -> CompareResult:
    """Interleaved A/B latency comparison: the per-pair ratio B/A, robust to machine drift.

    On a shared or thermally throttled machine absolute latency drifts by more than the effect
    being measured, so two separate :func:`bench` runs cannot be compared. Here A and B are
    timed alternately (each pair in a random order, each sample the same number of iterations)
    and every pair gives one ratio B/A, so drift slower than one pair cancels out -- the
    paired design of Kalibera & Jones 2013 ("Rigorous benchmarking in reasonable time") and of
    Google Benchmark's/pyperf's A/B tooling. Reported per mode and batch size: median and
    p10/p90 (and CV) of the per-pair ratios, plus each model's own stats as :func:`bench` gives
    them. A model compared against itself gives a ratio within a few percent of 1; all other
    arguments are as for :func:`bench`.

    Args:
        model_a, model_b: the two models (A is the reference).
        input_size: (C, H, W) of one input.
        batch_sizes: batch sizes to time.
        threads: torch threads while timing (default: this process's setting).
        modes: execution modes (``eager``, ``torchscript``, ``compile``, ``onnxruntime``).
        warmup, repeats, min_time_s, min_sample_s: how long and how often each is timed.
        names: labels for the report.
        roofline: also measure this machine's matmul peak for the "fraction of peak" context.

    Returns:
        A :class:`CompareResult`; ``ratio(mode, batch)`` is the median B/A latency ratio.

    Raises:
        SlimkitError: a bad argument (unknown mode, empty batch sizes).

    Example:
        >>> import slimkit
        >>> a = slimkit.create_model("digits_cnn")
        >>> r = compare(a, a, (1, 8, 8), batch_sizes=(1,), modes=("eager",), repeats=3, min_time_s=0.05,
        ...             roofline=False)
        >>> r.ratio("eager", 1) > 0  # B's median time over A's (here A against itself: near 1 on an idle machine)
        True
    """
    _check_model(model_a, "model A")
    _check_model(model_b, "model B")
    input_size, batch_sizes, modes = _input_size(input_size), _batch_sizes(batch_sizes), _modes(modes)
    warnings: list[str] = []
    threads = _threads(threads, warnings)
    settings = {"warmup": warmup, "repeats": repeats, "min_time_s": min_time_s, "min_sample_s": min_sample_s,
                "order": "interleaved pairs, random order within a pair"}
    models = (model_a, model_b)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with fixed_threads(threads):
            (macs_a, macs_b), _, peak = _roofline(models, input_size, threads, roofline, warnings)
            result = CompareResult(model_a=_name(model_a, names[0]), model_b=_name(model_b, names[1]),
                                   input_size=input_size, threads=threads, macs_a=macs_a, macs_b=macs_b, peak=peak,
                                   settings=settings, warnings=warnings)
            for bs in batch_sizes:
                x = _example(bs, input_size)
                try:
                    with torch.inference_mode():
                        refs = [m(x) for m in models]
                except Exception as e:
                    for mode in modes:
                        result.errors.setdefault(mode, f"batch {bs}: eager forward failed: {_error_text(e)}")
                    continue
                for mode in modes:
                    if mode in result.errors:
                        continue
                    runners, diffs = [], []
                    try:
                        for tag, m, ref in zip("AB", models, refs):
                            r, d = _prepare(m, mode, x, threads, warmup, ref, f"{mode} batch {bs} model {tag}",
                                            warnings)
                            runners.append(r)
                            diffs.append(d)
                    except Exception as e:
                        result.errors[mode] = f"batch {bs}, model {'AB'[len(runners)]}: {_error_text(e)}"
                        continue
                    with _timing_region():
                        iters = _iters_per_sample(runners, min_sample_s)
                        sa, sb = _collect(runners, iters, repeats, min_time_s)
                    ratios = [b / a for a, b in zip(sa, sb)]
                    entry = {"a": measurement(bs, sa, iters, macs_a, peak),
                             "b": measurement(bs, sb, iters, macs_b, peak),
                             "ratio": {**stats(ratios), "samples": ratios}}
                    entry["a"]["max_abs_diff"], entry["b"]["max_abs_diff"] = diffs
                    result.results.setdefault(mode, {})[bs] = entry
                    _noise_warning(f"{mode} batch {bs}", entry["ratio"]["cv"], warnings, what="B/A ratio")
                    for tag in "ab":
                        _above_peak(f"{mode} batch {bs} model {tag.upper()}", entry[tag], warnings)
                    del runners
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
    return result


def run_bench_cli(model_spec: str, vs_spec: str | None = None, weights: str | None = None,
                  vs_weights: str | None = None, batch_sizes: Sequence[int] | str = (1, 64), threads: int | None = None,
                  modes: Sequence[str] | str = DEFAULT_MODES, input_size: Sequence[int] | str | None = None,
                  **kwargs: Any) -> BenchResult | CompareResult:
    """Entry point for ``slimkit bench MODEL [--vs MODEL2]``: build the model(s), bench or compare.

    Models are built with :func:`slimkit.create_model` (registered names, ``torchvision:NAME``,
    ``file.py:fn`` or artifact paths, optionally with ``weights``). The input size defaults to
    the model's registered one (for an artifact, its base model's). With ``vs_spec`` the two are
    measured interleaved by :func:`compare` (ratio = vs / model), else :func:`bench`. String
    forms ``"1,64"``, ``"eager,torchscript"`` and ``"3x32x32"`` are accepted, and other keyword
    arguments (``repeats``, ``warmup``, ``min_time_s``, ...) are passed on. Returns the result
    object (``.to_dict()`` for ``--json``, ``.table()`` for text); raises :class:`SlimkitError`
    when no mode could be measured at all.
    """
    from ..models import create_model
    from ..models import model_input_size as size_of

    model = create_model(model_spec, weights=weights)
    size = _input_size(input_size) if input_size is not None else size_of(model, model_spec)
    if vs_spec is None:
        result = bench(model, size, batch_sizes=batch_sizes, threads=threads, modes=modes, name=model_spec, **kwargs)
    else:
        other = create_model(vs_spec, weights=vs_weights)
        if input_size is None and size_of(other, vs_spec) != size:
            raise SlimkitError(f"{model_spec} expects input {'x'.join(map(str, size))} but {vs_spec} expects "
                               f"{'x'.join(map(str, size_of(other, vs_spec)))}: pass an input size")
        result = compare(model, other, size, batch_sizes=batch_sizes, threads=threads, modes=modes,
                         names=(model_spec, vs_spec), **kwargs)
    if not result.results:
        raise SlimkitError(f"no mode could be measured for {model_spec}: "
                           + "; ".join(f"{m}: {msg}" for m, msg in result.errors.items()))
    return result
