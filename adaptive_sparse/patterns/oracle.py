"""The oracle: the true attention's block map, through a policy (the upper bound)."""

from __future__ import annotations

import torch

from adaptive_sparse.attention.api import check_scale
from adaptive_sparse.attention.block_maps import block_attention_maps
from adaptive_sparse.masks import BlockSparseMask
from adaptive_sparse.patterns._common import check_bool, check_qk, finish, group_mean
from adaptive_sparse.policies import Policy

TARGETS = ("sum", "max")


def oracle(*, q: torch.Tensor, k: torch.Tensor, q_len: int | None = None,
           kv_len: int | None = None, num_heads: int | None = None, block_size: int = 64,
           batch: int | None = None, device=None, policy=None, target: str = "sum",
           scale: float | None = None, layer_idx: int = 0, num_layers: int = 1,
           shared_kv_group: bool = False) -> BlockSparseMask:
    """`block_attention_maps(q, k)` then `policy.select(map, scores_are_probs=True)`.

    q [B, Hq, N, D] (post-rotary), k [B, Hkv, M, D].
    policy: a `Policy` or its dict (required), e.g. {"kind": "top_p", "p": 0.95}.
    target: "sum" ranks tiles by attention mass (block_sum), "max" by the row-normalized block
        max (the gates' distillation target).
    scale: softmax scale, a finite positive float; default 1 / sqrt(D).
    layer_idx, num_layers: passed to the policy for per-layer budgets.
    shared_kv_group: average the maps over each KV group's query heads and select once per
        group (H = Hkv) instead of per query head (H = Hq).
    """
    return oracle_with_maps(q=q, k=k, q_len=q_len, kv_len=kv_len, num_heads=num_heads,
                            block_size=block_size, batch=batch, device=device, policy=policy,
                            target=target, scale=scale, layer_idx=layer_idx,
                            num_layers=num_layers, shared_kv_group=shared_kv_group)[0]


def oracle_with_maps(*, q: torch.Tensor, k: torch.Tensor, q_len: int | None = None,
                     kv_len: int | None = None, num_heads: int | None = None,
                     block_size: int = 64, batch: int | None = None, device=None, policy=None,
                     target: str = "sum", scale: float | None = None, layer_idx: int = 0,
                     num_layers: int = 1, shared_kv_group: bool = False):
    """`oracle` that also returns the true block maps it ranked: (mask, block_max, block_sum),
    maps float32 [B, Hq, Qb, Kb] (for callers that reuse them, e.g. attention recall)."""
    N, M, B, Hq, Hkv = check_qk(q, k, q_len=q_len, kv_len=kv_len, num_heads=num_heads,
                                batch=batch, block_size=block_size, device=device)
    if policy is None:
        raise ValueError("policy: required by pattern 'oracle' (a Policy or a dict)")
    policy = Policy.coerce(policy)
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
    check_bool("shared_kv_group", shared_kv_group)
    scale = check_scale(scale, q.shape[-1])
    policy.layer_factor(layer_idx, num_layers)  # checks layer_idx and num_layers
    bmax, bsum = block_attention_maps(q, k, block_size=block_size, scale=scale, causal=True)
    scores = bsum if target == "sum" else bmax  # [B, Hq, Qb, Kb]
    if shared_kv_group:
        scores = group_mean(scores, Hkv)
    dense = policy.select(scores, q_len=N, kv_len=M, block_size=block_size,
                          layer_idx=layer_idx, num_layers=num_layers, scores_are_probs=True)
    return finish(dense, q_len=N, kv_len=M, block_size=block_size), bmax, bsum
