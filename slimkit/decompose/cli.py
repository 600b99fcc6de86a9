"""``slimkit decompose``: low-rank decomposition with measured parameters, MACs, accuracy and speed.

Wired into ``slimkit/cli.py`` through its ``PLUGIN_COMMANDS`` table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from ..cli import logger
from ..cli_args import DATA_HELP, add_data_arguments, add_model_arguments
from ..errors import SlimkitError

FINETUNE_RENAME = {"epochs": "--finetune-epochs", "lr": "--lr", "distill": "--distill", "teacher": "--teacher",
                   "teacher_weights": "--teacher-weights"}


def command_configs() -> dict[str, tuple[type, dict]]:
    """The configs ``slimkit decompose`` turns into flags: ``{key: (class, add_arguments options)}``."""
    from ..pipeline import FinetuneConfig
    from .config import DecomposeConfig

    return {"decompose": (DecomposeConfig, {"title": "decomposition"}),
            "finetune": (FinetuneConfig, {"title": "fine-tuning after the decomposition", "prefix": "finetune_",
                                          "only": tuple(FINETUNE_RENAME), "rename": FINETUNE_RENAME,
                                          "defaults": {"epochs": 0}})}


def add_decompose_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``slimkit decompose MODEL --method svd|cp|tucker|separable|asym --rank R --out DIR``."""
    add_model_arguments(parser)
    for cls, how in command_configs().values():
        cls.add_arguments(parser, **how)
    add_data_arguments(parser, DATA_HELP + " (accuracy, data-driven methods, fine-tuning)")
    parser.add_argument("--input-size", help="C,H,W when there is no --data (default: the model's)")
    parser.add_argument("--out", required=True, help="output folder (model.safetensors, report.json)")
    parser.add_argument("--no-bench", action="store_true", help="skip the latency comparison")
    return parser


def cli_decompose(args: argparse.Namespace) -> dict:
    """Decompose a model (Denton et al. 2014, Lebedev et al. 2015, Kim et al. 2016, Jaderberg et al. 2014, Zhang et
    al. 2016), optionally fine-tune (with distillation), write ``OUT``; report counts, accuracy and speed-up."""
    import torch

    from ..artifact import atomic_write_text, history, save
    from ..cli import _input_size, _model
    from ..pipeline import Context, FinetuneConfig, recover
    from ..train import check_input, evaluate
    from . import decompose
    from .config import DecomposeConfig

    config = DecomposeConfig.from_args(args)
    tune = FinetuneConfig.from_args(args, prefix="finetune_", only=tuple(FINETUNE_RENAME))
    method = config.method
    log = logger(args)
    data = None
    if args.data:
        from ..data import load

        data = load(args.data, limit=args.limit, seed=args.seed)
    if data is None and (tune.epochs or method == "asym" or config.procedure == "sequential"):
        what = "--finetune-epochs" if tune.epochs else "--method asym" if method == "asym" else "--procedure sequential"
        raise SlimkitError(f"decompose: --data is needed for {what}")
    model = _model(args, data.info.num_classes if data else None).cpu().eval()
    size = _input_size(args.input_size) or (tuple(data.info.input_size) if data else None)
    if size is None:
        from ..models import model_input_size

        size = tuple(model_input_size(model, args.model))
    example = torch.zeros(1, *size)
    test = data.loader("test", args.batch_size) if data else None
    if data:
        check_input(model, next(iter(test))[0], data.info.num_classes, f"dataset {args.data}")
    before = evaluate(model, test) if data else None
    t0 = time.perf_counter()
    result = decompose(model, example, config, loader=data.loader("train", args.batch_size, seed=args.seed)
                       if data else None, seed=args.seed)
    out_model = result.model
    if tune.epochs:
        ctx = Context(data=data, out_dir=args.out, seed=args.seed, batch_size=args.batch_size,
                      progress=not args.json)
        out_model = recover(out_model, ctx, tune, model if tune.distill and not tune.teacher else None)
    out_model.eval()
    seconds = time.perf_counter() - t0
    after = evaluate(out_model, test) if data else None
    history(out_model).append({"stage": "decompose", "params": config.to_dict(), "finetune": tune.to_dict(),
                               "details": result.summary()})
    meta = {"input_size": list(size)}
    if data:
        meta.update(dataset=args.data, classes=list(data.info.classes))
    path = save(out_model, os.path.join(args.out, "model.safetensors"), meta=meta)
    out = {"artifact": path, "model": args.model, "method": method, "decompose_seconds": seconds, **result.summary()}
    if data:
        out.update(test_top1_before=before["top1"], test_top1_after=after["top1"],
                   top1_drop=before["top1"] - after["top1"])
    if not args.no_bench:
        from ..bench import compare

        cmp = compare(model, out_model, size, batch_sizes=(1, 64), threads=getattr(args, "threads", None),
                      modes=("eager",), names=("original", "decomposed"), roofline=False)
        out["latency"] = cmp.speedups("eager")
    atomic_write_text(os.path.join(args.out, "report.json"), json.dumps(out, indent=2, default=str))
    msg = (f"{method}: {len(result.layers)} layer(s) decomposed, {len(result.skipped)} left whole; MACs "
           f"{result.macs_before:,} -> {result.macs_after:,} ({result.macs_after / max(result.macs_before, 1):.3f}x)")
    if data:
        msg += f"; test top1 {before['top1']:.4f} -> {after['top1']:.4f}"
    if not args.no_bench:
        msg += f"; {cmp.speedup_text('eager')}"
    log(msg + f"; wrote {path}")
    return out
