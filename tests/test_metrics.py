"""Metrics against hand computations (fp64) on fresh random inputs."""

from __future__ import annotations

import math

import pytest
import torch

from adaptive_sparse.attention.block_maps import attention_recall, block_attention_maps
from adaptive_sparse.masks import BlockSparseMask, block_causal
from adaptive_sparse.metrics import AttentionRecall, Density, NeedleAccuracy, Perplexity


def test_perplexity_from_summed_nll():
    g = torch.Generator().manual_seed(1)
    nll = torch.rand(5, generator=g, dtype=torch.float64) * 100 + 1
    counts = torch.randint(10, 60, (5,), generator=g)
    m = Perplexity()
    for a, n in zip(nll, counts):
        m.update(a, int(n))
    want = math.exp(float(nll.sum()) / float(counts.sum()))
    assert float(m.compute()) == pytest.approx(want, rel=1e-12)
    # token-weighted, not a mean of per-sequence perplexities
    assert float(m.compute()) != pytest.approx(
        sum(math.exp(float(a) / int(n)) for a, n in zip(nll, counts)) / 5, rel=1e-6)


def test_perplexity_errors():
    with pytest.raises(ValueError, match="no tokens"):
        Perplexity().compute()
    with pytest.raises(ValueError, match="nll_sum: expected a finite value"):
        Perplexity().update(float("nan"), 3)
    with pytest.raises(TypeError, match="count: expected a number"):
        Perplexity().update(1.0, "3")
    for bad in (float("nan"), float("inf"), -1):
        with pytest.raises(ValueError, match="^count: expected a non-negative token count"):
            Perplexity().update(1.0, bad)


def _random_mask(g, B, H, q_len, kv_len, bs):
    allowed = block_causal(q_len, kv_len, bs)
    dense = (torch.rand(B, H, *allowed.shape, generator=g) < 0.5) & allowed
    return BlockSparseMask.from_dense(dense, block_size=bs, q_len=q_len, kv_len=kv_len)


def test_attention_recall_matches_fp64_by_hand():
    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, N, D, bs = 2, 6, 2, 200, 16, 32
    q = torch.randn(B, Hq, N, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    _, bsum = block_attention_maps(q, k, block_size=bs)
    mask = _random_mask(g, B, Hkv, N, N, bs)
    m = AttentionRecall(num_heads=Hq)
    m.update(bsum, mask)
    # by hand in fp64: dense softmax, mass per kept tile, averaged over query-block rows
    s = torch.einsum("bhnd,bhmd->bhnm", q.double(), k.double().repeat_interleave(3, 1)) / 4.0
    s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, -1)
    keep = mask.to_dense().repeat_interleave(3, 1)
    keep_el = keep.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :N, :N]
    per_row = (p * keep_el).sum(-1)  # [B, Hq, N]
    qb = math.ceil(N / bs)
    rows = torch.stack([per_row[:, :, i * bs:(i + 1) * bs].mean(-1) for i in range(qb)], -1)
    assert float(m.compute()) == pytest.approx(float(rows.mean()), abs=1e-5)
    assert torch.allclose(m.compute_per_head(), rows.mean((0, 2)), atol=1e-5)
    assert torch.allclose(m.compute_per_head().float(), attention_recall(bsum, mask.to_dense()),
                          atol=1e-5)
    full = BlockSparseMask.full(1, 1, block_size=bs, q_len=N, kv_len=N)
    m2 = AttentionRecall()
    m2.update(bsum, full)
    assert float(m2.compute()) == pytest.approx(1.0, abs=1e-5)


def test_attention_recall_errors():
    m = AttentionRecall()
    with pytest.raises(ValueError, match="block_sum: expected a float tensor"):
        m.update(torch.rand(3, 3), torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_sum: expected a float tensor"):
        m.update(torch.ones(1, 1, 3, 3, dtype=torch.int64),
                 torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask: expected tiles"):
        m.update(torch.rand(1, 2, 3, 3), torch.ones(1, 1, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask: expected batch 1 or 1 and heads dividing 2"):
        m.update(torch.rand(1, 2, 3, 3), torch.ones(1, 3, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="nothing was recorded"):
        m.compute()


def test_density_counts_causal_region_over_updates():
    g = torch.Generator().manual_seed(3)
    m = Density()
    sel = tot = 0
    for n in (130, 257):
        mask = _random_mask(g, 1, 3, n, n, 64)
        m.update(mask)
        dense = mask.to_dense()
        sel += int(dense.sum())
        tot += int(block_causal(n, n, 64).sum()) * 3
    assert float(m.compute()) == pytest.approx(sel / tot, rel=1e-12)
    with pytest.raises(TypeError, match="mask: expected a BlockSparseMask"):
        m.update(torch.ones(1, 1, 2, 2, dtype=torch.bool))


def test_needle_accuracy_metric():
    m = NeedleAccuracy()
    m.update(["The number is 1234567.", "7654321"], ["1234567", "1111111"])
    m.update(["nothing"], ["2222222"])
    assert float(m.compute()) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="answers: expected 2 answers"):
        m.update(["1"], ["1", "2"])
    with pytest.raises(TypeError, match="expected lists of strings"):
        m.update("1234567", ["1234567"])
