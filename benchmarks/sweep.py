"""The architecture sweep: every torchvision classification model and timm's CNN families through four steps.

Profile (MACs == fvcore's), prune to half the MACs (exact against the zeroed copy), int8
quantize (runs, close to float), export to ONNX (verifies in ONNX Runtime): see
:mod:`slimkit.testing.sweep` for each step's check. Writes the per-model table and the counts
to docs/benchmarks.md.

    python benchmarks/sweep.py                      # everything (about an hour on 2 cores)
    python benchmarks/sweep.py --only timm --limit 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import warnings

import torch
from common import ROOT, markdown_table, record

from slimkit.testing.sweep import STEPS, TIMM_MODELS, SweepRow, sweep_model, torchvision_models

# inputs large enough for every stride and pooling of the network (a few need more than 64; at 64x64
# AlexNet's and VGG's adaptive pool to 6x6 / 7x7 would upsample, which the ONNX exporter refuses)
SIZES = {"alexnet": 224, "inception_v3": 299, "timm:inception_v3": 299, "googlenet": 96, "timm:hrnet_w18_small": 128,
         "timm:xception41": 128, "timm:dm_nfnet_f0": 96, "timm:fastvit_t8": 128, "timm:efficientvit_b0": 128}


NOT_CNN = ("vit_", "swin_", "maxvit_")  # torchvision's attention models: outside a CNN sweep, listed as such


def _params(spec: str) -> int:
    """Parameter count without the cost of building: on the meta device, else with initialisers skipped."""
    from unittest import mock

    from slimkit import create_model

    try:
        with torch.device("meta"):
            return sum(p.numel() for p in create_model(spec, num_classes=10).parameters())
    except Exception:  # an initialiser that reads values (regnet's) cannot run on meta tensors
        names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
        with contextlib.ExitStack() as stack:
            for n in names:
                stack.enter_context(mock.patch.object(torch.nn.init, n, lambda t, *a, **k: t))
            return sum(p.numel() for p in create_model(spec, num_classes=10).parameters())


def _isolated(spec: str, size: int, threads: int, timeout: float) -> SweepRow:
    """One model in a fresh process: memory is returned after each, and a crash or a hang is a row, not the end."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", spec, "--size", str(size), "--threads", str(threads)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return SweepRow(spec, size, {"build": f"timed out after {timeout:.0f} s"})
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode != 0 or not last.startswith("{"):
        why = f"the process died (exit status {r.returncode})" + (": killed (out of memory?)" if r.returncode in (
            -9, 137) else "")
        return SweepRow(spec, size, {s: why for s in STEPS})
    d = json.loads(last)
    return SweepRow(spec, size, d["steps"], d["facts"], d["seconds"])


def _save(path: str, done: list) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(done, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("torchvision", "timm"), default=None)
    ap.add_argument("--limit", type=int, default=None, help="at most this many models per source")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=os.path.join(ROOT, "runs", "sweep.json"))
    ap.add_argument("--resume", action="store_true", help="reuse the rows already in --json")
    ap.add_argument("--max-params", type=float, default=200e6, help="skip (and list) models with more parameters")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one model, its row as JSON on stdout
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.one:
        r = sweep_model(args.one, size=args.size)
        print(json.dumps({"steps": r.steps, "facts": r.facts, "seconds": r.seconds}, default=str))
        return
    specs = []
    if args.only in (None, "torchvision"):
        specs += [f"torchvision:{n}" for n in torchvision_models()][:args.limit]
    if args.only in (None, "timm"):
        specs += [f"timm:{n}" for n in TIMM_MODELS][:args.limit]
    rows, done, skipped = [], [], []
    previous = {}
    if args.resume and os.path.exists(args.json):  # a killed sweep continues where it stopped
        previous = {(d["spec"], d["size"]): d for d in json.load(open(args.json))}
    for spec in specs:
        name = spec.split(":", 1)[1]
        if spec.startswith("torchvision:") and name.startswith(NOT_CNN):
            skipped.append(f"{spec} (attention, not a CNN)")
            continue
        try:
            n_params = _params(spec)
        except Exception:
            n_params = 0
        if n_params > args.max_params:
            skipped.append(f"{spec} ({n_params / 1e6:.0f}M parameters, over --max-params)")
            continue
        size = SIZES.get(spec, SIZES.get(name, 224 if name.startswith("vgg") else args.size))
        if (spec, size) in previous and all(v == "ok" for v in previous[(spec, size)]["steps"].values()):
            d = previous[(spec, size)]
            r = SweepRow(spec, size, d["steps"], d["facts"], d["seconds"])
        else:
            r = _isolated(spec, size, args.threads, args.timeout)
        done.append({"spec": spec, "size": size, "steps": r.steps, "facts": r.facts, "seconds": r.seconds})
        _save(args.json, done)
        cells = [r.steps.get(s, "-") for s in STEPS]
        print(f"{spec:40s} {r.seconds:6.1f}s " + " | ".join(c if c == "ok" else "FAIL" for c in cells), flush=True)
        rows.append(r)
    built = [r for r in rows if "build" not in r.steps]
    counts = {s: sum(r.steps.get(s) == "ok" for r in built) for s in STEPS}
    passed = sum(r.passed for r in built)
    table = []
    for r in rows:
        if "build" in r.steps:
            table.append([r.spec, r.size, "not built: " + r.steps["build"][:100], "", "", "", ""])
            continue
        ratio = r.facts.get("macs_ratio")
        table.append([r.spec, r.size] + ["ok" if r.steps.get(s) == "ok" else r.steps.get(s, "-")[:160] for s in STEPS]
                     + [f"{ratio:.3f}" if ratio is not None else "-"])
    summary = (f"{len(built)} models built ({len(rows) - len(built)} not built by this torch/timm); all four steps "
               f"pass on {passed}/{len(built)} ({100 * passed / max(len(built), 1):.1f}%). Per step: "
               + ", ".join(f"{s} {counts[s]}/{len(built)}" for s in STEPS) + ".")
    body = (summary + "\n\nSteps (slimkit.testing.sweep): profile = MACs equal fvcore's conv/linear/matmul count "
            "within 0.5%; prune = `prune(criterion='l1', target_macs=0.5)` reaches 0.5x and equals the zeroed copy "
            "(float64, random BN statistics, max relative diff 1e-6); quantize = FX int8 with 2 random calibration "
            "batches runs and its logits are within relative L2 0.5 of float; export = ONNX of the pruned model "
            "verifies in ONNX Runtime. Random weights, 10 classes, batch 1 counts.\n\n"
            + markdown_table(["model", "input", *STEPS, "MACs after prune"], table)
            + ("\n\nNot swept: " + ", ".join(skipped) + "." if skipped else ""))
    record("sweep", "Architecture sweep: torchvision and timm CNNs through profile, prune, quantize, export", body)


if __name__ == "__main__":
    main()
