"""Quantization with training on CIFAR-10 (JPEG): QAT (LSQ) vs PTQ, and Banner et al. 8-bit training vs float.

QAT part: from the adapted baseline (runs/baselines/MODEL.safetensors, see benchmarks/baselines.py)
three int8 models, all through the same x86 int8 runtime and 512 calibration images:
PTQ (min-max observer), QAT with learned step sizes (``slimkit.quant.qat``: ``--qat-epochs``
epochs, lr ``--qat-lr`` cosine, BN statistics frozen after half the epochs), and the control: a
float fine-tune with the same epochs, learning rate and data followed by the same PTQ, so any
gain of QAT over PTQ is not just extra training.

8-bit training part: resnet20 trained from scratch with the same seed, data and budget
(``--train-limit`` class-balanced train images, ``--epochs`` epochs, lr ``--lr`` cosine) in
float and in simulated 8 bits (``slimkit.quant.train8``: 8-bit weights, activations and layer
gradients with stochastic rounding, 16-bit weight gradients, Range BN), then both PTQ'd to int8.

Top-1 on the 10,000-image CIFAR-10 (JPEG) test split. Finished rows are cached in ``--out``.

    python benchmarks/quant_train.py --threads 1
    python benchmarks/quant_train.py --limit 300 --train-limit 300 --epochs 1 --out /tmp/qt --no-record   # smoke
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
from slimkit.data import load  # noqa: E402
from slimkit.models import create_model  # noqa: E402
from slimkit.quant import calibration_loader, qat, quantize  # noqa: E402
from slimkit.quant.train8 import train_8bit  # noqa: E402
from slimkit.train import evaluate, fit  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cached(out: str, key: str, fresh: bool, run) -> dict:
    path = os.path.join(out, f"{key}.json")
    if os.path.exists(path) and not fresh:
        return json.load(open(path))
    t0 = time.perf_counter()
    info = run()
    info["minutes"] = (time.perf_counter() - t0) / 60
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=1)
    os.replace(path + ".tmp", path)
    log(f"{key}: {info}")
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20", help="QAT part: comma-separated adapted baselines")
    p.add_argument("--parts", default="qat,train8")
    p.add_argument("--qat-epochs", type=int, default=1)
    p.add_argument("--qat-lr", type=float, default=1e-3)
    p.add_argument("--qat-limit", type=int, default=10000, help="class-balanced train images for QAT and its control")
    p.add_argument("--train-limit", type=int, default=5000, help="8-bit part: train images")
    p.add_argument("--epochs", type=int, default=8, help="8-bit part: epochs from scratch")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--limit", type=int, help="test images (smoke runs only)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "quant-train-bench"))
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    data = with_subset(load(f"cifar10:{CIFAR}", seed=args.seed), "test", args.limit, args.seed)
    test = data.loader("test", 500)
    calib = calibration_loader(data, args.calib, seed=args.seed)

    parts = set(args.parts.split(","))
    sections = []
    if "qat" in parts:
        small = with_subset(data, "train", args.qat_limit, args.seed)
        loader = small.loader("train", 128, seed=args.seed)
        rows = []
        for name in args.models.split(","):
            base = slimkit.load(os.path.join(ROOT, "runs", "baselines", f"{name}.safetensors")).eval()
            key = f"{name}-qat-e{args.qat_epochs}-lr{args.qat_lr}-n{args.qat_limit}"

            def run_qat(base=base, key=key):
                info = {"float": evaluate(base, test)["top1"],
                        "ptq": evaluate(quantize(base, calib, "minmax"), test)["top1"]}
                ft = copy.deepcopy(base)
                fit(ft, loader, epochs=args.qat_epochs, lr=args.qat_lr, seed=args.seed, progress=False,
                    checkpoint_dir=os.path.join(args.out, key + "-control"))
                info["control_float"] = evaluate(ft, test)["top1"]
                info["control_ptq"] = evaluate(quantize(ft.eval(), calib, "minmax"), test)["top1"]
                t0 = time.perf_counter()
                q = qat(base, loader, epochs=args.qat_epochs, calib_loader=calib, lr=args.qat_lr, seed=args.seed,
                        progress=False, checkpoint_dir=os.path.join(args.out, key + "-qat"))
                info["qat_min"] = (time.perf_counter() - t0) / 60
                info["qat"] = evaluate(q, test)["top1"]
                return info

            i = cached(args.out, key, args.fresh, run_qat)
            rows.append([name, f"{100 * i['float']:.2f}",
                         f"{100 * i['ptq']:.2f} ({100 * (i['ptq'] - i['float']):+.2f})",
                         f"{100 * i['control_ptq']:.2f} ({100 * (i['control_ptq'] - i['float']):+.2f}; float "
                         f"{100 * i['control_float']:.2f})",
                         f"{100 * i['qat']:.2f} ({100 * (i['qat'] - i['float']):+.2f})", f"{i['qat_min']:.1f}"])
        sections.append(
            f"**QAT** from the adapted baselines: {args.qat_epochs} epoch(s) on {len(small.train):,} class-balanced "
            f"train images, SGD momentum 0.9, lr {args.qat_lr} cosine, weight decay 5e-4, batch 128, BN statistics "
            f"frozen after half the epochs, step sizes initialised from a min-max calibration on {args.calib} "
            "images (LSQ, Esser et al. 2020). PTQ = min-max calibration on the same images. Control = float "
            "fine-tune with the same budget, then the same PTQ. All int8 on the x86 runtime (fbgemm kernels).\n\n"
            + markdown_table(["model", "float top-1", "int8 PTQ (delta)", "int8 control: fine-tune + PTQ",
                              "int8 QAT (delta)", "QAT min"], rows))
    if "train8" in parts:
        small = with_subset(data, "train", args.train_limit, args.seed)
        loader = small.loader("train", 128, seed=args.seed)

        def scratch(kind: str):
            def run():
                torch.manual_seed(args.seed)
                m = create_model("resnet20", num_classes=10)
                opts = dict(lr=args.lr, seed=args.seed, progress=False, weight_decay=5e-4, schedule="cosine",
                            checkpoint_dir=os.path.join(args.out, f"scratch-{kind}-ckpt"))
                t0 = time.perf_counter()
                if kind == "float":
                    fit(m, loader, epochs=args.epochs, **opts)
                else:
                    m, _ = train_8bit(m, loader, args.epochs, **opts)
                minutes = (time.perf_counter() - t0) / 60
                m.eval()
                return {"top1": evaluate(m, test)["top1"], "int8_top1": evaluate(quantize(m, calib, "minmax"),
                                                                                  test)["top1"],
                        "train_min": minutes}
            return run

        res = {k: cached(args.out, f"scratch-{k}-e{args.epochs}-n{args.train_limit}-lr{args.lr}", args.fresh,
                         scratch(k)) for k in ("float", "train8")}
        f = res["float"]["top1"]
        rows = [["float32 training", f"{100 * f:.2f}", "-", f"{100 * res['float']['int8_top1']:.2f}",
                 f"{res['float']['train_min']:.1f}"],
                ["8-bit training (Banner et al. 2018, simulated)", f"{100 * res['train8']['top1']:.2f}",
                 f"{100 * (res['train8']['top1'] - f):+.2f}", f"{100 * res['train8']['int8_top1']:.2f}",
                 f"{res['train8']['train_min']:.1f}"]]
        sections.append(
            f"**8-bit training** of resnet20 from scratch: {len(small.train):,} class-balanced train images, "
            f"{args.epochs} epochs, SGD momentum 0.9, lr {args.lr} cosine, weight decay 5e-4, batch 128, seed "
            f"{args.seed}, the same for both rows. 8-bit = `slimkit.quant.train8`: weights (per channel) and layer "
            "inputs (per tensor) rounded to 8 bits, layer gradients to 8 bits with stochastic rounding, weight "
            "gradients to 16 bits, Range BN; simulated in float32 (no speed gain: the wall time shows the cost of "
            "the simulation). The int8 column is each trained model after min-max PTQ.\n\n"
            + markdown_table(["training", "test top-1", "delta vs float", "after int8 PTQ", "train min"], rows))
    body = "\n\n".join(sections)
    if args.limit or args.train_limit < 1000:
        body += "\n\n**Smoke run**: numbers are not meaningful."
    if args.no_record:
        print(body)
    else:
        record("quant-train", "Quantization with training on CIFAR-10 (JPEG): QAT and 8-bit training", body)


if __name__ == "__main__":
    main()
