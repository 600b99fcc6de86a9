"""The architecture sweep: profile, prune to half the MACs, quantize and export every public CNN we can build.

"Pruning breaks on my model" is the most common complaint in the peers' trackers; this is the
check that it does not, run on the networks people actually bring: every torchvision
classification model and the CNN families of timm (structures only, random weights). Each
model goes through four steps, and each step either passes its check or records one line
saying why not (the layer and the construct where the failure names one):

* ``profile``: slimkit's MACs equal fvcore's count of the same conv/linear/matmul ops (within
  0.5%; fvcore is the reference the Torch-Pruning and NNI benchmarks quote);
* ``prune``: :func:`slimkit.prune.prune` to half the MACs (L1 criterion, defaults otherwise), the
  pruned model computes what the original computes with the removed channels zeroed (float64,
  random batch-norm statistics so a wrong channel map shows), and it saves as an artifact that
  loads with identical outputs;
* ``quantize``: FX int8 post-training quantization (:func:`slimkit.quant.quantize`) of the pruned
  model runs and its logits stay close to float (relative L2 error under 0.5 on random weights,
  where nothing was trained to be quantization-friendly);
* ``export``: the pruned float model exported to ONNX verifies in ONNX Runtime
  (:func:`slimkit.export.export`).

``tests/test_sweep.py`` runs a fast subset; ``benchmarks/sweep.py`` runs everything and writes
the table to docs/benchmarks.md.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SlimkitError

__all__ = ["STEPS", "SweepRow", "TIMM_MODELS", "sweep_model", "torchvision_models"]

STEPS = ("profile", "prune", "quantize", "export")

# one or more members of every CNN family timm builds, the smallest of each (structures only)
TIMM_MODELS = [
    "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "resnest14d", "res2net50_14w_8s", "skresnet18",
    "regnetx_002", "regnety_002", "regnetz_005", "efficientnet_b0", "efficientnet_lite0", "tf_efficientnetv2_b0",
    "mobilenetv2_050", "mobilenetv3_small_050", "mobilenetv3_large_100", "mnasnet_050", "fbnetc_100",
    "tinynet_e", "lcnet_050", "hardcorenas_a", "mixnet_s", "ghostnet_050", "rexnet_100", "convnext_atto",
    "convnextv2_atto", "densenet121", "dpn48b", "cspresnet50", "cspdarknet53", "darknet17", "hrnet_w18_small",
    "dla34", "vgg11", "repvgg_a0", "ese_vovnet19b_slim", "selecsls42b", "gernet_s", "nf_resnet26",
    "inception_v3", "xception41", "dm_nfnet_f0", "resnetv2_50", "mobileone_s0", "fastvit_t8", "efficientvit_b0",
]


def torchvision_models() -> list[str]:
    """Every torchvision classification model (``torchvision.models.list_models`` of that module)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


@dataclass
class SweepRow:
    """One model of the sweep: per step ``"ok"`` or the one-line reason it failed, and what was measured."""

    spec: str
    size: int
    steps: dict[str, str] = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(self.steps.get(s) == "ok" for s in STEPS)


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return (text if isinstance(e, SlimkitError) else f"{type(e).__name__}: {text}")[:300]


def _fvcore_macs(model: nn.Module, x: torch.Tensor) -> int:
    from fvcore.nn import FlopCountAnalysis

    fa = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_op = fa.by_operator()
    return int(sum(v for k, v in by_op.items() if k in ("conv", "linear", "addmm", "matmul", "bmm", "einsum")))


def _random_bn(model: nn.Module) -> nn.Module:
    """Random batch-norm statistics, and layer scales (ConvNeXt's ``gamma``, 1e-6 at init) set to 1.

    A layer scale of 1e-6 would hide a wrong channel map inside a block below float64 precision.
    """
    from .helpers import randomize_bn

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("gamma", "layer_scale", "ls_gamma"):
                p.fill_(1.0)
    return randomize_bn(model)


def sweep_model(spec: str, size: int = 64, num_classes: int = 10, target_macs: float = 0.5,
                steps: tuple[str, ...] = STEPS) -> SweepRow:
    """Run the sweep's steps on one model spec (``torchvision:NAME``, ``timm:NAME`` or a registered name).

    Args:
        spec: the model spec, built with random weights and ``num_classes`` outputs.
        size: input height and width (3 channels, batch 1 for the counts, 2 for the checks).
        target_macs: the pruning target as a fraction of the MACs.
        steps: which of :data:`STEPS` to run (later steps use the pruned model; without
            ``prune`` they use the original).

    Returns:
        A :class:`SweepRow`; no step raises, a failure is its one-line reason.

    Example:
        >>> row = sweep_model("digits_cnn", size=8, steps=("profile", "prune"))
        >>> row.steps["prune"]
        'ok'
    """
    from ..models import create_model
    from ..profile import profile
    from ..prune import prune
    from .helpers import zeroed_copy

    start = time.perf_counter()
    row = SweepRow(spec, size)
    try:
        model = _random_bn(create_model(spec, num_classes=num_classes)).eval()
    except Exception as e:  # a model this torch/timm cannot build is reported, not counted
        row.steps["build"] = _reason(e)
        return row
    channels = 1 if spec == "digits_cnn" else 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, size, size, generator=g)
    pruned = model
    if "profile" in steps:
        try:
            macs = profile(model, x[:1]).macs
            ref = _fvcore_macs(copy.deepcopy(model), x[:1])
            row.facts.update(macs=macs, fvcore_macs=ref)
            ok = abs(macs - ref) <= 0.005 * max(ref, 1)
            row.steps["profile"] = "ok" if ok else f"MACs {macs:,} vs fvcore {ref:,} ({macs / max(ref, 1):.3f}x)"
        except Exception as e:
            row.steps["profile"] = _reason(e)
    if "prune" in steps:
        try:
            m64 = copy.deepcopy(model).double()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                r = prune(m64, x[:1].double(), criterion="l1", target_macs=target_macs)
            notes = [str(w.message) for w in caught if "slimkit" in str(w.message)]
            with torch.no_grad():
                y_zero, y_pruned = zeroed_copy(m64, r.kept)(x.double()), r.model(x.double())
            diff = (y_pruned - y_zero).abs().max().item() / max(1.0, y_zero.abs().max().item())
            ratio = r.macs_after / max(r.macs_before, 1)
            row.facts.update(macs_ratio=round(ratio, 4), prune_diff=diff, unprunable=len(r.unprunable),
                             prune_notes=notes[:3])
            with tempfile.TemporaryDirectory() as tmp:  # the pruned model is an artifact like any other
                from ..artifact import load, save

                p32 = copy.deepcopy(r.model).float().eval()
                back = load(save(p32, os.path.join(tmp, "p.safetensors"))).eval()
                with torch.no_grad():
                    trip = (back(x) - p32(x)).abs().max().item()
            if diff > 1e-6:
                row.steps["prune"] = f"pruned model differs from its zeroed copy by {diff:.2e}"
            elif trip > 0:
                row.steps["prune"] = f"the saved artifact loads with outputs {trip:.2e} away"
            elif ratio > target_macs + 1e-9:
                row.steps["prune"] = f"reached {ratio:.3f}x of the MACs, not {target_macs}: " + (
                    notes[0] if notes else "no more removable channels")
            else:
                row.steps["prune"] = "ok"
            pruned = r.model.float().eval()
        except Exception as e:
            row.steps["prune"] = _reason(e)
    if "quantize" in steps:
        try:
            from ..quant import quantize

            calib = [torch.randn(4, channels, size, size, generator=g) for _ in range(2)]
            q = quantize(pruned, calib, "minmax")
            with torch.no_grad():
                yf, yq = pruned(x), q(x)
            rel = ((yq - yf).norm() / yf.norm().clamp_min(1e-12)).item()
            row.facts["quant_rel_l2"] = round(rel, 4)
            row.steps["quantize"] = "ok" if rel < 0.5 else f"int8 logits far from float (relative L2 {rel:.2f})"
        except Exception as e:
            row.steps["quantize"] = _reason(e)
    if "export" in steps:
        try:
            from ..export import export

            with tempfile.TemporaryDirectory() as tmp:
                res = export(pruned, os.path.join(tmp, "m.onnx"), input_size=(channels, size, size), check_batches=1)
            row.facts["export_bytes"] = res.bytes
            row.steps["export"] = "ok" if res.passed else "verification failed"
        except Exception as e:
            row.steps["export"] = _reason(e)
    row.seconds = time.perf_counter() - start
    return row
