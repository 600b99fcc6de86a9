"""``slimkit prune``: channel (and residual-block) pruning with measured parameters, MACs, accuracy and speed.

Wired into ``slimkit/cli.py`` through its ``PLUGIN_COMMANDS`` table, which also adds ``--json`` and ``--threads``.
"""

from __future__ import annotations

import argparse
import os
import time

from ..cli import logger
from ..cli_args import DATA_HELP, add_data_arguments, add_model_arguments, run_fingerprint
from ..errors import SlimkitError

CHANNEL_FLAGS = ("target_macs", "target_params", "target_latency", "ratio", "sensitivity")
FINETUNE_FLAGS = ("epochs", "lr", "distill", "teacher", "teacher_weights")


FINETUNE_RENAME = {"epochs": "--finetune-epochs", "lr": "--lr", "distill": "--distill", "teacher": "--teacher",
                   "teacher_weights": "--teacher-weights"}


def command_configs() -> dict[str, tuple[type, dict]]:
    """The configs ``slimkit prune`` turns into flags, with how: ``{key: (class, add_arguments options)}``."""
    from ..pipeline import FinetuneConfig
    from .config import DepthConfig, PruneConfig

    return {
        "channels": (PruneConfig, {"title": "channel pruning"}),
        "blocks": (DepthConfig, {"title": "depth pruning (whole residual blocks first; needs --data)",
                                 "prefix": "block_", "skip": ("protected",), "rename": {"target_macs": "--blocks"}}),
        "finetune": (FinetuneConfig, {"title": "fine-tuning after (each step of) pruning", "prefix": "finetune_",
                                      "only": tuple(FINETUNE_RENAME), "rename": FINETUNE_RENAME,
                                      "defaults": {"epochs": 0}}),
    }


def add_prune_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``slimkit prune MODEL [--weights W] --criterion NAME --target-macs F ...``.

    The method flags are generated from :class:`~slimkit.prune.config.PruneConfig` (channels),
    :class:`~slimkit.prune.config.DepthConfig` (``--blocks``, ``--block-*``) and
    :class:`~slimkit.pipeline.FinetuneConfig` (``--finetune-epochs``, ``--lr``, ``--distill``,
    ``--teacher``): each flag's help is its field's help.
    """
    add_model_arguments(parser)
    for cls, how in command_configs().values():
        cls.add_arguments(parser, **how)
    add_data_arguments(parser, DATA_HELP + " (accuracy, data-driven criteria, fine-tuning)")
    parser.add_argument("--input-size", help="C,H,W when there is no --data (default: the model's)")
    parser.add_argument("--out", required=True, help="output folder (model.safetensors, report.json)")
    parser.add_argument("--no-bench", action="store_true", help="skip the latency comparison")
    return parser


def _configs(args: argparse.Namespace):
    """(channel config or None, depth config or None, fine-tune config) from the parsed flags."""
    from ..config import MethodConfig

    made: dict[str, MethodConfig | None] = {}
    for key, (cls, how) in command_configs().items():
        prefix, only, skip = how.get("prefix", ""), how.get("only"), how.get("skip", ())
        if key == "channels" and not any(getattr(args, n) not in (None, False) for n in
                                         ("target_macs", "target_params", "target_latency", "ratio", "sensitivity")):
            if getattr(args, "sensitivity_max_drop", None) is not None:
                raise SlimkitError("prune: --max-drop goes with --sensitivity")
            made[key] = None
            continue
        if key == "blocks" and args.block_target_macs is None and args.block_count is None:
            made[key] = None
            continue
        fixed = {"protected": tuple(args.protected)} if key == "blocks" else {}
        made[key] = cls.from_args(args, prefix=prefix, only=only, skip=skip, **fixed)
    return made["channels"], made["blocks"], made["finetune"]


def cli_prune(args: argparse.Namespace) -> dict:
    """Prune a model's channels (criteria of Li et al. 2017, Molchanov et al. 2019, Liu et al. 2017, Wen et al. 2016,
    Luo et al. 2017, He et al. 2017, Zhuang et al. 2018, Fang et al. 2023) and/or whole residual blocks
    (``--blocks``, scored as in Veit et al. 2016), write ``OUT``.

    Returns parameters and MACs before/after (profiler), test top-1 before/after when
    ``--data`` is given (after the optional fine-tuning), the kept channel indices (also in
    the artifact's meta and provenance) and the bs1/bs64 speed-up from
    :func:`slimkit.bench.compare` (interleaved A/B, eager mode).
    """
    import json

    import torch

    from ..artifact import atomic_write_text, history, save
    from ..models import create_model
    from ..models.registry import is_artifact_path, model_input_size
    from ..train import check_input, evaluate, fit
    from .importance import CRITERIA
    from .pruner import prune
    from .reconstruct import reconstruct_mode

    channels, depth_config, tune = _configs(args)
    log = logger(args)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if depth_config is not None and args.target_params is not None:
        raise SlimkitError("prune: --blocks combines with --target-macs, --target-latency, --ratio or --sensitivity "
                           "only")
    blocks = depth_config.target_macs if depth_config is not None else None
    if blocks is not None and args.target_macs is not None and args.target_macs >= blocks:
        raise SlimkitError(f"prune: --target-macs {args.target_macs} is not below --blocks {blocks}: "
                           "the channels would have nothing left to remove (use --blocks alone)")
    if channels is None and depth_config is None:
        raise SlimkitError("prune: give --target-macs, --target-params, --target-latency, --ratio, --sensitivity "
                           "or --blocks")
    mode = reconstruct_mode(channels.criterion, channels.reconstruct) if channels else None
    data = None
    if args.data:
        from ..data import load

        data = load(args.data, limit=args.limit, seed=args.seed)
    needs_data = channels is not None and (CRITERIA.get(channels.criterion).needs_data or mode
                                           or channels.sensitivity is not None)
    if (needs_data or tune.epochs or depth_config is not None) and data is None:
        what = (f"--criterion {channels.criterion}" if channels and CRITERIA.get(channels.criterion).needs_data
                else f"--reconstruct {mode}" if mode else "--sensitivity" if channels and channels.sensitivity
                else "--blocks" if depth_config is not None else "--finetune-epochs")
        raise SlimkitError(f"prune: --data is needed for {what}")
    if (tune.teacher or tune.teacher_weights) and not (tune.distill and tune.epochs):
        raise SlimkitError("prune: --teacher goes with --distill and --finetune-epochs")
    num_classes = None if is_artifact_path(args.model) else (
        args.num_classes or (data.info.num_classes if data else None))
    model = create_model(args.model, num_classes=num_classes, weights=args.weights).cpu().eval()
    if args.input_size:
        try:
            input_size = tuple(int(v) for v in args.input_size.split(","))
        except ValueError:
            raise SlimkitError(f"--input-size must be C,H,W, got {args.input_size!r}") from None
    else:
        input_size = tuple(data.info.input_size) if data else model_input_size(model, args.model)
    example = torch.zeros(1, *input_size)
    test_loader = data.loader("test", args.batch_size) if data else None
    if data:  # a model/data mismatch is named here, not deep inside a conv
        sample = next(iter(data.loader("test", 2)))[0]
        check_input(model, sample, data.info.num_classes, f"dataset {args.data}")
    teacher = model  # --teacher implies --finetune-epochs, so --data (checked above)
    if tune.teacher:
        from ..distill import load_teacher

        teacher = load_teacher(tune.teacher, tune.teacher_weights, data.info.num_classes, sample=sample,
                               what=f"dataset {args.data}")
    before = evaluate(model, test_loader) if data else None

    # a killed run restarts where its fine-tune stopped: pruning is deterministic, and each fine-tune
    # checkpoints per epoch under a name that fingerprints the whole command, so another command
    # writing to the same --out never resumes this one's checkpoint
    run_id = run_fingerprint(args)

    def finetune(m: torch.nn.Module, step: int) -> None:
        if not tune.epochs:
            return
        loader = data.loader("train", args.batch_size, seed=args.seed + step)
        ckpt = os.path.join(args.out, "checkpoints", f"finetune-{run_id}-step{step}")
        if tune.distill:  # recovery by distillation from the unpruned model (prune() leaves `model` untouched)
            from ..distill import distill_terms

            with distill_terms(tune.distill, teacher, m, example, **tune.distill_options) as terms:
                fit(m, loader, seed=args.seed + step, progress=False, extra_losses=terms, checkpoint_dir=ckpt,
                    **tune.fit.fit_kwargs())
        else:
            fit(m, loader, seed=args.seed + step, progress=False, checkpoint_dir=ckpt, **tune.fit.fit_kwargs())

    t0 = time.perf_counter()
    start, depth = model, None
    if depth_config is not None:
        from .depth import prune_blocks
        from .sensitivity import held_out_loader

        depth = prune_blocks(model, example, held_out_loader(data, args.batch_size, args.seed), depth_config)
        start = depth.model
        log(f"removed {len(depth.removed)} blocks: {', '.join(depth.removed)} "
            f"({depth.macs_after / depth.macs_before:.3f}x MACs)")
    result = None
    if channels is not None:
        # a channel target is a fraction of the original model, so it is rescaled for what the blocks left
        scale = depth.macs_before / depth.macs_after if depth else 1.0
        step_config = channels.replace(target_macs=min(1.0, channels.target_macs * scale)) \
            if depth and channels.target_macs else channels
        loader = data.loader("train", args.batch_size, seed=args.seed) if data else None
        from .sensitivity import held_out_loader

        result = prune(start, example, step_config, loader=loader,
                       val_loader=held_out_loader(data, args.batch_size, args.seed) if channels.sensitivity else None,
                       finetune=finetune, seed=args.seed,
                       latency_reference=model if depth else None)  # a latency target stays a fraction of the original
        if result.sensitivity:
            log(f"sensitivity scan: ratios {result.ratios}")
    pruned = result.model if result else depth.model  # reconstructed (if asked) before fine-tuning (He et al. 2017)
    reconstruction = result.reconstruction["layers"] if result and result.reconstruction else None
    steps = channels.steps if channels else 1
    if tune.epochs:
        finetune(pruned, steps)
    pruned.eval()
    seconds = time.perf_counter() - t0
    after = evaluate(pruned, test_loader) if data else None

    params = {**(channels.to_dict() if channels else {}), "criterion": channels.criterion if channels else None,
              "blocks": blocks, "block_config": depth_config.to_dict() if depth_config else None,
              "finetune_epochs": tune.epochs, "distill": tune.distill, "teacher": tune.teacher, "reconstruct": mode,
              "ratios": result.ratios if result and result.ratios else (channels.ratios if channels else None)}
    first, last = (depth or result), (result or depth)  # counts: the original model before, the final one after
    counts = {"params_before": first.params_before, "params_after": last.params_after,
              "macs_before": first.macs_before, "macs_after": last.macs_after,
              "macs_ratio": last.macs_after / max(first.macs_before, 1),
              "params_ratio": last.params_after / max(first.params_before, 1)}
    kept = result.kept if result else {}
    removed = depth.removed if depth else []
    metrics = {k: counts[k] for k in ("params_after", "macs_after")}
    if after:
        metrics["test_top1"] = after["top1"]
    # provenance as the recipe stages write it: one record per method, its config, the fine-tune after it
    if depth_config is not None:
        history(pruned).append({"stage": "prune_blocks", "params": depth_config.to_dict(),
                                "finetune": None if channels else tune.to_dict(), "removed_blocks": removed})
    if channels is not None:
        history(pruned).append({"stage": "prune", "params": channels.to_dict(), "finetune": tune.to_dict(),
                                "metrics": metrics, "kept": kept})
    meta = {"input_size": list(input_size), "prune": {"params": params, "kept": kept, "removed_blocks": removed}}
    if data:
        meta.update({"dataset": args.data, "classes": list(data.info.classes)})
    path = save(pruned, os.path.join(args.out, "model.safetensors"), meta=meta)
    out = {"artifact": path, "model": args.model, "criterion": params["criterion"], "prune_seconds": seconds,
           **counts, "latency_ratio": result.latency_ratio if result else None,
           "warnings": result.warnings if result else [], "unprunable": result.unprunable if result else [],
           "kept": kept, "removed_blocks": removed}
    if depth:
        out["block_scores"], out["block_probes"] = depth.scores, depth.probes
    if reconstruction is not None:
        out["reconstruction"] = reconstruction
    if result is not None and result.sensitivity is not None:
        out["sensitivity"] = result.sensitivity
    if data:
        out.update({"data": args.data, "test_top1_before": before["top1"], "test_top1_after": after["top1"],
                    "top1_drop": before["top1"] - after["top1"]})
    if not args.no_bench:
        from ..bench import compare

        cmp = compare(model, pruned, input_size, batch_sizes=(1, 64), threads=getattr(args, "threads", None),
                      modes=("eager",), names=("original", "pruned"), roofline=False)
        out["latency"] = cmp.speedups("eager")
        out["bench_threads"] = cmp.threads
    atomic_write_text(os.path.join(args.out, "report.json"), json.dumps(out, indent=2, default=str))
    msg = (f"params {counts['params_before']:,} -> {counts['params_after']:,}; MACs {counts['macs_before']:,} -> "
           f"{counts['macs_after']:,} ({counts['macs_ratio']:.3f}x)")
    if data:
        msg += f"; test top1 {before['top1']:.4f} -> {after['top1']:.4f}"
    if not args.no_bench:
        msg += f"; {cmp.speedup_text('eager')}"
    log(msg + f"; wrote {path}")
    return out
