"""Post-training int8 quantization that runs on the CPU's int8 kernels (torch.ao FX, x86 backend).

::

    from slimkit.quant import quantize, calibration_loader
    q = quantize(model, calibration_loader(data, 512), observer="entropy")
    q = quantize(model, calib, max_drop=0.003, val_loader=data.loader("val"))   # accuracy guard
    q.keep_float                      # layers left in float
    slimkit.save(q, "int8.safetensors"); slimkit.load("int8.safetensors")   # same int8 kernels, same outputs
    q = qat(model, data.loader("train"), epochs=2, calib_loader=calibration_loader(data))   # QAT, LSQ steps

See docs/quant.md for the method, the design and the measurements.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from ..data import Dataset, Loader
from ..data.splits import balanced_subset, make_rng
from ..pipeline import Context, register_stage
from .core import (QuantizedModel, backend_config, calibrate, convert, fake_quant, fuse, is_quantized_module,
                   make_qconfig, quantizable_layers, quantize)
from .guard import guard, sensitivity
from .onnx import OrtModule, export_onnx_qdq  # onnxruntime itself is imported only when used
from .observers import OBSERVERS, EMA, MSE, Entropy, HistogramClip, MinMax, Percentile, observer_class
from .qat import LSQFakeQuantize, QATSchedule, convert_qat, prepare_qat, qat  # QAT with LSQ step sizes
from .train8 import (QuantConv2d, QuantLinear, RangeBatchNorm2d, from_8bit_training,  # 8-bit training,
                     to_8bit_training, train8_stage)  # Banner et al. 2018; registers stage `train8`

__all__ = ["EMA", "MSE", "OBSERVERS", "Entropy", "HistogramClip", "MinMax", "OrtModule", "Percentile", "QuantizedModel",
           "backend_config", "calibrate", "calibration_loader", "convert", "export_onnx_qdq", "fake_quant", "fuse",
           "guard", "is_quantized_module", "make_qconfig", "observer_class", "quantizable_layers", "quantize",
           "quantize_stage", "sensitivity"]
__all__ += ["LSQFakeQuantize", "QATSchedule", "convert_qat", "prepare_qat", "qat"]
__all__ += ["QuantConv2d", "QuantLinear", "RangeBatchNorm2d", "from_8bit_training", "to_8bit_training",
            "train8_stage"]

_CALIB_STREAM = 7301  # a seed stream of its own, so the calibration draw never shifts other draws


def calibration_loader(data: Dataset, n: int = 512, batch_size: int = 64, seed: int = 0) -> Loader:
    """``n`` class-balanced training images, without augmentation, for calibration.

    Calibration should see the distribution the model sees at inference (Krishnamoorthi 2018:
    a few hundred unlabeled samples suffice), hence un-augmented train images, never
    validation or test ones.
    """
    index = balanced_subset(data.train.labels.numpy(), int(n), make_rng(seed, _CALIB_STREAM))
    split = data.train.subset(np.asarray(index))
    return Loader(split, batch_size, mean=data.info.mean, std=data.info.std, shuffle=False, augment=None)


@register_stage("quantize")
def quantize_stage(model: nn.Module, ctx: Context, observer: str = "minmax", calib: int = 512,
                   max_drop: float | None = None, keep_float: list[str] | None = None,
                   batch_size: int = 64, qat_epochs: int = 0, qat_lr: float = 1e-3) -> nn.Module:
    """Recipe stage: static int8 post-training quantization (Jacob et al. 2018), optionally QAT-fine-tuned.

    Calibrates with ``observer`` on ``calib`` class-balanced train images; with ``max_drop`` the
    accuracy guard keeps the most sensitive layers in float until the validation top-1 drop is
    at most ``max_drop`` (partial quantization, Wu et al. 2020). With ``qat_epochs`` > 0 that
    calibration initialises quantization-aware training with learned step sizes (Esser et al.
    2020) for ``qat_epochs`` epochs at ``qat_lr`` on the train split (see :func:`qat`).
    """
    loader = calibration_loader(ctx.data, calib, batch_size, seed=ctx.seed)
    val = ctx.data.loader("val", ctx.batch_size) if max_drop is not None and len(ctx.data.val) else None
    if max_drop is not None and val is None:
        val = ctx.data.loader("test", ctx.batch_size)  # no val split: the guard has nothing else to use
    log = print if ctx.progress else None
    if qat_epochs and max_drop is None:  # PTQ is only the QAT init here: qat() calibrates itself
        qmodel = None
    else:
        qmodel = quantize(model.cpu(), loader, observer, keep_float=keep_float or (), max_drop=max_drop,
                          val_loader=val, log=log)
    if qat_epochs:
        # layers the guard kept float stay float during QAT; the guard's search stays on record
        keep = qmodel.keep_float if qmodel is not None else list(keep_float or ())
        searched = getattr(qmodel, "guard", None)
        train = ctx.data.loader("train", ctx.batch_size, seed=ctx.seed)
        qmodel = qat(model.cpu(), train, epochs=qat_epochs, calib_loader=loader, lr=qat_lr, keep_float=keep,
                     observer=observer, seed=ctx.seed, device=ctx.device, progress=ctx.progress,
                     checkpoint_dir=ctx.stage_dir("qat"))
        if searched:
            qmodel.guard = searched
    return qmodel
