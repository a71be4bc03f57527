"""The opt-in FP8 forward against fp64: interpreter (small shapes) and GPU (error next to bf16's)."""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton")

from adaptive_sparse.attention.reference import reference_attention  # noqa: E402
from adaptive_sparse.masks import BlockSparseMask  # noqa: E402

CUDA = torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(
    CUDA or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU interpreter tests: run with TRITON_INTERPRET=1, no CUDA")


def _rel(x, ref):
    return float((x.double() - ref).norm() / ref.norm())


def _emulated(q, k, v, mask, scale):
    """fp64 attention on the dequantized e4m3 inputs (what the kernel sees before P is cast)."""
    from adaptive_sparse.attention.triton.forward_fp8 import quantize_blocks, quantize_v

    bs = 128 if mask is None else mask.block_size
    M = k.shape[2]
    q8, sq = quantize_blocks(q, bs)
    k8, sk = quantize_blocks(k.float() - k.float().mean(2, keepdim=True), bs)
    vt8, sv = quantize_v(v)
    qd = q8.double() * sq.double().repeat_interleave(bs, -1)[..., :q.shape[2], None]
    kd = k8.double() * sk.double().repeat_interleave(bs, -1)[..., :M, None]
    vd = (vt8.double()[..., :M] * sv.double()[..., None]).transpose(-1, -2)
    if mask is None:
        mask = BlockSparseMask.full(1, 1, block_size=bs, q_len=q.shape[2], kv_len=M,
                                    device=q.device)
    return reference_attention(qd, kd, vd, mask, scale)


def _case(B, Hq, Hkv, N, M, D, bs, density, gen, device="cpu", dtype=torch.float32):
    from test_triton import random_mask

    q = torch.randn(B, Hq, N, D, generator=gen).to(device, dtype)
    k = (torch.randn(B, Hkv, M, D, generator=gen) + 0.5).to(device, dtype)  # offset: smoothing
    v = torch.randn(B, Hkv, M, D, generator=gen).to(device, dtype)
    mask = random_mask(B, Hkv, N, M, bs, density, gen=gen, empty_rows=True, device=device)
    return q, k, v, mask


@needs_interpreter
@pytest.mark.parametrize("shape", [(1, 4, 2, 70, 100, 32, 32, 0.5), (2, 2, 2, 64, 64, 16, 16, 1.0)])
def test_interpreter_fp8_close_to_fp64(shape):
    from adaptive_sparse.attention.triton.forward_fp8 import fp8_block_sparse_attention

    gen = torch.Generator().manual_seed(5)
    q, k, v, mask = _case(*shape, gen)
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.full_like(q, float("nan"))
    fp8_block_sparse_attention(q, k, v, mask, scale, out=out)
    ref, lse = reference_attention(q.double(), k.double(), v.double(), mask, scale, True)
    assert torch.isfinite(out).all()
    empty = torch.isneginf(lse)
    assert bool((out[empty] == 0).all()) and bool(empty.any())
    emulated = _emulated(q, k, v, mask, scale)
    # only P's e4m3 cast (3 mantissa bits: ~4% rms per element on random V) separates them
    assert _rel(out, emulated) < 6e-2
    assert _rel(out, ref) < 1e-1


@needs_interpreter
def test_interpreter_fp8_dense_matches_full_mask():
    from adaptive_sparse.attention.triton.forward_fp8 import fp8_block_sparse_attention

    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 200, 32, generator=gen)
    k, v = (torch.randn(1, 1, 260, 32, generator=gen) for _ in range(2))
    out = fp8_block_sparse_attention(q, k, v, None, 0.2)
    assert _rel(out, _emulated(q, k, v, None, 0.2)) < 6e-2


def test_fp8_refuses_bad_shapes():
    from adaptive_sparse.attention.triton.forward_fp8 import fp8_block_sparse_attention

    q = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="k, v: expected"):
        fp8_block_sparse_attention(q, torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16))
    with pytest.raises(TypeError, match="q: expected float16"):
        fp8_block_sparse_attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="head_dim"):
        fp8_block_sparse_attention(torch.randn(1, 1, 16, 24), torch.randn(1, 1, 16, 24),
                                   torch.randn(1, 1, 16, 24))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128, 256])
def test_gpu_fp8_error_next_to_bf16(D):
    """fp8 error vs fp64 stays within a small multiple of the bf16 kernel's, every config."""
    from adaptive_sparse.attention.triton import triton_block_sparse_attention
    from adaptive_sparse.attention.triton.forward_fp8 import (autotune_configs,
                                                              fp8_block_sparse_attention, keep)

    gen = torch.Generator().manual_seed(D)
    q, k, v, mask = _case(1, 8, 2, 1000, 1000, D, 128, 0.5, gen, "cuda", torch.bfloat16)
    ref = reference_attention(q.double(), k.double(), v.double(), mask, 1 / math.sqrt(D))
    err_bf16 = _rel(triton_block_sparse_attention(q, k, v, mask, 1 / math.sqrt(D)), ref)
    emulated = _emulated(q, k, v, mask, 1 / math.sqrt(D))
    args = {"BS": 128, "HEAD_DIM": D, "G": 4, "SHARED": True}
    kept = [c for c in autotune_configs() if keep(c, args)]
    assert kept
    for c in kept:
        cfg = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        out = torch.full_like(q, float("nan"))
        fp8_block_sparse_attention(q, k, v, mask, 1 / math.sqrt(D), config=cfg, out=out)
        err = _rel(out, ref)
        assert err < 1e-1 and err < 40 * err_bf16, (cfg, err, err_bf16)
        assert _rel(out, emulated) < 6e-2, cfg


@needs_interpreter
def test_interpreter_api_precision_fp8_is_the_fp8_kernel():
    from adaptive_sparse import block_sparse_attention
    from adaptive_sparse.attention.triton.forward_fp8 import fp8_block_sparse_attention

    gen = torch.Generator().manual_seed(7)
    q, k, v, mask = _case(1, 4, 2, 70, 100, 32, 32, 0.5, gen)
    out = torch.full_like(q, float("nan"))
    got = block_sparse_attention(q, k, v, mask, backend="triton", precision="fp8", out=out)
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
    assert torch.equal(out, fp8_block_sparse_attention(q, k, v, mask, 1 / math.sqrt(32)))
    ref = reference_attention(q.double(), k.double(), v.double(), mask, 1 / math.sqrt(32))
    assert 1e-3 < _rel(out, ref) < 1e-1  # e4m3, not the fp32 kernel


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(precision="bf16"), ValueError, r"^precision: expected one of \('input', 'fp8'\)"),
    (dict(precision="fp8", backend="reference"), ValueError,
     "^precision: 'fp8' runs on backend 'triton' only .* got backend 'reference'"),
    (dict(precision="fp8", backend="triton", return_lse=True), ValueError,
     "^return_lse: expected False with precision 'fp8'"),
])
def test_api_precision_is_validated(kwargs, error, match):
    from adaptive_sparse import block_sparse_attention

    q, k, v, mask = _case(1, 2, 1, 32, 32, 16, 16, 1.0, torch.Generator().manual_seed(8))
    with pytest.raises(error, match=match):
        block_sparse_attention(q, k, v, mask, **kwargs)


@pytest.mark.skipif(CUDA, reason="auto picks triton on CUDA")
def test_api_fp8_off_cuda_names_the_backend_auto_picked():
    from adaptive_sparse import block_sparse_attention

    q, k, v, mask = _case(1, 2, 1, 32, 32, 16, 16, 1.0, torch.Generator().manual_seed(9))
    with pytest.raises(ValueError, match="got backend 'gather'"):
        block_sparse_attention(q, k, v, mask, precision="fp8")
    with pytest.raises(TypeError, match="got torch.float64"):
        block_sparse_attention(q.double(), k.double(), v.double(), mask, precision="fp8",
                               backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_api_precision_fp8_through_auto():
    from adaptive_sparse import block_sparse_attention

    gen = torch.Generator().manual_seed(10)
    q, k, v, mask = _case(1, 8, 2, 1000, 1000, 128, 128, 0.5, gen, "cuda", torch.bfloat16)
    ref = reference_attention(q.double(), k.double(), v.double(), mask, 1 / math.sqrt(128))
    out = torch.full_like(q, float("nan"))
    block_sparse_attention(q, k, v, mask, precision="fp8", out=out)
    err_fp8 = _rel(out, ref)
    err_bf16 = _rel(block_sparse_attention(q, k, v, mask), ref)
    assert err_fp8 < 1e-1 and err_fp8 > err_bf16, (err_fp8, err_bf16)
