"""One command from a trained model to a smaller, faster, verified one: ``slimkit compress MODEL --target ...``.

::

    from slimkit.compress import compress, CompressConfig
    r = compress(model, "cifar10:PATH", CompressConfig(target="latency=0.5", runtime="onnxruntime"), "runs/c")
    r["verdict"]          # met or not, and how close
    # runs/c: model.safetensors (the artifact), model.onnx (exported, verified), report.json, report.html

No recipe: the job profiles the model, plans which families to use for the target and runtime
(:mod:`~slimkit.compress.plan`), runs them (:mod:`~slimkit.compress.job`: the search, the KD
fine-tune, int8 where the runtime gains, or Deep Compression for a size target), exports for the
runtime with verification, measures the result against the original interleaved
(:mod:`~slimkit.compress.measure`) and writes ``report.json`` and a self-contained
``report.html`` (:mod:`~slimkit.compress.html`). A killed run started again resumes where it
stopped. When the target is not met within ``max_drop`` the best model reached and the report are
still written, and :class:`~slimkit.errors.SlimkitError` says how close it got.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

from ..errors import SlimkitError
from .config import TARGETS, CompressConfig, parse_target
from .html import SECTIONS, render, write_html

__all__ = ["SECTIONS", "TARGETS", "CompressConfig", "compress", "parse_target", "render", "write_html"]

def compress(model: nn.Module, data_spec: str, config: CompressConfig, out_dir: str, *, data=None,
             limit: int | None = None, threads: int = 1, log: Callable[[str], None] = print,
             progress: bool = True, check: bool = True) -> dict:
    """Compress ``model`` to ``config.target`` within ``config.max_drop`` points, verified and measured.

    Args:
        model: the trained float network (left untouched).
        data_spec: its dataset (``digits``, ``cifar10:PATH``, ``imagefolder:PATH``).
        config: the :class:`CompressConfig` (target, max drop, runtime, batch sizes, time budget, ...).
        out_dir: where the artifact, the exported model, ``report.json``, ``report.html`` and the job's state go.
        data: the dataset already loaded from ``data_spec`` (else it is loaded here).
        limit: a class-balanced subset of N per split (quick runs).
        threads: the runtime's threads while timing (training uses torch's setting).
        log: called with the plan and progress lines.
        progress: bars on a terminal (False: plain lines, as for ``--json``).
        check: raise when the target is not met (False: return the report, whose ``verdict`` says so).

    Returns:
        The report (also ``OUT/report.json``): plan, stages, the before/after model card, the verdict.

    Raises:
        SlimkitError: the target is not met within ``max_drop`` (after writing the report and the best model),
            a target out of reach, ``out_dir`` holding another job.

    Example (the search of Han et al.-style pruning under a measured budget, then KD, Hinton et al. 2015):
        >>> import tempfile, slimkit
        >>> from slimkit.data import load
        >>> data = load("digits", limit=200)
        >>> cfg = CompressConfig(target="macs=0.7", trials=3, finetune_epochs=1, max_drop=100, runtime="eager",
        ...                      batch_sizes=(8,))
        >>> r = compress(slimkit.create_model("digits_cnn"), "digits", cfg, tempfile.mkdtemp(), data=data, limit=200,
        ...              log=lambda s: None, progress=False)
        >>> r["verdict"]["reached"] <= 0.7
        True
    """
    from ..data import load as load_data
    from ..progress import Progress, reporting
    from ..search.engine import model_digest
    from ..train import check_input
    from . import job as steps
    from .plan import make_plan, plan_text
    from .search_step import step_search

    t_start = time.time()
    data = data if data is not None else load_data(data_spec, limit=limit, seed=config.seed)
    # a copy: the KD steps freeze their teacher (this model), and the caller's model is to be left untouched
    model = copy.deepcopy(model).cpu().eval().requires_grad_(True)
    check_input(model, next(iter(data.loader("test", 2)))[0], data.info.num_classes, f"dataset {data_spec}")
    os.makedirs(out_dir, exist_ok=True)
    state = steps.open_state(out_dir, model_digest(model), config, data_spec, limit)
    job = steps.Job(model=model, data=data, data_spec=data_spec, limit=limit, config=config, out=out_dir,
                    threads=threads, log=log, progress=progress, state=state)
    with reporting(log, bar=progress):  # calibration, latency tables, verification report here too
        if "plan" not in state:
            state["plan"] = make_plan(model, config, job.example, data, threads)
            job.save_state()
        plan = state["plan"]
        log(plan_text(plan))
        run = {"search": step_search, "decompose": steps.step_decompose, "choose": steps.step_choose,
               "finetune": steps.step_finetune, "quantize": steps.step_quantize,
               "sparsity": steps.step_sparsity, "sparsify": steps.step_sparsify, "share": steps.step_share,
               "pack": steps.step_pack, "export": _step_export, "measure": _step_measure}
        work = [s for s in plan["steps"] if s != "report"]
        bar = Progress(len(work), "compress steps", log, bar=progress, done=sum(job.done(s) for s in work), every=0)
        try:
            for name in work:
                if job.done(name):
                    continue
                t0 = time.time()
                job.log(f"compress: {name} ...")
                record = run[name](job, plan)
                job.finish(name, record, time.time() - t0)
                bar.update(note=name)
        finally:
            bar.close()
    report = _report(job, plan, time.time() - t_start)
    if check and not report["verdict"]["met"]:
        raise SlimkitError(report["verdict"]["message"])  # the CLI's one line; the report is written
    log(report["verdict"]["message"])
    return report


def _step_export(job, plan: dict) -> dict:
    """The result as ``OUT/model.safetensors`` and exported for the runtime, verified in it."""
    from ..artifact import save
    from ..search import EXPORT_FORMATS, export_verified

    model = job.saved(job.result_step())
    save(model, job.path("model.safetensors"), meta=getattr(model, "slimkit_meta", None))
    fmt = EXPORT_FORMATS.get(job.config.runtime)
    if fmt is None:
        return {"format": None,
                "note": f"{job.config.runtime} runs the PyTorch model itself: the artifact is what is deployed"}
    return export_verified(model, fmt, job.out, threads=job.threads, input_size=tuple(job.example.shape[1:]),
                           data=job.data, log=job.log)


def _step_measure(job, plan: dict) -> dict:
    """The model card before and after, measured: accuracy, counts, bytes on disk, latency per runtime."""
    from ..artifact import load
    from ..search.evaluate import file_bytes
    from .measure import accuracy, counts, latency, layers

    c = job.config
    final = load(job.path("model.safetensors")).eval()
    # the float model the result was made from: its counts and layers are the int8 model's too
    float_final = job.saved("share" if c.kind == "size" else "finetune")
    packed = job.path("model.slimpack")
    final_bytes = os.path.getsize(packed if c.kind == "size" else job.path("model.safetensors"))
    int8 = job.result_step() == "quantize"
    convs = [n for n, m in float_final.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    export = job.state["steps"]["export"]
    float_nodes = sorted({n for nodes in (export.get("float_nodes") or {}).values() for n in nodes})
    before = {**accuracy(job.model, job.data), **counts(job.model, job.example), "bytes": file_bytes(job.model),
              "int8_layers": 0, "float_layers": len([m for m in job.model.modules()
                                                      if isinstance(m, (nn.Conv2d, nn.Linear))])}
    after = {**accuracy(final, job.data), **counts(float_final, job.example), "bytes": final_bytes,
             "int8_layers": (len(convs) - len(float_nodes)) if int8 else 0,
             "float_layers": len(float_nodes) if int8 else len(convs)}
    runtimes = list(dict.fromkeys([c.runtime, "eager"]))
    after["latency"], warnings = latency(job.model, final, job.example, runtimes, c.batch_sizes, job.threads, job.log)
    if job.pruned():  # what the channel graph could not follow stayed whole: say so by layer
        import warnings as _warnings

        from ..prune import build_graph

        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")
            warnings += [f"left unpruned: {w}" for w in build_graph(job.model, job.example, (), True).warnings]
    share = job.state["steps"].get("share")
    bits = ({r["name"]: r["bits"] for r in share["layers"]} if share else {n: 8 if int8 else 32 for n in convs})
    rows = layers(job.model, float_final, job.example, bits)
    return {"before": before, "after": after, "warnings": warnings, "layers": rows, "float_nodes": float_nodes}


def _verdict(job, plan: dict, measured: dict) -> dict:
    c = job.config
    before, after = measured["before"], measured["after"]
    drop = 100 * (before["test_top1"] - after["test_top1"])
    if c.kind == "latency":
        per = after["latency"].get(c.runtime, {})
        if not per:
            reached, where = float("inf"), f"(not measured in {c.runtime})"
        else:
            worst = max(per, key=lambda b: per[b]["ratio"])
            reached, where = per[worst]["ratio"], f"latency in {c.runtime} at batch {worst}"
        what = f"{reached:.3f}x the original's {where}"
    elif c.kind == "size":
        reached = after["bytes"] / before["bytes"]
        what = f"{reached:.4f}x the original's bytes on disk ({after['bytes']:,} of {before['bytes']:,}; " \
               f"{1 / reached:.1f}x smaller)"
    else:
        reached = after["macs"] / before["macs"]
        what = f"{reached:.3f}x the original's MACs"
    met_target, met_drop = reached <= c.fraction, drop <= c.max_drop
    final = job.path("model.safetensors")
    if met_target and met_drop:
        message = f"{c.target} met: {what}, top-1 {before['test_top1']:.4f} -> {after['test_top1']:.4f} " \
                  f"({-drop:+.2f} points, within {c.max_drop:g})"
    else:
        missed = [] if met_target else [f"reached {what}"]
        missed += [] if met_drop else [f"lost {drop:.2f} points (more than --max-drop {c.max_drop:g})"]
        if met_target:
            missed.append(f"target {c.target} itself was reached: {what}")
        message = (f"compress: target {c.target} not met within --max-drop {c.max_drop:g}: " + "; ".join(missed)
                   + f"; the best model reached is kept in {final}, the report in "
                   f"{os.path.join(job.out, 'report.html')}")
    return {"met": met_target and met_drop, "met_target": met_target, "met_max_drop": met_drop, "reached": reached,
            "target": c.fraction, "kind": c.kind, "top1_drop_points": drop, "message": message}


def _points(job, plan: dict, measured: dict) -> list[dict]:
    """The plots' points: the original, each stage, the search's Pareto front, the result."""
    c = job.config
    before, after = measured["before"], measured["after"]
    lat = after["latency"].get(c.runtime) or after["latency"].get("eager") or {}
    first = next(iter(lat.values()), None)
    ms0 = first["original_ms"] if first else None
    ms1 = first["final_ms"] if first else None
    pts = [{"name": "original", "kind": "original", "top1": before["test_top1"], "macs": before["macs"],
            "params": before["params"], "latency_ms": ms0}]
    for name in plan["steps"]:
        rec = job.state["steps"].get(name, {})
        top1 = (rec.get("metrics") or {}).get("test_top1")
        if top1 is None or name in ("quantize", "export", "measure"):
            continue
        pts.append({"name": name, "kind": "stage", "top1": top1,
                    "macs": before["macs"] * rec.get("metrics", {}).get("macs_ratio", after["macs"] / before["macs"]),
                    "params": after["params"], "latency_ms": None})
    search = job.state["steps"].get("search", {})
    for row in search.get("pareto", []):
        lr = row.get("latency_ratio")
        pts.append({"name": f"trial {row['trial']}", "kind": "pareto", "top1": row["proxy"],
                    "macs": before["macs"] * (row.get("macs_ratio") or 1), "params": before["params"] * (
                        row.get("params_ratio") or 1), "latency_ms": ms0 * lr if (ms0 and lr) else None})
    pts.append({"name": "result", "kind": "result", "top1": after["test_top1"], "macs": after["macs"],
                "params": after["params"], "latency_ms": ms1})
    return pts


def _report(job, plan: dict, seconds: float) -> dict:
    from ..artifact import atomic_write_text

    measured = job.state["steps"]["measure"]
    verdict = _verdict(job, plan, measured)
    c = job.config
    warnings = [rec["warning"] for rec in job.state["steps"].values() if rec.get("warning")]
    warnings += measured.get("warnings", [])
    if measured.get("float_nodes") and job.state["steps"].get("quantize", {}).get("used"):
        warnings.append("layers kept in float by the runtime: " + ", ".join(measured["float_nodes"]))
    export = job.state["steps"].get("export", {})
    if export.get("format") and not export.get("passed"):
        warnings.append(f"export to {export['format']} did not verify: {export.get('error', 'outputs differ')}")
    if not verdict["met"]:
        warnings.append(verdict["message"])
    stages = [{"name": "original", "config": {"model": job.state["model"], "data": job.data_spec},
               "metrics": {"test_top1": measured["before"]["test_top1"]}, "seconds": None}]
    for name in plan["steps"]:
        rec = job.state["steps"].get(name)
        if rec is None or name == "measure":
            continue
        cfg = {k: rec[k] for k in ("chosen", "rounds", "note", "epochs", "used", "reason", "latency_ratio_vs_float",
                                   "format", "passed", "bytes") if k in rec}
        stages.append({"name": name, "config": cfg, "metrics": rec.get("metrics", {}), "seconds": rec.get("seconds")})
    files = {"artifact": job.path("model.safetensors")}
    if export.get("path"):
        files["exported"] = export["path"]
    if c.kind == "size":
        files["packed"] = job.path("model.slimpack")
    files.update(report_json=job.path("report.json"), report_html=job.path("report.html"))
    a, b = measured["after"], measured["before"]
    headline = [f"top-1 {100 * b['test_top1']:.2f}% -> {100 * a['test_top1']:.2f}% on {a['test_n']:,} test images; "
                f"{b['params']:,} -> {a['params']:,} parameters; {b['macs']:,} -> {a['macs']:,} MACs; "
                f"{b['bytes']:,} -> {a['bytes']:,} bytes on disk"]
    for rt, per in a["latency"].items():
        headline.append(f"{rt}: " + ", ".join(f"batch {bs} x{cell['speedup']:.2f} faster ({cell['original_ms']:.2f} -> "
                                              f"{cell['final_ms']:.2f} ms)" for bs, cell in per.items()))
    first_bs = c.batch_sizes[0]
    report = {"title": f"slimkit compress: {c.target} on {c.runtime}",
              "latency_caption": f"Accuracy vs latency measured at batch {first_bs} in {c.runtime} (the search's "
                                 "front: predicted from its latency table).",
              "subtitle": f"{job.data_spec} · {datetime.datetime.now().isoformat(timespec='minutes')} · "
                          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                          f"{job.threads} runtime thread(s)",
              "config": c.to_dict(), "plan": plan, "verdict": verdict, "headline": headline,
              "cards": {"before": b, "after": a}, "stages": stages, "points": _points(job, plan, measured),
              "layers": measured["layers"], "warnings": warnings, "files": files, "seconds": seconds,
              "footer": "Written by slimkit. Accuracy on the held-out test split; latency measured interleaved "
                        "against the original on this machine."}
    atomic_write_text(job.path("report.json"), json.dumps(report, indent=1, default=str))
    write_html(report, job.path("report.html"))
    job.log(f"report: {job.path('report.html')}")
    return report
