"""The coordinator's side of a study: the job, the budget check, warm starts and the worker processes.

:func:`prepare` writes everything a worker needs into ``OUT``: the original model as an artifact
(``original.safetensors``), the per-layer latency table measured on the target runtime
(``latency-table.json``) and the job (``search.json``, :mod:`slimkit.search.problems`). It refuses
a budget no policy of the space can meet, naming the smallest latency (or MACs, parameters) the
space reaches, measured whole on the runtime. :func:`warm_start` enqueues known-good policies into a
new study; :func:`run_workers` runs the workers, in this process when there is one (so a seeded
one-worker study repeats exactly) or as ``python -m slimkit.search.worker`` processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from ..errors import SlimkitError
from .config import SearchConfig
from .problems import PruningProblem
from .space import BITS_HIGH, BITS_LOW, DENSITY_LOW, DENSITY_STEP, UNIFORM_BITS, PruningSpace

JOB = "search.json"
TABLE = "latency-table.json"
ORIGINAL = "original.safetensors"


def model_digest(model: nn.Module) -> str:
    """A short hash of the model's structure and weights: a study is tied to the model it searched."""
    h = hashlib.sha256(str(model).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def default_study_name(model_name: str, config: SearchConfig) -> str:
    budget = "-".join(f"{k}{v:g}" for k, v in (("lat", config.target_latency), ("macs", config.target_macs),
                                               ("params", config.target_params), ("size", config.target_size))
                      if v is not None)
    base = os.path.basename(str(model_name)).split(".")[0] or "model"
    return f"{base}-{config.runtime}-bs{'_'.join(map(str, config.batch_sizes))}-{budget}"


def prepare(model: nn.Module, data, config: SearchConfig, out_dir: str, *, data_spec: str, limit: int | None,
            input_size: tuple[int, ...], model_name: str, log: Callable[[str], None]) -> tuple[dict, PruningProblem]:
    """Write the job, the original model and the latency table; return the job and the built problem."""
    from ..artifact import atomic_write_text, save
    from ..prune.sensitivity import held_out_loader
    from .evaluate import RuntimeLatencyTable
    from .study import storage_url

    os.makedirs(out_dir, exist_ok=True)
    example = torch.zeros(1, *input_size)
    model = model.eval()
    original = save(model, os.path.join(out_dir, ORIGINAL), meta={"input_size": list(input_size)})
    space = PruningSpace(model, example, criterion=config.criterion, round_to=config.round_to,
                         granularity=config.granularity, blocks="blocks" in config.space,
                         channels="prune" in config.space, ranks="rank" in config.space,
                         bits="bits" in config.space, sparsity="sparsity" in config.space,
                         share="share" in config.space)
    t0 = time.perf_counter()
    space.build(held_out_loader(data, 256, config.seed), batches=2)
    kinds = [d.name.split(":")[0] for d in space.dimensions]
    log(f"search space: {len(space.dimensions)} dimensions ({kinds.count('keep')} keep ratios, "
        f"{kinds.count('blocks')} block counts"
        + (f", {kinds.count('rank')} decomposition ranks" if space.ranks else "")
        + (f", {kinds.count('int8')} int8 flags" if space.bits else "")
        + (f", {kinds.count('density')} weight densities" if space.sparsity else "")
        + (f", {kinds.count('codebook')} codebook widths" if space.share else "")
        + f") in {time.perf_counter() - t0:.1f}s")
    if space.sparsity and not config.trial_steps:
        log("note: sparsity is searched with --trial-steps 0; before any training a highly sparse candidate's accuracy "
            "says little about after it (resnet20 at 20x: +0.85 points with --trial-steps 20, docs/search.md)")
    table = None
    table_path = os.path.join(out_dir, TABLE)
    if config.target_latency is not None and config.latency_model == "table":
        saved = None
        if os.path.exists(table_path):
            from ..documents import read_json_file

            saved = read_json_file(table_path, "latency table")
        t0 = time.perf_counter()
        table = RuntimeLatencyTable(model, example, config.runtime, config.batch_sizes, config.threads, saved=saved)
        log(f"latency on {config.runtime} ({config.threads} thread(s)): " + ", ".join(
            f"bs{b} {s * 1e3:.2f} ms" for b, s in table.reference.items())
            + (" (from the study's table)" if saved and table.matches(saved) else
               f" (measured in {time.perf_counter() - t0:.1f}s)"))
    job = {"problem": "pruning", "model": original, "data": data_spec, "limit": limit,
           "input_size": list(input_size), "config": config.to_dict(), "space": space.describe(),
           "latency_table": table_path if table is not None else None,
           "study": config.study or default_study_name(model_name, config),
           "storage": storage_url(config.storage, out_dir), "sampler": config.sampler, "seed": config.seed,
           "trials": config.trials, "threads": config.threads}
    job["fingerprint"] = {"problem": "pruning", "model": model_digest(model),
                          "space": hashlib.sha256(json.dumps(job["space"], sort_keys=True).encode()).hexdigest()[:16],
                          # a size budget joins the list only when set: earlier studies keep their fingerprint
                          "budget": [config.target_latency, config.target_macs, config.target_params]
                          + ([config.target_size] if config.target_size is not None else []),
                          "runtime": config.runtime, "batch_sizes": list(config.batch_sizes),
                          "threads": config.threads, "sampler": config.sampler,
                          "latency_model": config.latency_model}
    problem = PruningProblem(job, model=model, data=data, table=table)
    if table is not None and not table.calibration:
        calibrate(problem, model, log)
    check_reachable(problem, model, example, log)
    save_table(problem, table_path)
    atomic_write_text(os.path.join(out_dir, JOB), json.dumps(job, indent=1))
    return job, problem


def save_table(problem: PruningProblem, path: str, extra: list[str] = ()) -> None:
    """Write the problem's latency table, with the entries workers measured (``extra`` files) merged in."""
    from ..artifact import atomic_write_text
    from ..documents import read_json_file

    if problem.table is None:
        return
    for p in extra:
        if os.path.exists(p):
            problem.table.cache.update(read_json_file(p, "latency table").get("layers", {}))
    atomic_write_text(path, json.dumps(problem.table.to_dict()))


def calibrate(problem: PruningProblem, model: nn.Module, log: Callable[[str], None]) -> None:
    """Fit the latency table to a few policies of the space measured whole (the extremes and two between)."""
    space = problem.space
    most = max((int(d.high) for d in space.dimensions if d.kind == "int"), default=0)
    policies = []
    extremes = [space.smallest(), space.uniform(0.5, 0), space.uniform(1.0, most), space.uniform(0.75, most // 2)]
    if space.rank_layers:  # decomposed layers add timed layers: the fit needs a policy that has them
        extremes.append(space.uniform(1.0, 0, rank=0.5))
    for p in extremes:
        if p not in policies and p != space.uniform(1.0, 0):
            policies.append(p)
    t0 = time.perf_counter()
    rows = problem.table.calibrate(model, [space.apply(p) for p in policies])
    worst = max(abs(r["predicted"][b] - r["measured"][b]) for r in rows for b in r["measured"])
    log(f"latency table fitted to {len(rows)} policies measured whole in {time.perf_counter() - t0:.1f}s: "
        + ", ".join(f"bs{b} a={a:.2f}, {c * 1e6:.1f} us per layer" for b, (a, c) in problem.table.fit.items())
        + f"; worst error left {worst:.3f} of the original latency")


class OutOfReach(SlimkitError):
    """A budget even the smallest policy of the space misses; ``reached`` holds what it does reach per budget
    (``macs``, ``params``, ``latency``: fractions of the original's), so a caller can relax the budget to it."""

    def __init__(self, message: str, reached: dict[str, float]) -> None:
        super().__init__(message)
        self.reached = reached


def check_reachable(problem: PruningProblem, model: nn.Module, example: torch.Tensor,
                    log: Callable[[str], None]) -> None:
    """Refuse a budget that even the space's smallest policy misses, naming what it reaches (:class:`OutOfReach`)."""
    from .evaluate import measured_ratio

    c = problem.config
    smallest = problem.space.smallest()
    cand, costs = problem.measure(smallest)
    if problem.space.bits and c.target_latency is not None and costs["latency_ratio"] > c.target_latency:
        # int8 is not faster everywhere (small layers pay for their quantize and dequantize): try all float too
        alt = problem.measure(problem.space.smallest(int8=0))
        if alt[1]["latency_ratio"] < costs["latency_ratio"]:
            cand, costs = alt
    misses = []
    reached = {"macs": costs["macs_ratio"], "params": costs["params_ratio"]}
    if c.target_macs is not None and costs["macs_ratio"] > c.target_macs:
        misses.append(f"the MAC budget {c.target_macs:g} is out of reach: the smallest policy of this space keeps "
                      f"{costs['macs_ratio']:.3f} of the MACs")
    if c.target_params is not None and costs["params_ratio"] > c.target_params:
        misses.append(f"the parameter budget {c.target_params:g} is out of reach: the smallest policy keeps "
                      f"{costs['params_ratio']:.3f} of the parameters")
    if c.target_size is not None:
        from ..sparse.sizes import SIZE_MARGIN

        reached["size"] = costs["size_ratio"]
        if costs["size_ratio"] > SIZE_MARGIN * c.target_size:
            misses.append(f"the size budget {c.target_size:g} is out of reach: the smallest policy of this space "
                          f"packs into {costs['bytes']:,} bytes, {costs['size_ratio']:.4f} of the original's "
                          f"{problem.bytes0:,} (a trial must fit {SIZE_MARGIN:g} of the budget: retraining moves "
                          "the Huffman statistics)")
    if c.target_latency is not None and costs["latency_ratio"] > c.target_latency:
        measured = measured_ratio(model, cand, example, c.runtime, c.batch_sizes, c.threads)
        reached["latency"] = measured
        if measured > c.target_latency:
            misses.append(f"the latency budget {c.target_latency:g} is out of reach: the smallest latency this space "
                          f"reaches is {measured:.3f} of the original in {c.runtime} "
                          f"(batch sizes {', '.join(map(str, c.batch_sizes))}, {c.threads} thread(s))")
    if misses:
        raise OutOfReach("search: " + "; ".join(misses) + " (widen --space or relax the budget)", reached)
    how = "measured" if "int8_layers" in costs or c.latency_model == "measure" else "predicted"
    log(f"smallest policy of the space: {costs['macs_ratio']:.3f}x MACs"
        + (f", {costs['latency_ratio']:.3f}x {how} latency" if "latency_ratio" in costs else "")
        + (f", {costs['size_ratio']:.4f}x bytes on disk" if "size_ratio" in costs else ""))


def _fits(problem: PruningProblem, policy: dict) -> bool:
    return all(v <= 0 for v in problem.measure(policy)[1]["constraints"])


def _largest_fitting(problem: PruningProblem, make: Callable[[float, int], dict], keeps: list[float],
                     blocks: list[int]) -> dict | None:
    for b in blocks:
        for k in keeps:  # from the largest keep down: the first that fits keeps the most
            policy = make(k, b)
            if _fits(problem, policy):
                return policy
    return None


def warm_starts(problem: PruningProblem, model: nn.Module, log: Callable[[str], None]) -> list[tuple[str, dict]]:
    """The known-good policies to enqueue first: uniform, sensitivity scan, depth first, earlier results."""
    space, c = problem.space, problem.config
    floats = [d for d in space.dimensions if d.kind == "float"]
    ints = [d for d in space.dimensions if d.kind == "int"]
    dense = set(space.density_layers.values())
    keeps = sorted({d.clip(k / 8) for d in floats if d.name not in dense for k in range(2, 9)}, reverse=True) or [1.0]
    most = max((int(d.high) for d in ints), default=0)
    out: list[tuple[str, dict]] = []
    for w in c.warm_start:
        policy = None
        if w == "uniform" and (space.density_layers or space.codebook_layers):
            policy = _uniform_weights(problem)
        elif w == "uniform":  # the same keep ratio everywhere, blocks only if channels alone cannot meet the budget
            policy = _largest_fitting(problem, space.uniform, keeps, list(range(0, most + 1)))
        elif w == "depth":  # blocks first, as few as meet the budget; channels only once every block is gone
            policy = next((p for b in range(1, most + 1) if _fits(problem, p := space.uniform(1.0, b))), None)
            if policy is None and ints:
                policy = _largest_fitting(problem, space.uniform, keeps, [most])
        elif w == "sensitivity":
            policy = _sensitivity_policy(problem, model, keeps)
        else:
            out.extend((f"{os.path.basename(w)}:{i}", p) for i, p in enumerate(_earlier(problem, w, log)))
            continue
        if policy is None:
            log(f"warm start {w}: no such policy meets the budget; skipped")
        else:
            out.append((w, policy))
    return out


def _sensitivity_policy(problem: PruningProblem, model: nn.Module, keeps: list[float]) -> dict | None:
    """Li et al.'s per-group ratios at the budget's MAC fraction, shrunk uniformly until the policy fits."""
    from ..prune.sensitivity import held_out_loader, sensitivity_ratios

    space, c = problem.space, problem.config
    goals = [v for v in (c.target_macs, c.target_latency, c.target_params) if v is not None]
    if space.density_layers and (not space.groups or not goals):  # a size budget: Deep Compression's own scan
        return _weight_sensitivity_policy(problem, model)
    if not space.groups or not goals:  # a size budget alone says nothing of the MACs to prune channels to
        return None
    goal = min(goals)
    ratios, _ = sensitivity_ratios(model, problem.example, held_out_loader(problem.data, 256, c.seed),
                                   criterion=c.criterion if c.criterion != "group_l1" else "l1", target_macs=goal,
                                   batches=2, round_to=c.round_to)
    keep: dict[str, list[float]] = {}
    for producer, dim in space.groups.items():
        if producer in ratios:
            keep.setdefault(dim, []).append(1.0 - ratios[producer])
    dense = set(space.density_layers.values())
    # no block removed, weights dense, codebooks at the uniform width; only the channel ratios (and ranks) shrink
    base = {d.name: (sum(keep[d.name]) / len(keep[d.name]) if d.name in keep else 1.0) if d.kind == "float" else
            UNIFORM_BITS if d.kind == "bits" else 0 for d in space.dimensions}
    flags = [d.name for d in space.dimensions if d.kind == "flag"]
    for scale in [1.0] + [k for k in keeps if k < 1.0]:
        # every layer int8 first, then every layer float: narrow int8 layers can be the slower ones
        for int8 in ((1, 0) if flags else (0,)):
            policy = space.clip({k: v * scale if isinstance(v, float) and k not in dense else v
                                 for k, v in base.items()} | {f: int8 for f in flags})
            if _fits(problem, policy):
                return policy
    return None


def _uniform_weights(problem: PruningProblem) -> dict | None:
    """The Deep Compression control: one density everywhere (the largest that fits) and one codebook width (4 bits,
    fewer only when nothing fits at 4; with codebooks alone, the most bits that fit), channels and blocks kept."""
    space = problem.space
    steps = round((1.0 - DENSITY_LOW) / DENSITY_STEP) if space.density_layers else 0
    densities = [round(1.0 - i * DENSITY_STEP, 6) for i in range(steps + 1)]  # densest first
    widths = (list(range(UNIFORM_BITS, BITS_LOW - 1, -1)) if space.density_layers else
              list(range(BITS_HIGH, BITS_LOW - 1, -1)) if space.codebook_layers else [UNIFORM_BITS])
    for bits in widths:
        for d in densities:
            policy = space.clip(space.uniform(1.0, 0, bits=bits) | {n: d for n in space.density_layers.values()})
            if _fits(problem, policy):
                return policy
    return None


def _weight_sensitivity_policy(problem: PruningProblem, model: nn.Module) -> dict | None:
    """Deep Compression's per-layer sparsities (Han et al. 2015: each layer as sparse as a one-layer scan says it
    can be for a global target, :func:`slimkit.sparse.sensitivity.plan`), at the least global sparsity that fits,
    codebooks at the uniform bits."""
    from ..prune.sensitivity import held_out_loader
    from ..sparse.sensitivity import plan, scan

    space, c = problem.space, problem.config
    result = scan(model, held_out_loader(problem.data, 256, c.seed), batches=2)  # it restores every weight it prunes
    for target in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95):
        shape, _ = plan(result, target, "same", model)
        per_dim: dict[str, list[float]] = {}
        for layer, dim in space.density_layers.items():
            per_dim.setdefault(dim, []).append(1.0 - shape.get(layer, 1.0) * target)
        policy = space.clip(space.uniform(1.0, 0) | {d: sum(v) / len(v) for d, v in per_dim.items()})
        if _fits(problem, policy):
            return policy
    return None


def _earlier(problem: PruningProblem, path: str, log: Callable[[str], None]) -> list[dict]:
    """The best policies of an earlier search (its results.json), on the dimensions this space shares."""
    from ..documents import read_json_file

    doc = read_json_file(path, "search results")
    found = [doc.get("chosen", {}).get("policy")] + [r.get("policy") for r in doc.get("pareto", [])]
    names = {d.name for d in problem.space.dimensions}
    out = []
    for p in found:
        if not isinstance(p, dict):
            continue
        shared = {k: v for k, v in p.items() if k in names and isinstance(v, (int, float))}
        if not shared:
            continue
        policy = problem.space.clip({**problem.space.uniform(1.0, 0), **shared})
        if policy not in out:
            out.append(policy)
    if not out:
        log(f"warm start {path}: no policy there shares a dimension with this space; skipped")
    return out[:10]


def enqueue(study, starts: list[tuple[str, dict]], log: Callable[[str], None]) -> None:
    from .space import policy_text

    for name, policy in starts:
        study.enqueue_trial(policy, user_attrs={"warm_start": name}, skip_if_exists=True)
        log(f"warm start {name}: {policy_text(policy)}")


def run_workers(job_path: str, job: dict, workers: int, problem: PruningProblem | None,
                log: Callable[[str], None]) -> None:
    """Run the study's workers: in this process when there is one, else as worker processes (one thread each)."""
    from .worker import run

    if workers == 1:
        run(job, problem=problem, log=log)
        return
    import glob

    for stale in glob.glob(str(job.get("latency_table")) + ".worker-*"):
        os.remove(stale)
    env = {**os.environ, "OMP_NUM_THREADS": str(job.get("threads", 1))}
    cmd = [sys.executable, "-m", "slimkit.search.worker", job_path]
    procs = [subprocess.Popen(cmd + ["--index", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(workers)]
    errors = []
    for i, p in enumerate(procs):
        out, err = p.communicate()
        if p.returncode != 0:
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            errors.append(f"worker {i} exited {p.returncode}: {lines[-1] if lines else ''}")
        elif out.strip():
            log(out.strip().splitlines()[-1])
    if problem is not None and job.get("latency_table"):
        save_table(problem, job["latency_table"], sorted(glob.glob(job["latency_table"] + ".worker-*")))
    if errors:
        raise SlimkitError("search: " + "; ".join(errors))
