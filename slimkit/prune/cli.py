"""``slimkit prune``: structured channel (and residual-block) pruning with measured parameters, MACs, accuracy and speed.

Wired into ``slimkit/cli.py`` through its ``PLUGIN_COMMANDS`` table, which also adds ``--json`` and ``--threads``.
"""

from __future__ import annotations

import argparse
import os
import time

from ..cli import logger
from ..errors import SlimkitError


def add_prune_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``slimkit prune MODEL [--weights W] --criterion NAME --target-macs F ...``.

    """
    from .depth import SCORINGS
    from .importance import CRITERIA

    parser.add_argument("model", help="registered name, torchvision:NAME, file.py:fn or an artifact path")
    parser.add_argument("--weights", help="state_dict / checkpoint / safetensors file to load")
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--criterion", default="l1", help=f"channel importance ({', '.join(CRITERIA.names())})")
    policy = parser.add_mutually_exclusive_group()
    policy.add_argument("--target-macs", type=float, help="keep this fraction of the original MACs (e.g. 0.5)")
    policy.add_argument("--target-params", type=float, help="keep this fraction of the original parameters")
    parser.add_argument("--target-latency", type=float,
                        help="keep this fraction of the original's measured eager latency on this machine (with "
                             "--latency-model table it may go with --target-macs: both must hold)")
    policy.add_argument("--ratio", type=float, help="uniform: remove this fraction of every group's channels")
    parser.add_argument("--sensitivity", action="store_true",
                        help="per-group ratios from a sensitivity scan on the validation split (Li et al. 2017): "
                             "with --target-macs, the smallest accuracy-drop threshold that meets it; with "
                             "--max-drop D, that threshold (needs --data)")
    parser.add_argument("--blocks", type=float,
                        help="depth pruning first: remove whole residual blocks until the MACs are at most this "
                             "fraction of the original (scored on the validation split; needs --data). Alone it is "
                             "the whole policy; with a lower --target-macs the channels of what is left are pruned "
                             "to that fraction of the original")
    parser.add_argument("--block-batches", type=int, default=4,
                        help="with --blocks: validation batches each block is scored on (default 4)")
    parser.add_argument("--block-scoring", choices=SCORINGS, default="greedy",
                        help="with --blocks: re-score every block after each removal (greedy), only the front of "
                             "the ranking (lazy: same picks when removals only make others costlier, fewer probes) "
                             "or rank once")
    parser.add_argument("--max-drop", type=float, help="with --sensitivity: top-1 drop allowed per group (0.02)")
    parser.add_argument("--latency-batch", default="1",
                        help="batch size --target-latency is timed at; several comma-separated (1,64) with "
                             "--latency-model table, each must meet the target")
    parser.add_argument("--latency-model", default="measure", choices=("measure", "table"),
                        help="measure: bisect the global ranking, timing each candidate; table: a measured per-layer "
                             "latency table, channels cut where least importance is lost per latency saved "
                             "(NetAdapt/HALP)")
    parser.add_argument("--tie-shortcuts", action="store_true",
                        help="option-A ResNets: keep a stage-1 trunk channel and its copies in later stages together "
                             "(default: each stage's trunk is pruned on its own, shortcuts carry zeros)")
    parser.add_argument("--round-to", type=int, default=8, help="keep channel counts multiples of this (default 8)")
    parser.add_argument("--rounding", default="floor", choices=("floor", "ceil"),
                        help="round each group's kept width down (floor: a group with any channel below the "
                             "threshold loses a whole chunk; Torch-Pruning's rule) or up (ceil)")
    parser.add_argument("--protect", default="", help="comma-separated layer names whose shape must not change")
    parser.add_argument("--steps", type=int, default=1, help="iterative pruning steps (fine-tuning in between)")
    parser.add_argument("--data", help="digits, cifar10:PATH or imagefolder:PATH (accuracy, data-driven criteria, "
                                       "fine-tuning)")
    parser.add_argument("--limit", type=int, help="class-balanced subset of N per split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8,
                        help="training batches for the data-driven criteria (taylor, thinet, lasso, dcp) and the "
                             "weight reconstruction")
    parser.add_argument("--reconstruct", default="auto", choices=("auto", "none", "scale", "full"),
                        help="least-squares reconstruction of the cut layers after pruning (auto: ThiNet's 'scale' "
                             "for thinet, He et al.'s 'full' for lasso, none otherwise)")
    parser.add_argument("--finetune-epochs", type=int, default=0, help="fine-tuning epochs after (each) step")
    parser.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    parser.add_argument("--distill", help="fine-tune with the unpruned model as teacher (e.g. kd, at, kd+at)")
    parser.add_argument("--teacher", help="teacher for --distill instead of the unpruned model: registered name or "
                                          "artifact path (e.g. a deeper network trained on the same data)")
    parser.add_argument("--teacher-weights", help="weights file for --teacher")
    parser.add_argument("--input-size", help="C,H,W when there is no --data (default: the model's)")
    parser.add_argument("--out", required=True, help="output folder (model.safetensors, report.json)")
    parser.add_argument("--no-bench", action="store_true", help="skip the latency comparison")
    return parser


def cli_prune(args: argparse.Namespace) -> dict:
    """Prune a model's channels (criteria of Li et al. 2017, Molchanov et al. 2019, Liu et al. 2017, Wen et al. 2016,
    Luo et al. 2017, He et al. 2017, Zhuang et al. 2018) and/or whole residual blocks (``--blocks``, scored as in
    Veit et al. 2016), write ``OUT``.

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
    from .importance import CRITERIA, DATA_CRITERIA
    from .pruner import prune
    from .reconstruct import reconstruct_mode

    CRITERIA.get(args.criterion)  # a typo fails before any data or model is loaded
    mode = reconstruct_mode(args.criterion, getattr(args, "reconstruct", "auto"))
    log = logger(args)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.sensitivity and (args.target_macs is None) == (args.max_drop is None):
        raise SlimkitError("prune: --sensitivity takes exactly one of --target-macs and --max-drop")
    if args.max_drop is not None and not args.sensitivity:
        raise SlimkitError("prune: --max-drop goes with --sensitivity")
    blocks = args.blocks
    if blocks is not None and not 0 < blocks <= 1:
        raise SlimkitError(f"prune: --blocks is a fraction of the original MACs in (0, 1], got {blocks}")
    if blocks is not None and args.target_params is not None:
        raise SlimkitError("prune: --blocks combines with --target-macs, --target-latency, --ratio or --sensitivity "
                           "only")
    try:
        latency_batch = tuple(int(b) for b in str(args.latency_batch).split(",") if b.strip())
    except ValueError:
        raise SlimkitError(f"prune: --latency-batch takes batch sizes like 1 or 1,64, got {args.latency_batch!r}")
    latency_batch = latency_batch[0] if len(latency_batch) == 1 else latency_batch
    if blocks is not None and args.target_macs is not None and args.target_macs >= blocks:
        raise SlimkitError(f"prune: --target-macs {args.target_macs} is not below --blocks {blocks}: "
                           "the channels would have nothing left to remove (use --blocks alone)")
    channels = (args.target_macs is not None or args.target_params is not None or args.ratio is not None
                or args.target_latency is not None or args.sensitivity)
    if not channels and blocks is None:
        raise SlimkitError("prune: give --target-macs, --target-params, --target-latency, --ratio, --sensitivity "
                           "or --blocks")
    data = None
    if args.data:
        from ..data import load

        data = load(args.data, limit=args.limit, seed=args.seed)
    needs_data = args.criterion in DATA_CRITERIA or mode or args.finetune_epochs or args.sensitivity or blocks
    if needs_data and data is None:
        what = (f"--criterion {args.criterion}" if args.criterion in DATA_CRITERIA
                else f"--reconstruct {mode}" if mode else "--sensitivity" if args.sensitivity
                else "--blocks" if blocks else "--finetune-epochs")
        raise SlimkitError(f"prune: --data is needed for {what}")
    if (args.teacher or args.teacher_weights) and not (args.distill and args.finetune_epochs):
        raise SlimkitError("prune: --teacher goes with --distill and --finetune-epochs")
    if args.teacher_weights and not args.teacher:
        raise SlimkitError("prune: --teacher-weights needs --teacher")
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
    if args.teacher:
        from ..distill import load_teacher

        teacher = load_teacher(args.teacher, args.teacher_weights, data.info.num_classes, sample=sample,
                               what=f"dataset {args.data}")
    before = evaluate(model, test_loader) if data else None

    kwargs = {}
    if args.criterion in DATA_CRITERIA or mode:
        kwargs = {"loader": data.loader("train", args.batch_size, seed=args.seed), "batches": args.batches,
                  "seed": args.seed}
    elif args.criterion == "random":
        kwargs = {"seed": args.seed}

    def finetune(m: torch.nn.Module, step: int) -> None:
        if not args.finetune_epochs:
            return
        loader = data.loader("train", args.batch_size, seed=args.seed + step)
        if args.distill:  # recovery by distillation from the unpruned model (prune() leaves `model` untouched)
            from ..distill import distill_terms

            with distill_terms(args.distill, teacher, m, example) as terms:
                fit(m, loader, epochs=args.finetune_epochs, lr=args.lr, seed=args.seed + step, progress=False,
                    extra_losses=terms)
        else:
            fit(m, loader, epochs=args.finetune_epochs, lr=args.lr, seed=args.seed + step, progress=False)

    t0 = time.perf_counter()
    protect = [n for n in args.protect.split(",") if n]
    start, depth = model, None
    if blocks is not None:
        from .depth import prune_blocks
        from .sensitivity import held_out_loader

        depth = prune_blocks(model, example, held_out_loader(data, args.batch_size, args.seed), target_macs=blocks,
                             batches=args.block_batches, scoring=args.block_scoring, protected=protect)
        start = depth.model
        log(f"removed {len(depth.removed)} blocks: {', '.join(depth.removed)} "
            f"({depth.macs_after / depth.macs_before:.3f}x MACs)")
    # a channel target is a fraction of the original model, so it is rescaled for what the blocks left
    scale = depth.macs_before / depth.macs_after if depth else 1.0
    target_macs, ratios, scan = (args.target_macs * scale if args.target_macs is not None else None), None, None
    if channels and args.sensitivity:
        from .sensitivity import held_out_loader, sensitivity_ratios

        ratios, scan = sensitivity_ratios(start, example, held_out_loader(data, args.batch_size, args.seed),
                                          criterion=args.criterion, target_macs=target_macs,
                                          max_drop=args.max_drop, batches=args.batches, round_to=args.round_to,
                                          rounding=args.rounding, untie_shortcuts=not args.tie_shortcuts,
                                          **{k: v for k, v in kwargs.items() if k != "batches"})
        target_macs = None
        log(f"sensitivity scan: ratios {ratios}")
    result = prune(start, example, criterion=args.criterion, target_macs=target_macs, ratios=ratios,
                   target_params=args.target_params, ratio=args.ratio, round_to=args.round_to, protected=protect,
                   steps=args.steps, finetune=finetune, target_latency=args.target_latency,
                   latency_batch=latency_batch, latency_model=args.latency_model, reconstruct=mode or False,
                   latency_reference=model if depth else None,  # a latency target stays a fraction of the original
                   untie_shortcuts=not args.tie_shortcuts, rounding=args.rounding,
                   **kwargs) if channels else None
    pruned = result.model if result else depth.model  # reconstructed (if asked) before fine-tuning (He et al. 2017)
    reconstruction = result.reconstruction["layers"] if result and result.reconstruction else None
    if args.finetune_epochs:
        finetune(pruned, args.steps)
    pruned.eval()
    seconds = time.perf_counter() - t0
    after = evaluate(pruned, test_loader) if data else None

    params = {"criterion": args.criterion if channels else None, "blocks": blocks, "target_macs": args.target_macs,
              "target_params": args.target_params,
              "target_latency": args.target_latency, "latency_batch": latency_batch,
              "latency_model": args.latency_model,
              "untie_shortcuts": not args.tie_shortcuts, "rounding": args.rounding, "sensitivity": args.sensitivity,
              "max_drop": args.max_drop, "ratios": ratios,
              "ratio": args.ratio, "round_to": args.round_to, "protected": protect, "steps": args.steps,
              "finetune_epochs": args.finetune_epochs, "distill": args.distill, "teacher": args.teacher,
              "reconstruct": mode}
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
    history(pruned).append({"stage": "prune", "params": params, "metrics": metrics, "kept": kept,
                            "removed_blocks": removed})
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
    if scan is not None:
        out["sensitivity"] = scan.to_dict()
    if data:
        out.update({"data": args.data, "test_top1_before": before["top1"], "test_top1_after": after["top1"],
                    "top1_drop": before["top1"] - after["top1"]})
    if not args.no_bench:
        from ..bench import compare

        cmp = compare(model, pruned, input_size, batch_sizes=(1, 64), threads=getattr(args, "threads", None),
                      modes=("eager",), names=("original", "pruned"), roofline=False)
        out["latency"] = {f"bs{bs}": {"original_ms": cmp.results["eager"][bs]["a"]["median_ms"],
                                      "pruned_ms": cmp.results["eager"][bs]["b"]["median_ms"],
                                      "speedup": 1 / cmp.ratio("eager", bs)} for bs in (1, 64)}
        out["bench_threads"] = cmp.threads
    atomic_write_text(os.path.join(args.out, "report.json"), json.dumps(out, indent=2, default=str))
    msg = (f"params {counts['params_before']:,} -> {counts['params_after']:,}; MACs {counts['macs_before']:,} -> "
           f"{counts['macs_after']:,} ({counts['macs_ratio']:.3f}x)")
    if data:
        msg += f"; test top1 {before['top1']:.4f} -> {after['top1']:.4f}"
    if "latency" in out:
        msg += f"; speed-up bs1 x{out['latency']['bs1']['speedup']:.2f}, bs64 x{out['latency']['bs64']['speedup']:.2f}"
    log(msg + f"; wrote {path}")
    return out

