"""exp2 on the FMA pipes (`forward.poly_exp2`, `forward.exp2_mixed`) and the forwards with the
option on (`exp2_poly`): against torch.exp2 in fp64 and the fp64 attention oracle, CPU
interpreter (fp32/fp16) and GPU."""

from __future__ import annotations

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from adaptive_sparse.attention.reference import reference_attention  # noqa: E402
from adaptive_sparse.attention.triton.forward import (EXP2_POLY_FRACTIONS,  # noqa: E402
                                                      exp2_mixed, exp2_poly, exp2_poly_code)
from adaptive_sparse.masks import BlockSparseMask, block_causal, diagonal_blocks  # noqa: E402

CUDA = torch.cuda.is_available()
runnable = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                              reason="needs CUDA or TRITON_INTERPRET=1")
# max relative error of the minimax polynomials on [-1/2, 1/2] (fp32 Horner), plus fp32 rounding
POLY_REL = {3: 7.6e-5, 2: 1.75e-3}


@triton.jit
def _exp2_probe_kernel(X, Y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, POLY: tl.constexpr,
                       DEGREE: tl.constexpr):
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(Y + offs, exp2_mixed(tl.load(X + offs), BLOCK_M, BLOCK_N, POLY, DEGREE))


def _exp2(x, poly: int, degree: int):
    y = torch.full_like(x, float("nan"))
    _exp2_probe_kernel[(1,)](x, y, x.shape[0], x.shape[1], poly, degree)
    return y


def _dev():
    return "cuda" if CUDA else "cpu"


def _poly_columns(bn: int, poly: int) -> torch.Tensor:
    """Columns that `exp2_mixed` computes with the polynomial: odd columns, then odd 8-column
    chunks of those (1/4), then chunks 3 mod 4 (1/8)."""
    col = torch.arange(bn)
    if poly == 0:
        return torch.zeros(bn, dtype=torch.bool)
    if poly == 1:
        return torch.ones(bn, dtype=torch.bool)
    sel = col % 2 == 1
    if poly >= 4:
        sel &= (col // 8) % 2 == 1
    if poly == 8:
        sel &= (col // 16) % 2 == 1
    return sel


@runnable
@pytest.mark.parametrize("degree", [3, 2])
def test_poly_exp2_over_a_wide_range(degree):
    gen = torch.Generator().manual_seed(degree)
    special = torch.tensor([-math.inf, -1e30, -1000.0, -200.0, -127.0, -126.6, -126.5, -126.0,
                            -125.3, -100.0, -1.0, -0.5, -1e-7, -0.0, 0.0, 1e-7, 0.5, 0.49999997,
                            8.807354922057604, 20.0, 100.0, 126.9, float("nan")])
    x = torch.cat([special, torch.rand(64 * 32 - len(special), generator=gen) * 260 - 140])
    x = x[torch.randperm(len(x), generator=gen)].reshape(64, 32).contiguous()
    y = _exp2(x.to(_dev()), 1, degree).cpu()
    ref = torch.exp2(x.double())
    nan = torch.isnan(x)
    assert bool(torch.isnan(y[nan]).all()) and not bool(torch.isnan(y[~nan]).any())
    assert bool((y[x <= -127] == 0).all())  # -inf and underflow: exactly +0
    assert bool((torch.signbit(y[~nan]) == 0).all())
    normal = (x >= -125.5) & ~nan
    rel = ((y[normal].double() - ref[normal]) / ref[normal]).abs()
    assert float(rel.max()) < POLY_REL[degree]
    assert float(rel.max()) > POLY_REL[degree] / 50  # it is the polynomial, not exp2
    tiny = (x < -125.5) & ~nan
    assert float((y[tiny].double() - ref[tiny]).abs().max()) <= 2.0 ** -125


@runnable
@pytest.mark.parametrize("poly", [0, 1, 2, 4, 8])
@pytest.mark.parametrize("bm,bn", [(16, 128), (32, 64), (16, 32)])
def test_exp2_mixed_fraction_and_column_order(poly, bm, bn):
    """Score-like inputs (<= 0, some -inf): the columns keep their order, 1/poly of them carry
    the polynomial's error, the rest match exp2, -inf gives 0."""
    gen = torch.Generator().manual_seed(poly * 1000 + bn)
    x = -torch.rand(bm, bn, generator=gen) * 30
    x[torch.rand(bm, bn, generator=gen) < 0.1] = -math.inf
    y = _exp2(x.to(_dev()), poly, 3).cpu()
    ref = torch.exp2(x.double())
    assert bool((y[torch.isneginf(x)] == 0).all())
    rel = ((y.double() - ref) / ref).abs().nan_to_num(0.0)  # -inf entries: 0 / 0 checked above
    cols = _poly_columns(bn, poly)
    zero = torch.zeros(bm, 1, dtype=torch.float64)
    assert float(torch.cat([rel[:, ~cols], zero], 1).max()) < 1e-6
    assert float(torch.cat([rel[:, cols], zero], 1).max()) < POLY_REL[3]
    if poly:
        assert float(rel[:, cols].max()) > 1e-6
        assert int(cols.sum()) * poly == bn


def test_exp2_poly_option_values():
    assert [exp2_poly_code(f) for f in EXP2_POLY_FRACTIONS] == [0, 8, 4, 2, 1]
    assert exp2_poly_code(None) == 0
    with exp2_poly(0.25):
        assert exp2_poly_code(None) == 4
    assert exp2_poly_code(None) == 0
    for bad in (0.3, -0.5, 2.0):
        with pytest.raises(ValueError, match="exp2_poly: expected one of"):
            exp2_poly_code(bad)
    with pytest.raises(ValueError, match="exp2_poly"):
        with exp2_poly(0.75):
            pass


def _case(gen, dtype, *, B=1, Hq=4, Hkv=2, N=70, M=100, D=32, bs=32, density=0.5):
    dev = _dev()
    q = torch.randn(B, Hq, N, D, generator=gen).to(dev, dtype)
    k, v = (torch.randn(B, Hkv, M, D, generator=gen).to(dev, dtype) for _ in range(2))
    allowed = block_causal(N, M, bs)
    dense = torch.rand(1, Hkv, *allowed.shape, generator=gen) < density
    dense |= diagonal_blocks(N, M, bs)
    dense[..., 0] = True
    dense &= allowed
    dense[:, 0, 1] = False  # one query block of head group 0 sees no key: exact zeros, lse -inf
    mask = BlockSparseMask.from_dense(dense.contiguous().to(dev), block_size=bs, q_len=N,
                                      kv_len=M)
    return q, k, v, mask


def _rel(x, ref):
    return float((x.double() - ref).norm() / ref.norm())


@runnable
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fraction", [0.125, 0.5, 1.0])
def test_forward_with_poly_exp2_matches_fp64(fraction, dtype):
    """Fresh random inputs, NaN-poisoned outputs; error vs fp64 as small as the MUFU path's."""
    from adaptive_sparse.attention.triton import triton_block_sparse_attention
    from adaptive_sparse.attention.triton.forward import launch_forward

    if CUDA and dtype == torch.float32:
        pytest.skip("fp32 runs the interpreter's ieee dot; on the GPU bf16 is the target")
    gen = torch.Generator().manual_seed(int(fraction * 8) + (dtype == torch.float16))
    q, k, v, mask = _case(gen, dtype)
    scale = 1 / math.sqrt(q.shape[-1])
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), mask, scale, True)
    cfg = _pinned_config()
    base = triton_block_sparse_attention(q, k, v, mask, scale, config=cfg)
    out = torch.full_like(q, float("nan"))
    with exp2_poly(fraction):
        got, lse = triton_block_sparse_attention(q, k, v, mask, scale, True, out=out,
                                                 config=cfg)
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
    empty = torch.isneginf(ref_lse)
    assert bool(empty.any()) and torch.equal(torch.isneginf(lse), empty)
    assert bool((out[empty] == 0).all())
    tol = 2e-4 if dtype == torch.float32 else 2e-3  # fp32: the polynomial's 7.5e-5 shows
    assert _rel(out, ref) < tol
    assert _rel(out, ref) < _rel(base, ref) + 1.5e-4
    fin = ~empty
    assert float((lse[fin].double() - ref_lse[fin]).abs().max()) < 1e-3
    # the dense kernel, the argument instead of the context
    dense_out, _ = launch_forward(q, k, v, kv_num_blocks=mask.kv_num_blocks,
                                  kv_indices=mask.kv_indices, block_size=32, causal=True,
                                  scale=scale, heads_per_mask=2, shared=True, dense=True,
                                  exp2_poly=fraction, config=cfg)
    full = BlockSparseMask.full(1, 1, block_size=32, q_len=q.shape[2], kv_len=k.shape[2])
    assert _rel(dense_out, reference_attention(q.double(), k.double(), v.double(), full,
                                               scale)) < tol


def _pinned_config():
    """One config for block 32 (no autotuning: one compile per variant on the GPU)."""
    return {"GH": 1, "RB": 32, "BLOCK_N": 32, "USE_DESC": False, "num_warps": 4,
            "num_stages": 2}


@runnable
@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_fp8_forward_with_poly_exp2(fraction):
    """FP8 (degree-2 polynomial): the error vs fp64 stays that of the MUFU path (e4m3 P)."""
    from adaptive_sparse.attention.triton.forward_fp8 import fp8_block_sparse_attention

    gen = torch.Generator().manual_seed(40 + int(fraction * 8))
    dtype = torch.bfloat16 if CUDA else torch.float32
    q, k, v, mask = _case(gen, dtype, D=64 if CUDA else 32, bs=64 if CUDA else 32)
    scale = 1 / math.sqrt(q.shape[-1])
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), mask, scale, True)
    cfg = {"GH": 1, "RB": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2} if CUDA else None
    base = fp8_block_sparse_attention(q, k, v, mask, scale, config=cfg)
    out = torch.full_like(q, float("nan"))
    fp8_block_sparse_attention(q, k, v, mask, scale, out=out, exp2_poly=fraction, config=cfg)
    assert torch.isfinite(out).all()
    empty = torch.isneginf(ref_lse)
    assert bool(empty.any()) and bool((out[empty] == 0).all())
    assert _rel(out, ref) < 1e-1
    assert _rel(out, ref) < _rel(base, ref) * 1.1 + 2e-3
    with exp2_poly(fraction):  # the context reaches the FP8 kernel too
        again = fp8_block_sparse_attention(q, k, v, mask, scale, config=cfg)
    assert torch.equal(again, out)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_gpu_dense_kernel_with_poly_exp2(D, fraction):
    """bf16 dense kernel at the model shapes (pinned: the widest config the autotuner admits,
    128-row tiles, 8 warps), option on vs off, against fp64."""
    from adaptive_sparse.attention.triton import triton_dense_causal_attention
    from adaptive_sparse.attention.triton.forward import autotune_configs, keep

    gen = torch.Generator(device="cuda").manual_seed(D)
    hq, hkv = (8, 2) if D < 256 else (4, 1)
    q = torch.randn(1, hq, 1024, D, generator=gen, device="cuda").to(torch.bfloat16)
    k, v = (torch.randn(1, hkv, 1024, D, generator=gen, device="cuda").to(torch.bfloat16)
            for _ in range(2))
    scale = 1 / math.sqrt(D)
    full = BlockSparseMask.full(1, 1, block_size=128, q_len=1024, kv_len=1024, device="cuda")
    ref = reference_attention(q.double(), k.double(), v.double(), full, scale)
    c = max((c for c in autotune_configs() if c.kwargs["GH"] * c.kwargs["RB"] == 128
             and keep(c, {"BS": 128, "HEAD_DIM": D, "G": hq // hkv, "SHARED": True,
                          "DOT_PREC": "tf32"})),
            key=lambda c: (c.num_warps, c.kwargs["BLOCK_N"], c.num_stages))
    cfg = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
    base = triton_dense_causal_attention(q, k, v, scale, config=cfg)
    with exp2_poly(fraction):
        got = triton_dense_causal_attention(q, k, v, scale, config=cfg)
    assert torch.isfinite(got).all()
    assert _rel(got, ref) < 1e-2 and _rel(got, ref) < _rel(base, ref) * 1.05 + 1e-4
