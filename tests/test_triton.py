"""Triton kernels against fp64 oracles: CPU interpreter (fp32/fp16, small shapes) and GPU."""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

triton = pytest.importorskip("triton")

from adaptive_sparse.attention.block_maps import block_attention_maps  # noqa: E402
from adaptive_sparse.attention.reference import reference_attention  # noqa: E402
from adaptive_sparse.masks import BlockSparseMask, block_causal, diagonal_blocks  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    CUDA or not INTERPRET, reason="CPU interpreter tests: run with TRITON_INTERPRET=1, no CUDA")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def _kernels():
    import adaptive_sparse.attention.triton as kt
    return kt


def _device():
    return "cuda" if CUDA else "cpu"


def random_mask(batch, heads, q_len, kv_len, bs, density, *, gen, empty_rows=False,
                keep_diag=True, device="cpu"):
    """Random causal block mask; diagonal and sink kept unless `empty_rows` clears some rows."""
    allowed = block_causal(q_len, kv_len, bs, device=device)
    dense = (torch.rand(batch, heads, *allowed.shape, generator=gen).to(device) < density)
    if keep_diag:
        dense |= diagonal_blocks(q_len, kv_len, bs, device=device)
        dense[..., 0] = True
    dense &= allowed
    if empty_rows:
        dense[:, :, ::2] = False
    return BlockSparseMask.from_dense(dense.contiguous(), block_size=bs, q_len=q_len,
                                      kv_len=kv_len)


def rel_err(x, ref):
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def oracle(q, k, v, mask, scale):
    return reference_attention(q.double(), k.double(), v.double(), mask, scale, True)


def check_attention(q, k, v, mask, scale, *, config=None, tol=None):
    kt = _kernels()
    out, lse = kt.triton_block_sparse_attention(q, k, v, mask, scale, True, config=config)
    ref_out, ref_lse = oracle(q, k, v, mask, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    empty = torch.isneginf(ref_lse)
    assert bool((out[empty] == 0).all())
    finite = ~empty
    tol = tol if tol is not None else (1e-5 if q.dtype == torch.float32 else 2e-3)
    assert rel_err(out, ref_out) < tol
    assert bool(finite.any())
    assert float((lse[finite].double() - ref_lse[finite]).abs().max()) < 10 * tol
    return out, lse


CASES = [
    # B, Hq, Hkv, N, M, D, bs, mask heads, density, empty_rows
    (1, 2, 2, 64, 64, 16, 16, 2, 1.0, False),
    (2, 4, 2, 45, 77, 32, 16, 2, 0.5, False),
    (1, 4, 1, 33, 33, 16, 32, 1, 0.4, True),
    (1, 6, 3, 70, 100, 16, 32, 6, 0.3, False),
    (2, 4, 4, 150, 230, 32, 64, 1, 0.6, True),
]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_interpreter_matches_fp64(case, dtype):
    B, Hq, Hkv, N, M, D, bs, mh, dens, empty = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    q = torch.randn(B, Hq, N, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, M, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, M, D, generator=gen).to(dtype)
    mask = random_mask(1 if B == 2 and mh == 1 else B, mh, N, M, bs, dens, gen=gen,
                       empty_rows=empty)
    check_attention(q, k, v, mask, 1 / math.sqrt(D))


@needs_interpreter
@pytest.mark.parametrize("config", [
    {"GH": 2, "RB": 16, "BLOCK_N": 16, "USE_DESC": False, "num_warps": 4, "num_stages": 2},
    {"GH": 4, "RB": 16, "BLOCK_N": 32, "USE_DESC": True, "num_warps": 4, "num_stages": 2},
    {"GH": 1, "RB": 16, "BLOCK_N": 16, "USE_DESC": True, "num_warps": 4, "num_stages": 2},
])
def test_interpreter_grouped_heads_and_tma(config):
    """Several query heads of a group in one program, sub-tiled blocks, TMA descriptor loads."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 8, 90, 16, generator=gen)
    k = torch.randn(1, 2, 101, 16, generator=gen)
    v = torch.randn(1, 2, 101, 16, generator=gen)
    mask = random_mask(1, 2, 90, 101, 32, 0.5, gen=gen, empty_rows=True)
    check_attention(q, k, v, mask, 0.2, config=config)


@needs_interpreter
def test_interpreter_non_causal_and_partial_rows():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 40, 16, generator=gen)
    k = torch.randn(1, 2, 70, 16, generator=gen)
    v = torch.randn(1, 2, 70, 16, generator=gen)
    dense = torch.rand(1, 2, 3, 5, generator=gen) < 0.5
    dense[0, 0, 1] = False  # one empty row of blocks
    mask = BlockSparseMask.from_dense(dense, block_size=16, q_len=40, kv_len=70, causal=False)
    check_attention(q, k, v, mask, 0.25)


@needs_interpreter
def test_interpreter_dense_causal_matches_full_mask():
    kt = _kernels()
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 50, 32, generator=gen)
    k = torch.randn(1, 2, 83, 32, generator=gen)
    v = torch.randn(1, 2, 83, 32, generator=gen)
    out, lse = kt.triton_dense_causal_attention(q, k, v, 0.2, True, block_size=32)
    full = BlockSparseMask.full(1, 1, block_size=16, q_len=50, kv_len=83)
    ref_out, ref_lse = oracle(q, k, v, full, 0.2)
    assert rel_err(out, ref_out) < 1e-5
    assert float((lse.double() - ref_lse).abs().max()) < 1e-4


@needs_interpreter
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("N, M, bs", [(70, 90, 16), (64, 64, 32)])
def test_interpreter_block_maps_match_fp64(N, M, bs, causal):
    kt = _kernels()
    gen = torch.Generator().manual_seed(N + M + bs)
    q = torch.randn(1, 4, N, 16, generator=gen) * 2
    k = torch.randn(1, 2, M, 16, generator=gen) * 2
    bmax, bsum = kt.block_attention_maps_triton(q, k, block_size=bs, causal=causal)
    rmax, rsum = block_attention_maps(q.double(), k.double(), block_size=bs, causal=causal)
    assert bmax.dtype == torch.float32 and bmax.shape == rmax.shape
    assert float((bmax.double() - rmax).abs().max()) < 1e-5
    assert float((bsum.double() - rsum).abs().max()) < 1e-5
    assert torch.allclose(bsum.sum(-1), torch.ones(()), atol=1e-4)


@pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("q_len, kv_len, bs", [(300, 300, 32), (100, 170, 16)])
def test_scores_to_kv_indices_top_k_and_threshold(q_len, kv_len, bs):
    kt = _kernels()
    gen = torch.Generator().manual_seed(5)
    allowed = block_causal(q_len, kv_len, bs)
    scores = torch.randn(2, 3, *allowed.shape, generator=gen)
    diag = diagonal_blocks(q_len, kv_len, bs)
    if CUDA:
        scores, allowed, diag = scores.cuda(), allowed.cuda(), diag.cuda()
    num, idx = kt.scores_to_kv_indices(scores, q_len=q_len, kv_len=kv_len, block_size=bs,
                                       top_k=3)
    mask = BlockSparseMask(num, idx, bs, q_len, kv_len)  # validates order, range, causality
    dense = mask.to_dense()
    ar = torch.arange(allowed.shape[1], device=idx.device)
    assert torch.equal(torch.sort(idx, -1).values, ar.expand_as(idx).to(idx.dtype))
    assert bool(dense[..., 0].all()) and bool(dense[..., diag].all())
    assert bool((num <= torch.clamp(allowed.sum(-1), max=3)).all())
    assert bool((num >= torch.clamp(allowed.sum(-1), max=2)).all())
    free = allowed & ~diag
    free[:, 0] = False
    s = scores.masked_fill(~free, -math.inf)
    for r in range(allowed.shape[0]):  # the free slot goes to the best free block
        n_forced = int((allowed[r] & ~free[r]).sum())
        if n_forced < 3 and int(free[r].sum()):
            best = s[:, :, r].argmax(-1)
            assert bool(dense[:, :, r].gather(-1, best[..., None]).all())
    num_t, idx_t = kt.scores_to_kv_indices(scores, q_len=q_len, kv_len=kv_len, block_size=bs,
                                           threshold=0.5, keep_sink=False, keep_diagonal=False)
    dense_t = BlockSparseMask(num_t, idx_t, bs, q_len, kv_len).to_dense()
    assert torch.equal(dense_t, (scores >= 0.5) & allowed)


def test_scores_to_kv_indices_rejects_bad_arguments():
    kt = _kernels()
    s = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="top_k"):
        kt.scores_to_kv_indices(s, q_len=64, kv_len=64, block_size=32, top_k=0)
    with pytest.raises(ValueError, match="top_k, threshold"):
        kt.scores_to_kv_indices(s, q_len=64, kv_len=64, block_size=32)
    with pytest.raises(ValueError, match="scores"):
        kt.scores_to_kv_indices(s, q_len=64, kv_len=64, block_size=16, top_k=1)


def test_unsupported_head_dim_is_refused():
    kt = _kernels()
    q = torch.randn(1, 1, 16, 80)
    mask = BlockSparseMask.full(1, 1, block_size=16, q_len=16, kv_len=16)
    with pytest.raises(ValueError, match="head_dim"):
        kt.triton_block_sparse_attention(q, q, q, mask, 0.1)
    with pytest.raises(ValueError, match="block_size"):
        kt.block_attention_maps_triton(q, q, block_size=48)


def eager_low_precision(q, k, v, mask, scale):
    """Attention in the inputs' dtype with eager torch ops (the bf16 baseline's error)."""
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dense = mask.expand_heads(Hq).to_dense() if mask.heads != Hq else mask.to_dense()
    bs = mask.block_size
    keep = dense.repeat_interleave(bs, 2)[:, :, :N].repeat_interleave(bs, 3)[..., :M]
    rows = torch.arange(N, device=q.device)[:, None] + (M - N)
    keep = keep & (torch.arange(M, device=q.device)[None, :] <= rows)
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ kk.transpose(-1, -2)) * scale
    s = s.float().masked_fill(~keep, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype)
    return p @ vv


GPU_CASES = [
    # Hq, Hkv, N, M, D, bs, mask heads ("kv"|"q"|1), density, empty_rows
    (8, 2, 1000, 1000, 64, 64, "kv", 0.3, False),
    (8, 2, 777, 1100, 128, 128, "q", 0.5, True),
    (4, 4, 513, 513, 256, 64, 1, 1.0, False),
    (12, 4, 1500, 1500, 128, 64, "kv", 0.1, True),
    (9, 3, 900, 900, 64, 128, "kv", 1.0, False),
    (4, 1, 640, 700, 256, 128, "kv", 0.4, False),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_error_within_eager_low_precision(case, dtype):
    kt = _kernels()
    Hq, Hkv, N, M, D, bs, mh, dens, empty = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    heads = {"kv": Hkv, "q": Hq, 1: 1}[mh]
    q = torch.randn(2, Hq, N, D, generator=gen).to("cuda", dtype)
    k = torch.randn(2, Hkv, M, D, generator=gen).to("cuda", dtype)
    v = torch.randn(2, Hkv, M, D, generator=gen).to("cuda", dtype)
    mask = random_mask(2, heads, N, M, bs, dens, gen=gen, empty_rows=empty, device="cuda")
    scale = 1 / math.sqrt(D)
    from adaptive_sparse.attention.triton.forward import canonical_heads
    block_m = 64 if D == 256 else 128
    gh = canonical_heads(block_m, bs, Hq // Hkv, heads in (1, Hkv)) or 1
    pinned = {"GH": gh, "RB": min(bs, block_m // gh), "BLOCK_N": 64, "USE_DESC": D != 256,
              "num_warps": 4 if D == 64 else 8, "num_stages": 2}
    out, lse = kt.triton_block_sparse_attention(q, k, v, mask, scale, True, config=pinned)
    ref_out, ref_lse = oracle(q, k, v, mask, scale)
    eager = eager_low_precision(q, k, v, mask, scale)
    assert not torch.isnan(out).any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert rel_err(out, ref_out) <= 1.5 * rel_err(eager, ref_out) + 1e-5
    finite = torch.isfinite(ref_lse)
    assert float((lse[finite].double() - ref_lse[finite]).abs().max()) < 2e-2


@gpu
@needs_cuda
def test_gpu_every_autotune_config_is_correct():
    """One correctness check per kernel config that keep() admits for these shapes."""
    from adaptive_sparse.attention.triton.forward import autotune_configs, keep
    kt = _kernels()
    gen = torch.Generator().manual_seed(11)
    for D, bs, dtype in ((64, 64, torch.bfloat16), (128, 128, torch.bfloat16),
                         (128, 64, torch.bfloat16), (256, 64, torch.bfloat16),
                         (256, 64, torch.float32)):
        q = torch.randn(1, 8, 700, D, generator=gen).to("cuda", dtype)
        k = torch.randn(1, 2, 700, D, generator=gen).to("cuda", dtype)
        v = torch.randn(1, 2, 700, D, generator=gen).to("cuda", dtype)
        mask = random_mask(1, 2, 700, 700, bs, 0.5, gen=gen, device="cuda")
        ref = oracle(q, k, v, mask, 0.1)[0]
        bound = 1.5 * rel_err(eager_low_precision(q, k, v, mask, 0.1), ref) + 1e-5
        args = {"BS": bs, "HEAD_DIM": D, "G": 4, "SHARED": True,
                "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32"}
        kept = [cfg for cfg in autotune_configs() if keep(cfg, args)]
        assert kept, (D, bs, dtype)
        for cfg in kept:
            pinned = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            out = kt.triton_block_sparse_attention(q, k, v, mask, 0.1, config=pinned)
            assert rel_err(out, ref) <= bound, pinned


@gpu
@needs_cuda
@pytest.mark.parametrize("bs, D, dtype", [(64, 64, torch.bfloat16), (128, 128, torch.bfloat16),
                                          (64, 256, torch.bfloat16), (64, 256, torch.float32),
                                          (32, 256, torch.float32)])
def test_gpu_block_maps_match_fp64(bs, D, dtype):
    """Includes Gemma 3's head_dim 256 in fp32 (featurization), whose tiles must be sized to
    fit shared memory."""
    kt = _kernels()
    gen = torch.Generator().manual_seed(bs + D)
    q = torch.randn(1, 8, 1000, D, generator=gen).to("cuda", dtype)
    k = torch.randn(1, 2, 1100, D, generator=gen).to("cuda", dtype)
    bmax, bsum = kt.block_attention_maps_triton(q, k, block_size=bs)
    rmax, rsum = block_attention_maps(q.double(), k.double(), block_size=bs)
    assert float((bmax.double() - rmax).abs().max()) < 1e-4
    assert float((bsum.double() - rsum).abs().max()) < 1e-4


def test_block_maps_refuse_tiles_that_cannot_fit_in_shared_memory():
    from adaptive_sparse.attention.triton.block_maps import check_fits
    check_fits(4, 64, 256)  # fp32 at Gemma's head_dim: fits
    check_fits(2, 128, 256)
    with pytest.raises(ValueError, match="^block_size: 128 with head_dim 256 in torch.float32"):
        check_fits(4, 128, 256, torch.float32)


def test_mean_blocks_per_row_is_cached_per_tensor_and_buckets_are_powers_of_two():
    from adaptive_sparse.attention.triton import mean_blocks_per_row
    from adaptive_sparse.attention.triton.forward import pow2_bucket
    gen = torch.Generator().manual_seed(12)
    mask = random_mask(1, 2, 200, 200, 32, 0.5, gen=gen)
    expected = float(mask.kv_num_blocks.double().mean())
    assert mean_blocks_per_row(mask) == pytest.approx(expected)
    assert mean_blocks_per_row(mask) == pytest.approx(expected)  # cached
    mask.kv_num_blocks.fill_(1)  # in-place change invalidates the cache
    assert mean_blocks_per_row(mask) == 1.0
    assert [pow2_bucket(x) for x in (0, 1, 1.5, 4, 4.1, 100)] == [1, 1, 2, 4, 8, 128]


def test_blocks_per_row_hint_travels_on_the_mask():
    from adaptive_sparse.attention.triton import mean_blocks_per_row
    gen = torch.Generator().manual_seed(13)
    mask = random_mask(1, 2, 200, 200, 32, 0.5, gen=gen)
    hinted = mask.with_blocks_per_row(3.25)  # a host-side hint: read back without a device read
    assert mean_blocks_per_row(hinted) == 3.25
    assert hinted.to("cpu").blocks_per_row == 3.25 and hinted.expand_heads(4).blocks_per_row == 3.25
    assert mask.blocks_per_row is None and hinted == mask  # the hint is no part of equality
    with torch.inference_mode():
        inf_mask = random_mask(1, 2, 200, 200, 32, 0.5, gen=gen)
        assert mean_blocks_per_row(inf_mask) == pytest.approx(
            float(inf_mask.kv_num_blocks.double().mean()))
    for bad in (-1.0, float("nan"), "3", True):
        with pytest.raises(ValueError, match="^blocks_per_row: expected None or a non-negative"):
            mask.with_blocks_per_row(bad)
