"""``adaptive-sparse sweep`` and ``adaptive-sparse frontier``.

    adaptive-sparse sweep --config sweeps/configs/smollm2-frontier.yaml --n-trials 40 \\
        --workers 2 [--storage URL] [--run-dir runs/frontier]
    adaptive-sparse frontier runs/frontier [--budget 0.01 --budget 0.05]

``sweep`` writes ``<run_dir>/sweep.json`` (config, storage URL, study name), enqueues the trial
slots, then runs ``--workers`` worker processes (each loads its own evaluator) and shows a
progress bar of finished slots. Running it again resumes. To add workers on other machines to a
PostgreSQL study, run the same command there with ``--join`` (no slots are created).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

from sweeps.evaluators import build_evaluator
from sweeps.objectives import Screening, SearchSpace, SweepObjective, check_objectives
from sweeps.study import (SAMPLERS, ensure_slots, make_sampler, open_storage, open_study,
                          run_worker, storage_url, trial_counts)

log = logging.getLogger("sweeps")


@dataclass
class SweepConfig:
    """A sweep, as written in YAML (see sweeps/configs/smollm2-frontier.yaml).

    ``latency``: ``"module:callable"`` measuring ``latency_ms = fn(family, params, result)``
    (e.g. our kernel timed on a GPU at the trial's masks), for ``objectives: [latency_ms,
    ppl_change]``; without it the evaluator must report ``latency_ms`` itself."""

    name: str = "frontier"
    methods: dict = field(default_factory=dict)
    objectives: list = field(default_factory=lambda: ["density", "ppl_change"])
    sampler: str = "tpe"
    seed: int = 0
    n_trials: int = 20
    run_dir: str | None = None
    storage: str | None = None
    evaluator: dict = field(default_factory=dict)
    screening: dict = field(default_factory=dict)
    max_density: float | None = None
    latency: str | None = None
    heartbeat_interval: int = 10
    grace_period: int | None = None
    max_retry: int | None = 3
    n_startup_trials: int = 10
    population_size: int = 20
    budgets: list = field(default_factory=lambda: [0.01, 0.05])
    method_allocation: str = "sample"

    @classmethod
    def from_dict(cls, data: Any) -> SweepConfig:
        if not isinstance(data, dict):
            raise ValueError(f"config: expected a mapping, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}, expected some of {sorted(known)}")
        cfg = cls(**data)
        check_objectives(cfg.objectives)
        if cfg.sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {list(SAMPLERS)}, got {cfg.sampler!r}")
        extra = sorted(set(cfg.screening) - {"min_recall", "margin"})
        if extra:
            raise ValueError(f"screening: unknown keys {extra}, expected min_recall, margin")
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> SweepConfig:
        import yaml
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"config: cannot read {str(path)!r}: {e}") from None
        return cls.from_dict(yaml.safe_load(text))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_objective(cfg: SweepConfig, evaluator=None) -> SweepObjective:
    evaluator = evaluator if evaluator is not None else build_evaluator(cfg.evaluator)
    space = SearchSpace.from_config(cfg.methods, evaluator, allocation=cfg.method_allocation)
    latency = None
    if cfg.latency is not None:
        latency = _import(cfg.latency, "latency")
    return SweepObjective(space, evaluator, cfg.objectives, screening=Screening(**cfg.screening),
                          max_density=cfg.max_density, latency=latency)


def _import(spec: str, name: str):
    """``"module:callable"`` -> the callable."""
    import importlib
    module, _, attr = str(spec).partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{name}: cannot import {spec!r} (expected 'module:callable'): "
                         f"{e}") from None


def _open(cfg: SweepConfig, run_dir: Path) -> optuna.Study:
    storage = open_storage(cfg.storage, run_dir, heartbeat_interval=cfg.heartbeat_interval,
                           grace_period=cfg.grace_period, max_retry=cfg.max_retry)
    sampler = make_sampler(cfg.sampler, seed=cfg.seed, constrained=cfg.max_density is not None,
                           population_size=cfg.population_size,
                           n_startup_trials=cfg.n_startup_trials)
    return open_study(storage, cfg.name, cfg.objectives, sampler=sampler)


def _progress(study: optuna.Study, total: int, stop: threading.Event, enabled: bool) -> None:
    from tqdm import tqdm
    bar = tqdm(total=total, desc="trials", disable=not enabled, file=sys.stderr)
    while True:
        counts = trial_counts(study)
        bar.n = counts["done"]
        bar.set_postfix(running=counts["running"], failed=counts["fail"], refresh=False)
        bar.refresh()
        if stop.wait(1.0):
            counts = trial_counts(study)
            bar.n = counts["done"]
            bar.refresh()
            bar.close()
            return


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaptive-sparse sweep",
                                description="Sweep the sparsity/quality frontier with Optuna.")
    p.add_argument("--config", required=True, help="sweep YAML")
    p.add_argument("--n-trials", type=int, help="total trials of the study (default: config)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--storage", help="sqlite:///..., postgresql://..., journal:PATH "
                   "(default: <run_dir>/study.db)")
    p.add_argument("--run-dir", help="output directory (default: config run_dir or runs/<name>)")
    p.add_argument("--seed", type=int)
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--study-name")
    p.add_argument("--join", action="store_true",
                   help="only work on an existing study's slots (other machines)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _resolve(args) -> tuple[SweepConfig, Path]:
    cfg = SweepConfig.load(args.config)
    for key, val in (("n_trials", args.n_trials), ("storage", args.storage),
                     ("seed", args.seed), ("sampler", args.sampler), ("name", args.study_name)):
        if val is not None:
            setattr(cfg, key, val)
    if args.workers < 1:
        raise ValueError(f"--workers: expected a positive int, got {args.workers}")
    if cfg.n_trials < 0:
        raise ValueError(f"--n-trials: expected a non-negative int, got {cfg.n_trials}")
    run_dir = Path(args.run_dir or cfg.run_dir or Path("runs") / cfg.name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(run_dir)
    cfg.storage = storage_url(cfg.storage, run_dir)
    return cfg, run_dir


def run_sweep(cfg: SweepConfig, run_dir: str | Path, *, workers: int = 1, join: bool = False,
              progress: bool = True, evaluator=None, worker_argv: list[str] | None = None
              ) -> dict[str, int]:
    """Run a sweep: record ``sweep.json``, enqueue slots (unless ``join``), run the workers.

    workers == 1 runs in this process (with ``evaluator`` when given); more start
    ``python -m sweeps.cli sweep <worker_argv> --worker`` processes. Returns ``trial_counts``."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(run_dir)
    cfg.storage = storage_url(cfg.storage, run_dir)
    objective = build_objective(cfg, evaluator)
    study = _open(cfg, run_dir)
    _atomic_write(run_dir / "sweep.json", json.dumps(
        {"study_name": cfg.name, "storage": cfg.storage, "objectives": cfg.objectives,
         "config": asdict(cfg)}, indent=2))
    if not join:
        added = ensure_slots(study, cfg.n_trials)
        log.info("study %r in %s: %d slots (%d new)", cfg.name, cfg.storage, cfg.n_trials, added)
    stop = threading.Event()
    bar = threading.Thread(target=_progress, args=(study, trial_counts(study)["slots"], stop,
                                                   progress), daemon=True)
    bar.start()
    codes = [0]
    try:
        if workers == 1:
            run_worker(study, objective, poll_interval=min(1.0, cfg.heartbeat_interval))
        else:
            if worker_argv is None:
                raise ValueError("worker_argv: needed to start worker processes")
            cmd = [sys.executable, "-m", "sweeps.cli", "sweep", *worker_argv, "--worker",
                   "--run-dir", str(run_dir), "--storage", cfg.storage, "--study-name", cfg.name]
            procs = [subprocess.Popen(cmd) for _ in range(workers)]
            codes = [p.wait() for p in procs]
    finally:
        stop.set()
        bar.join()
    counts = trial_counts(study)
    counts["worker_failures"] = sum(c != 0 for c in codes)
    return counts


def sweep_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        argv = argv[1:]
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg, run_dir = _resolve(args)
    if args.worker:
        run_worker(_open(cfg, run_dir), build_objective(cfg),
                   poll_interval=min(1.0, cfg.heartbeat_interval))
        return 0
    counts = run_sweep(cfg, run_dir, workers=args.workers, join=args.join,
                       progress=not args.no_progress, worker_argv=argv)
    print(f"{counts['done']}/{counts['slots']} trials done ({counts['complete']} complete, "
          f"{counts['pruned']} pruned, {counts['fail']} failed); run dir {run_dir}")
    return 0 if counts["done"] == counts["slots"] else 1


def frontier_main(argv: list[str] | None = None) -> int:
    from sweeps.frontier import format_table, write_report
    p = argparse.ArgumentParser(prog="adaptive-sparse frontier",
                                description="Pareto fronts, plots and best policies of a sweep.")
    p.add_argument("run_dir")
    p.add_argument("--budget", type=float, action="append",
                   help="quality budget as a relative ppl increase (0.01 = +1%%); repeatable")
    p.add_argument("--storage", help="override the storage URL recorded in sweep.json")
    args = p.parse_args(argv)
    report = write_report(args.run_dir, budgets=args.budget, storage=args.storage)
    print(format_table(report))
    for name in report["files"]:
        print(f"wrote {name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"sweep": sweep_main, "frontier": frontier_main}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m sweeps.cli {{{','.join(commands)}}} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
