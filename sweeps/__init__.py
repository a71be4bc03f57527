"""Optuna sweeps of the sparsity/quality frontier (see DESIGN.md, issue 5).

objectives.py  search spaces per method, the Evaluator protocol, the two-stage objective
evaluators.py  ModelEvaluator (a pretrained model) and SyntheticEvaluator (closed form)
study.py       storages (SQLite / journal file / PostgreSQL), samplers, exact trial slots safe
               under concurrent commands, heartbeats and retries
frontier.py    Pareto fronts, CSV/JSON/PNG reports, best policy per quality budget
gate_search.py optional outer search of gate hyperparameters with Lightning pruning
cli.py         `adaptive-sparse sweep` and `adaptive-sparse frontier`

A sweep config is trusted code: its evaluator factory and latency callable run in the sweep's
processes, so only callables under adaptive_sparse, gating and sweeps are accepted, plus modules
named on the command line with --allow-module.
"""
