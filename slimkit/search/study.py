"""The Optuna side of the search: samplers, storage (SQLite or PostgreSQL), heartbeats, workers, warm starts.

Optuna is the engine (no home-made optimiser). :data:`SAMPLERS` maps a name to a sampler factory:
``tpe`` (with constraints; the default), ``gp`` (Gaussian-process Bayesian optimisation), ``nsga2``
(a Pareto front of accuracy against latency) and ``random`` (the control). Storage is a SQLite file
by default; any SQLAlchemy URL (``postgresql://user@host:5432/db``) lets worker processes on any
number of machines join one study. Every storage gets a heartbeat: a trial whose worker stops
beating (killed with SIGKILL, say) is marked failed after the grace period and retried once by
another worker (Optuna's ``RetryFailedTrialCallback``), so no completed trial is lost and no
running one is abandoned.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import SlimkitError
from ..registry import Registry

HEARTBEAT_S = 5
GRACE_S = 20


@dataclass(frozen=True)
class SamplerEntry:
    name: str
    multi_objective: bool
    make: Callable  # seed -> optuna sampler (constraints come from each trial's set_constraint)
    paper: str = ""
    needs_every_value: bool = False  # models the objective over infeasible trials too


SAMPLERS: Registry[SamplerEntry] = Registry("search sampler")


def _tpe(seed):
    import optuna

    # multivariate TPE models the dimensions jointly (ratios of one stage interact); the constant liar keeps
    # parallel workers from proposing the same point
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10, constant_liar=True)


def _gp(seed):
    import optuna

    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=10)


def _nsga2(seed):
    import optuna

    return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)


def _random(seed):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


for _entry in (SamplerEntry("tpe", False, _tpe, "Bergstra et al., NeurIPS 2011 (TPE)"),
               SamplerEntry("gp", False, _gp, "Gaussian-process Bayesian optimisation (Optuna GPSampler)", True),
               SamplerEntry("nsga2", True, _nsga2, "Deb et al., IEEE TEC 2002 (NSGA-II)"),
               SamplerEntry("random", False, _random, "the control")):
    SAMPLERS.register(_entry.name)(_entry)


def storage_url(url: str | None, out_dir: str) -> str:
    """The storage: ``url`` as given, else a SQLite file in ``out_dir``."""
    if url:
        return url
    os.makedirs(out_dir, exist_ok=True)
    return f"sqlite:///{os.path.abspath(os.path.join(out_dir, 'study.db'))}"


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S):
    """An Optuna RDB storage with heartbeats and retry of stale trials; a URL that does not connect is one line."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine["connect_args"] = {"connect_timeout": 10}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_optuna()
    for attempt in range(5):
        try:
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
        except Exception as e:  # noqa: BLE001 - the database is the user's: say where it is, not the stack
            if attempt < 4 and _lost_schema_race(e):
                # workers started together on an empty database all create Optuna's tables; the ones
                # that lose that race find them made and simply connect again
                time.sleep(0.2 * (attempt + 1))
                continue
            raise SlimkitError(f"search: cannot open the study storage {_where(url)} ({type(e).__name__}: "
                               f"{_first_line(e)})") from None


def _lost_schema_race(e: BaseException) -> bool:
    text = str(e).lower()
    return "already exists" in text or "duplicate" in text or type(e).__name__ == "IntegrityError"


def fail_dead_trials(study, grace_s: int = GRACE_S, silent_s: float | None = None) -> None:
    """Fail (and so retry) the running trials of workers that died, including those that died too early to beat.

    Optuna's ``fail_stale_trials`` only sees trials with a heartbeat. A worker killed between creating
    its trial and the first beat (the sampler runs in between: TPE on many trials takes a while) leaves
    a running trial no one would ever fail, and the study would wait for it forever. Such a trial,
    older than ``silent_s`` (default five grace periods, at least 30 s), is failed here and handed to
    the same retry callback.
    """
    import copy
    from datetime import datetime, timedelta

    import optuna
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)
    storage = study._storage
    rdb = getattr(storage, "_backend", storage)
    if not hasattr(rdb, "scoped_session"):
        return
    oldest = datetime.now() - timedelta(seconds=max(30, 5 * grace_s) if silent_s is None else silent_s)
    silent = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
              if t.datetime_start is not None and t.datetime_start < oldest]
    if not silent:
        return
    with rdb.scoped_session() as session:
        beating = {row.trial_id for row in session.query(models.TrialHeartbeatModel.trial_id)
                   .filter(models.TrialHeartbeatModel.trial_id.in_([t._trial_id for t in silent]))}
    retry = storage.get_heartbeat_stale_trial_callback()
    for t in silent:
        if t._trial_id in beating:
            continue
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL) and retry is not None:
                retry(study, copy.deepcopy(storage.get_trial(t._trial_id)))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker failed it first


def quiet_optuna() -> None:
    """Hide Optuna's notes on experimental and deprecated arguments (heartbeats are both): they are ours to
    track, not the user's to read on every run."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(optuna|slimkit\.search)")


def _where(url: str) -> str:
    m = re.match(r"^(\w+)(?:\+\w+)?://(?:[^@/]*@)?([^/:]*)(?::(\d+))?", url)
    if m and m.group(1) != "sqlite":
        return f"{m.group(1)} at host {m.group(2) or 'localhost'}, port {m.group(3) or 'default'}"
    return url


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:240] if text else ""


def open_study(url: str, name: str, fingerprint: dict, sampler, directions: list[str], *, pruner=None,
               heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S):
    """Create or join study ``name``; a study of another model or space under that name is refused."""
    import optuna

    storage = open_storage(url, heartbeat_s, grace_s)
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=directions,
                                    load_if_exists=True, pruner=pruner)
    except ValueError as e:  # e.g. a study with other directions
        raise SlimkitError(f"search: study {name!r} in {_where(url)} cannot be joined: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001
        raise SlimkitError(f"search: cannot open study {name!r} in {_where(url)} ({type(e).__name__}: "
                           f"{_first_line(e)})") from None
    existing = study.user_attrs.get("fingerprint")
    if existing is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif existing != fingerprint:
        diff = sorted(k for k in set(existing) | set(fingerprint) if existing.get(k) != fingerprint.get(k))
        raise SlimkitError(f"search: study {name!r} in {_where(url)} searches another model or space (differs in "
                           f"{', '.join(diff)}: {existing.get(diff[0])!r} vs {fingerprint.get(diff[0])!r}); "
                           "give another --study name")
    return study
