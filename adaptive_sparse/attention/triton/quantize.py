"""8-bit quantization of Q, K and V for the FP8 forward (`forward_fp8.py`), fused in Triton.

Layouts (what `bsa_fwd_fp8_kernel` reads directly):
- Q: x8 [B, Hq, N, D] (int8 or e4m3) and one fp32 scale per token, sq [B, Hq, N];
- K: smoothed first (its mean over the keys is subtracted per (batch, KV head, channel): softmax
  is invariant to it, q . mean(K) being constant along a row), then x8 [B, Hkv, M, D] and one
  scale per (batch, KV head, key block of `block` rows), sk [B, Hkv, ceil(M / block)];
- V: e4m3, transposed and padded with zeros to 16 keys, vt8 [B, Hkv, D, M16] (the operand order
  of Hopper's 8-bit tensor-core instructions), one scale per (batch, KV head, channel) sv
  [B, Hkv, D].
scale = amax / R with R = 127 (int8, round to nearest) or 448 (e4m3), so x ~= x8 * scale.

`quantize_qkv(..., method="fused")` runs three Triton launches (K/V column statistics, then Q
and K rows, then V); `method="torch"` computes the same layout with torch ops (the reference of
the tests, and the fallback).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaptive_sparse.errors import fail

E4M3_MAX = 448.0
INT8_MAX = 127.0
QK_FORMATS = ("int8", "e4m3")
METHODS = ("fused", "torch")
MIN_SCALE = 1e-12  # scale floor: an all-zero block quantizes to zeros, never to NaN


def _qk_dtype(fmt: str) -> torch.dtype:
    return torch.int8 if fmt == "int8" else torch.float8_e4m3fn


# ---------------------------------------------------------------- torch reference / fallback

def _to_8bit(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """x / scale (fp32) cast to int8 (round half away from zero, as the kernel) or e4m3."""
    y = x / scale
    if fmt == "int8":
        return torch.trunc(y + torch.where(y >= 0, 0.5, -0.5)).clamp_(-INT8_MAX, INT8_MAX) \
            .to(torch.int8)
    return y.to(torch.float8_e4m3fn)


def quantize_rows_torch(x: torch.Tensor, fmt: str, *, block: int | None = None,
                        mean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - mean) [B, H, N, D] to `fmt` with one scale per token (block None, scale [B, H, N])
    or per block of `block` tokens (scale [B, H, ceil(N / block)]); mean [B, H, D] or None."""
    B, H, N, D = x.shape
    xf = x.float()
    if mean is not None:
        xf = xf - mean[:, :, None, :]
    rmax = INT8_MAX if fmt == "int8" else E4M3_MAX
    if block is None:
        scale = (xf.abs().amax(-1) / rmax).clamp_min(MIN_SCALE)  # [B, H, N]
        return _to_8bit(xf, scale[..., None], fmt).contiguous(), scale.contiguous()
    nb = -(-N // block)
    pad = nb * block - N
    xp = torch.nn.functional.pad(xf, (0, 0, 0, pad)) if pad else xf
    amax = xp.view(B, H, nb, block, D).abs().amax(dim=(-1, -2))  # [B, H, nb]
    scale = (amax / rmax).clamp_min(MIN_SCALE)
    full = scale.repeat_interleave(block, -1)[..., :N, None]
    return _to_8bit(xf, full, fmt).contiguous(), scale.contiguous()


def quantize_v_torch(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 V transposed and padded to 16 keys: (vt8 [B, H, D, M16], scale [B, H, D])."""
    B, H, M, D = v.shape
    scale = (v.float().abs().amax(dim=2) / E4M3_MAX).clamp_min(MIN_SCALE)  # [B, H, D]
    m16 = -(-M // 16) * 16
    vt = torch.zeros(B, H, D, m16, dtype=torch.float8_e4m3fn, device=v.device)
    vt[..., :M] = (v.float() / scale[:, :, None, :]).transpose(-1, -2).to(torch.float8_e4m3fn)
    return vt, scale.contiguous()


# ---------------------------------------------------------------- fused (Triton)

@triton.jit
def kv_stats_kernel(K, V, KSUM, VMAX, stride_kb, stride_kh, stride_km, stride_vb, stride_vh,
                    stride_vm, H_KV, N_KV, CHUNK, S,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (S, B * H_KV): program (s, bh) reduces keys [s * CHUNK, (s + 1) * CHUNK) of one
    (batch, KV head): KSUM[bh, s, :] = sum of K over them (fp32), VMAX[bh, s, :] = max |V|."""
    s = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H_KV).to(tl.int64)
    h = (bh % H_KV).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    ksum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    vmax = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for r0 in range(s * CHUNK, tl.minimum(s * CHUNK + CHUNK, N_KV), BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        ok = (rows < N_KV)[:, None]
        k = tl.load(K + b * stride_kb + h * stride_kh + rows.to(tl.int64)[:, None] * stride_km
                    + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        v = tl.load(V + b * stride_vb + h * stride_vh + rows.to(tl.int64)[:, None] * stride_vm
                    + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        ksum += tl.sum(k, 0)
        vmax = tl.maximum(vmax, tl.max(tl.abs(v), 0))
    out = (bh.to(tl.int64) * S + s) * HEAD_DIM + offs_d
    tl.store(KSUM + out, ksum)
    tl.store(VMAX + out, vmax)


@triton.jit
def _round_int8(y):
    """y (already divided by its scale, |y| <= 127) to int8, nearest, half away from 0. (The
    e4m3 cast is inline at the call site: one helper returning int8 or e4m3 by a constexpr flag
    does not compile on Triton 3.6, which unifies the return types of both branches.)"""
    y = tl.where(y >= 0, y + 0.5, y - 0.5)
    return tl.minimum(tl.maximum(y, -127.0), 127.0).to(tl.int8)


@triton.jit
def quantize_rows_kernel(X, MEAN, X8, SCALE, stride_xb, stride_xh, stride_xm, H, N, NB, RMAX,
                         HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PER_ROW: tl.constexpr,
                         SMOOTH: tl.constexpr, INT8: tl.constexpr):
    """Grid (ceil(N / BLOCK), B * H): rows [i * BLOCK, (i + 1) * BLOCK) of one (batch, head),
    minus MEAN[b, h, :] when SMOOTH, to X8 (contiguous [B, H, N, D]) with SCALE fp32 [B, H, N]
    (PER_ROW) or [B, H, NB] (one per block of BLOCK rows)."""
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = i * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (rows < N)[:, None]
    x = tl.load(X + b * stride_xb + h * stride_xh + rows.to(tl.int64)[:, None] * stride_xm
                + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    if SMOOTH:
        mean = tl.load(MEAN + bh * HEAD_DIM + offs_d)
        x = tl.where(ok, x - mean[None, :], 0.0)
    nan = tl.sum((x != x).to(tl.int32), 1) > 0  # max ignores NaN; int8 would drop it: NaN scale
    if PER_ROW:
        scale = tl.maximum(tl.max(tl.abs(x), 1) / RMAX, 1e-12)  # [BLOCK]
        scale = tl.where(nan, float("nan"), scale)
        y = x / scale[:, None]
        tl.store(SCALE + bh * N + rows, scale, mask=rows < N)
    else:
        scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0) / RMAX, 1e-12)
        scale = tl.where(tl.max(nan.to(tl.int32), 0) > 0, float("nan"), scale)
        y = x / scale
        tl.store(SCALE + bh * NB + i, scale)
    dst = X8 + bh * N * HEAD_DIM + rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    if INT8:
        tl.store(dst, _round_int8(y), mask=ok)
    else:
        tl.store(dst, y.to(tl.float8e4nv), mask=ok)


@triton.jit
def quantize_vt_kernel(V, SV, VT8, stride_vb, stride_vh, stride_vm, H, M, M16,
                       HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (ceil(M16 / BLOCK), B * H): keys [i * BLOCK, (i + 1) * BLOCK) of one (batch, KV head)
    divided by SV[b, h, :] (per channel), e4m3, stored transposed into VT8 (contiguous
    [B, H, D, M16]); keys M..M16 get zeros."""
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    keys = i * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    v = tl.load(V + b * stride_vb + h * stride_vh + keys.to(tl.int64)[None, :] * stride_vm
                + offs_d[:, None], mask=(keys < M)[None, :], other=0.0).to(tl.float32)  # [D, BLOCK]
    sv = tl.load(SV + bh * HEAD_DIM + offs_d)
    tl.store(VT8 + (bh * HEAD_DIM + offs_d[:, None]) * M16 + keys[None, :],
             (v / sv[:, None]).to(tl.float8e4nv), mask=(keys < M16)[None, :])


def _rows_block(d: int) -> int:
    return 64 if d >= 256 else 128  # a [BLOCK, D] fp32 tile of at most 64 KiB in registers


def _warps(block: int, d: int) -> int:
    return 8 if block * d >= 128 * 128 else 4


def _stats(k, v, block: int):
    """(mean of K over the keys, max |V| over the keys), both fp32 [B, Hkv, D]: one launch of
    `kv_stats_kernel` over S splits of the keys, then a sum / max over S (tiny)."""
    B, H, M, D = k.shape
    tiles = triton.cdiv(M, block)
    splits = max(1, min(tiles, triton.cdiv(1024, B * H)))  # about 1024 programs in all
    chunk = triton.cdiv(tiles, splits) * block
    splits = triton.cdiv(M, chunk)
    ksum = torch.empty(B * H, splits, D, dtype=torch.float32, device=k.device)
    vmax = torch.empty_like(ksum)
    kv_stats_kernel[(splits, B * H)](
        k, v, ksum, vmax, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), H, M, chunk, splits, HEAD_DIM=D, BLOCK=block, num_warps=_warps(block, D))
    return (ksum.sum(1) / M).view(B, H, D), vmax.amax(1).view(B, H, D)


def _rows_fused(x, fmt: str, block: int, per_row: bool, mean=None):
    B, H, N, D = x.shape
    nb = triton.cdiv(N, block)
    x8 = torch.empty(B, H, N, D, dtype=_qk_dtype(fmt), device=x.device)
    scale = torch.empty(B, H, N if per_row else nb, dtype=torch.float32, device=x.device)
    quantize_rows_kernel[(nb, B * H)](
        x, x if mean is None else mean, x8, scale, x.stride(0), x.stride(1), x.stride(2), H, N,
        nb, INT8_MAX if fmt == "int8" else E4M3_MAX, HEAD_DIM=D, BLOCK=block, PER_ROW=per_row,
        SMOOTH=mean is not None, INT8=fmt == "int8", num_warps=_warps(block, D))
    return x8, scale


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, *,
                 qk_format: str = "int8", method: str = "fused"):
    """(q8, sq, k8, sk, vt8, sv) in the layout of the module docstring; `block` is the key block
    of K's scales (the mask's block size). q [B, Hq, N, D], k/v [B, Hkv, M, D] with the last
    dimension contiguous, fp32/fp16/bf16."""
    if qk_format not in QK_FORMATS:
        raise fail("qk_format", f"one of {QK_FORMATS}", qk_format)
    if method not in METHODS:
        raise fail("quantize", f"one of {METHODS}", method)
    if method == "torch":
        q8, sq = quantize_rows_torch(q, qk_format)
        k8, sk = quantize_rows_torch(k, qk_format, block=block,
                                     mean=k.float().mean(dim=2))
        vt8, sv = quantize_v_torch(v)
        return q8, sq, k8, sk, vt8, sv
    D, M = q.shape[-1], k.shape[2]
    rb = _rows_block(D)
    kmean, vmax = _stats(k, v, rb)
    q8, sq = _rows_fused(q, qk_format, rb, True)
    k8, sk = _rows_fused(k, qk_format, block, False, kmean)
    sv = (vmax / E4M3_MAX).clamp_min_(MIN_SCALE)
    B, H = v.shape[:2]
    m16 = triton.cdiv(M, 16) * 16
    vt8 = torch.empty(B, H, D, m16, dtype=torch.float8_e4m3fn, device=v.device)
    vb = 64 if D >= 256 else 128
    quantize_vt_kernel[(triton.cdiv(m16, vb), B * H)](
        v, sv, vt8, v.stride(0), v.stride(1), v.stride(2), H, M, m16, HEAD_DIM=D, BLOCK=vb,
        num_warps=_warps(vb, D))
    return q8, sq, k8, sk, vt8, sv
