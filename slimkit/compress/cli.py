"""``slimkit compress``: the one-command job, or a recipe for users who want full control.

Wired into ``slimkit/cli.py`` through its ``PLUGIN_COMMANDS`` table. Two forms:

* ``slimkit compress MODEL [--weights W] --data D --target latency=0.5|size=0.1|macs=0.5 [--max-drop 0.5]
  [--runtime onnxruntime] [--batch-sizes 1,64] [--time-budget 2h] --out DIR``: plan, search, KD,
  int8 or Deep Compression, export + verify, ``report.json`` and ``report.html`` (run it again to
  resume a killed job);
* ``slimkit compress --recipe R --out DIR``: the stages a recipe names, as before.
"""

from __future__ import annotations

import argparse
import os

from ..cli import logger
from ..cli_args import DATA_HELP, MODEL_HELP, add_data_arguments, add_model_arguments
from ..errors import SlimkitError


def command_configs() -> dict[str, tuple[type, dict]]:
    """The configs ``slimkit compress`` turns into flags: ``{key: (class, add_arguments options)}``."""
    from .config import CompressConfig

    return {"compress": (CompressConfig, {"title": "compress --target", "skip": ("seed",)})}


def add_compress_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``slimkit compress MODEL --data D --target KIND=F --out DIR`` (or ``--recipe R``)."""
    add_model_arguments(parser, MODEL_HELP + " (not with --recipe)", nargs="?")
    parser.add_argument("--recipe", help="run this recipe (YAML/JSON) instead of planning from --target")
    for cls, how in command_configs().values():
        cls.add_arguments(parser, **how)
    add_data_arguments(parser, DATA_HELP + " (required with MODEL)", batch_size=None)
    parser.add_argument("--out", required=True, help="output folder: model.safetensors, the exported model, "
                                                     "report.json, report.html (and the job's state: rerun to resume)")
    return parser


def cli_compress(args: argparse.Namespace) -> dict:
    """Plan and run the families a target calls for, or run a recipe; write the artifact and the report."""
    import torch

    log = logger(args)
    if args.recipe:
        if args.model:
            raise SlimkitError("compress: give MODEL --target ... or --recipe R, not both")
        from ..pipeline import load_recipe, run_recipe

        return run_recipe(load_recipe(args.recipe), args.out, progress=not args.json, log=log)
    if not args.model or not args.data:
        raise SlimkitError("compress: give MODEL and --data (and --target), or --recipe R")
    from ..cli import _model
    from ..data import load as load_data
    from . import compress
    from .config import CompressConfig

    config = CompressConfig.from_args(args, skip=("seed",), seed=args.seed)
    threads = args.threads or 1
    torch.set_num_threads(threads)
    data = load_data(args.data, limit=args.limit, seed=config.seed)
    model = _model(args, data.info.num_classes).cpu().eval()
    report = compress(model, args.data, config, args.out, data=data, limit=args.limit, threads=threads, log=log,
                      progress=not args.json)
    return {"verdict": report["verdict"], "files": report["files"], "plan": report["plan"]["steps"],
            "before": _brief(report["cards"]["before"]), "after": _brief(report["cards"]["after"]),
            "report": os.path.join(args.out, "report.json")}


def _brief(card: dict) -> dict:
    return {k: card[k] for k in ("test_top1", "test_top5", "params", "macs", "bytes", "latency") if k in card}
