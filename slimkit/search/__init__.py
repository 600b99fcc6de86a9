"""Automatic compression-policy search under a budget measured on the target runtime (Optuna; docs/search.md).

:func:`search` finds per-layer channel keep ratios and residual blocks to remove that keep the most
accuracy under a latency budget measured in the runtime the model will run in (eager PyTorch,
TorchScript, ONNX Runtime, OpenVINO) at the stated batch sizes and threads, and/or MAC,
parameter and bytes-on-disk budgets:

* the space (:mod:`~slimkit.search.space`) comes from the model's dependency graph, fine (one ratio
  per channel group) or coarse (per stage) by its size;
* a trial's accuracy is EagleEye's proxy and its latency comes from a per-layer table measured on
  the runtime (:mod:`~slimkit.search.evaluate`), or is measured whole for a policy with int8
  layers; the finalists are measured whole (closed loop);
* Optuna runs the study (:mod:`~slimkit.search.study`): TPE with constraints by default, GP-based
  BO, NSGA-II or random; SQLite by default, PostgreSQL for workers on many machines, heartbeats
  and retries so a killed worker loses nothing (:mod:`~slimkit.search.worker`);
* the chosen policy is applied, fine-tuned with KD from the original (data-parallel under
  torchrun, :mod:`~slimkit.search.finetune`), quantized to int8 when the runtime gains from it
  (or layer by layer as the policy says, with ``space`` ``bits``), exported and verified, and
  saved with the policy and a summary of the study in its provenance; a sparse or shared-weight
  policy (``space`` ``sparsity``, ``share``, under a size budget) is retrained with its masks and
  codebooks held and also written as a packed file (``model.slimpack``), its bytes the result.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

from torch import nn

from ..errors import SlimkitError
from .config import SearchConfig, parse_duration
from .problems import PROBLEMS, PruningProblem, QuadraticProblem
from .space import Dimension, PruningSpace, policy_text
from .study import SAMPLERS

__all__ = ["EXPORT_FORMATS", "INT8_FASTER", "PROBLEMS", "SAMPLERS", "Dimension", "PruningProblem", "PruningSpace",
           "QuadraticProblem", "SearchConfig", "export_verified", "int8_if_faster", "parse_duration", "policy_text",
           "retrain_weights", "search"]

EXPORT_FORMATS = {"onnxruntime": "onnx", "openvino": "openvino", "torchscript": "torchscript"}


def search(model: nn.Module, data_spec: str, config: SearchConfig, out_dir: str, *, limit: int | None = None,
           input_size: tuple[int, ...] | None = None, model_name: str = "model", data=None, resume: bool = False,
           log: Callable[[str], None] = print) -> dict:
    """Search a compression policy for ``model`` under ``config``'s budget, then apply, fine-tune and ship it.

    Args:
        model: the trained network (left untouched).
        data_spec: the dataset (``digits``, ``cifar10:PATH``, ``imagefolder:PATH``); worker processes load
            it themselves, so it is a spec, not a loader.
        config: the :class:`SearchConfig` (budget, runtime, batch sizes, sampler, trials, workers, ...).
        out_dir: where the study (``study.db`` by default), the job, the table, the results, the plot and
            the final artifact go.
        limit: a class-balanced subset of N per split (quick runs).
        input_size: (C, H, W) of one input (default: the dataset's).
        model_name: names the default study.
        data: the dataset already loaded from ``data_spec`` (else it is loaded here).
        resume: continue the study in ``out_dir`` (the latency table and job there are reused).
        log: called with progress lines.

    Returns:
        The results (also ``OUT/results.json``): the study summary, the chosen policy with its predicted
        and measured cost, the finalists, the best policy per budget, the Pareto front and the final
        model's measurements.

    Raises:
        SlimkitError: a budget no policy of the space meets (naming what it reaches), an unknown runtime,
            a storage that does not connect (naming host and port), a study of another model under the
            same name, no trial meeting the measured budget.

    Example:
        >>> import tempfile, slimkit
        >>> m = slimkit.create_model("digits_resnet")
        >>> cfg = SearchConfig(target_macs=0.6, trials=3, warm_start=(), finetune_epochs=0, quantize="never")
        >>> r = search(m, "digits", cfg, tempfile.mkdtemp(), log=lambda s: None)
        >>> r["chosen"]["macs_ratio"] <= 0.6
        True
    """
    from ..data import load as load_data
    from .engine import JOB, TABLE, enqueue, prepare, run_workers, save_table, warm_starts
    from .study import open_storage, open_study, storage_url

    t_start = time.time()
    # the final fine-tune's KD teacher freezes the model it is given (its contract): that is this copy, so the
    # caller's model stays trainable and a second search in the same process can fine-tune again
    model = copy.deepcopy(model).eval()
    open_storage(storage_url(config.storage, out_dir))  # a storage that does not connect fails before any work
    data = data if data is not None else load_data(data_spec, limit=limit, seed=config.seed)
    input_size = tuple(input_size or data.info.input_size)
    from ..train import check_input

    check_input(model, next(iter(data.loader("test", 2)))[0], data.info.num_classes, f"dataset {data_spec}")
    job, problem = prepare(model, data, config, out_dir, data_spec=data_spec, limit=limit, input_size=input_size,
                           model_name=model_name, log=log)
    job_path = os.path.join(out_dir, JOB)
    sampler = SAMPLERS.get(config.sampler).make(config.seed)
    study = open_study(job["storage"], job["study"], job["fingerprint"], sampler, problem.directions)
    if not study.trials:
        enqueue(study, warm_starts(problem, model, log), log)
    elif not resume:
        log(f"study {job['study']} has {len(study.trials)} trials already: continuing it")
    seconds = config.seconds
    if seconds is not None:
        job["deadline"] = time.time() + seconds
        from ..artifact import atomic_write_text

        atomic_write_text(job_path, json.dumps(job, indent=1))
    t0 = time.time()
    run_workers(job_path, job, config.workers, problem, log)
    # a resumed study counts the time of every run (the cost per trial covers them all)
    search_seconds = float(study.user_attrs.get("search_seconds", 0.0)) + time.time() - t0
    study.set_user_attr("search_seconds", search_seconds)
    save_table(problem, os.path.join(out_dir, TABLE))
    results = finish(problem, study, job, model, out_dir, search_seconds=search_seconds, log=log)
    results["seconds_total"] = time.time() - t_start
    _write_results(results, out_dir)
    return results


def finish(problem: PruningProblem, study, job: dict, model: nn.Module, out_dir: str, *, search_seconds: float,
           log: Callable[[str], None]) -> dict:
    """Choose (closed loop), report (front, per budget, plot), then apply, fine-tune, quantize, export, save."""
    from optuna.trial import TrialState

    from .evaluate import measured_ratio
    from .results import choose, cost_key, pareto_front, per_budget, plot, redact, trial_rows

    c = problem.config
    rows = trial_rows(study)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    complete = states.count(TrialState.COMPLETE)
    summary = {"name": job["study"], "storage": redact(job["storage"]), "sampler": c.sampler,
               "complete": complete, "pruned": states.count(TrialState.PRUNED),
               "failed": states.count(TrialState.FAIL), "seconds": search_seconds,
               "seconds_per_trial": search_seconds / max(complete, 1),
               "trials_per_hour": 3600 * complete / max(search_seconds, 1e-9), "workers": c.workers,
               "dimensions": len(problem.dimensions)}
    measure = None
    if c.target_latency is not None:
        def measure(policy):
            return measured_ratio(model, problem.judged(policy), problem.example, c.runtime, c.batch_sizes,
                                  c.threads)
    chosen, finalists = choose(rows, measure, c.target_latency, c.finalists, log)
    key = cost_key(rows)
    budget = {"latency_ratio": c.target_latency, "size_ratio": c.target_size}.get(key) or (c.target_macs or
                                                                                          c.target_params or 1.0)
    front = pareto_front(rows)
    results = {"study": summary, "config": c.to_dict(), "cost_key": key, "chosen": chosen, "finalists": finalists,
               "per_budget": per_budget(rows, budget, key), "pareto": front,
               "warm_starts": [r for r in rows if r["warm_start"]]}
    results["plot"] = plot(rows, front, os.path.join(out_dir, "pareto.png"),
                           budget if key in ("latency_ratio", "size_ratio") else c.target_macs,
                           f"{job['study']}: {complete} trials")
    log(f"chosen trial {chosen['trial']}: proxy {chosen['proxy']:.4f}, {key} {chosen[key]:.3f}: "
        f"{policy_text(chosen['policy'])}")
    results["final"], results["export"], results["artifact"] = final_model(problem, job, model, chosen, summary,
                                                                           out_dir, log)
    return results


def final_model(problem: PruningProblem, job: dict, model: nn.Module, chosen: dict, summary: dict, out_dir: str,
                log: Callable[[str], None]) -> tuple[dict, dict | None, str]:
    """Apply the policy, re-estimate BN, fine-tune with KD, maybe quantize, measure, save and export."""
    from ..artifact import history, save
    from ..profile import profile
    from ..train import evaluate
    from .evaluate import file_bytes, recalibrate_bn

    c, data = problem.config, problem.data
    test = data.loader("test", 256)
    weighted = bool(problem.space.density_layers or problem.space.codebook_layers)
    final = _trainable(recalibrate_bn(problem.space.apply(chosen["policy"]), problem.calib))
    out = {"test_top1_original": evaluate(model, test)["top1"], "test_top1_applied": evaluate(final, test)["top1"]}
    if c.finetune_epochs:
        t0 = time.perf_counter()
        final = (retrain_weights(problem, model, job, chosen["policy"], out_dir, log) if weighted else
                 _finetune(final, model, job, out_dir, log))
        out["finetune_seconds"] = time.perf_counter() - t0
        out["test_top1_finetuned"] = evaluate(final, test)["top1"]
    out["test_top1"] = out.get("test_top1_finetuned", out["test_top1_applied"])
    out["top1_drop"] = out["test_top1_original"] - out["test_top1"]
    float_model, quantized = final, None
    if problem.space.bits:  # the policy says which layers run int8; calibrated as a whole-model int8 would be
        if problem.space.quantized(chosen["policy"]):
            from ..quant import calibration_loader

            # BN statistics are already fresh: re-estimated above, or learnt by the fine-tune
            quantized = problem.int8(final, chosen["policy"], calibration_loader(data, 512, 64, c.seed),
                                     recalibrate=False)
        out["int8"] = {"used": quantized is not None, "from": "policy",
                       "keep_float": problem.space.keep_float(chosen["policy"], final)}
        log("int8 from the policy: " + (f"{len(out['int8']['keep_float'])} layer(s) left in float"
                                        if quantized is not None else "every layer float"))
    elif weighted:  # int8 would re-quantize the shared values and add nothing to a packed file's codebooks
        out["int8"] = {"used": False, "reason": "a sparse or shared-weight policy ships as a packed file"}
    elif c.quantize != "never" and c.runtime != "compile":
        quantized, out["int8"] = _maybe_int8(problem, final, log)
    if quantized is not None:
        final = quantized
        out["test_top1"] = evaluate(final, test)["top1"]
        out["top1_drop"] = out["test_top1_original"] - out["test_top1"]
    p0, p1 = profile(model, problem.example), profile(float_model, problem.example)
    out.update({"macs_ratio": p1.macs / p0.macs, "params_ratio": p1.params / p0.params,
                "bytes": file_bytes(final), "bytes_original": file_bytes(model),
                "int8_kept": quantized is not None})
    out["latency"] = _measure(model, final, problem, c)
    out["meets_latency_budget"] = (None if c.target_latency is None else
                                   max(v["ratio"] for v in out["latency"].values()) <= c.target_latency)
    if c.max_drop is not None and out["top1_drop"] > c.max_drop:
        log(f"the final model loses {out['top1_drop'] * 100:.2f} points, more than --max-drop "
            f"{c.max_drop * 100:.2f}: more --finetune-epochs or a looser budget")
    out["meets_max_drop"] = None if c.max_drop is None else out["top1_drop"] <= c.max_drop
    history(final).append({"stage": "search", "params": c.to_dict(), "policy": chosen["policy"],
                           "study": {k: summary[k] for k in ("name", "sampler", "complete", "pruned", "failed",
                                                             "trials_per_hour", "dimensions")},
                           "metrics": {k: out[k] for k in ("test_top1", "macs_ratio", "params_ratio")}})
    meta = {"input_size": list(problem.example.shape[1:]), "dataset": job["data"], "classes": list(data.info.classes),
            "search": {"policy": chosen["policy"], "study": summary["name"]}}
    artifact = save(final, os.path.join(out_dir, "model.safetensors"), meta=meta)
    if c.target_size is not None:  # what a size budget is measured on: the packed file, next to the artifact
        from ..sparse import pack
        from ..sparse.masks import prunable_layers, report

        out["layers"], out["sparsity"] = report(prunable_layers(final))
        packed = pack(final, os.path.join(out_dir, "model.slimpack"), meta=meta)
        out.update({"packed": packed, "bytes_packed": os.path.getsize(packed),
                    "size_ratio": os.path.getsize(packed) / out["bytes_original"]})
        out["meets_size_budget"] = out["size_ratio"] <= c.target_size
        if not out["meets_size_budget"]:
            log(f"the packed file is {out['size_ratio']:.4f} of the original's, over the budget {c.target_size:g}: "
                "the retrain moved the Huffman statistics more than the margin; lower --target-size a little")
    exported = None
    fmt = EXPORT_FORMATS.get(c.runtime)
    if fmt is not None:
        exported = export_verified(final, fmt, out_dir, threads=c.threads, input_size=tuple(problem.example.shape[1:]),
                                   data=problem.data, log=log)
    log(f"final: test top-1 {out['test_top1_original']:.4f} -> {out['test_top1']:.4f}, {out['macs_ratio']:.3f}x MACs, "
        + ", ".join(f"bs{b} {v['ratio']:.3f}x latency" for b, v in out["latency"].items())
        + (f", {out['bytes_packed']:,} bytes packed ({out['size_ratio']:.4f}x)" if "size_ratio" in out else "")
        + f"; wrote {artifact}")
    return out, exported, artifact


def retrain_weights(problem: PruningProblem, teacher: nn.Module, job: dict, policy: dict, out_dir: str,
                    log: Callable[[str], None] = print, epochs: int | None = None) -> nn.Module:
    """The model of a sparse / shared-weight ``policy``, retrained as Deep Compression does (Han et al., ICLR 2016).

    The sparse model is trained with its masks held, then its codebooks are clustered and only the
    centroids trained, with KD from ``teacher`` in both; the epochs (``finetune_epochs``, or
    ``epochs``) are split as the compress job's size plan splits them (70% sparse).

    Args:
        problem: the search's problem (its space builds the policy; its calibration batches re-estimate BN).
        teacher: the original model.
        job: the search job (dataset, seed, learning rate).
        policy: densities and codebook bits (and whatever else the space searches).
        out_dir: the search's folder.
        log: progress lines.
        epochs: retraining epochs in all (default: the config's ``finetune_epochs``).

    Returns:
        The retrained model, masks and codebooks baked into plain weights.
    """
    from ..sparse import bake, bake_shared
    from ..sparse.sizes import SPARSE_EPOCH_SHARE
    from .evaluate import recalibrate_bn
    from .space import weight_stages

    space = problem.space
    epochs = problem.config.finetune_epochs if epochs is None else epochs
    # the first phase trains the weights themselves: needed whenever the policy changed more than the codebooks
    # (masks, cut channels, removed blocks, decomposed layers); codebooks alone go straight to the centroids
    reshaped = bool(space.density_layers or space.groups or space.block_order or space.rank_layers)
    shared_epochs = (0 if not space.codebook_layers else epochs if not reshaped else
                     max(0, epochs - max(1, round(SPARSE_EPOCH_SHARE * epochs))))
    sparse = {k: v for k, v in policy.items() if not k.startswith("codebook:")}  # codebooks come after
    student = _trainable(recalibrate_bn(space.apply(sparse, hold=True), problem.calib))
    if epochs - shared_epochs:
        student = _finetune(student, teacher, job, out_dir, log, epochs=epochs - shared_epochs,
                            what="with its masks held" if space.density_layers else "")
    bake(student)
    if space.codebook_layers:
        from ..sparse.masks import prunable_layers

        names = [n for n, _ in prunable_layers(student)]
        weight_stages(student, {}, space.owned(space.codebook_layers, policy, names, None), hold=bool(shared_epochs))
        if shared_epochs:
            student = bake_shared(_finetune(student, teacher, job, out_dir, log, epochs=shared_epochs,
                                            what="training the codebooks' centroids only"))
        else:  # clustering moved every weight: the batch norms see new activations
            log("codebooks clustered without a centroid fine-tune (no epoch left for it); batch norms re-estimated")
            student = recalibrate_bn(student, problem.calib)
    return student.eval()


def _trainable(model: nn.Module) -> nn.Module:
    """``model`` with every parameter trainable: a candidate copied from a model a KD teacher froze (the original,
    once a fine-tune has used it as teacher) would have nothing left to train."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _finetune(student: nn.Module, teacher: nn.Module, job: dict, out_dir: str, log: Callable[[str], None],
              epochs: int | None = None, what: str = ""):
    """KD fine-tune (``finetune_epochs``, or ``epochs``) in this process, or in ``finetune_procs`` processes under
    torchrun."""
    from ..artifact import load, save
    from .finetune import finetune

    c = SearchConfig.from_dict(job["config"])
    epochs = c.finetune_epochs if epochs is None else epochs
    log(f"fine-tuning {epochs} epochs with KD from the original" + (f", {what}" if what else "")
        + (f" in {c.finetune_procs} processes (torchrun)" if c.finetune_procs > 1 else ""))
    if c.finetune_procs == 1:
        from ..data import load as load_data

        data = load_data(job["data"], limit=job.get("limit"), seed=c.seed)
        finetune(student, teacher, data, epochs=epochs, lr=c.lr, seed=c.seed, input_size=tuple(job["input_size"]))
        return student
    from ..artifact import atomic_write_text

    tmp = os.path.join(out_dir, "finetune")
    os.makedirs(tmp, exist_ok=True)
    ft = {"student": save(student, os.path.join(tmp, "student.safetensors")),
          "teacher": save(teacher, os.path.join(tmp, "teacher.safetensors")), "data": job["data"],
          "limit": job.get("limit"), "data_seed": c.seed, "seed": c.seed, "epochs": epochs, "lr": c.lr,
          "input_size": job["input_size"], "threads": c.threads, "out": os.path.join(tmp, "tuned.safetensors")}
    path = os.path.join(tmp, "job.json")
    atomic_write_text(path, json.dumps(ft))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={c.finetune_procs}",
           "-m", "slimkit.search.finetune", path]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr or "").splitlines() if ln.strip()]
        raise SlimkitError(f"search: the data-parallel fine-tune failed ({lines[-1] if lines else r.returncode})")
    tuned = load(ft["out"])
    tuned.slimkit_history = copy.deepcopy(getattr(student, "slimkit_history", []))
    return tuned.eval()


def _maybe_int8(problem: PruningProblem, model: nn.Module, log: Callable[[str], None]):
    c = problem.config
    return int8_if_faster(model, problem.data, problem.val, problem.example, c.runtime, c.batch_sizes, c.threads,
                          allowed=c.max_drop if c.max_drop is not None else 0.005, always=c.quantize == "always",
                          seed=c.seed, log=log)


INT8_FASTER = 0.9  # int8 is used where it runs in at most this fraction of the float model's time


def int8_if_faster(model: nn.Module, data, val, example, runtime: str, batch_sizes, threads: int, *, allowed: float,
                   always: bool = False, seed: int = 0, log: Callable[[str], None] = print):
    """int8 of ``model`` when ``runtime`` runs it faster (10% or more, measured) and validation top-1 holds.

    Args:
        model: the float model.
        data: the dataset (its train split calibrates: 512 class-balanced images).
        val: validation batches the accuracy drop is measured on.
        example: one input (its shape is what is timed).
        runtime, batch_sizes, threads: where and how the int8 and float models are timed, interleaved.
        allowed: the validation top-1 the int8 model may lose (a fraction).
        always: keep int8 whatever it measures.
        seed: calibration subset seed.
        log: called with the decision.

    Returns:
        ``(int8 model or None, facts)``: the facts hold the measured latency ratio and the accuracy drop.
    """
    from ..quant import calibration_loader, quantize
    from ..train import evaluate
    from .evaluate import measured_ratio

    try:
        q = quantize(model, calibration_loader(data, 512, 64, seed))
        ratio = measured_ratio(model, q, example, runtime, batch_sizes, threads)
    except SlimkitError as e:
        log(f"int8: not used ({e})")
        return None, {"used": False, "reason": str(e)}
    drop = evaluate(model, val)["top1"] - evaluate(q, val)["top1"]
    use = always or (ratio <= INT8_FASTER and drop <= allowed)
    info = {"used": use, "latency_ratio_vs_float": ratio, "val_top1_drop": drop}
    log(f"int8 in {runtime}: {ratio:.3f}x the float latency, validation top-1 -{drop * 100:.2f} points: "
        + ("used" if use else "not used"))
    return (q if use else None), info


def _measure(model: nn.Module, final: nn.Module, problem: PruningProblem, c: SearchConfig) -> dict:
    from .evaluate import measure_against

    r = measure_against(model, final, problem.example, c.runtime, c.batch_sizes, c.threads, what="the final model")
    return {str(b): {"original_ms": r.results[c.runtime][b]["a"]["median_ms"],
                     "final_ms": r.results[c.runtime][b]["b"]["median_ms"], "ratio": r.ratio(c.runtime, b)}
            for b in c.batch_sizes}


def export_verified(model: nn.Module, fmt: str, out_dir: str, *, threads: int, input_size: tuple[int, ...], data,
                    log: Callable[[str], None]) -> dict:
    """``OUT/model.SUFFIX`` in ``fmt``, verified in its runtime on random and test batches; a failure is reported
    in the returned record (``passed`` False, ``error``), not raised: the artifact is still the result."""
    from ..export import FORMATS, ExportConfig, export

    path = os.path.join(out_dir, "model" + FORMATS.get(fmt).suffix)
    try:
        r = export(model, path, ExportConfig(format=fmt, threads=threads), input_size=input_size,
                   data=data.loader("test", 64))
    except SlimkitError as e:
        log(f"export to {fmt}: {e}")
        return {"format": fmt, "passed": False, "error": str(e)}
    runtimes = ", ".join(dict.fromkeys(c.runtime for c in r.checks))
    log(f"exported {r.path} ({r.bytes:,} bytes), verified in {runtimes}: {'yes' if r.passed else 'NO'}")
    return r.to_dict()


def _write_results(results: dict, out_dir: str) -> None:
    from ..artifact import atomic_write_text
    from .results import markdown

    atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1, default=str))
    atomic_write_text(os.path.join(out_dir, "results.md"), markdown(results))
