"""Sweeps across processes: exact trial counts on the journal file and on a real PostgreSQL
server, and a worker killed with SIGKILL mid-trial whose trial is retried.

PostgreSQL: the `postgres_url` fixture starts a throwaway cluster (initdb + pg_ctl from
/usr/lib/postgresql/*/bin) on a free localhost port in a tmp dir, trust auth, and stops it at
the end. PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user
(created by Debian's package) through `runuser -u postgres --`, or `nobody` when that user is
absent. The tests skip only when no PostgreSQL binaries are installed (CI's .ci/run installs
Debian's `postgresql`)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
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
def postgres_url(tmp_path_factory):
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not installed (apt-get install postgresql)")
    root = tmp_path_factory.mktemp("pg")
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
        for parent in root.parents:
            if str(parent).startswith(str(tmp_path_factory.getbasetemp().parent)):
                os.chmod(parent, os.stat(parent).st_mode | 0o711)
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


def _config(path: Path, *, name: str, sleep: float, marker_dir: Path | None = None) -> Path:
    cfg = {"name": name, "seed": 0, "n_startup_trials": 4, "heartbeat_interval": 1,
           "grace_period": 3, "max_retry": 2,
           "methods": {"sliding_window": {"window": {"low": 1, "high": 30}},
                       "gate/top_p": {"p": {"low": 0.5, "high": 0.99}}},
           "evaluator": {"factory": "sweeps.evaluators:SyntheticEvaluator",
                         "args": {"sleep": sleep,
                                  "marker_dir": str(marker_dir) if marker_dir else None}}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _sweep(config: Path, run_dir: Path, storage: str, n_trials: int, workers: int):
    cmd = [sys.executable, "-m", "sweeps.cli", "sweep", "--config", str(config), "--n-trials",
           str(n_trials), "--workers", str(workers), "--storage", storage, "--run-dir",
           str(run_dir), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _check_exact(run_dir: Path, n_trials: int, killed: int = 0):
    _, study = load_run(run_dir)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t.user_attrs["slot"] for t in complete) == list(range(n_trials))
    assert len(failed) == killed, [(t.number, t.state, t.user_attrs) for t in trials]
    assert len(trials) == n_trials + killed
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return complete, failed


def _storages(tmp_path, request):
    if request.param == "journal":
        return f"journal:{tmp_path / 'study.log'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(params=["journal", "postgresql"])
def storage(tmp_path, request):
    return _storages(tmp_path, request)


def test_three_workers_complete_exact_count(tmp_path, storage):
    name = f"exact{abs(hash(str(tmp_path))) % 10**8}"
    cfg = _config(tmp_path / "cfg.yaml", name=name, sleep=0.05)
    proc = _sweep(cfg, tmp_path / "run", storage, n_trials=21, workers=3)
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out
    assert "21/21 trials done" in out
    _check_exact(tmp_path / "run", 21)


def test_sigkill_mid_trial_is_retried(tmp_path, storage):
    name = f"kill{abs(hash(str(tmp_path))) % 10**8}"
    markers = tmp_path / "markers"
    markers.mkdir()
    cfg = _config(tmp_path / "cfg.yaml", name=name, sleep=0.6, marker_dir=markers)
    proc = _sweep(cfg, tmp_path / "run", storage, n_trials=8, workers=3)
    deadline = time.time() + 60
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
    complete, failed = _check_exact(tmp_path / "run", 8, killed=1)
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retried) == 1
    assert retried[0].user_attrs["slot"] == failed[0].user_attrs["slot"]
    assert retried[0].params == failed[0].params
