"""Execution modes: the same model made runnable as eager PyTorch, frozen TorchScript,
``torch.compile`` or ONNX Runtime, each as a zero-argument callable on a fixed input."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MODES = ("eager", "torchscript", "compile", "onnxruntime")


def default_threads() -> int:
    """All cores this process may run on (its CPU affinity, which a container or taskset narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def onnxruntime_available() -> bool:
    """Whether the optional ``onnxruntime`` package can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` and restore the caller's count after.

    Latency depends strongly on the intra-op thread count, so every measurement is taken at a
    known count, and a benchmark must not leave the process running at a different one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class Runner:
    """One model in one mode on one fixed input: ``call()`` runs one inference.

    ``timed`` is the object whose calls are timed (the module, the frozen TorchScript module,
    the compiled module or the ONNX Runtime session), kept so callers can inspect it.
    """

    mode: str
    call: Callable[[], Any]
    timed: Any


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors in a model's output (a tensor, numpy array, or nested tuple/list/dict)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "__array__") and not isinstance(out, (list, tuple, dict)):
        return [torch.as_tensor(out)]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in flat_outputs(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_outputs(o)]
    return []


def max_abs_diff(reference: Any, output: Any) -> float:
    """Largest absolute difference between two model outputs (inf when their structure differs)."""
    ref, got = flat_outputs(reference), flat_outputs(output)
    if len(ref) != len(got) or any(r.shape != g.shape for r, g in zip(ref, got)):
        return float("inf")
    diffs = [(r.detach().double() - g.detach().double()).abs().max().item() for r, g in zip(ref, got) if r.numel()]
    return max(diffs, default=0.0)


def output_scale(reference: Any) -> float:
    """Largest absolute output value, the scale against which a mode's difference is judged."""
    vals = [t.detach().abs().max().item() for t in flat_outputs(reference) if t.numel()]
    return max(vals, default=0.0)


def _eager(model: nn.Module, x: torch.Tensor, threads: int) -> Runner:
    return Runner("eager", lambda: model(x), model)


def _torchscript(model: nn.Module, x: torch.Tensor, threads: int) -> Runner:
    # Tracing under no_grad (not inference_mode) because freeze keeps the traced constants
    # and inference tensors must not leak into a module that may later run outside it.
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated upstream and says so on every call; the output check against
        # eager (done by the caller) is what tells whether the trace is faithful.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x, check_trace=False)
        frozen = torch.jit.freeze(traced.eval())
        optimized = torch.jit.optimize_for_inference(frozen)
    return Runner("torchscript", lambda: optimized(x), optimized)


def _compile(model: nn.Module, x: torch.Tensor, threads: int) -> Runner:
    compiled = torch.compile(model)
    # The first call compiles; doing it here puts a compiler failure in this mode's error
    # message instead of in the middle of the timing loop.
    with torch.inference_mode():
        compiled(x)
    return Runner("compile", lambda: compiled(x), compiled)


def ort_session(path: str, threads: int):
    """An ONNX Runtime CPU session with a fixed thread count, set up for fair timing."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's pool busy-waits after each run by default; in an interleaved comparison that
    # spinning would steal cores from the other model's next sample.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _onnxruntime(model: nn.Module, x: torch.Tensor, threads: int) -> Runner:
    if not onnxruntime_available():
        raise RuntimeError("onnxruntime is not installed (pip install onnx onnxruntime)")
    with tempfile.TemporaryDirectory(prefix="slimkit-bench-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript-based exporter needs only torch; the dynamo one needs onnxscript.
            torch.onnx.export(model, (x,), path, input_names=["input"], dynamo=False)
        # The session reads the file when built, so the temporary directory can go afterwards.
        session = ort_session(path, threads)
    feed = {session.get_inputs()[0].name: x.numpy()}
    return Runner("onnxruntime", lambda: session.run(None, feed), session)


_BUILDERS: dict[str, Callable[[nn.Module, torch.Tensor, int], Runner]] = {
    "eager": _eager,
    "torchscript": _torchscript,
    "compile": _compile,
    "onnxruntime": _onnxruntime,
}


def build_runner(model: nn.Module, mode: str, example: torch.Tensor, threads: int) -> Runner:
    """Make ``model`` runnable in ``mode`` on ``example``; raises whatever the mode's toolchain raises.

    ``eager`` calls the module as is; ``torchscript`` traces it on ``example`` (so at that batch
    size), freezes it (weights become constants, BatchNorm folds into convolutions) and applies
    ``optimize_for_inference``; ``compile`` wraps it in ``torch.compile`` and compiles on the
    first call; ``onnxruntime`` exports it with ``torch.onnx.export`` to a temporary file and
    opens an ONNX Runtime CPU session with ``intra_op_num_threads = threads``. The model must
    already be in eval mode; the returned runner's calls are meant to run under
    ``torch.inference_mode()``.
    """
    if mode not in _BUILDERS:
        raise ValueError(f"unknown benchmark mode {mode!r} (known: {', '.join(MODES)})")
    return _BUILDERS[mode](model, example, threads)
