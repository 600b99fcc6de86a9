"""Quantization-aware training (QAT) with learned step sizes, converted to the same int8 runtime as PTQ.

Flow: trace the float model with torch.ao FX ``prepare_qat_fx`` (x86 backend config of
:mod:`slimkit.quant.core`), which fuses conv+BN(+ReLU) into QAT ``ConvBn`` modules and puts a
fake quantizer on every weight and activation that the int8 model quantizes; initialise every
quantizer from a post-training calibration (the same observers as :func:`slimkit.quant.quantize`,
so epoch 0 *is* the PTQ model); fine-tune in float through the fake quantizers with the
straight-through estimator and learned step sizes (LSQ, Esser et al. 2020); freeze the BN
running statistics late in training (Jacob et al. 2018; Krishnamoorthi 2018) and, optionally,
the step sizes a bit later; then ``convert_fx`` to the ``torch.ao.nn.quantized`` int8 modules,
wrapped in the :class:`~slimkit.quant.core.QuantizedModel` that PTQ produces, so saving, loading,
profiling and benchmarking work unchanged.

::

    from slimkit.quant import qat, calibration_loader
    q = qat(model, data.loader("train"), epochs=2, calib_loader=calibration_loader(data, 512))
    slimkit.save(q, "int8.safetensors")            # an ordinary int8 artifact; q.recipe["method"] == "qat"
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qat_qconfig_mapping
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import PerChannelMinMaxObserver
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

from ..errors import SlimkitError
from .core import ENGINE, QuantizedModel, _batches, backend_config, default_reduce_range, quantizable_layers, quiet
from .observers import OBSERVERS

__all__ = ["LSQFakeQuantize", "QATSchedule", "convert_qat", "lsq_quantizers", "make_qat_qconfig", "prepare_qat",
           "qat"]

# fit() options qat() passes through; the rest of fit's arguments are set by qat() itself
FIT_OPTIONS = {"val", "optimizer", "weight_decay", "momentum", "schedule", "warmup_epochs", "label_smoothing",
               "extra_losses", "checkpoint_dir", "resume", "seed", "device", "progress", "grad_clip",
               "on_epoch_end"}
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)


class LSQFakeQuantize(FakeQuantizeBase):
    """Fake quantizer with a learned step size (LSQ, Esser et al., ICLR 2020), initialised by an observer.

    Forward is quantize-dequantize, ``s * (clamp(round(x / s) + z, qmin, qmax) - z)``, through
    torch's ``_fake_quantize_learnable_per_{tensor,channel}_affine`` ops, whose backward is
    LSQ's: the straight-through estimator for ``x`` (gradient 1 inside the representable range,
    0 where clipped) and ``round(x/s) - x/s`` (inside) or ``qmin - z`` / ``qmax - z`` (clipped)
    for the step size ``s``, times the gradient scale ``g = 1 / sqrt(N * Qp)``. ``N`` is the
    number of values one step size quantizes: per sample for activations (LSQ's N_F, the loss
    being a batch mean), per output channel for per-channel weights (LSQ's N_W, per step);
    ``Qp = quant_max``. The zero point stays at its calibrated value (LSQ learns only the step;
    zero stays exactly representable). While the observer is enabled (calibration) the step
    size and zero point are copied from ``observer.calculate_qparams()``, i.e. initialised to
    the PTQ observer's range, so QAT starts from the PTQ model. Unlike torch's private
    ``_LearnableFakeQuantize`` it needs no channel count up front (per-channel step sizes are
    sized by the first observation) and does not learn zero points.
    """

    def __init__(self, observer: type = PerChannelMinMaxObserver, quant_min: int = 0, quant_max: int = 255,
                 per_sample: bool = True, **observer_kwargs: Any) -> None:
        super().__init__()
        if quant_min >= quant_max:
            raise SlimkitError(f"LSQFakeQuantize: quant_min {quant_min} must be < quant_max {quant_max}")
        self.activation_post_process = observer(quant_min=quant_min, quant_max=quant_max, **observer_kwargs)
        self.quant_min, self.quant_max = int(quant_min), int(quant_max)
        self.dtype = self.activation_post_process.dtype
        self.qscheme = self.activation_post_process.qscheme
        self.ch_axis = getattr(self.activation_post_process, "ch_axis", -1)
        self.is_dynamic = getattr(self.activation_post_process, "is_dynamic", False)
        self.is_per_channel = self.qscheme in _PER_CHANNEL
        self.per_sample = bool(per_sample)
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))

    def _resize(self, n: int) -> None:
        # in place, so an optimizer holding the Parameter keeps the same object
        if self.scale.numel() != n:
            self.scale.data = torch.ones(n, device=self.scale.device)
            self.zero_point = torch.zeros(n, dtype=torch.int32, device=self.zero_point.device)

    def grad_factor(self, x: torch.Tensor) -> float:
        """LSQ's gradient scale ``1 / sqrt(N * Qp)`` for input ``x`` (see the class docstring for N)."""
        if self.is_per_channel:
            n = x.numel() // max(x.shape[self.ch_axis], 1)
        elif self.per_sample and x.dim() > 1:
            n = x.numel() // max(x.shape[0], 1)
        else:
            n = x.numel()
        return 1.0 / math.sqrt(max(n, 1) * self.quant_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled[0] == 1:
            self.activation_post_process(x.detach())
            scale, zero_point = self.activation_post_process.calculate_qparams()
            self._resize(scale.numel())
            with torch.no_grad():
                self.scale.copy_(scale.reshape(-1).to(self.scale))
                self.zero_point.copy_(zero_point.reshape(-1).to(self.zero_point))
        if self.fake_quant_enabled[0] != 1:
            return x
        # A step size an update drove to <= 0 would divide by zero: clamp it, but out of place (a
        # shared quantizer, e.g. around max-pool, runs twice per forward and autograd keeps the
        # first use) and with the gradient passed through, so a clamped step can still grow back.
        scale = self.scale + (self.scale.clamp(min=torch.finfo(torch.float32).eps) - self.scale).detach()
        zp = self.zero_point.to(x.dtype)
        if self.is_per_channel:
            return torch._fake_quantize_learnable_per_channel_affine(
                x, scale, zp, self.ch_axis, self.quant_min, self.quant_max, self.grad_factor(x))
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale, zp, self.quant_min, self.quant_max, self.grad_factor(x))

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """The current (learned) step sizes and zero points, as ``convert_fx`` reads them."""
        scale = self.scale.detach().clamp(min=torch.finfo(torch.float32).eps)
        return scale, self.zero_point.long()

    def freeze_step_size(self) -> None:
        """Stop learning the step size (late in training, once the weights should settle on a fixed grid)."""
        self.scale.requires_grad_(False)
        self.scale.grad = None  # optimizers skip parameters without a gradient

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # a checkpoint of a calibrated model holds per-channel sizes this fresh module lacks
        if prefix + "scale" in state_dict:
            self._resize(state_dict[prefix + "scale"].numel())
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return (f"quant_min={self.quant_min}, quant_max={self.quant_max}, dtype={self.dtype}, "
                f"qscheme={self.qscheme}, ch_axis={self.ch_axis}, scale={self.scale.numel()} learned")


def make_qat_qconfig(observer: str = "minmax", reduce_range: bool | None = None,
                     observer_kwargs: dict | None = None) -> QConfig:
    """The QAT QConfig: :class:`LSQFakeQuantize` with the PTQ scheme of :func:`slimkit.quant.make_qconfig`.

    Activations per-tensor affine quint8 (7-bit with ``reduce_range``, as core.py decides),
    initialised by ``observer``; weights per-channel symmetric qint8 in [-127, 127], initialised
    by per-channel min/max (Jacob et al. 2018 scheme, LSQ step sizes of Esser et al. 2020).
    """
    cls = OBSERVERS.get(observer)
    if reduce_range is None:
        reduce_range = default_reduce_range()
    act = LSQFakeQuantize.with_args(observer=cls, quant_min=0, quant_max=127 if reduce_range else 255,
                                    dtype=torch.quint8, qscheme=torch.per_tensor_affine, **(observer_kwargs or {}))
    weight = LSQFakeQuantize.with_args(observer=PerChannelMinMaxObserver, quant_min=-127, quant_max=127,
                                       per_sample=False, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    return QConfig(activation=act, weight=weight)


def _qat_mapping(qconfig: QConfig, keep_float: Iterable[str]) -> QConfigMapping:
    # torch's x86 QAT defaults keep their special entries (fixed-qparams fake quants for sigmoid,
    # tanh, ...; shared qparams for reshape); everything else gets the LSQ qconfig
    mapping = get_default_qat_qconfig_mapping(ENGINE)
    mapping.set_global(qconfig)
    for name in keep_float:
        mapping.set_module_name(name, None)
    return mapping


def lsq_quantizers(model: nn.Module) -> list[LSQFakeQuantize]:
    """Every :class:`LSQFakeQuantize` in ``model`` (activation and weight quantizers), each once."""
    return [m for m in model.modules() if isinstance(m, LSQFakeQuantize)]


def prepare_qat(model: nn.Module, calib_loader: Iterable, *, observer: str = "minmax", num_batches: int | None = None,
                keep_float: Iterable[str] = (), reduce_range: bool | None = None,
                observer_kwargs: dict | None = None) -> nn.Module:
    """Fuse, insert LSQ fake quantizers and initialise them by calibration; returns the trainable GraphModule.

    ``prepare_qat_fx`` folds conv+BN(+ReLU) into QAT ConvBn modules that fake-quantize the
    BN-scaled weight (Jacob et al. 2018, Sec. 3.2; Krishnamoorthi 2018). Every quantizer then
    observes ``num_batches`` batches of ``calib_loader`` with fake quantization off (what PTQ
    calibration sees), which sets its step size and zero point to the PTQ values; after that
    observers are off and the step sizes are learnable parameters (Esser et al. 2020). The input
    model is not modified; ``keep_float`` layers get no quantizers.
    """
    keep_float = list(keep_float)
    unknown = [n for n in keep_float if n not in dict(model.named_modules())]
    if unknown:
        raise SlimkitError(f"keep_float: no layer named {unknown} (quantizable layers: {quantizable_layers(model)})")
    if reduce_range is None:
        reduce_range = default_reduce_range()
    torch.backends.quantized.engine = ENGINE
    float_model = copy.deepcopy(model).cpu().train()  # prepare_qat_fx swaps in QAT modules in train mode
    batches = iter(_batches(calib_loader, num_batches))
    first = next(batches, None)
    if first is None:
        raise SlimkitError("calibration data is empty")
    first = first.cpu()
    mapping = _qat_mapping(make_qat_qconfig(observer, reduce_range, observer_kwargs), keep_float)
    with quiet():
        prepared = prepare_qat_fx(float_model, mapping, (first[:1],), backend_config=backend_config())
    quantizers = lsq_quantizers(prepared)
    for q in quantizers:
        q.disable_fake_quant()
        q.enable_observer()
    prepared.eval()  # BN running statistics, as the folded PTQ model uses; calibration must not move them
    with torch.no_grad():
        prepared(first)
        for x in batches:
            prepared(x.cpu())
    for q in quantizers:
        q.disable_observer()
        q.enable_fake_quant()
    prepared.train()
    prepared.slimkit_recipe = {"observer": observer, "observer_kwargs": dict(observer_kwargs or {}),
                               "reduce_range": bool(reduce_range), "input_shape": list(first.shape[1:]),
                               "keep_float": keep_float, "method": "qat", "lsq": True, "step_init": "observer"}
    prepared.slimkit_mapping = mapping
    return prepared


class QATSchedule:
    """``fit(on_epoch_end=...)`` hook: freeze BN statistics, then step sizes, after given epochs.

    After epoch ``freeze_bn_epoch`` every fused ConvBn stops updating its running mean/variance
    and normalises with them (``torch.ao.nn.intrinsic.qat.freeze_bn_stats``), so the last
    epochs train exactly the folded weights that inference uses (Jacob et al. 2018;
    Krishnamoorthi 2018, Sec. 3.5: batch statistics jitter the folded weights and their
    quantization). After ``freeze_observer_epoch`` the quantization parameters (the LSQ step
    sizes; observers already stopped after calibration) are frozen too. ``None`` = never.
    """

    def __init__(self, model: nn.Module, freeze_bn_epoch: int | None, freeze_observer_epoch: int | None,
                 then: Callable[[int, dict], None] | None = None) -> None:
        self.model, self.then = model, then
        self.freeze_bn_epoch, self.freeze_observer_epoch = freeze_bn_epoch, freeze_observer_epoch
        self.bn_frozen = self.steps_frozen = False

    def apply(self, epoch: int) -> None:
        """Put the model in the state the schedule gives after ``epoch`` epochs (0 = before training)."""
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch and not self.bn_frozen:
            self.model.apply(freeze_bn_stats)
            self.bn_frozen = True
        if self.freeze_observer_epoch is not None and epoch >= self.freeze_observer_epoch and not self.steps_frozen:
            for q in lsq_quantizers(self.model):
                q.disable_observer()
                q.freeze_step_size()
            self.steps_frozen = True

    def __call__(self, epoch: int, record: dict) -> None:
        self.apply(epoch)
        record.update(bn_frozen=self.bn_frozen, step_sizes_frozen=self.steps_frozen)
        if self.then is not None:
            self.then(epoch, record)


def convert_qat(prepared: nn.Module, float_model: nn.Module | None = None, **provenance: Any) -> QuantizedModel:
    """Convert a QAT-trained model to the int8 kernels PTQ uses (Jacob et al. 2018), as a QuantizedModel.

    ``convert_fx`` folds each ConvBn's BN (running statistics) into its conv, quantizes the
    folded weights with the learned per-channel step sizes and gives every requantization the
    learned activation step size and calibrated zero point; the result has the same module
    structure as the PTQ model, so :func:`slimkit.load` rebuilds it the same way. ``provenance``
    (epochs, lr, ...) is added to the recorded recipe. ``prepared`` is not modified.
    """
    torch.backends.quantized.engine = ENGINE
    recipe = dict(prepared.slimkit_recipe, **provenance)
    model = copy.deepcopy(prepared).cpu().eval()
    for q in lsq_quantizers(model):
        q.disable_observer()  # from_float calls the weight quantizer once; it must not re-observe
    with quiet():
        converted = convert_fx(model, qconfig_mapping=prepared.slimkit_mapping, backend_config=backend_config())
    return QuantizedModel(converted, recipe, float_model)


def _epoch_option(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SlimkitError(f"qat: {name} must be an epoch number >= 0 or None, got {value!r}")
    return value


def _resumed_epoch(fit_options: dict) -> int:
    # fit() resumes from its checkpoint silently; the freeze flags are not in the state dict,
    # so re-apply the schedule up to the epoch it will continue from
    ckpt = fit_options.get("checkpoint_dir")
    if not ckpt or not fit_options.get("resume", True):
        return 0
    path = os.path.join(ckpt, "last.pt")
    if not os.path.exists(path):
        return 0
    from ..train.engine import load_checkpoint

    return int(load_checkpoint(path).get("epoch", 0))


def qat(model: nn.Module, loader: Iterable, *, epochs: int, calib_loader: Iterable | None = None, lr: float = 1e-3,
        freeze_bn_epoch: int | None = -1, freeze_observer_epoch: int | None = None, keep_float: Iterable[str] = (),
        observer: str = "minmax", calib_batches: int | None = None, reduce_range: bool | None = None,
        observer_kwargs: dict | None = None, **fit_options: Any) -> QuantizedModel:
    """Quantization-aware training with learned step sizes, returning the int8 model (Esser et al. 2020).

    Initialises every quantizer from a PTQ calibration (``observer`` on ``calib_batches`` batches
    of ``calib_loader``; without one, the first 16 batches of ``loader``), fine-tunes the model
    through the fake quantizers for ``epochs`` epochs on ``loader`` with
    :func:`slimkit.train.fit` (``lr`` and any other fit option: ``optimizer``, ``weight_decay``,
    ``val``, ``checkpoint_dir``, ``device``, ``seed``, ``progress``, ``on_epoch_end``, ...),
    learning weights by the straight-through estimator and step sizes by LSQ; BN statistics are
    frozen after ``freeze_bn_epoch`` epochs (default -1: after half the epochs, rounded up;
    ``None``: never) and the step sizes after ``freeze_observer_epoch`` (default never), following
    Jacob et al. 2018 and Krishnamoorthi 2018. Converts to the same int8 runtime as
    :func:`slimkit.quant.quantize`; ``result.recipe`` records ``method="qat"``, ``epochs``, ``lsq``
    and the schedule, and ``result.qat_log`` the per-epoch training log. ``epochs=0`` gives the
    PTQ model.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise SlimkitError(f"qat: epochs must be an integer >= 0, got {epochs!r}")
    unknown = set(fit_options) - FIT_OPTIONS
    if unknown:
        raise SlimkitError(f"qat: unknown option(s) {sorted(unknown)} (fit options: {sorted(FIT_OPTIONS)})")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise SlimkitError(f"qat: lr must be > 0, got {lr!r}")
    if freeze_bn_epoch == -1:
        freeze_bn_epoch = math.ceil(epochs / 2)
    freeze_bn_epoch = _epoch_option("freeze_bn_epoch", freeze_bn_epoch)
    freeze_observer_epoch = _epoch_option("freeze_observer_epoch", freeze_observer_epoch)
    if calib_loader is None:
        calib_loader, calib_batches = loader, 16 if calib_batches is None else calib_batches
    prepared = prepare_qat(model, calib_loader, observer=observer, num_batches=calib_batches, keep_float=keep_float,
                           reduce_range=reduce_range, observer_kwargs=observer_kwargs)
    schedule = QATSchedule(prepared, freeze_bn_epoch, freeze_observer_epoch, then=fit_options.pop("on_epoch_end", None))
    schedule.apply(_resumed_epoch(fit_options))
    log = []
    if epochs:
        from ..train import fit

        log = fit(prepared, loader, epochs=epochs, lr=lr, on_epoch_end=schedule, **fit_options).epochs
    qmodel = convert_qat(prepared, model, epochs=epochs, lr=lr, freeze_bn_epoch=freeze_bn_epoch,
                         freeze_observer_epoch=freeze_observer_epoch)
    qmodel.qat_log = log
    return qmodel
