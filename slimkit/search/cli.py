"""``slimkit search``: a per-layer compression policy under a budget measured on the target runtime.

Wired into ``slimkit/cli.py`` through its ``PLUGIN_COMMANDS`` table. Three forms:

* ``slimkit search MODEL --data D --target-latency 0.5 --runtime onnxruntime --out DIR``: a study
  (new, or joined when ``--study``/``--storage`` name one that exists), then the final model;
* ``slimkit search --resume --out DIR``: the study in ``DIR`` continued with the job it was started
  with (all workers killed and restarted lose no completed trial);
* ``slimkit search --worker DIR/search.json``: one more worker process for a running study, on this
  machine or any other that reaches its storage (it uses the job's latency table).
"""

from __future__ import annotations

import argparse
import os

from ..cli import logger
from ..cli_args import DATA_HELP, MODEL_HELP, add_data_arguments, add_model_arguments
from ..errors import SlimkitError


def command_configs() -> dict[str, tuple[type, dict]]:
    """The configs ``slimkit search`` turns into flags: ``{key: (class, add_arguments options)}``."""
    from .config import SearchConfig

    return {"search": (SearchConfig, {"title": "search", "skip": ("threads",)})}


def add_search_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``slimkit search MODEL --data D --target-latency F --runtime NAME --out DIR ...``."""
    add_model_arguments(parser, MODEL_HELP + " (not with --resume or --worker)", nargs="?")
    for cls, how in command_configs().values():
        cls.add_arguments(parser, **how)
    add_data_arguments(parser, DATA_HELP + " (required for a new search)", seed=False, batch_size=None)
    parser.add_argument("--out", help="output folder: study.db, search.json, latency-table.json, results.json/.md, "
                                      "pareto.png, model.safetensors (and the exported model)")
    parser.add_argument("--resume", action="store_true", help="continue the study in --out with its own job")
    parser.add_argument("--worker", metavar="JOB", help="run one worker of the study whose search.json this is")
    return parser


def cli_search(args: argparse.Namespace) -> dict:
    """Search a policy (Optuna: TPE, GP-BO, NSGA-II), check the finalists on the runtime, fine-tune, ship."""
    import torch

    from . import search
    from .config import SearchConfig

    log = logger(args)
    threads = args.threads or 1
    torch.set_num_threads(threads)
    if args.worker:
        from ..documents import read_json_file
        from .worker import check_job, run

        job = check_job(read_json_file(args.worker, "search job"), args.worker)
        n = run(job, index=0, log=log)
        return {"worker": args.worker, "trials": n}
    if not args.out:
        raise SlimkitError("search: --out DIR is required")
    if args.resume:
        from ..artifact import load
        from ..documents import read_json_file
        from .engine import JOB, ORIGINAL

        path = os.path.join(args.out, JOB)
        if not os.path.exists(path):
            raise SlimkitError(f"search: --resume: {path} does not exist (no study was started in {args.out})")
        job = read_json_file(path, "search job")
        try:
            config = SearchConfig.from_dict(job["config"])
            model = load(os.path.join(args.out, ORIGINAL)).eval()
            spec, limit, size = job["data"], job.get("limit"), tuple(job["input_size"])
        except (KeyError, TypeError) as e:
            raise SlimkitError(f"search: --resume: {path} is not a search job ({e})") from None
        config = config.replace(study=job["study"], storage=job["storage"])
        name = job["study"]
    else:
        if not args.model or not args.data:
            raise SlimkitError("search: give MODEL and --data (or --resume --out DIR, or --worker JOB)")
        from ..cli import _model
        from ..data import load as load_data

        config = SearchConfig.from_args(args, skip=("threads",), threads=threads)
        data = load_data(args.data, limit=args.limit, seed=config.seed)
        model = _model(args, data.info.num_classes).cpu().eval()
        spec, limit, size, name = args.data, args.limit, tuple(data.info.input_size), args.model
    results = search(model, spec, config, args.out, limit=limit, input_size=size, model_name=name,
                     data=None if args.resume else data, resume=args.resume, log=log)
    ch, final = results["chosen"], results["final"]
    return {"artifact": results["artifact"], "results": os.path.join(args.out, "results.json"),
            "study": results["study"], "chosen": {k: ch[k] for k in ch if k != "latency"},
            "final": final, "export": results["export"]}
