"""Block-sparse attention forward in Triton.

Each program owns BLOCK_M query rows of one query block: `GH` query heads of one KV group times
`RB` rows (GH > 1 only when the mask is shared by the group, so one K/V tile load serves GH
heads). It walks the first `kv_num_blocks` entries of its row of `kv_indices` (never the whole
key range), with an online softmax in fp32. Tiles that need no masking run first; the at most two
tiles crossed by the causal diagonal or by the end of the keys run last with the mask applied.
Causal masks are end-aligned: query row i sits at position i + kv_len - q_len.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from adaptive_sparse.errors import fail

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
HEAD_DIMS = (16, 32, 64, 128, 256)
# Fractions of each score tile's exponentials computed by `poly_exp2` on the FMA/ALU pipes
# instead of MUFU (FlashAttention-4's split): kernel constexpr EXP2_POLY = 1 / fraction, 0 = none
EXP2_POLY_FRACTIONS = (0.0, 0.125, 0.25, 0.5, 1.0)
DEFAULT_EXP2_POLY = 0.0  # off until measured faster (benchmarks/attention.py --exp2-poly)


def exp2_poly_code(fraction: float | None) -> int:
    """The kernels' EXP2_POLY constexpr for `fraction` (None: DEFAULT_EXP2_POLY): 0 (every
    exponential on MUFU) or 1 / fraction."""
    fraction = DEFAULT_EXP2_POLY if fraction is None else float(fraction)
    if fraction not in EXP2_POLY_FRACTIONS:
        raise fail("exp2_poly", f"one of {EXP2_POLY_FRACTIONS}", fraction)
    return 0 if fraction == 0 else round(1 / fraction)


@contextlib.contextmanager
def exp2_poly(fraction: float):
    """Context: calls without an explicit `exp2_poly` (the bf16 and FP8 forwards) compute this
    fraction of their exponentials with `poly_exp2`. Restored on exit."""
    global DEFAULT_EXP2_POLY
    exp2_poly_code(fraction)
    saved, DEFAULT_EXP2_POLY = DEFAULT_EXP2_POLY, float(fraction)
    try:
        yield
    finally:
        DEFAULT_EXP2_POLY = saved


@triton.jit
def poly_exp2(x, DEGREE: tl.constexpr):
    """2^x for fp32 x <= 127 without MUFU (Cody-Waite, as FlashAttention-4): x = j + f with j
    the nearest integer (no floor or convert instruction: adding 1.5 * 2^23 rounds x and leaves
    j in the low mantissa bits), 2^f by a minimax polynomial on [-1/2, 1/2] (relative error
    7.5e-5 at DEGREE 3, 1.7e-3 at 2), times 2^j built from its exponent bits. x <= -126.5
    (-inf included) gives exactly 0; NaN gives NaN. Every instruction runs on the FMA/ALU pipes."""
    y = tl.maximum(x, -127.0, propagate_nan=tl.PropagateNan.ALL)
    t = y + 12582912.0  # bits: 0x4B400000 + j
    f = y - (t - 12582912.0)  # [-1/2, 1/2]
    if DEGREE == 2:
        p = (0.23842687878783758 * f + 0.7034440115285789) * f + 1.000442977902744
    else:
        p = ((0.05517145254343397 * f + 0.2426106146360834) * f + 0.6932609740136066) * f \
            + 0.9999281043742452
    # 2^j = bits (j + 127) << 23; j = -127 gives +0.0
    two_j = ((t.to(tl.int32, bitcast=True) - (0x4B400000 - 127)) << 23).to(tl.float32,
                                                                           bitcast=True)
    return p * two_j


@triton.jit
def _exp2_chunks(x, BLOCK_M: tl.constexpr, W: tl.constexpr, POLY: tl.constexpr,
                 DEGREE: tl.constexpr):
    """exp2 of x [BLOCK_M, W] (column w = 4 * chunk + lane) with 1/POLY of it polynomial: chunks
    of even index on MUFU, odd chunks recursively split again (POLY 2: all polynomial)."""
    xr = tl.permute(tl.reshape(x, [BLOCK_M, W // 8, 2, 4]), (0, 1, 3, 2))  # [BM, W/8, 4, 2]
    lo, hi = tl.split(xr)  # [BM, W/8, 4] each
    lo = tl.math.exp2(lo)
    if POLY == 2:
        hi = poly_exp2(hi, DEGREE)
    else:
        hi = tl.reshape(_exp2_chunks_last(tl.reshape(hi, [BLOCK_M, W // 2]), BLOCK_M, W // 2,
                                          DEGREE), [BLOCK_M, W // 8, 4])
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 3, 2)), [BLOCK_M, W])


@triton.jit
def _exp2_chunks_last(x, BLOCK_M: tl.constexpr, W: tl.constexpr, DEGREE: tl.constexpr):
    """`_exp2_chunks` one level down (POLY 2): Triton jit functions do not recurse."""
    xr = tl.permute(tl.reshape(x, [BLOCK_M, W // 8, 2, 4]), (0, 1, 3, 2))
    lo, hi = tl.split(xr)
    return tl.reshape(tl.permute(tl.join(tl.math.exp2(lo), poly_exp2(hi, DEGREE)), (0, 1, 3, 2)),
                      [BLOCK_M, W])


@triton.jit
def exp2_mixed(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, POLY: tl.constexpr,
               DEGREE: tl.constexpr):
    """exp2 of a score tile x [BLOCK_M, BLOCK_N] (fp32, the MMA accumulator's layout) with 1/POLY
    of its columns by `poly_exp2` on the FMA pipes and the rest by tl.math.exp2 on MUFU; POLY 0:
    all MUFU, 1: all polynomial, 2/4/8: half / quarter / eighth. The polynomial columns are
    chosen along register bits of Hopper's wgmma accumulator (thread t of a warp holds columns
    8 * chunk + 2 * (t % 4) + {0, 1}): the odd column of each pair for 1/2, then odd chunks of
    those, so splitting and joining move no data between threads."""
    if POLY == 0:
        p = tl.math.exp2(x)
    elif POLY == 1:
        p = poly_exp2(x, DEGREE)
    else:
        even, odd = tl.split(tl.reshape(x, [BLOCK_M, BLOCK_N // 2, 2]))  # [BM, BN/2] each
        even = tl.math.exp2(even)
        if POLY == 2:
            odd = poly_exp2(odd, DEGREE)
        else:
            odd = _exp2_chunks(odd, BLOCK_M, BLOCK_N // 2, POLY // 2, DEGREE)
        p = tl.reshape(tl.join(even, odd), [BLOCK_M, BLOCK_N])
    return p


@triton.jit
def _qk_tile(q, k_src, start_n, stride_km, N_KV,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
             USE_DESC: tl.constexpr, DOT_PREC: tl.constexpr):
    """Raw scores of one key tile: q [BLOCK_M, D] @ K[start_n:start_n + BLOCK_N].T, fp32."""
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_d = tl.arange(0, HEAD_DIM)
    if USE_DESC:
        k = tl.trans(k_src.load([start_n, 0]))  # [D, BLOCK_N]
    else:
        k_ptrs = k_src + offs_n.to(tl.int64)[None, :] * stride_km + offs_d[:, None]
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[None, :] < N_KV, other=0.0)
        else:
            k = tl.load(k_ptrs)
    return tl.dot(q, k, input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]


@triton.jit
def softmax_state(BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Online-softmax start, fp32: row max -inf [BLOCK_M], row sum 0, accumulator 0 [BLOCK_M, D]."""
    return (tl.full([BLOCK_M], float("-inf"), dtype=tl.float32),
            tl.zeros([BLOCK_M], dtype=tl.float32), tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32))


@triton.jit
def masked_row_max(s, m_i, scale, start_n, rows, N_KV, OFFSET, BLOCK_N: tl.constexpr,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """Scores `s` [BLOCK_M, BLOCK_N] of the key tile at `start_n` with hidden keys (past N_KV,
    or after the end-aligned diagonal) at -inf when MASKED; the new running row max
    max(m_i, max(s) * scale) (scale: a scalar or one per row); and that max with -inf rows at 0,
    safe to subtract."""
    if MASKED:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = offs_n[None, :] < N_KV
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= rows[:, None] + OFFSET)
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    return s, m_new, m_safe


@triton.jit
def _softmax_pv(acc, l_i, m_i, s, v_src, start_n, rows, stride_vm, N_KV, OFFSET, QK_SCALE,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, WRITE_O: tl.constexpr, USE_DESC: tl.constexpr,
                DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, EXP2_POLY: tl.constexpr):
    """Online-softmax update with the scores `s` [BLOCK_M, BLOCK_N] of the tile at `start_n`
    (exp2 with the scale folded in: QK_SCALE = scale * log2(e); 1/EXP2_POLY of it by the
    degree-3 polynomial), then acc += P @ V."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    s, m_new, m_safe = masked_row_max(s, m_i, QK_SCALE, start_n, rows, N_KV, OFFSET, BLOCK_N,
                                      MASKED, CAUSAL)
    p = exp2_mixed(s * QK_SCALE - m_safe[:, None], BLOCK_M, BLOCK_N, EXP2_POLY, 3)
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if WRITE_O:
        if USE_DESC:
            v = v_src.load([start_n, 0])
        else:
            v_ptrs = v_src + offs_n.to(tl.int64)[:, None] * stride_vm + offs_d[None, :]
            if MASKED:
                v = tl.load(v_ptrs, mask=offs_n[:, None] < N_KV, other=0.0)
            else:
                v = tl.load(v_ptrs)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _attend_tile(acc, l_i, m_i, q, k_src, v_src, start_n, rows, stride_km, stride_vm,
                 N_KV, OFFSET, QK_SCALE,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 CAUSAL: tl.constexpr, WRITE_O: tl.constexpr, USE_DESC: tl.constexpr,
                 DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, EXP2_POLY: tl.constexpr):
    s = _qk_tile(q, k_src, start_n, stride_km, N_KV, HEAD_DIM, BLOCK_N, MASKED, USE_DESC,
                 DOT_PREC)
    return _softmax_pv(acc, l_i, m_i, s, v_src, start_n, rows, stride_vm, N_KV, OFFSET,
                       QK_SCALE, HEAD_DIM, BLOCK_N, MASKED, CAUSAL, WRITE_O, USE_DESC, DOT_PREC,
                       BLOCK_M, EXP2_POLY)


@triton.jit
def tile_start(idx_base, t, DENSE: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr):
    """First key of the t-th sub-tile of a row: dense rows walk blocks 0.., sparse rows their
    index list."""
    SPLIT: tl.constexpr = BS // BLOCK_N
    if DENSE:
        kb = t // SPLIT
    else:
        kb = tl.load(idx_base + t // SPLIT)
    return kb * BS + (t % SPLIT) * BLOCK_N


@triton.jit
def program_rows(H_Q, HEADS_PER_MASK, G: tl.constexpr, BS: tl.constexpr, GH: tl.constexpr,
                  RB: tl.constexpr):
    """This program's (batch, KV head, mask head, query block, first row, rows [GH * RB],
    heads [GH * RB]): GH query heads of one KV group times RB rows.
    Axis 1 is batch x KV head; axis 0 walks the KV head's G // GH program heads one after the
    other, each over its query blocks longest rows first (BS // RB programs per block)."""
    SUBS: tl.constexpr = BS // RB
    HPG: tl.constexpr = G // GH
    pid = tl.program_id(0)
    n_rows = tl.num_programs(0) // HPG  # query row blocks (Qb * SUBS)
    hp = pid // n_rows
    rb = pid % n_rows
    qb = n_rows // SUBS - 1 - rb // SUBS  # longest rows first
    r0 = qb * BS + (rb % SUBS) * RB
    bk = tl.program_id(1)
    b = (bk // (H_Q // G)).to(tl.int64)
    hk = (bk % (H_Q // G)).to(tl.int64)
    h0 = hk * G + hp * GH
    hm = (h0 // HEADS_PER_MASK).to(tl.int64)
    offs_i = tl.arange(0, GH * RB)
    rows = r0 + offs_i % RB
    heads = (h0 + offs_i // RB).to(tl.int64)
    return b, hk, hm, qb, r0, rows, heads


@triton.jit
def row_blocks(KV_NUM, KV_IDX, b, hm, qb, r0, stride_nb, stride_nh, stride_nq, stride_ib,
               stride_ih, stride_iq, N_Q, N_KV, OFFSET, BS: tl.constexpr, CAUSAL: tl.constexpr,
               DENSE: tl.constexpr):
    """(this query block's row of the index table, its kept key blocks, how many of them come
    first and need no mask): key blocks below `full_below` are visible to every row from r0 on;
    of a sorted index list only the last two can reach past it (the diagonal and the ragged
    end)."""
    idx_base = KV_IDX + b * stride_ib + hm * stride_ih + qb * stride_iq
    num_ptr = KV_NUM + b * stride_nb + hm * stride_nh + qb * stride_nq
    if CAUSAL:
        full_below = tl.minimum(r0 + OFFSET + 1, N_KV) // BS
    else:
        full_below = N_KV // BS
    if DENSE:
        if CAUSAL:
            n_blk = (tl.minimum(qb * BS + BS, N_Q) - 1 + OFFSET) // BS + 1
        else:
            n_blk = tl.cdiv(N_KV, BS)
        n_full = tl.minimum(n_blk, full_below)
    else:
        n_blk = tl.load(num_ptr)
        last = tl.load(idx_base + tl.maximum(n_blk - 1, 0))
        prev = tl.load(idx_base + tl.maximum(n_blk - 2, 0))
        n_masked = ((n_blk >= 1) & (last >= full_below)).to(tl.int32) \
            + ((n_blk >= 2) & (prev >= full_below)).to(tl.int32)
        n_full = n_blk - n_masked
    return idx_base, n_blk, n_full


@triton.jit
def bsa_fwd_kernel(
    Q, K, V, O, LSE, KV_NUM, KV_IDX,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_km,
    stride_vb, stride_vh, stride_vm,
    stride_ob, stride_oh, stride_om,
    stride_nb, stride_nh, stride_nq,
    stride_ib, stride_ih, stride_iq,
    H_Q, N_Q, N_KV, OFFSET, QK_SCALE, HEADS_PER_MASK, QB_BUCKET, WORK_BUCKET,
    G: tl.constexpr, BS: tl.constexpr, HEAD_DIM: tl.constexpr, SHARED: tl.constexpr,
    CAUSAL: tl.constexpr, DENSE: tl.constexpr, WRITE_O: tl.constexpr, WRITE_LSE: tl.constexpr,
    DOT_PREC: tl.constexpr, EXP2_POLY: tl.constexpr,
    GH: tl.constexpr, RB: tl.constexpr, BLOCK_N: tl.constexpr, USE_DESC: tl.constexpr,
):
    """Grid (Qb * BS // RB * G // GH, B * H_Q // G): axis 1 is the KV head; axis 0 walks the
    KV head's G // GH program heads one after the other, each over its query blocks longest
    rows first (consecutive programs share K/V tiles in L2).
    Q/O [B, H_Q, N_Q, D]; K/V [B, H_Q // G, N_KV, D];
    KV_NUM int32 [Bm, Hm, Qb], KV_IDX int32 [Bm, Hm, Qb, Kb] (batch stride 0 broadcasts);
    LSE fp32 [B, H_Q, N_Q] (natural log). DENSE ignores the index tables (full causal rows).
    QB_BUCKET / WORK_BUCKET are unused in the body: autotune keys (query blocks, kept blocks per
    row, both rounded up to powers of two). EXP2_POLY: 1/EXP2_POLY of each score tile's
    exponentials on the FMA pipes (`exp2_mixed`), 0 = none."""
    BLOCK_M: tl.constexpr = GH * RB
    SPLIT: tl.constexpr = BS // BLOCK_N
    b, hk, hm, qb, r0, rows, heads = program_rows(H_Q, HEADS_PER_MASK, G, BS, GH, RB)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < N_Q
    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh \
        + rows.to(tl.int64)[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    k_src = K + b * stride_kb + hk * stride_kh
    v_src = V + b * stride_vb + hk * stride_vh
    if USE_DESC:  # TMA: one descriptor per program, over this KV head's [N_KV, D] rows
        k_src = tl.make_tensor_descriptor(k_src, shape=[N_KV, HEAD_DIM], strides=[stride_km, 1],
                                          block_shape=[BLOCK_N, HEAD_DIM])
        v_src = tl.make_tensor_descriptor(v_src, shape=[N_KV, HEAD_DIM], strides=[stride_vm, 1],
                                          block_shape=[BLOCK_N, HEAD_DIM])

    idx_base, n_blk, n_full = row_blocks(KV_NUM, KV_IDX, b, hm, qb, r0, stride_nb, stride_nh,
                                         stride_nq, stride_ib, stride_ih, stride_iq, N_Q, N_KV,
                                         OFFSET, BS, CAUSAL, DENSE)

    m_i, l_i, acc = softmax_state(BLOCK_M, HEAD_DIM)
    kb = tl.load(idx_base) if not DENSE else 0  # sparse rows: the block index one tile ahead
    for t in range(0, n_full * SPLIT):
        if DENSE:
            start_n = tile_start(idx_base, t, DENSE, BS, BLOCK_N)
        else:
            kb_next = tl.load(idx_base + tl.minimum((t + 1) // SPLIT, n_blk - 1))
            start_n = kb * BS + (t % SPLIT) * BLOCK_N
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_src, v_src, start_n, rows,
                                     stride_km, stride_vm, N_KV, OFFSET, QK_SCALE,
                                     HEAD_DIM, BLOCK_N, False, CAUSAL, WRITE_O, USE_DESC,
                                     DOT_PREC, BLOCK_M, EXP2_POLY)
        if not DENSE:
            kb = kb_next
    for t in range(n_full * SPLIT, n_blk * SPLIT):
        start_n = tile_start(idx_base, t, DENSE, BS, BLOCK_N)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_src, v_src, start_n, rows,
                                     stride_km, stride_vm, N_KV, OFFSET, QK_SCALE,
                                     HEAD_DIM, BLOCK_N, True, CAUSAL, WRITE_O, USE_DESC,
                                     DOT_PREC, BLOCK_M, EXP2_POLY)

    empty = l_i == 0.0  # no visible key; a NaN row (NaN or inf input) is not empty: NaN out
    l_safe = tl.where(empty, 1.0, l_i)
    if WRITE_O:
        o = acc / l_safe[:, None]
        o_ptrs = O + b * stride_ob + heads[:, None] * stride_oh \
            + rows.to(tl.int64)[:, None] * stride_om + offs_d[None, :]
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    if WRITE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(LSE + (b * H_Q + heads) * N_Q + rows, lse, mask=row_ok)


def autotune_configs():
    out = []
    for use_desc in (True, False):
        for block_m, block_n, warps, stages in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2),
                                                (128, 128, 8, 2), (128, 128, 8, 3),
                                                (64, 64, 4, 3), (64, 128, 4, 2),
                                                (64, 32, 4, 2), (32, 32, 4, 2)):
            for gh in (1, 2, 4, 8):
                if block_m // gh >= 16:
                    out.append(triton.Config(
                        {"GH": gh, "RB": block_m // gh, "BLOCK_N": block_n, "USE_DESC": use_desc},
                        num_warps=warps, num_stages=stages))
    return out


def canonical_heads(block_m: int, bs: int, g: int, shared: bool) -> int | None:
    """Fewest query heads per program that fill BLOCK_M rows with at most BS rows per head."""
    for gh in (1, 2, 4, 8):
        if block_m // gh <= bs and (gh == 1 or (shared and g % gh == 0)):
            return gh
    return None


def keep(config, args) -> bool:
    """Whether an autotune config fits the launch: tile shapes, GQA grouping, registers.
    16-bit inputs use TMA descriptor loads only (pointer loads never won on Hopper); head_dim 256
    takes 128-row tiles with 8 warps (two warpgroups of 64 rows: 558 vs 429 TFLOP/s for 64-row
    tiles, H200, 32k dense)."""
    kw = config.kwargs
    gh, rb, block_n = kw["GH"], kw["RB"], kw["BLOCK_N"]
    bs, d = args["BS"], args["HEAD_DIM"]
    if gh != canonical_heads(gh * rb, bs, args["G"], args["SHARED"]):
        return False
    if bs % rb or bs % block_n:
        return False
    if not kw["USE_DESC"] and args.get("DOT_PREC") != "ieee":
        return False
    wide = d >= 256 and gh * rb == 128 and config.num_warps == 8
    if (gh * rb * d > 128 * 128 and not wide) or block_n * d > 128 * 128:
        return False
    if d >= 256 and config.num_stages > 2:
        return False
    if (block_n == 32 or gh * rb == 32) and d < 256:
        return False  # small tiles only where the larger ones do not fit (head_dim 256)
    if d >= 256:
        return shared_bytes(config, d, 4 if args.get("DOT_PREC") == "ieee" else 2) <= SMEM_BUDGET
    return True


SMEM_BUDGET = 200 * 1024  # of the 227 KiB an H100 block may use, leaving room for scratch


def shared_bytes(config, head_dim: int, elem_bytes: int) -> int:
    """Estimated shared memory of a config: the Q tile plus num_stages K and V tiles."""
    kw = config.kwargs
    return elem_bytes * head_dim * (kw["GH"] * kw["RB"] + 2 * config.num_stages * kw["BLOCK_N"])


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    kept = [c for c in configs if keep(c, args)]
    return kept or [c for c in configs if c.kwargs["GH"] == 1 and c.kwargs["RB"] <= args["BS"]
                    and args["BS"] % c.kwargs["BLOCK_N"] == 0][:1]


bsa_fwd_autotuned = triton.autotune(
    configs=autotune_configs(),
    key=["G", "BS", "HEAD_DIM", "SHARED", "CAUSAL", "DENSE", "WRITE_O", "DOT_PREC",
         "EXP2_POLY", "QB_BUCKET", "WORK_BUCKET"],
    prune_configs_by={"early_config_prune": _prune},
)(bsa_fwd_kernel)

_ALLOCATOR_SET = False


def ensure_allocator() -> None:
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(
            lambda size, alignment, stream: torch.empty(size, dtype=torch.int8,
                                                        device="cuda" if torch.cuda.is_available()
                                                        else "cpu"))
        _ALLOCATOR_SET = True


def default_config(block_size: int, head_dim: int, g: int, shared: bool) -> dict:
    """One fixed config (tests, the interpreter): BLOCK_M = min(64, block_size) rows."""
    block_m = min(64, block_size) if head_dim <= 128 else min(32, block_size)
    gh = canonical_heads(block_m, block_size, g, shared) or 1
    return {"GH": gh, "RB": block_m // gh, "BLOCK_N": min(64, block_size), "USE_DESC": False,
            "num_warps": 4, "num_stages": 2}


def pow2_bucket(x: float) -> int:
    """Smallest power of two >= x (>= 1): the autotune key of a size or a work estimate."""
    return 1 << max(0, math.ceil(math.log2(max(1.0, float(x)))))


def launch_forward(q, k, v, *, kv_num_blocks, kv_indices, block_size: int, causal: bool,
                   scale: float, heads_per_mask: int, shared: bool, dense: bool = False,
                   write_o: bool = True, return_lse: bool = False, config: dict | None = None,
                   blocks_per_row: float | None = None, out: torch.Tensor | None = None,
                   exp2_poly: float | None = None):
    """Launch `bsa_fwd_kernel`. q [B, Hq, N, D], k/v [B, Hkv, M, D] (last dim contiguous);
    kv_num_blocks int32 [Bm, Hm, Qb], kv_indices int32 [Bm, Hm, Qb, Kb] (ignored when dense).
    `blocks_per_row` (mean kept key blocks per query block; None = the causal maximum) picks the
    autotune bucket, so sparse launches are not run with a config tuned for dense rows.
    `out` (contiguous [B, Hq, N, D], q's dtype and device) receives the output when given.
    `exp2_poly`: fraction of the exponentials on the FMA pipes (EXP2_POLY_FRACTIONS; None =
    DEFAULT_EXP2_POLY, see `exp2_poly`).
    Returns (out [B, Hq, N, D] or None, lse fp32 [B, Hq, N] or None)."""
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    check_dtype(q)
    if out is not None:
        check_out(out, q)
    elif write_o:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        out = q.new_empty(1)
    lse = torch.empty(B, Hq, N, dtype=torch.float32, device=q.device) if return_lse \
        else q.new_empty(1, dtype=torch.float32)
    sn = kv_num_blocks.stride()
    si = kv_indices.stride()
    bstride_n = 0 if kv_num_blocks.shape[0] == 1 else sn[0]
    bstride_i = 0 if kv_indices.shape[0] == 1 else si[0]
    qb = triton.cdiv(N, block_size)
    offset = M - N if causal else 0
    if blocks_per_row is None:
        kb = triton.cdiv(M, block_size)
        blocks_per_row = (2 * kb - qb + 1) / 2 if causal else kb
    ob = out.stride() if write_o else (0, 0, 0)
    args = (q, k, v, out, lse, kv_num_blocks, kv_indices,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            ob[0], ob[1], ob[2],
            bstride_n, sn[1], sn[2],
            bstride_i, si[1], si[2],
            Hq, N, M, offset, scale * LOG2E, heads_per_mask, pow2_bucket(qb),
            pow2_bucket(blocks_per_row))
    meta = dict(G=Hq // Hkv, BS=block_size, HEAD_DIM=D, SHARED=shared, CAUSAL=causal,
                DENSE=dense, WRITE_O=write_o, WRITE_LSE=return_lse,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                EXP2_POLY=exp2_poly_code(exp2_poly))
    launch(bsa_fwd_autotuned, bsa_fwd_kernel, args, meta, config, qb, B * Hkv)
    return (out if write_o else None), (lse if return_lse else None)


def launch(autotuned, kernel, args, meta: dict, config: dict | None, qb: int,
           kv_programs: int) -> None:
    """Launch a forward kernel on the grid of `bsa_fwd_kernel` (qb query blocks, kv_programs =
    B * Hkv): autotuned when `config` is None, else with `config` pinned (a constexpr it names,
    e.g. EXP2_POLY, overrides `meta`'s)."""
    ensure_allocator()

    def grid(m):
        return (qb * (meta["BS"] // m["RB"]) * (meta["G"] // m["GH"]), kv_programs)

    if config is None:
        autotuned[grid](*args, **meta)
    else:
        kernel[grid(config)](*args, **{**meta, **config})


def check_out(out, q) -> None:
    """Raise unless `out` can receive the output for `q`: a contiguous tensor of q's shape,
    dtype and device."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out: expected shape {tuple(q.shape)}, dtype {q.dtype}, device "
                         f"{q.device}, got {tuple(out.shape)}, {out.dtype}, {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous tensor, got strides {out.stride()}")


def check_dtype(q) -> None:
    """The kernels compute in fp32 / tf32 / bf16 / fp16 tensor-core dots: no fp64."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q: expected float16, bfloat16 or float32 for the triton backend, got "
                        f"{q.dtype}")


def check_head_dim(d: int) -> None:
    if d not in HEAD_DIMS:
        raise ValueError(f"q: expected head_dim in {HEAD_DIMS} for the triton backend, got {d}")


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)
