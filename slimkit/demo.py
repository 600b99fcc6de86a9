"""``slimkit demo``: the whole ``compress --target`` job on the embedded digits data, in about two minutes on 2 cores.

Trains the small digits CNN, saves it as an artifact, then runs the one-command job users run
(``slimkit compress MODEL --target latency=0.5``): it plans, searches channel keep ratios under a
latency budget measured in ONNX Runtime (eager PyTorch where ONNX Runtime is not installed),
fine-tunes with distillation from the original, keeps int8 where the runtime runs it faster,
exports and verifies, and ends by naming ``report.html``. The digits CNN is so small that batch 1
measures Python overhead, so the demo holds its budget at batch 64.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .artifact import history, save
from .compress import CompressConfig, compress
from .data import load
from .models import create_model
from .train import evaluate, fit, seed_everything

DEMO_TARGET = "latency=0.5"


def _runtime() -> str:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "eager"
    return "onnxruntime"


def run_demo(out_dir: str = "runs/demo", *, epochs: int = 30, time_budget: str = "90s",
             log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train digits_cnn, compress it to half its measured latency, return the report (``OUT/compressed``)."""
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
    log(f"\nslimkit compress {baseline} --data digits --target {DEMO_TARGET} --runtime {_runtime()} "
        f"--batch-sizes 64 --max-drop 1 --time-budget {time_budget} --out {os.path.join(out_dir, 'compressed')}")
    config = CompressConfig(target=DEMO_TARGET, runtime=_runtime(), batch_sizes=(64,), max_drop=1.0,
                            time_budget=time_budget)
    report = compress(model.eval(), "digits", config, os.path.join(out_dir, "compressed"), data=data, log=log,
                      progress=progress, check=False)
    before, after = report["cards"]["before"], report["cards"]["after"]
    rows = [("test top-1", "test_top1", "{:.4f}"), ("params", "params", "{:,}"), ("MACs", "macs", "{:,}"),
            ("size on disk (bytes)", "bytes", "{:,}")]
    width = max(len(r[0]) for r in rows)
    log(f"\n{'':{width}}  {'before':>12}  {'after':>12}")
    for label, key, fmt in rows:
        log(f"{label:{width}}  {fmt.format(before[key]):>12}  {fmt.format(after[key]):>12}")
    for rt, per in after["latency"].items():
        log(f"{rt}: " + ", ".join(f"batch {b} {c['original_ms']:.3f} -> {c['final_ms']:.3f} ms (x{c['speedup']:.2f})"
                                  for b, c in per.items()))
    log(f"\nreport: {report['files']['report_html']}")
    return report
