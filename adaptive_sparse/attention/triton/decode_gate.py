"""The decode gate's whole per-token step in one Triton launch (no host sync, no allocation
after the first call at a shape, CUDA-graph capturable).

For sequence b and KV head h with `n` cached tokens (the new token's key included), the
programs of the row (up to one per CH blocks, about two waves over the SMs in all, so a
row's scoring is spread over several SMs):
1. the program holding the last block pools the keys of the cache's last block (the partial
   one, or the block the new token just filled: max / min / avg over its real tokens,
   `poolings` order) and projects them, `kg = cat(poolings) @ wk[h]` [GD], writing that row of
   the key-feature buffer KG (every earlier block was written when it was last);
2. each program projects the new token's query heads of the group, `qg = cat(q[h*G:(h+1)*G]) @
   wq[h] * q_scale` [GD] (wq from L2 after the first);
3. each scores its blocks, `qg . kg_j` (block j < last read from KG, the last one from step 1),
   into a scratch row;
4. the row's last program to finish (an atomic arrival count) keeps the `top_k` best blocks
   (the sink block 0, the last block and the `local_blocks` blocks before it forced; a tie at
   the k-th score resolved by the lower block number, so exactly min(top_k, blocks) are kept)
   and writes them ascending to IDX, their count to NUM, then the other block numbers
   ascending (FlexAttention's BlockMask layout).

It is `adaptive_sparse.gates.decode`'s `DecodeKeyCache.update` + `DecodeGate.scores` +
`select_decode_blocks` (a "top_k" policy) fused; that eager path is the tests' reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaptive_sparse.attention.triton.decode import _pow2_at_least
from adaptive_sparse.attention.triton.decode_select import (arrive_and_select, chunk_configs,
                                                            last_block_keys, launch, program_row,
                                                            step_buffers)

POOLINGS = ("avg", "max", "min")


# the cache length and its block count change every step: not specialized (see decode.py)
@triton.jit(do_not_specialize=["N_KV", "KB"])
def decode_gate_fwd_kernel(
    Q, K, WQ, WK, KG, S, CNT, NUM, IDX, SEQLENS,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_km,
    stride_gb, stride_gh, stride_gk,
    H_KV, N_KV, TOP_K, KB, LOCAL, Q_SCALE, PROGRAMS,
    G: tl.constexpr, D: tl.constexpr, GD: tl.constexpr, GD_P2: tl.constexpr,
    BS: tl.constexpr, KB_P2: tl.constexpr, CH: tl.constexpr, P: tl.constexpr,
    AVG: tl.constexpr, MAX: tl.constexpr, MIN: tl.constexpr, UNIFORM: tl.constexpr,
    KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr,
):
    """Grid (B * H_KV, C), C <= ceil(KB / CH): program (bh, c) scores blocks [c * span, (c + 1) *
    span) of row bh, span = ceil(ceil(KB / CH) / C) * CH, CH at a time (the one holding the last
    block also pools and projects it); the last program of the row to finish (an atomic arrival count in CNT, reset to 0 after) selects. Q [B, H_KV * G, D]
    (last dim contiguous); K [B, H_KV, M, D] (last dim contiguous); WQ fp32 [H_KV, G * D, GD],
    WK fp32 [H_KV, P * D, GD] (contiguous); KG fp32 [B, H_KV, cap, GD] (last dim contiguous,
    cap >= blocks); S fp32 scratch [B * H_KV, KB_P2]; CNT int32 [B * H_KV] of zeros; NUM int32
    [B, H_KV]; IDX int32 [B, H_KV, KB] (contiguous, KB <= KB_P2: the blocks of the longest
    sequence); SEQLENS int32 [B] (UNIFORM: every sequence holds N_KV tokens, SEQLENS unread).
    PROGRAMS (a power of two at least B * H_KV) is an autotune key only."""
    bh, b, h, seqlen, nb, first, end = program_row(SEQLENS, H_KV, N_KV, KB, BS, CH, UNIFORM)
    last = nb - 1
    offs_d = tl.arange(0, D)
    offs_o = tl.arange(0, GD_P2)
    o_ok = offs_o < GD
    w_mask = o_ok[None, :]
    kg_row = KG + b * stride_gb + h * stride_gh
    s_row = S + bh * KB_P2

    if first < nb:
        # the group's query projection
        qg = tl.zeros([GD_P2], dtype=tl.float32)
        wq = WQ + h * (G * D * GD) + offs_d[:, None] * GD + offs_o[None, :]
        for g in tl.static_range(G):
            qv = tl.load(Q + b * stride_qb + (h * G + g) * stride_qh + offs_d).to(tl.float32)
            qg += tl.sum(qv[:, None] * tl.load(wq + g * D * GD, mask=w_mask, other=0.0), 0)
        qg = qg * Q_SCALE
        s_last = 0.0
        if last < end:  # this program holds the last block: its key features
            x, valid = last_block_keys(K + b * stride_kb + h * stride_kh, stride_km, nb, seqlen,
                                       offs_d, BS)
            wk = WK + h * (P * D * GD) + offs_d[:, None] * GD + offs_o[None, :]
            kg = tl.zeros([GD_P2], dtype=tl.float32)
            if AVG >= 0:
                pooled = tl.sum(x, 0) / (seqlen - last * BS).to(tl.float32)
                kg += tl.sum(pooled[:, None] * tl.load(wk + AVG * D * GD, mask=w_mask, other=0.0),
                             0)
            if MAX >= 0:
                pooled = tl.max(tl.where(valid[:, None], x, float("-inf")), 0)
                kg += tl.sum(pooled[:, None] * tl.load(wk + MAX * D * GD, mask=w_mask, other=0.0),
                             0)
            if MIN >= 0:
                pooled = tl.min(tl.where(valid[:, None], x, float("inf")), 0)
                kg += tl.sum(pooled[:, None] * tl.load(wk + MIN * D * GD, mask=w_mask, other=0.0),
                             0)
            tl.store(kg_row + last * stride_gk + offs_o, kg, mask=o_ok)
            s_last = tl.sum(kg * qg, 0)
        for c in range(first, end, CH):
            j = c + tl.arange(0, CH)
            kgc = tl.load(kg_row + j.to(tl.int64)[:, None] * stride_gk + offs_o[None, :],
                          mask=(j < last)[:, None] & w_mask, other=0.0)  # [CH, GD_P2]
            sc = tl.where(j == last, s_last, tl.sum(kgc * qg[None, :], 1))
            tl.store(s_row + j, sc, mask=j < end)

    arrive_and_select(s_row, CNT, NUM, IDX, bh, nb, TOP_K, KB, LOCAL, KB_P2, KEEP_SINK,
                      KEEP_DIAG)


decode_gate_fwd_autotuned = triton.autotune(
    configs=chunk_configs(), key=["KB_P2", "G", "D", "GD", "BS", "P", "UNIFORM", "PROGRAMS"],
)(decode_gate_fwd_kernel)


def decode_gate_select(q: torch.Tensor, k_cache: torch.Tensor, wq: torch.Tensor,
                       wk: torch.Tensor, kg: torch.Tensor, *, top_k: int, block_size: int,
                       poolings, q_scale: float, cache_seqlens: torch.Tensor | None = None,
                       keep_sink: bool = True, keep_diagonal: bool = True,
                       local_blocks: int = 0, out=None, programs: int | None = None):
    """One decode-gate step for a layer (see the module docstring).

    q [B, Hq, D] or [B, Hq, 1, D] (post-rotary, any float dtype); k_cache [B, Hkv, M, D] (the
    new token's key included); wq fp32 [Hkv, G * D, GD], wk fp32 [Hkv, len(poolings) * D, GD];
    kg fp32 [B, Hkv, cap, GD] with cap >= ceil(M / block_size): the projected key features of
    the complete blocks before the last one, the last block's row written here;
    cache_seqlens int32 [B] or None (every sequence holds M tokens); top_k: blocks per row
    (forced blocks included); out: optional (kv_num_blocks, kv_indices) buffers to write;
    programs: programs per row (None: about two waves over the SMs; 1: a row's whole step in
    one program, no arrival count across programs; never changes the result).
    Returns (kv_num_blocks int32 [B, Hkv], kv_indices int32 [B, Hkv, ceil(M / block_size)]:
    the kept blocks ascending, then the others ascending). Reads no value on the host."""
    q, k_cache, kb, kb_p2, scratch, count, num, idx = step_buffers(
        q, k_cache, block_size=block_size, top_k=top_k, programs=programs, out=out)
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G, GD = Hq // Hkv, wq.shape[-1]
    poolings = tuple(poolings)
    if tuple(wq.shape) != (Hkv, G * D, GD) or tuple(wk.shape) != (Hkv, len(poolings) * D, GD):
        raise ValueError(f"wq, wk: expected [{Hkv}, {G * D}, GD] and [{Hkv}, "
                         f"{len(poolings) * D}, GD], got {tuple(wq.shape)}, {tuple(wk.shape)}")
    if kg.dtype != torch.float32 or kg.dim() != 4 or tuple(kg.shape[:2]) != (B, Hkv) \
            or kg.shape[2] < kb or kg.shape[3] != GD or kg.stride(-1) != 1:
        raise ValueError(f"kg: expected float32 [{B}, {Hkv}, >= {kb}, {GD}] (last dim "
                         f"contiguous), got {kg.dtype} {tuple(kg.shape)}")
    if wq.dtype != torch.float32 or not wq.is_contiguous():
        wq = wq.float().contiguous()
    if wk.dtype != torch.float32 or not wk.is_contiguous():
        wk = wk.float().contiguous()
    slot = {p: (poolings.index(p) if p in poolings else -1) for p in POOLINGS}
    uniform = cache_seqlens is None
    args = (q, k_cache, wq, wk, kg, scratch, count, num, idx,
            num if uniform else cache_seqlens,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            kg.stride(0), kg.stride(1), kg.stride(2),
            Hkv, k_cache.shape[2], top_k, kb, local_blocks, float(q_scale), _pow2_at_least(B * Hkv))
    meta = dict(G=G, D=D, GD=GD, GD_P2=_pow2_at_least(GD), BS=block_size,
                KB_P2=kb_p2, P=len(poolings), AVG=slot["avg"], MAX=slot["max"],
                MIN=slot["min"], UNIFORM=uniform, KEEP_SINK=keep_sink, KEEP_DIAG=keep_diagonal)
    launch(decode_gate_fwd_kernel, decode_gate_fwd_autotuned, args, meta, rows=B * Hkv, kb=kb,
           programs=programs, key=(q.dtype, k_cache.dtype, *meta.values(), args[-1]))
    return num, idx
