"""Optuna studies for sweeps: storage, samplers, exact trial counts, heartbeats and retries.

Storage (``open_storage``):
- default: a SQLite file ``<run_dir>/study.db`` (``optuna-dashboard sqlite:///<run_dir>/study.db``
  opens it); fine for one process, or a few.
- ``journal:<path>`` (or a path ending in ``.log`` / ``.journal``): Optuna's JournalStorage on a
  ``JournalFileBackend``, the robust choice for several processes on one machine.
- ``postgresql://user@host:port/db`` (any SQLAlchemy URL): workers on many machines.

Exact trial counts. ``ensure_slots(study, n)`` enqueues ``n`` numbered *slots* (WAITING trials
with user attr ``slot``) once, from one coordinating process. Workers (``run_worker``) only ever
*claim* a waiting trial (an atomic WAITING -> RUNNING transition in every backend) and never
create one, so any number of workers on any number of machines finish exactly ``n`` slots: no
overshoot (which ``MaxTrialsCallback`` allows when workers finish together) and nothing lost.
``Study.ask`` cannot be used for this because it creates a fresh trial when the queue is empty;
``_claim`` therefore pops the queue through Optuna's own pop routine (the one ``ask`` uses).

Heartbeats and retries. Every running trial records a heartbeat every ``heartbeat_interval``
seconds (RDB storages natively; the journal through ``JournalHeartbeatStorage``, which stores it
as a trial system attr). A worker that dies (SIGKILL, lost machine) stops beating; after
``grace_period`` seconds any live worker marks its trial FAIL and
``RetryHeartbeatStaleTrialCallback`` re-enqueues it as a WAITING trial with the same parameters
and slot, so that trial is retried and nothing else is lost. Workers stay until no slot is
waiting or running, so a straggler's trial is always picked up. A trial whose objective raises
is recorded FAIL (with the error in user attr ``error``) and not retried: the error would repeat.
A worker interrupted by Ctrl-C re-enqueues its trial at once.

Resume. Re-running a sweep on the same run dir / storage loads the study (its objectives must
match: ``open_study`` refuses others), enqueues only missing slots, and workers run only the
waiting ones: completed trials are never repeated. Trials left RUNNING by a killed run are
retried once their heartbeat is older than the grace period.

Seeding. The sampler is seeded (``seed``); with one worker the same seed gives the same trials.
Parallel workers interleave nondeterministically; TPE uses the constant liar there.

Pruning. Optuna cannot prune multi-objective studies (``Trial.should_prune`` is single-objective
only), so a multi-objective sweep uses a density *constraint* (``max_density``, passed to the
sampler's ``constraints_func``) instead, and pruning is left to single-objective searches such as
the outer gate-hyperparameter search (``sweeps.gate_search``).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import (BaseStorage, JournalStorage, RDBStorage,
                             RetryHeartbeatStaleTrialCallback)
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from sweeps.objectives import HAS_SET_CONSTRAINT, check_objectives, constraints_func, directions

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "nsga2")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class JournalHeartbeatStorage(JournalStorage, BaseHeartbeat):
    """JournalStorage with heartbeats kept as the trial system attr ``heartbeat`` (Unix time).

    The journal file backend serves processes of one machine, so one clock is shared."""

    def __init__(self, backend, *, heartbeat_interval: int, grace_period: int,
                 heartbeat_stale_trial_callback=None):
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, "heartbeat", time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get("heartbeat")
            if beat is None and t.datetime_start is not None:
                beat = t.datetime_start.timestamp()
            if beat is not None and now - beat > self.grace_period:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.heartbeat_stale_trial_callback


def _mask_url(url: str) -> str:
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        user = cred.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in cred else url
    return url


def storage_url(storage: str | None, run_dir: str | Path | None) -> str:
    """The storage URL actually used: ``storage`` itself, or the run dir's SQLite file."""
    if storage is None:
        if run_dir is None:
            raise ValueError("storage: expected a URL, or a run_dir for the default SQLite file")
        path = Path(run_dir).resolve() / "study.db"
        return f"sqlite:///{path}"
    if not isinstance(storage, str) or not storage:
        raise ValueError(f"storage: expected a URL string, got {storage!r}")
    if storage.startswith("journal:"):
        return f"journal:{Path(storage[len('journal:'):].removeprefix('//')).resolve()}"
    if storage.endswith((".log", ".journal")) and "://" not in storage:
        return f"journal:{Path(storage).resolve()}"
    return storage


def open_storage(storage: str | None = None, run_dir: str | Path | None = None, *,
                 heartbeat_interval: int = 10, grace_period: int | None = None,
                 max_retry: int | None = 3) -> BaseStorage:
    """Open (creating if needed) the sweep's storage; see the module docstring for the URLs.

    Raises ValueError naming ``storage`` when the URL is malformed or the server unreachable."""
    url = storage_url(storage, run_dir)
    if isinstance(heartbeat_interval, bool) or not isinstance(heartbeat_interval, int) \
            or heartbeat_interval < 1:
        raise ValueError(f"heartbeat_interval: expected a positive int (seconds), "
                         f"got {heartbeat_interval!r}")
    grace = grace_period if grace_period is not None else 3 * heartbeat_interval
    if isinstance(grace, bool) or not isinstance(grace, int) or grace <= heartbeat_interval:
        raise ValueError(f"grace_period: expected an int > heartbeat_interval "
                         f"({heartbeat_interval}), got {grace!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _open_storage(url, heartbeat_interval, grace, max_retry)


def _open_storage(url: str, heartbeat_interval: int, grace: int, max_retry: int | None):
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = JournalFileBackend(str(path))
        except OSError as e:
            raise ValueError(f"storage: cannot open journal file {str(path)!r}: {e}") from None
        return JournalHeartbeatStorage(backend, heartbeat_interval=heartbeat_interval,
                                       grace_period=grace, heartbeat_stale_trial_callback=retry)
    if "://" not in url:
        raise ValueError(f"storage: expected sqlite:///PATH, postgresql://..., journal:PATH or a "
                         f"*.log path, got {url!r}")
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        Path(url.split(":///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                          grace_period=grace, heartbeat_stale_trial_callback=retry)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"storage: cannot open {_mask_url(url)!r}: {reason}") from None


def make_sampler(name: str = "tpe", *, seed: int | None = 0, constrained: bool = False,
                 population_size: int = 20, n_startup_trials: int = 10):
    """TPE (default; multivariate, grouped for the per-method conditional space) or NSGA-II."""
    cf = constraints_func if constrained and not HAS_SET_CONSTRAINT else None
    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                              constraints_func=cf,
                                              n_startup_trials=n_startup_trials)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=cf,
                                             population_size=population_size)
    raise ValueError(f"sampler: expected one of {list(SAMPLERS)}, got {name!r}")


def open_study(storage: BaseStorage, name: str, objectives: Sequence[str], *,
               sampler=None) -> optuna.Study:
    """Create the study or load it; refuse a study created with other objectives."""
    objectives = check_objectives(list(objectives))
    if not isinstance(name, str) or not name:
        raise ValueError(f"study_name: expected a non-empty string, got {name!r}")
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                directions=directions(objectives), load_if_exists=True)
    stored = study.user_attrs.get("objectives")
    if stored is None:
        study.set_user_attr("objectives", list(objectives))
    elif list(stored) != list(objectives):
        raise ValueError(f"objectives: study {name!r} was created with objectives {list(stored)}, "
                         f"not {list(objectives)}; use a new run dir or study name")
    stored_dirs = [d.name.lower() for d in study.directions]
    if stored_dirs != directions(objectives):
        raise ValueError(f"objectives: study {name!r} has directions {stored_dirs}, expected "
                         f"{directions(objectives)} for {list(objectives)}")
    return study


def ensure_slots(study: optuna.Study, n_trials: int) -> int:
    """Enqueue the slots ``0 .. n_trials-1`` that do not exist yet; returns how many were added.

    Call from one process only (the sweep's coordinator): two creators racing would duplicate
    slots. More workers, anywhere, join with ``run_worker`` alone."""
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 0:
        raise ValueError(f"n_trials: expected a non-negative int, got {n_trials!r}")
    have = {t.user_attrs["slot"] for t in study.get_trials(deepcopy=False)
            if "slot" in t.user_attrs}
    added = 0
    for slot in range(n_trials):
        if slot not in have:
            study.enqueue_trial({}, user_attrs={"slot": slot})
            added += 1
    return added


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Slots by outcome. A slot is done when one of its trials is COMPLETE or PRUNED, or FAILED
    by an error (not by a stale heartbeat that was retried)."""
    trials = study.get_trials(deepcopy=False)
    slots = {t.user_attrs["slot"] for t in trials if "slot" in t.user_attrs}
    by_state = {s: 0 for s in ("complete", "pruned", "fail", "running", "waiting")}
    for t in trials:
        by_state[t.state.name.lower()] = by_state.get(t.state.name.lower(), 0) + 1
    done = {t.user_attrs["slot"] for t in trials if "slot" in t.user_attrs and
            (t.state in (TrialState.COMPLETE, TrialState.PRUNED)
             or (t.state == TrialState.FAIL and "error" in t.user_attrs))}
    return {"slots": len(slots), "done": len(done), **by_state}


def _claim(study: optuna.Study) -> optuna.Trial | None:
    """Atomically take one WAITING trial, or None; never creates a trial (see module doc)."""
    study._thread_local.cached_all_trials = None
    trial_id = study._pop_waiting_trial_id()
    if trial_id is None:
        return None
    storage = study._storage
    if isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval() is not None:
        storage.record_heartbeat(trial_id)  # at once: a trial without a beat is never reaped
    return optuna.Trial(study, trial_id)


class _Heartbeat:
    def __init__(self, storage: BaseStorage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.interval = storage.get_heartbeat_interval() if isinstance(storage, BaseHeartbeat) \
            else None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except (UpdateFinishedTrialError, KeyError):
                return
            except Exception as e:  # a transient storage error must not kill the trial
                log.warning("heartbeat of trial id %d failed: %s", self.trial_id, e)
            if self.stop.wait(self.interval):
                return

    def __enter__(self):
        if self.interval is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def _reap_stale(study: optuna.Study) -> None:
    storage = study._storage
    if isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval() is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def _retry_now(study: optuna.Study, trial: optuna.Trial) -> None:
    frozen = study._storage.get_trial(trial._trial_id)
    callback = getattr(study._storage, "get_heartbeat_stale_trial_callback", lambda: None)()
    (callback or RetryHeartbeatStaleTrialCallback(max_retry=3))(study, copy.deepcopy(frozen))


def run_worker(study: optuna.Study, objective, *, poll_interval: float = 1.0,
               max_trials: int | None = None, wait_for_running: bool = True) -> int:
    """Run trials from the slot queue until none is waiting (or running, when
    ``wait_for_running``, so a dead worker's trial is reaped and retried). Returns the number of
    trials this worker finished."""
    finished = 0
    while max_trials is None or finished < max_trials:
        _reap_stale(study)
        trial = _claim(study)
        if trial is None:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if wait_for_running and running:
                time.sleep(poll_interval)
                continue
            break
        state, values = TrialState.COMPLETE, None
        try:
            with _Heartbeat(study._storage, trial._trial_id):
                values = objective(trial)
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            _retry_now(study, trial)
            raise
        except Exception as e:
            state = TrialState.FAIL
            log.error("trial %d failed: %r", trial.number, e)
            try:
                trial.set_user_attr("error", repr(e)[:2000])
            except UpdateFinishedTrialError:
                pass
        try:
            study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)
        except UpdateFinishedTrialError:
            log.warning("trial %d was marked stale and retried elsewhere; result dropped",
                        trial.number)
            continue
        finished += 1
    return finished
