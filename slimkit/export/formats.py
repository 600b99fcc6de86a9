"""File formats a model is exported to: ONNX, OpenVINO IR and frozen TorchScript, each written atomically.

A format (:data:`FORMATS`) is an entry with its facts: the file suffix, the runtime that runs it
(:mod:`slimkit.export.runtime`), and ``write(model, example, path, config) -> facts``. An int8
model (:class:`slimkit.quant.QuantizedModel`) is exported with its own scales and zero points:
the FX-converted graph traces to ONNX as QuantizeLinear/DequantizeLinear around float
Conv/Gemm (the QDQ format), which ONNX Runtime fuses into QLinearConv/QGemm and OpenVINO into
u8/i8 kernels; nothing is re-calibrated. OpenVINO IR is converted from that ONNX file
(``openvino.convert_model``), so both runtimes run the same graph.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SlimkitError
from ..registry import Registry


@dataclass(frozen=True)
class Format:
    """A registered export format and its facts."""

    name: str
    suffix: str
    runtime: str
    write: Callable[..., dict]


FORMATS: Registry[Format] = Registry("export format")


def format_of(path: str) -> Format:
    """The format of an exported file, from its suffix."""
    for name in FORMATS.names():
        if path.endswith(FORMATS.get(name).suffix):
            return FORMATS.get(name)
    raise SlimkitError(f"{path}: not an exported model (known suffixes: "
                       f"{', '.join(FORMATS.get(n).suffix for n in FORMATS.names())})")


def exported_module(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module to trace (an int8 model's converted graph) and whether it is int8."""
    from ..quant.core import QuantizedModel

    if isinstance(model, QuantizedModel):
        return model.model, True
    return model, False


def staging_dir(path: str) -> str:
    """A new hidden folder beside ``path`` (same file system, so a rename from it is atomic)."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        return tempfile.mkdtemp(dir=folder, prefix=".tmp-export-")
    except OSError as e:
        raise SlimkitError(f"cannot write {path}: {e.strerror or e}") from None


# -- ONNX ---------------------------------------------------------------------------------------------

_UNSUPPORTED = re.compile(r"(?:operator|op) '?((?:aten|quantized|prim|torchvision)::[\w.]+)'?")


def _layer_using(model: nn.Module, example: torch.Tensor, op: str) -> str | None:
    """The first module whose forward dispatches aten op ``op``: to name the layer an exporter refused."""
    from torch.utils._python_dispatch import TorchDispatchMode

    wanted = op.split("::", 1)[1].split(".")[0]
    stack: list[str] = []
    found: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not found and func.__name__.split(".")[0] == wanted and stack:
                found.append(stack[-1])
            return func(*args, **(kwargs or {}))

    def enter(name: str):
        def hook(module, args) -> None:
            stack.append(name)
        return hook

    def leave(module, args, out) -> None:  # a forward hook that returned something would replace the output
        stack.pop()

    handles = []
    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(enter(name)))
            handles.append(m.register_forward_hook(leave))
    try:
        with torch.no_grad(), Watch():
            model(example)
    except Exception:  # noqa: BLE001 - the layer is a hint; the exporter's own message stands without it
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _torch_onnx_export(module: nn.Module, example: torch.Tensor, path: str, opset: int, dynamic_batch: bool) -> None:
    import contextlib
    import io

    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    try:
        # the exporter prints its whole IR graph when it fails; the one-line error below says what matters
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")  # constant-folding notes and the exporter's deprecation banner
            torch.onnx.export(module, (example,), path, dynamo=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
    except Exception as e:
        text = str(e)
        match = _UNSUPPORTED.search(text)
        if match:
            layer = _layer_using(module, example, match.group(1))
            where = f" (layer {layer})" if layer else ""
            raise SlimkitError(f"ONNX opset {opset} has no export for {match.group(1)}{where}: "
                               f"{text.splitlines()[0]}") from None
        first = text.strip().splitlines()[0] if text.strip() else ""
        raise SlimkitError(f"ONNX export failed: {type(e).__name__}: {first}") from None


def signed_activations(path: str) -> int:
    """Rewrite an int8 QDQ file's uint8 activations as int8 (zero point - 128, same scale): ORT's S8S8 format.

    ``q_s8 = q_u8 - 128`` represents every value exactly as before, so outputs do not change; the
    weights are int8 already. In the exporter's QDQ graph the only uint8 tensors are activation
    zero points (initializers or Constant nodes, shared through Identity nodes) and the Casts to
    uint8 that follow each QuantizeLinear: both are rewritten. Returns the zero points rewritten.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    def shifted(t: onnx.TensorProto) -> onnx.TensorProto:
        zp = numpy_helper.to_array(t).astype(np.int16) - 128
        return numpy_helper.from_array(zp.astype(np.int8), t.name)

    model = onnx.load(path)
    done = 0
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.UINT8:
            t.CopyFrom(shifted(t))
            done += 1
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value" and attr.t.data_type == onnx.TensorProto.UINT8:
                attr.t.CopyFrom(shifted(attr.t))
                done += 1
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == onnx.TensorProto.UINT8:
                attr.i = onnx.TensorProto.INT8
    onnx.save(model, path)
    return done


def write_onnx(model: nn.Module, example: torch.Tensor, path: str, config) -> dict:
    """``model`` as ONNX at ``path`` (dynamic batch axis; an int8 model in QDQ form with its own scales)."""
    import onnx

    module, int8 = exported_module(model)
    tmpdir = staging_dir(path)
    try:
        tmp = os.path.join(tmpdir, "model.onnx")
        _torch_onnx_export(module, example, tmp, config.opset, config.dynamic_batch)
        facts = {"int8": int8, "opset": config.opset, "activations": None}
        if int8:
            facts["activations"] = config.activations
            if config.activations == "s8":
                facts["zero_points_rewritten"] = signed_activations(tmp)
        onnx.checker.check_model(tmp)
        os.replace(tmp, path)
    except onnx.checker.ValidationError as e:
        raise SlimkitError(f"the exported ONNX graph is invalid: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise SlimkitError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return facts


# -- OpenVINO IR --------------------------------------------------------------------------------------

def write_openvino(model: nn.Module, example: torch.Tensor, path: str, config) -> dict:
    """``model`` as OpenVINO IR (``path`` = the .xml; its weights in the .bin beside), converted from ONNX."""
    from .runtime import RUNTIMES

    RUNTIMES.get("openvino").require()
    import openvino as ov

    tmpdir = staging_dir(path)
    try:
        onnx_path = os.path.join(tmpdir, "model.onnx")
        facts = write_onnx(model, example, onnx_path, config)
        try:
            converted = ov.convert_model(onnx_path)
        except Exception as e:
            raise SlimkitError(f"OpenVINO cannot convert the ONNX graph: {str(e).strip().splitlines()[0]}") from None
        xml = os.path.join(tmpdir, "model.xml")
        ov.save_model(converted, xml, compress_to_fp16=False)
        # the .bin first: a visible .xml always has its weights beside it
        os.replace(os.path.join(tmpdir, "model.bin"), path[: -len(".xml")] + ".bin")
        os.replace(xml, path)
    except OSError as e:
        raise SlimkitError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return facts


# -- TorchScript --------------------------------------------------------------------------------------

def write_torchscript(model: nn.Module, example: torch.Tensor, path: str, config) -> dict:
    """``model`` traced, frozen (weights as constants, BN folded) and saved as a TorchScript archive."""
    module, int8 = exported_module(model)
    tmpdir = staging_dir(path)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated upstream and says so on every call
            try:
                traced = torch.jit.trace(module.eval(), example, check_trace=False)
                frozen = torch.jit.freeze(traced)
            except Exception as e:
                raise SlimkitError(f"TorchScript tracing failed: {type(e).__name__}: "
                                   f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
            tmp = os.path.join(tmpdir, "model.pt")
            torch.jit.save(frozen, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise SlimkitError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return {"int8": int8}


FORMATS.register("onnx")(Format("onnx", ".onnx", "onnxruntime", write_onnx))
FORMATS.register("openvino")(Format("openvino", ".xml", "openvino", write_openvino))
FORMATS.register("torchscript")(Format("torchscript", ".pt", "torchscript", write_torchscript))
