"""Accuracy guard: find the layers whose quantization costs the most and keep them in float.

Partial quantization by per-layer sensitivity (Wu et al. 2020, "Integer Quantization for Deep
Learning Inference: Principles and Empirical Evaluation", arXiv:2004.09602): calibrate once,
then convert with one layer left in float at a time and measure validation top-1; the layers
whose float copy recovers the most accuracy are kept in float, one by one, until the drop from the float model
is within the budget. Calibration runs once, every candidate is only a (cheap) conversion, so
the search costs one validation pass per layer plus one per layer kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from ..train import evaluate
from .core import QuantizedModel, calibrate, convert, quantizable_layers


def _top1(model: nn.Module, loader: Iterable) -> float:
    return evaluate(model, loader)["top1"]


def sensitivity(model: nn.Module, calib: Iterable, val_loader: Iterable, observer: str = "minmax",
                num_batches: int | None = None, layers: Iterable[str] | None = None, prepared: nn.Module | None = None,
                log: Callable[[str], None] | None = None) -> dict:
    """Per-layer sensitivity scan: validation top-1 with each layer alone left in float.

    Per-layer sensitivity analysis of Wu et al. 2020 (partial quantization), leave-one-in-float
    form. Returns ``{"float": top1 of the float model, "int8": top1 fully quantized, "layers":
    {name: top1 with that layer in float}}``; the layer's *gain* is ``layers[name] - int8``.
    ``prepared`` reuses an existing calibration (from :func:`slimkit.quant.calibrate`) instead
    of calibrating on ``calib``.
    """
    if prepared is None:
        prepared = calibrate(model, calib, observer, num_batches)
    names = list(layers) if layers is not None else quantizable_layers(model)
    result = {"float": _top1(model, val_loader), "int8": _top1(convert(prepared, (), model), val_loader), "layers": {}}
    for name in names:
        result["layers"][name] = _top1(convert(prepared, [name], model), val_loader)
        if log:
            log(f"sensitivity {name}: top1 {result['layers'][name]:.4f} (all int8 {result['int8']:.4f})")
    return result


def guard(model: nn.Module, prepared: nn.Module, val_loader: Iterable, max_drop: float = 0.003,
          keep_float: Iterable[str] = (), log: Callable[[str], None] | None = None) -> QuantizedModel:
    """Keep the most sensitive layers in float until the top-1 drop is at most ``max_drop``.

    Greedy mixed-precision search over the leave-one-in-float sensitivities (partial quantization,
    Wu et al. 2020). ``keep_float`` layers stay float from the start. The returned model's
    ``keep_float`` lists the float layers and ``guard`` holds the measured search: float and
    int8 top-1, the sensitivity of every layer and the top-1 after each layer kept.
    """
    keep = list(keep_float)
    float_top1 = _top1(model, val_loader)
    qmodel = convert(prepared, keep, model)
    top1 = _top1(qmodel, val_loader)
    steps = [{"keep_float": list(keep), "top1": top1}]
    sens: dict[str, float] = {}
    if float_top1 - top1 > max_drop:
        candidates = [n for n in quantizable_layers(model) if n not in keep]
        for name in candidates:
            sens[name] = _top1(convert(prepared, keep + [name], model), val_loader)
        # most accuracy recovered first; module order breaks ties so the result is deterministic
        order = sorted(candidates, key=lambda n: (-sens[n], candidates.index(n)))
        for name in order:
            keep.append(name)
            qmodel = convert(prepared, keep, model)
            top1 = _top1(qmodel, val_loader)
            steps.append({"keep_float": list(keep), "top1": top1})
            if log:
                log(f"guard: kept {name} in float -> top1 {top1:.4f} (float {float_top1:.4f})")
            if float_top1 - top1 <= max_drop:
                break
    qmodel.guard = {"max_drop": max_drop, "float_top1": float_top1, "int8_top1": steps[0]["top1"],
                    "final_top1": top1, "met": float_top1 - top1 <= max_drop, "sensitivity": sens, "steps": steps,
                    "keep_float": list(keep)}
    return qmodel
