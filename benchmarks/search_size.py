"""Size-budget search on CIFAR-10 (JPEG): per-layer sparsity and codebook bits, searched vs uniform vs sensitivity.

``slimkit.search.search`` on the adapted baseline (runs/baselines/NAME.safetensors) under a budget
of ``--target`` of its safetensors file, the candidate measured as the packed file
(``slimkit pack``: sparse positions, codes, codebooks, Huffman), space ``sparsity,share`` (a
density and a codebook width per conv/linear layer), ``--trials`` trials (a count, not a time, so
a loaded machine changes how long it takes, not what it finds), warm-started with the uniform
policy (one density everywhere, 4-bit codebooks) and Deep Compression's per-layer sensitivity
plan. Then the searched, uniform and sensitivity policies are each retrained the same way
(:func:`slimkit.search.retrain_weights`: ``--epochs`` of KD from the baseline, 70% with the masks
held, the rest training the centroids only), packed, and measured: bytes on disk and test top-1.

    python benchmarks/search_size.py --models resnet20 --target 0.05 --trials 120 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CIFAR, ROOT, markdown_table, record  # noqa: E402

import slimkit  # noqa: E402
from slimkit.data import load  # noqa: E402
from slimkit.search import SearchConfig, retrain_weights, search  # noqa: E402
from slimkit.search.evaluate import file_bytes, recalibrate_bn  # noqa: E402
from slimkit.search.problems import PruningProblem  # noqa: E402
from slimkit.sparse import pack  # noqa: E402
from slimkit.sparse.masks import prunable_layers, report  # noqa: E402
from slimkit.train import evaluate  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=["resnet20"])
    p.add_argument("--target", type=float, default=0.05)
    p.add_argument("--trials", type=int, default=120)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trial-steps", type=int, default=0, help="SGD steps each feasible candidate is tuned before its "
                                                                "proxy is taken (0: the proxy alone)")
    p.add_argument("--policies", type=lambda s: s.split(","), default=["searched", "uniform", "sensitivity"])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "search-size-bench"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = f"cifar10:{CIFAR}"
    steps = f"-steps{args.trial_steps}" if args.trial_steps else ""
    data = load(spec, seed=0)
    test = data.loader("test", 256)
    rows = []
    for name in args.models:
        base = slimkit.load(os.path.join(ROOT, "runs", "baselines", f"{name}.safetensors")).eval()
        folder = os.path.join(args.out, f"{name}-size{args.target:g}" + steps)
        cfg = SearchConfig(target_size=args.target, space=("sparsity", "share"), trials=args.trials,
                           warm_start=("uniform", "sensitivity"), finetune_epochs=0, runtime="eager", seed=0,
                           trial_steps=args.trial_steps)
        t0 = time.time()
        results = search(base, spec, cfg, folder, data=data, model_name=name, log=log)
        minutes = (time.time() - t0) / 60
        job = json.load(open(os.path.join(folder, "search.json")))
        problem = PruningProblem(job, model=base, data=data)
        top0, bytes0 = evaluate(base, test)["top1"], file_bytes(base)
        starts = {r["warm_start"]: r for r in results["warm_starts"]}
        policies = [("searched", results["chosen"])] + [(k, starts[k]) for k in ("uniform", "sensitivity")
                                                          if k in starts]
        for label, row in [(la, r) for la, r in policies if la in args.policies]:
            applied = evaluate(recalibrate_bn(problem.space.apply(row["policy"]), problem.calib), test)["top1"]
            t1 = time.time()
            model = retrain_weights(problem, base, job, row["policy"], folder, log, epochs=args.epochs)
            path = pack(model, os.path.join(folder, f"{label}.slimpack"))
            size = os.path.getsize(path)
            top1 = evaluate(model, test)["top1"]
            _, sparsity = report(prunable_layers(model))
            bits = sorted({v for k, v in row["policy"].items() if k.startswith("codebook:")})
            log(f"{name} {label}: {size:,} B ({bytes0 / size:.1f}x smaller), top-1 {top1 * 100:.2f} "
                f"({(top1 - top0) * 100:+.2f}) after {time.time() - t1:.0f}s of retraining")
            rows.append([name, label, f"trial {row['trial']}", f"{row['proxy'] * 100:.1f}",
                         f"{row['size_ratio']:.4f}", f"{size:,}", f"{size / bytes0:.4f}", f"{bytes0 / size:.1f}x",
                         f"{sparsity:.3f}", f"{bits[0]}-{bits[-1]}" if bits else "-", f"{applied * 100:.2f}",
                         f"{top1 * 100:.2f}", f"{(top1 - top0) * 100:+.2f}",
                         "yes" if size <= args.target * bytes0 else "no"])
        s = results["study"]
        rows.append([name, "(study)", f"{s['complete']} trials", "", "", f"baseline {bytes0:,}", "", "", "", "",
                     "", f"baseline {top0 * 100:.2f}", "",
                     f"{minutes:.0f} min, {s['seconds_per_trial']:.1f} s/trial"])
    body = (f"Budget: {args.target} of the baseline's safetensors file, the candidate measured as its packed file "
            "(`slimkit pack`: sparse positions, codes, codebooks, Huffman/lzma); a trial must fit 0.95 of it (the "
            f"retrain moves the Huffman statistics). Space `sparsity,share`: per conv/linear layer a density "
            f"(0.05-1 by 0.05, kept by magnitude) and k-means codebook bits (2-8); {args.trials} trials, TPE, "
            "proxy = top-1 on 1024 validation images after BN re-estimation on 512 training images"
            + (f", each feasible candidate first tuned {args.trial_steps} SGD steps with its masks and codebooks held"
               if args.trial_steps else "") + ". Each policy is "
            f"then retrained the same way: {args.epochs} epoch(s) of KD from the baseline (SGD lr 0.01 cosine, batch "
            "128; 70% with the masks held, the rest training the centroids only), packed and measured: bytes on "
            "disk and top-1 on the 10,000 CIFAR-10 (JPEG) test images. `uniform`: the largest single density "
            "that fits with 4-bit codebooks; `sensitivity`: Deep Compression's per-layer scan (each layer alone "
            "pruned to 30-98%) at the least global sparsity that fits, 4-bit codebooks.\n\n"
            + markdown_table(["model", "policy", "from", "proxy", "size (search)", "bytes packed", "size ratio",
                              "smaller", "sparsity", "bits", "top-1 applied", "top-1 retrained", "delta",
                              "fits"], rows))
    tuned = f", {args.trial_steps} tuning steps per trial" if steps else ""
    record(f"search-size{args.target:g}{steps}", f"Policy search under a size budget: per-layer sparsity and codebook "
           f"bits (target {args.target:g} of the file{tuned})", body)


if __name__ == "__main__":
    main()
