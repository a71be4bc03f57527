"""Block-sparse split-KV decode attention (flash-decoding) in Triton.

One program per (split, sequence, KV head): it loads the query rows of all G query heads of the
KV head's group (padded to GP >= 16 rows for `tl.dot`), walks its share of the group's selected
cache blocks (a contiguous slice of `kv_indices`, never the whole cache) with an online softmax
in fp32, and writes a partial output and log-sum-exp. The last split of a row to finish (an
atomic arrival count) combines the row's partials by their log-sum-exps in the same launch
(`merge="separate"`: `decode_merge_fwd_kernel`, a launch of its own). With one split the kernel
writes the final output directly. Splits: about two programs per SM, at least 4 blocks
each, sized from the selected blocks per row when the caller knows them
(`blocks_per_row`). After the first call at a shape nothing is allocated and the autotuner is
not consulted (its choice is kept), so a decode step can be captured in a CUDA graph. Tokens
at or past a sequence's length are masked, so ragged batches and the last partial block need
no padding.

Stand-alone: nothing here imports the reference implementation.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
HEAD_DIMS = (16, 32, 64, 128, 256)


# the cache length and the tables' strides (a gate's table is as wide as the cache) change as
# the cache grows: not specialized, or a new token whose count crosses a multiple of 16 would
# compile a new variant in the middle of a generation
@triton.jit(do_not_specialize=["N_KV", "stride_nb", "stride_nh", "stride_ib", "stride_ih"])
def decode_split_fwd_kernel(
    Q, K, V, O, LSE, O_PART, LSE_PART, CNT, SEQLENS, KV_NUM, KV_IDX,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_km,
    stride_vb, stride_vh, stride_vm,
    stride_ob, stride_oh,
    stride_nb, stride_nh,
    stride_ib, stride_ih,
    H_KV, N_KV, QK_SCALE, WORK_BUCKET,
    G: tl.constexpr, GP: tl.constexpr, BS: tl.constexpr, HEAD_DIM: tl.constexpr,
    DENSE: tl.constexpr, DIRECT: tl.constexpr, UNIFORM: tl.constexpr, DOT_PREC: tl.constexpr,
    FUSED: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (splits, B * H_KV). Q/O [B, H_KV * G, (1,) D]; K/V [B, H_KV, M, D]; SEQLENS int32 [B]
    (UNIFORM: every sequence holds N_KV tokens, SEQLENS unread);
    KV_NUM int32 [B, H_KV], KV_IDX int32 [B, H_KV, Kmax] (any strides; ignored when DENSE);
    LSE fp32 [B, H_KV * G]. Not DIRECT: O_PART fp32 [B, H_KV, splits, GP, D] and LSE_PART fp32
    [B, H_KV, splits, GP] (contiguous) receive each split's normalized output and log-sum-exp
    (base 2). Split s walks entries [s * c, (s + 1) * c) of the row's list, c = ceil(count /
    splits). FUSED (not DIRECT): CNT int32 [B * H_KV] (zero between launches): each split
    counts itself in with an atomic add after its partial is stored; the last of a row to
    arrive merges the row's partials into O and LSE and sets the count back to 0, so one
    launch does split and merge. WORK_BUCKET (blocks per split at the table's width) is an
    autotune key only."""
    SUB: tl.constexpr = BS // BLOCK_N
    split = tl.program_id(0)
    n_splits = tl.num_programs(0)
    bh = tl.program_id(1)
    b = (bh // H_KV).to(tl.int64)
    hk = (bh % H_KV).to(tl.int64)
    if UNIFORM:
        seqlen = N_KV
    else:
        seqlen = tl.load(SEQLENS + b)
    if DENSE:
        n_blk = tl.cdiv(seqlen, BS)
    else:
        n_blk = tl.load(KV_NUM + b * stride_nb + hk * stride_nh)
    per_split = tl.cdiv(n_blk, n_splits)  # the splits share the row's actual count
    first = split * per_split
    last = tl.minimum(n_blk, first + per_split)

    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < G
    heads = hk * G + offs_g  # [GP]
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)  # [GP, D]
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    idx_base = KV_IDX + b * stride_ib + hk * stride_ih

    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, HEAD_DIM], dtype=tl.float32)
    for t in range(first * SUB, last * SUB):
        if DENSE:
            kb = t // SUB
        else:
            kb = tl.load(idx_base + t // SUB)
        offs_n = kb * BS + (t % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        valid = (offs_n >= 0) & (offs_n < seqlen)
        rows = offs_n.to(tl.int64)
        k = tl.load(k_base + rows[None, :] * stride_km + offs_d[:, None], mask=valid[None, :],
                    other=0.0)  # [D, BLOCK_N]
        s = tl.dot(q, k, input_precision=DOT_PREC) * QK_SCALE  # [GP, BLOCK_N], base 2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows[:, None] * stride_vm + offs_d[None, :], mask=valid[:, None],
                    other=0.0)  # [BLOCK_N, D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    nonempty = l_i != 0.0  # a NaN row (NaN or inf input) is not empty: NaN out, as the reference
    l_safe = tl.where(nonempty, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse2 = tl.where(nonempty, m_i + tl.math.log2(l_safe), float("-inf"))  # [GP]
    if DIRECT:
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(O.dtype.element_ty), mask=g_ok[:, None])
        tl.store(LSE + b * (H_KV * G) + heads, lse2 * 0.6931471805599453, mask=g_ok)
    else:
        part = (bh * n_splits + split).to(tl.int64)
        tl.store(O_PART + (part * GP + offs_g[:, None]) * HEAD_DIM + offs_d[None, :], o)
        tl.store(LSE_PART + part * GP + offs_g, lse2)
        if FUSED:
            tl.debug_barrier()  # every thread's partial stored before the release below
            arrived = tl.atomic_add(CNT + bh, 1, sem="acq_rel", scope="gpu")
            if arrived == n_splits - 1:  # the row's last split: merge, then reset the count
                _merge_row(O, LSE, O_PART, LSE_PART, b, hk, bh, stride_ob, stride_oh, H_KV,
                           n_splits, G, GP, HEAD_DIM, SPLITS_P2)
                tl.atomic_xchg(CNT + bh, 0, sem="relaxed", scope="gpu")


@triton.jit
def _merge_row(O, LSE, O_PART, LSE_PART, b, hk, bh, stride_ob, stride_oh, H_KV, N_SPLITS,
               G: tl.constexpr, GP: tl.constexpr, HEAD_DIM: tl.constexpr,
               SPLITS_P2: tl.constexpr):
    """Combines the N_SPLITS (<= SPLITS_P2) partial outputs of row (b, hk) by their
    log-sum-exps: the maximum from one load of every split's, then the partials four at a time
    (unrolled, so their loads are in flight together); rows with no selected token get zeros
    and lse -inf. Partials are read past L1 (.cg): other programs wrote them."""
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, SPLITS_P2)
    g_ok = offs_g < G
    base = bh.to(tl.int64) * N_SPLITS
    lses = tl.load(LSE_PART + (base + offs_s[:, None]) * GP + offs_g[None, :],
                   mask=(offs_s < N_SPLITS)[:, None], other=float("-inf"), cache_modifier=".cg")
    m_i = tl.max(lses, 0)  # [GP]
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, N_SPLITS, 4):
        for u in tl.static_range(4):
            ok = ((offs_g * 0 + s0 + u) < N_SPLITS) & g_ok  # [GP]
            part = base + s0 + u
            w = tl.math.exp2(tl.load(LSE_PART + part * GP + offs_g, mask=ok,
                                     other=float("-inf"), cache_modifier=".cg") - m_safe)
            o = tl.load(O_PART + (part * GP + offs_g[:, None]) * HEAD_DIM + offs_d[None, :],
                        mask=ok[:, None], other=0.0, cache_modifier=".cg")
            l_i += w
            acc += w[:, None] * o
    nonempty = l_i != 0.0
    l_safe = tl.where(nonempty, l_i, 1.0)
    heads = hk * G + offs_g
    tl.store(O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=g_ok[:, None])
    lse = tl.where(nonempty, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + b * (H_KV * G) + heads, lse, mask=g_ok)


@triton.jit
def decode_merge_fwd_kernel(
    O, LSE, O_PART, LSE_PART, stride_ob, stride_oh, H_KV, N_SPLITS,
    G: tl.constexpr, GP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    """Grid (B * H_KV,): the merge as a launch of its own (the split kernel not FUSED)."""
    bh = tl.program_id(0)
    b = (bh // H_KV).to(tl.int64)
    hk = (bh % H_KV).to(tl.int64)
    _merge_row(O, LSE, O_PART, LSE_PART, b, hk, bh, stride_ob, stride_oh, H_KV, N_SPLITS,
               G, GP, HEAD_DIM, SPLITS_P2)


def _configs():
    # memory-bound: a few tile / pipelining depths are enough (each config costs a compile)
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in ((64, 4, 2), (64, 4, 3), (64, 8, 3),
                             (128, 4, 2), (128, 8, 2), (128, 8, 3))]


def keep(config, args) -> bool:
    """Whether an autotune config fits: BLOCK_N divides the block size, K/V tiles fit."""
    bn, bs, d = config.kwargs["BLOCK_N"], args["BS"], args["HEAD_DIM"]
    if bs % bn:
        return False
    if bn * d > 128 * 128:
        return False
    return not (d >= 256 and config.num_stages > 2)


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    kept = [c for c in configs if keep(c, args)]
    return kept or [triton.Config({"BLOCK_N": min(64, args["BS"])}, num_warps=4, num_stages=2)]


decode_split_fwd_autotuned = triton.autotune(
    configs=_configs(),
    key=["G", "GP", "BS", "HEAD_DIM", "DENSE", "DIRECT", "UNIFORM", "DOT_PREC", "FUSED",
         "SPLITS_P2", "WORK_BUCKET"],
    prune_configs_by={"early_config_prune": _prune},
)(decode_split_fwd_kernel)


def _pow2_at_least(x: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, (int(x) - 1).bit_length()))


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


def choose_splits(batch: int, kv_heads: int, max_blocks: int, device: torch.device,
                  min_blocks_per_split: int = 4) -> int:
    """Splits per (sequence, KV head): about two programs per SM (two resident at once keep
    more loads in flight on long rows), each split at least `min_blocks_per_split` blocks (at
    small shapes a step is latency-bound: more, shorter splits add partials to merge, not
    bandwidth). Host arithmetic only, no device sync."""
    want = -(-2 * _sm_count(device) // max(1, batch * kv_heads))
    return max(1, min(want, -(-max_blocks // min_blocks_per_split)))


_WORKSPACES: dict[tuple, tuple] = {}


def _workspace(device, rows: int, splits: int, gp: int, d: int):
    """(o_part fp32 [rows, splits, gp, d], lse_part fp32 [rows, splits, gp], count int32 [rows]
    of zeros), kept per device and shape: a decode step allocates nothing after its first call
    at a shape (so it can be captured in a CUDA graph), and layers share the buffers (launches
    on one stream run in order; a caller running decode steps concurrently on several streams
    must pass its own via `workspace=`). The fused merge leaves the counts at zero."""
    key = (device, rows, splits, gp, d)
    ws = _WORKSPACES.get(key)
    if ws is None:
        if len(_WORKSPACES) > 64:
            _WORKSPACES.clear()
        ws = (torch.empty(rows, splits, gp, d, dtype=torch.float32, device=device),
              torch.empty(rows, splits, gp, dtype=torch.float32, device=device),
              torch.zeros(rows, dtype=torch.int32, device=device))
        _WORKSPACES[key] = ws
    return ws


_BEST: dict[tuple, dict] = {}


def _launch(grid, args, meta, key) -> None:
    """The split kernel with the autotuned configuration of `key`, tuned on its first call
    (later calls skip the autotuner's per-call argument handling)."""
    cfg = _BEST.get(key)
    if cfg is None:
        decode_split_fwd_autotuned[grid](*args, **meta)
        best = decode_split_fwd_autotuned.best_config
        _BEST[key] = cfg = {**best.kwargs, "num_warps": best.num_warps,
                            "num_stages": best.num_stages}
        return
    decode_split_fwd_kernel[grid](*args, **meta, **cfg)


def triton_sparse_decode(q, k_cache, v_cache, cache_seqlens, kv_num_blocks, kv_indices, *,
                         block_size: int, scale: float, out=None, num_splits: int | None = None,
                         config: dict | None = None, merge: str = "fused", lse=None,
                         workspace=None, blocks_per_row: float | None = None):
    """Split-KV decode over the selected cache blocks.

    q [B, Hq, D] or [B, Hq, 1, D] (last dim contiguous), k/v [B, Hkv, M, D]; cache_seqlens int32
    [B] or None (every sequence holds M tokens); kv_num_blocks int32 [B|1, Hkv|1] and kv_indices
    int32 [B|1, Hkv|1, Kmax] (any strides; size-1 leading dims broadcast), or both None for
    dense decode. out: optional buffer shaped like q in q's dtype. config pins {"BLOCK_N",
    "num_warps", "num_stages"}; None autotunes on CUDA (a fixed small config in the
    interpreter). merge: "fused" (the last split of a row merges, one launch) or "separate"
    (a merge launch of its own). lse: optional fp32 [B, Hq] buffer; workspace: optional
    (o_part, lse_part, count) as `_workspace` makes them (default: shared per shape). Returns
    (out shaped like q, lse fp32 [B, Hq], natural log). blocks_per_row: the blocks a row
    selects, as known on the host (e.g. a uniform top-k; a mask's `blocks_per_row`): sizes the
    splits (None: the table's width, which a gate's [B, Hkv, Kb] table makes the whole cache);
    any value is exact, the splits share each row's actual count. No host-device sync; after the first
    call at a shape no allocation unless out / lse are None (CUDA-graph capturable)."""
    B, Hq, D = q.shape[0], q.shape[1], q.shape[-1]
    Hkv, M = k_cache.shape[1], k_cache.shape[2]
    if D not in HEAD_DIMS:
        raise ValueError(f"q: expected head_dim in {HEAD_DIMS} for the triton backend, got {D}")
    G = Hq // Hkv
    GP = _pow2_at_least(G, 16)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if v_cache.stride(-1) != 1:
        v_cache = v_cache.contiguous()
    dense = kv_indices is None
    if dense:
        kv_num_blocks = kv_indices = k_cache  # unread
        max_blocks = -(-M // block_size)
        sn = si = (0, 0)
    else:
        if kv_indices.stride(2) != 1:
            kv_indices = kv_indices.contiguous()
        max_blocks = kv_indices.shape[2]
        if blocks_per_row is not None:
            max_blocks = max(1, min(max_blocks, math.ceil(blocks_per_row)))
        sn = tuple(0 if n == 1 else st for n, st in zip(kv_num_blocks.shape,
                                                         kv_num_blocks.stride()))
        si = tuple(0 if n == 1 else st for n, st in zip(kv_indices.shape[:2],
                                                         kv_indices.stride()[:2]))
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.stride(-1) != 1:
        raise ValueError(f"out: expected a last-dim stride of 1, got strides {out.stride()}")
    if merge not in ("fused", "separate"):
        raise ValueError(f"merge: expected 'fused' or 'separate', got {merge!r}")
    if lse is None:
        lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    splits = num_splits if num_splits is not None else choose_splits(B, Hkv, max_blocks, q.device)
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"num_splits: expected a positive int, got {num_splits!r}")
    per_split = max(1, -(-max_blocks // splits))
    splits = max(1, -(-max_blocks // per_split))  # no split that is empty at full width
    direct = splits == 1
    if direct:
        o_part = lse_part = count = lse
    else:
        o_part, lse_part, count = workspace if workspace is not None else \
            _workspace(q.device, B * Hkv, splits, GP, D)
    fused = merge == "fused" and not direct
    uniform = cache_seqlens is None
    args = (q, k_cache, v_cache, out, lse, o_part, lse_part, count,
            lse if uniform else cache_seqlens, kv_num_blocks, kv_indices,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1), sn[0], sn[1], si[0], si[1],
            Hkv, M, float(scale) * LOG2E, _pow2_at_least(per_split))
    meta = dict(G=G, GP=GP, BS=block_size, HEAD_DIM=D, DENSE=dense, DIRECT=direct,
                UNIFORM=uniform, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                FUSED=fused, SPLITS_P2=_pow2_at_least(splits))
    grid = (splits, B * Hkv)
    if config is None and not q.is_cuda:
        config = {"BLOCK_N": min(64, block_size), "num_warps": 4, "num_stages": 2}
    if config is None:
        _launch(grid, args, meta, (q.dtype, *meta.values(), args[-1]))
    else:
        decode_split_fwd_kernel[grid](*args, **meta, **config)
    if not direct and not fused:
        decode_merge_fwd_kernel[(B * Hkv,)](out, lse, o_part, lse_part, out.stride(0),
                                            out.stride(1), Hkv, splits, G=G, GP=GP,
                                            HEAD_DIM=D, SPLITS_P2=meta["SPLITS_P2"],
                                            num_warps=4)
    return out, lse
