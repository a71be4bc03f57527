"""MInference-style vertical + slash pattern, estimated from the last queries' attention."""

from __future__ import annotations

import torch

from adaptive_sparse.attention.api import check_scale
from adaptive_sparse.masks import BlockSparseMask, num_blocks
from adaptive_sparse.patterns._common import check_bool, check_int, check_qk, finish
from adaptive_sparse.policies import forced_blocks


def last_query_attention(q: torch.Tensor, k: torch.Tensor, last_q: int, scale: float):
    """Softmax attention of the last `last_q` queries to all keys, end-aligned causal.

    q [B, Hq, N, D], k [B, Hkv, M, D] -> (probs float32 [B, Hq, L, M], positions long [L]) with
    L = min(last_q, N) and positions the absolute positions of those queries."""
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G, L = Hq // Hkv, min(last_q, N)
    qs = q[:, :, N - L:].float().reshape(B, Hkv, G * L, D)
    s = (qs @ k.float().transpose(-1, -2)).view(B, Hkv, G, L, M) * scale
    pos = torch.arange(N - L, N, device=q.device) + (M - N)  # [L]
    cols = torch.arange(M, device=q.device)
    s = s.masked_fill(cols[None, :] > pos[:, None], float("-inf"))
    return torch.softmax(s, dim=-1).view(B, Hq, L, M), pos


def vertical_slash(*, q: torch.Tensor, k: torch.Tensor, q_len: int | None = None,
                   kv_len: int | None = None, num_heads: int | None = None,
                   block_size: int = 64, batch: int | None = None, device=None,
                   n_vertical: int = 4, n_slash: int = 4, last_q: int = 64,
                   keep_sink: bool = True, scale: float | None = None,
                   shared_kv_group: bool = False) -> BlockSparseMask:
    """Vertical lines (key columns) and slashes (diagonals), as in MInference.

    q [B, Hq, N, D], k [B, Hkv, M, D]. The exact attention of the last `last_q` queries (all of
    them when N < last_q) is summed over those queries, per key column and per diagonal offset
    d = query position - key position. Then:
    - vertical: the `n_vertical` key blocks with the most column mass are kept in every row;
    - slash: a tile (r, c) lies on block diagonal delta = first_diag(r) - c, where
      first_diag(r) is the key block of query block r's first query. Token diagonal d counts
      toward block diagonals d // bs and d // bs + 1 with weights 1 - (d % bs) / bs and
      (d % bs) / bs (the share of its length in each when blocks are aligned); the `n_slash`
      block diagonals with the most mass are kept in every row.
    The diagonal blocks are always kept (and key block 0 with keep_sink).
    n_vertical, n_slash: ints >= 0.  last_q: int >= 1.  scale: default 1 / sqrt(D).
    shared_kv_group: sum the masses over each KV group and select once per group (H = Hkv).
    """
    N, M, B, Hq, Hkv = check_qk(q, k, q_len=q_len, kv_len=kv_len, num_heads=num_heads,
                                batch=batch, block_size=block_size, device=device)
    check_int("n_vertical", n_vertical, 0)
    check_int("n_slash", n_slash, 0)
    check_int("last_q", last_q, 1)
    check_bool("keep_sink", keep_sink)
    check_bool("shared_kv_group", shared_kv_group)
    scale = check_scale(scale, q.shape[-1])
    bs = block_size
    Qb, Kb = num_blocks(N, bs), num_blocks(M, bs)
    probs, pos = last_query_attention(q, k, last_q, scale)  # [B, Hq, L, M]
    L = probs.shape[2]
    col = probs.sum(2)  # [B, Hq, M]
    d = (pos[:, None] - torch.arange(M, device=q.device)[None, :]).clamp_min(0)  # [L, M]
    diag = torch.zeros(B, Hq, M, dtype=torch.float32, device=q.device)
    diag.scatter_add_(-1, d.reshape(1, 1, L * M).expand(B, Hq, -1), probs.reshape(B, Hq, L * M))
    if shared_kv_group:
        col = col.view(B, Hkv, Hq // Hkv, M).sum(2)
        diag = diag.view(B, Hkv, Hq // Hkv, M).sum(2)
    H = col.shape[1]
    col_blocks = torch.nn.functional.pad(col, (0, Kb * bs - M)).view(B, H, Kb, bs).sum(-1)
    offs = torch.arange(M, device=q.device)
    frac = (offs % bs).float() / bs
    slash = torch.zeros(B, H, Kb + 1, dtype=torch.float32, device=q.device)
    slash.scatter_add_(-1, (offs // bs).expand(B, H, M), diag * (1 - frac))
    slash.scatter_add_(-1, (offs // bs + 1).expand(B, H, M), diag * frac)
    slash = slash[..., :Kb]  # [B, H, Kb]: mass per block diagonal delta
    dense = forced_blocks(N, M, bs, keep_sink=keep_sink, keep_diagonal=True,
                          device=q.device).expand(B, H, Qb, Kb).clone()
    if n_vertical:
        top = col_blocks.topk(min(n_vertical, Kb), dim=-1).indices
        vert = torch.zeros(B, H, Kb, dtype=torch.bool, device=q.device)
        vert.scatter_(-1, top, True)
        dense |= vert[:, :, None, :]
    if n_slash:
        top = slash.topk(min(n_slash, Kb), dim=-1).indices
        sel = torch.zeros(B, H, Kb, dtype=torch.bool, device=q.device)
        sel.scatter_(-1, top, True)
        first = (torch.arange(Qb, device=q.device) * bs + (M - N)) // bs
        delta = first[:, None] - torch.arange(Kb, device=q.device)[None, :]  # [Qb, Kb]
        on = torch.gather(sel[:, :, None, :].expand(B, H, Qb, Kb), -1,
                          delta.clamp(0, Kb - 1).expand(B, H, Qb, Kb))
        dense |= on & (delta >= 0)
    return finish(dense, q_len=N, kv_len=M, block_size=bs)
