"""Sweeps across processes, through `adaptive-sparse sweep`: exact trial counts on SQLite, the
journal file and a real PostgreSQL server; several commands started at once on one fresh study,
and again on an existing one (no schema crash, no duplicate, exactly n slots); a worker killed
with SIGKILL mid-trial whose trial is retried; a journal whose last line was torn by a full
disk; a sweep whose trials all fail exits 1 and a re-run retries them.

PostgreSQL: the `postgres_url` fixture starts a throwaway cluster (initdb + pg_ctl from
/usr/lib/postgresql/*/bin) on a free localhost port in a tmp dir, trust auth, and stops it at
the end. PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user
(created by Debian's package) through `runuser -u postgres --`, or `nobody` when that user is
absent. The tests skip only when no PostgreSQL binaries are installed (CI's .ci/run installs
Debian's `postgresql`)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from sweeps.frontier import load_run

REPO = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _pg_bin() -> Path | None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(d, "pg_ctl")):
            return Path(d)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not installed (apt-get install postgresql)")
    # its own folder: pytest prunes old numbered basetemps, which would pull the data directory
    # from under a server started by a long session
    root = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = "postgres"
        try:
            import pwd
            pwd.getpwnam(user)
        except KeyError:
            user = "nobody"
        prefix = ["runuser", "-u", user, "--"]
        os.chmod(root, 0o777)
        shutil.chown(sock, user)
    port = _free_port()
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U",
                    "postgres", "--no-sync"], check=True, capture_output=True)
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l",
                    str(root / "log"), "-w", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _config(path: Path, *, name: str, sleep: float, marker_dir: Path | None = None,
            factory: str = "sweeps.evaluators:SyntheticEvaluator", grace_period: int = 3,
            **args) -> Path:
    cfg = {"name": name, "seed": 0, "n_startup_trials": 4, "heartbeat_interval": 1,
           "grace_period": grace_period, "max_retry": 2,
           "methods": {"sliding_window": {"window": {"low": 1, "high": 30}},
                       "gate/top_p": {"p": {"low": 0.5, "high": 0.99}}},
           "evaluator": {"factory": factory,
                         "args": {"sleep": sleep,
                                  "marker_dir": str(marker_dir) if marker_dir else None,
                                  **args}}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _sweep(config: Path, run_dir: Path, storage: str, n_trials: int, workers: int,
           extra: tuple[str, ...] = (), pythonpath: Path | None = None):
    cmd = [sys.executable, "-m", "adaptive_sparse.cli", "sweep", "--config", str(config),
           "--n-trials", str(n_trials), "--workers", str(workers), "--storage", storage,
           "--run-dir", str(run_dir), "--no-progress", *extra]
    paths = [str(REPO), *([str(pythonpath)] if pythonpath else []),
             os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(procs, timeout: float = 150) -> list[str]:
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return outs


def _check_exact(run_dir: Path, n_trials: int, killed: int = 0):
    """Every slot done by exactly one trial (complete, or pruned as a duplicate of a complete
    one), `killed` FAIL trials (retried), nothing else."""
    _, study = load_run(run_dir)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t.user_attrs["slot"] for t in done) == list(range(n_trials))
    assert all("duplicate_of" in t.user_attrs for t in done if t.state == TrialState.PRUNED)
    assert len(failed) == killed, [(t.number, t.state, t.user_attrs) for t in trials]
    assert len(trials) == n_trials + killed
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return done, failed


def _storages(tmp_path, request):
    if request.param == "journal":
        return f"journal:{tmp_path / 'study.log'}"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(params=["sqlite", "journal", "postgresql"])
def storage(tmp_path, request):
    return _storages(tmp_path, request)


def _backends(*default: str):
    """Every backend; those not in `default` only in the slow run (each costs 20-60 s)."""
    return pytest.mark.parametrize("storage", [
        b if b in default else pytest.param(b, marks=pytest.mark.slow)
        for b in ("sqlite", "journal", "postgresql")], indirect=True)


def _name(tmp_path: Path, prefix: str) -> str:
    """A study name unique per test (one PostgreSQL database serves the module)."""
    return f"{prefix}-{tmp_path.name}"


@_backends("sqlite", "postgresql")
def test_concurrent_commands_on_one_fresh_study_then_resumes(tmp_path, storage):
    """4 `sweep` commands started at once on a new study, then 3 at once growing it to 20:
    no schema-creation crash, every command exits 0, exactly n slots, no duplicate run."""
    cfg = _config(tmp_path / "cfg.yaml", name=_name(tmp_path, "conc"), sleep=0.05,
                  grace_period=30)  # no live trial is taken for dead on a loaded machine
    run = tmp_path / "run"
    outs = _finish([_sweep(cfg, run, storage, n_trials=12, workers=1) for _ in range(4)])
    for out in outs:
        assert "12/12 trials done" in out and "Traceback" not in out, out[-3000:]
    _check_exact(run, 12)
    outs = _finish([_sweep(cfg, run, storage, n_trials=20, workers=1) for _ in range(3)])
    for out in outs:
        assert "20/20 trials done" in out and "Traceback" not in out, out[-3000:]
    _check_exact(run, 20)


@_backends("journal")
def test_three_workers_complete_exact_count(tmp_path, storage):
    name = _name(tmp_path, "exact")
    cfg = _config(tmp_path / "cfg.yaml", name=name, sleep=0.05)
    proc = _sweep(cfg, tmp_path / "run", storage, n_trials=21, workers=3)
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out
    assert "21/21 trials done" in out
    _check_exact(tmp_path / "run", 21)


@_backends("journal")
def test_sigkill_mid_trial_is_retried(tmp_path, storage):
    name = _name(tmp_path, "kill")
    markers = tmp_path / "markers"
    markers.mkdir()
    cfg = _config(tmp_path / "cfg.yaml", name=name, sleep=0.6, marker_dir=markers)
    proc = _sweep(cfg, tmp_path / "run", storage, n_trials=8, workers=3)
    deadline = time.time() + 150  # worker processes import torch: slow on a loaded machine
    victim = None
    while victim is None and time.time() < deadline:
        running = list(markers.glob("*.running"))
        if running:
            victim = int(running[0].name.split(".")[0])
        else:
            time.sleep(0.05)
    assert victim is not None, "no worker started a trial"
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out
    done, failed = _check_exact(tmp_path / "run", 8, killed=1)
    retried = [t for t in done if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retried) == 1
    assert retried[0].user_attrs["slot"] == failed[0].user_attrs["slot"]
    assert retried[0].params == failed[0].params


FAILING = """
import os
from sweeps.evaluators import SyntheticEvaluator


class Failing(SyntheticEvaluator):
    def __init__(self, fail_while: str, **kw):
        super().__init__(**kw)
        self.fail_while = fail_while

    def evaluate(self, family, params):
        if os.path.exists(self.fail_while):
            raise RuntimeError("the evaluator failed on purpose")
        return super().evaluate(family, params)
"""


def test_all_trials_failing_exits_1_and_rerun_retries(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "failing_eval.py").write_text(FAILING)
    flag = tmp_path / "fail"
    flag.write_text("")
    cfg = _config(tmp_path / "cfg.yaml", name="f", sleep=0.0, factory="failing_eval:Failing",
                  fail_while=str(flag))
    store, run = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "run"

    def sweep(*extra):
        p = _sweep(cfg, run, store, n_trials=3, workers=1, extra=extra,
                   pythonpath=tmp_path / "mine")
        return p, _finish([p])[0]

    p, out = sweep()
    assert p.returncode == 2 and "evaluator.factory" in out and "--allow-module" in out, out
    assert "Traceback" not in out
    p, out = sweep("--allow-module", "failing_eval")
    assert p.returncode == 1, out
    assert "all 3 trials failed" in out and "3/3 trials done" not in out, out
    assert out.count("FAILED: RuntimeError('the evaluator failed on purpose')") == 3, out
    flag.unlink()
    p, out = sweep("--allow-module", "failing_eval")
    assert p.returncode == 0 and "3/3 trials done" in out, out
    _, study = load_run(run)
    by_slot = {}
    for t in study.get_trials(deepcopy=False):
        by_slot.setdefault(t.user_attrs["slot"], []).append(t.state)
    assert by_slot == {s: [TrialState.FAIL, TrialState.COMPLETE] for s in range(3)}


def test_torn_journal_tail_is_cut_before_appending(tmp_path, caplog):
    """A full disk cut the journal's last line: the next sweep drops the torn bytes (and says
    so) instead of appending to them, and the study stays readable."""
    from sweeps.cli import SweepConfig, run_sweep

    log = tmp_path / "study.log"
    cfg = {"name": "torn", "seed": 0, "n_trials": 4, "heartbeat_interval": 1,
           "grace_period": 2, "storage": f"journal:{log}",
           "methods": {"sliding_window": {"window": {"low": 1, "high": 30}}},
           "evaluator": {"factory": "sweeps.evaluators:SyntheticEvaluator"}}
    run_sweep(SweepConfig.from_dict(dict(cfg)), tmp_path / "run", progress=False)
    data = log.read_bytes()
    assert data.endswith(b"\n")
    log.write_bytes(data[:-25])  # mid-line, as a write cut short by ENOSPC leaves it
    with caplog.at_level("WARNING"):
        counts = run_sweep(SweepConfig.from_dict({**cfg, "n_trials": 6}), tmp_path / "run",
                           progress=False)
    assert "torn line" in caplog.text and str(log) in caplog.text
    assert counts["slots"] == counts["done"] == 6 and counts["fail"] == 0
    for line in log.read_bytes().splitlines():
        json.loads(line)
    _check_exact(tmp_path / "run", 6, killed=len(
        [t for t in load_run(tmp_path / "run")[1].get_trials() if t.state == TrialState.FAIL]))


FULL_DISK = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
from sweeps.study import ensure_slots, open_storage, open_study
path = sys.argv[1]
storage = open_storage("journal:" + path, heartbeat_interval=1)
study = open_study(storage, "full", ["density", "ppl_change"])
ensure_slots(study, storage, 2)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 40, resource.RLIM_INFINITY))
try:
    ensure_slots(study, storage, 30)
except OSError as e:
    print("refused:", e)
"""


def test_journal_append_cut_by_a_full_disk_is_rolled_back(tmp_path):
    """A file-size limit makes the append fail part-way, as a full disk does: the journal is
    rolled back to its last whole line, and the study opens and grows afterwards."""
    log = tmp_path / "study.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", FULL_DISK, str(log)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert "storage: cannot append to journal" in r.stdout, r.stdout + r.stderr
    assert "the journal was left as it was" in r.stdout
    data = log.read_bytes()
    assert data.endswith(b"\n") and all(json.loads(line) for line in data.splitlines())
    from sweeps.study import ensure_slots, open_storage, open_study, trial_counts
    storage = open_storage(f"journal:{log}", heartbeat_interval=1)
    study = open_study(storage, "full", ["density", "ppl_change"])
    assert trial_counts(study)["slots"] == 2
    ensure_slots(study, storage, 5)
    assert trial_counts(study)["waiting"] == 5
