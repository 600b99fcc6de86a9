"""ONNX Runtime int8: QDQ export with ``onnxruntime.quantization.quantize_static`` and our calibration data."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from ..errors import SlimkitError
from ..experimental import experimental

METHODS = ("minmax", "entropy", "percentile")


def _batches(loader: Iterable, num_batches: int | None) -> list[np.ndarray]:
    out = []
    for i, batch in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        out.append(x.detach().cpu().float().numpy())
    if not out:
        raise SlimkitError("calibration data is empty")
    return out


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, opset: int = 17) -> str:
    """Export a float model to ONNX with a dynamic batch axis (TorchScript exporter: needs only torch)."""
    model = model.cpu().eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    return path


@experimental("0.1", "superseded by slimkit.export, which carries the model's own int8 scales")
def export_onnx_qdq(model: nn.Module, calib_loader: Iterable, path: str, num_batches: int | None = None,
                    method: str = "minmax", per_channel: bool = True, opset: int = 17) -> str:
    """Write an int8 QDQ ONNX model of ``model`` calibrated on ``calib_loader``; returns ``path``.

    The float model is exported to ONNX, then ``onnxruntime.quantization.quantize_static``
    inserts QuantizeLinear/DequantizeLinear pairs (QDQ format) with per-channel symmetric int8
    weights and per-tensor uint8 activations, calibrated by ORT's ``method`` (minmax, entropy,
    percentile) on the same batches our observers see -- the same scheme as Jacob et al. 2018
    and Krishnamoorthi 2018; ORT fuses the QDQ pairs into its int8 kernels at session build.
    """
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError as e:
        raise SlimkitError("export_onnx_qdq needs onnxruntime (pip install onnx onnxruntime)") from e
    if method not in METHODS:
        raise SlimkitError(f"unknown ONNX Runtime calibration method {method!r} (known: {', '.join(METHODS)})")
    batches = _batches(calib_loader, num_batches)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x}

        def rewind(self) -> None:
            self.it = iter(batches)

    calibrate_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                        "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory(prefix="slimkit-onnx-") as tmp:
        float_path = export_onnx(model, torch.from_numpy(batches[0][:1]), os.path.join(tmp, "float.onnx"), opset)
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = os.path.join(tmp, "pre.onnx")
            quant_pre_process(float_path, pre, skip_symbolic_shape=True)
            float_path = pre
        except Exception:  # pre-processing only helps fusion; quantize_static works without it
            pass
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        quantize_static(float_path, path, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=calibrate_method,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    return path


class OrtModule(nn.Module):
    """An ONNX Runtime session behind an ``nn.Module`` interface, so evaluate/bench can run it."""

    def __init__(self, path: str, threads: int = 1) -> None:
        super().__init__()
        from ..bench.runners import ort_session

        self.path = path
        self.session = ort_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out)
