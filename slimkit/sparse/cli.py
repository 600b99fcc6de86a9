"""``slimkit sparsify`` and ``slimkit share``: Deep Compression's stages, each writing the artifact and the packed file.

    slimkit sparsify resnet20 --weights W --data D --sparsity 0.8 --finetune-epochs 2 --out sparse/
    slimkit share sparse/ --bits conv=5,linear=4 --data D --finetune-epochs 1 --out shared/

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
BITS_KEYS = {"conv": "conv_bits", "linear": "linear_bits", "edge": "edge_bits"}


def command_configs(command: str = "sparsify") -> dict[str, tuple[type, dict]]:
    """The configs ``slimkit sparsify`` / ``slimkit share`` turn into flags: ``{key: (class, options)}``."""
    from ..pipeline import FinetuneConfig
    from .config import ShareConfig, SparsifyConfig

    method = ({"share": (ShareConfig, {"title": "weight sharing"})} if command == "share" else
              {"sparsify": (SparsifyConfig, {"title": "sparsity"})})
    return {**method, "finetune": (FinetuneConfig, {"title": "retraining with the masks or codebooks held",
                                                    "prefix": "finetune_", "only": tuple(FINETUNE_RENAME),
                                                    "rename": FINETUNE_RENAME, "defaults": {"epochs": 0}})}


def _add_common(parser: argparse.ArgumentParser, configs: str | dict) -> argparse.ArgumentParser:
    """The model, the configs' flags (``configs``: a command of this module, or its config table), data, --out."""
    add_model_arguments(parser)
    for cls, how in (command_configs(configs) if isinstance(configs, str) else configs).values():
        cls.add_arguments(parser, **how)
    add_data_arguments(parser, DATA_HELP + " (accuracy, data-driven scores, retraining)")
    parser.add_argument("--out", required=True, help="output folder (model.safetensors, model.slimpack, report.json)")
    return parser


def add_sparsify_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``slimkit sparsify MODEL --method NAME --sparsity S [--data D --finetune-epochs E] --out DIR``."""
    return _add_common(parser, "sparsify")


def add_share_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``slimkit share MODEL [--bits conv=5,linear=4,edge=8] [--data D --finetune-epochs E] --out DIR``."""
    _add_common(parser, "share")
    parser.add_argument("--bits", help="shorthand for the three bit flags: conv=B,linear=B,edge=B (any of them)")
    return parser


def _bits(text: str | None) -> dict[str, int]:
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in BITS_KEYS or not value.strip().isdigit():
            raise SlimkitError(f"--bits: expected conv=B,linear=B,edge=B, got {part!r}")
        out[BITS_KEYS[key.strip()]] = int(value)
    return out


def _setup(args: argparse.Namespace, needs_data: bool, why: str):
    """Data, model, test loader and accuracy before, as every command of this module starts."""
    from ..cli import _model
    from ..pipeline import Context, FinetuneConfig
    from ..train import check_input, evaluate

    tune = FinetuneConfig.from_args(args, prefix="finetune_", only=tuple(FINETUNE_RENAME))
    data = None
    if args.data:
        from ..data import load

        data = load(args.data, limit=args.limit, seed=args.seed)
    if data is None and (tune.epochs or needs_data):
        raise SlimkitError(f"{args.command}: --data is needed for {'--finetune-epochs' if tune.epochs else why}")
    model = _model(args, data.info.num_classes if data else None).cpu().eval()
    test = data.loader("test", args.batch_size) if data else None
    if data:
        check_input(model, next(iter(test))[0], data.info.num_classes, f"dataset {args.data}")
    ctx = Context(data=data, out_dir=args.out, seed=args.seed, batch_size=args.batch_size,
                  progress=not args.json) if data else None
    return tune, data, model, test, (evaluate(model, test) if data else None), ctx


def _finish(args: argparse.Namespace, model, out_model, data, test, before: dict | None, record: dict,
            summary: dict, message: str) -> dict:
    """Write the artifact, the packed file and report.json; log one line with accuracy and bytes on disk."""
    from ..artifact import atomic_write_text, history, save
    from ..models import model_input_size
    from ..train import evaluate
    from . import pack, sizes

    history(out_model).append(record)
    after = evaluate(out_model, test) if data else None
    meta = {"input_size": list(data.info.input_size) if data else list(model_input_size(model, args.model))}
    if data:
        meta.update(dataset=args.data, classes=list(data.info.classes))
    dense = save(out_model, os.path.join(args.out, "model.safetensors"), meta=meta)
    packed = pack(out_model, os.path.join(args.out, "model.slimpack"), meta=meta)
    # the input's bytes in the same format, so the ratio compares like with like
    original = save(model, os.path.join(args.out, ".input.safetensors"))
    original_bytes = os.path.getsize(original)
    os.unlink(original)
    breakdown = sizes(packed)
    out = {"artifact": dense, "packed": packed, "model": args.model, **summary, "input_bytes": original_bytes,
           "artifact_bytes": os.path.getsize(dense), "packed_bytes": breakdown["file"],
           "ratio": original_bytes / breakdown["file"], "components": breakdown["components"]}
    if data:
        out.update(test_top1_before=before["top1"], test_top1_after=after["top1"],
                   top1_drop=before["top1"] - after["top1"])
    atomic_write_text(os.path.join(args.out, "report.json"), json.dumps(out, indent=2, default=str))
    if data:
        message += f"; test top1 {before['top1']:.4f} -> {after['top1']:.4f}"
    logger(args)(message + f"; {original_bytes:,} -> {breakdown['file']:,} bytes on disk "
                           f"({out['ratio']:.1f}x smaller); wrote {packed}")
    return out


def cli_sparsify(args: argparse.Namespace) -> dict:
    """Sparsify (module :mod:`slimkit.sparse.masks`), retrain with the masks held, write the artifact and the packed
    file; report sparsity, accuracy and bytes on disk."""
    from . import SPARSIFIERS, finetuner, sparsify
    from .config import SparsifyConfig

    config = SparsifyConfig.from_args(args)
    entry = SPARSIFIERS.get(config.method)
    tune, data, model, test, before, ctx = _setup(
        args, entry.uses_data or entry.needs_training or config.scope == "sensitivity",
        f"--method {config.method}" if entry.uses_data or entry.needs_training else "--scope sensitivity")
    if entry.needs_training and not tune.epochs:
        raise SlimkitError(f"sparsify: method {config.method} prunes while training: give --finetune-epochs")
    teacher = model if tune.distill and not tune.teacher else None
    t0 = time.perf_counter()
    val = data.loader("val" if len(data.val) else "train", args.batch_size) if data else None
    result = sparsify(model, config, loader=data.loader("train", args.batch_size, seed=args.seed) if data else None,
                      finetune=finetuner(ctx, tune, teacher) if data else None, epochs=tune.epochs, val=val)
    if result.scan is not None:
        from .sensitivity import plot

        plot(result.scan, os.path.join(args.out, "sensitivity.png"), result.scan["plan"],
             f"{args.model}: per-layer sensitivity (plan for sparsity {config.sparsity:g})")
    edges = ", ".join(f"{n} at {s:.2f}" for n, s in result.edges.items()) or "none"
    return _finish(args, model, result.model, data, test, before,
                   {"stage": "sparsify", "params": config.to_dict(), "finetune": tune.to_dict(),
                    "details": result.summary()},
                   {"method": config.method, "sparsity": result.sparsity, "seconds": time.perf_counter() - t0,
                    "sparsify": result.summary()},
                   f"{config.method}: {result.sparsity:.3f} of the conv/linear weights zero (first conv and "
                   f"classifier by rule '{config.edges}': {edges})")


def cli_share(args: argparse.Namespace) -> dict:
    """Share weights per layer (Han et al. 2016), fine-tune the centroids, write the artifact and the packed file."""
    from . import finetuner, share
    from .config import ShareConfig

    config = ShareConfig.from_args(args, **_bits(args.bits))
    tune, data, model, test, before, ctx = _setup(args, config.weighting == "hessian", "--weighting hessian")
    teacher = model if tune.distill and not tune.teacher else None
    t0 = time.perf_counter()
    result = share(model, config, loader=data.loader("train", args.batch_size, seed=args.seed) if data else None,
                   finetune=finetuner(ctx, tune, teacher) if data else None, epochs=tune.epochs)
    return _finish(args, model, result.model, data, test, before,
                   {"stage": "share", "params": config.to_dict(), "finetune": tune.to_dict(),
                    "details": result.summary()},
                   {"seconds": time.perf_counter() - t0, "share": result.summary()},
                   f"shared at {config.conv_bits}/{config.linear_bits}/{config.edge_bits} bits (conv/linear/first "
                   "conv and classifier)")
