"""Execution modes: the same model made runnable as eager PyTorch, frozen TorchScript,
``torch.compile``, ONNX Runtime or OpenVINO, each as a zero-argument callable on a fixed input."""

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

MODES = ("eager", "torchscript", "compile", "onnxruntime", "openvino")


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
    """An ONNX Runtime CPU session with a fixed thread count, set up for fair timing (:mod:`slimkit.export.runtime`)."""
    import onnxruntime as ort

    from ..export.runtime import ort_options

    return ort.InferenceSession(path, ort_options(threads), providers=["CPUExecutionProvider"])


def _exported(mode: str):
    """A runner building ``model`` into an ONNX file (QDQ for an int8 model) opened in ``mode``'s runtime."""

    def build(model: nn.Module, x: torch.Tensor, threads: int) -> Runner:
        from ..export.formats import FORMATS
        from ..export.runtime import RUNTIMES

        runtime = RUNTIMES.get(mode)
        runtime.require()
        with tempfile.TemporaryDirectory(prefix="slimkit-bench-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            FORMATS.get("onnx").write(model, x[:1], path, _OnnxSettings())
            # the session reads the file when built, so the temporary directory can go afterwards
            session = runtime.open(path, threads)
        feed = x.numpy()
        return Runner(mode, lambda: session.run(feed), session.handle)

    return build


@dataclass(frozen=True)
class _OnnxSettings:
    opset: int = 17
    dynamic_batch: bool = True
    activations: str = "u8"


_BUILDERS: dict[str, Callable[[nn.Module, torch.Tensor, int], Runner]] = {
    "eager": _eager,
    "torchscript": _torchscript,
    "compile": _compile,
    "onnxruntime": _exported("onnxruntime"),
    "openvino": _exported("openvino"),
}


def build_runner(model: nn.Module, mode: str, example: torch.Tensor, threads: int) -> Runner:
    """Make ``model`` runnable in ``mode`` on ``example``; raises whatever the mode's toolchain raises.

    ``eager`` calls the module as is; ``torchscript`` traces it on ``example`` (so at that batch
    size), freezes it (weights become constants, BatchNorm folds into convolutions) and applies
    ``optimize_for_inference``; ``compile`` wraps it in ``torch.compile`` and compiles on the
    first call; ``onnxruntime`` and ``openvino`` export it as :func:`slimkit.export.export` does
    (an int8 model in QDQ form with its own scales) to a temporary ONNX file and open it in that
    runtime with ``threads`` threads (:mod:`slimkit.export.runtime`). The model must
    already be in eval mode; the returned runner's calls are meant to run under
    ``torch.inference_mode()``.
    """
    if mode not in _BUILDERS:
        raise ValueError(f"unknown benchmark mode {mode!r} (known: {', '.join(MODES)})")
    return _BUILDERS[mode](model, example, threads)
