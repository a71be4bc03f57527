"""Sparse decoding: the decode attention (reference, Triton split-KV kernel) against an fp64
oracle, the incremental decode gate and its training, and generation through transformers."""

from __future__ import annotations

import os

import pytest
import torch

from adaptive_sparse.attention.decode import decode_reference, sparse_decode_attention

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not (CUDA or INTERPRET),
                                  reason="triton backend: needs CUDA or TRITON_INTERPRET=1")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def random_decode_case(B, Hq, Hkv, M, D, bs, density, *, dtype, device, seed, seqlens=None,
                       empty=()):
    """Fresh random q [B, Hq, D], caches [B, Hkv, M, D], ragged lengths and a random selection
    of each (sequence, KV head)'s blocks (listed in random order; `empty` (b, h) pairs get none)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=gen)
    k = torch.randn(B, Hkv, M, D, generator=gen)
    v = torch.randn(B, Hkv, M, D, generator=gen)
    if seqlens is None:
        seqlens = torch.randint(1, M + 1, (B,), generator=gen)
    seqlens = torch.as_tensor(seqlens, dtype=torch.int32)
    kb_max = -(-M // bs)
    num = torch.zeros(B, Hkv, dtype=torch.int32)
    idx = torch.zeros(B, Hkv, kb_max, dtype=torch.int32)
    for b in range(B):
        nb = -(-int(seqlens[b]) // bs)
        for h in range(Hkv):
            if (b, h) in empty:
                continue
            keep = torch.randperm(nb, generator=gen)[:max(1, round(density * nb))]
            num[b, h] = keep.numel()
            idx[b, h, :keep.numel()] = keep.to(torch.int32)
    to = dict(device=device)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), v.to(dtype=dtype, **to),
            seqlens.to(**to), num.to(**to), idx.to(**to))


def oracle(q, k, v, seqlens, num, idx, bs, scale):
    """fp64 decode attention: the reference on float64 inputs."""
    return decode_reference(q.double(), k.double(), v.double(), seqlens, num, idx,
                            block_size=bs, scale=scale)


def _tol(dtype):
    return {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]


def check_against_oracle(backend, case, bs, *, num_splits=None, dense=False, four_d=False):
    q, k, v, seqlens, num, idx = case
    scale = 0.7 / q.shape[-1] ** 0.5
    if dense:
        num = idx = None
    qq = q[:, :, None] if four_d else q
    out = torch.full_like(qq, float("nan"))
    res, lse = sparse_decode_attention(qq, k, v, cache_seqlens=seqlens, kv_num_blocks=num,
                                       kv_indices=idx, block_size=bs, scale=scale,
                                       backend=backend, return_lse=True, out=out,
                                       num_splits=num_splits, check_indices=True)
    assert res is out
    if four_d:
        res, lse = res[:, :, 0], lse[:, :, 0]
    ref_out, ref_lse = oracle(q, k, v, seqlens, num, idx, bs, scale)
    assert not torch.isnan(res).any() and not torch.isnan(lse).any()
    # the dtype's rounding of the inputs' own attention is the yardstick
    eager = decode_reference(q, k, v, seqlens, num, idx, block_size=bs, scale=scale)[0]
    eager_err = (eager.double() - ref_out).abs().max().item()
    err = (res.double() - ref_out).abs().max().item()
    assert err <= max(2 * eager_err, _tol(q.dtype)), (err, eager_err)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse.double()[finite], ref_lse[finite], atol=1e-4, rtol=1e-4)
    return res, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,M,D,bs", [(3, 4, 2, 150, 32, 16), (2, 6, 2, 97, 16, 32)])
def test_reference_matches_fp64(dtype, B, Hq, Hkv, M, D, bs):
    case = random_decode_case(B, Hq, Hkv, M, D, bs, 0.4, dtype=dtype, device="cpu",
                              seed=B * 100 + M)
    check_against_oracle("reference", case, bs)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,M,D,bs,splits", [
    (3, 4, 2, 150, 32, 16, None),   # ragged lengths, GQA 2, last partial block
    (2, 6, 2, 97, 16, 32, 3),       # GQA 3 (padded to 16 rows), merge over 3 splits
    (2, 4, 4, 64, 32, 16, 1),       # MHA, one split (direct write)
    (1, 8, 1, 200, 16, 64, 2),      # one KV head for 8 query heads, block 64 split in one tile
])
def test_triton_matches_fp64(dtype, B, Hq, Hkv, M, D, bs, splits):
    device = "cuda" if CUDA else "cpu"
    case = random_decode_case(B, Hq, Hkv, M, D, bs, 0.4, dtype=dtype, device=device,
                              seed=B * 100 + M + 1)
    check_against_oracle("triton", case, bs, num_splits=splits)


@needs_triton
@pytest.mark.parametrize("splits", [1, 4])
def test_triton_dense_and_4d_query(splits):
    device = "cuda" if CUDA else "cpu"
    case = random_decode_case(2, 4, 2, 130, 32, 32, 1.0, dtype=torch.float32, device=device,
                              seed=7, seqlens=[130, 33])
    check_against_oracle("triton", case, 32, num_splits=splits, dense=True, four_d=True)


@needs_triton
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_empty_selection_gives_zeros(splits):
    device = "cuda" if CUDA else "cpu"
    case = random_decode_case(2, 4, 2, 96, 16, 16, 0.5, dtype=torch.float32, device=device,
                              seed=11, empty={(0, 1), (1, 0)})
    out, lse = check_against_oracle("triton", case, 16, num_splits=splits)
    assert torch.equal(out[0, 2:], torch.zeros_like(out[0, 2:]))
    assert torch.isinf(lse[0, 2:]).all() and torch.isfinite(lse[0, :2]).all()
    assert out[0, :2].abs().sum() > 0


@needs_triton
def test_triton_ignores_blocks_past_the_sequence_end():
    """A block listed past a short sequence's end contributes nothing (ragged batches share one
    table width); the last partial block reads only its valid tokens."""
    device = "cuda" if CUDA else "cpu"
    q, k, v, _, _, _ = random_decode_case(2, 2, 1, 80, 16, 16, 1.0, dtype=torch.float32,
                                          device=device, seed=3)
    seqlens = torch.tensor([80, 20], dtype=torch.int32, device=device)
    num = torch.tensor([[3], [3]], dtype=torch.int32, device=device)
    idx = torch.tensor([[[0, 1, 4]], [[0, 1, 4]]], dtype=torch.int32, device=device)
    out = sparse_decode_attention(q, k, v, cache_seqlens=seqlens, kv_num_blocks=num,
                                  kv_indices=idx, block_size=16, backend="triton")
    short = sparse_decode_attention(q[1:], k[1:, :, :20], v[1:, :, :20], block_size=16,
                                    backend="reference")
    torch.testing.assert_close(out[1:], short, atol=2e-5, rtol=1e-5)


def test_bad_decode_inputs_name_the_argument():
    q, k, v, seqlens, num, idx = random_decode_case(1, 4, 2, 64, 16, 16, 0.5,
                                                    dtype=torch.float32, device="cpu", seed=1)
    with pytest.raises(ValueError, match="^q: expected"):
        sparse_decode_attention(q[:, :, None].expand(1, 4, 2, 16), k, v)
    with pytest.raises(ValueError, match="^k: expected a KV head count"):
        sparse_decode_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="^kv_num_blocks, kv_indices: expected both"):
        sparse_decode_attention(q, k, v, kv_num_blocks=num)
    with pytest.raises(ValueError, match="^kv_indices: expected int32"):
        sparse_decode_attention(q, k, v, kv_num_blocks=num, kv_indices=idx.long(), block_size=16)
    with pytest.raises(ValueError, match="^kv_indices: expected block numbers"):
        sparse_decode_attention(q, k, v, kv_num_blocks=num, kv_indices=idx + 10, block_size=16,
                                check_indices=True)
    with pytest.raises(ValueError, match="^out: expected"):
        sparse_decode_attention(q, k, v, out=torch.empty(1, 4, 8))
    with pytest.raises(ValueError, match="^backend: expected"):
        sparse_decode_attention(q, k, v, backend="fast")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bs,D,G", [(64, 128, 4), (128, 128, 8), (64, 64, 7), (128, 64, 1)])
def test_gpu_decode_matches_fp64(dtype, bs, D, G):
    Hkv = 2
    case = random_decode_case(4, G * Hkv, Hkv, 5000, D, bs, 0.2, dtype=dtype, device="cuda",
                              seed=bs + D + G, seqlens=[5000, 4097, 130, 1],
                              empty={(3, 1)})
    for splits in (None, 1, 7):
        check_against_oracle("triton", case, bs, num_splits=splits)
    check_against_oracle("triton", case, bs, dense=True)
