"""The true attention, pooled to blocks: targets for gates, the oracle, and attention recall.

Chunked over query rows, so only one chunk's [rows, kv_len] scores exist at a time.
"""

from __future__ import annotations

import math

import torch

from adaptive_sparse.masks import num_blocks

_CHUNK_ELEMENTS = 1 << 25


def block_attention_maps(q: torch.Tensor, k: torch.Tensor, *, block_size: int,
                         scale: float | None = None, causal: bool = True,
                         chunk_elements: int = _CHUNK_ELEMENTS):
    """Block-pooled maps of softmax(q k^T * scale) with the end-aligned causal rule.

    q [B, Hq, N, D], k [B, Hkv, M, D] (GQA by Hq % Hkv == 0, K not repeated).
    Returns (block_max, block_sum), float32 [B, Hq, Qb, Kb]:
      block_max: max probability inside each tile, then normalized so each row sums to 1
                 (the gate's distillation target);
      block_sum: attention mass of each tile averaged over the tile's query rows (rows sum to 1):
                 the recall of a mask is the sum of block_sum over its selected tiles / Qb rows.
    Tiles outside the causal region are 0.
    """
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"k: expected a KV head count dividing Hq={Hq}, got {Hkv}")
    G = Hq // Hkv
    bs = block_size
    Qb, Kb = num_blocks(N, bs), num_blocks(M, bs)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    offset = M - N if causal else 0
    kf = k.float()
    bmax = torch.zeros(B, Hkv, G, Qb, Kb, dtype=torch.float32, device=q.device)
    bsum = torch.zeros_like(bmax)
    rows_per_chunk = max(bs, (chunk_elements // max(1, B * Hq * M)) // bs * bs)
    qg = q.view(B, Hkv, G, N, D)
    for r0 in range(0, N, rows_per_chunk):
        r1 = min(N, r0 + rows_per_chunk)
        R = r1 - r0
        kv_end = min(M, r1 + offset) if causal else M
        s = torch.matmul(qg[:, :, :, r0:r1].float().reshape(B, Hkv, G * R, D),
                         kf[:, :, :kv_end].transpose(-1, -2)).view(B, Hkv, G, R, kv_end) * scale
        if causal:
            rows = torch.arange(r0, r1, device=q.device)
            cols = torch.arange(kv_end, device=q.device)
            s = s.masked_fill(cols[None, :] > rows[:, None] + offset, float("-inf"))
        p = torch.softmax(s, dim=-1)
        kb_end = num_blocks(kv_end, bs)
        pad_k = kb_end * bs - kv_end
        pad_r = num_blocks(R, bs) * bs - R
        if pad_k or pad_r:
            p = torch.nn.functional.pad(p, (0, pad_k, 0, pad_r))
        p = p.view(B, Hkv, G, -1, bs, kb_end, bs)
        qb0 = r0 // bs
        qb1 = qb0 + p.shape[3]
        bmax[:, :, :, qb0:qb1, :kb_end] = p.amax(dim=(4, 6))
        bsum[:, :, :, qb0:qb1, :kb_end] = p.sum(dim=(4, 6))
    rows_in_block = torch.clamp(N - torch.arange(Qb, device=q.device) * bs, max=bs).float()
    bsum = bsum / rows_in_block[:, None]
    bmax = bmax / bmax.sum(-1, keepdim=True).clamp_min(1e-30)
    return bmax.view(B, Hq, Qb, Kb), bsum.view(B, Hq, Qb, Kb)


def attention_recall(block_sum: torch.Tensor, dense_mask: torch.Tensor) -> torch.Tensor:
    """Fraction of true attention mass inside the selected tiles, per head: float [Hq].

    block_sum float [B, Hq, Qb, Kb] from `block_attention_maps`; dense_mask bool [B|1, H, Qb, Kb]
    with H dividing Hq (a per-group mask is repeated over its query heads)."""
    Hq, Hm = block_sum.shape[1], dense_mask.shape[1]
    if Hq % Hm:
        raise ValueError(f"dense_mask: expected heads dividing {Hq}, got {Hm}")
    dm = dense_mask.repeat_interleave(Hq // Hm, dim=1) if Hm != Hq else dense_mask
    kept = (block_sum * dm).sum(-1)  # [B, Hq, Qb]
    return kept.mean(dim=(0, 2))
