"""Policy search on CIFAR-10 (JPEG): searched policy against uniform and sensitivity-scan policies, same fine-tune.

Part ``search``: ``slimkit.search.search`` on the adapted baseline (runs/baselines/NAME.safetensors)
under a latency budget of ``--target`` of the original measured in ``--runtime`` at ``--batch``
(ONNX Runtime at batch 1 and eager at batch 64 in the issue), for ``--time-budget`` with one
one-thread worker, warm-started with the uniform and sensitivity-scan policies, no fine-tune.

Part ``throughput``: trials per hour of the same study with one and with two one-thread worker
processes, ``--throughput-time`` each (the search's cost per trial).

Part ``finetune``: the searched policy, the uniform policy (the largest keep ratio everywhere whose
predicted latency meets the budget) and the sensitivity-scan policy (Li et al. 2017 ratios at the
budget) of each study, each applied to the baseline, BN re-estimated, fine-tuned with the same KD
budget (``--epochs``, SGD lr 0.01 cosine, KD from the baseline) and then measured the same way:
test top-1 on the 10k split and latency against the baseline, interleaved, in the study's runtime.

    python benchmarks/search.py --part search --models resnet20 --runtime onnxruntime --batch 1 --time-budget 30m
    python benchmarks/search.py --part throughput --models resnet20 --runtime onnxruntime --batch 1
    python benchmarks/search.py --part finetune --models resnet20 --runtime onnxruntime --batch 1 --epochs 5

``--space prune,blocks,bits`` searches int8 or float per layer too (its own study folder and section):

    python benchmarks/search.py --part search --space prune,blocks,bits --time-budget 20m
    python benchmarks/search.py --part finetune --space prune,blocks,bits --epochs 3 --policies searched,uniform
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CIFAR, ROOT, markdown_table, record  # noqa: E402

import slimkit  # noqa: E402
from slimkit.data import load  # noqa: E402
from slimkit.profile import profile  # noqa: E402
from slimkit.quant import calibration_loader  # noqa: E402
from slimkit.quant.core import quantizable_layers  # noqa: E402
from slimkit.search import SearchConfig, search  # noqa: E402
from slimkit.search.evaluate import measured_ratios, recalibrate_bn  # noqa: E402
from slimkit.search.finetune import finetune  # noqa: E402
from slimkit.search.problems import PruningProblem  # noqa: E402

ANCHORS = [
    ["AMC (He et al. 2018), RL, FLOPs-constrained", "ResNet-56", "50% FLOPs", "-0.90"],
    ["HRank (Lin et al. 2020)", "ResNet-56", "-50% FLOPs", "-0.09"],
    ["ABCPruner (Lin et al. 2020)", "ResNet-56", "-54% FLOPs", "-0.03"],
    ["DepGraph (Fang et al. 2023)", "ResNet-56", "2.13x fewer MACs", "+0.24"],
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


DEFAULT_SPACE = ("prune", "blocks")


def suffix(args) -> str:
    """``-bits`` (etc.) for a space other than the default, so each space has its own study and section."""
    extra = [s for s in args.space if s not in DEFAULT_SPACE]
    return "".join(f"-{s}" for s in extra)


def study_dir(out: str, model: str, runtime: str, batch: int, space: str = "") -> str:
    return os.path.join(out, f"{model}-{runtime}-bs{batch}{space}")


def config(args, **over) -> SearchConfig:
    return SearchConfig(target_latency=args.target, runtime=args.runtime, batch_sizes=(args.batch,), threads=1,
                        trials=args.trials, time_budget=args.time_budget, warm_start=("uniform", "sensitivity"),
                        finetune_epochs=0, quantize="never", latency_model=args.latency_model, seed=0,
                        space=tuple(args.space), **over)


def part_search(args) -> None:
    data = load(f"cifar10:{CIFAR}", seed=0)
    for name in args.models:
        model = slimkit.load(os.path.join(ROOT, "runs", "baselines", f"{name}.safetensors")).eval()
        out = study_dir(args.out, name, args.runtime, args.batch, suffix(args))
        t0 = time.time()
        r = search(model, f"cifar10:{CIFAR}", config(args), out, data=data, model_name=name, log=log)
        log(f"{name}: {r['study']['complete']} trials in {time.time() - t0:.0f}s; chosen trial {r['chosen']['trial']}")


def part_throughput(args) -> None:
    rows = []
    for name in args.models:
        base = study_dir(args.out, name, args.runtime, args.batch)
        job = json.load(open(os.path.join(base, "search.json")))
        per = {}
        for workers in (1, 2):
            folder = os.path.join(args.out, f"throughput-{name}-{workers}")
            os.makedirs(folder, exist_ok=True)
            w = dict(job, study=f"throughput-{workers}", storage=f"sqlite:///{os.path.abspath(folder)}/study.db",
                     trials=10_000, deadline=time.time() + args.throughput_seconds)
            path = os.path.join(folder, "search.json")
            json.dump(w, open(path, "w"))
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            t0 = time.time()
            procs = [subprocess.Popen([sys.executable, "-m", "slimkit.search.worker", path, "--index", str(i),
                                       "--threads", "1"], env=env) for i in range(workers)]
            for p in procs:
                p.wait()
            seconds = time.time() - t0
            import optuna

            study = optuna.load_study(study_name=w["study"], storage=w["storage"])
            n = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
            per[workers] = 3600 * n / seconds
            log(f"{name}: {workers} worker(s): {n} trials in {seconds:.0f}s ({per[workers]:.0f}/h)")
            rows.append([name, workers, n, f"{seconds:.0f}", f"{per[workers]:.0f}", f"{seconds / max(n, 1):.1f}"])
        rows[-1].append(f"{per[2] / per[1]:.2f}x")
        rows[-2].append("")
    body = (f"Trials per hour of the {args.runtime} bs{args.batch} study (accuracy proxy on 4x256 validation images "
            "after BN re-estimation on 4x128 training images, latency from the study's table), "
            f"{args.throughput_seconds:.0f} s per setting, worker processes with one thread each; the last column "
            "is two workers over one (goal: at least 1.6x).\n\n"
            + markdown_table(["model", "workers", "trials", "seconds", "trials/h", "s/trial", "2 vs 1"], rows))
    record(f"search-throughput-{args.runtime}-bs{args.batch}", f"Policy search: trials per hour ({args.runtime}, "
           f"batch {args.batch})", body)


def part_finetune(args) -> None:
    from slimkit.train import evaluate

    data = load(f"cifar10:{CIFAR}", seed=0)
    test = data.loader("test", 256)
    rows = []
    for name in args.models:
        folder = study_dir(args.out, name, args.runtime, args.batch, suffix(args))
        job = json.load(open(os.path.join(folder, "search.json")))
        results = json.load(open(os.path.join(folder, "results.json")))
        problem = PruningProblem(job)
        base = problem.model
        top0 = evaluate(base, test)["top1"]
        starts = {r["warm_start"]: r for r in results["warm_starts"]}
        policies = [("searched", results["chosen"])] + [(k, starts[k]) for k in ("uniform", "sensitivity")
                                                          if k in starts]
        policies = [(label, row) for label, row in policies if label in args.policies]
        if args.uniform_keep is not None:  # the equal-latency control alone: one keep ratio everywhere
            policies = [(f"uniform {args.uniform_keep:g}", {"trial": "-", "proxy": float("nan"),
                                                            "policy": problem.space.uniform(args.uniform_keep)})]
        for label, row in policies:
            torch.set_num_threads(args.train_threads)
            model = recalibrate_bn(problem.space.apply(row["policy"]), problem.calib)
            t0 = time.time()
            finetune(model, base, data, epochs=args.epochs, lr=0.01, seed=0, input_size=tuple(job["input_size"]))
            p = profile(model, problem.example)
            int8 = problem.space.quantized(row["policy"])
            layers = len(quantizable_layers(model))
            kept = len(problem.space.keep_float(row["policy"], model)) if int8 else layers
            if int8:  # as the search's final step does: 512 calibration images, the layers the policy says
                model = problem.int8(model, row["policy"], calibration_loader(data, 512, 64, 0), recalibrate=False)
            top1 = evaluate(model, test)["top1"]
            torch.set_num_threads(1)
            ratios = measured_ratios(base, model, problem.example, args.runtime, (args.batch,), 1, repeats=31)
            slimkit.save(model, os.path.join(folder, f"{label}.safetensors"),
                         meta={"input_size": list(job["input_size"])})
            log(f"{name} {label}: top-1 {top1 * 100:.2f} ({(top1 - top0) * 100:+.2f}), latency {ratios[args.batch]:.3f}"
                f" ({time.time() - t0:.0f}s)")
            rows.append([name, label + (f" ({layers - kept}/{layers} layers int8)" if problem.space.bits else ""),
                         f"trial {row['trial']}", f"{row['proxy'] * 100:.1f}",
                         f"{row.get('latency_ratio', float('nan')):.3f}", f"{ratios[args.batch]:.3f}",
                         f"{1 / ratios[args.batch]:.2f}x", f"{p.macs / problem.macs0:.3f}", f"{top1 * 100:.2f}",
                         f"{(top1 - top0) * 100:+.2f}"])
        s = results["study"]
        rows.append([name, "(study)", f"{s['complete']} trials", "", "", "", "", "",
                     f"baseline {top0 * 100:.2f}",
                     f"{s['seconds'] / 60:.0f} min, {s['seconds_per_trial']:.1f} s/trial"])
    body = (f"Budget: {args.target} of the baseline's latency in {args.runtime} at batch {args.batch}, 1 thread. "
            f"Each policy applied to the adapted baseline, BN re-estimated, then the same fine-tune: {args.epochs} "
            "epochs SGD lr 0.01 cosine, batch 128, KD from the baseline (T=4, alpha 0.9); latency measured against "
            "the baseline interleaved (31 pairs, median). Proxy: top-1 after BN re-estimation, before fine-tuning, "
            "on 1024 validation images. CIFAR-10 (JPEG), test split (10k).\n\n"
            + markdown_table(["model", "policy", "from", "proxy", "predicted", "measured latency", "speed-up",
                              "MACs", "top-1", "delta"], rows)
            + "\n\nPublished anchors (original CIFAR-10, long GPU fine-tunes, FLOPs-constrained unless noted):\n\n"
            + markdown_table(["method", "model", "budget", "top-1 delta"], ANCHORS))
    space = f", space {','.join(args.space)}" if suffix(args) else ""
    if suffix(args):
        body = (f"Searched space: {', '.join(args.space)} (int8 or float per conv/linear layer with bits: int8 "
                "policies are timed whole in the runtime, then quantized after the fine-tune as the policy says, "
                "512 calibration images).\n\n" + body)
    if args.uniform_keep is not None:
        record(f"search-{args.runtime}-bs{args.batch}-uniform{args.uniform_keep:g}", f"Policy search: uniform keep "
               f"{args.uniform_keep:g} control ({args.runtime}, batch {args.batch})", body)
        return
    record(f"search-{args.runtime}-bs{args.batch}{suffix(args)}", f"Policy search: searched vs uniform vs sensitivity "
           f"({args.runtime}, batch {args.batch}{space})", body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("search", "throughput", "finetune"), required=True)
    p.add_argument("--models", type=lambda s: s.split(","), default=["resnet20"])
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--trials", type=int, default=10_000)
    p.add_argument("--time-budget", default="2h")
    p.add_argument("--latency-model", default="table", choices=("table", "measure"))
    p.add_argument("--throughput-time", dest="throughput_seconds", type=float, default=600)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-threads", type=int, default=2)
    p.add_argument("--uniform-keep", type=float, help="finetune part: only a uniform policy at this keep ratio "
                                                        "(the equal-measured-latency control)")
    p.add_argument("--space", type=lambda s: s.split(","), default=list(DEFAULT_SPACE),
                   help="what is searched (SearchConfig.space): prune,blocks (default), add rank or bits")
    p.add_argument("--policies", type=lambda s: s.split(","), default=["searched", "uniform", "sensitivity"],
                   help="finetune part: which of the study's policies to fine-tune")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "search-bench"))
    args = p.parse_args()
    torch.set_num_threads(1)
    {"search": part_search, "throughput": part_throughput, "finetune": part_finetune}[args.part](args)


if __name__ == "__main__":
    main()
