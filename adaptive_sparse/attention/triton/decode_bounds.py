"""A training-free ("Quest"-style) decode selection in one Triton launch: per cache block the
elementwise bounds of its keys, an upper bound of each query head's logit over the block from
them, and a top-k (no host sync, no allocation after the first call at a shape, CUDA-graph
capturable).

For sequence b and KV head h with `n` cached tokens (the new token's key included), the
programs of the row (up to one per CH blocks, about two waves over the SMs in all):
1. the program holding the last block takes the elementwise min and max of that block's real
   keys (the partial block, or the one the new token just filled) and writes them into that
   block's rows of KMIN / KMAX (every earlier block's were written when it was last);
2. each scores its blocks j from the new token's query heads of the group, q_g = q[h*G + g]:
   u[g, j] = scale * sum_d max(q_g[d] * kmax[j, d], q_g[d] * kmin[j, d])  (fp32),
   score[j] = max_g u[g, j], into a scratch row;
3. the row's last program to finish keeps the `top_k` best blocks (sink, last and `local_blocks`
   before it forced, ties to the lower block) and writes FlexAttention's BlockMask layout
   (`decode_select.arrive_and_select`, shared with the decode gate's step).

The eager twin is `adaptive_sparse.gates.decode`'s bounds scores and top-k mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaptive_sparse.attention.triton.decode import _pow2_at_least
from adaptive_sparse.attention.triton.decode_select import (arrive_and_select, chunk_configs,
                                                            last_block_keys, launch, program_row,
                                                            step_buffers)


@triton.jit
def _group_bound(q_row, stride_qh, lo, hi, SCALE, offs_d, G: tl.constexpr):
    """max over the group's G query heads q [D] of SCALE * sum_d max(q * hi, q * lo), the sum
    over the last axis: lo / hi fp32 bounds [D] (a scalar score) or [CH, D] ([CH] scores)."""
    qv = tl.load(q_row + offs_d).to(tl.float32)
    best = tl.sum(tl.maximum(qv * hi, qv * lo), -1) * SCALE
    for g in tl.static_range(1, G):
        qv = tl.load(q_row + g * stride_qh + offs_d).to(tl.float32)
        best = tl.maximum(best, tl.sum(tl.maximum(qv * hi, qv * lo), -1) * SCALE)
    return best


# the cache length and its block count change every step: not specialized (see decode.py)
@triton.jit(do_not_specialize=["N_KV", "KB"])
def decode_bounds_fwd_kernel(
    Q, K, KMIN, KMAX, S, CNT, NUM, IDX, SEQLENS,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_km,
    stride_bb, stride_bh, stride_bk,
    H_KV, N_KV, TOP_K, KB, LOCAL, SCALE, PROGRAMS,
    G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, KB_P2: tl.constexpr,
    CH: tl.constexpr, UNIFORM: tl.constexpr, KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr,
):
    """Grid (B * H_KV, C): program (bh, c) scores its span of row bh's blocks (`program_row`), CH
    at a time; the one holding the last block also bounds it; then `arrive_and_select`.
    Q [B, H_KV * G, D] (last dim contiguous); K [B, H_KV, M, D]; KMIN, KMAX [B, H_KV, cap, D]
    in K's dtype (last dim contiguous, the same strides, cap >= blocks); S fp32 scratch
    [B * H_KV, KB_P2]; CNT int32 [B * H_KV] of zeros; NUM int32 [B, H_KV]; IDX int32
    [B, H_KV, KB] (contiguous); SEQLENS int32 [B] (UNIFORM: every sequence holds N_KV tokens,
    SEQLENS unread). PROGRAMS is an autotune key only."""
    bh, b, h, seqlen, nb, first, end = program_row(SEQLENS, H_KV, N_KV, KB, BS, CH, UNIFORM)
    last = nb - 1
    offs_d = tl.arange(0, D)
    q_row = Q + b * stride_qb + h * G * stride_qh
    lo_row = KMIN + b * stride_bb + h * stride_bh
    hi_row = KMAX + b * stride_bb + h * stride_bh
    s_row = S + bh * KB_P2

    if first < nb:
        s_last = 0.0
        if last < end:  # this program holds the last block: its bounds
            x, valid = last_block_keys(K + b * stride_kb + h * stride_kh, stride_km, nb, seqlen,
                                       offs_d, BS)
            lo = tl.min(tl.where(valid[:, None], x, float("inf")), 0)  # [D]
            hi = tl.max(tl.where(valid[:, None], x, float("-inf")), 0)
            tl.store(lo_row + last * stride_bk + offs_d, lo.to(KMIN.dtype.element_ty))
            tl.store(hi_row + last * stride_bk + offs_d, hi.to(KMAX.dtype.element_ty))
            s_last = _group_bound(q_row, stride_qh, lo, hi, SCALE, offs_d, G)
        for c in range(first, end, CH):
            j = c + tl.arange(0, CH)
            off = j.to(tl.int64)[:, None] * stride_bk + offs_d[None, :]
            earlier = (j < last)[:, None]
            lo = tl.load(lo_row + off, mask=earlier, other=0.0).to(tl.float32)  # [CH, D]
            hi = tl.load(hi_row + off, mask=earlier, other=0.0).to(tl.float32)
            sc = _group_bound(q_row, stride_qh, lo, hi, SCALE, offs_d, G)
            sc = tl.where(j == last, s_last, sc)
            tl.store(s_row + j, sc, mask=j < end)

    arrive_and_select(s_row, CNT, NUM, IDX, bh, nb, TOP_K, KB, LOCAL, KB_P2, KEEP_SINK,
                      KEEP_DIAG)


def _prune(configs, named_args, **kwargs):
    # two fp32 [CH, D] bound tiles per program: at most 16K values (no spills at D 256)
    d = {**named_args, **kwargs}["D"]
    return [c for c in configs if c.kwargs["CH"] * d <= 16384] or configs[:1]


decode_bounds_fwd_autotuned = triton.autotune(
    configs=chunk_configs(), key=["KB_P2", "G", "D", "BS", "UNIFORM", "PROGRAMS"],
    prune_configs_by={"early_config_prune": _prune},
)(decode_bounds_fwd_kernel)


def decode_bounds_select(q: torch.Tensor, k: torch.Tensor, kmin: torch.Tensor,
                         kmax: torch.Tensor, *, top_k: int, block_size: int,
                         scale: float | None = None, cache_seqlens: torch.Tensor | None = None,
                         keep_sink: bool = True, keep_diagonal: bool = True,
                         local_blocks: int = 0, out=None, programs: int | None = None):
    """One bounds-selection step for a layer (see the module docstring).

    q [B, Hq, D] or [B, Hq, 1, D] (post-rotary; bf16, fp16 or fp32); k [B, Hkv, M, D] the
    cache (the new token's key included), Hq = G * Hkv, D a power of two (64, 128, 256 in
    use); kmin, kmax [B, Hkv, cap, D] in k's dtype, cap >= ceil(M / block_size): the
    elementwise key bounds of the complete blocks before each sequence's last one, the last
    block's rows written here; block_size a power of two (16-128 in use); scale: default
    D ** -0.5; cache_seqlens int32 [B] or None (every sequence holds M tokens); top_k: blocks
    per row (forced blocks included); out: optional (kv_num_blocks, kv_indices) buffers;
    programs: programs per row (None: about two waves over the SMs; never changes the result).
    Returns kv_num_blocks int32 [B, Hkv] and kv_indices int32 [B, Hkv, ceil(M / block_size)]
    (FlexAttention's layout: kept blocks ascending, then the rest); no host sync."""
    q, k, kb, kb_p2, scratch, count, num, idx = step_buffers(
        q, k, block_size=block_size, top_k=top_k, programs=programs, out=out)
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q: expected bf16, fp16 or fp32, got {q.dtype}")
    for name, t in (("kmin", kmin), ("kmax", kmax)):
        if t.dtype != k.dtype or t.dim() != 4 or tuple(t.shape[:2]) != (B, Hkv) \
                or t.shape[2] < kb or t.shape[3] != D or t.stride(-1) != 1 \
                or t.stride() != kmin.stride():
            raise ValueError(f"{name}: expected {k.dtype} [{B}, {Hkv}, >= {kb}, {D}] (last dim "
                             f"contiguous, kmin's strides), got {t.dtype} {tuple(t.shape)}")
    uniform = cache_seqlens is None
    args = (q, k, kmin, kmax, scratch, count, num, idx, num if uniform else cache_seqlens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
            kmin.stride(0), kmin.stride(1), kmin.stride(2),
            Hkv, k.shape[2], top_k, kb, local_blocks, float(D ** -0.5 if scale is None else scale),
            _pow2_at_least(B * Hkv))
    meta = dict(G=Hq // Hkv, D=D, BS=block_size, KB_P2=kb_p2, UNIFORM=uniform,
                KEEP_SINK=keep_sink, KEEP_DIAG=keep_diagonal)
    launch(decode_bounds_fwd_kernel, decode_bounds_fwd_autotuned, args, meta, rows=B * Hkv,
           kb=kb, programs=programs, key=(q.dtype, k.dtype, *meta.values(), args[-1]))
    return num, idx
