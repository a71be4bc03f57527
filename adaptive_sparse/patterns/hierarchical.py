"""Coarse-to-fine selection: rank super-blocks from pooled q/k, refine inside the best ones."""

from __future__ import annotations

import math

import torch

from adaptive_sparse.attention.api import check_scale
from adaptive_sparse.masks import BlockSparseMask, block_causal
from adaptive_sparse.patterns._common import (block_pool, check_bool, check_int, check_qk,
                                              finish, group_mean)
from adaptive_sparse.policies import Policy, forced_blocks


def _pool_rows(x: torch.Tensor, group: int) -> torch.Tensor:
    """Mean over consecutive `group` rows (dim 2): [B, H, L, D] -> [B, H, ceil(L / g), D]."""
    B, H, L, D = x.shape
    n = (L + group - 1) // group
    xf = torch.nn.functional.pad(x, (0, 0, 0, n * group - L))
    counts = torch.clamp(L - torch.arange(n, device=x.device) * group, max=group)
    return xf.view(B, H, n, group, D).sum(3) / counts[:, None].to(x.dtype)


def hierarchical(*, q: torch.Tensor, k: torch.Tensor, q_len: int | None = None,
                 kv_len: int | None = None, num_heads: int | None = None,
                 block_size: int = 64, batch: int | None = None, device=None,
                 budget: float = 8, super_block: int = 4, expand: int | None = None,
                 keep_sink: bool = True, scale: float | None = None,
                 shared_kv_group: bool = False) -> BlockSparseMask:
    """Hierarchical (coarse-to-fine) estimate of the block attention.

    q [B, Hq, N, D], k [B, Hkv, M, D]. Blocks are mean-pooled, then super-blocks of
    `super_block` blocks are mean-pooled again. For each query block row:
    1. the super-block scores (pooled q of the row's super-block) . (pooled k of each key
       super-block) * scale rank the key super-blocks the row can see;
    2. the best `expand` of them are expanded to their key blocks (the candidates);
    3. the candidates are scored by (pooled q block) . (pooled k block) * scale and the best
       are picked within `budget` (forced sink and diagonal blocks count inside it).
    budget: >= 1 is a number of blocks per row (rounded up); in (0, 1) a density (per row,
        ceil(budget * causal blocks in the row), as Policy kind "density").
    super_block: int >= 1, blocks per super-block (both axes).
    expand: int >= 1, super-blocks expanded per row; default ceil(2 * row budget / super_block)
        so the fine stage chooses among about twice the budget.
    keep_sink: force key block 0. The diagonal blocks are always forced.
    scale: default 1 / sqrt(D).
    shared_kv_group: average the scores over each KV group and select once per group (H = Hkv).
    """
    N, M, B, Hq, Hkv = check_qk(q, k, q_len=q_len, kv_len=kv_len, num_heads=num_heads,
                                batch=batch, block_size=block_size, device=device)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) \
            or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget: expected blocks per row (>= 1) or a density in (0, 1), "
                         f"got {budget!r}")
    check_int("super_block", super_block, 1)
    if expand is not None:
        check_int("expand", expand, 1)
    check_bool("keep_sink", keep_sink)
    check_bool("shared_kv_group", shared_kv_group)
    G, D = Hq // Hkv, q.shape[-1]
    scale = check_scale(scale, q.shape[-1])
    sb = super_block
    qp = block_pool(q, block_size)  # [B, Hq, Qb, D]
    kp = block_pool(k, block_size).repeat_interleave(G, dim=1)  # [B, Hq, Kb, D]
    Qb, Kb = qp.shape[2], kp.shape[2]
    fine = qp @ kp.transpose(-1, -2) * scale  # [B, Hq, Qb, Kb]
    coarse = _pool_rows(qp, sb) @ _pool_rows(kp, sb).transpose(-1, -2) * scale  # [B, Hq, Qs, Ks]
    if shared_kv_group:
        fine, coarse = group_mean(fine, Hkv), group_mean(coarse, Hkv)
    allowed = block_causal(N, M, block_size, device=q.device)  # [Qb, Kb]
    Ks = coarse.shape[-1]
    pad = Ks * sb - Kb
    allowed_s = torch.nn.functional.pad(allowed, (0, pad)).view(Qb, Ks, sb).any(-1)  # [Qb, Ks]
    rows = torch.arange(Qb, device=q.device)
    per_row = allowed.sum(-1)  # [Qb]
    if budget >= 1:
        policy = Policy("top_k", k=math.ceil(budget), keep_sink=keep_sink)
        k_rows = torch.full_like(per_row, math.ceil(budget))
    else:
        policy = Policy("density", density=float(budget), keep_sink=keep_sink)
        k_rows = torch.ceil(per_row.double() * budget - 1e-9).long()
    m_rows = torch.full_like(k_rows, expand) if expand is not None \
        else torch.ceil(2 * k_rows.double() / sb).long()  # [Qb]
    key = coarse[:, :, rows // sb].masked_fill(~allowed_s, float("-inf"))  # [B, H, Qb, Ks]
    mmax = max(1, min(int(m_rows.max()), Ks))
    val, idx = key.topk(mmax, dim=-1)
    slot = (torch.arange(mmax, device=q.device) < m_rows[:, None]) & (val > float("-inf"))
    chosen = torch.zeros(key.shape, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, idx, slot)
    candidates = chosen.repeat_interleave(sb, dim=-1)[..., :Kb] & allowed  # [B, H, Qb, Kb]
    forced = forced_blocks(N, M, block_size, keep_sink=keep_sink, keep_diagonal=True,
                           device=q.device)
    scores = fine.masked_fill(~candidates, float("-inf"))
    dense = policy.select(scores, q_len=N, kv_len=M, block_size=block_size)
    return finish(dense & (candidates | forced), q_len=N, kv_len=M, block_size=block_size)
