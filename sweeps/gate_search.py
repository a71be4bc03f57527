"""Optional outer search over gate hyperparameters (pooling set, gate dim, learning rate, steps).

Each trial trains a gate set on the featurization cache (``gating.GateDistillModule`` with a
``gating.GateDataModule``) and returns one validation metric (default ``val/loss``, the KL to
the true block attention). Lightning's ``PyTorchLightningPruningCallback`` reports the metric
after every validation and stops hopeless trials early (``pruner``: median by default).

Pruning needs a single objective: Optuna cannot prune multi-objective studies
(``Trial.report`` / ``should_prune`` are single-objective only), so ``gate_search`` refuses a
study with several directions. To trade density against quality here, fix a density budget
(e.g. monitor ``val/recall@0.25``, the recall at density 0.25) and run one single-objective
search per budget; the sparsity/quality frontier itself is swept by ``SweepObjective`` with a
density constraint instead of pruning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optuna

from sweeps.objectives import ParamSpec

DEFAULT_SPACE: dict[str, Any] = {
    "gate_dim": [64, 128],
    "k_pooling": ["max,min,avg", "max,avg", "avg"],
    "q_pooling": ["avg", "avg,max"],
    "lr": {"low": 1e-4, "high": 1e-2, "log": True},
    "max_steps": [100, 200, 400],
}
TRAINER_KEYS = {"max_steps"}


def check_prunable(study: optuna.Study) -> None:
    if len(study.directions) != 1:
        raise ValueError(f"study: the gate search prunes trials and needs a single objective, "
                         f"got {len(study.directions)} directions; Optuna cannot prune "
                         f"multi-objective studies (use a density budget: one single-objective "
                         f"search per budget)")


class GateSearchObjective:
    """``objective(trial) -> float``: suggest hyperparameters from ``space`` (``ParamSpec``
    config syntax; comma-separated strings become pooling tuples), build
    ``module_factory(**module_hparams)`` and ``datamodule_factory()``, train with
    ``lightning.Trainer(max_steps=..., **trainer_kwargs)`` plus the pruning callback, return
    ``trainer.callback_metrics[monitor]``. Records the hyperparameters as user attrs."""

    def __init__(self, datamodule_factory: Callable[[], Any], *,
                 space: Mapping[str, Any] | None = None, monitor: str = "val/loss",
                 module_factory: Callable[..., Any] | None = None,
                 trainer_kwargs: Mapping[str, Any] | None = None):
        space = dict(DEFAULT_SPACE if space is None else space)
        if not space:
            raise ValueError("space: empty search space (no gate hyperparameters)")
        self.specs = [ParamSpec.from_config(k, v, f"space.{k}") for k, v in space.items()]
        self.datamodule_factory = datamodule_factory
        self.monitor = monitor
        self.module_factory = module_factory
        self.trainer_kwargs = dict(trainer_kwargs or {})

    def _module(self, **hparams):
        if self.module_factory is not None:
            return self.module_factory(**hparams)
        from gating.module import GateDistillModule
        return GateDistillModule(**hparams)

    def __call__(self, trial: optuna.Trial) -> float:
        import lightning as L
        from optuna_integration import PyTorchLightningPruningCallback
        check_prunable(trial.study)
        hp = {s.name: s.suggest(trial, s.name) for s in self.specs}
        hp = {k: tuple(v.split(",")) if k.endswith("_pooling") and isinstance(v, str) else v
              for k, v in hp.items()}
        for k, v in hp.items():
            trial.set_user_attr(k, list(v) if isinstance(v, tuple) else v)
        module_hp = {k: v for k, v in hp.items() if k not in TRAINER_KEYS}
        trainer_hp = {k: v for k, v in hp.items() if k in TRAINER_KEYS}
        kwargs = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                  "enable_model_summary": False, **self.trainer_kwargs, **trainer_hp}
        callbacks = [*kwargs.pop("callbacks", []),
                     PyTorchLightningPruningCallback(trial, monitor=self.monitor)]
        trainer = L.Trainer(callbacks=callbacks, **kwargs)
        trainer.fit(self._module(**module_hp), datamodule=self.datamodule_factory())
        callbacks[-1].check_pruned()
        if self.monitor not in trainer.callback_metrics:
            raise ValueError(f"monitor: {self.monitor!r} was not logged; logged "
                             f"{sorted(trainer.callback_metrics)}")
        return float(trainer.callback_metrics[self.monitor])


def gate_search(study: optuna.Study, objective: GateSearchObjective, n_trials: int) -> dict:
    """Run ``n_trials`` on a single-objective ``study``; returns the best hyperparameters."""
    check_prunable(study)
    study.optimize(objective, n_trials=n_trials)
    return dict(study.best_trial.user_attrs)
