"""XAttention-style block scores from strided antidiagonal sums, kept by cumulative mass."""

from __future__ import annotations

import torch

from adaptive_sparse.attention.api import check_scale
from adaptive_sparse.masks import BlockSparseMask, num_blocks
from adaptive_sparse.patterns._common import (check_bool, check_float, check_int, check_qk,
                                              finish, group_mean)
from adaptive_sparse.policies import Policy

_CHUNK_ELEMENTS = 1 << 24


def antidiagonal_scores(q: torch.Tensor, k: torch.Tensor, *, block_size: int, stride: int,
                        scale: float) -> torch.Tensor:
    """Estimated block attention map, float32 [B, Hq, Qb, Kb], rows summing to 1.

    Within every stride x stride sub-tile, the logits along its antidiagonal are summed:
    s(a, b) = sum_u q[a*S + S-1-u] . k[b*S + u] * scale / S (the mean of S logits). That is one
    matmul of strided-reshaped q' [N/S, S*D] and k' [M/S, S*D]. A softmax over b (end-aligned
    causal: key group b is visible to query group a if its first key is) gives a strided
    attention map, which is summed per tile and averaged over the tile's query groups."""
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G, S, bs = Hq // Hkv, stride, block_size
    Qb, Kb = num_blocks(N, bs), num_blocks(M, bs)
    n, m = Qb * bs // S, Kb * bs // S
    qpad = torch.nn.functional.pad(q.float(), (0, 0, 0, Qb * bs - N))
    kpad = torch.nn.functional.pad(k.float(), (0, 0, 0, Kb * bs - M))
    qs = qpad.reshape(B, Hq, n, S, D).flip(3).reshape(B, Hkv, G, n, S * D)
    ks = kpad.reshape(B, Hkv, m, S * D)  # k may be a transposed view (use_cache=False)
    offset = M - N
    key_first = torch.arange(m, device=q.device) * S  # [m]
    out = torch.zeros(B, Hq, Qb, Kb, dtype=torch.float32, device=q.device)
    per = bs // S  # query groups per block
    rows_chunk = max(per, (_CHUNK_ELEMENTS // max(1, B * Hq * m)) // per * per)
    for a0 in range(0, n, rows_chunk):
        a1 = min(n, a0 + rows_chunk)
        s = (qs[:, :, :, a0:a1].reshape(B, Hkv, G * (a1 - a0), S * D) @ ks.transpose(-1, -2))
        s = s.view(B, Hq, a1 - a0, m) * (scale / S)
        a = torch.arange(a0, a1, device=q.device)
        last_pos = a * S + S - 1 + offset  # absolute position of the group's last query
        visible = (key_first[None, :] <= last_pos[:, None]) & (key_first[None, :] < M)
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
        real = (a * S < N).float()  # groups holding at least one real query
        p = p * real[:, None]
        tiles = p.view(B, Hq, (a1 - a0) // per, per, Kb, per).sum((3, 5))
        out[:, :, a0 // per:a1 // per] = tiles
    groups = torch.clamp(N - torch.arange(Qb, device=q.device) * bs, max=bs)
    return out / torch.ceil(groups.float() / S)[:, None]


def antidiagonal(*, q: torch.Tensor, k: torch.Tensor, q_len: int | None = None,
                 kv_len: int | None = None, num_heads: int | None = None,
                 block_size: int = 64, batch: int | None = None, device=None,
                 stride: int = 8, threshold: float = 0.9, keep_sink: bool = True,
                 scale: float | None = None, shared_kv_group: bool = False) -> BlockSparseMask:
    """XAttention-style: score tiles by strided antidiagonal sums, keep by cumulative mass.

    q [B, Hq, N, D], k [B, Hkv, M, D].
    stride: int >= 1 dividing block_size; the antidiagonal step S (see `antidiagonal_scores`).
    threshold: float in (0, 1], cumulative row mass to keep: `Policy("top_p", p=threshold)` on
        the estimated map (sink and diagonal blocks forced first, their mass counts).
    keep_sink: force key block 0. The diagonal blocks are always forced.
    scale: default 1 / sqrt(D).
    shared_kv_group: average the estimated maps over each KV group (H = Hkv).
    """
    N, M, B, Hq, Hkv = check_qk(q, k, q_len=q_len, kv_len=kv_len, num_heads=num_heads,
                                batch=batch, block_size=block_size, device=device)
    check_int("stride", stride, 1)
    if block_size % stride:
        raise ValueError(f"stride: expected a divisor of block_size ({block_size}), got {stride}")
    check_float("threshold", threshold, 0.0, 1.0, lo_open=True)
    check_bool("keep_sink", keep_sink)
    check_bool("shared_kv_group", shared_kv_group)
    scale = check_scale(scale, q.shape[-1])
    scores = antidiagonal_scores(q, k, block_size=block_size, stride=stride, scale=scale)
    if shared_kv_group:
        scores = group_mean(scores, Hkv)
    policy = Policy("top_p", p=float(threshold), keep_sink=keep_sink, keep_diagonal=True)
    dense = policy.select(scores, q_len=N, kv_len=M, block_size=block_size,
                          scores_are_probs=True)
    return finish(dense, q_len=N, kv_len=M, block_size=block_size)
