"""Efficient-module transforms on a trained CIFAR ResNet: accuracy before/after a short fine-tune, MACs and speed.

From the adapted resnet20 baseline (runs/baselines/resnet20.safetensors), each transform of
``slimkit.transform`` replaces every eligible layer (initialised by least squares on the weights
and on 4 batches of 64 recorded inputs, as ``apply_transform`` does), then the model is
fine-tuned with one fixed budget (``--epochs`` on ``--train-limit`` class-balanced train
images, SGD momentum 0.9, lr ``--lr`` cosine, weight decay 5e-4, batch 128, crop+flip).
Reported: parameters and MACs (``slimkit.profile``), test top-1 right after the transform (the
quality of the initialisation) and after the fine-tune, and the measured speed-up against the
untransformed model (``slimkit.bench.compare``, eager, interleaved pairs, median, 1 thread).
Transforms that find no eligible layer in the model are listed with the reason.

    python benchmarks/transform.py --threads 1
    python benchmarks/transform.py --train-limit 300 --epochs 1 --limit 300 --out /tmp/tr --no-record   # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CIFAR, ROOT, markdown_table, record, with_subset  # noqa: E402

import slimkit  # noqa: E402
from slimkit.bench import compare  # noqa: E402
from slimkit.data import load  # noqa: E402
from slimkit.errors import SlimkitError  # noqa: E402
from slimkit.profile import profile  # noqa: E402
from slimkit.train import evaluate, fit  # noqa: E402
from slimkit.transform import TRANSFORMS, apply_transform  # noqa: E402

INPUT = (3, 32, 32)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--transforms",
                   default=",".join(TRANSFORMS.names()) + ",bottleneck:ratio=2,grouped_shuffle:groups=4",
                   help="comma-separated NAME or NAME:KEY=VALUE[:KEY=VALUE] (transform options)")
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--limit", type=int, help="test images (smoke runs only)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "transform-bench"))
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    data = with_subset(load(f"cifar10:{CIFAR}", seed=args.seed), "test", args.limit, args.seed)
    data = with_subset(data, "train", args.train_limit, args.seed)
    test = data.loader("test", 500)
    calib = data.loader("train", 64, shuffle=False, augment=False)
    base = slimkit.load(os.path.join(ROOT, "runs", "baselines", f"{args.model}.safetensors")).eval()
    x = torch.zeros(1, *INPUT)
    prof0 = profile(base, x)
    base_top1 = evaluate(base, test)["top1"]

    # the same fine-tune for the untransformed model: the control for "a fine-tune alone helps"
    rows, skipped = [], []
    names = ["(none: fine-tune only)"] + [t for t in args.transforms.split(",") if t]
    for name in names:
        tag = name.strip("()").split(":")[0].replace(" ", "_") if name.startswith("(") else name.replace(":", "-")
        path = os.path.join(args.out, f"{args.model}-{tag}-e{args.epochs}-n{args.train_limit}.json")
        if os.path.exists(path) and not args.fresh:
            info = json.load(open(path))
        else:
            model = copy.deepcopy(base)
            info = {"transform": name}
            if not name.startswith("("):
                method, *pairs = name.split(":")
                opts = {k: json.loads(v) for k, v in (q.split("=", 1) for q in pairs)}
                try:
                    apply_transform(model, method, calib_loader=calib, record=False, **opts)
                except SlimkitError as e:  # no eligible layer in this model
                    inner = str(e).split("(", 1)[-1]
                    inner = inner[:-1] if inner.endswith(")") else inner  # the message's own closing bracket
                    reasons = sorted({r.split(": ", 1)[-1] for r in inner.split("; ")})
                    info["reason"] = "; ".join(reasons)[:200]
                    json.dump(info, open(path, "w"), indent=1)
                    skipped.append(info)
                    continue
                info["replaced"] = len(model.slimkit_last_transform["replaced"])
            model.eval()
            prof = profile(model, x)
            info.update(params=prof.params, macs=prof.macs, top1_init=evaluate(model, test)["top1"])
            t0 = time.perf_counter()
            fit(model, data.loader("train", 128, seed=args.seed), epochs=args.epochs, lr=args.lr, seed=args.seed,
                progress=False, checkpoint_dir=os.path.join(args.out, os.path.basename(path)[:-5] + "-ckpt"))
            info["ft_min"] = (time.perf_counter() - t0) / 60
            model.eval()
            info["top1_ft"] = evaluate(model, test)["top1"]
            cmp = compare(base, model, INPUT, batch_sizes=(1, 64), threads=args.threads, modes=("eager",),
                          repeats=args.repeats, roofline=False)
            info["speedup"] = {str(bs): 1 / cmp.ratio("eager", bs) for bs in (1, 64)} if not cmp.errors else {}
            with open(path + ".tmp", "w") as f:
                json.dump(info, f, indent=1)
            os.replace(path + ".tmp", path)
            log(f"{name}: {info}")
        if "reason" in info:
            if info not in skipped:
                skipped.append(info)
            continue
        sp = info.get("speedup", {})
        rows.append([f"`{name}`" if not name.startswith("(") else name,
                     f"{info.get('replaced', 0)}",
                     f"{info['params'] / 1e3:.1f} k ({info['params'] / prof0.params:.2f})",
                     f"{info['macs'] / 1e6:.1f} M ({info['macs'] / prof0.macs:.2f})", f"{100 * info['top1_init']:.2f}",
                     f"{100 * info['top1_ft']:.2f}", f"{100 * (info['top1_ft'] - base_top1):+.2f}",
                     f"{sp.get('1', float('nan')):.2f}x", f"{sp.get('64', float('nan')):.2f}x"])
    body = (f"Model: adapted {args.model} ({prof0.params:,} params, {prof0.macs / 1e6:.1f} M MACs, test top-1 "
            f"{100 * base_top1:.2f}). Each transform replaces every eligible layer, initialised by least squares; "
            f"then **{args.epochs} epoch(s) on {len(data.train):,} class-balanced train images, SGD momentum 0.9, lr "
            f"{args.lr} cosine, weight decay 5e-4, batch 128, crop+flip**. Top-1 on the {len(data.test):,}-image "
            "CIFAR-10 (JPEG) test split. Speed-up = original / transformed latency, eager, interleaved pairs "
            f"({args.repeats}), median, {args.threads} thread. The first row fine-tunes the untransformed model "
            "with the same budget (the control).\n\n")
    body += markdown_table(["transform", "layers replaced", "params (ratio)", "MACs (ratio)", "top-1 after transform",
                            "top-1 after fine-tune", "delta vs baseline", "speed-up bs1", "speed-up bs64"], rows)
    if skipped:
        body += "\n\nNot applicable to this model: " + "; ".join(f"`{i['transform']}` ({i['reason']})" for i in skipped)
    if args.limit or args.train_limit < 1000:
        body += "\n\n**Smoke run**: numbers are not meaningful."
    if args.no_record:
        print(body)
    else:
        record("transform", f"Module transforms on {args.model}, CIFAR-10 (JPEG)", body)


if __name__ == "__main__":
    main()
