"""``slimkit transform``: replace layers by efficient modules and report parameters and MACs before and after.

Wired into ``slimkit/cli.py`` through its ``PLUGIN_COMMANDS`` table.
"""

from __future__ import annotations

import argparse
import json
import os

from ..cli import logger
from ..cli_args import add_data_arguments, add_model_arguments


def command_configs() -> dict[str, tuple[type, dict]]:
    """The configs ``slimkit transform`` turns into flags, with how: ``{key: (class, add_arguments options)}``."""
    from .config import TransformConfig

    return {"transform": (TransformConfig, {"title": "transform", "skip": ("batch_size",), "required": ("transform",)})}


def add_transform_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``slimkit transform MODEL [--weights W] --method NAME [--layers a,b] --out DIR``.

    The flags come from :class:`~slimkit.transform.config.TransformConfig`; transform options are
    ``--opt KEY=VALUE`` (repeatable; values parsed as JSON, else kept as text), e.g. ``--opt groups=4``.
    """
    add_model_arguments(parser)
    for cls, how in command_configs().values():
        cls.add_arguments(parser, **how)
    add_data_arguments(parser, "dataset spec for activation sampling (without: weight-only init)", batch_size=64)
    parser.add_argument("--input-size", help="C,H,W when there is no --data (default: the model's own)")
    parser.add_argument("--out", required=True, help="output folder (model.safetensors, report.json)")
    return parser


def cli_transform(args: argparse.Namespace) -> dict:
    """Apply one transform to a model, write ``OUT/model.safetensors`` and return what changed.

    Layers are replaced by :func:`slimkit.transform.apply_transform` (the transforms of Howard et
    al. 2017, Szegedy et al. 2016, Zhang et al. 2018, He et al. 2016, Lin et al. 2014 and Gao et
    al. 2018), initialised on activations of ``--num-batches`` training batches when ``--data``
    is given and by weight-only closed forms otherwise; the result holds the replaced and
    skipped layers and the profiler's parameters and MACs before and after.
    """
    import torch

    from ..artifact import atomic_write_text, save
    from ..models import create_model, model_input_size
    from ..models.registry import is_artifact_path
    from ..profile import profile
    from . import apply_transform

    log = logger(args)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    from .config import TransformConfig

    config = TransformConfig.from_args(args, skip=("batch_size",), batch_size=args.batch_size)
    data, loader = None, None
    if args.data:
        from ..data import load

        data = load(args.data, limit=args.limit, seed=args.seed)
    num_classes = args.num_classes or (data.info.num_classes if data else None)
    if is_artifact_path(args.model):
        num_classes = None
    model = create_model(args.model, num_classes=num_classes, weights=args.weights).cpu().eval()
    if data is not None:
        size = tuple(data.info.input_size)
        loader = data.loader("train", args.batch_size, seed=args.seed)
        from ..train import check_input

        check_input(model, next(iter(data.loader("test", 2)))[0], data.info.num_classes, f"dataset {args.data}")
    elif args.input_size:
        size = tuple(int(v) for v in args.input_size.split(","))
    else:
        size = tuple(model_input_size(model, args.model))
    example = torch.zeros(1, *size)
    before = profile(model, example)
    layers = list(config.layers) if isinstance(config.layers, tuple) else config.layers
    apply_transform(model, config.transform, layers, example_input=example, calib_loader=loader,
                    num_batches=config.num_batches, max_images=config.max_images, **config.options)
    after = profile(model, example)
    rec = model.slimkit_last_transform
    meta = {"input_size": list(size)}
    if data is not None:
        meta.update(dataset=args.data, classes=list(data.info.classes))
    path = save(model, os.path.join(args.out, "model.safetensors"), meta=meta)
    result = {"artifact": path, "model": args.model, "method": config.transform, "params": rec["params"],
              "replaced": rec["replaced"], "skipped": rec["skipped"], "calibration_images": rec["calibration_images"],
              "before": {"params": before.params, "macs": before.macs},
              "after": {"params": after.params, "macs": after.macs},
              "macs_ratio": after.macs / max(before.macs, 1), "params_ratio": after.params / max(before.params, 1)}
    atomic_write_text(os.path.join(args.out, "report.json"), json.dumps(result, indent=2))
    log(f"{config.transform}: replaced {len(rec['replaced'])} layer(s), skipped {len(rec['skipped'])}; params "
          f"{before.params:,} -> {after.params:,}, MACs {before.macs:,} -> {after.macs:,} "
          f"(x{result['macs_ratio']:.3f}); wrote {path}")
    return result

