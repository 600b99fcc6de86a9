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
from .config import QuantConfig, Train8Config
from .core import (
    QuantizedModel,
    backend_config,
    calibrate,
    convert,
    fake_quant,
    fuse,
    is_quantized_module,
    make_qconfig,
    quantizable_layers,
    quantize,
)
from .guard import guard, sensitivity
from .observers import EMA, MSE, OBSERVERS, Entropy, HistogramClip, MinMax, Percentile, observer_class
from .onnx import OrtModule, export_onnx_qdq  # onnxruntime itself is imported only when used
from .qat import LSQFakeQuantize, QATSchedule, convert_qat, prepare_qat, qat  # QAT with LSQ step sizes
from .train8 import (  # 8-bit training,
    QuantConv2d,
    QuantLinear,
    RangeBatchNorm2d,
    from_8bit_training,
    to_8bit_training,  # Banner et al. 2018; registers stage `train8`
    train8_stage,
)

__all__ = ["QuantConfig", "Train8Config", "EMA", "MSE", "OBSERVERS", "Entropy", "HistogramClip", "MinMax",
           "OrtModule", "Percentile", "QuantizedModel",
           "backend_config", "calibrate", "calibration_loader", "convert", "export_onnx_qdq", "fake_quant", "fuse",
           "guard", "is_quantized_module", "make_qconfig", "observer_class", "quantizable_layers", "quantize",
           "quantize_stage", "sensitivity"]
__all__ += ["LSQFakeQuantize", "QATSchedule", "convert_qat", "prepare_qat", "qat", "quantize_then_qat"]
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


@register_stage("quantize", config=QuantConfig, paper="Jacob et al., CVPR 2018; Esser et al., ICLR 2020 (LSQ QAT)",
                example={"calib": 32, "batch_size": 16})
def quantize_stage(model: nn.Module, ctx: Context, config: QuantConfig) -> nn.Module:
    """Static int8 post-training quantization (Jacob et al. 2018), optionally QAT-fine-tuned.

    Calibrates with ``observer`` on ``calib`` class-balanced train images; with ``max_drop`` the
    accuracy guard keeps the most sensitive layers in float until the validation top-1 drop is
    at most ``max_drop`` (partial quantization, Wu et al. 2020). With ``qat_epochs`` > 0 that
    calibration initialises quantization-aware training with learned step sizes (Esser et al.
    2020) for ``qat_epochs`` epochs at ``qat_lr`` on the train split (see :func:`qat`).
    """
    loader = calibration_loader(ctx.data, config.calib, config.batch_size, seed=ctx.seed)
    val = ctx.data.loader("val", ctx.batch_size) if config.max_drop is not None and len(ctx.data.val) else None
    if config.max_drop is not None and val is None:
        val = ctx.data.loader("test", ctx.batch_size)  # no val split: the guard has nothing else to use
    train = ctx.data.loader("train", ctx.batch_size, seed=ctx.seed)
    return quantize_then_qat(model.cpu(), loader, config, val_loader=val, log=print if ctx.progress else None,
                             train_loader=train, seed=ctx.seed, device=ctx.device, progress=ctx.progress,
                             checkpoint_dir=ctx.stage_dir("qat"))


def quantize_then_qat(model: nn.Module, calib_loader, config: QuantConfig | str = "minmax", *, keep_float=(),
                      max_drop: float | None = None, val_loader=None, log=None, qat_epochs: int = 0,
                      qat_lr: float = 1e-3, train_loader=None, **fit_options) -> QuantizedModel:
    """PTQ with the optional accuracy guard (Jacob et al. 2018; Wu et al. 2020), then maybe QAT (Esser et al. 2020).

    ``config`` is a :class:`QuantConfig` (or an observer name with the keyword options building
    one). With ``qat_epochs`` > 0 the calibration initialises :func:`qat` on ``train_loader``;
    the layers the guard kept in float stay float during QAT and its search stays on record.
    Without a guard, PTQ is skipped (qat() calibrates itself). ``fit_options`` go to :func:`qat`.
    """
    if not isinstance(config, QuantConfig):
        config = QuantConfig(observer=config, keep_float=tuple(keep_float), max_drop=max_drop, qat_epochs=qat_epochs,
                             qat_lr=qat_lr)
    qmodel = None
    if not config.qat_epochs or config.max_drop is not None:
        qmodel = quantize(model, calib_loader, config.replace(qat_epochs=0), val_loader=val_loader, log=log)
    if config.qat_epochs:
        keep = qmodel.keep_float if qmodel is not None else list(config.keep_float)
        searched = getattr(qmodel, "guard", None)
        qmodel = qat(model, train_loader, epochs=config.qat_epochs, calib_loader=calib_loader, lr=config.qat_lr,
                     keep_float=keep, observer=config.observer, reduce_range=config.reduce_range,
                     observer_kwargs=config.observer_kwargs or None, **fit_options)
        if searched:
            qmodel.guard = searched
    return qmodel
