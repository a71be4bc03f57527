"""Optuna studies for sweeps: storage, samplers, exact trial counts, heartbeats and retries.

Storage (``open_storage``):
- default: a SQLite file ``<run_dir>/study.db`` (``optuna-dashboard sqlite:///<run_dir>/study.db``
  opens it). Every transaction starts with ``BEGIN IMMEDIATE``, so a read-then-write (claiming a
  trial) holds the write lock from its first read and concurrent processes wait for each other
  instead of failing with "database is locked".
- ``journal:<path>`` (or a path ending in ``.log`` / ``.journal``): Optuna's JournalStorage on a
  ``JournalFileBackend`` (``JournalFile``) whose append lock is an ``flock`` (released by the
  kernel when its holder dies, so a killed worker never leaves a stale lock). A torn last line
  (a full disk or a crash mid-append) is cut off, under that lock, before the file is opened and
  before every append, with a warning naming the file and the bytes dropped (appending after it
  would make the journal unreadable for good); an append that fails part-way is rolled back.
- ``postgresql://user@host:port/db`` (any SQLAlchemy URL): workers on many machines.

Exact trial counts. ``ensure_slots(study, storage, n)`` enqueues ``n`` numbered *slots*
(WAITING trials with user attr ``slot``). Workers (``run_worker``) only ever *claim* a waiting
trial (``BaseStorage.set_trial_state_values(..., RUNNING)``, an atomic WAITING -> RUNNING
transition in every backend; ``Study.ask`` cannot be used because it creates a fresh trial when
the queue is empty) and never create one. Slot creation, stale-trial reaping and retries run
under one ``storage_lock`` per storage (an ``flock`` beside a SQLite or journal file, a
``pg_advisory_lock`` on PostgreSQL), which also covers schema and study creation; so any number
of ``sweep`` commands may start at once on one storage, and together they finish exactly ``n``
slots, each by one COMPLETE (or PRUNED) trial: no duplicate runs, nothing lost.

Heartbeats and retries, with Optuna's public API. RDB storages are ``RDBStorage(url,
heartbeat_interval=..., grace_period=..., heartbeat_stale_trial_callback=
RetryHeartbeatStaleTrialCallback(max_retry))`` and are reaped by ``optuna.storages.
fail_stale_trials``. Optuna's JournalStorage has no heartbeat, so ``JournalHeartbeatStorage``
records one as the trial system attr ``heartbeat`` and ``reap_stale`` fails its stale trials and
calls the same retry callback. A worker that dies (SIGKILL, lost machine) stops beating; after
``grace_period`` seconds a live worker marks its trial FAIL and the callback re-enqueues it as a
WAITING trial with the same parameters and slot. A trial whose objective raises is recorded
FAIL (with the error in user attr ``error``) and not retried in that run (the error would
repeat); the sweep then exits non-zero, and running it again retries every failed slot. A
worker interrupted by Ctrl-C re-enqueues its trial at once.

Resume. Re-running a sweep on the same run dir / storage loads the study (its objectives must
match: ``open_study`` refuses others), enqueues missing and failed slots, and workers run only the
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

import contextlib
import copy
import fcntl
import hashlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from sweeps.objectives import HAS_SET_CONSTRAINT, check_objectives, constraints_func, directions

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "nsga2")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
ACTIVE = (TrialState.WAITING, TrialState.RUNNING)


class FileLock:
    """An exclusive ``flock`` on ``path`` (created if needed), reentrant within one thread of one
    process; the kernel releases it when the holder dies. ``acquire``/``release`` make it a
    journal lock object for ``JournalFileBackend``."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._fd: int | None = None
        self._depth = 0
        self._owner: int | None = None
        self._mutex = threading.RLock()

    def acquire(self) -> bool:
        self._mutex.acquire()
        if self._depth == 0:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                self._mutex.release()
                raise
            self._fd = fd
        self._depth += 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        self._mutex.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class JournalHeartbeatStorage(JournalStorage):
    """JournalStorage with heartbeats kept as the trial system attr ``heartbeat`` (Unix time):
    the journal file serves processes of one machine, so one clock is shared."""

    def __init__(self, backend, *, url: str, heartbeat_interval: int, grace_period: int,
                 retry: Callable | None = None):
        super().__init__(backend)
        self.url = url
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.retry = retry

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, "heartbeat", time.time())

    def stale_trial_ids(self, study_id: int) -> list[int]:
        now, stale = time.time(), []
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
        return self.retry


def _mask_url(url: str) -> str:
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        user = cred.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in cred else url
    return url


def storage_url(storage: str | None, run_dir: str | Path | None = None) -> str:
    """The storage URL: ``storage`` (normalized: ``journal:`` paths made absolute), or the run
    dir's SQLite file."""
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


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite"):
        return None
    path = url.split(":///", 1)[-1]
    return None if path in ("", ":memory:") else Path(path)


_PG_LOCK_ENGINES: dict[str, Any] = {}
_FILE_LOCKS: dict[str, FileLock] = {}


def _file_lock(path: str) -> FileLock:
    """One FileLock per path and process, so nested and threaded holders share it."""
    if path not in _FILE_LOCKS:
        _FILE_LOCKS[path] = FileLock(path)
    return _FILE_LOCKS[path]


@contextlib.contextmanager
def storage_lock(url: str) -> Iterator[None]:
    """Serialize schema/study creation, slot creation, reaping and retries across every process
    on one storage: an flock beside a SQLite or journal file, a session advisory lock on
    PostgreSQL. Other SQLAlchemy dialects get no lock (a warning says so)."""
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(f"{path}.slots.lock"):
            yield
        return
    sqlite = _sqlite_path(url)
    if sqlite is not None:
        sqlite.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(f"{sqlite}.lock"):
            yield
        return
    if url.startswith("postgresql"):
        import sqlalchemy

        engine = _PG_LOCK_ENGINES.get(url)
        if engine is None:
            engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                              connect_args={"connect_timeout": 10})
            _PG_LOCK_ENGINES[url] = engine
        key = int.from_bytes(hashlib.sha256(b"adaptive-sparse-sweep").digest()[:8], "big",
                             signed=True)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        return
    log.warning("storage %s: no cross-process lock for this dialect; start one sweep command "
                "at a time", _mask_url(url))
    yield


class JournalFile(JournalFileBackend):
    """A ``JournalFileBackend`` whose appends leave no torn line: under the append lock the tail
    is checked (and a torn one cut off) before writing, and a write that fails part-way (a full
    disk: ENOSPC, EFBIG) is rolled back to the previous size before the error propagates."""

    def __init__(self, path: str | Path, lock: FileLock):
        super().__init__(str(path), lock_obj=lock)
        self.path, self.lock = Path(path), lock

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with self.lock:
            repair_journal(self.path, self.lock)
            size = self.path.stat().st_size
            try:
                super().append_logs(logs)
            except OSError as e:
                os.truncate(self.path, size)
                raise OSError(e.errno, f"storage: cannot append to journal {self.path} "
                                       f"({e.strerror or e}); the journal was left as it "
                                       f"was") from None


def repair_journal(path: str | Path, lock: FileLock) -> int:
    """Cut a torn last line (no final newline: a write cut short by a full disk or a crash) off
    the journal ``path`` under its append ``lock``; returns the bytes dropped."""
    path = Path(path)
    with lock:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return 0
        if size == 0:
            return 0
        with open(path, "rb+") as f:
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
            keep, pos, chunk = 0, size, 1 << 16
            while pos > 0:
                start = max(0, pos - chunk)
                f.seek(start)
                block = f.read(pos - start)
                nl = block.rfind(b"\n")
                if nl >= 0:
                    keep = start + nl + 1
                    break
                pos = start
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        log.warning("storage: journal %s ended in a torn line (an interrupted write); dropped "
                    "its last %d bytes so the journal stays readable", path, size - keep)
        return size - keep


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
    if "://" not in url and not url.startswith("journal:"):
        raise ValueError(f"storage: expected sqlite:///PATH, postgresql://..., journal:PATH or a "
                         f"*.log path, got {url!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        try:
            with storage_lock(url):
                return _open_storage(url, heartbeat_interval, grace, retry)
        except ValueError:
            raise
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"storage: cannot open {_mask_url(url)!r}: {reason}") from None


def _open_storage(url: str, heartbeat_interval: int, grace: int, retry) -> BaseStorage:
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        lock = _file_lock(f"{path}.flock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            repair_journal(path, lock)
            backend = JournalFile(path, lock)
        except OSError as e:
            raise ValueError(f"storage: cannot open journal file {str(path)!r}: {e}") from None
        try:
            return JournalHeartbeatStorage(backend, url=url, heartbeat_interval=heartbeat_interval,
                                           grace_period=grace, retry=retry)
        except ValueError as e:
            raise ValueError(f"storage: journal file {str(path)!r} is not a readable Optuna "
                             f"journal ({e})") from None
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    sqlite = _sqlite_path(url)
    if sqlite is not None:
        sqlite.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 120}
    elif url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    rdb = RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                     grace_period=grace, heartbeat_stale_trial_callback=retry)
    if sqlite is not None:
        _begin_immediate(rdb.engine)
    return rdb


def _begin_immediate(engine) -> None:
    """SQLite transactions take the write lock at BEGIN (SQLAlchemy's pysqlite recipe)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()


def storage_key(storage: BaseStorage) -> str:
    """The URL ``storage_lock`` locks for an opened storage."""
    url = getattr(storage, "url", None)
    if not isinstance(url, str):
        raise TypeError(f"storage: expected a storage from open_storage, got "
                        f"{type(storage).__name__}")
    return url


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
    """Create the study or load it (objectives named with ``set_metric_names``); refuse a study
    created with other objectives."""
    objectives = check_objectives(list(objectives))
    if not isinstance(name, str) or not name:
        raise ValueError(f"study_name: expected a non-empty string, got {name!r}")
    with storage_lock(storage_key(storage)):
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                    directions=directions(objectives), load_if_exists=True)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning,
                                message=".*set_metric_names")
        stored = study.user_attrs.get("objectives")
        if stored is None:
            study.set_user_attr("objectives", list(objectives))
            study.set_metric_names(list(objectives))
        elif list(stored) != list(objectives):
            raise ValueError(f"objectives: study {name!r} was created with objectives "
                             f"{list(stored)}, not {list(objectives)}; use a new run dir or "
                             f"study name")
        elif study.metric_names is None:
            study.set_metric_names(list(objectives))
    stored_dirs = [d.name.lower() for d in study.directions]
    if stored_dirs != directions(objectives):
        raise ValueError(f"objectives: study {name!r} has directions {stored_dirs}, expected "
                         f"{directions(objectives)} for {list(objectives)}")
    return study


def _slot_trials(study: optuna.Study) -> dict[int, list]:
    slots: dict[int, list] = {}
    for t in study.get_trials(deepcopy=False):
        if "slot" in t.user_attrs:
            slots.setdefault(int(t.user_attrs["slot"]), []).append(t)
    return slots


def ensure_slots(study: optuna.Study, storage: BaseStorage, n_trials: int) -> int:
    """Enqueue the slots ``0 .. n_trials-1`` that have no trial yet, and one retry (same
    parameters) of each slot whose trials all FAILED; returns how many trials were added.
    Safe from any number of processes at once (``storage_lock``)."""
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 0:
        raise ValueError(f"n_trials: expected a non-negative int, got {n_trials!r}")
    added = 0
    with storage_lock(storage_key(storage)):
        _reap_locked(study, storage)
        slots = _slot_trials(study)
        for slot in range(n_trials):
            trials = slots.get(slot, [])
            if not trials:
                study.enqueue_trial({}, user_attrs={"slot": slot})
                added += 1
            elif all(t.state == TrialState.FAIL for t in trials):
                last = max(trials, key=lambda t: t.number)
                study.enqueue_trial(dict(last.params), user_attrs={"slot": slot,
                                                                   "retry_of": last.number})
                added += 1
    return added


def slot_states(study: optuna.Study) -> dict[int, str]:
    """Each slot's state: complete / pruned (one of its trials is), else running / waiting,
    else fail."""
    out = {}
    for slot, trials in _slot_trials(study).items():
        states = {t.state for t in trials}
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                      TrialState.WAITING, TrialState.FAIL):
            if state in states:
                out[slot] = state.name.lower()
                break
    return out


def trial_counts(study: optuna.Study) -> dict[int, int]:
    """Slots by state (``slot_states``): ``slots``, ``done`` (complete + pruned), ``complete``,
    ``pruned``, ``fail``, ``running``, ``waiting``; ``trials``: every trial of the study."""
    states = list(slot_states(study).values())
    counts = {s: states.count(s) for s in ("complete", "pruned", "fail", "running", "waiting")}
    return {"slots": len(states), "done": counts["complete"] + counts["pruned"], **counts,
            "trials": len(study.get_trials(deepcopy=False))}


def _study_id(study: optuna.Study, storage: BaseStorage) -> int:
    return storage.get_study_id_from_name(study.study_name)


def claim(study: optuna.Study, storage: BaseStorage) -> optuna.Trial | None:
    """Atomically take one WAITING trial (WAITING -> RUNNING), or None; never creates one."""
    for t in storage.get_all_trials(_study_id(study, storage), deepcopy=False,
                                    states=(TrialState.WAITING,)):
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                continue
        except UpdateFinishedTrialError:
            continue
        storage.record_heartbeat(t._trial_id)  # at once: a trial without a beat is never reaped
        return optuna.Trial(study, t._trial_id)
    return None


class _Heartbeat:
    def __init__(self, storage: BaseStorage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.interval = storage.get_heartbeat_interval()
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


def _reap_locked(study: optuna.Study, storage: BaseStorage) -> None:
    if isinstance(storage, RDBStorage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return
    if not isinstance(storage, JournalHeartbeatStorage):
        return
    for trial_id in storage.stale_trial_ids(_study_id(study, storage)):
        try:
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        frozen = storage.get_trial(trial_id)
        if frozen.state == TrialState.FAIL and "error" not in frozen.user_attrs \
                and storage.retry is not None:
            storage.retry(study, copy.deepcopy(frozen))


def reap_stale(study: optuna.Study, storage: BaseStorage) -> None:
    """Fail the running trials whose heartbeat is older than the grace period and re-enqueue
    them (the retry callback), under ``storage_lock``."""
    with storage_lock(storage_key(storage)):
        _reap_locked(study, storage)


def _retry_now(study: optuna.Study, storage: BaseStorage, trial: optuna.Trial) -> None:
    with storage_lock(storage_key(storage)):
        frozen = storage.get_trial(trial._trial_id)
        callback = storage.get_heartbeat_stale_trial_callback() or \
            RetryHeartbeatStaleTrialCallback(max_retry=3)
        callback(study, copy.deepcopy(frozen))


def run_worker(study: optuna.Study, storage: BaseStorage, objective, *,
               poll_interval: float = 1.0, max_trials: int | None = None,
               wait_for_running: bool = True) -> int:
    """Run trials from the slot queue until none is waiting (or running, when
    ``wait_for_running``, so a dead worker's trial is reaped and retried). Returns the number of
    trials this worker finished."""
    finished = 0
    while max_trials is None or finished < max_trials:
        reap_stale(study, storage)
        trial = claim(study, storage)
        if trial is None:
            running = storage.get_all_trials(_study_id(study, storage), deepcopy=False,
                                             states=(TrialState.RUNNING,))
            if wait_for_running and running:
                time.sleep(poll_interval)
                continue
            break
        state, values = TrialState.COMPLETE, None
        try:
            with _Heartbeat(storage, trial._trial_id):
                values = objective(trial)
        except optuna.TrialPruned as e:
            state = TrialState.PRUNED
            _set_attr(trial, "pruned", str(e)[:2000])
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            _retry_now(study, storage, trial)
            raise
        except Exception as e:
            state = TrialState.FAIL
            log.error("trial %d failed: %r", trial.number, e)
            _set_attr(trial, "error", repr(e)[:2000])
        try:
            study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)
        except (UpdateFinishedTrialError, ValueError):
            if not storage.get_trial(trial._trial_id).state.is_finished():
                raise
            log.warning("trial %d was marked stale (no heartbeat for %s s) and retried; its "
                        "result is dropped", trial.number, getattr(storage, "grace_period", "?"))
            continue
        finished += 1
    return finished


def _set_attr(trial: optuna.Trial, key: str, value: Any) -> None:
    try:
        trial.set_user_attr(key, value)
    except UpdateFinishedTrialError:
        pass
