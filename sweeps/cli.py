"""``adaptive-sparse sweep`` and ``adaptive-sparse frontier``.

    adaptive-sparse sweep --config sweeps/configs/smollm2-frontier.yaml --n-trials 40 \\
        --workers 2 [--storage URL] [--run-dir runs/frontier] [--allow-module mypkg]
    adaptive-sparse frontier runs/frontier [--budget 0.01 --budget 0.05]

``sweep`` checks the config (types, keys, factories, gate directories) before anything runs,
writes ``<run_dir>/sweep.json`` (the resolved config, storage URL, study name), enqueues the trial
slots, then runs ``--workers`` worker processes (each loads its own evaluator). It prints a line
per finished trial (and a progress bar on a terminal) and exits 0 only when every slot finished;
failed slots make it exit 1, and running the same command again retries them. Any number of
``sweep`` commands may start at once on one storage (``sweeps.study``). To add workers on other
machines to a PostgreSQL study, run the same command there with ``--join`` (no slots are
created).

A sweep config is trusted code: ``evaluator.factory`` and ``latency`` name Python callables that
run in this process. Only callables under ``adaptive_sparse``, ``gating`` and ``sweeps`` are
accepted, plus modules named with ``--allow-module``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

from adaptive_sparse.io import atomic_write_json
from sweeps.evaluators import (
    ModelEvaluator, build_evaluator, check_callable, import_callable, renamed_args)
from sweeps.objectives import (ALLOCATIONS, Screening, SearchSpace, SweepObjective,
                               check_objectives)
from sweeps.study import (SAMPLERS, ensure_slots, make_sampler, open_storage, open_study,
                          run_worker, storage_url, trial_counts)

log = logging.getLogger("sweeps")

_INT, _STR = "an int", "a string"
# key -> (expected, optional); checked on load
FIELD_TYPES: dict[str, tuple[str, bool]] = {
    "name": ("a non-empty string", False), "methods": ("a mapping", False),
    "objectives": ("a list of objective names", False),
    "sampler": (f"one of {list(SAMPLERS)}", False),
    "seed": (_INT, False), "n_trials": ("an int >= 0", False), "run_dir": (_STR, True),
    "storage": (_STR, True), "evaluator": ("a mapping", False), "screening": ("a mapping", False),
    "max_density": ("a number in (0, 1]", True), "latency": ("'module:callable'", True),
    "heartbeat_interval": ("an int >= 1 (seconds)", False),
    "grace_period": ("an int > heartbeat_interval (seconds)", True),
    "max_retry": ("an int >= 0", True), "n_startup_trials": ("an int >= 0", False),
    "population_size": ("an int >= 2", False),
    "budgets": ("a non-empty list of numbers >= 0 (0.01 = +1% perplexity)", False),
    "method_allocation": (f"one of {list(ALLOCATIONS)}", False),
}


def _is_int(v, low: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _valid(key: str, v: Any, data: dict) -> bool:
    checks = {
        "name": lambda: isinstance(v, str) and bool(v),
        "methods": lambda: isinstance(v, dict), "evaluator": lambda: isinstance(v, dict),
        "screening": lambda: isinstance(v, dict),
        "objectives": lambda: isinstance(v, list) and all(isinstance(o, str) for o in v),
        "sampler": lambda: v in SAMPLERS, "seed": lambda: _is_int(v),
        "n_trials": lambda: _is_int(v, 0), "run_dir": lambda: isinstance(v, str) and bool(v),
        "storage": lambda: isinstance(v, str) and bool(v),
        "max_density": lambda: _is_num(v) and 0 < v <= 1,
        "latency": lambda: isinstance(v, str),
        "heartbeat_interval": lambda: _is_int(v, 1),
        "grace_period": lambda: _is_int(v) and v > (data.get("heartbeat_interval", 10)
                                                    if _is_int(data.get("heartbeat_interval", 10))
                                                    else 0),
        "max_retry": lambda: _is_int(v, 0), "n_startup_trials": lambda: _is_int(v, 0),
        "population_size": lambda: _is_int(v, 2),
        "budgets": lambda: isinstance(v, list) and bool(v) and all(_is_num(b) and b >= 0
                                                                   for b in v),
        "method_allocation": lambda: v in ALLOCATIONS,
    }
    return checks[key]()


@dataclass
class SweepConfig:
    """A sweep, as written in YAML (see sweeps/configs/smollm2-frontier.yaml); every key is
    checked on load (``FIELD_TYPES``).

    ``latency``: ``"module:callable"`` measuring ``latency_ms = fn(family, params, result)``
    (e.g. our kernel timed on a GPU at the trial's masks), for ``objectives: [latency_ms,
    ppl_change]``; without it the evaluator must report ``latency_ms`` itself. ``budgets``: the
    quality budgets (relative perplexity increase) that ``adaptive-sparse frontier`` reports
    the best policy for, unless ``--budget`` is given."""

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
    def from_dict(cls, data: Any, *, source: str = "config",
                  allow_modules: tuple[str, ...] = ()) -> SweepConfig:
        """Check every key's type, the objectives, the factories (trusted modules only) and the
        gate directories (``adaptive_sparse.gates.resolve_gates_dir``; stored resolved).
        ValueError "<source>: <key>: expected ..., got ..."."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of sweep settings, got "
                             f"{type(data).__name__}")
        unknown = sorted(set(data) - set(FIELD_TYPES))
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}, expected some of "
                             f"{sorted(FIELD_TYPES)}")
        for key, (expected, optional) in FIELD_TYPES.items():
            if key not in data:
                continue
            value = data[key]
            if value is None and optional:
                continue
            if not _valid(key, value, data):
                raise ValueError(f"{source}: {key}: expected {expected}, got {value!r}")
        cfg = cls(**data)
        try:
            check_objectives(cfg.objectives)
            extra = sorted(set(cfg.screening) - {"min_recall", "margin"})
            if extra:
                raise ValueError(f"screening: unknown keys {extra}, expected min_recall, margin")
            ev = dict(cfg.evaluator)
            extra = sorted(set(ev) - {"factory", "args"})
            if extra:
                raise ValueError(f"evaluator: unknown keys {extra}, expected factory and args")
            if not isinstance(ev.get("args") or {}, dict):
                raise ValueError(f"evaluator.args: expected a mapping, got {ev['args']!r}")
            if ev.get("factory", DEFAULT_FACTORY) == DEFAULT_FACTORY and ev.get("args"):
                # old spellings (num_sequences) -> the CLI's (num_seqs), warned once, stored new
                cfg.evaluator = {**ev, "args": renamed_args(ev["args"], source,
                                                            "evaluator.args.")}
            check_callable(ev.get("factory", DEFAULT_FACTORY), "evaluator.factory",
                           allow_modules)
            if cfg.latency is not None:
                check_callable(cfg.latency, "latency", allow_modules)
            cfg._resolve_gates()
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        return cfg

    def _resolve_gates(self) -> None:
        """Gate directories named in the config, resolved now (a missing one is refused before
        the first trial)."""
        from adaptive_sparse.gates import resolve_gates_dir

        args = dict(self.evaluator.get("args") or {})
        if args.get("gates") is not None:
            args["gates"] = str(resolve_gates_dir(args["gates"]).resolve())
            self.evaluator = {**self.evaluator, "args": args}
        for name, spec in self.methods.items():
            if str(name).startswith("gate/") and isinstance(spec, dict) \
                    and spec.get("gates") is not None:
                where = resolve_gates_dir(spec["gates"]).resolve()
                self.methods[name] = {**spec, "gates": str(where)}

    @classmethod
    def load(cls, path: str | Path, *, allow_modules: tuple[str, ...] = ()) -> SweepConfig:
        import yaml
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"config: cannot read {str(path)!r}: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"config: {str(path)!r} is not UTF-8 text (byte {e.start}); "
                             f"expected a YAML sweep config") from None
        if "\x00" in text:
            raise ValueError(f"config: {str(path)!r} is a binary file; expected a YAML sweep "
                             f"config")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"config: {str(path)!r} is not valid YAML{where}: "
                             f"{getattr(e, 'problem', None) or e}") from None
        return cls.from_dict(data, source=f"config {str(path)!r}", allow_modules=allow_modules)


DEFAULT_FACTORY = "sweeps.evaluators:ModelEvaluator"


def build_objective(cfg: SweepConfig, evaluator=None, *,
                    allow_modules: tuple[str, ...] = ()) -> SweepObjective:
    """The trial objective; refuses gate/* methods without a gate directory before any trial."""
    if evaluator is None:
        evaluator = build_evaluator(cfg.evaluator, allow_modules=allow_modules)
    space = SearchSpace.from_config(cfg.methods, evaluator, allocation=cfg.method_allocation)
    if isinstance(evaluator, ModelEvaluator) and evaluator.gates is None:
        bare = [m.name for m in space.methods if m.family == "gate" and "gates" not in m.fixed]
        if bare:
            raise ValueError(f"evaluator.args.gates: methods {bare} need a trained gate "
                             f"directory (e.g. runs/gates/<name>, written by `adaptive-sparse "
                             f"train`), got none")
    latency = None
    if cfg.latency is not None:
        latency = import_callable(cfg.latency, "latency", allow_modules)
    return SweepObjective(space, evaluator, cfg.objectives, screening=Screening(**cfg.screening),
                          max_density=cfg.max_density, latency=latency)


def _sampler(cfg: SweepConfig, seed: int):
    return make_sampler(cfg.sampler, seed=seed, constrained=cfg.max_density is not None,
                        population_size=cfg.population_size,
                        n_startup_trials=cfg.n_startup_trials)


def _open(cfg: SweepConfig, run_dir: Path, seed: int | None = None):
    storage = open_storage(cfg.storage, run_dir, heartbeat_interval=cfg.heartbeat_interval,
                           grace_period=cfg.grace_period, max_retry=cfg.max_retry)
    sampler = _sampler(cfg, cfg.seed if seed is None else seed)
    return open_study(storage, cfg.name, cfg.objectives, sampler=sampler), storage


def _process_seed(cfg: SweepConfig) -> int:
    """The sampler seed of a process that joins a study others also sample: samplers seeded
    alike would propose the same parameters in every process."""
    return (cfg.seed * 1_000_003 + os.getpid()) % 2**31


def trial_line(t: optuna.trial.FrozenTrial, objectives: list[str]) -> str:
    """One line for a finished trial: its slot, method, outcome and objective values."""
    ua = t.user_attrs
    head = f"trial {t.number} (slot {ua.get('slot', '-')}, {ua.get('method', '?')})"
    if t.state == optuna.trial.TrialState.COMPLETE:
        vals = ", ".join(f"{name} {v:+.2%}" if name == "ppl_change" else f"{name} {v:.4g}"
                         for name, v in zip(objectives, t.values))
        return f"{head} complete: {vals}"
    if t.state == optuna.trial.TrialState.PRUNED:
        return f"{head} pruned: {ua.get('pruned', '')}".rstrip()
    if "error" in ua:
        return f"{head} FAILED: {ua['error']}"
    return f"{head} failed (worker lost; retried if retries are left)"


def _watch(study: optuna.Study, objectives: list[str], stop: threading.Event,
           bar: bool) -> None:
    """A line per finished trial; on a terminal also a progress bar of finished slots."""
    from tqdm import tqdm

    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    counts = trial_counts(study)
    progress = tqdm(total=counts["slots"], initial=counts["done"], desc="slots", file=sys.stderr,
                    disable=not bar, dynamic_ncols=True)

    def emit(line: str) -> None:
        if bar:
            tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    while True:
        last = stop.wait(1.0)
        try:
            trials = study.get_trials(deepcopy=False)
            counts = trial_counts(study)
        except Exception as e:  # a busy storage must not end the sweep's reporting
            log.debug("progress: %s", e)
            continue
        for t in sorted(trials, key=lambda t: t.number):
            if t.state.is_finished() and t.number not in seen:
                seen.add(t.number)
                emit(f"{trial_line(t, objectives)}  [{counts['done']}/{counts['slots']} "
                     f"done, {counts['fail']} failed]")
        progress.n = counts["done"]
        progress.set_postfix(running=counts["running"], failed=counts["fail"], refresh=False)
        progress.refresh()
        if last:
            progress.close()
            return


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adaptive-sparse sweep",
        description="Sweep the sparsity/quality frontier with Optuna. A sweep config is trusted "
                    "code: evaluator.factory and latency name Python callables that run here; "
                    "only callables under adaptive_sparse, gating and sweeps are accepted, plus "
                    "modules named with --allow-module. Exit status: 0 when every trial slot "
                    "finished, 1 when some failed (run the same command again to retry them), "
                    "2 for a bad config or argument.")
    p.add_argument("--config", required=True, help="sweep YAML (trusted: see above)")
    p.add_argument("--n-trials", type=int, help="total trials of the study (default: config)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--storage", help="sqlite:///..., postgresql://..., journal:PATH "
                   "(default: <run_dir>/study.db)")
    p.add_argument("--run-dir", help="output directory (default: config run_dir or runs/<name>)")
    p.add_argument("--seed", type=int, help="sampler seed (default: config)")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: config")
    p.add_argument("--study-name", help="default: the config's name")
    p.add_argument("--allow-module", action="append", default=[], metavar="MODULE",
                   help="also accept evaluator/latency callables from MODULE (and its "
                        "submodules); repeatable. Only name code you trust")
    p.add_argument("--join", action="store_true",
                   help="only work on an existing study's slots (other machines)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (a line per finished trial is still printed)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _resolve(args) -> tuple[SweepConfig, Path]:
    allow = tuple(args.allow_module)
    cfg = SweepConfig.load(args.config, allow_modules=allow)
    if args.workers < 1:
        raise ValueError(f"--workers: expected a positive int, got {args.workers}")
    if args.n_trials is not None and args.n_trials < 0:
        raise ValueError(f"--n-trials: expected a non-negative int, got {args.n_trials}")
    for key, val in (("n_trials", args.n_trials), ("storage", args.storage),
                     ("seed", args.seed), ("sampler", args.sampler), ("name", args.study_name)):
        if val is not None:
            setattr(cfg, key, val)
    run_dir = Path(args.run_dir or cfg.run_dir or Path("runs") / cfg.name).resolve()
    cfg.run_dir = str(run_dir)
    cfg.storage = storage_url(cfg.storage, run_dir)
    return cfg, run_dir


def run_sweep(cfg: SweepConfig, run_dir: str | Path, *, workers: int = 1, join: bool = False,
              progress: bool = True, evaluator=None, worker_argv: list[str] | None = None,
              allow_modules: tuple[str, ...] = ()) -> dict[str, int]:
    """Run a sweep: record ``sweep.json``, enqueue slots (unless ``join``), run the workers.

    workers == 1 runs in this process (with ``evaluator`` when given); more start
    ``python -m sweeps.cli sweep <worker_argv> --worker`` processes, which read the resolved
    config from ``sweep.json``. Prints a line per finished trial, and a progress bar when
    ``progress`` and stderr is a terminal. Returns ``trial_counts`` plus ``worker_failures``."""
    run_dir = Path(run_dir).resolve()
    cfg.run_dir = str(run_dir)
    cfg.storage = storage_url(cfg.storage, run_dir)
    objective = build_objective(cfg, evaluator, allow_modules=allow_modules)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"run_dir: cannot create {str(run_dir)!r}: {e.strerror}") from None
    study, storage = _open(cfg, run_dir)
    atomic_write_json(run_dir / "sweep.json", {
        "study_name": cfg.name, "storage": cfg.storage, "objectives": cfg.objectives,
        "config": asdict(cfg)})
    added = ensure_slots(study, storage, cfg.n_trials) if not join else 0
    if not join:
        log.info("study %r in %s: %d slots (%d trials added)", cfg.name, cfg.storage,
                 cfg.n_trials, added)
    if added < cfg.n_trials:  # a resume or a second command: not the seeded fresh study
        study.sampler = _sampler(cfg, _process_seed(cfg))
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(study, list(cfg.objectives), stop,
                                                    progress and sys.stderr.isatty()),
                               daemon=True)
    watcher.start()
    codes = [0]
    try:
        if workers == 1:
            run_worker(study, storage, objective,
                       poll_interval=min(1.0, cfg.heartbeat_interval))
        else:
            import subprocess
            if worker_argv is None:
                raise ValueError("worker_argv: needed to start worker processes")
            cmd = [sys.executable, "-m", "sweeps.cli", "sweep", *worker_argv, "--worker",
                   "--run-dir", str(run_dir), "--storage", cfg.storage, "--study-name", cfg.name]
            procs = [subprocess.Popen(cmd) for _ in range(workers)]
            codes = [p.wait() for p in procs]
    finally:
        stop.set()
        watcher.join()
    counts = trial_counts(study)
    counts["worker_failures"] = sum(c != 0 for c in codes)
    return counts


def summary(counts: dict[str, int], run_dir: Path) -> tuple[str, int]:
    """The closing line of a sweep and its exit status (0: every slot done, none failed)."""
    n, done, fail = counts["slots"], counts["done"], counts["fail"]
    detail = (f"{counts['complete']} complete, {counts['pruned']} pruned, {fail} failed"
              + (f", {counts['worker_failures']} worker processes exited non-zero"
                 if counts.get("worker_failures") else ""))
    if n and fail == n:
        return (f"sweep failed: all {n} trials failed ({detail}); see the errors above, then "
                f"run the same command again to retry them; run dir {run_dir}", 1)
    if fail:
        return (f"sweep incomplete: {fail} of {n} trials failed, {done} done ({detail}); run "
                f"the same command again to retry the failed ones; run dir {run_dir}", 1)
    if done < n:
        return (f"sweep incomplete: {done}/{n} trials done ({detail}); run the same command "
                f"again to finish; run dir {run_dir}", 1)
    return f"{done}/{n} trials done ({detail}); run dir {run_dir}", 0


def sweep_main(argv: list[str] | None = None) -> int:
    """``adaptive-sparse sweep``; bad configs and arguments raise ValueError (exit 2 at the
    CLI boundary)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        argv = argv[1:]
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    allow = tuple(args.allow_module)
    if args.worker:
        cfg = _worker_config(args, allow)
        study, storage = _open(cfg, Path(cfg.run_dir), seed=_process_seed(cfg))
        run_worker(study, storage, build_objective(cfg, allow_modules=allow),
                   poll_interval=min(1.0, cfg.heartbeat_interval))
        return 0
    cfg, run_dir = _resolve(args)
    counts = run_sweep(cfg, run_dir, workers=args.workers, join=args.join,
                       progress=not args.no_progress, worker_argv=argv, allow_modules=allow)
    line, code = summary(counts, run_dir)
    print(line, flush=True)
    return code


def _worker_config(args, allow: tuple[str, ...]) -> SweepConfig:
    """A worker of this machine's sweep reads the coordinator's resolved config."""
    path = Path(args.run_dir) / "sweep.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"run_dir: expected {str(path)!r} written by `adaptive-sparse sweep`: "
                         f"{e}") from None
    cfg = SweepConfig.from_dict(meta["config"], source=str(path), allow_modules=allow)
    cfg.storage, cfg.name = args.storage or cfg.storage, args.study_name or cfg.name
    return cfg


def frontier_main(argv: list[str] | None = None) -> int:
    """``adaptive-sparse frontier``; without ``--budget`` the sweep config's ``budgets``."""
    from sweeps.frontier import format_table, write_report
    p = argparse.ArgumentParser(prog="adaptive-sparse frontier",
                                description="Pareto fronts, plots and best policies of a sweep.")
    p.add_argument("run_dir")
    p.add_argument("--budget", type=float, action="append",
                   help="quality budget as a relative ppl increase (0.01 = +1%%); repeatable "
                        "(default: the sweep config's budgets)")
    p.add_argument("--storage", help="override the storage URL recorded in sweep.json")
    args = p.parse_args(argv)
    report = write_report(args.run_dir, budgets=args.budget, storage=args.storage)
    print(format_table(report))
    for name in report["files"]:
        print(f"wrote {name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sweeps.cli {sweep,frontier}`` (worker processes start this way)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"sweep": sweep_main, "frontier": frontier_main}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m sweeps.cli {{{','.join(commands)}}} ...", file=sys.stderr)
        return 2
    try:
        return commands[argv[0]](argv[1:])
    except (ValueError, TypeError) as e:
        print(f"{argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
