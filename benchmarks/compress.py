"""The one command, measured: ``slimkit compress MODEL --target T --runtime onnxruntime --max-drop 0.5`` on CIFAR-10.

Runs exactly the command a user runs (a subprocess, no other flag unless ``--time-budget`` is given
here), on the adapted baselines of ``benchmarks/baselines.py`` (``runs/baselines/NAME.safetensors``),
and records per model and target: the plan it chose, the wall time on this machine, accuracy on the
10,000 test images before/after, the measured speed-up per runtime and batch size (interleaved
against the original, from its report.json), the bytes on disk, and whether the goal of issue 23 was
met. Each (model, target) is its own section of docs/benchmarks.md, so runs of different lengths do not
overwrite each other.

    python benchmarks/compress.py --models resnet20 --targets latency=0.5
    python benchmarks/compress.py --models resnet56 --targets latency=0.5,size=0.05 --time-budget 8h
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CIFAR, ROOT, markdown_table, record  # noqa: E402

# issue 23's goals against the float model in the same runtime: (batch 1, batch 64) speed-up, points, size ratio
GOALS = {"resnet56": {"latency": (3.0, 2.0), "size": 1 / 20}, "resnet20": {"latency": (2.0, 1.7), "size": 1 / 20}}
MAX_DROP = 0.5
# the hand-tuned rows of docs/prune.md this is read next to (their own fine-tune budgets; see that page)
HAND_TUNED = {"resnet20": "docs/prune.md: the hand-tuned resnet20 recipe (blocks, latency table, teacher, chosen "
                          "speed-up) that met the pruning goal",
              "resnet56": "docs/prune.md: 14 of 27 blocks removed measured 3.2x at batch 1 and 1.5x at batch 64 in "
                          "ONNX Runtime before any fine-tune"}


def run(model: str, target: str, out: str, time_budget: str | None, threads: int) -> dict:
    artifact = os.path.join(ROOT, "runs", "baselines", f"{model}.safetensors")
    if not os.path.exists(artifact):
        sys.exit(f"{artifact} is missing: run benchmarks/baselines.py --models {model} first")
    cmd = [os.path.join(os.path.dirname(sys.executable), "slimkit"), "compress", artifact, "--data",
           f"cifar10:{CIFAR}", "--target", target, "--runtime", "onnxruntime", "--max-drop", str(MAX_DROP),
           "--out", out, "--json"]
    if time_budget:
        cmd += ["--time-budget", time_budget]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.time() - t0
    with open(os.path.join(out, "compress.log"), "w") as f:
        f.write(r.stderr)
    if not os.path.exists(os.path.join(out, "report.json")):
        sys.exit(f"compress wrote no report (status {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    report = json.load(open(os.path.join(out, "report.json")))
    report["wall_seconds"] = seconds
    report["command"] = " ".join(cmd[1:]).replace(ROOT + "/", "")
    report["status"] = r.returncode
    return report


def rows_of(model: str, target: str, report: dict) -> tuple[list, str]:
    b, a, v = report["cards"]["before"], report["cards"]["after"], report["verdict"]
    kind = v["kind"]
    drop = v["top1_drop_points"]
    lat = a.get("latency", {})

    def speed(rt: str, bs: str) -> str:
        cell = lat.get(rt, {}).get(bs)
        return f"x{cell['speedup']:.2f}" if cell else "-"

    row = [model, target, " + ".join(report["plan"]["families"]), f"{report['wall_seconds'] / 60:.0f}",
           f"{100 * b['test_top1']:.2f}", f"{100 * a['test_top1']:.2f}", f"{-drop:+.2f}",
           speed("onnxruntime", "1"), speed("onnxruntime", "64"), speed("eager", "1"), speed("eager", "64"),
           f"{a['macs'] / b['macs']:.3f}", f"{a['bytes']:,} ({b['bytes'] / a['bytes']:.1f}x smaller)",
           "yes" if v["met"] else "no"]
    goal = GOALS.get(model, {})
    if kind == "latency" and "latency" in goal:
        g1, g64 = goal["latency"]
        s1, s64 = (lat.get("onnxruntime", {}).get(k, {}).get("speedup", 0) for k in ("1", "64"))
        ok = s1 >= g1 and s64 >= g64 and drop <= MAX_DROP
        note = (f"Goal (issue 23): at least x{g1:g} at batch 1 and x{g64:g} at batch 64 in ONNX Runtime against the "
                f"float model there, at no more than {MAX_DROP} points lost: **{'met' if ok else 'not met'}** "
                f"(x{s1:.2f}, x{s64:.2f}, {-drop:+.2f} points).")
    elif kind == "size" and "size" in goal:
        ratio = a["bytes"] / b["bytes"]
        ok = ratio <= goal["size"] and drop <= MAX_DROP
        note = (f"Goal (issue 23): a file at least {1 / goal['size']:.0f}x smaller at no more than {MAX_DROP} points "
                f"lost: **{'met' if ok else 'not met'}** ({1 / ratio:.1f}x, {-drop:+.2f} points).")
    else:
        note = ""
    return row, note


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20")
    p.add_argument("--targets", default="latency=0.5")
    p.add_argument("--time-budget", help="passed to compress (default: its own, 2h)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for training (timing uses 1)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "compress"))
    args = p.parse_args()
    headers = ["model", "target", "plan", "wall min", "top-1 before", "top-1 after", "delta (pts)", "ORT bs1",
               "ORT bs64", "eager bs1", "eager bs64", "MACs ratio", "bytes on disk", "target met"]
    for model in args.models.split(","):
        for target in args.targets.split(","):
            out = os.path.join(args.out, f"{model}-{target.replace('=', '')}")
            report = run(model, target, out, args.time_budget, args.threads)
            row, note = rows_of(model, target, report)
            plan = report["plan"]
            body = (f"Exact command: `slimkit {report['command']}` (exit status {report['status']}).\n\n"
                    f"Plan it chose: {' -> '.join(plan['steps'])}; "
                    + "; ".join(plan["why"]) + ".\n\n"
                    + markdown_table(headers, [row])
                    + f"\n\nVerdict: {report['verdict']['message']}\n\n{note}\n\n"
                    f"Speed-ups are against the float original in the same runtime, timed interleaved (median of "
                    f"pairs, 1 runtime thread). Accuracy: CIFAR-10 (JPEG), 10,000 test images. Read next to "
                    f"{HAND_TUNED.get(model, 'docs/prune.md')}.\n")
            search = next((st for st in report["stages"] if st["name"] == "search"), {})
            rounds = search.get("config", {}).get("rounds") or []
            if rounds:
                body += "\nSearch rounds (the searched model timed as delivered, before the fine-tune): " + "; ".join(
                    f"{r['folder']} at {r['fraction']:.3f} of the float latency, {r['trials']} trials, proxy "
                    f"{r['proxy']:.4f}, float {r.get('float_ratio') or 0:.3f}x, int8 {r.get('int8_ratio') or 0:.3f}x "
                    f"-> delivers {r.get('delivered') or 0:.3f}x ({r.get('delivered_as')})" for r in rounds) + "\n"
            if report.get("warnings"):
                body += "\nWarnings in its report: " + "; ".join(report["warnings"]) + "\n"
            record(f"compress-{model}-{target.split('=')[0]}", f"slimkit compress {model} --target {target}", body)


if __name__ == "__main__":
    main()
