"""benchmarks/quality.py: calibration, the summary's comparisons, merging and pooling sweeps."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import quality


class _Screen:
    """Density = window / 1000 for sliding_window; counts its screens."""

    def __init__(self):
        self.calls = 0

    def screen(self, family, params):
        self.calls += 1
        return {"density": params["window"] / 1000.0, "recall": 0.5}


def test_calibrate_picks_closest_member_screening_each_once():
    ev = _Screen()
    members = [{"window": w} for w in (40, 90, 260, 480, 700)]
    cal = quality.calibrate(ev, "sliding_window", members, [0.05, 0.1, 0.25, 0.5])
    assert ev.calls == len(members)
    assert [cal[t]["params"]["window"] for t in (0.05, 0.1, 0.25, 0.5)] == [40, 90, 260, 480]
    assert cal[0.25]["screen_density"] == pytest.approx(0.26)


@pytest.mark.parametrize("seq_len", [4096, 8192])
def test_families_are_ordered_by_growing_budget_and_build(seq_len):
    import torch

    from adaptive_sparse.patterns import make_pattern
    fams = quality.families(seq_len, 64)
    assert {"gate/threshold", "oracle/threshold", "lsh", "antidiagonal"} <= set(fams)
    taus = [m["policy"]["tau"] for m in fams["gate/threshold"][1]]
    assert taus == sorted(taus, reverse=True)
    windows = [m["window"] for m in fams["sliding_window"][1]]
    assert windows == sorted(windows) and len(set(windows)) == len(windows)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 256, 8, generator=g), torch.randn(1, 1, 256, 8, generator=g)
    for label, (family, members) in fams.items():
        if family in ("gate", "oracle"):
            continue
        for params in (members[0], members[-1]):
            mask = make_pattern(family, q_len=256, kv_len=256, num_heads=2, block_size=64,
                                q=q, k=k, **params)
            assert 0 < mask.density() <= 1, (label, params)


def _row(method, target, density, ppl, n=8192):
    return {"key": f"{n}|{method}|{target}", "seq_len": n, "method": method,
            "target_density": target, "params": {}, "density": density, "ppl_change": ppl,
            "perplexity": 10 * (1 + ppl), "perplexity_dense": 10.0, "recall": 0.9,
            "per_layer_density": [density]}


def _results(tmp_path, rows):
    res = quality.Results(tmp_path / "quality.json", {})
    for r in rows:
        res.add(r)
    return res


def test_summary_best_gate_pattern_and_oracle_density(tmp_path):
    res = _results(tmp_path, [
        _row("gate", 0.1, 0.11, 0.40), _row("gate/threshold", 0.1, 0.10, 0.20),
        _row("gate/threshold", 0.25, 0.24, 0.05),
        _row("oracle/threshold", 0.1, 0.10, 0.10), _row("oracle/threshold", 0.25, 0.25, 0.01),
        _row("hierarchical", 0.1, 0.09, 0.25), _row("sliding_window", 0.1, 0.10, 0.30),
        _row("strided", 0.1, 0.30, 0.01),  # denser than 1.1x the gate: not comparable
    ])
    row = quality.summary(res, 8192)["rows"][0]
    assert row["best_gate"]["method"] == "gate/threshold"
    assert row["best_pattern"]["method"] == "hierarchical"
    assert row["gate_beats_patterns"] is True
    # the oracle's sparsest point (0.10, +10%) is already below the gate's +20%: a bound
    assert row["oracle_density_at_gate_ppl"] == 0.10 and row["oracle_density_bound"] is True
    assert row["gate_over_oracle_density"] == pytest.approx(1.0)
    second = quality.summary(res, 8192)["rows"][1]
    # gate at +5%: on the oracle curve between +10% (0.10) and +1% (0.25)
    t = (math.log(0.05) - math.log(0.10)) / (math.log(0.01) - math.log(0.10))
    assert second["oracle_density_at_gate_ppl"] == pytest.approx(0.10 + t * 0.15)
    assert second["oracle_density_bound"] is False
    assert second["gate_beats_patterns"] is None  # no pattern at that target
    md = quality.markdown(res, [8192])
    assert "| 0.1 |" in md and "hierarchical" in md


def test_merge_later_files_win(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"meta": {"x": 1}, "rows": [_row("gate", 0.1, 0.1, 0.5)]}))
    b.write_text(json.dumps({"meta": {"y": 2}, "rows": [_row("gate", 0.1, 0.1, 0.3),
                                                        _row("gate", 0.5, 0.5, 0.01)]}))
    res = quality.merge(tmp_path / "out", [str(a), str(b)], None)
    assert sorted(r["ppl_change"] for r in res.data["rows"]) == [0.01, 0.3]
    assert res.data["meta"] == {"x": 1, "y": 2}
    assert (tmp_path / "out" / "quality.md").exists()
    assert (tmp_path / "out" / "quality.png").stat().st_size > 0


def _report(path, trials):
    path.write_text(json.dumps({"trials": trials}))
    return str(path)


def _trial(n, method, density, ppl, dense=6.5):
    return {"trial": n, "method": method, "density": density, "ppl_change": ppl,
            "perplexity_dense": dense, "params": {}}


def test_union_fronts_pools_and_counts_undominated(tmp_path):
    a = _report(tmp_path / "a.json", [_trial(0, "gate/threshold", 0.3, 0.008),
                                      _trial(1, "antidiagonal", 0.35, 0.007)])
    b = _report(tmp_path / "b.json", [_trial(0, "gate/top_p", 0.2, 0.04),
                                      _trial(1, "sliding_window", 0.6, 0.02)])
    text = quality.union_fronts([a, b], tmp_path / "u")
    assert "4 completed trials from 2 sweeps" in text
    assert "1 of 2: antidiagonal 0.35" in text  # sliding window is dominated, antidiagonal not
    assert "ratio 0.86" in text  # within +1%: gate 0.30 vs antidiagonal 0.35
    assert (tmp_path / "u" / "frontier_union.png").exists()


def test_union_fronts_refuses_other_sequences(tmp_path):
    a = _report(tmp_path / "a.json", [_trial(0, "gate/threshold", 0.3, 0.01)])
    b = _report(tmp_path / "b.json", [_trial(0, "strided", 0.3, 0.01, dense=7.0)])
    with pytest.raises(ValueError, match="different dense perplexities"):
        quality.union_fronts([a, b], tmp_path / "u")


class _Table:
    """A stand-in evaluator for evaluate_table: screening density from the policy's tau or a
    pattern's window, every evaluation recorded."""

    def __init__(self):
        self.evaluated = []

    def screen(self, family, params):
        if family == "gate":
            p = params["policy"]
            x = p.get("tau", p.get("p", 0.5))
            return {"density": min(1.0, 0.02 / max(x, 1e-6)) if "tau" in p else x / 3,
                    "recall": 0.9}
        return {"density": 0.1, "recall": 0.5}

    def evaluate(self, family, params):
        self.evaluated.append((family, params))
        return {"perplexity": 10.5, "perplexity_dense": 10.0, "density": 0.1, "recall": 0.9,
                "per_layer_density": [0.1]}


def test_ablation_gate_sets_are_planned_with_their_folder(tmp_path):
    ev = _Table()
    res = quality.Results(tmp_path / "quality.json", {})
    quality.evaluate_table(ev, res, 4096, densities=[0.1], patterns=["gate/threshold"],
                           extra_gates={"sum": "/gates/sum"}, log=lambda *_: None)
    methods = {r["method"]: r for r in res.data["rows"]}
    assert set(methods) == {"gate", "oracle", "gate/threshold", "gate[sum]",
                            "gate[sum]/threshold"}
    assert methods["gate[sum]"]["params"]["gates"] == "/gates/sum"
    assert methods["gate[sum]/threshold"]["params"]["gates"] == "/gates/sum"
    assert methods["gate[sum]"]["family"] == "gate"
    # ablation gate sets are gates, not patterns, in the summary
    assert not quality._is_pattern("gate[sum]/threshold") and quality._is_pattern("lsh")
    res.add_needle({"key": "4096|needle|dense|0.1", "seq_len": 4096, "label": "dense",
                    "method": "dense", "density": 1.0, "ppl_change": 0.0,
                    "needle_accuracy": 1.0, "samples": 5})
    assert "| 4096 | dense | dense | 1.000 | +0.00% | 1.00 | 5 |" in quality.needle_markdown(res)
    again = quality.Results(tmp_path / "quality.json", {})  # resumes: the rows are on disk
    assert again.needle("4096|needle|dense|0.1")["needle_accuracy"] == 1.0


def _levers_args(out, gates, *more):
    # 256 tokens are 4 blocks of 64: sink and diagonal alone keep 0.7 of the causal blocks
    return ["--out", str(out), "--model", "smollm2-135m", "--device", "cpu", "--backend",
            "gather", "--gates", str(gates), "--seq-lens", "256", "--needle-lens", "256",
            "--eval-docs", "1", "--densities", "0.7", "--patterns", "--calib-docs", "1",
            "--needle-samples", "1", "--needle-depths", "0.5", "--needle-density", "0.7", *more]


@pytest.mark.slow  # about 3 CPU-minutes: SmolLM2 at 256 tokens, ~40 forwards, 6 needle runs
def test_levers_through_main_budgets_tail_and_needle_diagnosis(smollm2, tmp_path, capsys):
    """quality.main with --budgets (calibrated on the test split, rows in the table), a tail
    lever (a table row and a needle row) and --needle-diagnose; a second run resumes."""
    from adaptive_sparse.gates import GateConfig, GateSet, save_gates

    model = smollm2[0]
    gates = save_gates(GateSet(GateConfig.from_model(model, block_size=64)), tmp_path / "g",
                       model=model)
    args = _levers_args(tmp_path / "q", gates, "--budgets", "gate/threshold", "oracle/density",
                        "--tail-blocks", "1", "--tail-scale", "4", "16", "--needle-diagnose")
    assert quality.main(args) == 0
    data = json.loads((tmp_path / "q" / "quality.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"gate", "oracle", "gate/threshold+budgets", "oracle/density+budgets",
                         "gate/threshold+tail1x4"}
    for m in ("gate/threshold+budgets", "oracle/density+budgets"):
        pol = rows[m]["params"]["policy"]
        assert len(pol["head_budgets"]) == 30 and len(pol["head_budgets"][0]) == 9
        assert len(rows[m]["calibration"]["per_layer_density"]) == 30
        assert 0 < rows[m]["density"] <= 1 and math.isfinite(rows[m]["ppl_change"])
    assert rows["oracle/density+budgets"]["params"]["target"] == "sum"
    assert rows["gate/threshold+tail1x4"]["params"]["policy"]["tail_scale"] == 4.0
    assert data["meta"]["budgets"]["calib_split"] == "test"
    assert data["meta"]["lever"] == {"tail_blocks": 1, "tail_scale": 4.0}
    needle = {r["label"]: r for r in data["needle"]}
    assert {"dense", "best gate", "best oracle", "best gate + tail1x4",
            "best gate + tail1x16", "best gate, dense decode",
            "best gate, dense prefill"} <= set(needle)
    # the best budget gate runs unless it is the best gate already
    assert ("best budget gate" in needle) != (needle["best gate"]["method"]
                                              == "gate/threshold+budgets")
    assert needle["best gate, dense decode"]["decode_density"] == 1.0
    assert needle["best gate, dense prefill"]["prefill_density"] == 1.0
    plain, tail = needle["best gate"], needle["best gate + tail1x4"]
    assert plain["decode_density"] < 1.0 and tail["decode_density"] >= plain["decode_density"]
    assert needle["best gate + tail1x16"]["decode_density"] >= tail["decode_density"]
    assert tail["params"]["policy"]["tail_blocks"] == 1
    md = (tmp_path / "q" / "quality.md").read_text()
    assert "gate/threshold+budgets" in md and "| best gate, dense decode |" in md

    capsys.readouterr()
    assert quality.main(args) == 0  # resumes: nothing is calibrated or measured again
    log = capsys.readouterr().out
    assert "budget curves" not in log and "calibrated" not in log and "[256]" not in log


def test_bad_lever_flags_exit_2(tmp_path, capsys):
    for flags, name in ((["--tail-scale", "2"], "--tail-scale"),
                        (["--tail-blocks", "-1"], "--tail-blocks"),
                        (["--min-blocks", "-2"], "--min-blocks"),
                        (["--calib-docs", "0"], "--calib-docs")):
        with pytest.raises(SystemExit) as e:
            quality.main(["--out", str(tmp_path), *flags])
        assert e.value.code == 2
        assert f"error: {name}: expected" in capsys.readouterr().err


@pytest.mark.slow  # 9 min on 2 shared cores: SmolLM2 at 256 tokens, calibration, 6 needles
def test_decode_gates_serve_the_decoding_steps_of_needle_rows(smollm2, tmp_path, capsys):
    """quality.main --decode-gates: rows with the best gate's prefill and the decode gates in
    every decoding step, at a token budget of the best gate's needle prefill density times 1 and
    each --tail-scale; the decode density stays within the budget; a second run resumes."""
    import torch

    from adaptive_sparse.data import make_needle_samples
    from adaptive_sparse.gates import GateConfig, GateSet, save_gates
    from adaptive_sparse.gates.decode import save_decode_gates, train_decode_gates

    model, tok = smollm2
    gates = save_gates(GateSet(GateConfig.from_model(model, block_size=64)), tmp_path / "g",
                       model=model)
    seqs = torch.randint(0, tok.vocab_size, (2, 160), generator=torch.Generator().manual_seed(0))
    dgates, hist = train_decode_gates(model, seqs, steps=2, queries=4, block_size=64)
    assert len(hist) == 2
    save_decode_gates(dgates, tmp_path / "decode_gates.safetensors")
    bad = _levers_args(tmp_path / "bad", gates, "--decode-gates", str(gates))  # prefill gates
    with pytest.raises(SystemExit) as e:
        quality.main(bad)
    assert e.value.code == 2 and "error: --decode-gates: expected" in capsys.readouterr().err

    args = _levers_args(tmp_path / "q", gates, "--patterns", "gate/threshold",
                        "--tail-blocks", "1", "--tail-scale", "2",
                        "--decode-gates", str(tmp_path / "decode_gates.safetensors"))
    assert quality.main(args) == 0
    data = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert data["meta"]["decode_gates"] == str(tmp_path / "decode_gates.safetensors")
    needle = {r["label"]: r for r in data["needle"]}
    assert {"dense", "best gate", "best gate + tail1x2", "best gate + decode gates x1",
            "best gate + decode gates x2"} <= set(needle)
    plain = needle["best gate"]
    prompt = min(len(s.input_ids) for s in make_needle_samples(tok, length=256, depths=[0.5],
                                                               samples_per_depth=1))
    for scale in (1, 2):
        row = needle[f"best gate + decode gates x{scale}"]
        assert row["method"] == plain["method"] and row["params"] == plain["params"]
        assert row["prefill_density"] == pytest.approx(plain["prefill_density"])  # same masks
        assert row["decode_budget_density"] == pytest.approx(scale * plain["prefill_density"])
        assert row["decode_budget_tokens"] == min(256, round(scale * plain["prefill_density"]
                                                              * 256))
        assert row["decode_policy"]["kind"] == "top_k"
        # top-k of ceil(tokens / 64) cache blocks (sink and newest forced) per KV head
        blocks = max(2, math.ceil(row["decode_budget_tokens"] / 64))
        assert 0 < row["decode_density"] <= min(1.0, blocks / math.ceil(prompt / 64)) + 1e-9
        assert 0.0 <= row["needle_accuracy"] <= 1.0
    assert needle["best gate + decode gates x2"]["decode_density"] >= \
        needle["best gate + decode gates x1"]["decode_density"]
    assert "| best gate + decode gates x1 |" in (tmp_path / "q" / "quality.md").read_text()

    capsys.readouterr()
    assert quality.main(args) == 0  # resumes: no needle run again
    assert "[256]" not in capsys.readouterr().out


def test_bad_decode_gates_flag_exits_2(tmp_path, capsys):
    for flags in (["--decode-gates", str(tmp_path / "missing"), "--needle-lens", "256"],
                  ["--decode-gates", str(tmp_path)]):  # exists, but no needle runs to serve
        with pytest.raises(SystemExit) as e:
            quality.main(["--out", str(tmp_path / "q"), *flags])
        assert e.value.code == 2
        assert "error: --decode-gates: expected" in capsys.readouterr().err


def test_phase_density_counts_prefill_and_decode_apart():
    import torch

    from adaptive_sparse.models import PatternProvider

    inner = PatternProvider("sliding_window", block_size=16, window=16, sink_blocks=1)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 128, 8, generator=g), torch.randn(1, 1, 128, 8, generator=g)
    want = inner(0, q, k).density()
    for dense in (None, "decode", "prefill"):
        ph = quality.PhaseDensity(inner, dense=dense)
        prefill = ph(0, q, k)
        step = ph(0, q[:, :, -1:], torch.randn(1, 1, 129, 8, generator=g))  # 9 cache blocks
        assert (prefill is None) == (dense == "prefill") and (step is None) == (dense == "decode")
        got = ph.densities()
        assert got["prefill_density"] == pytest.approx(1.0 if dense == "prefill" else want)
        # one decoding row: the sink, the window's block and the diagonal of 9 blocks
        assert got["decode_density"] == pytest.approx(1.0 if dense == "decode" else 3 / 9)
    with pytest.raises(ValueError, match="^dense: expected"):
        quality.PhaseDensity(inner, dense="both")


def test_equal_ppl_reaches_levels_with_bounds(tmp_path):
    res = _results(tmp_path, [
        _row("gate/threshold", 0.05, 0.05, 0.06), _row("gate/threshold", 0.1, 0.10, 0.02),
        _row("gate/threshold", 0.2, 0.20, 0.004),
        _row("oracle/threshold", 0.05, 0.05, 0.02), _row("oracle/threshold", 0.1, 0.10, -0.003),
        _row("hierarchical", 0.1, 0.10, 0.08), _row("hierarchical", 0.2, 0.20, 0.02),
        _row("hierarchical", 0.3, 0.30, 0.005),
    ])
    one, three = quality.equal_ppl(res, 8192)
    # +1%: gate between (0.10, 2%) and (0.20, 0.4%), log-linear
    t = (math.log(0.01) - math.log(0.02)) / (math.log(0.004) - math.log(0.02))
    assert one["gate"]["density"] == pytest.approx(0.10 + t * 0.10)
    # the oracle crosses +1% between +2% (0.05) and -0.3% (0.10): linear (a sign change)
    assert one["oracle"]["density"] == pytest.approx(0.05 + (0.01 - 0.02) / (-0.023) * 0.05)
    assert one["oracle"]["bound"] is False and one["gate_over_oracle_bound"] == ""
    # +3%: the oracle's sparsest point (+2% at 0.05) is already below: a lower-bound ratio
    assert three["oracle"] == {"density": 0.05, "bound": True, "method": "oracle/threshold"}
    assert three["gate_over_oracle_bound"] == ">="
    assert three["pattern"]["method"] == "hierarchical" and three["gate_over_pattern"] < 1
    md = quality.markdown(res, [8192])
    assert "| +3% |" in md and ">= " in md
