"""Reformer-style LSH: blocks whose pooled query and pooled key share a hash bucket attend."""

from __future__ import annotations

import torch

from adaptive_sparse.masks import BlockSparseMask
from adaptive_sparse.patterns._common import (block_pool, check_bool, check_int, check_qk,
                                              finish)
from adaptive_sparse.policies import forced_blocks


def lsh(*, q: torch.Tensor, k: torch.Tensor, q_len: int | None = None,
        kv_len: int | None = None, num_heads: int | None = None, block_size: int = 64,
        batch: int | None = None, device=None, n_buckets: int = 8, n_rounds: int = 2,
        seed: int = 0, keep_sink: bool = True, shared_kv_group: bool = False) -> BlockSparseMask:
    """Random-rotation hashing of block-mean-pooled q and k.

    q [B, Hq, N, D], k [B, Hkv, M, D] (GQA: query head h hashes against KV head h // (Hq/Hkv)).
    n_buckets: even int >= 2. A vector x is hashed to argmax([x R, -x R]) with R a random
        [D, n_buckets / 2] Gaussian rotation, drawn per round and per KV head (query heads of a
        group share their KV head's R, so query and key are hashed alike).
    n_rounds: int >= 1; a tile is kept if its query block and key block share a bucket in any
        round.
    seed: int >= 0, seeds a CPU generator (the same rotations on every device).
    keep_sink: also keep key block 0. The diagonal blocks are always kept.
    shared_kv_group: one mask per KV head (the union over its query heads) instead of per query
        head.
    Returns a mask with B = B and H = Hq (Hkv with shared_kv_group).
    """
    N, M, B, Hq, Hkv = check_qk(q, k, q_len=q_len, kv_len=kv_len, num_heads=num_heads,
                                batch=batch, block_size=block_size, device=device)
    check_int("n_buckets", n_buckets, 2)
    if n_buckets % 2:
        raise ValueError(f"n_buckets: expected an even int >= 2, got {n_buckets}")
    check_int("n_rounds", n_rounds, 1)
    check_int("seed", seed, 0)
    check_bool("keep_sink", keep_sink)
    check_bool("shared_kv_group", shared_kv_group)
    G, D = Hq // Hkv, q.shape[-1]
    qp = block_pool(q, block_size)  # [B, Hq, Qb, D]
    kp = block_pool(k, block_size)  # [B, Hkv, Kb, D]
    gen = torch.Generator().manual_seed(seed)
    rot = torch.randn(n_rounds, Hkv, D, n_buckets // 2, generator=gen).to(q.device)
    pq = torch.einsum("bhqd,rhdn->rbhqn", qp, rot.repeat_interleave(G, dim=1))
    pk = torch.einsum("bhkd,rhdn->rbhkn", kp, rot)
    bq = torch.cat([pq, -pq], -1).argmax(-1)  # [R, B, Hq, Qb]
    bk = torch.cat([pk, -pk], -1).argmax(-1).repeat_interleave(G, dim=2)  # [R, B, Hq, Kb]
    dense = (bq[..., :, None] == bk[..., None, :]).any(0)  # [B, Hq, Qb, Kb]
    if shared_kv_group:
        dense = dense.view(B, Hkv, G, *dense.shape[2:]).any(2)
    dense = dense | forced_blocks(N, M, block_size, keep_sink=keep_sink, keep_diagonal=True,
                                  device=q.device)
    return finish(dense, q_len=N, kv_len=M, block_size=block_size)
