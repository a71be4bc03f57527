"""Optuna sweeps of the sparsity/quality frontier (see DESIGN.md, issue 5).

objectives.py  search spaces per method, the Evaluator protocol, the two-stage objective
evaluators.py  ModelEvaluator (a pretrained model) and SyntheticEvaluator (closed form)
study.py       storages (SQLite / journal file / PostgreSQL), samplers, exact trial slots,
               heartbeats and retries
frontier.py    Pareto fronts, CSV/JSON/PNG reports, best policy per quality budget
gate_search.py optional outer search of gate hyperparameters with Lightning pruning
cli.py         `adaptive-sparse sweep` and `adaptive-sparse frontier`
"""
