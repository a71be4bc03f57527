"""Block scores -> kv indices on the GPU with a few batched torch ops (no host sync).

The forward kernel reads `kv_num_blocks` and the first entries of `kv_indices` only, so a top-k
(or threshold) over each score row, sorted, is all it needs.
"""

from __future__ import annotations

import torch

from adaptive_sparse.masks import block_causal, diagonal_blocks


def scores_to_kv_indices(scores: torch.Tensor, *, q_len: int, kv_len: int, block_size: int,
                         top_k: int | None = None, threshold: float | None = None,
                         causal: bool = True, keep_sink: bool = True,
                         keep_diagonal: bool = True):
    """scores float [B, H, Qb, Kb] (higher = keep) -> (kv_num_blocks int32 [B, H, Qb],
    kv_indices int32 [B, H, Qb, Kb]).

    Exactly one of `top_k` (blocks per row, forced blocks included) or `threshold` (keep scores
    >= threshold) is given. Blocks outside the causal region are never selected; the sink block
    (key block 0) and the diagonal blocks are kept when asked. Kept indices come first,
    ascending; the rest of each row is padding (valid block indices, ascending)."""
    if scores.dim() != 4:
        raise ValueError(f"scores: expected rank 4 [B, H, Qb, Kb], got {tuple(scores.shape)}")
    if (top_k is None) == (threshold is None):
        raise ValueError("top_k, threshold: expected exactly one of them")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected a positive int, got {top_k!r}")
    kb = scores.shape[-1]
    allowed = block_causal(q_len, kv_len, block_size, causal=causal, device=scores.device)
    if tuple(allowed.shape) != tuple(scores.shape[2:]):
        raise ValueError(f"scores: expected [B, H, Qb, Kb] with Qb, Kb = {tuple(allowed.shape)}, "
                         f"got {tuple(scores.shape)}")
    forced = torch.zeros_like(allowed)
    if keep_sink:
        forced[:, 0] = True
    if keep_diagonal and causal:
        forced |= diagonal_blocks(q_len, kv_len, block_size, device=scores.device)
    forced &= allowed
    s = scores.float().masked_fill(~allowed, float("-inf"))
    s = torch.where(forced, torch.full_like(s, float("inf")), s)
    if top_k is not None:
        k = min(top_k, kb)
        top = torch.topk(s, k, dim=-1, sorted=False)
        keep = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
        keep.scatter_(-1, top.indices, top.values > float("-inf"))
    else:
        keep = s >= threshold
    num = keep.sum(-1, dtype=torch.int32)
    order = (~keep).to(torch.int32) * kb + torch.arange(kb, device=s.device, dtype=torch.int32)
    idx = torch.sort(order, dim=-1).values
    idx = torch.where(idx >= kb, idx - kb, idx)
    return num, idx.to(torch.int32)
