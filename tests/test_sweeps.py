"""Sweeps in one process: search spaces, objectives, fronts, reports, resume, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from sweeps.cli import SweepConfig, frontier_main, run_sweep
from sweeps.evaluators import ModelEvaluator, SyntheticEvaluator
from sweeps.frontier import best_within, load_run, pareto_front, write_report
from sweeps.objectives import Screening, SearchSpace, SweepObjective
from sweeps.study import open_storage, open_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

METHODS = {
    "sliding_window": {"window": {"low": 1, "high": 30}},
    "strided": {"stride": {"low": 1, "high": 30}},
    "oracle/density": {"density": {"low": 0.05, "high": 0.9}, "target": "sum"},
    "gate/top_p": {"p": {"low": 0.5, "high": 0.99}, "keep_sink": [True, False],
                   "layer_schedule": ["constant", "linear"],
                   "layer_scale_end": {"low": 0.5, "high": 2.0,
                                       "when": {"layer_schedule": "linear"}}},
}


def _cfg(allow_modules=(), **kw) -> SweepConfig:
    base = dict(name="t", methods=METHODS, n_trials=10, seed=3, n_startup_trials=4,
                heartbeat_interval=1, grace_period=3,
                evaluator={"factory": "sweeps.evaluators:SyntheticEvaluator"})
    base.update(kw)
    return SweepConfig.from_dict(base, allow_modules=allow_modules)


def _trials(run_dir: Path) -> list[optuna.trial.FrozenTrial]:
    return load_run(run_dir)[1].get_trials(deepcopy=False)


def _journal(run_dir: Path) -> str:
    """The journal file is ~6x faster than SQLite here (no fsync per attribute)."""
    return f"journal:{run_dir / 'study.log'}"


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    return model, torch.randint(0, 96, (2, 256), generator=torch.Generator().manual_seed(seed))


def test_tiny_model_two_methods_front_read_back(tmp_path):
    pytest.importorskip("adaptive_sparse.models")
    model, seqs = _tiny_llama(seed=11)
    evaluator = ModelEvaluator(model_obj=model, sequences=seqs, block_size=16, backend="reference")
    methods = {"sliding_window": {"window": {"low": 16, "high": 192}},
               "oracle/density": {"density": {"low": 0.1, "high": 0.9}, "target": "sum"}}
    cfg = _cfg(methods=methods, n_trials=6, screening={"min_recall": 0.0})
    assert cfg.storage is None  # the default: <run_dir>/study.db
    counts = run_sweep(cfg, tmp_path, evaluator=evaluator, progress=False)
    assert counts["done"] == counts["slots"] == 6
    trials = [t for t in _trials(tmp_path) if t.state == TrialState.COMPLETE]
    assert len(trials) == 6
    for t in trials:
        ua = t.user_attrs
        assert 0.0 < ua["density"] <= 1.0 and 0.0 < ua["recall"] <= 1.0 + 1e-6
        assert ua["perplexity_dense"] > 1.0 and abs(ua["ppl_change"]) < 5.0
        assert len(ua["per_layer_density"]) == 2
        assert "screen_recall" in ua
    report = write_report(tmp_path, budgets=[0.01, 10.0])
    assert report["fronts"]["overall"], "empty Pareto front"
    assert set(report["fronts"]) >= {"overall"} | {t.user_attrs["method"] for t in trials}
    back = json.loads((tmp_path / "frontier.json").read_text())
    assert back["fronts"] == report["fronts"]
    csv_lines = (tmp_path / "frontier.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 6
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    policy = json.loads((tmp_path / "policy_within_1000pct.json").read_text())
    assert set(policy) == {"method", "params"} and policy["method"] == "sliding_window"


def test_screen_agrees_with_full_evaluation_on_tiny_model():
    """The cheap stage (masks from recorded q/k) measures what the full stage measures when it
    sees the same sequences; the oracle keeping every block changes nothing."""
    pytest.importorskip("adaptive_sparse.models")
    model, seqs = _tiny_llama(seed=5)
    ev = ModelEvaluator(model_obj=model, sequences=seqs, block_size=16, backend="reference",
                        screen_sequences=2)
    for family, params in (("sliding_window", {"window": 48}),
                           ("oracle", {"policy": {"kind": "density", "density": 0.3},
                                       "target": "sum"})):
        cheap, full = ev.screen(family, params), ev.evaluate(family, params)
        assert cheap["density"] == pytest.approx(full["density"], abs=1e-6)
        assert cheap["recall"] == pytest.approx(full["recall"], abs=1e-4)
        assert 0.1 < full["density"] < 0.9 and full["recall"] < 1.0
    everything = ev.evaluate("oracle", {"policy": {"kind": "density", "density": 1.0}})
    assert everything["recall"] == pytest.approx(1.0, abs=1e-5)
    assert everything["perplexity"] == pytest.approx(everything["perplexity_dense"], rel=1e-5)


def test_gate_with_policy_on_tiny_model(tmp_path):
    pytest.importorskip("gating")
    from adaptive_sparse.gates import GateConfig, GateSet, save_gates
    model, seqs = _tiny_llama(seed=2)
    torch.manual_seed(0)
    gates = save_gates(GateSet(GateConfig.from_model(model, block_size=16)), tmp_path / "gates")
    ev = ModelEvaluator(model_obj=model, sequences=seqs, block_size=16, backend="reference",
                        gates=str(gates))
    space = SearchSpace.from_config({"gate/top_k": {"k": [2, 6], "keep_sink": True,
                                                    "layer_schedule": "linear",
                                                    "layer_scale_end": 2.0}}, ev)
    objective = SweepObjective(space, ev, screening=Screening(min_recall=0.0))
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.BruteForceSampler(seed=0))
    study.optimize(objective, n_trials=2)
    by_k = {t.user_attrs["policy_params"]["policy"]["k"]: t.user_attrs for t in study.trials}
    assert set(by_k) == {2, 6}
    assert by_k[2]["density"] < by_k[6]["density"] <= 1.0
    assert by_k[2]["screen_recall"] <= by_k[6]["screen_recall"] + 1e-6
    layers = by_k[2]["per_layer_density"]
    assert len(layers) == 2 and layers[1] > layers[0]  # the linear ramp doubles the budget
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_same_seed_same_trials(tmp_path):
    runs = []
    for name in ("a", "b", "c"):
        seed = 7 if name != "c" else 8
        run_sweep(_cfg(seed=seed, n_trials=12, storage=_journal(tmp_path / name)),
                  tmp_path / name, progress=False)
        runs.append([(t.user_attrs["slot"], t.params) for t in _trials(tmp_path / name)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert len({json.dumps(p, sort_keys=True) for _, p in runs[0]}) == 12


def test_round_robin_gives_every_method_the_same_share(tmp_path):
    run_sweep(_cfg(n_trials=12, method_allocation="round_robin", storage=_journal(tmp_path)),
              tmp_path, progress=False)
    trials = _trials(tmp_path)
    by_slot = {t.user_attrs["slot"]: t.user_attrs["method"] for t in trials}
    names = list(METHODS)
    assert by_slot == {i: names[i % len(names)] for i in range(12)}
    assert all("method" not in t.params for t in trials)
    assert {t.user_attrs["method"]: 0 for t in trials}.keys() == set(names)


def test_sampled_allocation_records_method_as_parameter(tmp_path):
    run_sweep(_cfg(n_trials=6, storage=_journal(tmp_path)), tmp_path, progress=False)
    assert all(t.params["method"] == t.user_attrs["method"] for t in _trials(tmp_path))


def test_identical_parameters_are_not_evaluated_twice(tmp_path):
    """Two possible settings, six slots: two evaluations, four trials pruned as duplicates (the
    demo study once ran the same parameters twice); objectives named in the study."""
    ev = SyntheticEvaluator()
    cfg = _cfg(n_trials=6, methods={"sliding_window": {"window": [3, 5]}},
               storage=_journal(tmp_path))
    counts = run_sweep(cfg, tmp_path, evaluator=ev, progress=False)
    trials = _trials(tmp_path)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    twins = [t for t in trials if t.state == TrialState.PRUNED]
    assert ev.evaluations == len(done) == len({json.dumps(t.params) for t in done}) <= 2
    assert len(twins) == 6 - len(done) and counts["done"] == 6 and counts["fail"] == 0
    by_number = {t.number: t for t in done}
    for t in twins:
        assert by_number[t.user_attrs["duplicate_of"]].params == t.params
    assert load_run(tmp_path)[1].metric_names == ["density", "ppl_change"]


def test_unknown_allocation_refused():
    with pytest.raises(ValueError, match="method_allocation: expected one of"):
        SearchSpace.from_config(METHODS, SyntheticEvaluator(), allocation="greedy")


class _Interrupting(SyntheticEvaluator):
    def __init__(self, stop_after: int):
        super().__init__()
        self.stop_after = stop_after

    def evaluate(self, family, params):
        if self.evaluations == self.stop_after:
            raise KeyboardInterrupt
        return super().evaluate(family, params)


def test_interrupted_run_resumes_without_repeating(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_cfg(n_trials=10), tmp_path, evaluator=_Interrupting(4), progress=False)
    before = {t.user_attrs["slot"]: t for t in _trials(tmp_path) if t.state == TrialState.COMPLETE}
    assert len(before) == 4
    resumed = SyntheticEvaluator()
    counts = run_sweep(_cfg(n_trials=10), tmp_path, evaluator=resumed, progress=False)
    twins = [t for t in _trials(tmp_path) if "duplicate_of" in t.user_attrs]
    assert all(t.state == TrialState.PRUNED for t in twins)
    assert resumed.evaluations + len(twins) == 6
    assert counts["done"] == 10 and counts["complete"] + counts["pruned"] == 10
    after = [t for t in _trials(tmp_path) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert sorted(t.user_attrs["slot"] for t in after) == list(range(10))
    for t in after:
        if t.user_attrs["slot"] in before:
            assert t.number == before[t.user_attrs["slot"]].number
            assert t.params == before[t.user_attrs["slot"]].params
    failed = [t for t in _trials(tmp_path) if t.state == TrialState.FAIL]
    assert len(failed) == 1
    again = SyntheticEvaluator()
    run_sweep(_cfg(n_trials=10), tmp_path, evaluator=again, progress=False)
    assert again.evaluations == 0


def test_screening_prunes_low_recall_and_constraint_recorded(tmp_path):
    ev = SyntheticEvaluator(screen=True)
    cfg = _cfg(n_trials=16, screening={"min_recall": 0.6}, max_density=0.5, sampler="nsga2",
               population_size=4, storage=_journal(tmp_path))
    counts = run_sweep(cfg, tmp_path, evaluator=ev, progress=False)
    assert counts["done"] == 16
    trials = _trials(tmp_path)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and complete and ev.evaluations == len(complete)
    for t in pruned:
        assert t.user_attrs["stage"] == "screened" and t.user_attrs["screen_recall"] < 0.6
    for t in complete:
        assert t.user_attrs["screen_recall"] >= 0.6
        assert t.user_attrs["constraint"] == [pytest.approx(t.user_attrs["density"] - 0.5)]


def test_screening_margin_uses_same_method_only():
    s = Screening(margin=0.05)
    done = optuna.trial.create_trial(values=[0.2, 0.1], user_attrs={
        "method": "a", "density": 0.2, "recall": 0.9})
    assert s.reject("a", 0.3, 0.8, [done]) is not None
    assert s.reject("a", 0.3, 0.86, [done]) is None
    assert s.reject("b", 0.3, 0.5, [done]) is None
    assert s.reject("a", 0.1, 0.5, [done]) is None


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for _ in range(20):
        pts = [[rng.randint(0, 6), rng.randint(0, 6)] for _ in range(15)]
        front = set(pareto_front(pts, ["minimize", "maximize"]))
        for i, (a, b) in enumerate(pts):
            dominated = any(c <= a and d >= b and (c < a or d > b) for c, d in pts)
            assert (i in front) == (not dominated)


def test_best_within_budget_picks_sparsest():
    rows = [{"trial": 0, "method": "m", "density": 0.2, "ppl_change": 0.03},
            {"trial": 1, "method": "m", "density": 0.4, "ppl_change": 0.008},
            {"trial": 2, "method": "n", "density": 0.3, "ppl_change": 0.009},
            {"trial": 3, "method": "n", "density": 0.1, "ppl_change": 0.2}]
    assert best_within(rows, 0.01)["trial"] == 2
    assert best_within(rows, 0.05)["trial"] == 0
    assert best_within(rows, 0.01, methods=["m"])["trial"] == 1
    assert best_within(rows, 0.001) is None


def test_frontier_cli_prints_table_and_writes_policy(tmp_path, capsys):
    run_sweep(_cfg(n_trials=12, storage=_journal(tmp_path)), tmp_path, progress=False)
    assert frontier_main([str(tmp_path), "--budget", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "Pareto front" in out and "within +5% perplexity" in out
    policy = json.loads((tmp_path / "policy_within_5pct.json").read_text())
    report = json.loads((tmp_path / "frontier.json").read_text())
    chosen = [r for r in report["trials"] if r["trial"] == report["best"]["0.05"]["overall"]][0]
    assert policy == {"method": chosen["family"], "params": chosen["params"]}
    assert chosen["ppl_change"] <= 0.05 and not chosen["method"].startswith("oracle")
    eligible = [r["density"] for r in report["trials"]
                if r["ppl_change"] <= 0.05 and not r["method"].startswith("oracle")]
    assert chosen["density"] == min(eligible)


def test_gate_params_map_to_policy(tmp_path):
    space = SearchSpace.from_config({"gate/top_p": METHODS["gate/top_p"]})
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        method, values = space.suggest(trial)
        call = method.to_call(values)
        assert call["policy"]["kind"] == "top_p" and 0.5 <= call["policy"]["p"] <= 0.99
        assert ("layer_scale_end" in call["policy"]) == (call["policy"]["layer_schedule"]
                                                         == "linear")
        seen.add(call["policy"]["layer_schedule"])
        study.tell(trial, [0.5, 0.5])
    assert seen == {"constant", "linear"}


@pytest.mark.parametrize("methods, match", [
    ({"no_such_pattern": {"x": [1, 2]}}, r"method: unknown method 'no_such_pattern'"),
    ({"sliding_window": {"windw": {"low": 1, "high": 3}}},
     r"methods\.sliding_window: unknown parameter 'windw'.*expected one of \['window'\]"),
    ({"gate/top_q": {"p": [0.9]}}, r"unknown policy 'top_q'"),
    ({"gate/top_p": {"tau": [0.1]}}, r"unknown parameter 'tau' for method 'gate/top_p'"),
    ({}, r"methods: .*empty search space"),
    ({"sliding_window": {"window": {"low": 5, "high": 1}}}, r"expected low <= high"),
])
def test_bad_search_space(methods, match):
    with pytest.raises(ValueError, match=match):
        SearchSpace.from_config(methods, SyntheticEvaluator())


def test_empty_space_objective_refused():
    with pytest.raises(ValueError, match="space: empty search space"):
        SweepObjective(SearchSpace(()), SyntheticEvaluator())


def test_unreachable_storage_url():
    with pytest.raises(ValueError, match=r"storage: cannot open 'postgresql://u:\*\*\*@127"):
        open_storage("postgresql://u:secret@127.0.0.1:9/nodb", heartbeat_interval=1)
    with pytest.raises(ValueError, match="storage: expected sqlite"):
        open_storage("nonsense-url", heartbeat_interval=1)


def test_study_with_other_objectives_refused(tmp_path):
    storage = open_storage(None, tmp_path, heartbeat_interval=1)
    open_study(storage, "s", ["density", "ppl_change"])
    with pytest.raises(ValueError, match=r"objectives: study 's' was created with objectives "
                       r"\['density', 'ppl_change'\], not \['density', 'recall'\]"):
        open_study(storage, "s", ["density", "recall"])
    with pytest.raises(ValueError, match="objectives: unknown objective 'speed'"):
        open_study(storage, "s2", ["density", "speed"])


def test_bad_config_keys_and_sampler():
    with pytest.raises(ValueError, match=r"config: unknown keys \['n_trails'\]"):
        SweepConfig.from_dict({"n_trails": 3})
    with pytest.raises(ValueError, match="sampler: expected one of"):
        SweepConfig.from_dict({"sampler": "cmaes"})


REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "sweeps/configs/smollm2-frontier.yaml"


@pytest.fixture
def trained_run(tmp_path, monkeypatch):
    """A working directory holding what `adaptive-sparse train` with the shipped gating config
    writes (runs/gates/<name>/version_N/gates), as far as the sweep config's check looks."""
    import yaml
    monkeypatch.chdir(tmp_path)
    train = yaml.safe_load((REPO / "gating/configs/smollm2-135m.yaml").read_text())
    csv = train["trainer"]["logger"][0]["init_args"]
    gates = tmp_path / csv["save_dir"] / csv["name"] / "version_0" / "gates"
    gates.mkdir(parents=True)
    (gates / "gates.json").write_text("{}")
    return gates


def test_repo_config_matches_pattern_zoo(trained_run):
    pytest.importorskip("adaptive_sparse.patterns")
    from sweeps.cli import build_objective
    cfg = SweepConfig.load(SHIPPED)
    assert cfg.evaluator["args"]["gates"] == str(trained_run)
    objective = build_objective(cfg)
    assert {"gate/top_p", "oracle/density", "sliding_window"} <= set(objective.space.names)


def test_repo_config_refuses_missing_gates_before_any_trial(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"smollm2-frontier.yaml.*gates: .*runs/gates/smollm2-135m"
                                         r".*does not exist"):
        SweepConfig.load(SHIPPED)


def test_repo_config_every_sampled_pattern_setting_builds(trained_run):
    """Random draws from each pattern's range in the shipped config build a valid mask (an odd
    LSH bucket count once failed every lsh trial of a GPU sweep)."""
    from adaptive_sparse.patterns import make_pattern
    from sweeps.cli import build_objective
    space = build_objective(SweepConfig.load(SHIPPED)).space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 512, 16, generator=g), torch.randn(1, 2, 512, 16, generator=g)
    for method in space.methods:
        if method.family in ("gate", "oracle"):
            continue
        for _ in range(12):
            params = method.to_call(method.suggest(study.ask()))
            mask = make_pattern(method.family, q_len=512, kv_len=512, num_heads=4,
                                block_size=64, q=q, k=k, **params)
            assert 0 < mask.density() <= 1, (method.name, params)


class _TinyRegression:
    """A Lightning module learning y = 3x; logs val/loss once per epoch."""

    @staticmethod
    def make(lr: float):
        import lightning as L

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))

            def _loss(self, batch):
                x, y = batch
                return ((self.w * x - y) ** 2).mean()

            def training_step(self, batch, _):
                return self._loss(batch)

            def validation_step(self, batch, _):
                self.log("val/loss", self._loss(batch))

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=lr)

        return Module()

    @staticmethod
    def data():
        import lightning as L
        from torch.utils.data import DataLoader, TensorDataset
        x = torch.randn(64, generator=torch.Generator().manual_seed(0))
        ds = TensorDataset(x, 3 * x)
        return L.LightningDataModule.from_datasets(ds, ds, batch_size=16)


def test_gate_search_prunes_bad_trials_single_objective_only():
    from sweeps.gate_search import GateSearchObjective, gate_search
    objective = GateSearchObjective(
        _TinyRegression.data, space={"lr": [1e-6, 0.1], "max_steps": 40},
        module_factory=_TinyRegression.make,
        trainer_kwargs={"accelerator": "cpu", "max_epochs": 10, "num_sanity_val_steps": 0})
    study = optuna.create_study(sampler=optuna.samplers.BruteForceSampler(seed=0),
                                pruner=optuna.pruners.ThresholdPruner(upper=5.0))
    best = gate_search(study, objective, n_trials=2)
    assert best["lr"] == 0.1 and study.best_value < 0.1
    states = {t.user_attrs["lr"]: t.state for t in study.trials}
    assert states == {1e-6: TrialState.PRUNED, 0.1: TrialState.COMPLETE}
    multi = optuna.create_study(directions=["minimize", "minimize"])
    with pytest.raises(ValueError, match="Optuna cannot prune multi-objective studies"):
        gate_search(multi, objective, n_trials=1)


def fake_latency(family, params, result):
    return 2.0 + 10.0 * result["density"]


def test_latency_objective_is_pluggable(tmp_path):
    cfg = _cfg(objectives=["latency_ms", "ppl_change"], n_trials=5, storage=_journal(tmp_path),
               latency="test_sweeps:fake_latency", allow_modules=("test_sweeps",))
    run_sweep(cfg, tmp_path, progress=False, allow_modules=("test_sweeps",))
    for t in _trials(tmp_path):
        assert t.values[0] == pytest.approx(2.0 + 10.0 * t.user_attrs["density"])
        assert t.user_attrs["latency_ms"] == t.values[0]
    report = write_report(tmp_path)
    assert report["cost"] == "latency_ms" and report["fronts"]["overall"]
    with pytest.raises(ValueError, match="latency: cannot import 'nowhere:fn'"):
        run_sweep(_cfg(latency="nowhere:fn", storage=_journal(tmp_path / "x"),
                       allow_modules=("nowhere",)), tmp_path / "x", progress=False,
                  allow_modules=("nowhere",))
    with pytest.raises(ValueError, match="latency: expected a callable from adaptive_sparse"):
        _cfg(latency="test_sweeps:fake_latency")
