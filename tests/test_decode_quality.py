"""benchmarks/decode_quality.py through its main(): SmolLM2 on CPU at a small context, every task,
the trained gates written as an artifact, and a restart that skips the rows already there."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adaptive_sparse.export.decode import load_decode_gate_artifact
from benchmarks import decode_quality

SMALL = ["--device", "cpu", "--contexts", "320", "--corpora", "essays", "--densities", "0.25",
         "--tf-tokens", "4", "--gen-tokens", "4", "--eval-seqs", "1", "--needle-per-depth", "1",
         "--train-steps", "2", "--train-seq-len", "192", "--train-seqs", "1"]


@pytest.mark.slow  # about 2 CPU-minutes (SmolLM2: training, 5 prefills, 88 budget-steps, twice)
def test_main_measures_every_task_and_resumes(smollm2, tmp_path, capsys):
    out = tmp_path / "dq"
    assert decode_quality.main(SMALL + ["--out", str(out)]) == 0
    data = json.loads((out / "decode_quality.json").read_text())
    rows = {r["key"]: r for r in data["rows"]}
    assert set(rows) == {f"{t}|{c}|320|{s}|{d}" for t, c in (("tf", "essays"), ("gen", "essays"),
                                                             ("needle", "essays"))
                         for s, d in (("dense", None), ("gate", 0.25))}
    dense, gate = rows["tf|essays|320|dense|None"], rows["tf|essays|320|gate|0.25"]
    assert dense["tokens"] == gate["tokens"] == 4 and dense["density"] is None
    assert math.isfinite(dense["perplexity"]) and dense["perplexity"] > 1
    assert gate["ppl_change"] == gate["perplexity"] / dense["perplexity"] - 1
    # 5 cache blocks of 64 tokens: the budget (80 tokens -> 2 blocks) is the sink + newest block
    assert gate["density"] == 2 / 5 and gate["policy"]["k"] == 2
    gen = rows["gen|essays|320|dense|None"]
    assert gen["agreement"] == 1.0 and gen["matching_prefix"] == gen["dense_lengths"][0]
    assert 1 <= gen["mean_length"] <= 4 and len(gen["token_ids"][0]) <= 4
    needle = rows["needle|essays|320|gate|0.25"]
    assert needle["samples"] == 3 and 0 <= needle["needle_accuracy"] <= 1
    assert data["meta"]["shapes"]["num_layers"] == 30 and data["meta"]["training"]["steps"] == 2
    assert load_decode_gate_artifact(out / "decode_gates", smollm2[0]).block_size == 64
    md = (out / "decode_quality.md").read_text()
    assert "| essays | 320 | gate@0.25 | 0.400 |" in md and "Needle retrieval" in md

    capsys.readouterr()
    # a restart: gates reused, present rows skipped, only the oracle's new rows measured
    assert decode_quality.main(SMALL + ["--out", str(out), "--sources", "gate", "oracle",
                                        "--tasks", "tf"]) == 0
    log = capsys.readouterr().out
    assert "decode gates reused" in log and "tf essays 320] dense" not in log
    again = {r["key"]: r for r in json.loads((out / "decode_quality.json").read_text())["rows"]}
    assert set(again) == set(rows) | {"tf|essays|320|oracle|0.25"}
    assert again["tf|essays|320|dense|None"] == dense
    assert torch.isclose(torch.tensor(again["tf|essays|320|oracle|0.25"]["ppl_change"]),
                         torch.tensor(again["tf|essays|320|oracle|0.25"]["perplexity"]
                                      / dense["perplexity"] - 1))
