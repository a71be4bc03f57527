"""The opt-in FP8 forward and its 8-bit quantization against fp64 and a torch reference:
CPU, interpreter (small shapes) and GPU (error next to bf16's)."""

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


def _dequantized(q, k, v, bs, qk_format, method="torch"):
    """fp64 Q, smoothed K and V as the kernel sees them (8-bit values times their scales)."""
    from adaptive_sparse.attention.triton.quantize import quantize_qkv

    M = k.shape[2]
    q8, sq, k8, sk, vt8, sv = quantize_qkv(q, k, v, bs, qk_format=qk_format, method=method)
    qd = q8.double() * sq.double()[..., None]
    kd = k8.double() * sk.double().repeat_interleave(bs, -1)[..., :M, None]
    vd = (vt8.double()[..., :M] * sv.double()[..., None]).transpose(-1, -2)
    return qd, kd, vd


def _emulated(q, k, v, mask, scale, qk_format="int8", method="torch"):
    """fp64 attention on the dequantized 8-bit inputs (what the kernel sees before P is cast)."""
    bs = 128 if mask is None else mask.block_size
    qd, kd, vd = _dequantized(q, k, v, bs, qk_format, method)
    if mask is None:
        mask = BlockSparseMask.full(1, 1, block_size=bs, q_len=q.shape[2], kv_len=k.shape[2],
                                    device=q.device)
    return reference_attention(qd, kd, vd, mask, scale)


def _case(B, Hq, Hkv, N, M, D, bs, density, gen, device="cpu", dtype=torch.float32,
          outliers=False):
    from test_triton import random_mask

    q = torch.randn(B, Hq, N, D, generator=gen)
    k = torch.randn(B, Hkv, M, D, generator=gen) + 0.5  # offset: smoothing
    v = torch.randn(B, Hkv, M, D, generator=gen)
    if outliers:  # as in trained models: a channel-wise bias on K, a few large channels
        ch = torch.randperm(D, generator=gen)[:max(1, D // 16)]
        k = k + 1.5 * torch.randn(D, generator=gen)
        k[..., ch] = 4 * k[..., ch] + 8 * torch.randn(len(ch), generator=gen)
        q[..., ch] *= 3
        v[..., :2] += 5
    mask = random_mask(B, Hkv, N, M, bs, density, gen=gen, empty_rows=True, device=device)
    return (*(t.to(device, dtype) for t in (q, k, v)), mask)


def _step(x8):
    """Quantization step of each 8-bit value (1 for int8; e4m3: 2**(exponent - 3), subnormals
    2**-9)."""
    if x8.dtype == torch.int8:
        return torch.ones_like(x8, dtype=torch.float64)
    a = x8.double().abs()
    return torch.exp2(torch.floor(torch.log2(a.clamp_min(2.0 ** -6))) - 3)


@pytest.mark.parametrize("qk_format", ["int8", "e4m3"])
@pytest.mark.parametrize("D,bs", [(16, 16), (64, 64)])
def test_torch_quantization_layout_and_rounding(qk_format, D, bs):
    """The layout the kernel reads (PyTorch reference, runs anywhere): per-token Q scales, K
    smoothed with per-block scales, V transposed and zero-padded to 16 keys with per-channel
    scales; every value within half a step of the input."""
    gen = torch.Generator().manual_seed(D + len(qk_format))
    q, k, v, _ = _case(2, 4, 2, 70, 100, D, bs, 1.0, gen, outliers=True)
    from adaptive_sparse.attention.triton.quantize import quantize_qkv

    q8, sq, k8, sk, vt8, sv = quantize_qkv(q, k, v, bs, qk_format=qk_format, method="torch")
    rmax = 127 if qk_format == "int8" else 448
    assert sq.shape == (2, 4, 70) and sk.shape == (2, 2, -(-100 // bs)) and sv.shape == (2, 2, D)
    assert vt8.shape == (2, 2, D, 112) and bool((vt8[..., 100:].float() == 0).all())
    ks = k.double() - k.double().mean(2, keepdim=True)
    torch.testing.assert_close(sq.double(), q.double().abs().amax(-1) / rmax, rtol=1e-6, atol=0)
    assert q8.dtype == k8.dtype == (torch.int8 if qk_format == "int8" else torch.float8_e4m3fn)
    qd, kd, vd = _dequantized(q, k, v, bs, qk_format)
    for x, xd, x8, s in ((q, qd, q8, sq[..., None]),
                         (ks, kd, k8, sk.repeat_interleave(bs, -1)[..., :100, None]),
                         (v, vd, vt8[..., :100].transpose(-1, -2), sv[:, :, None, :])):
        half = 0.5 * _step(x8) * s.double() * (1 + 1e-5) + 1e-6
        assert bool(((xd - x.double()).abs() <= half).all())
    assert bool((q8.float().abs().amax(-1) == rmax).all())  # each token's largest entry
    assert float(k8.float().abs().max()) == rmax
    assert bool((vt8[..., :100].float().abs().amax(-1) == 448).all())


@pytest.mark.parametrize("method,device", [
    ("torch", "cpu"), pytest.param("fused", "cpu", marks=needs_interpreter),
    pytest.param("fused", "cuda", marks=[pytest.mark.gpu,
                                         pytest.mark.skipif(not CUDA, reason="needs CUDA")])])
@pytest.mark.parametrize("qk_format", ["int8", "e4m3"])
def test_quantization_nan_and_zero_blocks(qk_format, method, device):
    """A NaN input poisons its own scale (NaN out, never a silent finite value, even through
    int8); an all-zero block gets the scale floor and zeros (no 0/0)."""
    from adaptive_sparse.attention.triton.quantize import MIN_SCALE, quantize_qkv

    gen = torch.Generator().manual_seed(11)
    q, k, v, _ = _case(1, 2, 1, 40, 40, 16, 16, 1.0, gen, device)
    q[0, 1, 3, 5] = float("nan")
    q[0, 0, 7] = 0.0
    k[0, 0, 20, 3] = float("nan")
    q8, sq, k8, sk, *_ = quantize_qkv(q, k, v, 16, qk_format=qk_format, method=method)
    assert bool(torch.isnan(sk).all())  # the K mean is NaN in that channel: every block
    assert torch.isnan(sq[0, 1, 3]) and float(sq[0, 0, 7]) == float(torch.tensor(MIN_SCALE))
    assert bool((q8[0, 0, 7].float() == 0).all())
    assert bool(torch.isfinite(sq[0, 1, :3]).all())


@pytest.mark.parametrize("D", [64, 128])
def test_int8_qk_and_smoothing_reduce_the_error_on_outliers(D):
    """fp64 attention on the dequantized inputs (the torch layout, no P cast), inputs with a K
    channel bias and a few large channels: int8 Q / K err less than e4m3, and smoothing K
    matters for e4m3 (its steps grow with the magnitude the bias adds)."""
    from adaptive_sparse.attention.triton.quantize import quantize_rows_torch

    gen = torch.Generator().manual_seed(50 + D)
    q, k, v, mask = _case(1, 2, 1, 512, 512, D, 64, 1.0, gen, outliers=True)
    scale = 1 / math.sqrt(D)
    ref = reference_attention(q.double(), k.double(), v.double(), mask, scale)
    err = {fmt: _rel(_emulated(q, k, v, mask, scale, fmt), ref) for fmt in ("int8", "e4m3")}
    q8, sq = quantize_rows_torch(q, "e4m3")
    k8, sk = quantize_rows_torch(k, "e4m3", block=64)  # not smoothed
    unsmoothed = reference_attention(q8.double() * sq.double()[..., None],
                                     k8.double() * sk.double().repeat_interleave(64, -1)[..., None],
                                     v.double(), mask, scale)
    err["e4m3 unsmoothed"] = _rel(unsmoothed, ref)
    assert err["int8"] < 0.6 * err["e4m3"] and err["e4m3"] < 0.85 * err["e4m3 unsmoothed"], err


def test_quantize_refuses_unknown_options():
    from adaptive_sparse.attention.triton.forward_fp8 import fp8_block_sparse_attention

    q = torch.randn(1, 2, 16, 16)
    with pytest.raises(ValueError, match="^qk_format: expected one of"):
        fp8_block_sparse_attention(q, q, q, qk_format="int4")
    with pytest.raises(ValueError, match="^quantize: expected one of"):
        fp8_block_sparse_attention(q, q, q, quantize="numpy")
    with pytest.raises(ValueError, match="^pv_accumulate: expected one of"):
        fp8_block_sparse_attention(q, q, q, pv_accumulate="fp16")


def test_fp8_defaults_sets_the_path_of_calls_without_options():
    from adaptive_sparse.attention.triton import forward_fp8

    q = torch.randn(1, 2, 16, 16)
    before = (forward_fp8.DEFAULT_QK_FORMAT, forward_fp8.DEFAULT_QUANTIZE,
              forward_fp8.DEFAULT_PV_ACCUMULATE)
    with forward_fp8.fp8_defaults(qk_format="int4"):
        assert forward_fp8.DEFAULT_QUANTIZE == before[1]
        with pytest.raises(ValueError, match="^qk_format: expected one of .* got 'int4'"):
            forward_fp8.fp8_block_sparse_attention(q, q, q)
    assert (forward_fp8.DEFAULT_QK_FORMAT, forward_fp8.DEFAULT_QUANTIZE,
            forward_fp8.DEFAULT_PV_ACCUMULATE) == before


def _check_fused_matches_torch(q, k, v, bs, qk_format):
    """The fused kernels against the torch layout: identical scales (up to fp32 rounding of the
    K mean) and 8-bit values at most one step apart, rarely (in the interpreter, whose e4m3 cast
    is not torch's rounding, only the one-step bound holds for e4m3)."""
    from adaptive_sparse.attention.triton.quantize import quantize_qkv

    fused = quantize_qkv(q, k, v, bs, qk_format=qk_format, method="fused")
    ref = quantize_qkv(q, k, v, bs, qk_format=qk_format, method="torch")
    names = ("q8", "sq", "k8", "sk", "vt8", "sv")
    for name, a, b in zip(names, fused, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if name.startswith("s"):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0, msg=name)
            continue
        step = torch.maximum(_step(a), _step(b))
        diff = (a.double() - b.double()).abs()
        if not q.is_cuda and a.dtype != torch.int8:
            # the interpreter's e4m3 cast drops the carry of a mantissa rounding up to the next
            # power of two (126.9 -> 64, not 128): those values are exactly half of torch's
            b64 = b.double()
            pow2 = torch.exp2(torch.log2(b64.abs()).round()) == b64.abs()
            carry = (a.double() * 2 == b64) & pow2
            diff = torch.where(carry, 0.0, diff)
        assert bool((diff <= step).all()), (name, float(diff.max()))
        if a.dtype == torch.int8 or q.is_cuda:
            assert float((diff > 0).double().mean()) < 1e-2, name


@needs_interpreter
@pytest.mark.parametrize("qk_format", ["int8", "e4m3"])
@pytest.mark.parametrize("D,bs", [(16, 16), (32, 64)])
def test_interpreter_fused_quantization_matches_torch(qk_format, D, bs):
    gen = torch.Generator().manual_seed(20 + D)
    q, k, v, _ = _case(2, 4, 2, 70, 100, D, bs, 1.0, gen, outliers=True)
    _check_fused_matches_torch(q, k, v, bs, qk_format)


@needs_interpreter
@pytest.mark.parametrize("qk_format,quantize,pv", [
    ("int8", "fused", "tile"), ("e4m3", "fused", "tile"), ("int8", "torch", "tile"),
    ("int8", "fused", "chain"), ("e4m3", "torch", "chain")])
@pytest.mark.parametrize("shape", [(1, 4, 2, 70, 100, 32, 32, 0.5), (2, 2, 2, 64, 64, 16, 16, 1.0)])
def test_interpreter_fp8_close_to_fp64(shape, qk_format, quantize, pv):
    from adaptive_sparse.attention.triton.forward_fp8 import fp8_block_sparse_attention

    gen = torch.Generator().manual_seed(5)
    q, k, v, mask = _case(*shape, gen)
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.full_like(q, float("nan"))
    fp8_block_sparse_attention(q, k, v, mask, scale, out=out, qk_format=qk_format,
                               quantize=quantize, pv_accumulate=pv)
    ref, lse = reference_attention(q.double(), k.double(), v.double(), mask, scale, True)
    assert torch.isfinite(out).all()
    empty = torch.isneginf(lse)
    assert bool((out[empty] == 0).all()) and bool(empty.any())
    emulated = _emulated(q, k, v, mask, scale, qk_format, quantize)  # the inputs it read
    # only P's e4m3 cast (3 mantissa bits: ~4% rms per element on random V) separates them
    assert _rel(out, emulated) < 6e-2
    assert _rel(out, ref) < 1e-1


@needs_interpreter
def test_interpreter_fp8_dense_matches_full_mask():
    from adaptive_sparse.attention.triton.forward_fp8 import fp8_block_sparse_attention

    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 200, 32, generator=gen)
    k, v = (torch.randn(1, 1, 260, 32, generator=gen) for _ in range(2))
    out = fp8_block_sparse_attention(q, k, v, None, 0.2, quantize="fused")
    assert _rel(out, _emulated(q, k, v, None, 0.2, method="fused")) < 6e-2


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
@pytest.mark.parametrize("qk_format", ["int8", "e4m3"])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_gpu_fused_quantization_matches_torch(D, qk_format):
    gen = torch.Generator().manual_seed(30 + D)
    q, k, v, _ = _case(1, 8, 2, 1000, 1000, D, 128, 1.0, gen, "cuda", torch.bfloat16,
                       outliers=True)
    _check_fused_matches_torch(q, k, v, 128, qk_format)
    _check_fused_matches_torch(q, k, v, 64, qk_format)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("qk_format,pv", [("int8", "tile"), ("int8", "chain"), ("e4m3", "tile"),
                                          ("e4m3", "chain")])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_gpu_fp8_error_next_to_bf16(D, qk_format, pv):
    """fp8 error vs fp64 stays within a small multiple of the bf16 kernel's and close to fp64
    attention on the dequantized inputs (only P's cast separates them): every autotune config
    for the default path (int8 / chain), the first for the others (compile time)."""
    from adaptive_sparse.attention.triton import triton_block_sparse_attention
    from adaptive_sparse.attention.triton.forward_fp8 import (autotune_configs,
                                                              fp8_block_sparse_attention, keep)

    gen = torch.Generator().manual_seed(D)
    q, k, v, mask = _case(1, 8, 2, 1000, 1000, D, 128, 0.5, gen, "cuda", torch.bfloat16)
    ref = reference_attention(q.double(), k.double(), v.double(), mask, 1 / math.sqrt(D))
    err_bf16 = _rel(triton_block_sparse_attention(q, k, v, mask, 1 / math.sqrt(D)), ref)
    emulated = _emulated(q, k, v, mask, 1 / math.sqrt(D), qk_format)
    args = {"BS": 128, "HEAD_DIM": D, "G": 4, "SHARED": True}
    kept = [c for c in autotune_configs() if keep(c, args)]
    assert kept
    if (qk_format, pv) != ("int8", "chain"):
        kept = kept[:1]
    for c in kept:
        cfg = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        out = torch.full_like(q, float("nan"))
        fp8_block_sparse_attention(q, k, v, mask, 1 / math.sqrt(D), config=cfg, out=out,
                                   qk_format=qk_format, pv_accumulate=pv)
        err = _rel(out, ref)
        assert err < 1e-1 and err < 40 * err_bf16, (cfg, err, err_bf16)
        assert _rel(out, emulated) < 6e-2, cfg


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_int8_qk_beats_e4m3_on_outliers(D):
    """With a K channel bias and a few large channels, int8 Q / K (uniform steps) err less than
    e4m3 (3 mantissa bits on the entries that decide a logit); both fused and torch quantization
    give the same attention."""
    from adaptive_sparse.attention.triton.forward_fp8 import (autotune_configs,
                                                              fp8_block_sparse_attention, keep)

    gen = torch.Generator().manual_seed(40 + D)
    q, k, v, mask = _case(1, 8, 2, 2000, 2000, D, 128, 0.5, gen, "cuda", torch.bfloat16,
                          outliers=True)
    scale = 1 / math.sqrt(D)
    ref = reference_attention(q.double(), k.double(), v.double(), mask, scale)
    c = next(c for c in autotune_configs()
             if keep(c, {"BS": 128, "HEAD_DIM": D, "G": 4, "SHARED": True}))
    cfg = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
    err = {}
    for fmt in ("int8", "e4m3"):
        for method in ("fused", "torch"):
            out = torch.full_like(q, float("nan"))
            fp8_block_sparse_attention(q, k, v, mask, scale, out=out, qk_format=fmt,
                                       quantize=method, config=cfg)
            err[fmt, method] = _rel(out, ref)
        assert abs(err[fmt, "fused"] - err[fmt, "torch"]) < 0.1 * err[fmt, "torch"], err
    assert err["int8", "fused"] < 0.8 * err["e4m3", "fused"], err


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
