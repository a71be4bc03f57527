"""Opt-in FP8 block-sparse attention forward (8-bit Q @ K.T, e4m3 P @ V, fp32 accumulation).

Quantization (`quantize.py`: fused Triton kernels, or the same layout with torch ops), as
SageAttention / SpargeAttn do with 8 bits:
- K is smoothed first (its mean over the keys is subtracted per head and channel; softmax is
  invariant to it because q . mean(K) is constant along each row);
- Q and K are int8 (default: uniform steps, so the large entries that decide a logit keep 0.4%
  precision, where e4m3's 3 mantissa bits give up to 6%) or e4m3 (`qk_format`); Q gets one scale
  per token (free: the kernel scales scores per row anyway), K one per (batch, KV head, key
  block): scale = amax / 127 (int8) or amax / 448 (e4m3);
- V gets one scale per (batch, KV head, channel) and is stored transposed ([D, M], the operand
  order Hopper's 8-bit tensor-core instructions need);
- P = exp2(...) lies in [0, 1]; it is computed 448 times larger (log2(448) folded into the row
  max, no extra multiply) and cast to e4m3; the row sum uses the same scaled values, so the
  factor cancels in acc / l; optionally a fraction of those exponentials is a degree-2
  polynomial on the FMA pipes (`exp2_poly`, relative error 1.7e-3, far below e4m3's 2^-4);
- P @ V accumulates in the MMA across the key tiles (default `pv_accumulate="chain"`), or each
  tile's P @ V starts from zero and is added to the fp32 accumulator (`"tile"`, SageAttention2's
  two-level accumulation, against the fewer accumulator bits of Hopper's 8-bit MMA). On random
  inputs "tile" has the lower error; on Qwen2.5-Coder-0.5B at 32k "chain" kept perplexity
  within 0.1% of SDPA and "tile" did not, and "chain" is faster (benchmarks/RESULTS.md).
The program layout, the block walk and the causal handling are those of `forward.bsa_fwd_kernel`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from adaptive_sparse.attention.triton.forward import (LOG2E, canonical_heads, check_dtype,
                                                      check_head_dim, check_out, exp2_mixed,
                                                      exp2_poly_code, launch, masked_row_max,
                                                      pow2_bucket, program_rows, row_blocks,
                                                      softmax_state, tile_start)
from adaptive_sparse.attention.triton.quantize import quantize_qkv
from adaptive_sparse.errors import fail

DEFAULT_QK_FORMAT = "int8"  # "e4m3": the previous Q @ K.T format (see the module docstring)
DEFAULT_QUANTIZE = "fused"  # "torch": Q, K, V quantized by torch ops instead of Triton kernels
PV_ACCUMULATE = ("tile", "chain")
# "chain" (the MMA accumulates P @ V across tiles) is the default: on the H200 it was the
# fastest int8 path at d=128 (12.49 vs 12.89 ms, 32k dense) and the only one within 0.1% of
# SDPA's perplexity on Qwen2.5-Coder-0.5B at 32k (-0.02%; "tile" +0.19%), benchmarks/RESULTS.md
DEFAULT_PV_ACCUMULATE = "chain"


@contextlib.contextmanager
def fp8_defaults(qk_format: str | None = None, quantize: str | None = None,
                 pv_accumulate: str | None = None):
    """Context: the FP8 path that calls without explicit options take (e.g. a model run under
    `sparse_attention(..., precision="fp8")`); None keeps a default. Restored on exit."""
    global DEFAULT_QK_FORMAT, DEFAULT_QUANTIZE, DEFAULT_PV_ACCUMULATE
    saved = DEFAULT_QK_FORMAT, DEFAULT_QUANTIZE, DEFAULT_PV_ACCUMULATE
    DEFAULT_QK_FORMAT = qk_format or DEFAULT_QK_FORMAT
    DEFAULT_QUANTIZE = quantize or DEFAULT_QUANTIZE
    DEFAULT_PV_ACCUMULATE = pv_accumulate or DEFAULT_PV_ACCUMULATE
    try:
        yield
    finally:
        DEFAULT_QK_FORMAT, DEFAULT_QUANTIZE, DEFAULT_PV_ACCUMULATE = saved



@triton.jit
def bsa_fwd_fp8_kernel(
    Q8, K8, VT8, SQ, SK, SV, O, KV_NUM, KV_IDX,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_km,
    stride_vb, stride_vh, stride_vd,
    stride_ob, stride_oh, stride_om,
    stride_nb, stride_nh, stride_nq,
    stride_ib, stride_ih, stride_iq,
    H_Q, N_Q, N_KV, N_KV16, QB, KB, OFFSET, QK_SCALE, HEADS_PER_MASK, QB_BUCKET, WORK_BUCKET,
    G: tl.constexpr, BS: tl.constexpr, HEAD_DIM: tl.constexpr, SHARED: tl.constexpr,
    CAUSAL: tl.constexpr, DENSE: tl.constexpr, QK_INT8: tl.constexpr, PV_TILE: tl.constexpr,
    EXP2_POLY: tl.constexpr, GH: tl.constexpr, RB: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid, program order (`program_rows`) and tables as `bsa_fwd_kernel`.
    Q8 [B, H_Q, N_Q, D], K8 [B, H_KV, N_KV, D] (int8 when QK_INT8, else e4m3), VT8 e4m3
    [B, H_KV, D, N_KV16]; SQ fp32 [B, H_Q, N_Q] (per token), SK fp32 [B, H_KV, KB] (per key
    block), SV fp32 [B, H_KV, D]; O [B, H_Q, N_Q, D]. PV_TILE: each tile's P @ V starts from
    zero and is added to the fp32 accumulator (SageAttention2's two-level accumulation: Hopper's
    8-bit MMA keeps fewer accumulator bits than fp32); else the MMA accumulates across tiles.
    EXP2_POLY: 1/EXP2_POLY of each tile's exponentials on the FMA pipes (`exp2_mixed`), 0 = none."""
    BLOCK_M: tl.constexpr = GH * RB
    SPLIT: tl.constexpr = BS // BLOCK_N
    b, hk, hm, qb, r0, rows, heads = program_rows(H_Q, HEADS_PER_MASK, G, BS, GH, RB)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < N_Q
    q = tl.load(Q8 + b * stride_qb + heads[:, None] * stride_qh
                + rows.to(tl.int64)[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D] 8-bit
    row_scale = tl.load(SQ + (b * H_Q + heads) * N_Q + rows, mask=row_ok, other=0.0) \
        * QK_SCALE  # [BLOCK_M]
    sk_base = SK + (b * (H_Q // G) + hk) * KB
    k_desc = tl.make_tensor_descriptor(K8 + b * stride_kb + hk * stride_kh,
                                       shape=[N_KV, HEAD_DIM], strides=[stride_km, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(VT8 + b * stride_vb + hk * stride_vh,
                                       shape=[HEAD_DIM, N_KV16], strides=[stride_vd, 1],
                                       block_shape=[HEAD_DIM, BLOCK_N])

    idx_base, n_blk, n_full = row_blocks(KV_NUM, KV_IDX, b, hm, qb, r0, stride_nb, stride_nh,
                                         stride_nq, stride_ib, stride_ih, stride_iq, N_Q, N_KV,
                                         OFFSET, BS, CAUSAL, DENSE)

    m_i, l_i, acc = softmax_state(BLOCK_M, HEAD_DIM)
    for t in range(0, n_full * SPLIT):
        start_n = tile_start(idx_base, t, DENSE, BS, BLOCK_N)
        acc, l_i, m_i = _fp8_tile(acc, l_i, m_i, q, k_desc, v_desc, sk_base, row_scale, start_n,
                                  rows, N_KV, OFFSET, BS, BLOCK_N, False, CAUSAL, QK_INT8,
                                  PV_TILE, BLOCK_M, EXP2_POLY)
    for t in range(n_full * SPLIT, n_blk * SPLIT):
        start_n = tile_start(idx_base, t, DENSE, BS, BLOCK_N)
        acc, l_i, m_i = _fp8_tile(acc, l_i, m_i, q, k_desc, v_desc, sk_base, row_scale, start_n,
                                  rows, N_KV, OFFSET, BS, BLOCK_N, True, CAUSAL, QK_INT8,
                                  PV_TILE, BLOCK_M, EXP2_POLY)

    empty = l_i == 0.0  # no visible key; a NaN row (NaN or inf input) is not empty: NaN out
    l_safe = tl.where(empty, 1.0, l_i)
    sv = tl.load(SV + (b * (H_Q // G) + hk) * HEAD_DIM + offs_d)  # [D]
    o = acc / l_safe[:, None] * sv[None, :]
    tl.store(O + b * stride_ob + heads[:, None] * stride_oh
             + rows.to(tl.int64)[:, None] * stride_om + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _fp8_tile(acc, l_i, m_i, q, k_desc, v_desc, sk_base, row_scale, start_n, rows, N_KV, OFFSET,
              BS: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, QK_INT8: tl.constexpr, PV_TILE: tl.constexpr,
              BLOCK_M: tl.constexpr, EXP2_POLY: tl.constexpr):
    """One key tile: s = (q8 @ k8.T) * sq * sk * scale * log2(e); p = 448 * exp2(s - m)."""
    k = tl.trans(k_desc.load([start_n, 0]))  # [D, BLOCK_N] 8-bit
    if QK_INT8:
        # int32 scores (exact), |s| <= 127^2 * 256 < 2^22: s + 1.5 * 2^23 read as fp32 is
        # exactly 12582912 + s, so an integer add and a float add convert it at full rate
        # (an int-to-float instruction would run at the rate of exp2, the softmax's limit)
        s = (tl.dot(q, k) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        s = tl.dot(q, k)  # [BLOCK_M, BLOCK_N] fp32
    c = row_scale * tl.load(sk_base + start_n // BS)  # [BLOCK_M]
    s, m_new, m_safe = masked_row_max(s, m_i, c, start_n, rows, N_KV, OFFSET, BLOCK_N, MASKED,
                                      CAUSAL)
    p = exp2_mixed(s * c[:, None] - (m_safe - 8.807354922057604)[:, None], BLOCK_M, BLOCK_N,
                   EXP2_POLY, 2)  # 448 * p
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.trans(v_desc.load([0, start_n]))  # [BLOCK_N, D] e4m3
    if PV_TILE:
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v)
    else:
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(tl.float8e4nv), v, acc)
    return acc, l_i, m_new


def autotune_configs():
    out = []
    for block_m, block_n, warps, stages in ((128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3),
                                            (64, 128, 4, 2), (64, 64, 4, 3)):
        for gh in (1, 2, 4, 8):
            out.append(triton.Config({"GH": gh, "RB": block_m // gh, "BLOCK_N": block_n},
                                     num_warps=warps, num_stages=stages))
    return out


def keep(config, args) -> bool:
    """Whether an fp8 config fits: GQA grouping, tile shapes, shared memory (1-byte tiles)."""
    kw = config.kwargs
    gh, rb, block_n = kw["GH"], kw["RB"], kw["BLOCK_N"]
    bs, d = args["BS"], args["HEAD_DIM"]
    if gh != canonical_heads(gh * rb, bs, args["G"], args["SHARED"]):
        return False
    if bs % rb or bs % block_n or rb < 16:
        return False
    return d * (gh * rb + 2 * config.num_stages * block_n) <= 200 * 1024


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    return [c for c in configs if keep(c, args)] or configs[:1]


bsa_fwd_fp8_autotuned = triton.autotune(
    configs=autotune_configs(),
    key=["G", "BS", "HEAD_DIM", "SHARED", "CAUSAL", "DENSE", "QK_INT8", "PV_TILE", "EXP2_POLY",
         "QB_BUCKET", "WORK_BUCKET"],
    prune_configs_by={"early_config_prune": _prune},
)(bsa_fwd_fp8_kernel)


def fp8_block_sparse_attention(q, k, v, mask=None, scale: float | None = None, *,
                               config: dict | None = None, out: torch.Tensor | None = None,
                               blocks_per_row: float | None = None,
                               qk_format: str | None = None, quantize: str | None = None,
                               pv_accumulate: str | None = None, exp2_poly: float | None = None):
    """FP8 block-sparse (or, with mask=None, dense causal at block 128) attention.

    q [B, Hq, N, D], k/v [B, Hkv, M, D] in fp32/fp16/bf16, D in (16, 32, 64, 128, 256); mask a
    `BlockSparseMask` as for `triton_block_sparse_attention`. Inputs are quantized here (module
    docstring): Q and K to `qk_format` ("int8" or "e4m3"; None = DEFAULT_QK_FORMAT), V to e4m3,
    by `quantize` ("fused": Triton kernels, "torch": torch ops; None = DEFAULT_QUANTIZE).
    `pv_accumulate`: "tile" (each tile's P @ V added in fp32) or "chain" (accumulated in the MMA
    across tiles); None = DEFAULT_PV_ACCUMULATE. `exp2_poly`: fraction of the exponentials by
    the polynomial (forward.EXP2_POLY_FRACTIONS; None = forward.DEFAULT_EXP2_POLY). The output
    is in q.dtype (written into `out` when given). `config` pins GH, RB, BLOCK_N, num_warps, num_stages; None autotunes on CUDA
    and uses a small fixed config in the interpreter. Returns out [B, Hq, N, D]."""
    B, Hq, N, D = q.shape
    check_dtype(q)
    check_head_dim(D)
    Hkv, M = k.shape[1], k.shape[2]
    if k.shape != (B, Hkv, M, D) or v.shape != k.shape or Hkv < 1 or Hq % Hkv:
        raise ValueError(f"k, v: expected [B={B}, Hkv dividing {Hq}, M, D={D}], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    qk_format = DEFAULT_QK_FORMAT if qk_format is None else qk_format
    pv_accumulate = DEFAULT_PV_ACCUMULATE if pv_accumulate is None else pv_accumulate
    if pv_accumulate not in PV_ACCUMULATE:
        raise fail("pv_accumulate", f"one of {PV_ACCUMULATE}", pv_accumulate)
    dense = mask is None
    bs = 128 if dense else mask.block_size
    causal = True if dense else mask.causal
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if out is not None:
        check_out(out, q)
    else:
        out = torch.empty(B, Hq, N, D, dtype=q.dtype, device=q.device)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    q8, sq, k8, sk, vt8, sv = quantize_qkv(
        q, k, v, bs, qk_format=qk_format,
        method=DEFAULT_QUANTIZE if quantize is None else quantize)
    if dense:
        num = torch.zeros(1, 1, 1, dtype=torch.int32, device=q.device)
        idx = num[..., None]
        heads_per_mask, shared = Hq, True
    else:
        num, idx = mask.kv_num_blocks.contiguous(), mask.kv_indices.contiguous()
        heads_per_mask, shared = Hq // mask.heads, mask.heads in (1, Hkv)
    qb, kb = triton.cdiv(N, bs), triton.cdiv(M, bs)
    if blocks_per_row is None:
        blocks_per_row = (2 * kb - qb + 1) / 2 if causal else kb
    sn, si = num.stride(), idx.stride()
    args = (q8, k8, vt8, sq, sk, sv, out, num, idx,
            q8.stride(0), q8.stride(1), q8.stride(2),
            k8.stride(0), k8.stride(1), k8.stride(2),
            vt8.stride(0), vt8.stride(1), vt8.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            0 if num.shape[0] == 1 else sn[0], sn[1], sn[2],
            0 if idx.shape[0] == 1 else si[0], si[1], si[2],
            Hq, N, M, vt8.shape[-1], qb, kb, M - N if causal else 0, scale * LOG2E,
            heads_per_mask, pow2_bucket(qb), pow2_bucket(blocks_per_row))
    meta = dict(G=Hq // Hkv, BS=bs, HEAD_DIM=D, SHARED=shared, CAUSAL=causal, DENSE=dense,
                QK_INT8=qk_format == "int8", PV_TILE=pv_accumulate == "tile",
                EXP2_POLY=exp2_poly_code(exp2_poly))
    if config is None and not q.is_cuda:
        block_m = min(64, bs)
        gh = canonical_heads(block_m, bs, Hq // Hkv, shared) or 1
        config = {"GH": gh, "RB": block_m // gh, "BLOCK_N": min(64, bs), "num_warps": 4,
                  "num_stages": 2}
    launch(bsa_fwd_fp8_autotuned, bsa_fwd_fp8_kernel, args, meta, config, qb, B * Hkv)
    return out
