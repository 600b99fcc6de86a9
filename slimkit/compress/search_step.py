"""The search step of a latency or MACs target, with its closed loop on what the job will deliver.

The search (:func:`slimkit.search.search`) chooses channel keep ratios and blocks under a budget. For a
latency target the plan's budget is the target over int8's gain on the original, and a thinner model
gains less, so the searched model is timed as the job will deliver it and searched once more, tighter,
when it misses (:func:`step_search`).
"""

from __future__ import annotations

import os

from ..errors import SlimkitError
from .job import Job

RESEARCH_SHARE = 0.3  # of a latency target's search time, kept for the re-search when the first result misses
CHECK_MARGIN = 0.98  # a searched model measuring over this much of the target is searched again...
AIM_MARGIN = 0.95  # ...aiming this far under it (whole-model timings of a sub-millisecond model move by 2-3%)


def step_search(job: Job, plan: dict) -> dict:
    """Search channel keep ratios and blocks under the budget; the applied policy (batch norms re-estimated).

    A budget even the smallest policy misses is relaxed to what that policy reaches (5% above it), so the job
    still ends with the best model it can make and a report saying how close it got.

    For a latency target the searched model is then measured as the job will deliver it: quantized when the
    plan has int8 and int8 runs it at least 10% faster, timed whole against the original in the runtime. The
    plan's search budget assumed int8 gains on the pruned model what it gained on the original, and a thinner
    model gains less; when the delivered latency misses the target the search runs once more (its share of
    the time kept for that) at a budget tightened by the measured shortfall, warm-started from the first
    search's front, and the round that delivers within the target with the best proxy accuracy is kept.
    """
    from ..documents import read_json_file

    c = job.config
    rec = job.step("search")
    rounds = rec.setdefault("rounds", [])
    closed_loop = c.kind == "latency"
    seconds = plan.get("search_seconds")
    if not rounds:
        share = (1 - RESEARCH_SHARE) if closed_loop and seconds else 1.0
        fraction = rec.get("relaxed_to", plan.get("search_fraction", c.fraction))
        rounds.append(_search_round(job, plan, "search", fraction, seconds * share if seconds else None,
                                    plan["trials"] or 100_000, relax=True)[0])
        job.save_state()
    if (closed_loop and len(rounds) == 1 and "note" not in rec
            and (rounds[0]["delivered"] or 0) > CHECK_MARGIN * c.fraction):
        first = rounds[0]
        tighter = first["fraction"] * AIM_MARGIN * c.fraction / first["delivered"]
        job.log(f"the searched model delivers {first['delivered']:.3f}x the original's latency "
                f"({first['delivered_as']}), over the target {c.fraction:g}: searching again at {tighter:.3f} of "
                "the float latency")
        second, why = _search_round(job, plan, "search-2", tighter, seconds * RESEARCH_SHARE if seconds else None,
                                    max(1, round(plan["trials"] * RESEARCH_SHARE)) if plan["trials"] else 100_000,
                                    warm_from="search")
        if second is not None:
            rounds.append(second)
        else:  # recorded, so a resumed job does not try it again
            rec["note"] = f"the second search at {tighter:.3f} found nothing ({why}): the first search is kept"
            job.log(rec["note"])
        job.save_state()
    best = _best_round(rounds, c.fraction)
    # the folder names come from this function, never from the state file: a crafted compress.json loads nothing else
    folder = job.path("search-2" if best["folder"] == "search-2" else "search")
    results = read_json_file(os.path.join(folder, "results.json"), "search results")
    from ..artifact import load

    job.save(load(os.path.join(folder, "model.safetensors")).eval(), "search")
    chosen = {k: v for k, v in results["chosen"].items() if k != "latency"}
    out = {"results": os.path.join(folder, "results.json"), "chosen": chosen, "rounds": rounds,
           "study": results["study"], "pareto": results["pareto"], "cost_key": results["cost_key"],
           "metrics": {"test_top1": results["final"]["test_top1_applied"],
                       "macs_ratio": results["final"]["macs_ratio"]}}
    if len(rounds) > 1:
        which = "first" if best is rounds[0] else "second"
        job.log(f"kept the {which} search: it delivers {best['delivered'] or float('nan'):.3f}x the original's "
                f"latency ({best['delivered_as']})")
    return out | {k: rec[k] for k in ("relaxed_to", "warning", "note") if k in rec}


def _best_round(rounds: list[dict], target: float) -> dict:
    """The round that goes on: the best proxy of those delivering under ``CHECK_MARGIN`` of the target (timing
    noise and all), else of those within it, else the fastest."""
    timed = [r for r in rounds if r["delivered"] is not None]
    for limit in (CHECK_MARGIN * target, target):
        met = [r for r in timed if r["delivered"] <= limit]
        if met:
            return max(met, key=lambda r: r["proxy"])
    return min(timed, key=lambda r: r["delivered"]) if timed else rounds[0]


def _search_round(job: Job, plan: dict, name: str, fraction: float, seconds: float | None, trials: int, *,
                  relax: bool = False, warm_from: str | None = None):
    """One search into ``OUT/NAME`` at ``fraction`` of the float cost, for ``seconds`` (or ``trials``); its record,
    with what the searched model delivers for a latency target (see :func:`step_search`), as ``(record, None)``.

    A budget out of reach is relaxed (``relax``); otherwise a search that finds nothing gives ``(None, why)``.
    ``warm_from``: an earlier round's folder, whose front is enqueued first and whose latency table is reused.
    """
    import shutil

    from ..search import SearchConfig, search
    from ..search.engine import TABLE, OutOfReach

    c, rec = job.config, job.step("search")
    folder = job.path(name)
    warm: tuple[str, ...] = ()
    if warm_from:
        warm = (os.path.join(job.path(warm_from), "results.json"),)
        table = job.path(warm_from, TABLE)
        if os.path.exists(table) and not os.path.exists(os.path.join(folder, TABLE)):
            os.makedirs(folder, exist_ok=True)
            shutil.copyfile(table, os.path.join(folder, TABLE))  # the same model and runtime: not measured again

    def run(f: float) -> dict:
        cfg = SearchConfig(target_latency=f if c.kind == "latency" else None,
                           target_macs=f if c.kind == "macs" else None, runtime=c.runtime,
                           batch_sizes=tuple(c.batch_sizes), threads=job.threads, max_drop=c.max_drop / 100,
                           trials=trials,
                           time_budget=f"{max(seconds, 10):.0f}s" if seconds else None,
                           warm_start=("uniform", *warm), finetune_epochs=0, quantize="never", seed=c.seed)
        resume = os.path.exists(os.path.join(folder, "search.json"))
        return search(job.model, job.data_spec, cfg, folder, limit=job.limit, data=job.data, model_name="compress",
                      resume=resume, log=job.log)

    try:
        results = run(fraction)
    except SlimkitError as e:
        if not relax:  # a tighter budget nothing measured meets: the first search stands
            return None, str(e)
        if not isinstance(e, OutOfReach):
            raise
        reached = e.reached.get(c.kind)
        if reached is None or reached >= 0.99:
            raise
        fraction = rec["relaxed_to"] = min(0.99, reached * 1.05)
        rec["warning"] = (f"{c.target} is out of reach of this model's pruning space ({e}); searched at "
                          f"{c.kind}={fraction:.3f} instead")
        job.save_state()
        job.log(rec["warning"])
        results = run(fraction)
    row = {"folder": name, "fraction": fraction, "proxy": results["chosen"]["proxy"],
           "trials": results["study"]["complete"]}
    if c.kind == "latency":
        row.update(_delivered(job, plan, os.path.join(folder, "model.safetensors")))
    else:
        row["delivered"] = results["final"]["macs_ratio"]
    return row, None


def _delivered(job: Job, plan: dict, path: str) -> dict:
    """The searched model's latency / the original's in the job's runtime (worst batch size, interleaved), as the
    quantize step would leave it: int8 when planned and at least 10% faster than the float model (the rule of
    :func:`slimkit.search.int8_if_faster`; its accuracy check waits for the fine-tuned model), else float."""
    from ..artifact import load
    from ..quant import calibration_loader, quantize
    from ..search import INT8_FASTER
    from ..search.evaluate import measured_ratio

    c = job.config
    model = load(path).eval()
    try:
        float_ratio = measured_ratio(job.model, model, job.example, c.runtime, c.batch_sizes, job.threads)
    except SlimkitError as e:
        job.log(f"the searched model: not timed in {c.runtime} ({e})")
        return {"float_ratio": None, "delivered": None, "delivered_as": "not measured"}
    row = {"float_ratio": float_ratio, "delivered": float_ratio, "delivered_as": "float"}
    if plan.get("int8"):
        try:
            q = quantize(model, calibration_loader(job.data, 512, 64, c.seed))
            int8 = measured_ratio(job.model, q, job.example, c.runtime, c.batch_sizes, job.threads)
        except SlimkitError as e:
            job.log(f"int8 of the searched model: not measured ({e})")
            return row
        row["int8_ratio"] = int8
        if int8 <= INT8_FASTER * float_ratio:
            row.update(delivered=int8, delivered_as="int8")
    job.log(f"the searched model in {c.runtime}: float {float_ratio:.3f}x"
            + (f", int8 {row['int8_ratio']:.3f}x" if "int8_ratio" in row else "") + " the original's latency")
    return row
