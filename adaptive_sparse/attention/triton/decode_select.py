"""What the fused decode-selection steps share (`decode_gate`: a learned gate's scores,
`decode_bounds`: Quest-style key bounds): a program's share of a row's blocks, the arrival
count after which a row's last program keeps the top_k blocks and writes them in
FlexAttention's BlockMask layout, the cached scratch, the output tables and the launch
(programs per row, the autotuned configuration kept per shape).

A row is one (sequence b, KV head h), bh = b * H_KV + h; its programs (grid axis 1) each score
a contiguous span of its blocks into the row's scratch, then arrive on the row's count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaptive_sparse.attention.triton.decode import _pow2_at_least, _sm_count


@triton.jit
def program_row(SEQLENS, H_KV, N_KV, KB, BS: tl.constexpr, CH: tl.constexpr,
                UNIFORM: tl.constexpr):
    """This program's row bh = b * H_KV + h (program_id(0)), sequence b's tokens (SEQLENS[b],
    or N_KV when UNIFORM), its blocks and this program's share of them, blocks [first, end)
    (empty when first >= blocks): program_id(1) * span on, span = ceil(ceil(KB / CH) /
    programs) * CH. Returns (bh, b, h, seqlen, blocks, first, end), bh, b and h int64."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H_KV
    if UNIFORM:
        seqlen = N_KV
    else:
        seqlen = tl.load(SEQLENS + b)
    nb = tl.cdiv(seqlen, BS)
    span = tl.cdiv(tl.cdiv(KB, CH), tl.num_programs(1)) * CH
    first = tl.program_id(1) * span
    return bh, b, bh % H_KV, seqlen, nb, first, tl.minimum(first + span, nb)


@triton.jit
def last_block_keys(K_ROW, stride_km, nb, seqlen, offs_d, BS: tl.constexpr):
    """The keys of a row's last block, fp32 [BS, D] (0 past the sequence), and which of its
    BS rows are real tokens: K_ROW points at the row's cache [M, D] (last dim contiguous)."""
    rows = (nb - 1) * BS + tl.arange(0, BS)
    valid = rows < seqlen
    x = tl.load(K_ROW + rows.to(tl.int64)[:, None] * stride_km + offs_d[None, :],
                mask=valid[:, None], other=0.0).to(tl.float32)
    return x, valid


@triton.jit
def arrive_and_select(S_ROW, CNT, NUM, IDX, bh, nb, TOP_K, KB, LOCAL, KB_P2: tl.constexpr,
                      KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr):
    """Called by every program of row bh once its scores are stored in S_ROW (fp32 [KB_P2],
    blocks [0, nb) written by the row's programs together). The last to arrive (an atomic
    count in CNT[bh], reset to 0 after) keeps the TOP_K best blocks: the sink block 0, the last
    block and the LOCAL blocks before it forced; a tie at the k-th score to the lower block
    number, so exactly min(TOP_K, nb) are kept; NaN never ranks. It writes them ascending to
    IDX[bh] (int32 [KB]), their count to NUM[bh], then the other block numbers ascending."""
    tl.debug_barrier()  # every thread's scores stored before the release below
    arrived = tl.atomic_add(CNT + bh, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(1) - 1:
        last = nb - 1
        offs = tl.arange(0, KB_P2)
        in_row = offs < nb
        s = tl.load(S_ROW + offs, mask=in_row, other=float("-inf"), cache_modifier=".cg")
        s = tl.where(s == s, s, float("-inf"))
        forced = (offs < last) & (offs >= last - LOCAL)
        if KEEP_SINK:
            forced = forced | (offs == 0)
        if KEEP_DIAG:
            forced = forced | (offs == last)
        s = tl.where(in_row & forced, float("inf"), s)
        k = tl.minimum(TOP_K, nb)
        ranked = tl.sort(s, descending=True)
        kth = tl.max(tl.where(offs == k - 1, ranked, float("-inf")), 0)
        above = in_row & (s > kth)
        tie = in_row & (s == kth) & (s > float("-inf"))
        need = k - tl.sum(above.to(tl.int32), 0)
        keep = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need))
        keep_i = keep.to(tl.int32)
        n = tl.sum(keep_i, 0)
        pos = tl.where(keep, tl.cumsum(keep_i, 0) - 1, n + tl.cumsum(1 - keep_i, 0) - 1)
        tl.store(IDX + bh * KB + pos, offs.to(tl.int32), mask=offs < KB)
        tl.store(NUM + bh, n)
        tl.atomic_xchg(CNT + bh, 0, sem="relaxed", scope="gpu")


def chunk_configs():
    # latency-bound: blocks scored per program (more programs per row, each re-reading the
    # query from L2) and the warps per program (the last one also sorts the row's scores)
    return [triton.Config({"CH": ch}, num_warps=w) for ch, w in
            ((16, 4), (32, 4), (64, 4), (32, 8), (64, 8), (128, 8))]


_WORKSPACES: dict[tuple, tuple] = {}


def workspace(device, rows: int, kb_p2: int):
    """(scores fp32 [rows, kb_p2], arrival counts int32 [rows] of zeros), kept per device and
    shape (no allocation per step after the first; layers and both steps share them: launches
    on one stream run in order). The kernels leave the counts at zero."""
    key = (device, rows, kb_p2)
    ws = _WORKSPACES.get(key)
    if ws is None:
        if len(_WORKSPACES) > 64:
            _WORKSPACES.clear()
        ws = (torch.empty(rows, kb_p2, dtype=torch.float32, device=device),
              torch.zeros(rows, dtype=torch.int32, device=device))
        _WORKSPACES[key] = ws
    return ws


def step_buffers(q, k, *, block_size: int, top_k, programs, out):
    """What a decode-selection step starts with: q [B, Hq, D] or [B, Hq, 1, D] and the cache k
    [B, Hkv, M, D] checked (Hkv dividing Hq; head_dim and block_size powers of two) and made
    last-dim contiguous, top_k and programs checked, the rows' scratch and counts
    (`workspace`) and the output tables (`out` checked, else new).
    Returns (q [B, Hq, D], k, blocks kb, scratch width kb_p2, scratch, counts, num, idx)."""
    if q.dim() == 4:
        q = q[:, :, 0]
    B, Hq, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != D or Hq % Hkv:
        raise ValueError(f"k: expected [{B}, Hkv, M, {D}] with Hkv dividing {Hq}, got "
                         f"{tuple(k.shape)}")
    if D & (D - 1) or block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"head_dim, block_size: expected powers of two, got {D}, {block_size}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k: expected a positive int, got {top_k!r}")
    if programs is not None and (not isinstance(programs, int) or isinstance(programs, bool)
                                 or programs < 1):
        raise ValueError(f"programs: expected None or a positive int, got {programs!r}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    kb = -(-M // block_size)
    kb_p2 = max(16, _pow2_at_least(kb))
    scratch, count = workspace(q.device, B * Hkv, kb_p2)
    if out is None:
        return (q, k, kb, kb_p2, scratch, count,
                torch.empty(B, Hkv, dtype=torch.int32, device=q.device),
                torch.empty(B, Hkv, kb, dtype=torch.int32, device=q.device))
    num, idx = out
    if num.shape != (B, Hkv) or idx.shape != (B, Hkv, kb) or num.dtype != torch.int32 \
            or idx.dtype != torch.int32 or not (num.is_contiguous() and idx.is_contiguous()):
        raise ValueError(f"out: expected contiguous int32 [{B}, {Hkv}] and [{B}, {Hkv}, "
                         f"{kb}], got {tuple(num.shape)}, {tuple(idx.shape)}")
    return q, k, kb, kb_p2, scratch, count, num, idx


_BEST: dict[tuple, dict] = {}


def launch(kernel, tuned, args, meta, *, rows: int, kb: int, programs: int | None,
           key: tuple) -> None:
    """Runs `kernel` (meta-parameter CH: blocks per chunk) over grid (rows, programs per row):
    `programs`, else about two waves over the SMs in all, never more than one per CH blocks.
    On CUDA the first call at `key` runs `tuned` (the kernel autotuned over CH and num_warps;
    the kernels are idempotent, so the autotuner may rerun them) and keeps its choice; in the
    interpreter one fixed configuration of small chunks (several programs per row)."""
    device = args[0].device
    waves = programs if programs is not None else -(-2 * _sm_count(device) // rows)

    def grid(m):
        return (rows, max(1, min(waves, -(-kb // m["CH"]))))

    if device.type == "cuda":
        key = (kernel.__name__, *key)
        cfg = _BEST.get(key)
        if cfg is None:
            tuned[grid](*args, **meta)
            best = tuned.best_config
            _BEST[key] = {**best.kwargs, "num_warps": best.num_warps}
        else:
            kernel[grid(cfg)](*args, **meta, **cfg)
    else:
        kernel[grid({"CH": 4})](*args, **meta, CH=4, num_warps=4)
