"""Training-free decode selection from the keys' per-block min / max (Quest): the bound against
an fp64 q . k, the incremental bounds cache, a planted needle, generation through
DecodeProvider(decode="bounds") and the benchmark entry points' bounds rows."""

from __future__ import annotations

import json
import math

import pytest
import torch
from marks import INTERPRET  # tests/ is on sys.path

from adaptive_sparse.gates.decode import (
    DecodeBoundsCache,
    DecodeProvider,
    block_key_bounds,
    bounds_scores,
    select_decode_blocks,
)
from adaptive_sparse.policies import Policy

pytestmark = pytest.mark.skipif(INTERPRET, reason="no Triton kernel: runs in the other pass")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _group_logits(q, k, bs, scale):
    """fp64 scale * q . k per query head and key, reduced to the max over each block's real
    keys: [B, Hkv, G, N, Kb]."""
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    s = torch.einsum("bhgnd,bhmd->bhgnm", q.double().view(B, Hkv, Hq // Hkv, N, D),
                     k.double()) * scale
    kb = -(-M // bs)
    s = torch.nn.functional.pad(s, (0, kb * bs - M), value=float("-inf"))
    return s.view(B, Hkv, Hq // Hkv, N, kb, bs).amax(-1)


@pytest.mark.parametrize("M,bs", [(100, 16), (64, 16), (37, 32)])
def test_block_key_bounds_equal_brute_force(M, bs):
    k = torch.randn(2, 3, M, 8, generator=_gen(M)).to(torch.bfloat16)
    kmin, kmax = block_key_bounds(k, bs)
    kb = -(-M // bs)
    assert kmin.shape == kmax.shape == (2, 3, kb, 8) and kmin.dtype == torch.bfloat16
    for j in range(kb):
        part = k[:, :, j * bs:min(M, (j + 1) * bs)]  # the partial last block: its tokens only
        assert torch.equal(kmin[:, :, j], part.amin(2)) and torch.equal(kmax[:, :, j],
                                                                        part.amax(2))
    with pytest.raises(ValueError, match="^block_size: expected"):
        block_key_bounds(k, 24)
    with pytest.raises(ValueError, match="^k: expected"):
        block_key_bounds(k[0], bs)


def test_scores_bound_every_heads_logits_and_are_tight_on_one_token_blocks():
    B, Hq, Hkv, N, M, D, bs = 2, 6, 2, 3, 113, 16, 16  # last block: 1 token
    q = torch.randn(B, Hq, N, D, generator=_gen(1)) * 2
    k = torch.randn(B, Hkv, M, D, generator=_gen(2)) * 2
    scale = 0.3
    want = _group_logits(q, k, bs, scale)  # [B, Hkv, G, N, Kb]
    kmin, kmax = block_key_bounds(k, bs)
    # every head before combining: the group max of a one-head-per-group view is that head's u
    for g in range(Hq // Hkv):
        u = bounds_scores(q.view(B, Hkv, Hq // Hkv, N, D)[:, :, g], kmin, kmax, scale=scale)
        assert u.dtype == torch.float32 and u.shape == (B, Hkv, N, 8)
        assert (u.double() >= want[:, :, g] - 1e-4).all()
        assert not torch.allclose(u[..., :-1].double(), want[:, :, g, ..., :-1], atol=1e-2)
        torch.testing.assert_close(u[..., -1].double(), want[:, :, g, ..., -1], atol=1e-4,
                                   rtol=1e-5)
    # combine="max" is the group max; "mean_prob" the group mean of the row softmax
    heads = torch.stack([bounds_scores(q.view(B, Hkv, Hq // Hkv, N, D)[:, :, g], kmin, kmax,
                                       scale=scale) for g in range(Hq // Hkv)], 2)
    torch.testing.assert_close(bounds_scores(q, kmin, kmax, scale=scale), heads.amax(2))
    probs = bounds_scores(q, kmin, kmax, scale=scale, combine="mean_prob")
    torch.testing.assert_close(probs, heads.softmax(-1).mean(2))
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, Hkv, N))
    # the default scale is D ** -0.5; the elementwise definition itself, in fp64
    direct = torch.maximum(q.double().view(B, Hkv, 3, N, 1, D) * kmax.double()[:, :, None, None],
                           q.double().view(B, Hkv, 3, N, 1, D) * kmin.double()[:, :, None, None]
                           ).sum(-1).amax(2) * D ** -0.5
    torch.testing.assert_close(bounds_scores(q, kmin, kmax).double(), direct, atol=1e-4,
                               rtol=1e-5)


def test_bounds_scores_refuse_bad_arguments():
    q, k = torch.randn(1, 4, 1, 8, generator=_gen(3)), torch.randn(1, 2, 40, 8, generator=_gen(4))
    kmin, kmax = block_key_bounds(k, 16)
    for kwargs, name in ((dict(combine="sum"), "combine"), (dict(scale=-1.0), "scale")):
        with pytest.raises(ValueError, match=f"^{name}: expected"):
            bounds_scores(q, kmin, kmax, **kwargs)
    with pytest.raises(ValueError, match="^kmin: expected"):
        bounds_scores(q, kmin[..., :4], kmax)
    with pytest.raises(ValueError, match="^kmax: expected"):
        bounds_scores(q, kmin, kmax[:, :, :2])
    with pytest.raises(ValueError, match="^kmin: expected"):
        bounds_scores(torch.randn(1, 3, 1, 8), kmin, kmax)  # 3 heads over 2 KV heads
    with pytest.raises(ValueError, match="^bounds_combine: expected"):
        DecodeProvider(Policy(kind="top_k", k=2), decode="bounds", bounds_combine="min")


def test_bounds_cache_is_incremental_and_equals_a_recompute():
    cache = DecodeBoundsCache(16)
    k = torch.randn(2, 2, 150, 8, generator=_gen(5))
    computed = []
    real = cache._features
    cache._features = lambda part: computed.append(part.shape[2]) or real(part)
    for M in [37] + list(range(38, 151)):  # a prompt, then one token per step over 7 blocks
        kmin, kmax = cache.update(k[:, :, :M])
        want = block_key_bounds(k[:, :, :M], 16)
        assert torch.equal(kmin, want[0]) and torch.equal(kmax, want[1]), M
    assert cache.recomputes == 1 and cache.buf.shape[2] == 16
    assert max(computed[1:]) <= 16  # per token: the block that filled or the partial one
    cache.update(k[:, :, :20])  # a new, shorter prompt: recomputed from the given cache
    assert cache.recomputes == 2


@pytest.mark.parametrize("combine", ["max", "mean_prob"])
def test_a_planted_needle_block_is_selected(combine):
    B, Hq, Hkv, D, bs, M = 1, 4, 2, 32, 16, 16 * 12 + 5
    g = _gen(6)
    q = torch.randn(B, Hq, 1, D, generator=g)
    k = torch.randn(B, Hkv, M, D, generator=g)
    needle = 6
    direction = q.view(B, Hkv, 2, D).mean(2)  # the group's shared direction
    k[:, :, needle * bs + 3] += 4 * direction / direction.norm(dim=-1, keepdim=True) * D ** 0.5
    kmin, kmax = block_key_bounds(k, bs)
    scores = bounds_scores(q, kmin, kmax, combine=combine)[:, :, 0]  # [B, Hkv, Kb]
    for k_blocks in (3, 4):  # the sink and the diagonal forced, 1-2 blocks chosen
        mask = select_decode_blocks(scores, Policy(kind="top_k", k=k_blocks), kv_len=M,
                                    block_size=bs, scores_are_probs=combine == "mean_prob")
        kept = mask.to_dense()[0, :, 0]  # [Hkv, Kb]
        assert kept[:, needle].all() and kept[:, 0].all() and kept[:, -1].all()
        assert int(kept.sum(-1).max()) == k_blocks
    # a random block (no planted key) is not chosen with one free slot
    kept = select_decode_blocks(scores, Policy(kind="top_k", k=3), kv_len=M, block_size=bs,
                                scores_are_probs=combine == "mean_prob").to_dense()[0, :, 0]
    assert not kept[:, 1:needle].any() and not kept[:, needle + 1:-1].any()


def _tiny_model(kind, seed):
    if kind == "llama":
        from test_training import tiny_llama

        return tiny_llama(seed=seed)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                      max_position_embeddings=4096)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind,combine", [("llama", "max"), ("qwen2", "mean_prob")])
def test_generation_with_bounds_full_budget_is_dense_and_small_budget_sparse(kind, combine):
    from adaptive_sparse.gates.decode import model_step
    from adaptive_sparse.models.attention import sparse_attention
    from adaptive_sparse.models.generate import compare_generation

    model = _tiny_model(kind, seed=7)
    ids = torch.randint(0, 128, (2, 70), generator=_gen(8))

    def provider(k):
        return DecodeProvider(Policy(kind="top_k", k=k), decode="bounds", block_size=16,
                              num_layers=2, bounds_combine=combine)

    full = provider(64)
    res = compare_generation(model, ids, full, max_new_tokens=6, block_size=16, warmup=0)
    assert res["agreement"] == 1.0 and res["decode_density"] == 1.0
    assert all(c.recomputes == 1 for c in full.caches.values()) and len(full.caches) == 2
    small = provider(2)
    res = compare_generation(model, ids, small, max_new_tokens=6, block_size=16, warmup=0)
    assert 0.3 < res["decode_density"] < 0.5  # 2 of 5-6 blocks
    step = provider(2)
    with torch.no_grad(), sparse_attention(model, step, block_size=16):
        logits = model_step(model, ids[:, -1:], model_step(model, ids[:, :-1])[1])[0]
    assert torch.isfinite(logits).all() and step.decode_density() == pytest.approx(2 / 5)
    # a threshold policy on the bounds goes through Policy.to_mask
    thr = DecodeProvider(Policy(kind="threshold", tau=0.05), decode="bounds", block_size=16,
                         bounds_combine=combine)
    res = compare_generation(model, ids, thr, max_new_tokens=3, block_size=16, warmup=0)
    assert 0 < res["decode_density"] <= 1


@pytest.mark.slow  # SmolLM2 on CPU at 320 tokens, no training: ~30 s once the model is loaded
def test_decode_quality_measures_bounds_without_training_gates(smollm2, tmp_path, capsys):
    from benchmarks import decode_quality

    out = tmp_path / "dq"
    argv = ["--device", "cpu", "--contexts", "320", "--corpora", "essays", "--densities",
            "0.25", "--tf-tokens", "4", "--eval-seqs", "1", "--needle-per-depth", "1",
            "--tasks", "tf", "needle", "--sources", "bounds", "bounds_mean+local1", "--out",
            str(out)]
    assert decode_quality.main(argv) == 0
    log = capsys.readouterr().out
    assert "decode gates" not in log and not (out / "decode_gates").exists()
    data = json.loads((out / "decode_quality.json").read_text())
    rows = {r["key"]: r for r in data["rows"]}
    tf, needle = rows["tf|essays|320|bounds|0.25"], rows["needle|essays|320|bounds|0.25"]
    assert math.isfinite(tf["perplexity"]) and math.isfinite(tf["ppl_change"])
    assert tf["density"] == 2 / 5 and 0 <= needle["needle_accuracy"] <= 1
    # the block before the newest forced too: 3 of the 5 blocks, over the 2-block budget
    local = rows["tf|essays|320|bounds_mean+local1|0.25"]
    assert local["density"] == 3 / 5 and math.isfinite(local["ppl_change"])
    assert data["meta"].get("training") is None
    assert "| essays | 320 | bounds@0.25 | 0.400 |" in (out / "decode_quality.md").read_text()


@pytest.mark.slow  # SmolLM2 on CPU at 256 tokens: 2 table rows, 3 needle runs, ~30 s
def test_quality_bounds_decode_needle_rows(smollm2, tmp_path):
    from adaptive_sparse.gates import GateConfig, GateSet, save_gates
    from benchmarks import quality

    model = smollm2[0]
    gates = save_gates(GateSet(GateConfig.from_model(model, block_size=64)), tmp_path / "g",
                       model=model)
    args = ["--out", str(tmp_path / "q"), "--model", "smollm2-135m", "--device", "cpu",
            "--backend", "gather", "--gates", str(gates), "--seq-lens", "256", "--needle-lens",
            "256", "--eval-docs", "1", "--densities", "0.9", "--patterns", "--needle-samples",
            "1", "--needle-depths", "0.5", "--needle-density", "0.9", "--decode-bounds",
            "--bounds-combine", "mean_prob"]
    assert quality.main(args) == 0
    data = json.loads((tmp_path / "q" / "quality.json").read_text())
    needle = {r["label"]: r for r in data["needle"]}
    row, plain = needle["best gate + bounds decode x1"], needle["best gate"]
    assert row["decode_select"] == "bounds" and row["bounds_combine"] == "mean_prob"
    assert row["prefill_density"] == pytest.approx(plain["prefill_density"])
    assert row["decode_policy"]["kind"] == "top_k" and 0 < row["decode_density"] <= 1
    assert 0.0 <= row["needle_accuracy"] <= 1.0
    assert data["meta"]["decode_bounds"] == "mean_prob"


def test_bad_bounds_flags_exit_2(tmp_path, capsys):
    from benchmarks import decode_quality, quality

    for flags in (["--decode-bounds", "--bounds-combine", "sum", "--needle-lens", "256"],
                  ["--decode-bounds"]):  # no needle runs to serve
        with pytest.raises(SystemExit) as e:
            quality.main(["--out", str(tmp_path / "q"), *flags])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--bounds-combine: invalid choice" in err and "error: --decode-bounds: expected" in err
    for spec in ("quest", "bounds+locl2", "bounds+local"):
        with pytest.raises(SystemExit) as e:
            decode_quality.main(["--sources", spec, "--out", str(tmp_path / "dq")])
        assert e.value.code == 2
    assert "--sources: expected each one of" in capsys.readouterr().err


def test_generate_options_build_a_bounds_provider():
    import argparse

    from adaptive_sparse.models.generate import add_generate_arguments, make_decode_provider

    model = _tiny_model("llama", seed=9)
    p = argparse.ArgumentParser()
    add_generate_arguments(p)
    args = p.parse_args(["--decode", "bounds", "--bounds-combine", "mean_prob", "--block-size",
                         "16", "--tokens", "40"])
    provider, policy = make_decode_provider(args, model)
    assert provider.decode == "bounds" and provider.bounds_combine == "mean_prob"
    assert provider.gates is None and policy.kind == "top_k" and policy.k == 3


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "adaptive_sparse.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_generate_command_and_decode_e2e_refuse_bad_bounds_input(tmp_path, capsys):
    from benchmarks import decode_e2e

    res = _cli("generate", "--decode", "bounds", "--bounds-combine", "sum")
    assert res.returncode == 2 and "--bounds-combine: invalid choice" in res.stderr
    res = _cli("generate", "--decode", "bounds", "--decode-gates", str(tmp_path))
    assert res.returncode == 2 and "--decode-gates: expected no decode gates" in res.stderr
    assert "Traceback" not in res.stderr
    for flags, err in ((["--decode-select", "quest"], "--decode-select: invalid choice"),
                       (["--decode-select", "bounds", "--decode-gates", str(tmp_path)],
                        "error: --decode-gates: expected no decode gates")):
        with pytest.raises(SystemExit) as e:
            decode_e2e.main(["--out", str(tmp_path / "e2e"), "--no-kernels", *flags])
        assert e.value.code == 2 and err in capsys.readouterr().err
