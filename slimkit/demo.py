"""``slimkit demo``: the whole loop on the embedded digits data, in about a minute on 2 cores.

Trains the small digits CNN, saves it as an artifact, runs a compression recipe on that
artifact through the same pipeline users run with ``slimkit compress``, and prints a
before/after table (accuracy, parameters, MACs, size on disk, latency measured interleaved).
The recipe prunes half the MACs with distillation as recovery, then quantizes to int8.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from .artifact import atomic_write_text, history, save
from .data import load
from .models import create_model
from .pipeline import run_recipe
from .train import evaluate, fit, seed_everything

DEMO_RECIPE = {
    "data": "digits",
    "seed": 0,
    "batch_size": 64,
    "stages": [
        # half the MACs by L1-norm filter pruning, recovered by distillation from the unpruned model
        {"method": "prune", "criterion": "l1", "target_macs": 0.5, "round_to": 8,
         "finetune": {"distill": "kd", "epochs": 5, "lr": 0.02}},
        # then int8 weights and activations, running on int8 kernels
        {"method": "quantize", "calib": 256, "observer": "entropy"},
    ],
}


def run_demo(out_dir: str = "runs/demo", *, epochs: int = 30, log: Callable[[str], None] = print,
             progress: bool = True) -> dict:
    """Train, compress and report on digits; returns the report also written to ``out_dir``."""
    data = load("digits", seed=0)
    seed_everything(0)
    model = create_model("digits_cnn", num_classes=data.info.num_classes)
    log(f"training digits_cnn on digits ({len(data.train)} train / {len(data.val)} val / {len(data.test)} test)")
    fit(model, data.loader("train", 64, seed=0), epochs=epochs, lr=0.05, weight_decay=5e-4, seed=0,
        checkpoint_dir=os.path.join(out_dir, "train"), progress=False)
    test = evaluate(model, data.loader("test", 256))
    history(model).append({"stage": "train", "params": {"epochs": epochs, "lr": 0.05},
                           "metrics": {"test_top1": test["top1"]}})
    baseline = save(model, os.path.join(out_dir, "baseline.safetensors"),
                    meta={"dataset": "digits", "input_size": list(data.info.input_size)})
    log(f"trained: test top1 {test['top1']:.4f}; saved {baseline}")

    recipe = dict(DEMO_RECIPE, model=baseline)
    report = run_recipe(recipe, os.path.join(out_dir, "compressed"), progress=progress, log=log)
    before, after = report["steps"][0]["metrics"], report["steps"][-1]["metrics"]
    before["size_bytes"] = os.path.getsize(baseline)
    after["size_bytes"] = report["artifact_bytes"]
    from .artifact import load as load_artifact
    from .bench import compare

    # measured, not inferred from MACs: the two models timed interleaved at batch 1 and 256
    timing = compare(load_artifact(baseline), load_artifact(report["artifact"]), data.info.input_size,
                     batch_sizes=(1, 256), threads=1, modes=("eager",), repeats=15, min_time_s=0.3, roofline=False)
    for bs in (1, 256):
        before[f"latency_bs{bs}_ms"] = timing.results["eager"][bs]["a"]["median_ms"]
        after[f"latency_bs{bs}_ms"] = timing.results["eager"][bs]["b"]["median_ms"]
        after[f"speedup_bs{bs}"] = 1 / timing.ratio("eager", bs)
    rows = [("test top-1", "test_top1", "{:.4f}"), ("params", "params", "{:,}"), ("MACs", "macs", "{:,}"),
            ("size on disk (bytes)", "size_bytes", "{:,}"), ("latency bs1 (ms, 1 thread)", "latency_bs1_ms", "{:.3f}"),
            ("latency bs256 (ms, 1 thread)", "latency_bs256_ms", "{:.2f}")]
    width = max(len(r[0]) for r in rows)
    log(f"\n{'':{width}}  {'before':>12}  {'after':>12}")
    for label, key, fmt in rows:
        log(f"{label:{width}}  {fmt.format(before[key]):>12}  {fmt.format(after[key]):>12}")
    log(f"measured speedup (interleaved, median of pairs): x{after['speedup_bs1']:.2f} at batch 1, "
        f"x{after['speedup_bs256']:.2f} at batch 256")
    result = {"baseline": baseline, "artifact": report["artifact"], "before": before, "after": after,
              "stages": [s["stage"] for s in report["steps"][1:]]}
    atomic_write_text(os.path.join(out_dir, "demo.json"), json.dumps(result, indent=2))
    log(f"\nartifact: {report['artifact']}  report: {os.path.join(out_dir, 'demo.json')}")
    return result
