"""Malformed sweep configs through `adaptive-sparse sweep`: each is refused before any work with
exit status 2 and a message naming the file, the key and what was expected, never a traceback.
A sweep config is trusted code, so factories outside adaptive_sparse / gating / sweeps are
refused unless the command line names their module (--allow-module)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adaptive_sparse.cli import main

REPO = Path(__file__).resolve().parents[1]
GOOD = {"name": "c", "n_trials": 2, "seed": 0, "heartbeat_interval": 1, "grace_period": 3,
        "methods": {"sliding_window": {"window": {"low": 1, "high": 30}}},
        "evaluator": {"factory": "sweeps.evaluators:SyntheticEvaluator"}}
SYN = "sweeps.evaluators:SyntheticEvaluator"

# (config changes, key named in the message, what the message says)
CASES = [
    ({"n_trials": "ten"}, "n_trials", "expected an int >= 0, got 'ten'"),
    ({"n_trials": -1}, "n_trials", "expected an int >= 0"),
    ({"n_trials": 2.5}, "n_trials", "expected an int >= 0"),
    ({"n_trials": True}, "n_trials", "expected an int >= 0"),
    ({"seed": "abc"}, "seed", "expected an int, got 'abc'"),
    ({"seed": 1.5}, "seed", "expected an int"),
    ({"name": ""}, "name", "expected a non-empty string"),
    ({"name": 5}, "name", "expected a non-empty string"),
    ({"methods": [1, 2]}, "methods", "expected a mapping"),
    ({"methods": {}}, "methods", "empty search space"),
    ({"methods": {"sliding_window": {"wndow": {"low": 1, "high": 3}}}}, "methods.sliding_window",
     "unknown parameter 'wndow'"),
    ({"methods": {"sliding_window": {"window": {"low": 9, "high": 3}}}},
     "methods.sliding_window.window", "expected low <= high"),
    ({"objectives": "density"}, "objectives", "expected a list"),
    ({"objectives": ["density", "speed"]}, "objectives", "unknown objective 'speed'"),
    ({"objectives": ["density", "density"]}, "objectives", "distinct"),
    ({"sampler": "cmaes"}, "sampler", "expected one of ['tpe', 'nsga2']"),
    ({"storage": 5}, "storage", "expected a string"),
    ({"storage": "nonsense-url"}, "storage", "expected sqlite:///PATH"),
    ({"run_dir": []}, "run_dir", "expected a string"),
    ({"evaluator": "x"}, "evaluator", "expected a mapping"),
    ({"evaluator": {"factory": "os:system", "args": {"command": "touch pwned"}}},
     "evaluator.factory", "a sweep config is trusted code"),
    ({"evaluator": {"factory": "builtins:eval"}}, "evaluator.factory", "--allow-module"),
    ({"evaluator": {"factory": "subprocess:run"}}, "evaluator.factory", "--allow-module"),
    ({"evaluator": {"factory": "sweeps.evaluators"}}, "evaluator.factory",
     "expected 'module:callable'"),
    ({"evaluator": {"factory": "sweeps.evaluators:Nope"}}, "evaluator.factory", "cannot import"),
    ({"evaluator": {"factory": SYN, "args": [1]}}, "evaluator.args", "expected a mapping"),
    ({"evaluator": {"factory": SYN, "args": {"bogus": 1}}}, "evaluator.args", "bogus"),
    ({"evaluator": {"factory": SYN, "bogus": 1}}, "evaluator", "unknown keys ['bogus']"),
    ({"evaluator": {"args": {"gates": "runs/gates/nowhere"}}}, "gates",
     "does not exist"),
    ({"screening": {"min_recall": 0.5, "foo": 1}}, "screening", "unknown keys ['foo']"),
    ({"screening": "strict"}, "screening", "expected a mapping"),
    ({"max_density": 0}, "max_density", "expected a number in (0, 1]"),
    ({"max_density": 2}, "max_density", "expected a number in (0, 1]"),
    ({"max_density": "half"}, "max_density", "expected a number in (0, 1]"),
    ({"latency": "os:system"}, "latency", "a sweep config is trusted code"),
    ({"latency": 3}, "latency", "expected 'module:callable'"),
    ({"heartbeat_interval": 0}, "heartbeat_interval", "expected an int >= 1"),
    ({"heartbeat_interval": "10"}, "heartbeat_interval", "expected an int >= 1"),
    ({"grace_period": 1}, "grace_period", "expected an int > heartbeat_interval"),
    ({"max_retry": -1}, "max_retry", "expected an int >= 0"),
    ({"n_startup_trials": -3}, "n_startup_trials", "expected an int >= 0"),
    ({"population_size": 1}, "population_size", "expected an int >= 2"),
    ({"budgets": "0.01"}, "budgets", "expected a non-empty list of numbers >= 0"),
    ({"budgets": [-0.01]}, "budgets", "expected a non-empty list of numbers >= 0"),
    ({"budgets": []}, "budgets", "expected a non-empty list of numbers >= 0"),
    ({"budgets": [float("nan")]}, "budgets", "expected a non-empty list of numbers >= 0"),
    ({"budgets": ["1%"]}, "budgets", "expected a non-empty list of numbers >= 0"),
    ({"method_allocation": "greedy"}, "method_allocation", "expected one of"),
    ({"n_trails": 3}, "config", "unknown keys ['n_trails']"),
]


def _main(args: list[str]) -> int:
    """`adaptive-sparse ARGS` in this process; argparse's own refusals exit through SystemExit."""
    try:
        return main(args)
    except SystemExit as e:
        return e.code


def _sweep(args: list[str], capsys) -> tuple[int, str]:
    rc = _main(["sweep", *args])
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize("change, key, why", CASES, ids=[f"{c[1]}-{i}" for i, c in
                                                         enumerate(CASES)])
def test_malformed_config_exit_2(tmp_path, monkeypatch, capsys, change, key, why):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **change}))
    rc, out = _sweep(["--config", str(path), "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2, out
    assert key in out and why in out, out
    assert "Traceback" not in out
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "run" / "study.db").exists()


@pytest.mark.parametrize("content, why", [
    (b"\x00\x01\x02binary\xff" * 50, "binary"),
    ("n_trials: 2\nname: caf\xe9\n".encode("latin-1"), "UTF-8"),
    (b"n_trials: [1, 2\nseed: 0\n", "YAML"),
    (b"- 1\n- 2\n", "mapping"),
    (b"", "mapping"),
])
def test_unreadable_config_file_exit_2(tmp_path, capsys, content, why):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    rc, out = _sweep(["--config", str(path), "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2 and str(path) in out and why in out and "Traceback" not in out, out


@pytest.mark.parametrize("where", ["missing.yaml", "."])
def test_missing_config_exit_2(tmp_path, capsys, where):
    rc, out = _sweep(["--config", str(tmp_path / where)], capsys)
    assert rc == 2 and "--config" in out and "Traceback" not in out, out


@pytest.mark.parametrize("flag, value, why", [
    ("--workers", "0", "--workers: expected a positive int"),
    ("--n-trials", "-2", "--n-trials: expected a non-negative int"),
    ("--storage", "nonsense-url", "storage: expected sqlite:///PATH"),
])
def test_bad_flags_exit_2(tmp_path, capsys, flag, value, why):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    rc, out = _sweep(["--config", str(path), "--run-dir", str(tmp_path / "run"), flag, value],
                     capsys)
    assert rc == 2 and why in out and "Traceback" not in out, out


def test_allow_module_admits_a_named_factory_and_help_says_configs_are_code(tmp_path):
    """Through the installed entry point: os:system is refused (nothing runs), and a factory
    from a module the user names runs."""
    (tmp_path / "mymod.py").write_text(
        "from sweeps.evaluators import SyntheticEvaluator as Mine\n")
    cfg = tmp_path / "cfg.yaml"
    bad = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({**GOOD, "evaluator": {"factory": "mymod:Mine"}}))
    bad.write_text(yaml.safe_dump({**GOOD, "evaluator": {"factory": "os:system",
                                                         "args": {"command": "touch pwned"}}}))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "adaptive_sparse.cli", "sweep", *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    r = run("--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "a sweep config is trusted code" in text.lower(), text
    assert "--allow-module MODULE" in text
    r = run("--config", str(bad), "--run-dir", "run")
    assert r.returncode == 2 and "trusted code" in r.stderr and not (tmp_path / "pwned").exists()
    r = run("--config", str(cfg), "--run-dir", "run", "--no-progress")
    assert r.returncode == 2 and "mymod:Mine" in r.stderr, r.stderr
    r = run("--config", str(cfg), "--run-dir", "run", "--no-progress", "--allow-module", "mymod")
    assert r.returncode == 0 and "2/2 trials done" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count("complete: density") == 2, r.stdout  # a line per finished trial
    assert "\r" not in r.stdout + r.stderr  # no progress bar off a terminal


def test_run_dir_under_a_file_exit_2(tmp_path, capsys):
    path, blocker = tmp_path / "ok.yaml", tmp_path / "file"
    path.write_text(yaml.safe_dump(GOOD))
    blocker.write_text("")
    rc, out = _sweep(["--config", str(path), "--run-dir", str(blocker / "run")], capsys)
    assert rc == 2 and "run_dir" in out and "Traceback" not in out, out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from sweeps.cli import SweepConfig, run_sweep
    run = tmp_path_factory.mktemp("frontier") / "run"
    run_sweep(SweepConfig.from_dict(dict(GOOD)), run, progress=False)
    return run


@pytest.mark.parametrize("args, why", [
    (["--budget", "-0.1"], "budget: expected a non-negative"),
    (["--budget", "nan"], "budget: expected a non-negative"),
    (["--budget", "abc"], "--budget"),
    (["--storage", "nonsense-url"], "storage: expected sqlite:///PATH"),
])
def test_frontier_bad_arguments_exit_2(finished_run, capsys, args, why):
    rc = _main(["frontier", str(finished_run), *args])
    out = capsys.readouterr()
    assert rc == 2 and why in out.out + out.err and "Traceback" not in out.err, out


@pytest.mark.parametrize("content, why", [(None, "sweep.json"), (b"{not json", "sweep.json"),
                                          (b"[]", "sweep.json")])
def test_frontier_bad_run_dir_exit_2(tmp_path, capsys, content, why):
    if content is not None:
        (tmp_path / "sweep.json").write_bytes(content)
    rc = _main(["frontier", str(tmp_path)])
    out = capsys.readouterr()
    assert rc == 2 and why in out.err and "Traceback" not in out.err, out
