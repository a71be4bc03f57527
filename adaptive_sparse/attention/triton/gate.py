"""Block scores -> kv indices in one Triton launch (one program per score row, no host sync).

The forward kernel reads `kv_num_blocks` and the first entries of `kv_indices` only, so a
selection over each score row, in ascending block order, is all it needs. Four selections:

- top-k with one k for every row: the k-th largest score of the row (a bitonic sort of the row
  in registers) is the row's threshold;
- top-k with a per-(head, query block) budget `row_budgets` (density policies, whose budget
  follows the number of causal blocks in the row, and per-head budgets);
- a threshold on the raw scores;
- a per-head threshold on the row probabilities (softmax of the row's causal scores), which is
  `adaptive_sparse.policies.Policy(kind="threshold")` on logits.

Forced blocks (sink, diagonal, `local_blocks` before the diagonal) are kept in every mode and
count inside a top-k budget.

`pool_blocks_triton` is the gate's block pooling (average / max / min of each block of tokens,
concatenated) in one launch, reading the captured q/k in their own dtype and layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaptive_sparse.masks import num_blocks

MODE_TOP_K, MODE_ROW_BUDGET, MODE_THRESHOLD, MODE_PROB_THRESHOLD = 0, 1, 2, 3


@triton.jit
def scores_to_indices_kernel(S, NUM, IDX, KROWS, TAUS, N_Q, OFFSET, KB, H, TOP_K, TAU, LOCAL,
                             QB: tl.constexpr, BS: tl.constexpr, KB_P2: tl.constexpr,
                             CAUSAL: tl.constexpr, MODE: tl.constexpr,
                             KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr):
    """One program per score row. S fp32 [R, KB] (R = B * H * QB rows); NUM int32 [R];
    IDX int32 [R, KB]: kept blocks ascending, then the others ascending.
    KROWS int32 [H * QB] (MODE 1), TAUS fp32 [H] (MODE 3); unused pointers otherwise."""
    row = tl.program_id(0).to(tl.int64)
    qb = (row % QB).to(tl.int32)
    head = ((row // QB) % H).to(tl.int32)
    offs = tl.arange(0, KB_P2)
    in_row = offs < KB
    s = tl.load(S + row * KB + offs, mask=in_row, other=float("-inf"))
    allowed = in_row
    first = (qb * BS + OFFSET) // BS
    if CAUSAL:
        last = tl.minimum(qb * BS + BS, N_Q) - 1 + OFFSET
        allowed = allowed & (offs * BS <= last)
    forced = offs < 0
    if KEEP_SINK:
        forced = forced | (offs == 0)
    if CAUSAL:
        if KEEP_DIAG:
            forced = forced | ((offs >= first) & (offs * BS <= last))
        forced = forced | ((offs < first) & (offs >= first - LOCAL))
    forced = forced & allowed
    s = tl.where(allowed, s, float("-inf"))
    if MODE == 0 or MODE == 1:
        if MODE == 0:
            k = TOP_K
        else:
            k = tl.minimum(tl.maximum(tl.load(KROWS + head * QB + qb), 1), KB)
        s = tl.where(forced, float("inf"), s)
        ranked = tl.sort(s, descending=True)
        kth = tl.max(tl.where(offs == k - 1, ranked, float("-inf")), 0)
        keep = allowed & (s >= kth) & (s > float("-inf"))
    elif MODE == 2:
        keep = allowed & (forced | (s >= TAU))
    else:
        m = tl.max(s, 0)
        m = tl.where(m > float("-inf"), m, 0.0)
        e = tl.where(allowed, tl.exp(s - m), 0.0)
        p = e / tl.maximum(tl.sum(e, 0), 1.1754943508222875e-38)
        keep = allowed & (forced | (p >= tl.load(TAUS + head)))
    keep_i = keep.to(tl.int32)
    n = tl.sum(keep_i, 0)
    pos = tl.where(keep, tl.cumsum(keep_i, 0) - 1, n + tl.cumsum(1 - keep_i, 0) - 1)
    tl.store(IDX + row * KB + pos, offs, mask=in_row)
    tl.store(NUM + row, n)


@triton.jit
def pool_blocks_fwd_kernel(X, OUT, N, H, NB, sxb, sxh, sxn, sxd,
                           BS: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
                           P: tl.constexpr, AVG: tl.constexpr, MAX: tl.constexpr,
                           MIN: tl.constexpr):
    """One program per (batch, head, block). X [B, H, N, D] (any strides, any float dtype);
    OUT fp32 [B, H, NB, P * D] contiguous: slot AVG / MAX / MIN (or -1: not pooled) of the last
    dimension holds that pooling of the block's real tokens."""
    pid = tl.program_id(0).to(tl.int64)
    blk = pid % NB
    b = pid // (NB * H)
    h = (pid // NB) % H
    rows = blk * BS + tl.arange(0, BS)
    cols = tl.arange(0, D_P2)
    valid = (rows < N)[:, None] & (cols < D)[None, :]
    ptr = X + b * sxb + h * sxh + rows.to(tl.int64)[:, None] * sxn + cols[None, :] * sxd
    x = tl.load(ptr, mask=valid, other=0.0).to(tl.float32)  # [BS, D_P2]
    out = OUT + pid * (P * D)
    if AVG >= 0:
        count = tl.minimum(N - blk * BS, BS).to(tl.float32)
        tl.store(out + AVG * D + cols, tl.sum(x, 0) / count, mask=cols < D)
    if MAX >= 0:
        tl.store(out + MAX * D + cols, tl.max(tl.where(valid, x, float("-inf")), 0),
                 mask=cols < D)
    if MIN >= 0:
        tl.store(out + MIN * D + cols, tl.min(tl.where(valid, x, float("inf")), 0),
                 mask=cols < D)


def pool_blocks_triton(x: torch.Tensor, block_size: int, kinds,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, H, N, D] (float, any strides) -> float32 [B, H, ceil(N / block_size), len(kinds) * D]:
    the poolings ("avg", "max", "min") of each block of `block_size` tokens, concatenated in
    `kinds` order; a partial last block pools its real tokens only. `out`: a contiguous float32
    tensor of that shape to write into. One launch, no host sync."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.dtype.is_floating_point:
        raise ValueError(f"x: expected a float tensor [B, H, N, D], got {_describe(x)}")
    kinds = tuple(kinds)
    if not kinds or len(set(kinds)) != len(kinds) \
            or any(p not in ("avg", "max", "min") for p in kinds):
        raise ValueError(f"kinds: expected distinct poolings from ('avg', 'max', 'min'), "
                         f"got {kinds}")
    if not (_is_int(block_size) and block_size >= 1 and block_size & (block_size - 1) == 0):
        raise ValueError(f"block_size: expected a power of two, got {block_size!r}")
    B, H, N, D = x.shape
    nb = num_blocks(N, block_size)
    shape = (B, H, nb, len(kinds) * D)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    elif not isinstance(out, torch.Tensor) or tuple(out.shape) != shape \
            or out.dtype != torch.float32 or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"out: expected a contiguous float32 tensor {list(shape)} on "
                         f"{x.device}, got {_describe(out)}")
    slot = {p: (kinds.index(p) if p in kinds else -1) for p in ("avg", "max", "min")}
    pool_blocks_fwd_kernel[(B * H * nb,)](
        x, out, N, H, nb, *x.stride(), BS=block_size, D=D, D_P2=triton.next_power_of_2(D),
        P=len(kinds), AVG=slot["avg"], MAX=slot["max"], MIN=slot["min"],
        num_warps=4 if block_size * D <= 8192 else 8)
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def scores_to_kv_indices(scores: torch.Tensor, *, q_len: int, kv_len: int, block_size: int,
                         top_k: int | None = None, threshold: float | None = None,
                         row_budgets: torch.Tensor | None = None,
                         prob_threshold: torch.Tensor | None = None,
                         causal: bool = True, keep_sink: bool = True,
                         keep_diagonal: bool = True, local_blocks: int = 0):
    """scores float [B, H, Qb, Kb] (higher = keep) -> (kv_num_blocks int32 [B, H, Qb],
    kv_indices int32 [B, H, Qb, Kb]).

    Exactly one selection is given:
    - `top_k`: blocks per row (forced blocks included);
    - `row_budgets`: int32 [H, Qb], blocks per (head, query block) row (forced blocks included;
      clamped to [1, Kb]); the same for every batch entry;
    - `threshold`: keep scores >= threshold;
    - `prob_threshold`: float32 [H], keep blocks whose row probability (softmax of the row's
      causal scores) is >= prob_threshold[h].
    Blocks outside the causal region are never selected; the sink block (key block 0), the
    diagonal blocks and the `local_blocks` key blocks right before a row's first diagonal block
    (causal only) are always kept when asked (even beyond a budget). Kept indices come first,
    ascending; the rest of each row is padding (the other block indices, ascending). Rows with
    tied scores at the k-th place keep every tied block; -inf scores are never kept by a top-k.
    Reads no value on the host (no device sync): capturable in a CUDA graph. Runs on CUDA, or
    on CPU under TRITON_INTERPRET=1."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        raise ValueError(f"scores: expected a rank-4 tensor [B, H, Qb, Kb], got "
                         f"{tuple(getattr(scores, 'shape', ()))}")
    given = [name for name, v in (("top_k", top_k), ("threshold", threshold),
                                  ("row_budgets", row_budgets),
                                  ("prob_threshold", prob_threshold)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"top_k, threshold, row_budgets, prob_threshold: expected exactly one "
                         f"of them, got {given or 'none'}")
    if top_k is not None and not (_is_int(top_k) and top_k >= 1):
        raise ValueError(f"top_k: expected a positive int, got {top_k!r}")
    if not (_is_int(local_blocks) and local_blocks >= 0):
        raise ValueError(f"local_blocks: expected a non-negative int, got {local_blocks!r}")
    if causal and q_len > kv_len:
        raise ValueError(f"q_len: expected <= kv_len ({kv_len}) when causal, got {q_len}")
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    if tuple(scores.shape[2:]) != (qb, kb):
        raise ValueError(f"scores: expected [B, H, Qb, Kb] with Qb, Kb = {(qb, kb)}, "
                         f"got {tuple(scores.shape)}")
    B, H = scores.shape[:2]
    s = scores.float().contiguous()
    dummy_i = dummy_f = s
    if row_budgets is not None:
        if not isinstance(row_budgets, torch.Tensor) or row_budgets.dtype != torch.int32 \
                or tuple(row_budgets.shape) != (H, qb) or row_budgets.device != s.device:
            raise ValueError(f"row_budgets: expected an int32 tensor [H, Qb] = {[H, qb]} on "
                             f"{s.device}, got {_describe(row_budgets)}")
        dummy_i = row_budgets.contiguous()
    if prob_threshold is not None:
        if not isinstance(prob_threshold, torch.Tensor) \
                or prob_threshold.dtype != torch.float32 \
                or tuple(prob_threshold.shape) != (H,) or prob_threshold.device != s.device:
            raise ValueError(f"prob_threshold: expected a float32 tensor [H] = [{H}] on "
                             f"{s.device}, got {_describe(prob_threshold)}")
        dummy_f = prob_threshold.contiguous()
    mode = (MODE_TOP_K if top_k is not None else MODE_ROW_BUDGET if row_budgets is not None
            else MODE_THRESHOLD if threshold is not None else MODE_PROB_THRESHOLD)
    num = torch.empty(B, H, qb, dtype=torch.int32, device=s.device)
    idx = torch.empty(B, H, qb, kb, dtype=torch.int32, device=s.device)
    scores_to_indices_kernel[(B * H * qb,)](
        s, num, idx, dummy_i, dummy_f, q_len, kv_len - q_len if causal else 0, kb, H,
        min(top_k, kb) if top_k is not None else 1,
        float(threshold) if threshold is not None else 0.0, local_blocks,
        QB=qb, BS=block_size, KB_P2=triton.next_power_of_2(kb), CAUSAL=causal, MODE=mode,
        KEEP_SINK=keep_sink, KEEP_DIAG=keep_diagonal, num_warps=4 if kb <= 512 else 8)
    return num, idx


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} {list(t.shape)} on {t.device}"
