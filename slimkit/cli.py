"""The ``slimkit`` command: one entry point, one subcommand per job.

Every subcommand takes ``--json`` and then prints exactly one JSON object on stdout (progress
and logs go to stderr). Bad input ends with one line ``slimkit: error: ...`` on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable

from .cli_args import add_data_arguments, add_model_arguments
from .errors import SlimkitError

COMMANDS: dict[str, Callable[[argparse.Namespace], dict]] = {}
TRAIN_DEFAULTS = {"epochs": 10, "lr": 0.1}  # `slimkit train` trains from scratch; recipes' fine-tunes default lower


def command(name: str):
    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


def _threads(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def logger(args: argparse.Namespace) -> Callable[[str], None]:
    """Where a command's human-readable lines go: stdout, or stderr when --json owns stdout."""
    stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    return lambda msg: print(msg, file=stream, flush=True)


def _model(args: argparse.Namespace, num_classes: int | None = None):
    from .models import create_model
    from .models.registry import is_artifact_path

    if is_artifact_path(args.model):
        num_classes = None
    return create_model(args.model, num_classes=args.num_classes or num_classes, weights=args.weights)


@command("train")
def cmd_train(args: argparse.Namespace) -> dict:
    """Train (or fine-tune) a model and write it as an artifact."""
    from .artifact import atomic_write_text, history, save
    from .data import load
    from .train import check_input, evaluate, fit, seed_everything
    from .train.config import FitConfig

    config = FitConfig.from_args(args)
    data = load(args.data, limit=args.limit, seed=args.seed)
    seed_everything(args.seed)  # the initial weights are part of the run: same seed, same model
    model = _model(args, data.info.num_classes)
    check_input(model, next(iter(data.loader("test", 2)))[0], data.info.num_classes, f"dataset {args.data}")
    run = fit(model, data.loader("train", args.batch_size, seed=args.seed),
              val=data.loader("val", args.batch_size) if len(data.val) else None, seed=args.seed,
              checkpoint_dir=os.path.join(args.out, "checkpoints"), resume=not args.no_resume,
              progress=not args.json, **config.fit_kwargs())
    test = evaluate(model, data.loader("test", args.batch_size))
    history(model).append({"stage": "train", "params": config.to_dict(), "batch_size": args.batch_size,
                           "seed": args.seed, "metrics": {"test_top1": test["top1"]}})
    path = save(model, os.path.join(args.out, "model.safetensors"),
                meta={"dataset": args.data, "input_size": list(data.info.input_size),
                      "classes": list(data.info.classes)})
    result = {"artifact": path, "epochs": run.epochs, "test": test}
    atomic_write_text(os.path.join(args.out, "report.json"), json.dumps(result, indent=2))
    logger(args)(f"test top1 {test['top1']:.4f} top5 {test['top5']:.4f} (n={test['n']}); wrote {path}")
    return result


@command("eval")
def cmd_eval(args: argparse.Namespace) -> dict:
    """Top-1/top-5 accuracy of a model on a dataset split."""
    from .data import load
    from .train import check_input, evaluate

    data = load(args.data, limit=args.limit, seed=args.seed)
    model = _model(args)
    split = getattr(data, args.split)
    if not len(split):
        raise SlimkitError(f"split {args.split!r} of {args.data} is empty")
    loader = data.loader(args.split, args.batch_size)
    check_input(model, next(iter(loader))[0], data.info.num_classes, f"dataset {args.data}")
    result = evaluate(model, loader, progress=not args.json)
    logger(args)(f"{args.split}: top1 {result['top1']:.4f} top5 {result['top5']:.4f} loss {result['loss']:.4f} "
               f"(n={result['n']})")
    return {k: result[k] for k in ("top1", "top5", "n", "loss")}


@command("info")
def cmd_info(args: argparse.Namespace) -> dict:
    """What a model is: spec, parameters, and for an artifact its provenance and size on disk."""
    from .models.registry import is_artifact_path

    model = _model(args)
    params = sum(p.numel() for p in model.parameters())
    result = {"model": args.model, "params": params, "base": getattr(model, "slimkit_base", None),
              "history": getattr(model, "slimkit_history", []), "meta": getattr(model, "slimkit_meta", {})}
    packed = None
    if is_artifact_path(args.model):
        from .artifact import artifact_file
        from .sparse.pack import is_packed
        from .sparse.sizes import sizes

        path = artifact_file(args.model)
        result["artifact_bytes"] = os.path.getsize(path)
        if is_packed(path):
            packed = result["packed"] = sizes(path)
    log = logger(args)
    log(f"{args.model}: {params:,} parameters, base {result['base']}")
    for i, step in enumerate(result["history"], 1):
        log(f"  {i}. {step.get('stage')} {step.get('params', {})} -> {step.get('metrics', {})}")
    if "artifact_bytes" in result:
        log(f"  size on disk: {result['artifact_bytes']:,} bytes")
    if packed:
        from .sparse.sizes import size_table

        log(size_table(packed))
    return result


def _input_size(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise SlimkitError(f"--input-size must look like 3,32,32, got {text!r}") from None
    if len(size) != 3 or min(size) < 1:
        raise SlimkitError(f"--input-size must be three positive numbers C,H,W, got {text!r}")
    return size


@command("profile")
def cmd_profile(args: argparse.Namespace) -> dict:
    """Parameters, MACs, other ops, peak activation memory, weight bytes and energy, per layer."""
    import torch

    from .models import model_input_size
    from .models.registry import is_artifact_path
    from .profile import profile

    model = _model(args)
    size = _input_size(args.input_size) or model_input_size(model, args.model)
    prof = profile(model, torch.zeros(1, *size))
    result = prof.to_dict()
    if is_artifact_path(args.model):
        from .artifact import artifact_file

        path = artifact_file(args.model)
        result["artifact_bytes"] = os.path.getsize(path)
    if args.plot:
        from .report import layer_latency, plot_layers

        latency = layer_latency(model, torch.zeros(1, *size))
        result["plot"] = plot_layers(result["layers"], args.plot, latency,
                                     title=f"{args.model}: per-layer MACs and latency")
    if not args.json:
        print(prof.table(top=args.top))
    return result


@command("bench")
def cmd_bench(args: argparse.Namespace) -> dict:
    """Latency (median, p10/p90) and throughput per batch size and mode; interleaved with --vs."""
    from .bench import run_bench_cli

    result = run_bench_cli(args.model, vs_spec=args.vs, weights=args.weights, vs_weights=args.vs_weights,
                           batch_sizes=args.batch_sizes, threads=args.threads, modes=args.modes,
                           input_size=_input_size(args.input_size), repeats=args.repeats)
    if not args.json:
        print(result.table())
    return result.to_dict()


@command("report")
def cmd_report(args: argparse.Namespace) -> dict:
    """Accuracy vs MACs / measured latency plots (Canziani et al. 2016) for several models; ``--html`` writes one
    self-contained page (model card, stages from the provenance, trade-offs, per-layer bars)."""
    import torch

    from .bench import bench
    from .data import load
    from .models import create_model, model_input_size
    from .profile import profile
    from .report import layer_latency, plot_layers, write_report
    from .train import check_input, evaluate

    if args.html:
        return _report_html(args)
    if not args.data or not args.out:
        raise SlimkitError("report: give --data and --out (or --html OUT.html)")
    data = load(args.data, limit=args.limit, seed=args.seed)
    entries = []
    for spec in args.models:
        name, _, weights = spec.partition("=")
        model = create_model(name, weights=weights or None)
        size = model_input_size(model, name)
        loader = data.loader("test", args.batch_size)
        check_input(model, next(iter(loader))[0], data.info.num_classes, f"dataset {args.data}")
        acc = evaluate(model, loader)
        prof = profile(model, torch.zeros(1, *size))
        timing = bench(model, size, batch_sizes=(1,), threads=args.threads, modes=("eager",), roofline=False)
        latency = timing.results["eager"][1]["median_ms"]
        label = os.path.basename(name).removesuffix(".safetensors")
        plot_layers(prof.to_dict()["layers"], os.path.join(args.out, f"layers-{label}.png"),
                    layer_latency(model, torch.zeros(1, *size)), title=f"{label}: per-layer MACs and latency")
        entries.append({"name": label, "spec": name, "top1": acc["top1"], "n": acc["n"], "params": prof.params,
                        "macs": prof.macs, "latency_ms": latency})
        logger(args)(f"{label}: top1 {acc['top1']:.4f}, params {prof.params:,}, MACs {prof.macs:,}, "
                   f"bs1 latency {latency:.2f} ms")
    report = write_report(entries, args.out)
    logger(args)(f"wrote {', '.join(report['files'].values())}")
    return report


def _report_html(args: argparse.Namespace) -> dict:
    """``slimkit report MODEL [MODEL ...] --html OUT``: the first model is "before", the last "after"."""
    import torch

    from .compress.html import write_html
    from .compress.measure import models_report
    from .data import load
    from .models import create_model, model_input_size
    from .train import check_input

    data = load(args.data, limit=args.limit, seed=args.seed) if args.data else None
    entries, size = [], None
    for spec in args.models:
        name, _, weights = spec.partition("=")
        model = create_model(name, weights=weights or None).eval()
        size = size or model_input_size(model, name)
        if data is not None:
            check_input(model, next(iter(data.loader("test", 2)))[0], data.info.num_classes, f"dataset {args.data}")
        entries.append((os.path.basename(name).removesuffix(".safetensors"), model))
    report = models_report(entries, torch.zeros(1, *size), data, threads=args.threads or 1, log=logger(args))
    path = write_html(report, args.html)
    logger(args)(f"wrote {path}")
    return {"html": path, "models": [label for label, _ in entries]}


@command("demo")
def cmd_demo(args: argparse.Namespace) -> dict:
    """The main job on embedded data: train the digits CNN, compress it, print before/after."""
    from .demo import run_demo

    return run_demo(args.out, log=logger(args), progress=not args.json)


# Compression families bring their own arguments and command function: (module, add_args, run, help).
PLUGIN_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "compress": ("slimkit.compress.cli", "add_compress_args", "cli_compress",
                 "one command to a target (latency=F, size=F, macs=F): plan, search (or decomposition), KD, int8 or "
                 "Deep Compression, export + verify, report.html; or run a recipe (--recipe)"),
    "distill": ("slimkit.distill.cli", "add_distill_args", "cli_distill",
                "train a student from a teacher (KD, AT, FitNets, FSP, FT, ONE, Moonshine, MUNGE)"),
    "prune": ("slimkit.prune.cli", "add_prune_args", "cli_prune",
              "structured pruning of filters/channels through a dependency graph, or of whole residual blocks"),
    "quantize": ("slimkit.quant.cli", "add_quantize_args", "cli_quantize",
                 "post-training static int8 quantization running on int8 kernels"),
    "transform": ("slimkit.transform.cli", "add_transform_args", "cli_transform",
                  "replace layers by efficient modules (depthwise-separable, factorised, bottleneck, ...)"),
    "decompose": ("slimkit.decompose.cli", "add_decompose_args", "cli_decompose",
                  "low-rank decomposition of conv and linear layers (SVD, CP, Tucker-2, separable, asymmetric)"),
    "export": ("slimkit.export.cli", "add_export_args", "cli_export",
               "export to ONNX, OpenVINO IR or TorchScript, verified in the runtime that deploys it"),
    "sparsify": ("slimkit.sparse.cli", "add_sparsify_args", "cli_sparsify",
                 "unstructured sparsity (magnitude, AGP, OBD, DNS, IHT, L0/L1, ...), written also as a packed file"),
    "share": ("slimkit.sparse.cli", "add_share_args", "cli_share",
              "weight sharing: per-layer k-means codebooks with centroid fine-tuning (Deep Compression stage 2)"),
    "lowbit": ("slimkit.lowbit.cli", "add_lowbit_args", "cli_lowbit",
               "weights (and activations) below 8 bits, trained: LSQ, DoReFa, PACT, ternary (TTQ), binary"),
    "pack": ("slimkit.sparse.pack_cli", "add_pack_args", "cli_pack",
             "write an artifact as a packed file (sparse indices, codebooks, Huffman/lzma) and break its size down"),
    "search": ("slimkit.search.cli", "add_search_args", "cli_search",
               "search per-layer pruning ratios and blocks under a latency budget measured on the target runtime"),
}


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a SlimkitError: one line ``slimkit: error: ...`` and exit status 2."""

    def error(self, message: str):
        raise SlimkitError(f"{message} (see '{self.prog} --help')")


def command_configs(name: str) -> dict[str, tuple[type, dict]]:
    """The configs whose fields command ``name`` turns into flags: ``{key: (config class, add_arguments options)}``.

    One place per command, read by the parser and by the test that checks ``--help`` against the fields.
    """
    if name == "train":
        from .train.config import FitConfig

        return {"fit": (FitConfig, {"title": "training", "defaults": TRAIN_DEFAULTS})}
    if name in PLUGIN_COMMANDS:
        configs = importlib.import_module(PLUGIN_COMMANDS[name][0]).command_configs
        # a module serving several commands takes the command's name
        return configs(name) if "command" in inspect.signature(configs).parameters else configs()
    return {}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="slimkit", description="Make trained CNNs smaller and faster, measurably.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, loads_models: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        sp.add_argument("--threads", type=int, help="torch CPU threads")
        if loads_models:
            sp.add_argument("--trust-code", action="append", metavar="PATH.py",
                            help="let a model spec read from a file (an artifact's base model, a recipe) run this "
                                 "Python file; repeatable. Without it nothing a file names runs (README: trust model)")
        return sp

    model_args = add_model_arguments

    def data_args(sp: argparse.ArgumentParser, required: bool = True) -> None:
        add_data_arguments(sp, required=required)

    sp = add("demo", "train a small CNN on embedded digits and compress it", loads_models=False)
    sp.add_argument("--out", default="runs/demo")
    sp = add("train", "train or fine-tune a model")
    model_args(sp)
    data_args(sp)
    for cls, how in command_configs("train").values():
        cls.add_arguments(sp, **how)
    sp.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --out")
    sp.add_argument("--out", required=True)
    sp = add("eval", "evaluate top-1/top-5 accuracy")
    model_args(sp)
    data_args(sp)
    sp.add_argument("--split", default="test", choices=["train", "val", "test"])
    sp = add("info", "describe a model or artifact")
    model_args(sp)
    sp = add("profile", "count parameters, MACs, memory and energy per layer")
    model_args(sp)
    sp.add_argument("--input-size", help="C,H,W (default: the model's own)")
    sp.add_argument("--top", type=int, help="show only the N layers with most MACs")
    sp.add_argument("--plot", help="also write per-layer MACs and latency bars to this PNG")
    sp = add("bench", "measure latency and throughput")
    model_args(sp)
    sp.add_argument("--vs", help="second model, measured interleaved with the first")
    sp.add_argument("--vs-weights")
    sp.add_argument("--batch-sizes", default="1,64")
    sp.add_argument("--runtime", "--modes", dest="modes", default="eager,torchscript",
                    help="runtimes, comma-separated: eager, torchscript, compile (inductor), onnxruntime, openvino")
    sp.add_argument("--input-size", help="C,H,W (default: the model's own)")
    sp.add_argument("--repeats", type=int, default=20)
    for name, (module, add_args, run, help) in PLUGIN_COMMANDS.items():
        mod = importlib.import_module(module)
        getattr(mod, add_args)(add(name, help))
        COMMANDS[name] = getattr(mod, run)
    sp = add("report", "accuracy vs MACs and latency plots for several models")
    sp.add_argument("models", nargs="+", help="model specs or artifacts, optionally SPEC=WEIGHTS")
    data_args(sp, required=False)
    sp.add_argument("--out", help="folder for the plots and report.json (with --data)")
    sp.add_argument("--html", metavar="OUT.html", help="write one self-contained HTML page instead: the first model "
                                                       "is 'before', the last 'after' (--data adds accuracy)")
    return p


def _seed(args: argparse.Namespace) -> None:
    """Seed every RNG before a command builds anything: a model built untrained initialises the same every run."""
    seed = getattr(args, "seed", None)
    if args.command in ("info", "profile"):
        return
    import random

    import numpy as np
    import torch

    seed = int(seed) if isinstance(seed, int) else 0
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def main(argv: list[str] | None = None) -> int:
    from .cli_args import OutputLock
    from .progress import reporting
    from .trust import trust_code

    try:
        args = build_parser().parse_args(argv)
        _threads(args)
        _seed(args)
        out = getattr(args, "out", None)
        with trust_code(getattr(args, "trust_code", None)), (OutputLock(out) if isinstance(out, str) and out
                                                              else contextlib.nullcontext()), \
                reporting(logger(args), bar=not getattr(args, "json", False)):
            result = COMMANDS[args.command](args)
    except SlimkitError as e:
        print(f"slimkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimkit: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
