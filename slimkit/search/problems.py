"""What a search worker evaluates: the registered problems, each built from a job document.

A job is JSON (``OUT/search.json``): which registered problem, the study, the storage, the budget
and, for ``pruning``, the original model's artifact, the dataset spec, the described search space
and the latency table. A worker builds its problem from :data:`PROBLEMS` by name; nothing a job
names is imported or called, and the model comes from a slimkit artifact (no unpickling).

* ``pruning``: the real problem (:class:`PruningProblem`): a policy of channel keep ratios,
  residual blocks to remove, decomposition ranks, int8 flags, weight densities and codebook bits
  (as its space has them), judged by EagleEye's accuracy proxy under MAC, parameter,
  measured-latency and bytes-on-disk budgets.
* ``quadratic``: a synthetic problem whose constrained best policy is known in closed form
  (:class:`QuadraticProblem`); the tests check the engine (samplers, storage, workers, retries)
  on it in milliseconds per trial.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..registry import Registry
from .space import Dimension


@dataclass(frozen=True)
class ProblemEntry:
    name: str
    build: Callable[[dict], object]  # job -> problem with .dimensions, .directions, .objective(trial)
    doc: str = ""


PROBLEMS: Registry[ProblemEntry] = Registry("search problem")


def record(trial, **attrs) -> None:
    """Store ``attrs`` on the trial; ``constraints`` (budget violations, feasible when all are <= 0) also as
    Optuna constraints, which the samplers read."""
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    for i, v in enumerate(attrs.get("constraints", ())):
        trial.set_constraint(f"budget{i}", float(v))


class QuadraticProblem:
    """Accuracy ``1 - sum((x_i - t_i)^2)`` under the budget ``mean(x) <= budget``, ``x_i`` on a 0.25 grid.

    With ``t = (0.75, 0.5, 1.0)`` and ``budget = 0.5`` the constraint binds and the best policy is
    the projection of ``t`` onto it, ``(0.5, 0.25, 0.75)``, which lies on the grid (:meth:`best`).
    ``sleep`` makes each trial last that long (so parallel workers overlap) and ``log`` appends a
    JSON line when an evaluation starts and when it is done (trial number, worker pid, policy): the
    tests count on it.
    """

    def __init__(self, job: dict) -> None:
        opts = job.get("quadratic", {})
        self.target = [float(t) for t in opts.get("target", (0.75, 0.5, 1.0))]
        self.budget = float(opts.get("budget", 0.5))
        self.sleep = float(opts.get("sleep", 0.0))
        self.log = opts.get("log")
        self.multi = bool(opts.get("multi_objective", False))
        self.dimensions = [Dimension(f"x{i}", "float", 0.0, 1.0, 0.25) for i in range(len(self.target))]
        self.directions = ["maximize", "minimize"] if self.multi else ["maximize"]

    def cost(self, policy: dict) -> float:
        return sum(policy.values()) / len(policy)

    def value(self, policy: dict) -> float:
        return 1.0 - sum((policy[d.name] - t) ** 2 for d, t in zip(self.dimensions, self.target))

    def best(self) -> dict:
        shift = max(0.0, sum(self.target) / len(self.target) - self.budget)
        return {d.name: t - shift for d, t in zip(self.dimensions, self.target)}

    def objective(self, trial):
        policy = {d.name: d.suggest(trial) for d in self.dimensions}
        cost = self.cost(policy)
        record(trial, constraints=[cost - self.budget], latency_ratio=cost, policy=policy)
        self._log("start", trial, policy)
        if self.sleep:
            time.sleep(self.sleep)
        value = self.value(policy)
        self._log("done", trial, policy)
        return (value, cost) if self.multi else value

    def _log(self, event: str, trial, policy: dict) -> None:
        if self.log:
            with open(self.log, "a") as f:  # one short line per write: appends of this size do not interleave
                f.write(json.dumps({"event": event, "trial": trial.number, "pid": os.getpid(), "policy": policy})
                        + "\n")


class PruningProblem:
    """Channel keep ratios and residual blocks to remove, judged by an accuracy proxy under measured budgets.

    Each trial builds the candidate (:meth:`PruningSpace.apply`), counts its MACs and parameters,
    predicts its latency on the runtime from the per-layer table, records the budget violations
    (``constraints``), and only for a candidate within budget takes the accuracy proxy (BN
    re-estimated on ``calib_batches`` training batches, top-1 on ``val_batches`` validation
    batches): TPE and NSGA-II rank an infeasible trial by its violation alone, so its accuracy would
    be wasted work. GP-based BO models the objective over every trial and gets it for all.
    With ``trial_steps`` a feasible candidate is also fine-tuned for that many SGD steps in two
    halves, reporting after each, so Optuna's median pruner stops the ones falling behind (a sparse
    or shared-weight candidate with its masks and codebooks held).
    """

    def __init__(self, job: dict, *, model=None, data=None, table=None) -> None:
        import torch

        from ..artifact import load
        from ..profile import profile
        from .config import SearchConfig
        from .evaluate import RuntimeLatencyTable
        from .space import PruningSpace

        self.config = SearchConfig.from_dict(job["config"])
        self.model = model if model is not None else load(job["model"]).eval()
        self.example = torch.zeros(1, *job["input_size"])
        if data is None:
            from ..data import load as load_data

            data = load_data(job["data"], limit=job.get("limit"), seed=self.config.seed)
        self.data = data
        c = self.config
        from ..prune.sensitivity import first_batches, held_out_loader

        calib = data.loader("train", 128, shuffle=True, augment=False, seed=c.seed)
        self.calib = first_batches(calib, c.calib_batches, "search calibration")
        self.val = first_batches(held_out_loader(data, 256, c.seed), c.val_batches, "search accuracy proxy")
        self.space = PruningSpace.from_description(self.model, self.example, job["space"])
        self.dimensions = self.space.dimensions
        ref = profile(self.model, self.example)
        self.macs0, self.params0 = ref.macs, ref.params
        if c.target_size is not None:
            from .evaluate import file_bytes

            self.bytes0 = file_bytes(self.model)
        self.table = table
        if self.table is None and c.target_latency is not None and c.latency_model == "table":
            saved = _read_json(job["latency_table"]) if job.get("latency_table") else None
            self.table = RuntimeLatencyTable(self.model, self.example, c.runtime, c.batch_sizes, c.threads,
                                             saved=saved)
        from .study import SAMPLERS

        self.every_value = SAMPLERS.get(c.sampler).needs_every_value
        self.directions = ["maximize", "minimize"] if SAMPLERS.get(c.sampler).multi_objective else ["maximize"]

    def measure(self, policy: dict) -> tuple[object, dict]:
        """The model ``policy`` makes and its costs: MAC, parameter and latency ratios, budget violations.

        A policy with int8 layers (``--space bits``) gives the int8 model (:meth:`int8`) and is timed
        whole on the runtime: the per-layer table knows float layers only. With a size budget the
        candidate is packed (:func:`slimkit.sparse.pack`) and its bytes on disk counted.
        """
        from ..profile import profile

        c = self.config
        cand = self.space.apply(policy)
        p = profile(cand, self.example)
        costs = {"macs_ratio": p.macs / self.macs0, "params_ratio": p.params / self.params0}
        if self.space.quantized(policy):
            from ..quant.core import quantizable_layers

            # the candidate's own layers (a removed block's are gone, a decomposed layer's factors count)
            costs["int8_layers"] = len(quantizable_layers(cand)) - len(self.space.keep_float(policy, cand))
            cand = self.int8(cand, policy)
        violations = []
        if c.target_latency is not None and (c.latency_model == "measure" or "int8_layers" in costs):
            from .evaluate import measured_ratios

            got = measured_ratios(self.model, cand, self.example, c.runtime, c.batch_sizes, c.threads, repeats=7)
            costs["latency"] = {str(b): r for b, r in got.items()}
            costs["latency_ratio"] = max(costs["latency"].values())
            violations.append(costs["latency_ratio"] - c.target_latency)
        elif c.target_latency is not None:
            pred = self.table.predict(cand)
            costs["latency"] = {str(b): pred[b] / self.table.reference[b] for b in self.table.batch_sizes}
            costs["latency_ratio"] = max(costs["latency"].values())
            violations.append(costs["latency_ratio"] - c.target_latency)
        if c.target_macs is not None:
            violations.append(costs["macs_ratio"] - c.target_macs)
        if c.target_params is not None:
            violations.append(costs["params_ratio"] - c.target_params)
        if c.target_size is not None:
            from ..sparse.sizes import SIZE_MARGIN
            from .evaluate import file_bytes

            costs["bytes"] = file_bytes(cand, packed=True)
            costs["size_ratio"] = costs["bytes"] / self.bytes0
            # with a margin: the final file holds retrained weights, whose codes Huffman-code a little differently
            violations.append(costs["size_ratio"] - SIZE_MARGIN * c.target_size)
        costs["constraints"] = violations
        return cand, costs

    def int8(self, candidate, policy: dict, calib=None, recalibrate: bool = True):
        """``candidate`` on int8 kernels where ``policy`` flags a layer, float elsewhere (a new model).

        With ``recalibrate`` its batch norms are re-estimated first (on a copy: a pruned candidate's
        are stale, a fine-tuned one's are not), then it is calibrated on ``calib`` (default: the
        trial's calibration batches) and converted, as :func:`slimkit.quant.quantize` does.
        """
        import copy

        from ..quant import quantize
        from .evaluate import recalibrate_bn

        work = recalibrate_bn(copy.deepcopy(candidate), self.calib) if recalibrate else candidate
        return quantize(work, calib if calib is not None else self.calib,
                        keep_float=self.space.keep_float(policy, work))

    def judged(self, policy: dict):
        """The model a trial of ``policy`` times: :meth:`PruningSpace.apply`'s, on int8 kernels where it says."""
        cand = self.space.apply(policy)
        return self.int8(cand, policy) if self.space.quantized(policy) else cand

    def cost(self, costs: dict) -> float:
        """The second objective of a Pareto search: predicted latency, else bytes on disk, else MACs."""
        return costs.get("latency_ratio", costs.get("size_ratio", costs["macs_ratio"]))

    def objective(self, trial):
        import optuna

        from .evaluate import accuracy_proxy

        policy = self.space.suggest(trial)
        cand, costs = self.measure(policy)
        ok = all(v <= 0 for v in costs["constraints"])
        record(trial, policy=policy, **costs)
        if not ok and not self.every_value:
            record(trial, proxy="skipped: over budget")
            acc = 0.0
        else:
            acc = accuracy_proxy(cand, self.calib, self.val)  # an int8 model has no BN left to re-estimate
            steps = self.config.trial_steps if ok else 0
            int8 = self.space.quantized(policy)  # an int8 model does not train: tune its float candidate, re-quantize
            # a sparse or shared candidate trains with its masks and codebooks held, so it stays what was measured
            held = self.space.density_layers or self.space.codebook_layers
            tuned = self.space.apply(policy, hold=True) if steps and (int8 or held) else cand
            for half in range(2 if steps else 0):
                self._tune(tuned, steps // 2, seed=self.config.seed + trial.number * 2 + half)
                acc = accuracy_proxy(self.int8(tuned, policy) if int8 else tuned, self.calib, self.val)
                trial.report(acc, half)
                if trial.should_prune():
                    raise optuna.TrialPruned()
        return (acc, self.cost(costs)) if len(self.directions) == 2 else acc

    def _tune(self, model, steps: int, seed: int) -> None:
        from ..prune.sensitivity import first_batches
        from ..train import fit

        batches = first_batches(self.data.loader("train", 128, seed=seed), max(1, steps), "search fine-tune")
        fit(model, batches, epochs=1, lr=self.config.lr, schedule="constant", seed=seed, progress=False)


def _read_json(path: str) -> dict | None:
    from ..documents import read_json_file

    return read_json_file(path, "latency table") if os.path.exists(path) else None


PROBLEMS.register("pruning")(ProblemEntry("pruning", PruningProblem, PruningProblem.__doc__.splitlines()[0]))
PROBLEMS.register("quadratic")(ProblemEntry("quadratic", QuadraticProblem, QuadraticProblem.__doc__.splitlines()[0]))
