"""Adapted baselines: the reference CIFAR ResNets fine-tuned on CIFAR-10 (JPEG), and fit's overhead.

The public resnet20/resnet56 checkpoints were trained on the original CIFAR-10 binaries and lose
accuracy on the JPEG re-encoding; a short fine-tune on the JPEG train split recovers it. The
fine-tuned models are written to runs/baselines/NAME.safetensors, the starting point of every
later compression benchmark. The second table compares the training throughput of
slimkit.train.fit with a bare PyTorch loop on the same model, batches and thread count, run
interleaved (fit, bare, fit, bare, ...) so machine drift cancels in the per-pair ratio.

    python benchmarks/baselines.py --models resnet20,resnet56 --epochs 2 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CIFAR, ROOT, markdown_table, record  # noqa: E402

import slimkit  # noqa: E402
from slimkit.artifact import history  # noqa: E402
from slimkit.data import load  # noqa: E402
from slimkit.train import evaluate, fit  # noqa: E402

WEIGHTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}
PAPER = {"resnet20": 91.78, "resnet56": 93.62}


def adapt(name: str, data, epochs: int, lr: float, batch: int, out_dir: str) -> list:
    weights = os.path.join(os.path.dirname(CIFAR), "..", "models", WEIGHTS[name])
    model = slimkit.create_model(name, weights=os.path.normpath(weights))
    before = evaluate(model, data.loader("test", 500))
    t0 = time.perf_counter()
    fit(model, data.loader("train", batch, seed=0), epochs=epochs, lr=lr, weight_decay=5e-4, schedule="cosine",
        checkpoint_dir=os.path.join(out_dir, f"{name}-ckpt"), progress=False)
    minutes = (time.perf_counter() - t0) / 60
    after = evaluate(model, data.loader("test", 500))
    val = evaluate(model, data.loader("val", 500))
    history(model).append({"stage": "finetune", "params": {"epochs": epochs, "lr": lr, "batch_size": batch,
                                                            "data": data.spec},
                           "metrics": {"test_top1": after["top1"], "val_top1": val["top1"]}})
    path = slimkit.save(model, os.path.join(out_dir, f"{name}.safetensors"),
                        meta={"dataset": data.spec, "input_size": [3, 32, 32]})
    print(f"{name}: {before['top1']:.4f} -> {after['top1']:.4f} in {minutes:.1f} min, saved {path}", flush=True)
    return [name, f"{PAPER[name]:.2f}", f"{100 * before['top1']:.2f}", f"{100 * after['top1']:.2f}",
            f"{100 * val['top1']:.2f}", f"{100 * after['top5']:.2f}", f"{minutes:.1f}"]


def bare_loop(model, batches, lr: float) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def throughput(name: str, data, batch: int, steps: int, rounds: int) -> list:
    """Images/s of fit vs a bare loop over the same pre-built batches, interleaved per round."""
    loader = data.loader("train", batch, seed=0)
    batches = []
    for x, y in loader:
        batches.append((x, y))
        if len(batches) == steps:
            break

    class Fixed:  # the same batches for both, so only the training loop differs
        def __iter__(self):
            return iter(batches)

        def __len__(self):
            return len(batches)

    ratios, fit_ips, bare_ips = [], [], []
    for _ in range(rounds):
        model = slimkit.create_model(name)
        t0 = time.perf_counter()
        fit(model, Fixed(), epochs=1, lr=0.01, schedule="constant", progress=False)
        t_fit = time.perf_counter() - t0
        model = slimkit.create_model(name)
        t0 = time.perf_counter()
        bare_loop(model, batches, 0.01)
        t_bare = time.perf_counter() - t0
        n = steps * batch
        fit_ips.append(n / t_fit)
        bare_ips.append(n / t_bare)
        ratios.append(t_bare / t_fit)
    return [name, batch, steps, rounds, f"{statistics.median(fit_ips):.0f}", f"{statistics.median(bare_ips):.0f}",
            f"{statistics.median(ratios):.3f}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the throughput comparison")
    p.add_argument("--steps", type=int, default=20, help="training steps per throughput round")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "baselines"))
    p.add_argument("--parts", default="adapt,throughput", help="which tables to produce (adapt, throughput)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load(f"cifar10:{CIFAR}", seed=0)
    names = args.models.split(",")

    parts = set(args.parts.split(","))
    if "adapt" in parts:
        rows = [adapt(n, data, args.epochs, args.lr, args.batch_size, args.out) for n in names]
        body = ("Fine-tune: SGD momentum 0.9, lr {lr}, cosine, weight decay 5e-4, batch {bs}, {ep} epochs on the "
                "45,000-image train part (5,000 held out for validation), crop+flip augmentation. Accuracy on the "
                "10,000 CIFAR-10 (JPEG) test images.\n\n").format(lr=args.lr, bs=args.batch_size, ep=args.epochs)
        body += markdown_table(["model", "paper top-1 (original CIFAR-10)", "reference ckpt top-1 (JPEG)",
                                "adapted top-1 (JPEG)", "adapted val top-1", "adapted top-5", "fine-tune min"], rows)
        record("baselines-adapt", "Adapted baselines on CIFAR-10 (JPEG)", body)
    if "throughput" in parts:
        tput = [throughput(n, data, args.batch_size, args.steps, args.rounds) for n in names]
        body = ("Training throughput of `fit` against a bare PyTorch loop (SGD, cross-entropy, the same pre-built "
                "batches, interleaved rounds; a ratio above 1 means fit is faster):\n\n")
        body += markdown_table(["model", "batch", "steps/round", "rounds", "fit img/s", "bare loop img/s",
                                "fit speed / bare (median of pairs)"], tput)
        record("baselines-throughput", "Training throughput: fit vs a bare PyTorch loop", body)

if __name__ == "__main__":
    main()
