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


def test_split_batch_provider_stacks_each_providers_selection():
    from adaptive_sparse.gates.decode import (
        DecodeGateConfig, DecodeGateSet, DecodeProvider, SplitBatchProvider, token_budget_policy)

    torch.manual_seed(0)
    cfg = DecodeGateConfig(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                           init="random")
    gates = DecodeGateSet(cfg)
    q, k = torch.randn(6, 4, 1, 16), torch.randn(6, 2, 100, 16)  # 3 budgets x batch 2

    def providers():
        return [DecodeProvider(decode="dense", block_size=16),
                DecodeProvider(token_budget_policy(32, 16), gates=gates),
                DecodeProvider({"kind": "top_k", "k": 4}, decode="oracle", block_size=16)]

    mask = SplitBatchProvider(providers(), block_size=16)(0, q, k)
    alone = providers()
    assert mask.kv_indices.shape == (6, 2, 1, 7) and mask.kv_len == 100
    assert (mask.kv_num_blocks[:2] == 7).all()
    assert torch.equal(mask.kv_indices[:2, :, 0], torch.arange(7).expand(2, 2, 7).int())
    for i, p in ((1, alone[1]), (2, alone[2])):
        ref = p(0, q[2 * i:2 * i + 2], k[2 * i:2 * i + 2])
        got_num = mask.kv_num_blocks[2 * i:2 * i + 2]
        assert torch.equal(got_num, ref.kv_num_blocks)
        w = ref.kv_indices.shape[-1]
        assert torch.equal(mask.kv_indices[2 * i:2 * i + 2, ..., :w], ref.kv_indices)
    assert SplitBatchProvider(providers()[:1])(0, q[:2], k[:2]) is None
    with pytest.raises(ValueError, match="q: expected a batch divisible"):
        SplitBatchProvider(providers())(0, q[:5], k[:5])


def test_agreement_counts_the_dense_answer_only():
    eos = {9}
    dense = torch.tensor([[1, 2, 9, 5], [1, 2, 3, 4]])
    sparse = torch.tensor([[1, 3, 9, 7], [1, 2, 3, 0]])
    lengths = decode_quality.answer_length(dense, eos)
    assert lengths == [3, 4] and decode_quality.answer_length(sparse, eos) == [3, 4]
    got = decode_quality.agreement(dense, sparse, lengths)
    assert got == {"agreement": 5 / 7, "matching_prefix": (1 + 3) / 2}
    assert decode_quality.agreement(dense, sparse[:, :2], lengths)["agreement"] == 3 / 7
