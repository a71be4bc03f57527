"""What a sweep trial measures: search spaces per method, the evaluator protocol, the objective.

A trial picks one *method* and its parameters, then measures it on validation documents:

- a pattern of the zoo (``sliding_window``, ``bigbird``, ...): its parameters are its
  ``PATTERN_PARAMS`` entries, with ranges given by the sweep config;
- the learned gate with one policy: ``gate/threshold``, ``gate/top_k``, ``gate/top_p`` (plus the
  ``keep_sink`` / ``keep_diagonal`` switches and an optional per-layer linear ramp of the budget,
  ``layer_schedule="linear"`` with ``layer_scale_end``);
- the oracle with one policy (``oracle/density``, ``oracle/top_p``, ...): the reference front.

Method names of the form ``family/kind`` map onto ``Policy(kind=..., ...)``; the evaluator is
called with the family (``"gate"`` / ``"oracle"``) and ``params = {"policy": {...}, ...}``, which
is also the policy-file format that ``frontier.py`` writes (``{"method": ..., "params": {...}}``).

Objectives (all minimized or maximized by name, see ``OBJECTIVES``): ``density`` (or
``latency_ms``, measured by a pluggable callable, e.g. our kernel's time on a GPU), ``ppl_change``
(relative perplexity increase over dense: 0.01 = +1%), ``recall`` (attention recall, a cheap
proxy) and ``needle_accuracy`` when the evaluator measures it.

Two-stage rule (``Screening``). Perplexity is expensive (tens of seconds per setting on CPU);
attention recall on the featurization cache is cheap. When the evaluator offers ``screen(method,
params) -> {"density", "recall"}``, a trial is first screened and *pruned* (state PRUNED, user
attr ``stage="screened"``) when its recall is below ``min_recall``, or when a completed trial of
the same method has both lower density and recall higher by more than ``margin``. Only survivors
get the full perplexity evaluation. Recall ranks settings of one method well but does not predict
perplexity across policies (top-p 0.9 beat a fixed budget on recall and lost on perplexity,
docs FINDINGS), so screening only compares a trial with its own method and every point on the
reported front carries a measured perplexity.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import optuna

OBJECTIVES: dict[str, str] = {
    "density": "minimize",
    "latency_ms": "minimize",
    "ppl_change": "minimize",
    "recall": "maximize",
    "needle_accuracy": "maximize",
}

HAS_SET_CONSTRAINT = hasattr(optuna.Trial, "set_constraint")  # else a constraints_func
POLICY_FAMILIES = ("gate", "oracle")
POLICY_KINDS = ("threshold", "top_k", "top_p", "density")
POLICY_KIND_PARAM = {"threshold": "tau", "top_k": "k", "top_p": "p", "density": "density"}
POLICY_SWITCHES = ("keep_sink", "keep_diagonal", "local_blocks", "layer_schedule",
                   "layer_scale_end")


@runtime_checkable
class Evaluator(Protocol):
    """Measures one configuration. Implementations: ``ModelEvaluator`` (a real model),
    ``SyntheticEvaluator`` (closed-form, for tests and dry runs), or anything with these methods.

    ``parameters(family)`` returns the parameter names the family accepts (``{name: type}``) and
    raises ValueError for an unknown family. ``evaluate(family, params)`` returns at least
    ``density`` and ``ppl_change`` (or ``perplexity`` and ``perplexity_dense``), optionally
    ``recall``, ``per_layer_density`` (list of floats), ``latency_ms``, ``needle_accuracy``.
    An optional ``screen(family, params) -> {"density", "recall"}`` enables the two-stage rule.
    """

    def parameters(self, family: str) -> Mapping[str, Any]: ...

    def evaluate(self, family: str, params: Mapping[str, Any]) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: ``int``/``float`` in [low, high] (``log``, ``step``), or
    ``choices`` (categorical; bools are categorical), or a fixed ``value``.
    ``when = (other_param, value)`` makes it conditional on another parameter of the method."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None
    value: Any = None
    when: tuple[str, Any] | None = None

    @classmethod
    def from_config(cls, name: str, spec: Any, where: str) -> ParamSpec:
        """``spec`` is a scalar (fixed), a list (choices) or a dict with low/high[/log/step/when]
        or choices[/when]."""
        if isinstance(spec, (list, tuple)):
            spec = {"choices": list(spec)}
        if not isinstance(spec, Mapping):
            return cls(name, "fixed", value=spec)
        known = {"low", "high", "log", "step", "choices", "when", "value"}
        extra = sorted(set(spec) - known)
        if extra:
            raise ValueError(f"{where}: unknown keys {extra}, expected some of {sorted(known)}")
        when = spec.get("when")
        if when is not None:
            if not isinstance(when, Mapping) or len(when) != 1:
                raise ValueError(f"{where}.when: expected a one-entry mapping "
                                 f"{{param: value}}, got {when!r}")
            when = next(iter(when.items()))
        if "value" in spec:
            return cls(name, "fixed", value=spec["value"], when=when)
        if "choices" in spec:
            choices = spec["choices"]
            if not isinstance(choices, (list, tuple)) or not choices:
                raise ValueError(f"{where}.choices: expected a non-empty list, got {choices!r}")
            return cls(name, "categorical", choices=tuple(choices), when=when)
        if "low" not in spec or "high" not in spec:
            raise ValueError(f"{where}: expected low and high, choices, or value; got {dict(spec)}")
        low, high = spec["low"], spec["high"]
        for key, val in (("low", low), ("high", high)):
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise ValueError(f"{where}.{key}: expected a number, got {val!r}")
        if low > high:
            raise ValueError(f"{where}: expected low <= high, got low={low}, high={high}")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise ValueError(f"{where}.low: expected > 0 with log=true, got {low}")
        kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
        return cls(name, kind, low=low, high=high, log=log, step=spec.get("step"), when=when)

    def suggest(self, trial: optuna.Trial, key: str) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            return trial.suggest_categorical(key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(key, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_float(key, float(self.low), float(self.high), log=self.log,
                                   step=self.step)


@dataclass(frozen=True)
class MethodSpace:
    """The parameters searched for one method. ``name`` is the curve label (``sliding_window``,
    ``gate/top_p``); ``family`` is what the evaluator is called with; ``fixed`` are constants
    passed along (e.g. the oracle's ``target``)."""

    name: str
    family: str
    params: tuple[ParamSpec, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @property
    def policy_kind(self) -> str | None:
        return self.name.split("/", 1)[1] if "/" in self.name else None

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Flat parameter values for this method (keys are parameter names)."""
        values: dict[str, Any] = {}
        for spec in self.params:
            if spec.when is not None and values.get(spec.when[0]) != spec.when[1]:
                continue
            values[spec.name] = spec.suggest(trial, f"{self.name}.{spec.name}")
        return values

    def to_call(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Flat values -> the evaluator's (and the policy file's) params."""
        if self.family not in POLICY_FAMILIES:
            return {**self.fixed, **values}
        policy = {"kind": self.policy_kind, **values}
        return {**self.fixed, "policy": policy}


def _policy_space(family: str, kind: str, spec: Mapping[str, Any], where: str) -> MethodSpace:
    main = POLICY_KIND_PARAM[kind]
    allowed = {main, *POLICY_SWITCHES}
    fixed_keys = {"target"} if family == "oracle" else {"gates"}
    params, fixed = [], {}
    for name, pspec in spec.items():
        if name in fixed_keys:
            fixed[name] = pspec
            continue
        if name not in allowed:
            raise ValueError(f"{where}: unknown parameter {name!r} for method "
                             f"'{family}/{kind}', expected one of {sorted(allowed | fixed_keys)}")
        params.append(ParamSpec.from_config(name, pspec, f"{where}.{name}"))
    if main not in spec:
        raise ValueError(f"{where}: method '{family}/{kind}' needs a range for {main!r}")
    return MethodSpace(f"{family}/{kind}", family, tuple(params), fixed)


ALLOCATIONS = ("sample", "round_robin")


@dataclass(frozen=True)
class SearchSpace:
    """All methods of a sweep. The trial first picks a method, then that method's parameters,
    named ``"<method>.<param>"`` in Optuna (a conditional space).

    ``allocation``: "sample" (the sampler picks ``method`` as a categorical parameter; TPE then
    spends most trials on the methods that did well early) or "round_robin" (slot ``i`` of the
    study, or trial number ``i`` without slots, gets method ``i mod len(methods)``: every method
    gets the same share of trials, which a per-method frontier needs; the sampler still picks
    each method's parameters)."""

    methods: tuple[MethodSpace, ...]
    allocation: str = "sample"

    def __post_init__(self):
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"method_allocation: expected one of {list(ALLOCATIONS)}, got "
                             f"{self.allocation!r}")

    @classmethod
    def from_config(cls, methods: Any, evaluator: Evaluator | None = None, *,
                    allocation: str = "sample") -> SearchSpace:
        """``methods``: mapping method name -> {param: spec}. Method names are pattern names, or
        ``gate/<kind>`` / ``oracle/<kind>`` with kind in threshold, top_k, top_p, density.
        With an evaluator, pattern parameters are checked against ``evaluator.parameters``."""
        if not isinstance(methods, Mapping) or not methods:
            raise ValueError(f"methods: expected a non-empty mapping of method -> parameter "
                             f"ranges (empty search space), got {methods!r}")
        spaces = []
        for name, spec in methods.items():
            where = f"methods.{name}"
            spec = {} if spec is None else spec
            if not isinstance(spec, Mapping):
                raise ValueError(f"{where}: expected a mapping of parameter -> range, got {spec!r}")
            family, _, kind = str(name).partition("/")
            if family in POLICY_FAMILIES:
                if kind not in POLICY_KINDS:
                    raise ValueError(f"{where}: unknown policy {kind!r} for {family}, expected "
                                     f"one of {list(POLICY_KINDS)} (e.g. '{family}/top_p')")
                spaces.append(_policy_space(family, kind, spec, where))
                continue
            if kind:
                raise ValueError(f"method: unknown method {name!r}; only gate/<kind> and "
                                 f"oracle/<kind> take a '/'")
            known = _known_parameters(evaluator, name)
            params = []
            for pname, pspec in spec.items():
                if known is not None and pname not in known:
                    raise ValueError(f"{where}: unknown parameter {pname!r} for method {name!r}, "
                                     f"expected one of {sorted(known)}")
                params.append(ParamSpec.from_config(pname, pspec, f"{where}.{pname}"))
            spaces.append(MethodSpace(name, name, tuple(params)))
        return cls(tuple(spaces), allocation)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.methods]

    def method(self, name: str) -> MethodSpace:
        for m in self.methods:
            if m.name == name:
                return m
        raise ValueError(f"method: unknown method {name!r}, expected one of {self.names}")

    def suggest(self, trial: optuna.Trial) -> tuple[MethodSpace, dict[str, Any]]:
        if self.allocation == "round_robin":
            slot = int(trial.user_attrs.get("slot", trial.number))
            method = self.methods[slot % len(self.methods)]
        else:
            method = self.method(trial.suggest_categorical("method", self.names))
        return method, method.suggest(trial)


def _known_parameters(evaluator: Evaluator | None, family: str) -> set[str] | None:
    if evaluator is None:
        return None
    try:
        return set(evaluator.parameters(family))
    except (KeyError, ValueError) as e:
        raise ValueError(f"method: unknown method {family!r} ({e})") from None


@dataclass(frozen=True)
class Screening:
    """Two-stage rule (module docstring). Disabled when ``min_recall`` is None and ``margin`` is
    None, or when the evaluator has no ``screen``."""

    min_recall: float | None = None
    margin: float | None = None

    @property
    def enabled(self) -> bool:
        return self.min_recall is not None or self.margin is not None

    def reject(self, method: str, density: float, recall: float,
               completed: list[optuna.trial.FrozenTrial]) -> str | None:
        if self.min_recall is not None and recall < self.min_recall:
            return f"recall {recall:.4f} < min_recall {self.min_recall}"
        if self.margin is None:
            return None
        for t in completed:
            if t.user_attrs.get("method") != method or "recall" not in t.user_attrs:
                continue
            if (t.user_attrs["density"] <= density
                    and t.user_attrs["recall"] > recall + self.margin):
                return (f"dominated by trial {t.number} (density {t.user_attrs['density']:.4f}, "
                        f"recall {t.user_attrs['recall']:.4f})")
        return None


def check_objectives(objectives: Any) -> tuple[str, ...]:
    if isinstance(objectives, str) or not isinstance(objectives, (list, tuple)) or not objectives:
        raise ValueError(f"objectives: expected a non-empty list of names from "
                         f"{sorted(OBJECTIVES)}, got {objectives!r}")
    for name in objectives:
        if name not in OBJECTIVES:
            raise ValueError(f"objectives: unknown objective {name!r}, expected one of "
                             f"{sorted(OBJECTIVES)}")
    if len(set(objectives)) != len(objectives):
        raise ValueError(f"objectives: expected distinct names, got {list(objectives)}")
    return tuple(objectives)


def directions(objectives: tuple[str, ...]) -> list[str]:
    return [OBJECTIVES[name] for name in objectives]


def _ppl_change(result: Mapping[str, Any]) -> float:
    if "perplexity" in result and "perplexity_dense" in result:
        return float(result["perplexity"]) / float(result["perplexity_dense"]) - 1.0
    return float(result["ppl_change"])


class SweepObjective:
    """The Optuna objective: suggest a method and parameters, screen, evaluate, record.

    Records per trial (user attrs): method, family, call params (``policy_params``), every
    measured metric, ``per_layer_density``, ``stage`` ("screened" or "evaluated") and, with a
    density constraint, ``constraint`` = [density - max_density] (feasible when <= 0).
    ``latency`` (optional) measures latency in ms: ``latency(family, params, result) -> float``,
    or a mapping with ``latency_ms`` whose other entries (its parts, the device) are recorded as
    user attrs too (``sweeps.latency.kernel_latency``).
    """

    def __init__(self, space: SearchSpace, evaluator: Evaluator, objectives=("density",
                 "ppl_change"), *, screening: Screening | None = None,
                 max_density: float | None = None,
                 latency: Callable[[str, Mapping[str, Any], Mapping[str, Any]], float] | None
                 = None):
        if not isinstance(space, SearchSpace):
            raise TypeError(f"space: expected a SearchSpace, got {type(space).__name__}")
        if not space.methods:
            raise ValueError("space: empty search space (no methods)")
        if not isinstance(evaluator, Evaluator):
            raise TypeError(f"evaluator: expected an object with parameters() and evaluate(), "
                            f"got {type(evaluator).__name__}")
        self.space = space
        self.evaluator = evaluator
        self.objectives = check_objectives(list(objectives))
        self.screening = screening or Screening()
        self.max_density = max_density
        self.latency = latency

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        method, values = self.space.suggest(trial)
        call = method.to_call(values)
        trial.set_user_attr("method", method.name)
        trial.set_user_attr("family", method.family)
        trial.set_user_attr("policy_params", call)
        same = _completed_twin(trial, method.name, call)
        if same is not None:
            trial.set_user_attr("duplicate_of", same)
            raise optuna.TrialPruned(f"duplicate of trial {same} (same method and parameters; "
                                     f"not evaluated again)")
        screen = getattr(self.evaluator, "screen", None)
        if self.screening.enabled and screen is not None:
            s = screen(method.family, call)
            density, recall = float(s["density"]), float(s["recall"])
            trial.set_user_attr("screen_density", density)
            trial.set_user_attr("screen_recall", recall)
            completed = trial.study.get_trials(deepcopy=False,
                                               states=(optuna.trial.TrialState.COMPLETE,))
            why = self.screening.reject(method.name, density, recall, completed)
            if why is not None:
                trial.set_user_attr("stage", "screened")
                self._constrain(trial, density)
                raise optuna.TrialPruned(f"screened out: {why}")
        result = dict(self.evaluator.evaluate(method.family, call))
        metrics = {"density": float(result["density"]), "ppl_change": _ppl_change(result)}
        for key in ("recall", "perplexity", "perplexity_dense", "needle_accuracy",
                    "latency_ms"):
            if result.get(key) is not None:
                metrics[key] = float(result[key])
        if "latency_ms" in self.objectives and self.latency is not None:
            measured = self.latency(method.family, call, result)
            if isinstance(measured, Mapping):  # latency_ms and its parts, recorded as attrs
                for key, val in measured.items():
                    if key != "latency_ms":
                        trial.set_user_attr(key, val)
                measured = measured["latency_ms"]
            metrics["latency_ms"] = float(measured)
        for key, val in metrics.items():
            trial.set_user_attr(key, val)
        if result.get("per_layer_density") is not None:
            trial.set_user_attr("per_layer_density",
                                [float(x) for x in result["per_layer_density"]])
        trial.set_user_attr("stage", "evaluated")
        self._constrain(trial, metrics["density"])
        missing = [name for name in self.objectives if name not in metrics]
        if missing:
            raise ValueError(f"objectives: the evaluator did not measure {missing} for "
                             f"{method.name} (pass latency= for latency_ms)")
        out = tuple(metrics[name] for name in self.objectives)
        if not all(math.isfinite(v) for v in out):
            raise ValueError(f"objectives: non-finite values {out} for {method.name} {call}")
        return out

    def _constrain(self, trial: optuna.Trial, density: float) -> None:
        if self.max_density is None:
            return
        trial.set_user_attr("constraint", [density - self.max_density])
        if HAS_SET_CONSTRAINT:
            with warnings.catch_warnings():  # a retried trial carries its first constraint
                warnings.simplefilter("ignore")
                trial.set_constraint("max_density", density - self.max_density)


def _completed_twin(trial: optuna.Trial, method: str, call: Mapping[str, Any]) -> int | None:
    """The number of a COMPLETE trial of ``method`` with the same parameters, or None."""
    import json

    key = json.dumps(call, sort_keys=True, default=str)
    for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("method") == method and \
                json.dumps(t.user_attrs.get("policy_params"), sort_keys=True, default=str) == key:
            return t.number
    return None


def constraints_func(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Optuna < 5 ``constraints_func`` (Optuna 5 reads ``Trial.set_constraint``): feasible when
    every value is <= 0 (the density budget)."""
    return list(trial.user_attrs.get("constraint", [0.0]))
