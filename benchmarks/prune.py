"""Structured pruning on CIFAR-10 (JPEG): every slimkit criterion and Torch-Pruning, same MAC target and budget.

From the adapted baseline (runs/baselines/NAME.safetensors, see benchmarks/baselines.py) each
variant prunes to ``--target-macs`` of the original MACs and is fine-tuned with one fixed budget
(``--epochs`` of SGD momentum 0.9, lr ``--lr``, cosine, weight decay 5e-4, batch ``--batch-size``,
crop+flip augmentation) through ``slimkit.train.fit``. Reported: test top-1 (10,000 images)
before and after fine-tuning, its delta vs the unpruned baseline, parameters and MACs from
``slimkit.profile`` and their ratios, and the measured CPU speed-up vs the unpruned model from
``slimkit.bench.compare`` (interleaved A/B pairs, median of the per-pair ratios, 1 thread).

Variants: slimkit ``prune(criterion=...)`` for l1, l2, taylor, slimming (scores the adapted
model's BN scales as they are, *without* the sparsity pre-training of Liu et al. 2017), thinet
and lasso (each with its paper's least-squares weight reconstruction after the cut), dcp,
group_l1 (DepGraph's group magnitude, the importance Torch-Pruning's row uses) and
random (``ssl`` needs its group-lasso training first and is not run); and Torch-Pruning's ``MetaPruner`` with
``MagnitudeImportance(p=1)`` (L1, its
group-mean normalisation), global pruning, ``round_to=8``, the final linear ignored, its
``pruning_ratio`` found by bisection so its profiled MACs are the largest that still meet the
same target. Torch-Pruning does not understand the option-A shortcut (``F.pad`` over channels:
unmodified it returns a broken model), so for it every ``PadShortcut`` is first swapped for an
equivalent ``IndexPad`` (cat a zero channel + index_select) with a customised pruner (benchmarks/tp_adapter.py).

A variant takes ``:FLAG`` suffixes: ``untied`` prunes with ``untie_shortcuts=True`` (each ResNet
stage's trunk on its own, the library's default); without it the benchmark passes
``untie_shortcuts=False`` (a stage-1 trunk channel and its copies in later stages together); ``ceil`` rounds each
group's kept width up instead of down (``rounding``);
``kd`` fine-tunes with Hinton et al.'s distillation from the unpruned model (T=4, alpha 0.9 as
``slimkit.distill``'s defaults) instead of plain cross-entropy -- same epochs, lr and schedule;
``kd@NAME`` distils from another adapted baseline instead (``kd@resnet56`` for resnet20: a
deeper teacher trained on the same data);
``fast`` replaces the MAC target by the speed goal itself, ``target_latency=1/1.7`` measured at
batch 1 on this machine (the MACs then land where they land, below the target);
``lut`` keeps the MAC target and adds a latency target of ``1/--lut-speedup`` of the unpruned
model at batch 1 *and* 64, planned from a measured per-layer latency table
(``latency_model="table"``, :mod:`slimkit.prune.latency`: chunks go where the least importance
is lost per unit of latency saved), so widths that cost time on this CPU go first.
Torch-Pruning's row takes ``:kd`` too (its pruned model through the same distilling fine-tune).
``sparse`` first trains the baseline one epoch with the criterion's sparsity term
(``slimkit.prune.sparsity_term``: SSL's group lasso for ``ssl``, Network Slimming's L1 on BN
scales otherwise; ``--sparsity-strength``), an epoch more than the other rows get.
``sens`` replaces the global ranking by Li et al.'s per-group sensitivity scan (each group pruned
alone at 0.25/0.5/0.75 on 4 validation batches, ratios from the smallest accuracy-drop threshold
that meets the MAC target, ``slimkit.prune.sensitivity_ratios``).
``blocks`` is depth pruning (``slimkit.prune.prune_blocks``): whole residual blocks removed, the
least useful first (loss rise on ``--block-batches`` validation batches per MAC saved, re-scored
after each removal), until the MAC target is met; the widths stay. ``depthNN`` on a criterion
first removes blocks down to NN% of the MACs, then prunes the channels of what is left to the
target (still a fraction of the original).
The variant ``none`` is the control: the unpruned baseline through the same fine-tune (with a
longer budget the baseline itself still improves, and the pruned rows should be read against
it as well as against the adapted baseline).

Every fine-tune checkpoints under ``--out`` (a killed run resumes the epoch), and each finished
variant is cached as ``--out/MODEL-VARIANT.json`` (rerunning skips it; ``--fresh`` redoes all).

    python benchmarks/prune.py --models resnet56 --epochs 1 --threads 1
    python benchmarks/prune.py --models resnet56,resnet20 --epochs 1 --threads 1 \
        --per-model "resnet20=group_l1,l1,random,torch-pruning-l1"   # fewer variants for resnet20
    python benchmarks/prune.py --models resnet56 --epochs 1 --threads 1 \
        --variants "group_l1,group_l1:kd,torch-pruning-l1,torch-pruning-l1:kd"
    python benchmarks/prune.py --models resnet56 --epochs 5 --threads 1 --train-threads 2 \
        --out runs/prune-bench-5ep --variants "blocks:kd,torch-pruning-l1:kd"   # depth pruning vs Torch-Pruning
    python benchmarks/prune.py --models resnet56,resnet20 --epochs 20 --threads 1 --train-threads 2 \
        --out runs/prune-bench-20ep \
        --per-model "resnet56=blocks:kd;resnet20=group_l1:untied:kd,group_l1:untied:depth78:lut:kd,none"
    python benchmarks/prune.py --limit 500 --epochs 1 --out /tmp/prune-smoke --repeats 3   # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CIFAR, ROOT, markdown_table, record  # noqa: E402
from tp_adapter import tp_search  # noqa: E402

import slimkit  # noqa: E402
from slimkit.bench import compare  # noqa: E402
from slimkit.data import load  # noqa: E402
from slimkit.distill import distill_terms  # noqa: E402
from slimkit.profile import profile  # noqa: E402
from slimkit.prune import criteria_needing_data, held_out_loader, prune, prune_blocks, sensitivity_ratios, sparsity_term  # noqa: E402
from slimkit.prune.depth import SCORINGS  # noqa: E402
from slimkit.train import evaluate, fit  # noqa: E402

CRITERIA = ("l1", "l2", "group_l1", "taylor", "slimming", "thinet", "lasso", "dcp", "random")
INPUT = (3, 32, 32)

# Published anchors (text rows). Torch-Pruning's "speed up" is Base MACs / Pruned MACs, not a measurement.
ANCHORS = [
    ["Li et al. 2017, ResNet-56-pruned-B (L1, hand-picked layers, retrained)", "published",
     "-27.6% FLOPs (0.72x)", "93.04 -> 93.06 (+0.02)", "original CIFAR-10, GPU training; not measured here"],
    ["DepGraph, Fang et al. 2023 (Torch-Pruning benchmarks/readme.md, ResNet-56): Group-L1", "published",
     "2.12x fewer MACs (0.47x)", "93.53 -> 92.93 (-0.60)", "long GPU fine-tune (100 epochs in their logs)"],
    ["DepGraph w/o sparse learning", "published", "2.11x fewer MACs (0.47x)", "93.53 -> 93.46 (-0.07)", "as above"],
    ["DepGraph with sparse learning", "published", "2.13x fewer MACs (0.47x)", "93.53 -> 93.77 (+0.38 as printed)",
     "as above; their 93.53 -> 93.64 is the 2.57x row"],
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- one variant -------------------------------------------------------------------------------------

def pct(v: float) -> str:
    return f"{100 * v:.2f}"


def run_variant(name: str, variant: str, base: nn.Module, base_prof, base_top1: float, data, args) -> dict:
    cache = os.path.join(args.out, f"{name}-{variant}.json")
    if os.path.exists(cache) and not args.fresh:
        log(f"{name} {variant}: cached in {cache}")
        return json.load(open(cache))
    t0 = time.perf_counter()
    x = torch.zeros(1, *INPUT)
    info: dict = {"model": name, "variant": variant}
    method, *flags = variant.split(":")
    depth = [f for f in flags if f.startswith("depth")]
    kd = [f for f in flags if f == "kd" or f.startswith("kd@")]
    unknown = set(flags) - {"untied", "ceil", "fast", "lut", "sparse", "sens"} - set(depth) - set(kd)
    if unknown or len(depth) > 1 or len(kd) > 1 or (depth and not depth[0][5:].isdigit()):
        raise SystemExit(f"variant {variant!r}: unknown or repeated flag(s) "
                         f"{', '.join(sorted(unknown or depth or kd))} "
                         "(untied, ceil, kd, kd@TEACHER, fast, lut, sparse, sens, depthNN)")
    teacher = base
    if kd and kd[0] != "kd":  # a stronger teacher: another adapted baseline trained on the same data
        path = os.path.join(ROOT, "runs", "baselines", f"{kd[0][3:]}.safetensors")
        if not os.path.exists(path):
            raise SystemExit(f"variant {variant!r}: no baseline {path} to teach with (run benchmarks/baselines.py)")
        teacher = slimkit.load(path).eval()
        info["teacher"] = kd[0][3:]
    depth_macs = int(depth[0][5:]) / 100 if depth else None
    if depth_macs is not None and not args.target_macs < depth_macs <= 1:
        raise SystemExit(f"variant {variant!r}: depthNN keeps NN% of the MACs, above --target-macs")
    if {"fast", "lut"} & set(flags) and method == "torch-pruning-l1":
        raise SystemExit("variants :fast and :lut need slimkit's latency targets; Torch-Pruning has none")
    start, scale = base, 1.0
    if method == "blocks" or depth_macs:  # whole residual blocks first, scored on held-out batches
        r = prune_blocks(base, x, held_out_loader(data, args.batch_size, args.seed), batches=args.block_batches,
                         target_macs=depth_macs or args.target_macs, scoring=args.block_scoring)
        start, scale = r.model, r.macs_before / r.macs_after  # channel targets stay fractions of the original
        info["removed_blocks"], info["block_scores"] = r.removed, r.scores
        info["block_scoring"], info["block_probes"] = args.block_scoring, r.probes
        log(f"{name} {variant}: removed {len(r.removed)} blocks {r.removed}")
    if method == "none":  # the control: the unpruned model through the same fine-tune
        pruned = copy.deepcopy(base)
    elif method == "blocks":
        pruned = start
    elif method == "torch-pruning-l1":
        pruned, ratio, trace = tp_search(base, args.target_macs, base_prof.macs, x)
        info["tp_ratio"], info["tp_search"] = ratio, trace
        log(f"{name} {variant}: pruning_ratio {ratio:.4f} after bisection {trace}")
    else:
        criterion = method
        if "sparse" in flags:  # the paper's sparsity training first, on a copy (the baseline stays the teacher)
            start = copy.deepcopy(start)
            term_name, term = sparsity_term(criterion, start, x, args.sparsity_strength)
            fit(start, data.loader("train", args.batch_size, seed=args.seed), epochs=1, lr=args.lr, weight_decay=5e-4,
                schedule="cosine", seed=args.seed, progress=False, extra_losses={term_name: term},
                checkpoint_dir=os.path.join(args.out, f"{name}-{variant}-sparsity-ckpt"))
            start.eval()
            info["sparsity_strength"] = args.sparsity_strength
        kwargs = {"untie_shortcuts": "untied" in flags, "rounding": "ceil" if "ceil" in flags else "floor"}
        if criterion in criteria_needing_data():  # thinet and lasso also run their paper's weight reconstruction (auto)
            kwargs.update(loader=data.loader("train", args.batch_size, seed=args.seed), batches=args.batches)
        elif criterion == "random":
            kwargs["seed"] = args.seed
        if "fast" in flags:  # the speed goal itself as the policy: measured bs1 latency <= 1/1.7 of the original
            kwargs.update(target_latency=1 / 1.7, latency_batch=1)
        elif "lut" in flags:  # MACs and latency at bs1 and bs64 (vs the unpruned model), from a latency table
            kwargs.update(target_macs=args.target_macs * scale, target_latency=1 / args.lut_speedup,
                          latency_model="table", latency_batch=(1, 64), latency_reference=base)
            info["lut_speedup"] = args.lut_speedup
        elif "sens" in flags:  # Li et al.'s per-layer sensitivity on the validation split, ratios meeting the MACs
            crit = {k: v for k, v in kwargs.items() if k != "batches"}
            kwargs["ratios"], scan = sensitivity_ratios(start, x, held_out_loader(data, args.batch_size, args.seed),
                                                        criterion=criterion, target_macs=args.target_macs * scale,
                                                        batches=4,
                                                        round_to=8, **crit)
            info["sensitivity"] = scan.to_dict()
        else:
            kwargs["target_macs"] = args.target_macs * scale
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = prune(start, x, criterion=criterion, round_to=8, **kwargs)
        pruned = r.model
        info["latency_ratio_at_prune"] = r.latency_ratio
        info["warnings"] = [str(w.message) for w in caught]
    info["prune_s"] = time.perf_counter() - t0
    prof = profile(pruned, x)
    info.update(params=prof.params, macs=prof.macs, params_ratio=prof.params / base_prof.params,
                macs_ratio=prof.macs / base_prof.macs)
    test = data.loader("test", 500)
    info["top1_before_ft"] = evaluate(pruned, test)["top1"]
    log(f"{name} {variant}: MACs {info['macs_ratio']:.3f}, params {info['params_ratio']:.3f}, "
        f"top-1 before fine-tune {pct(info['top1_before_ft'])}")
    t1 = time.perf_counter()
    if args.epochs:
        train = dict(epochs=args.epochs, lr=args.lr, weight_decay=5e-4, schedule="cosine", seed=args.seed,
                     progress=False, checkpoint_dir=os.path.join(args.out, f"{name}-{variant}-ckpt"))
        loader = data.loader("train", args.batch_size, seed=args.seed)
        torch.set_num_threads(args.train_threads or args.threads)  # the timings below set their own threads
        if kd:
            with distill_terms("kd", copy.deepcopy(teacher).eval(), pruned, x) as terms:
                fit(pruned, loader, extra_losses=terms, **train)
        else:
            fit(pruned, loader, **train)
        torch.set_num_threads(args.threads)
    info["finetune_min"] = (time.perf_counter() - t1) / 60
    info["train_threads"] = args.train_threads or args.threads
    info["top1_after_ft"] = evaluate(pruned, test)["top1"]
    if method != "torch-pruning-l1":  # the model itself, so its speed and size can be measured again later
        info["artifact"] = slimkit.save(pruned.eval(), os.path.join(args.out, f"{name}-{variant}.safetensors"),
                                        meta={"input_size": list(INPUT), "variant": variant})
        info["artifact_bytes"] = os.path.getsize(info["artifact"])
    info["delta_vs_base"] = info["top1_after_ft"] - base_top1
    log(f"{name} {variant}: top-1 after {args.epochs} epoch(s) {pct(info['top1_after_ft'])} "
        f"({100 * info['delta_vs_base']:+.2f} vs baseline) in {info['finetune_min']:.1f} min")
    pruned.eval()
    cmp = compare(base, pruned, INPUT, batch_sizes=(1, 64), threads=args.threads, modes=tuple(args.modes),
                  repeats=args.repeats, names=("original", variant), roofline=False)
    info["speedup"] = {}
    for mode in args.modes:
        for bs in (1, 64):
            try:
                q = cmp.results[mode][bs]["ratio"]
                # ratio = pruned latency / original latency, so speed-up = 1 / ratio (p10/p90 swap)
                info["speedup"][f"{mode}-{bs}"] = {"median": 1 / q["median"], "lo": 1 / q["p90"], "hi": 1 / q["p10"],
                                                   "cv": q["cv"], "orig_ms": cmp.results[mode][bs]["a"]["median_ms"],
                                                   "pruned_ms": cmp.results[mode][bs]["b"]["median_ms"]}
            except KeyError:
                info["speedup"][f"{mode}-{bs}"] = None
    info["bench_errors"], info["bench_warnings"] = dict(cmp.errors), list(cmp.warnings)
    log(f"{name} {variant}: speed-up " + ", ".join(f"{k} {v['median']:.2f}x" for k, v in info["speedup"].items() if v))
    info["total_min"] = (time.perf_counter() - t0) / 60
    info["computed"] = time.strftime("%Y-%m-%d")
    os.makedirs(args.out, exist_ok=True)
    with open(cache, "w") as f:
        json.dump(info, f, indent=1)
    return info


def row(info: dict, modes: list[str]) -> list:
    notes = {"slimming": " (no sparsity pre-training)", "thinet": " (+ scale reconstruction)",
             "lasso": " (+ least-squares reconstruction)"}
    method, *flags = info["variant"].split(":")
    if "sparse" in flags:
        notes.pop("slimming")
    depth = next((f for f in flags if f.startswith("depth")), None)
    label = "Torch-Pruning 1.6 MetaPruner, L1 (global)" if method == "torch-pruning-l1" else \
        "control: unpruned, same fine-tune" if method == "none" else \
        f"slimkit `prune_blocks` (depth only: {len(info['removed_blocks'])} whole residual blocks removed)" \
        if method == "blocks" else \
        f"slimkit `{method}`" + notes.get(method, "") + (", stages untied" if "untied" in flags else ", stages tied") \
        + (", widths rounded up (ceil)" if "ceil" in flags else "")
    if info.get("block_scoring", "greedy") != "greedy":
        label += f" ({info['block_scoring']} block scoring)"
    label += ", KD fine-tune" if "kd" in flags else ""
    label += f", KD fine-tune from {info['teacher']}" if "teacher" in info else ""
    label += ", target_latency=1/1.7 (bs1) instead of MACs" if "fast" in flags else ""
    label += (f", + latency table: target_latency=1/{info.get('lut_speedup', 1.7):g} at bs1 and bs64"
              if "lut" in flags else "")
    label += (f", after 1 epoch of its sparsity training (strength {info.get('sparsity_strength')})"
              if "sparse" in flags else "")
    label += ", per-group ratios from a sensitivity scan" if "sens" in flags else ""
    label += (f", after removing {len(info['removed_blocks'])} residual blocks (to {int(depth[5:])}% of the MACs)"
              if depth else "")
    cells = [info["model"], label, f"{info['params'] / 1e6:.3f} M ({info['params_ratio']:.3f})",
             f"{info['macs'] / 1e6:.1f} M ({info['macs_ratio']:.3f})", pct(info["top1_before_ft"]),
             pct(info["top1_after_ft"]), f"{100 * info['delta_vs_base']:+.2f}"]
    for mode in modes:
        for bs in (1, 64):
            s = info["speedup"].get(f"{mode}-{bs}")
            cells.append(f"{s['median']:.2f}x ({s['lo']:.2f}-{s['hi']:.2f})" if s else "n/a")
    return cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet56", help="comma-separated: resnet56,resnet20")
    p.add_argument("--variants", default=",".join(CRITERIA) + ",torch-pruning-l1")
    p.add_argument("--per-model", default="", help="MODEL=V1,V2[;MODEL=...]: other variants for that model")
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=1, help="fine-tune epochs per variant (0: none)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=8, help="training batches for the taylor criterion")
    p.add_argument("--block-batches", type=int, default=4,
                   help="validation batches that score each residual block (blocks, :depthNN variants)")
    p.add_argument("--block-scoring", default="greedy", choices=SCORINGS,
                   help="how prune_blocks re-scores after each removal (blocks, :depthNN variants)")
    p.add_argument("--lut-speedup", type=float, default=1.7,
                   help="speed-up the :lut variants plan for at bs1 and bs64 (its latency target is 1/this)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for everything but the fine-tune")
    p.add_argument("--train-threads", type=int, help="torch threads for the fine-tune (default: --threads); "
                                                        "accuracy does not depend on it, only the minutes")
    p.add_argument("--modes", default="eager,torchscript", help="bench modes for the speed-up")
    p.add_argument("--repeats", type=int, default=20, help="interleaved A/B pairs per mode and batch size")
    p.add_argument("--limit", type=int, help="class-balanced subset per split (smoke tests only)")
    p.add_argument("--sparsity-strength", type=float, default=1e-4,
                   help="strength of the sparsity term for :sparse variants (L1 on BN scales; group lasso for ssl)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "prune-bench"))
    p.add_argument("--fresh", action="store_true", help="ignore cached variant results and checkpoints")
    p.add_argument("--no-record", action="store_true", help="print the table, do not write docs/benchmarks.md")
    args = p.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    torch.set_num_threads(args.threads)
    if args.fresh and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out, exist_ok=True)
    data = load(f"cifar10:{CIFAR}", seed=args.seed, limit=args.limit)
    variants = [v for v in args.variants.split(",") if v]
    infos, base_rows = [], []
    for name in args.models.split(","):
        base = slimkit.load(os.path.join(ROOT, "runs", "baselines", f"{name}.safetensors")).eval()
        base_prof = profile(base, torch.zeros(1, *INPUT))
        base_top1 = evaluate(base, data.loader("test", 500))["top1"]
        log(f"{name}: baseline top-1 {pct(base_top1)}, {base_prof.params:,} params, {base_prof.macs:,} MACs")
        base_rows.append([name, "adapted baseline (unpruned)", f"{base_prof.params / 1e6:.3f} M (1.000)",
                          f"{base_prof.macs / 1e6:.1f} M (1.000)", pct(base_top1), "-", "+0.00"]
                         + ["1.00x"] * (2 * len(args.modes)))
        own = dict(part.split("=", 1) for part in args.per_model.split(";") if part)
        for v in ([x for x in own[name].split(",") if x] if name in own else variants):
            infos.append(run_variant(name, v, base, base_prof, base_top1, data, args))

    headers = ["model", "method", "params (ratio)", "MACs (ratio)", "top-1 pruned, no FT", "top-1 after FT",
               "delta vs baseline"]
    headers += [f"speed-up {mode} bs{bs}" for mode in args.modes for bs in (1, 64)]
    rows = []
    for name in args.models.split(","):
        rows.append(next(r for r in base_rows if r[0] == name))
        rows += [row(i, args.modes) for i in infos if i["model"] == name]
    n_test = len(data.split("test"))
    budget = (f"{args.epochs} epoch(s) SGD momentum 0.9, lr {args.lr} cosine, weight decay 5e-4, batch "
              f"{args.batch_size}, crop+flip, on the {len(data.split('train')):,}-image train part")
    body = (f"Each variant starts from the adapted baseline (runs/baselines/MODEL.safetensors), is pruned to "
            f"{args.target_macs} of the original MACs with `round_to=8` (widths rounded down, `rounding=\"floor\"`, "
            "unless marked ceil), then fine-tuned with the same fixed budget: "
            f"**{budget}** (`slimkit.train.fit`). Top-1 on the {n_test:,}-image CIFAR-10 (JPEG) test split. "
            "Params/MACs from `slimkit.profile`. Speed-up = original latency / pruned latency from "
            f"`slimkit.bench.compare` (interleaved A/B, {args.repeats} pairs, median of per-pair ratios, p10-p90 in "
            f"brackets), {args.threads} thread, CPU. KD rows distil (Hinton et al., T=4, alpha 0.9) from the "
            "unpruned baseline, or from the adapted baseline they name (\"KD fine-tune from resnet56\"). "
            "`slimming` scores the BN scales of the adapted model as they are, without Liu et al.'s sparsity "
            "pre-training. `random` is the control. Torch-Pruning: "
            "`MetaPruner(MagnitudeImportance(p=1), global_pruning=True, round_to=8, ignored_layers=[linear])`, its "
            "`pruning_ratio` bisected (12 steps) to the smallest value whose profiled MACs meet the same target; its "
            "tracer cannot follow the option-A shortcut (`F.pad` over channels gives a broken model), so the "
            "shortcuts were swapped for an equivalent gather module with a custom pruner for it.\n\n")
    body += markdown_table(headers, rows)
    dates: dict[str, list[str]] = {}
    for i in infos:
        dates.setdefault(i.get("computed", "?"), []).append(i["variant"])
    if len(dates) > 1:  # cached rows from earlier runs: same code path and budget, other day
        body += "\n\nRows computed on: " + "; ".join(f"{d}: {', '.join(v)}" for d, v in sorted(dates.items())) + "."
    # rows cached before --train-threads existed fine-tuned with --threads, which was 1 in every recorded command
    threads: dict[int, list[str]] = {}
    for i in infos:
        threads.setdefault(i.get("train_threads", 1), []).append(f"{i['model']} {i['variant']}")
    body += ("\n\nFine-tune threads (they change the minutes, not the method): "
             + "; ".join(f"{t}: {', '.join(v)}" for t, v in sorted(threads.items())) + ".")
    seen = set()
    for i in infos:
        if i["variant"].split(":")[0] == "torch-pruning-l1" and i["model"] not in seen:  # one search per model
            seen.add(i["model"])
            body += (f"\n\nTorch-Pruning ({i['model']}): pruning_ratio {i['tp_ratio']:.4f}; bisection (ratio, MACs "
                     f"ratio): {', '.join(f'({r}, {m:.3f})' for r, m in i['tp_search'])}.")
    body += "\n\nPublished anchors (original CIFAR-10 binaries, long GPU fine-tunes; not comparable budgets):\n\n"
    body += markdown_table(["work", "kind", "compute", "top-1 base -> pruned", "note"], ANCHORS)
    body += "\n\n" + verdict(infos, args)
    if args.limit:
        body += f"\n\n**Smoke run** (`--limit {args.limit}`): numbers are not meaningful."
    if args.no_record:
        print(body)
    else:
        if args.epochs == 1:
            record("prune", "Structured pruning on CIFAR-10 (JPEG)", body)
        else:  # a longer budget is its own section, next to the one-epoch table
            record(f"prune-{args.epochs}ep", f"Structured pruning on CIFAR-10 (JPEG), {args.epochs}-epoch fine-tune",
                   body)


def verdict(infos: list[dict], args) -> str:
    mode = "eager"
    lines = [(f"Goal: at most 0.5 points of top-1 lost vs the adapted baseline at <= {args.target_macs} of the MACs, "
              f"and >= 1.7x measured speed-up ({mode}, 1 thread). With the budget above:")]
    control = {i["model"]: i["top1_after_ft"] for i in infos if i["variant"].split(":")[0] == "none"}
    infos = [i for i in infos if i["variant"].split(":")[0] != "none"]
    for i in infos:
        s1, s64 = i["speedup"].get(f"{mode}-1"), i["speedup"].get(f"{mode}-64")
        acc_ok = i["delta_vs_base"] >= -0.005
        mac_ok = i["macs_ratio"] <= args.target_macs + 1e-9
        sp = [s["median"] for s in (s1, s64) if s]
        sp_ok = bool(sp) and min(sp) >= 1.7
        met = "met" if acc_ok and mac_ok and sp_ok else "NOT met"
        why = []
        if not acc_ok:
            why.append(f"accuracy {100 * i['delta_vs_base']:+.2f} points")
        if not mac_ok:
            why.append(f"MACs {i['macs_ratio']:.3f}")
        if not sp_ok:
            why.append("speed-up " + "/".join(f"{v:.2f}x" for v in sp) + " (bs1/bs64)")
        if i["model"] in control:
            why.append(f"{100 * (i['top1_after_ft'] - control[i['model']]):+.2f} vs the unpruned control")
        lines.append(f"- {i['model']} {i['variant']}: {met}" + (f" ({'; '.join(why)})" if why else ""))
    if infos:
        best = max(infos, key=lambda i: i["delta_vs_base"])
        fast = max(infos, key=lambda i: min(s["median"] for k, s in i["speedup"].items() if s and k.startswith(mode)))
        n_met = sum(1 for ln in lines[1:] if ": met" in ln)
        lines.append(f"\nIn short: {n_met} of {len(infos)} variants meet the goal with this budget. Best accuracy: "
                     f"{best['model']} {best['variant']} ({100 * best['delta_vs_base']:+.2f} points); best worst-case "
                     f"{mode} speed-up: {fast['model']} {fast['variant']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
