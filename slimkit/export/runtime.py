"""Deployment runtimes as first-class citizens: open an exported file, run it, and say what it runs in float.

Each runtime (:data:`RUNTIMES`) is an entry with its facts: the file format it runs, the pip extra
that installs it, and three functions: ``open(path, threads) -> Session`` (numpy in, numpy out),
``float_nodes(session) -> [names]`` (the compute nodes of the runtime's own optimised graph that
run in float: how "int8 that silently stayed float" is caught) and ``version()``. Nothing here
imports a runtime until it is used, so ``import slimkit`` stays light.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SlimkitError
from ..registry import Registry

# ONNX op types that compute on integers (after ORT's QDQ fusion) and those that compute at all
ORT_INT8_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
                "DynamicQuantizeMatMul", "QLinearConvTranspose"}
ORT_COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"} | ORT_INT8_OPS
OV_COMPUTE_TYPES = {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul", "Gemm"}
OV_INT_PRECISIONS = {"u8", "i8", "u4", "i4"}


@dataclass
class Session:
    """An opened exported model: ``run(x) -> logits`` on numpy arrays, and the runtime's own handle."""

    runtime: str
    run: Callable[[np.ndarray], np.ndarray]
    handle: Any
    path: str


@dataclass(frozen=True)
class Runtime:
    """A registered runtime and its facts."""

    name: str
    format: str  # the file format it runs (see slimkit.export.formats)
    extra: str  # pip install "slimkit[EXTRA]"
    module: str  # the package it imports
    open: Callable[[str, int], Session]
    float_nodes: Callable[[Session], list[str]]
    version: Callable[[], str]

    def require(self) -> None:
        """Raise a one-line SlimkitError naming the extra when the runtime's package is missing."""
        import importlib.util

        if importlib.util.find_spec(self.module) is None:
            raise SlimkitError(f"{self.name} is not installed: pip install 'slimkit[{self.extra}]' (or pip install "
                               f"{self.module})")


RUNTIMES: Registry[Runtime] = Registry("runtime")


# -- ONNX Runtime -------------------------------------------------------------------------------------

def ort_options(threads: int, optimized: str | None = None):
    """ONNX Runtime CPU settings: fixed threads, sequential, every graph optimisation, no spinning."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's pool busy-waits after each run by default; in an interleaved comparison that spinning
    # would steal cores from the other model's next sample
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # the note that an ENABLE_ALL graph is machine-specific is for us, not the user
    if optimized:
        opts.optimized_model_filepath = optimized
    return opts


def _ort_open(path: str, threads: int) -> Session:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(path, ort_options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise SlimkitError(f"{path}: ONNX Runtime cannot load it ({_first_line(e)})") from None
    name = session.get_inputs()[0].name
    return Session("onnxruntime", lambda x: session.run(None, {name: x})[0], session, path)


def _ort_float_nodes(session: Session) -> list[str]:
    """The conv/linear nodes of ORT's optimised graph (after QDQ fusion) that compute in float."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="slimkit-ort-") as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(session.path, ort_options(1, optimized), providers=["CPUExecutionProvider"])
        graph = onnx.load(optimized, load_external_data=False).graph
    return [n.name or n.op_type for n in graph.node if n.op_type in ORT_COMPUTE_OPS - ORT_INT8_OPS]


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


RUNTIMES.register("onnxruntime")(Runtime("onnxruntime", "onnx", "onnx", "onnxruntime", _ort_open, _ort_float_nodes,
                                         _ort_version))


# -- OpenVINO -----------------------------------------------------------------------------------------

def _ov_open(path: str, threads: int) -> Session:
    import openvino as ov

    core = ov.Core()
    try:
        compiled = core.compile_model(path, "CPU", ov_config(threads))
    except Exception as e:
        raise SlimkitError(f"{path}: OpenVINO cannot compile it ({_first_line(e)})") from None
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return request.infer([x], share_inputs=True)[0].copy()

    return Session("openvino", run, compiled, path)


def ov_config(threads: int) -> dict:
    """OpenVINO CPU settings: fixed threads, one stream, latency mode, and f32 arithmetic.

    On CPUs with AVX512-BF16 the plugin computes float models in bfloat16 unless told otherwise
    (measured here: 0.9% relative error on resnet20's logits); a float export must compute what
    PyTorch computes, so f32 is asked for. int8 kernels are unaffected.
    """
    return {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": "f32"}


def _ov_float_nodes(session: Session) -> list[str]:
    out = []
    for op in session.handle.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "f32"
        if kind in OV_COMPUTE_TYPES and precision not in OV_INT_PRECISIONS:
            out.append(op.get_friendly_name())
    return out


def _ov_version() -> str:
    import openvino

    return openvino.__version__


RUNTIMES.register("openvino")(Runtime("openvino", "openvino", "openvino", "openvino", _ov_open, _ov_float_nodes,
                                      _ov_version))


# -- TorchScript (libtorch) ---------------------------------------------------------------------------

def _ts_open(path: str, threads: int) -> Session:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit says it is deprecated on every call
            module = torch.jit.load(path, map_location="cpu")  # our own export: a TorchScript program, no pickle
    except Exception as e:
        raise SlimkitError(f"{path}: not a TorchScript archive ({_first_line(e)})") from None

    def run(x: np.ndarray) -> np.ndarray:
        from ..bench.runners import fixed_threads

        with fixed_threads(threads), torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return Session("torchscript", run, module, path)


def _ts_float_nodes(session: Session) -> list[str]:
    graph = session.handle.inlined_graph if hasattr(session.handle, "inlined_graph") else session.handle.graph
    return [f"{n.kind()} {n.scopeName() or ''}".strip() for n in graph.nodes()
            if n.kind() in ("aten::conv2d", "aten::_convolution", "aten::linear", "aten::matmul", "aten::addmm",
                            "aten::conv1d", "aten::conv3d", "aten::mkldnn_convolution")]


def _torch_version() -> str:
    import torch

    return torch.__version__


RUNTIMES.register("torchscript")(Runtime("torchscript", "torchscript", "test", "torch", _ts_open, _ts_float_nodes,
                                         _torch_version))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def open_exported(path: str, runtime: str | None = None, threads: int = 1) -> Session:
    """Open an exported file in its runtime (by default the format's own: .onnx -> ONNX Runtime, .xml -> OpenVINO).

    Args:
        path: an exported file (``.onnx``, ``.xml`` with its ``.bin``, ``.pt`` TorchScript).
        runtime: run it in this runtime instead (an ONNX file also opens in OpenVINO).
        threads: the runtime's intra-op threads.

    Raises:
        SlimkitError: a missing file, a runtime that is not installed (naming its extra), a file the runtime refuses.
    """
    from .formats import format_of

    if not os.path.isfile(path):
        raise SlimkitError(f"exported model not found: {path}")
    fmt = format_of(path)
    name = runtime or fmt.runtime
    entry = RUNTIMES.get(name)
    if fmt.name not in (entry.format, "onnx") or (fmt.name == "onnx" and entry.format == "torchscript"):
        raise SlimkitError(f"{path}: a {fmt.name} file does not run in {name}")
    entry.require()
    return entry.open(path, threads)
