"""One worker of a study: ``python -m slimkit.search.worker JOB.json [--index K]`` (or ``slimkit search --worker``).

A worker builds its problem from the job (:mod:`slimkit.search.problems`), joins the study in the
job's storage and runs trials one at a time until the study holds ``trials`` finished ones (complete
or pruned), or the job's deadline passes. Any number of workers, on any number of machines that
reach the storage, run this same loop: Optuna's storage hands each its own trial, and the
heartbeat (:mod:`slimkit.search.study`) turns the running trial of a worker that died into a
failed one, re-queued once with the same policy, which the next free worker picks up.

When the study holds as many running trials as it still needs, a worker waits instead of
starting another one (so a study of ``N`` trials ends with ``N``, give or take a race between
workers asking at the same instant), and checks for stale trials while it waits: if the worker
of one of those trials died, its retry must still be run by someone.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import SlimkitError
from .problems import PROBLEMS
from .study import GRACE_S, HEARTBEAT_S, SAMPLERS, fail_dead_trials, open_study

MAX_FAILURES = 5  # consecutive trials failing with an error: the problem is broken, not the trial
JOB_KEYS = {"problem", "study", "storage", "fingerprint", "sampler", "seed", "trials"}


def check_job(job: object, where: str) -> dict:
    """``job`` if it has what a worker needs, else one line naming the missing or wrong field."""
    from ..documents import expect, expect_keys

    expect(job, dict, where, (), "a search job (mapping)")
    expect_keys(job, set(job), where, (), required=JOB_KEYS)
    for key, types in (("problem", str), ("study", str), ("storage", str), ("sampler", str), ("seed", int),
                       ("trials", int), ("fingerprint", dict)):
        expect(job[key], types, where, (key,))
    PROBLEMS.get(job["problem"])  # an unknown problem is one line naming the known ones
    SAMPLERS.get(job["sampler"])
    return job


def _counts(study) -> tuple[int, int]:
    from optuna.trial import TrialState

    finished = running = 0
    for t in study.get_trials(deepcopy=False):
        finished += t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        running += t.state == TrialState.RUNNING
    return finished, running


def run(job: dict, *, index: int = 0, problem=None, log=None) -> int:
    """Run trials of the job's study until it is done or the deadline passes; returns the trials run here.

    Args:
        job: the job document (see the module docstring; :func:`check_job`).
        index: this worker's number on its machine: the sampler is seeded ``seed + index`` so parallel
            workers do not propose the same start-up points.
        problem: an already built problem (the coordinator's in-process worker), else one is built.
        log: called with one line per finished trial.
    """
    import optuna

    own = problem is None  # built here: the layer times it measures are written back for the coordinator
    problem = problem if problem is not None else PROBLEMS.get(job["problem"]).build(job)
    sampler = SAMPLERS.get(job["sampler"]).make(job["seed"] + index)
    heartbeat, grace = int(job.get("heartbeat_s", HEARTBEAT_S)), int(job.get("grace_s", GRACE_S))
    study = open_study(job["storage"], job["study"], job["fingerprint"], sampler, problem.directions,
                       pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0),
                       heartbeat_s=heartbeat, grace_s=grace)
    target, deadline = job["trials"], job.get("deadline")
    last_error: list[BaseException] = []

    def objective(trial):
        try:
            return problem.objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as e:  # noqa: BLE001 - one bad candidate fails its trial, not the study
            last_error[:] = [e]
            raise

    try:
        return _loop(study, problem, objective, last_error, target, deadline, heartbeat, grace, index, log)
    finally:
        table = getattr(problem, "table", None)
        if own and table is not None and table.added and job.get("latency_table"):
            # layer times measured here go back to the coordinator, which merges them into the study's table
            import json
            import os

            from ..artifact import atomic_write_text

            atomic_write_text(f"{job['latency_table']}.worker-{index}-{os.getpid()}",
                              json.dumps({"layers": table.added}))


def _loop(study, problem, objective, last_error, target, deadline, heartbeat, grace, index, log) -> int:
    from ..progress import Progress

    ran = failures = 0
    # one bar (or log line per trial) of the study's finished trials, with an ETA from this worker's rate (never past
    # the time budget's deadline)
    bar = (Progress(target, f"worker {index}: search trials", log, done=_counts(study)[0], deadline=deadline)
           if log is not None else None)
    try:
        while deadline is None or time.time() < deadline:
            finished, running = _counts(study)
            if finished >= target:
                break
            if finished + running >= target:
                fail_dead_trials(study, grace)  # a dead worker's trial comes back as a waiting retry
                time.sleep(min(1.0, heartbeat))
                continue
            last_error.clear()
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
            ran += 1
            if last_error:
                failures += 1
                if failures >= MAX_FAILURES:
                    e = last_error[0]
                    raise SlimkitError(f"search: {failures} trials in a row failed; the last with "
                                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            else:
                failures = 0
            if bar is not None:
                bar.update(_counts(study)[0] - bar.n, note=f"{ran} run by this worker")
    finally:
        if bar is not None:
            bar.close()
    return ran


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slimkit.search.worker",
                                     description="Run one worker of a slimkit search study.")
    parser.add_argument("job", help="the study's search.json (written by slimkit search)")
    parser.add_argument("--index", type=int, default=0, help="this worker's number on its machine (seeds it)")
    parser.add_argument("--threads", type=int, help="torch threads (default: the job's)")
    args = parser.parse_args(argv)
    try:
        from ..documents import read_json_file

        job = check_job(read_json_file(args.job, "search job"), args.job)
        import torch

        torch.set_num_threads(args.threads or int(job.get("threads", 1)))
        n = run(job, index=args.index)
    except SlimkitError as e:
        print(f"slimkit search worker: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"slimkit search worker {args.index}: {n} trials", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
