"""Sweeps against measured latency: our kernel timed on a trial's own masks
(`sweeps.latency.kernel_latency`), the evaluator's latency inputs, and
`benchmarks/latency_sweep.py` end to end on CPU (front, resume, time budget, bad arguments)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch

from adaptive_sparse.masks import BlockSparseMask
from adaptive_sparse.patterns import make_pattern
from benchmarks import latency_sweep
from sweeps.evaluators import ModelEvaluator
from sweeps.frontier import load_run
from sweeps.latency import LatencyInputs, kernel_latency
from test_sweeps import _tiny_llama


def test_kernel_latency_grows_with_density_and_adds_mask_cost_of_adaptive_methods():
    n, bs = 2048, 64
    full = BlockSparseMask.full(1, 1, block_size=bs, q_len=n, kv_len=n)
    window = make_pattern("sliding_window", q_len=n, kv_len=n, num_heads=8, block_size=bs,
                          window=bs, sink_blocks=1)

    def result(mask):
        return {"latency_inputs": LatencyInputs(
            masks=[{0: mask}], q_shape=(1, 8, n, 64), kv_shape=(1, 2, n, 64),
            dtype=torch.float32, device=torch.device("cpu"), backend="auto", reps=1,
            mask_ms=7.0)}

    rounds = [(kernel_latency("sliding_window", {}, result(full)),
               kernel_latency("sliding_window", {}, result(window))) for _ in range(3)]
    sparse = rounds[0][1]
    assert 0 < sparse["latency_ms"] == sparse["attention_ms"]  # a static pattern: built once
    assert not sparse["mask_ms_included"] and sparse["mask_ms"] == 7.0
    # density 1 vs 0.18: gather's work is proportional to density. Other load on the 2 shared
    # cores only adds time, so the fastest of three alternating rounds is compared.
    times = [(round(d["attention_ms"]), round(s["attention_ms"])) for d, s in rounds]
    assert min(d for d, _ in times) > 1.2 * min(s for _, s in times), times
    assert sparse["latency_device"] == "cpu (gather, float32)"
    adaptive = kernel_latency("gate", {}, result(window))
    assert adaptive["mask_ms_included"]
    assert adaptive["latency_ms"] == pytest.approx(adaptive["attention_ms"] + 7.0)
    with pytest.raises(ValueError, match="result: expected the latency_inputs of an evaluator"):
        kernel_latency("gate", {}, {"density": 0.5, "ppl_change": 0.1})


def test_evaluator_keeps_every_sequences_masks_and_times_the_provider():
    model, seqs = _tiny_llama(seed=4)
    ev = ModelEvaluator(model_obj=model, sequences=seqs, block_size=16, backend="reference",
                        latency_reps=1)
    out = ev.evaluate("lsh", {"n_buckets": 4, "n_rounds": 1, "seed": 0})
    inputs = out["latency_inputs"]
    assert len(inputs.masks) == len(seqs) and all(sorted(m) == [0, 1] for m in inputs.masks)
    assert inputs.q_shape == (1, 4, 256, 16) and inputs.kv_shape == (1, 2, 256, 16)
    assert inputs.mask_ms > 0 and inputs.reps == 1 and inputs.dtype == torch.float32
    density = sum(m.density() for seq in inputs.masks for m in seq.values()) / (2 * len(seqs))
    assert density == pytest.approx(out["density"], abs=1e-6)
    assert "latency_inputs" not in ModelEvaluator(model_obj=model, sequences=seqs,
                                                  block_size=16).evaluate(
        "sliding_window", {"window": 32})
    with pytest.raises(ValueError, match="latency_reps: expected an int >= 0"):
        ModelEvaluator(model_obj=model, sequences=seqs, latency_reps=-1)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        ModelEvaluator(model_obj=model, sequences=seqs, dtype="int8")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, smollm2_tokenizer):
    """A 2-layer random Llama saved with SmolLM2's tokenizer (a model folder load_model reads)
    and a random gate set for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adaptive_sparse.gates import GateConfig, GateSet, save_gates

    root = tmp_path_factory.mktemp("latency")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "model")
    smollm2_tokenizer.save_pretrained(root / "model")
    gates = save_gates(GateSet(GateConfig.from_model(model, block_size=32)), root / "gates")
    return root, ["--model", str(root / "model"), "--seq-len", "256", "--block-size", "32",
                  "--gates", str(gates), "--reps", "1", "--device", "cpu",
                  "--methods", "sliding_window", "lsh", "gate/threshold"]


def test_latency_sweep_writes_front_and_resumes(tiny_run, capsys):
    root, base = tiny_run
    out = root / "run"
    assert latency_sweep.main([*base, "--out", str(out), "--trials", "3"]) == 0
    data = json.loads((out / "latency_front.json").read_text())
    report = json.loads((out / "frontier.json").read_text())
    assert report["cost"] == "latency_ms" and report["objectives"] == ["latency_ms", "ppl_change"]
    assert (out / "frontier.png").stat().st_size > 0
    assert data["timed_on"] == "cpu (gather, float32)" and data["stopped"] is None
    assert {"sdpa_math", "ours_dense"} <= set(data["dense_ms"])
    assert data["shapes"] == {"batch": 1, "heads": 4, "kv_heads": 2, "seq_len": 256,
                              "head_dim": 16, "layers": 2, "dtype": "float32", "block_size": 32}
    assert set(data["fronts"]) == {"overall", "sliding_window", "lsh", "gate/threshold"}
    for row in data["fronts"]["overall"]:
        assert row["latency_ms"] > 0 and row["attention_ms"] > 0 and row["mask_ms"] >= 0
    md = (out / "latency_front.md").read_text()
    assert "## Pareto front: overall" in md and "![latency / perplexity front]" in md
    assert (out / "latency_front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["budgets"] == [0.01, 0.03, 0.05] and {"method", "latency_ms", "ppl_change",
                                                       "front_method"} <= set(data["trials"][0])
    assert "every trial faint" in md  # the run keeps every trial for --render
    assert latency_sweep.main(["--render", str(out / "latency_front.json")]) == 0
    assert (out / "latency_front.md").read_text() == md  # redrawn without a model: same table

    def finished():
        trials = load_run(out)[1].get_trials(deepcopy=False)
        return {t.number: (t.state, t.datetime_complete, t.values) for t in trials}

    first = finished()
    assert [s for s, _, _ in first.values()] == [optuna.trial.TrialState.COMPLETE] * 3
    assert latency_sweep.main([*base, "--out", str(out), "--trials", "4"]) == 0
    second = finished()
    assert len(second) == 4 and all(second[t] == first[t] for t in first)  # none redone
    capsys.readouterr()
    assert latency_sweep.main([*base, "--out", str(out), "--trials", "9",
                               "--time-budget", "1"]) == 0
    assert finished() == second  # no time for a trial: stops before one, reports what is done
    assert "time budget" in json.loads((out / "latency_front.json").read_text())["stopped"]


@pytest.mark.parametrize("extra, name", [
    (["--trials", "0"], "--trials"),
    (["--methods", "nope"], "--methods"),
    (["--gates", "/nonexistent/gates"], "--gates"),
    (["--block-size", "48"], "--block-size"),
    (["--time-budget", "-1"], "--time-budget"),
    (["--device", "tpu"], "--device"),
    (["--model", "/nonexistent/model"], "--model"),
])
def test_latency_sweep_bad_arguments_exit_2(tiny_run, tmp_path, capsys, extra, name):
    _, base = tiny_run
    assert latency_sweep.main([*base, "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert f"error: {name}" in err, err
    assert not (tmp_path / "o").exists()


def test_latency_sweep_gate_methods_need_gates(tmp_path, capsys):
    assert latency_sweep.main(["--model", "smollm2-135m", "--seq-len", "256", "--out",
                               str(tmp_path / "o"), "--methods", "gate/top_p",
                               "--device", "cpu"]) == 2
    assert "error: --gates: expected a trained gate folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        latency_sweep.main(["--seq-len", "abc"])
    assert e.value.code == 2


COMMITTED = (Path(__file__).resolve().parents[1] / "benchmarks" / "results"
             / "latency_front_qwen25_32k_h200.json")


def test_render_redraws_a_committed_front_with_its_dense_baselines(tmp_path, monkeypatch, capsys):
    from adaptive_sparse import plots

    src = tmp_path / "front.json"
    src.write_text(COMMITTED.read_text())
    calls, real = [], plots.plot_frontier

    def recording(rows, out, **kw):  # the real plot, its arguments kept
        calls.append((rows, kw))
        return real(rows, out, **kw)

    monkeypatch.setattr(plots, "plot_frontier", recording)
    assert latency_sweep.main(["--render", str(src)]) == 0
    assert f"wrote {tmp_path / 'front.png'}" in capsys.readouterr().out
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(src.read_text())
    (rows, kw), = calls
    assert kw["cost"] == "latency_ms" and list(kw["budgets"]) == [0.01, 0.03, 0.05]
    assert kw["baselines"] == {latency_sweep.BASELINE_NAMES[k]: v
                               for k, v in data["dense_ms"].items()}
    assert "SDPA cuDNN" in kw["baselines"] and "ours, full mask" in kw["baselines"]
    # this JSON holds the fronts only: every front row is drawn, and the picture says so
    assert len(rows) == sum(len(v) for k, v in data["fronts"].items() if k != "overall")
    assert all(r["front_method"] for r in rows) and kw["note"] == latency_sweep.FRONTS_ONLY
    md = (tmp_path / "front.md").read_text()
    assert "![latency / perplexity front](front.png)" in md and latency_sweep.FRONTS_ONLY in md
    # the committed table is this JSON's, redrawn
    assert md.replace("front.png", COMMITTED.with_suffix(".png").name) == \
        COMMITTED.with_suffix(".md").read_text()


@pytest.mark.parametrize("text, why", [
    (None, "FileNotFoundError"),
    ("{not json", "JSONDecodeError"),
    ("[1, 2]", "a list, not an object"),
    ('{"model": "m"}', "no environment"),
])
def test_render_of_a_bad_json_exits_2_naming_the_argument(tmp_path, capsys, text, why):
    path = tmp_path / "front.json"
    if text is not None:
        path.write_text(text)
    assert latency_sweep.main(["--render", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error: --render: expected a latency_front.json" in err and why in err, err
    assert not path.with_suffix(".png").exists() and not path.with_suffix(".md").exists()
