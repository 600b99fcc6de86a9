"""``slimkit quantize``: post-training int8 quantization with measured accuracy, size and speed.

Wired into ``slimkit/cli.py`` through its ``PLUGIN_COMMANDS`` table, which also adds ``--json`` and ``--threads``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from ..cli import logger
from ..cli_args import add_data_arguments, add_model_arguments
from ..errors import SlimkitError


def command_configs() -> dict[str, tuple[type, dict]]:
    """The configs ``slimkit quantize`` turns into flags, with how: ``{key: (class, add_arguments options)}``."""
    from .config import QuantConfig, Train8Config

    return {"quantize": (QuantConfig, {"title": "int8 quantization"}),
            "train8": (Train8Config, {"title": "8-bit training first (Banner et al. 2018)", "prefix": "train8_",
                                      "only": ("epochs",), "rename": {"epochs": "--train8-epochs"},
                                      "defaults": {"epochs": 0}})}


def add_quantize_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``slimkit quantize MODEL [--weights W] --data SPEC [--calib N] ...``.

    The method flags come from :class:`~slimkit.quant.config.QuantConfig` (and ``--train8-epochs``
    from :class:`~slimkit.quant.config.Train8Config`).
    """
    add_model_arguments(parser)
    add_data_arguments(parser, required=True)
    for cls, how in command_configs().values():
        cls.add_arguments(parser, **how)
    parser.add_argument("--out", required=True, help="output folder (model.safetensors, report.json)")
    parser.add_argument("--no-bench", action="store_true", help="skip the latency comparison")
    return parser


def cli_quantize(args: argparse.Namespace) -> dict:
    """Quantize a model to int8 (Jacob et al. 2018), write ``OUT/model.safetensors``, return the measurements.

    Calibrates on ``--calib`` class-balanced training images with ``--observer``, optionally
    runs the accuracy guard on the validation split (partial quantization, Wu et al. 2020), with
    ``--qat-epochs E`` > 0 fine-tunes from that calibration by quantization-aware training with
    learned step sizes (Esser et al. 2020) on the train split, then reports
    float and int8 test top-1, weight bytes, both artifacts' sizes on disk and the bs1 / bs64
    latency ratio int8/float from :func:`slimkit.bench.compare` (interleaved, median).
    """
    import torch

    from ..artifact import atomic_write_text, history, save
    from ..data import load
    from ..models import create_model
    from ..models.registry import is_artifact_path
    from ..profile import profile
    from ..train import check_input, evaluate
    from . import calibration_loader, quantize_then_qat
    from .config import QuantConfig, Train8Config

    config = QuantConfig.from_args(args)
    train8_config = Train8Config.from_args(args, prefix="train8_", only=("epochs",))
    log = logger(args)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load(args.data, limit=args.limit, seed=args.seed)
    num_classes = None if is_artifact_path(args.model) else (args.num_classes or data.info.num_classes)
    model = create_model(args.model, num_classes=num_classes, weights=args.weights).cpu().eval()
    test_loader = data.loader("test", args.batch_size)
    check_input(model, next(iter(test_loader))[0], data.info.num_classes, f"dataset {args.data}")
    val = None
    if config.max_drop is not None:
        if not len(data.val):
            raise SlimkitError("--max-drop needs a validation split (the guard must not tune on test)")
        val = data.loader("val", args.batch_size)
    calib = calibration_loader(data, config.calib, config.batch_size, seed=args.seed)
    train8 = None
    if train8_config.epochs:  # 8-bit training first (Banner et al. 2018): the rest quantizes its result
        from .train8 import train_8bit

        train8 = {"epochs": train8_config.epochs, "input_test_top1": evaluate(model, test_loader)["top1"]}
        fit_options = train8_config.fit_kwargs()
        model, _ = train_8bit(model, data.loader("train", args.batch_size, seed=args.seed), fit_options.pop("epochs"),
                              seed=args.seed, progress=False, **fit_options)
        history(model).append({"stage": "train8", "params": train8_config.to_dict()})
    qmodel = quantize_then_qat(model, calib, config, val_loader=val, log=log,
                               train_loader=data.loader("train", args.batch_size, seed=args.seed), seed=args.seed,
                               progress=not getattr(args, "json", False))
    seconds = time.perf_counter() - t0
    qat_epochs = config.qat_epochs

    f_test, q_test = evaluate(model, test_loader), evaluate(qmodel, test_loader)
    history(qmodel).append({"stage": "quantize", "params": config.to_dict(),
                            "metrics": {"test_top1": q_test["top1"], "keep_float": qmodel.keep_float}})
    meta = {"dataset": args.data, "input_size": list(data.info.input_size), "classes": list(data.info.classes)}
    path = save(qmodel, os.path.join(args.out, "model.safetensors"), meta=meta)
    with tempfile.TemporaryDirectory() as tmp:
        float_bytes = os.path.getsize(save(model, os.path.join(tmp, "float.safetensors"), meta=meta))
    example = torch.zeros(1, *data.info.input_size)
    f_prof, q_prof = profile(model, example), profile(qmodel, example)
    result = {
        "artifact": path, "model": args.model, "data": args.data, "observer": config.observer, "calib": config.calib,
        "keep_float": qmodel.keep_float, "quantize_seconds": seconds,
        "method": "qat" if qat_epochs else "ptq", "qat_epochs": qat_epochs,
        "float": {"test_top1": f_test["top1"], "test_top5": f_test["top5"], "weight_bytes": f_prof.weight_bytes,
                  "file_bytes": float_bytes},
        "int8": {"test_top1": q_test["top1"], "test_top5": q_test["top5"], "weight_bytes": q_prof.weight_bytes,
                 "file_bytes": os.path.getsize(path)},
        "top1_drop": f_test["top1"] - q_test["top1"],
        "weight_ratio": f_prof.weight_bytes / max(q_prof.weight_bytes, 1),
        "file_ratio": float_bytes / os.path.getsize(path),
    }
    if train8:
        result["train8"] = train8
    if getattr(qmodel, "guard", None):
        result["guard"] = qmodel.guard
    if not args.no_bench:
        from ..bench import compare

        cmp = compare(model, qmodel, data.info.input_size, batch_sizes=(1, 64), threads=getattr(args, "threads", None),
                      modes=("eager",), names=("float", "int8"), roofline=False)
        lat = {}
        for bs in (1, 64):
            r = cmp.results["eager"][bs]
            lat[f"bs{bs}"] = {"float_ms": r["a"]["median_ms"], "int8_ms": r["b"]["median_ms"],
                              "ratio_int8_over_float": r["ratio"]["median"], "speedup": 1 / r["ratio"]["median"]}
        result["latency"] = lat
        result["bench_threads"] = cmp.threads
    import json

    atomic_write_text(os.path.join(args.out, "report.json"), json.dumps(result, indent=2, default=str))
    log(f"float top1 {f_test['top1']:.4f} -> int8 top1 {q_test['top1']:.4f}; weights {f_prof.weight_bytes:,} -> "
        f"{q_prof.weight_bytes:,} B; file {float_bytes:,} -> {os.path.getsize(path):,} B; kept float: "
        f"{qmodel.keep_float or 'none'}; wrote {path}")
    if "latency" in result:
        log(f"int8 speed-up (interleaved median): bs1 x{result['latency']['bs1']['speedup']:.2f}, "
            f"bs64 x{result['latency']['bs64']['speedup']:.2f}")
    return result

