"""Block scores -> kv indices in one Triton launch (one program per score row, no host sync).

The forward kernel reads `kv_num_blocks` and the first entries of `kv_indices` only, so a top-k
(or threshold) over each score row, in ascending block order, is all it needs. Top-k takes the
k-th largest score of the row (a bitonic sort of the row in registers) as its threshold.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaptive_sparse.masks import num_blocks


@triton.jit
def scores_to_indices_kernel(S, NUM, IDX, N_Q, N_KV, OFFSET, KB, TOP_K, TAU,
                             QB: tl.constexpr, BS: tl.constexpr, KB_P2: tl.constexpr,
                             CAUSAL: tl.constexpr, USE_TOP_K: tl.constexpr,
                             KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr):
    """One program per score row. S fp32 [R, KB] (R = B * H * QB rows); NUM int32 [R];
    IDX int32 [R, KB]: kept blocks ascending, then the others ascending."""
    row = tl.program_id(0).to(tl.int64)
    qb = (row % QB).to(tl.int32)
    offs = tl.arange(0, KB_P2)
    in_row = offs < KB
    s = tl.load(S + row * KB + offs, mask=in_row, other=float("-inf"))
    allowed = in_row
    if CAUSAL:
        last = tl.minimum(qb * BS + BS, N_Q) - 1 + OFFSET
        allowed = allowed & (offs * BS <= last)
    forced = offs < 0
    if KEEP_SINK:
        forced = forced | (offs == 0)
    if KEEP_DIAG:
        if CAUSAL:
            first = (qb * BS + OFFSET) // BS
            forced = forced | ((offs >= first) & (offs * BS <= last))
    forced = forced & allowed
    s = tl.where(allowed, s, float("-inf"))
    if USE_TOP_K:
        s = tl.where(forced, float("inf"), s)
        ranked = tl.sort(s, descending=True)
        kth = tl.max(tl.where(offs == TOP_K - 1, ranked, float("-inf")), 0)
        keep = allowed & (s >= kth) & (s > float("-inf"))
    else:
        keep = allowed & (forced | (s >= TAU))
    keep_i = keep.to(tl.int32)
    n = tl.sum(keep_i, 0)
    pos = tl.where(keep, tl.cumsum(keep_i, 0) - 1, n + tl.cumsum(1 - keep_i, 0) - 1)
    tl.store(IDX + row * KB + pos, offs, mask=in_row)
    tl.store(NUM + row, n)


def scores_to_kv_indices(scores: torch.Tensor, *, q_len: int, kv_len: int, block_size: int,
                         top_k: int | None = None, threshold: float | None = None,
                         causal: bool = True, keep_sink: bool = True,
                         keep_diagonal: bool = True):
    """scores float [B, H, Qb, Kb] (higher = keep) -> (kv_num_blocks int32 [B, H, Qb],
    kv_indices int32 [B, H, Qb, Kb]).

    Exactly one of `top_k` (blocks per row, forced blocks included) or `threshold` (keep scores
    >= threshold) is given. Blocks outside the causal region are never selected; the sink block
    (key block 0) and the diagonal blocks are always kept when asked (even beyond top_k). Kept
    indices come first, ascending; the rest of each row is padding (the other block indices,
    ascending). Rows with tied scores at the k-th place keep every tied block. Runs on CUDA, or
    on CPU under TRITON_INTERPRET=1."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        raise ValueError(f"scores: expected a rank-4 tensor [B, H, Qb, Kb], got "
                         f"{tuple(getattr(scores, 'shape', ()))}")
    if (top_k is None) == (threshold is None):
        raise ValueError("top_k, threshold: expected exactly one of them")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected a positive int, got {top_k!r}")
    if causal and q_len > kv_len:
        raise ValueError(f"q_len: expected <= kv_len ({kv_len}) when causal, got {q_len}")
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    if tuple(scores.shape[2:]) != (qb, kb):
        raise ValueError(f"scores: expected [B, H, Qb, Kb] with Qb, Kb = {(qb, kb)}, "
                         f"got {tuple(scores.shape)}")
    B, H = scores.shape[:2]
    s = scores.float().contiguous()
    num = torch.empty(B, H, qb, dtype=torch.int32, device=s.device)
    idx = torch.empty(B, H, qb, kb, dtype=torch.int32, device=s.device)
    scores_to_indices_kernel[(B * H * qb,)](
        s, num, idx, q_len, kv_len, kv_len - q_len if causal else 0, kb,
        min(top_k, kb) if top_k is not None else 1,
        float(threshold) if threshold is not None else 0.0,
        QB=qb, BS=block_size, KB_P2=triton.next_power_of_2(kb), CAUSAL=causal,
        USE_TOP_K=top_k is not None, KEEP_SINK=keep_sink, KEEP_DIAG=keep_diagonal,
        num_warps=4 if kb <= 512 else 8)
    return num, idx
