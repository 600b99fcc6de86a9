"""Deployment runtimes: float, pruned, int8, pruned + int8 resnet20/56 in eager, TorchScript, inductor, ORT, OpenVINO.

For each model family the adapted baseline (runs/baselines/NAME.safetensors), the best pruned row of
docs/prune.md (the 20-epoch benchmark's saved artifact), its int8 version and the baseline's int8
version (FX static int8, observer chosen on the validation split) are exported with
``slimkit.export`` and verified; then, per thread count and batch size, every runtime's models are
timed in interleaved rounds together with float PyTorch eager, so each speed-up is the median of
per-round ratios both against the float model in the same runtime and against float eager (what
the user starts from). Accuracy: every exported model on the 10,000 CIFAR-10 (JPEG) test images,
in its runtime. Side by side in the same run: ONNX Runtime's own quantize_static on the float
export, NNCF's nncf.quantize + OpenVINO, torchao's PT2E (X86 inductor quantizer) and stock FX int8
(= the int8 model in eager), on the same calibration images.

    python benchmarks/export.py --models resnet20,resnet56 --threads 1,2 --batch-sizes 1,64
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CIFAR, ROOT, markdown_table, record  # noqa: E402

import slimkit  # noqa: E402
from slimkit.bench import build_runner, fixed_threads, machine_peak, time_interleaved  # noqa: E402
from slimkit.bench.runners import Runner  # noqa: E402
from slimkit.data import load  # noqa: E402
from slimkit.export import ExportConfig, export, open_exported  # noqa: E402
from slimkit.profile import profile  # noqa: E402
from slimkit.quant import QuantConfig, calibration_loader, quantize  # noqa: E402
from slimkit.train import evaluate  # noqa: E402

PRUNED = {"resnet56": "runs/prune-bench-20ep/resnet56-blocks:kd.safetensors",
          "resnet20": "runs/prune-bench-20ep/resnet20-group_l1:untied:depth78:lut:kd@resnet56.safetensors"}
RUNTIMES = ("eager", "torchscript", "compile", "onnxruntime", "openvino")
VARIANTS = ("float", "pruned", "int8", "pruned+int8")
INPUT = (3, 32, 32)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class SessionModule(nn.Module):
    """An exported file's runtime session as a module, so slimkit's evaluate() measures its accuracy."""

    def __init__(self, run):
        super().__init__()
        self._run = run

    def forward(self, x):
        return torch.from_numpy(np.asarray(self._run(x.numpy())))


def pick_observer(model, data, calib) -> tuple[str, nn.Module]:
    """The observer with the best validation top-1 (the quantization benchmark's rule)."""
    best = None
    for obs in ("minmax", "ema", "entropy"):
        q = quantize(model, calib, QuantConfig(observer=obs))
        val = evaluate(q, data.loader("val", 500))["top1"]
        if best is None or val > best[0]:
            best = (val, obs, q)
    return best[1], best[2]


def ort_quantize_static(model, calib, path) -> str:
    from slimkit.quant.onnx import export_onnx_qdq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_onnx_qdq(model, calib, path, method="minmax", per_channel=True)


def nncf_quantize(float_onnx: str, calib):
    """NNCF's post-training quantization of the float graph (its OpenVINO flow), on our calibration images."""
    import nncf
    import openvino as ov

    ov_model = ov.Core().read_model(float_onnx)
    dataset = nncf.Dataset([b[0].numpy() for b in calib])
    return nncf.quantize(ov_model, dataset, subset_size=sum(len(b[0]) for b in calib))


def openvino_run(ov_model, threads: int):
    import openvino as ov

    from slimkit.export.runtime import ov_config

    request = ov.Core().compile_model(ov_model, "CPU", ov_config(threads)).create_infer_request()
    return lambda x: request.infer([x], share_inputs=True)[0].copy()


def build_family(name: str, data, calib, out: str, args) -> dict:
    """The four variants of one model family, their files and accuracies, and the peers' int8 models."""
    fam: dict = {"name": name, "models": {}, "files": {}, "acc": {}, "peers": {}}
    base = slimkit.load(os.path.join(ROOT, "runs", "baselines", f"{name}.safetensors")).eval()
    pruned_path = os.path.join(ROOT, args.pruned.get(name, PRUNED[name]))
    pruned = slimkit.load(pruned_path).eval()
    obs_base, q_base = pick_observer(base, data, calib)
    obs_pruned, q_pruned = pick_observer(pruned, data, calib)
    fam["observers"] = {"int8": obs_base, "pruned+int8": obs_pruned}
    fam["models"] = {"float": base, "pruned": pruned, "int8": q_base, "pruned+int8": q_pruned}
    stages = [f"{r.get('stage')}" + (f" {r['params']['epochs']} epochs" if "epochs" in (r.get("params") or {}) else "")
              for r in getattr(pruned, "slimkit_history", [])]
    fam["pruned_source"] = os.path.relpath(pruned_path, ROOT)
    fam["pruned_history"] = ", ".join(stages) or "no history"
    test = data.loader("test", 500)
    fam["test_n"] = len(data.test)
    for v, m in fam["models"].items():
        prof = profile(m, torch.zeros(1, *INPUT))
        fam.setdefault("macs", {})[v] = prof.macs
        fam["acc"].setdefault(v, {})["eager"] = evaluate(m, test)["top1"]
        for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".pt")):
            path = os.path.join(out, f"{name}-{v.replace('+', '_')}{suffix}")
            runtimes = ("onnxruntime", "openvino") if fmt == "onnx" else ("torchscript",)
            r = export(m, path, ExportConfig(format=fmt, runtimes=runtimes), data=data.loader("test", 64))
            fam["files"][(v, fmt)] = {"path": path, "bytes": r.bytes, "float_nodes": r.float_nodes,
                                      "checks": [c.to_dict() for c in r.checks]}
        for rt, fmt in (("onnxruntime", "onnx"), ("openvino", "onnx"), ("torchscript", "torchscript")):
            session = open_exported(fam["files"][(v, fmt)]["path"], rt, threads=2)
            fam["acc"][v][rt] = evaluate(SessionModule(session.run), test)["top1"]
        compiled = torch.compile(copy.deepcopy(m)) if "int8" not in v else None
        if compiled is not None:
            fam["acc"][v]["compile"] = evaluate(compiled, test)["top1"]
        log(f"{name} {v}: MACs {prof.macs:,}, accuracy {fam['acc'][v]}")
    # peers, on the same calibration images
    for v, m in (("int8", base), ("pruned+int8", pruned)):
        qdq = ort_quantize_static(m, calib, os.path.join(out, f"{name}-{v.replace('+', '_')}-ort-qs.onnx"))
        fam["peers"][(v, "ORT quantize_static")] = qdq
        session = open_exported(qdq, "onnxruntime", threads=2)
        fam["acc"].setdefault(f"{v} (ORT quantize_static)", {})["onnxruntime"] = evaluate(
            SessionModule(session.run), test)["top1"]
        float_onnx = fam["files"][("float" if v == "int8" else "pruned", "onnx")]["path"]
        fam["peers"][(v, "NNCF + OpenVINO")] = quantized = nncf_quantize(float_onnx, calib)
        fam["acc"].setdefault(f"{v} (NNCF + OpenVINO)", {})["openvino"] = evaluate(
            SessionModule(openvino_run(quantized, 2)), test)["top1"]
        if not args.no_pt2e:
            from slimkit.quant.pt2e import quantize_pt2e

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p2 = quantize_pt2e(m, calib)
            fam["peers"][(v, "PT2E + inductor")] = p2
            fam["acc"].setdefault(f"{v} (PT2E + inductor)", {})["compile"] = evaluate(p2, test)["top1"]
        log(f"{name} {v} peers: " + ", ".join(f"{k}: {a}" for k, a in fam["acc"].items() if "(" in k and v in k))
    return fam


def runners_for(fam: dict, runtime: str, x: torch.Tensor, threads: int) -> dict[str, Runner]:
    """The family's four variants in ``runtime`` (plus that runtime's peer int8 models)."""
    out = {}
    for v in VARIANTS:
        m = fam["models"][v]
        if runtime == "compile" and "int8" in v:
            continue  # inductor does not lower the FX int8 graph; the PT2E peer is inductor's int8
        out[v] = build_runner(m, runtime, x, threads)
    for (v, peer), thing in fam["peers"].items():
        if runtime == "onnxruntime" and peer == "ORT quantize_static":
            s = open_exported(thing, "onnxruntime", threads)
            feed = x.numpy()
            out[f"{v} (ORT quantize_static)"] = Runner(runtime, lambda s=s, f=feed: s.run(f), s)
        if runtime == "openvino" and peer == "NNCF + OpenVINO":
            run = openvino_run(thing, threads)
            feed = x.numpy()
            out[f"{v} (NNCF + OpenVINO)"] = Runner(runtime, lambda r=run, f=feed: r(f), run)
        if runtime == "compile" and peer == "PT2E + inductor":
            out[f"{v} (PT2E + inductor)"] = Runner(runtime, lambda m=thing: m(x), thing)
    return out


def time_family(fam: dict, threads: int, bs: int, args) -> list[dict]:
    """Every runtime's runners interleaved with float eager: per-round ratios vs float-same-runtime and vs eager."""
    x = torch.randn(bs, *INPUT, generator=torch.Generator().manual_seed(0))
    rows = []
    with fixed_threads(threads):
        reference = build_runner(fam["models"]["float"], "eager", x, threads)
        for runtime in args.runtimes:
            try:
                group = runners_for(fam, runtime, x, threads)
            except Exception as e:  # a runtime that cannot build is reported, the others still run
                log(f"{fam['name']} {runtime} threads {threads} bs {bs}: cannot build: {type(e).__name__}: {e}")
                continue
            names = ["float eager (reference)"] + list(group)
            samples = time_interleaved([reference] + list(group.values()), repeats=args.repeats,
                                       min_time_s=args.min_time, min_sample_s=2e-3)
            ref = samples[0]
            same = samples[names.index("float")] if "float" in group else None
            for label, s in zip(names[1:], samples[1:]):
                vs_eager = statistics.median(r / v for r, v in zip(ref, s))
                vs_same = statistics.median(f / v for f, v in zip(same, s)) if same is not None else None
                rows.append({"model": fam["name"], "runtime": runtime, "variant": label, "threads": threads,
                             "batch": bs, "median_ms": 1e3 * statistics.median(s), "vs_eager": vs_eager,
                             "vs_float_same_runtime": vs_same})
            log(f"{fam['name']} threads {threads} bs {bs} {runtime}: " + ", ".join(
                f"{r['variant']} {r['median_ms']:.3f} ms x{r['vs_eager']:.2f}" for r in rows if r["runtime"] == runtime
                and r["threads"] == threads and r["batch"] == bs and r["model"] == fam["name"]))
            del group
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--runtimes", default=",".join(RUNTIMES))
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds per runtime group")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of rounds per runtime group at least")
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--pruned", default="", help="MODEL=PATH,... pruned artifacts (default: the 20-epoch rows)")
    p.add_argument("--no-pt2e", action="store_true")
    p.add_argument("--limit", type=int, help="class-balanced subset per split (smoke runs only)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "export-bench"))
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    args.runtimes = [r for r in args.runtimes.split(",") if r]
    args.pruned = dict(kv.split("=", 1) for kv in args.pruned.split(",") if kv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(2)
    t0 = time.time()
    data = load(f"cifar10:{CIFAR}", seed=0, limit=args.limit)
    calib = list(calibration_loader(data, args.calib, 64))
    families = []
    for name in args.models.split(","):
        fam = build_family(name, data, calib, args.out, args)
        fam["calib"] = calib
        families.append(fam)
    thread_counts = [int(t) for t in args.threads.split(",")]
    peaks = {t: machine_peak(t) for t in thread_counts}
    rows = []
    for t in thread_counts:
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            for fam in families:
                rows += time_family(fam, t, bs, args)
    summary = report(families, rows, peaks, args, time.time() - t0)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"rows": rows, "acc": {fam["name"]: fam["acc"] for fam in families}}, f, indent=1, default=str)
    if not args.no_record:
        record("export", "Deployment runtimes: float, pruned, int8 and pruned + int8 (CIFAR-10 JPEG)", summary)
    else:
        print(summary)


def _acc(fam: dict, variant: str, runtime: str) -> str:
    a = fam["acc"].get(variant, {}).get(runtime)
    return f"{100 * a:.2f}" if a is not None else "-"


def report(families, rows, peaks, args, seconds) -> str:
    body = (f"Models: the adapted baselines, a pruned model of each (named below with its fine-tune: by default "
            f"the best pruned rows of docs/prune.md, `--pruned` names others), and their FX static int8 versions "
            f"({args.calib} class-balanced train images, observer chosen on the validation split among "
            f"minmax/ema/entropy). Every model exported with `slimkit.export` (ONNX opset 17, dynamic batch; int8 "
            f"as QDQ with the model's own scales) and verified in ONNX Runtime, OpenVINO and "
            f"TorchScript on random inputs and 4 test batches. Latency: median per-call time over interleaved rounds "
            f"(each round times float PyTorch eager and every model of one runtime, in random order; at least "
            f"{args.repeats} rounds and {args.min_time:g} s); speed-ups are medians of per-round ratios. "
            f"`compile` = torch.compile (inductor) float; its int8 is the PT2E row. OpenVINO runs with "
            f"INFERENCE_PRECISION_HINT=f32 (its bf16 default on this CPU changes float outputs by ~1%). "
            f"Whole run: {seconds / 60:.0f} min.\n\n")
    for fam in families:
        name = fam["name"]
        body += (f"### {name}\n\nPruned model: `{fam['pruned_source']}` ({fam['pruned_history']}). "
                 f"Observers: {fam['observers']}.\n\n")
        acc_rows = []
        for v in list(VARIANTS) + [k for k in fam["acc"] if "(" in k]:
            macs = fam.get("macs", {}).get(v.split(" (")[0])
            acc_rows.append([v, f"{macs / 1e6:.1f} M" if macs else "-"] +
                            [_acc(fam, v, rt) for rt in ("eager", "torchscript", "compile", "onnxruntime", "openvino")])
        body += f"Top-1 % on the {fam['test_n']:,} test images, in each runtime:\n\n"
        body += markdown_table(["model", "MACs", "eager", "torchscript", "compile", "onnxruntime", "openvino"],
                               acc_rows) + "\n\n"
        files = [[v, fmt, f"{f['bytes']:,}", ", ".join(f"{c['runtime']} {c['inputs']} {c['max_abs_diff']:.2g}"
                                                     for c in f["checks"]),
                  "; ".join(f"{rt}: {len(n)}" for rt, n in f["float_nodes"].items())]
                 for (v, fmt), f in fam["files"].items()]
        body += "Exported files, verification (max |diff| vs PyTorch) and conv/linear nodes left in float:\n\n"
        body += markdown_table(["model", "format", "bytes", "verification", "float nodes"], files) + "\n\n"
        for t in sorted({r["threads"] for r in rows}):
            peak = peaks[t]
            sel = [r for r in rows if r["model"] == name and r["threads"] == t]
            table = []
            for r in sel:
                v = r["variant"].split(" (")[0]
                macs = fam["macs"].get(v)
                gops = 2 * macs * r["batch"] / (r["median_ms"] / 1e3) / 1e9 if macs else None
                int8 = "int8" in r["variant"]
                roof = (peak.int8_gops if int8 and peak.int8_gops else peak.fp32_best_gflops)
                table.append([r["runtime"], r["variant"], r["batch"], f"{r['median_ms']:.3f}",
                              f"{r['vs_float_same_runtime']:.2f}x" if r["vs_float_same_runtime"] else "-",
                              f"{r['vs_eager']:.2f}x", f"{100 * gops / roof:.1f}%" if gops else "-"])
            body += (f"Threads {t} (this machine's matmul roof: fp32 {peak.fp32_best_gflops:.0f} GFLOP/s, int8 "
                     f"{peak.int8_gops:.0f} GOP/s" if peak.int8_gops else
                     f"Threads {t} (fp32 roof {peak.fp32_best_gflops:.0f} GFLOP/s; int8: {peak.int8_note}")
            body += "):\n\n" + markdown_table(["runtime", "model", "batch", "median ms", "x vs float same runtime",
                                                "x vs float eager", "% of roof"], table) + "\n\n"
    body += goals(families, rows)
    return body


def goals(families, rows) -> str:
    out = ["Goals (resnet56; accuracy vs the adapted baseline, 89.14):"]
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["variant"], r["runtime"], r["threads"]), {})[r["batch"]] = r
    for fam in families:
        if fam["name"] != "resnet56":
            continue
        base_acc = fam["acc"]["float"]["eager"]
        for variant, need_eager, need_same, max_drop in (("pruned+int8", (20, 6), (2.5, 3), 0.5),
                                                         ("int8", None, (1.8, 1.8), 0.3)):
            best = None
            for (m, v, rt, t), per in by.items():
                if m != fam["name"] or v != variant or 1 not in per or 64 not in per:
                    continue
                acc = fam["acc"][variant].get(rt)
                e = (per[1]["vs_eager"], per[64]["vs_eager"])
                s = (per[1]["vs_float_same_runtime"] or 0, per[64]["vs_float_same_runtime"] or 0)
                ok_acc = acc is not None and base_acc - acc <= max_drop / 100
                ok = ok_acc and (need_eager is None or (e[0] >= need_eager[0] and e[1] >= need_eager[1])) and \
                    s[0] >= need_same[0] and s[1] >= need_same[1]
                key = (ok, min(e) if need_eager else min(s))
                if best is None or key > best[0]:
                    best = (key, rt, t, e, s, acc)
            if best is None:
                out.append(f"- {variant}: not measured")
                continue
            (ok, _), rt, t, e, s, acc = best
            drop = 100 * (base_acc - acc) if acc is not None else float("nan")
            want = (f">= {need_eager[0]}x / {need_eager[1]}x vs float eager and " if need_eager else "") + \
                f">= {need_same[0]}x / {need_same[1]}x vs float in the same runtime, within {max_drop} points"
            out.append(f"- {variant} ({want}): best {rt}, {t} thread(s): {e[0]:.1f}x / {e[1]:.1f}x vs eager, "
                       f"{s[0]:.2f}x / {s[1]:.2f}x vs float {rt}, top-1 {100 * acc:.2f} ({-drop:+.2f}): "
                       f"{'met' if ok else 'NOT met'}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
