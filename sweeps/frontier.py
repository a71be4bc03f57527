"""Frontier reports of a sweep: Pareto fronts, tables, plots and best policies per quality budget.

``write_report(run_dir)`` reads the study named in ``<run_dir>/sweep.json`` and writes:

- ``frontier.csv`` / ``frontier.json``: every evaluated trial (method, parameters, density,
  ppl_change, recall, ...), flagged ``front_method`` (on its method's Pareto front) and
  ``front_overall``; the JSON adds the fronts and, per budget, the best setting of every method;
- ``frontier.png``: quality loss (ppl change, %) against density (or the first objective, e.g.
  latency), one curve per method through its Pareto front, oracle curves dashed, budgets dotted;
- ``per_layer_density.png``: the per-layer density of the configuration chosen for the first
  budget (when the evaluator reported it);
- ``policy_within_<budget>pct.json``: the sparsest setting (lowest first objective) whose ppl
  change is within the budget, over all methods except the oracle (it needs the true attention,
  so it cannot be deployed), e.g. ``policy_within_1pct.json`` for +1%.

Policy file format, read by ``adaptive-sparse eval`` / ``export``::

    {"method": "<pattern name> | gate | oracle",
     "params": {<pattern parameters>}                       # patterns: make_pattern kwargs
            or {"policy": {<Policy.to_dict()>}, "gates": DIR}  # gate (gates optional)
            or {"policy": {...}, "target": "sum" | "max"}}     # oracle

The block size is the evaluator's (``evaluator.args.block_size`` in the sweep config).
A budget is a relative perplexity increase: 0.01 means +1%.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from adaptive_sparse.io import atomic_write_text
from sweeps.objectives import OBJECTIVES

DEFAULT_BUDGETS = (0.01, 0.05)
METRICS = ("density", "ppl_change", "recall", "latency_ms", "attention_ms", "mask_ms",
           "needle_accuracy", "perplexity", "perplexity_dense")


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points (ties: all kept). points [n, m]."""
    sign = [1.0 if d == "minimize" else -1.0 for d in directions]
    pts = [[s * float(v) for s, v in zip(sign, p)] for p in points]
    front = []
    for i, p in enumerate(pts):
        dominated = any(all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))
                        for j, q in enumerate(pts) if j != i)
        if not dominated:
            front.append(i)
    return front


def load_run(run_dir: str | Path, storage: str | None = None) -> tuple[dict, optuna.Study]:
    from sweeps.study import open_storage
    path = Path(run_dir) / "sweep.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"run_dir: expected {str(path)!r} written by `adaptive-sparse sweep`: "
                         f"{e}") from None
    keys = {"study_name": str, "storage": str, "objectives": list}
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in keys.items()):
        raise ValueError(f"run_dir: {str(path)!r} is not a sweep record (expected an object with "
                         f"study_name, storage, objectives)")
    store = open_storage(storage or meta["storage"], run_dir)
    try:
        study = optuna.load_study(study_name=meta["study_name"], storage=store)
    except KeyError:
        raise ValueError(f"run_dir: study {meta['study_name']!r} not found in "
                         f"{storage or meta['storage']!r}") from None
    return meta, study


def trial_rows(study: optuna.Study, objectives: Sequence[str]) -> list[dict[str, Any]]:
    """One row per COMPLETE trial, ordered by trial number."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        ua = t.user_attrs
        row = {"trial": t.number, "slot": ua.get("slot"), "method": ua.get("method"),
               "family": ua.get("family"), "params": ua.get("policy_params", {}),
               "per_layer_density": ua.get("per_layer_density")}
        for key in METRICS:
            if key in ua:
                row[key] = ua[key]
        for name, value in zip(objectives, t.values):
            row[name] = value
        rows.append(row)
    return rows


def flag_fronts(rows: list[dict], objectives: Sequence[str]) -> dict[str, list[int]]:
    """Flag each row `front_method` / `front_overall` (on its method's / the pooled Pareto front
    of `objectives`) and return {"overall" | method: [trial ids on that front]}."""
    dirs = [OBJECTIVES[o] for o in objectives]
    fronts: dict[str, list[int]] = {}
    for row in rows:
        row["front_method"] = row["front_overall"] = False
    overall = pareto_front([[r[o] for o in objectives] for r in rows], dirs)
    for i in overall:
        rows[i]["front_overall"] = True
    fronts["overall"] = [rows[i]["trial"] for i in overall]
    for method in sorted({r["method"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["method"] == method]
        front = pareto_front([[rows[i][o] for o in objectives] for i in idx], dirs)
        for j in front:
            rows[idx[j]]["front_method"] = True
        fronts[method] = [rows[idx[j]]["trial"] for j in front]
    return fronts


def best_within(rows: list[dict], budget: float, cost: str = "density",
                methods: Sequence[str] | None = None) -> dict | None:
    """The row with the lowest ``cost`` whose ppl_change <= budget (ties: lower ppl_change)."""
    ok = [r for r in rows if r["ppl_change"] <= budget
          and (methods is None or r["method"] in methods)]
    return min(ok, key=lambda r: (r[cost], r["ppl_change"], r["trial"])) if ok else None


def policy_file(row: dict) -> dict:
    return {"method": row["family"], "params": row["params"]}


def _budget_tag(budget: float) -> str:
    return f"{budget * 100:g}".replace(".", "p")


def _csv(rows: list[dict]) -> str:
    cols = ["trial", "slot", "method", "family", *METRICS, "front_method", "front_overall",
            "params"]
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "params": json.dumps(r["params"], sort_keys=True)})
    return out.getvalue()


def _plot_frontier(rows: list[dict], cost: str, budgets: Sequence[float], path: Path) -> None:
    from adaptive_sparse.plots import plot_frontier
    plot_frontier(rows, path, cost=cost, budgets=budgets)


def _plot_layers(row: dict, budget: float, path: Path) -> None:
    from adaptive_sparse.plots import plot_layer_density
    plot_layer_density({f"{row['method']} (trial {row['trial']})": row["per_layer_density"]},
                       path, title=f"sparsest within +{100 * budget:g}% ppl: density "
                                   f"{row['density']:.3f}")


def write_report(run_dir: str | Path, budgets: Sequence[float] | None = None,
                 storage: str | None = None) -> dict:
    """Write the report files (module docstring) and return the report dict (frontier.json)."""
    run_dir = Path(run_dir)
    meta, study = load_run(run_dir, storage)
    budgets = list(budgets or meta.get("config", {}).get("budgets") or DEFAULT_BUDGETS)
    for b in budgets:
        if not (isinstance(b, (int, float)) and math.isfinite(b) and b >= 0):
            raise ValueError(f"budget: expected a non-negative relative ppl change "
                             f"(0.01 = +1%), got {b!r}")
    objectives = list(meta["objectives"])
    rows = trial_rows(study, objectives)
    if not rows:
        raise ValueError(f"run_dir: study {meta['study_name']!r} has no completed trials yet")
    cost = objectives[0] if objectives[0] in ("density", "latency_ms") else "density"
    fronts = flag_fronts(rows, objectives)
    methods = sorted({r["method"] for r in rows})
    deployable = [m for m in methods if not m.startswith("oracle")]
    best: dict[str, dict[str, Any]] = {}
    files = []
    for b in budgets:
        per = {m: best_within(rows, b, cost, [m]) for m in methods}
        chosen = best_within(rows, b, cost, deployable)
        best[str(b)] = {"overall": chosen and chosen["trial"],
                        "methods": {m: r and {"trial": r["trial"], cost: r[cost],
                                              "ppl_change": r["ppl_change"],
                                              "params": r["params"]} for m, r in per.items()}}
        if chosen is not None:
            name = f"policy_within_{_budget_tag(b)}pct.json"
            atomic_write_text(run_dir / name,
                              json.dumps(policy_file(chosen), indent=2, sort_keys=True))
            files.append(name)
    report = {"study_name": meta["study_name"], "objectives": objectives, "cost": cost,
              "budgets": budgets, "fronts": fronts, "best": best, "trials": rows,
              "counts": {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
                         for s in TrialState}}
    atomic_write_text(run_dir / "frontier.json", json.dumps(report, indent=2))
    atomic_write_text(run_dir / "frontier.csv", _csv(rows))
    _plot_frontier(rows, cost, budgets, run_dir / "frontier.png")
    files += ["frontier.json", "frontier.csv", "frontier.png"]
    first = best_within(rows, budgets[0], cost, deployable)
    if first is not None and first.get("per_layer_density"):
        _plot_layers(first, budgets[0], run_dir / "per_layer_density.png")
        files.append("per_layer_density.png")
    report["files"] = [str(run_dir / f) for f in files]
    return report


def format_table(report: dict) -> str:
    """The overall Pareto front and the best setting per method and budget, as text."""
    cost = report["cost"]
    rows = {r["trial"]: r for r in report["trials"]}
    lines = [f"Pareto front ({len(report['fronts']['overall'])} of {len(rows)} trials)",
             f"{'trial':>6} {'method':<22} {cost:>10} {'ppl change':>11} {'recall':>8}  params"]
    for t in sorted(report["fronts"]["overall"], key=lambda t: rows[t][cost]):
        r = rows[t]
        rec = f"{r['recall']:.4f}" if "recall" in r else "-"
        lines.append(f"{t:>6} {r['method']:<22} {r[cost]:>10.4f} "
                     f"{100 * r['ppl_change']:>+10.2f}% {rec:>8}  "
                     f"{json.dumps(r['params'], sort_keys=True)}")
    for b, entry in report["best"].items():
        lines.append("")
        lines.append(f"sparsest setting within +{100 * float(b):g}% perplexity")
        for m, r in entry["methods"].items():
            lines.append(f"  {m:<22} " + ("none within budget" if r is None else
                         f"{cost} {r[cost]:.4f}  ppl {100 * r['ppl_change']:+.2f}%  "
                         f"(trial {r['trial']})"))
    return "\n".join(lines)
