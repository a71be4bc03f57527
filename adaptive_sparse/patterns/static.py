"""Input-independent patterns: dense, sliding window, Longformer, BigBird, strided.

All are causal with queries aligned to the end of the keys (query row i sits at absolute position
i + kv_len - q_len). "Diagonal blocks" are the key blocks crossed by a query block's causal
diagonal (`masks.diagonal_blocks`); every pattern keeps them, so no query row is left empty.
Masks have shape B = batch, H = num_heads.
"""

from __future__ import annotations

import torch

from adaptive_sparse.masks import BlockSparseMask, block_causal, num_blocks
from adaptive_sparse.patterns._common import check_geometry, check_int, finish
from adaptive_sparse.policies import forced_blocks


def _expand(tile: torch.Tensor, batch: int, num_heads: int) -> torch.Tensor:
    return tile.expand(batch, num_heads, *tile.shape)  # [Qb, Kb] -> [B, H, Qb, Kb]


def _band(q_len, kv_len, block_size, window, device) -> torch.Tensor:
    """Diagonal blocks plus ceil(window / bs) key blocks before each row's first diagonal block.
    bool [Qb, Kb]."""
    before = num_blocks(window, block_size) if window else 0
    return forced_blocks(q_len, kv_len, block_size, keep_sink=False, keep_diagonal=True,
                         local_blocks=before, device=device)


def _global(q_len, kv_len, block_size, global_blocks, device) -> torch.Tensor:
    """Key blocks [0, g) as columns, and the query blocks holding a query at an absolute position
    < g * block_size as rows. bool [Qb, Kb]."""
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    out = torch.zeros(qb, kb, dtype=torch.bool, device=device)
    out[:, :global_blocks] = True
    first_pos = torch.arange(qb, device=device) * block_size + (kv_len - q_len)
    out[first_pos < global_blocks * block_size] = True
    return out


def dense(*, q_len: int, kv_len: int, num_heads: int = 1, block_size: int = 64, batch: int = 1,
          device=None) -> BlockSparseMask:
    """Causal full attention: every block of the causal region."""
    check_geometry(q_len, kv_len, num_heads, block_size, batch, device)
    return BlockSparseMask.full(batch, num_heads, block_size=block_size, q_len=q_len,
                                kv_len=kv_len, causal=True, device=device)


def sliding_window(*, q_len: int, kv_len: int, num_heads: int = 1, block_size: int = 64,
                   batch: int = 1, device=None, window: int = 512,
                   sink_blocks: int = 0) -> BlockSparseMask:
    """Mistral/LLaMA-style local window at block granularity.

    window: int >= 0, in tokens. Each query block keeps its diagonal blocks and the
        ceil(window / block_size) key blocks right before them, so every query sees at least its
        `window` most recent keys (the tile mask is a superset of the token window; up to
        block_size - 1 more keys are visible at the end of a block).
    sink_blocks: int >= 0, leading key blocks every row also keeps (attention sinks).
    """
    check_geometry(q_len, kv_len, num_heads, block_size, batch, device)
    check_int("window", window, 0)
    check_int("sink_blocks", sink_blocks, 0)
    tile = _band(q_len, kv_len, block_size, window, device)
    tile[:, :sink_blocks] = True
    return finish(_expand(tile, batch, num_heads), q_len=q_len, kv_len=kv_len,
                  block_size=block_size)


def longformer(*, q_len: int, kv_len: int, num_heads: int = 1, block_size: int = 64,
               batch: int = 1, device=None, window: int = 512,
               global_blocks: int = 1) -> BlockSparseMask:
    """Longformer: sliding window + global blocks.

    window: int >= 0, tokens of the local window (as in `sliding_window`).
    global_blocks: int >= 0. Key blocks [0, global_blocks) are attended by every query; the
        queries at absolute positions < global_blocks * block_size attend to every key before
        them. Both within causality; with q_len < kv_len the global query rows may lie before
        the queries and then do not appear.
    """
    check_geometry(q_len, kv_len, num_heads, block_size, batch, device)
    check_int("window", window, 0)
    check_int("global_blocks", global_blocks, 0)
    tile = _band(q_len, kv_len, block_size, window, device) \
        | _global(q_len, kv_len, block_size, global_blocks, device)
    return finish(_expand(tile, batch, num_heads), q_len=q_len, kv_len=kv_len,
                  block_size=block_size)


def bigbird(*, q_len: int, kv_len: int, num_heads: int = 1, block_size: int = 64,
            batch: int = 1, device=None, window: int = 192, global_blocks: int = 1,
            random_blocks: int = 2, seed: int = 0) -> BlockSparseMask:
    """BigBird: Longformer's window and globals plus seeded random key blocks.

    window, global_blocks: as in `longformer`.
    random_blocks: int >= 0, extra key blocks drawn per (batch, head, query block) uniformly
        among the causal blocks the row does not already keep (fewer when fewer are left).
    seed: int, seeds a CPU generator, so the mask is the same on every device and run; each
        batch entry and head gets its own draw.
    """
    check_geometry(q_len, kv_len, num_heads, block_size, batch, device)
    check_int("window", window, 0)
    check_int("global_blocks", global_blocks, 0)
    check_int("random_blocks", random_blocks, 0)
    check_int("seed", seed, 0)
    base = _band(q_len, kv_len, block_size, window, device) \
        | _global(q_len, kv_len, block_size, global_blocks, device)  # [Qb, Kb]
    out = _expand(base, batch, num_heads).clone()
    if random_blocks:
        gen = torch.Generator().manual_seed(seed)
        u = torch.rand(out.shape, generator=gen).to(out.device)  # [B, H, Qb, Kb]
        free = block_causal(q_len, kv_len, block_size, device=out.device) & ~base
        key = torch.where(free, u, torch.full_like(u, -1.0))
        val, idx = key.topk(min(random_blocks, key.shape[-1]), dim=-1)
        picked = torch.zeros_like(out)
        picked.scatter_(-1, idx, val >= 0)
        out |= picked
    return finish(out, q_len=q_len, kv_len=kv_len, block_size=block_size)


def strided(*, q_len: int, kv_len: int, num_heads: int = 1, block_size: int = 64,
            batch: int = 1, device=None, local_blocks: int = 2,
            stride: int = 4) -> BlockSparseMask:
    """Sparse-Transformer style: local blocks + every stride-th key block.

    local_blocks: int >= 0, key blocks kept right before each row's diagonal blocks (which are
        always kept).
    stride: int >= 1, key blocks 0, stride, 2 * stride, ... are kept by every row (block 0 is
        the attention sink).
    """
    check_geometry(q_len, kv_len, num_heads, block_size, batch, device)
    check_int("local_blocks", local_blocks, 0)
    check_int("stride", stride, 1)
    tile = forced_blocks(q_len, kv_len, block_size, keep_sink=False, keep_diagonal=True,
                         local_blocks=local_blocks, device=device)
    cols = torch.arange(tile.shape[1], device=tile.device)
    tile |= (cols % stride == 0)[None, :]
    return finish(_expand(tile, batch, num_heads), q_len=q_len, kv_len=kv_len,
                  block_size=block_size)

