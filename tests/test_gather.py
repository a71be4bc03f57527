"""The block-gather CPU fast path equals the reference (and an fp64 oracle)."""

import math

import pytest
import torch

from adaptive_sparse import BlockSparseMask, block_sparse_attention
from adaptive_sparse.masks import block_causal


def _oracle(q, k, v, dense, bs):
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kd = k.double().repeat_interleave(G, 1)
    vd = v.double().repeat_interleave(G, 1)
    dm = dense.expand(B, -1, -1, -1)
    dm = dm.repeat_interleave(Hq // dm.shape[1], 1)
    el = dm.repeat_interleave(bs, 2)[:, :, :N].repeat_interleave(bs, 3)[..., :M]
    el = el & (torch.arange(M)[None, :] <= torch.arange(N)[:, None] + (M - N))
    s = (q.double() @ kd.transpose(-1, -2)) / math.sqrt(D)
    s = s.masked_fill(~el, -math.inf)
    return (torch.softmax(s, -1).nan_to_num(0.0) @ vd), torch.logsumexp(s, -1)


@pytest.mark.parametrize("B,Hq,Hkv,N,M,bs,Hm,Bm", [
    (2, 6, 2, 100, 150, 32, 2, 2),   # per-KV-group mask, q_len < kv_len
    (2, 6, 2, 100, 150, 32, 6, 1),   # per-query-head mask, batch broadcast
    (1, 8, 2, 300, 301, 32, 1, 1),   # head broadcast, GQA 4:1, odd lengths
    (2, 4, 4, 200, 200, 16, 4, 2),   # MHA
    (1, 3, 1, 40, 40, 64, 1, 1),     # shorter than one block
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gather_matches_reference_and_oracle(B, Hq, Hkv, N, M, bs, Hm, Bm, dtype):
    g = torch.Generator().manual_seed(N * 7 + Hm)
    q = torch.randn(B, Hq, N, 16, generator=g).to(dtype)
    k = torch.randn(B, Hkv, M, 16, generator=g).to(dtype)
    v = torch.randn(B, Hkv, M, 16, generator=g).to(dtype)
    allowed = block_causal(N, M, bs)
    dense = (torch.rand(Bm, Hm, *allowed.shape, generator=g) < 0.5) & allowed
    empty_row = allowed.shape[0] > 1
    if empty_row:
        dense[0, 0, 0] = False  # an empty row
    mask = BlockSparseMask.from_dense(dense, block_size=bs, q_len=N, kv_len=M)
    out, lse = block_sparse_attention(q, k, v, mask, backend="gather", return_lse=True)
    ref, ref_lse = block_sparse_attention(q, k, v, mask, backend="reference", return_lse=True)
    oracle, oracle_lse = _oracle(q, k, v, dense, bs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(torch.isinf(lse), torch.isinf(oracle_lse))
    if empty_row:
        assert (out[0, 0, :bs] == 0).all() and torch.isinf(lse[0, 0, :bs]).all()
    err = (out.double() - oracle).abs().max()
    ref_err = (ref.double() - oracle).abs().max()
    tol = 1e-5 if dtype == torch.float32 else 0.0
    assert err <= ref_err * 1.01 + tol + (1e-6 if dtype == torch.float32 else 0)
    fin = torch.isfinite(oracle_lse)
    assert ((lse.double() - oracle_lse)[fin].abs() < 1e-4).all()


def test_gather_work_scales_with_density():
    n = 1024
    q, k, v = (torch.randn(1, h, n, 32) for h in (4, 2, 2))
    full = BlockSparseMask.full(1, 1, block_size=64, q_len=n, kv_len=n)
    from adaptive_sparse.patterns import make_pattern
    win = make_pattern("sliding_window", q_len=n, kv_len=n, num_heads=1, block_size=64, window=128)
    a = block_sparse_attention(q, k, v, win, backend="gather")
    b = block_sparse_attention(q, k, v, win, backend="reference")
    assert torch.allclose(a, b, atol=1e-5)
    assert win.density() < 0.5 * full.density()
