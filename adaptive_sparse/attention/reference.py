"""Torch-only block-sparse attention: the ground truth for every test.

Chunked over query blocks, so memory is O(chunk_rows * kv_len * heads), never O(N^2). Within a
chunk it scores the chunk's rows against the keys up to the last one they can see, masks by the
block mask (expanded to elements) and the end-aligned causal rule, and takes an fp32 softmax
(float64 for float64 inputs: the fp64 oracle of the tests).
GQA: the Hq / Hkv query heads of a group are folded into the row dimension, so K and V are
never repeated.
"""

from __future__ import annotations

import torch

from adaptive_sparse.masks import BlockSparseMask

# elements of the fp32 score tile of one chunk: bounds the chunk's memory (~4 bytes each)
_CHUNK_ELEMENTS = 1 << 25


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: BlockSparseMask, scale: float, return_lse: bool = False,
                        chunk_elements: int = _CHUNK_ELEMENTS, *, out: torch.Tensor | None = None):
    """q [B, Hq, N, D], k/v [B, Hkv, M, D]; mask of batch 1|B and heads 1|Hkv|Hq.

    Returns out [B, Hq, N, D] in q.dtype, written into `out` when given (contiguous), and lse
    fp32 [B, Hq, N]. A row that sees no key gives zeros (lse -inf); a row that sees a NaN or
    inf score gives NaN (as softmax does)."""
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bs = mask.block_size
    offset = M - N if mask.causal else 0
    dense = mask.to_dense()  # [Bm, Hm, Qb, Kb]
    if mask.heads == 1:
        dense = dense[:, :, None].expand(-1, Hkv, G, -1, -1)
    elif mask.heads == Hkv:
        dense = dense[:, :, None].expand(-1, -1, G, -1, -1)
    else:  # one mask per query head
        dense = dense.view(mask.batch, Hkv, G, *dense.shape[2:])
    dense = dense.expand(B, -1, -1, -1, -1)  # [B, Hkv, G, Qb, Kb]

    work = torch.promote_types(q.dtype, torch.float32)  # float64 inputs: computed in float64
    kf, vf = k.to(work), v.to(work)
    if out is None:
        out = torch.empty(B, Hq, N, v.shape[-1], dtype=q.dtype, device=q.device)
    result = out
    out = out.view(B, Hkv, G, N, v.shape[-1])
    lse = torch.empty(B, Hkv, G, N, dtype=torch.float32, device=q.device)
    qg = q.view(B, Hkv, G, N, D)
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    rows_per_chunk = max(bs, (chunk_elements // max(1, B * Hq * M)) // bs * bs)
    for r0 in range(0, N, rows_per_chunk):
        r1 = min(N, r0 + rows_per_chunk)
        kv_end = min(M, r1 - 1 + offset + 1) if mask.causal else M
        qc = qg[:, :, :, r0:r1].to(work)  # [B, Hkv, G, R, D]
        s = torch.matmul(qc.reshape(B, Hkv, G * (r1 - r0), D), kf[:, :, :kv_end].transpose(-1, -2))
        s = s.view(B, Hkv, G, r1 - r0, kv_end).mul_(scale)
        rows = torch.arange(r0, r1, device=q.device)
        cols = torch.arange(kv_end, device=q.device)
        keep = dense[..., rows // bs, :][..., cols // bs]  # [B, Hkv, G, R, kv_end]
        if mask.causal:
            keep &= cols[None, :] <= rows[:, None] + offset
        s.masked_fill_(~keep, float("-inf"))
        seen = keep.any(-1, keepdim=True)  # [B, Hkv, G, R, 1]: rows that see a key
        m = s.amax(-1, keepdim=True)
        m = torch.where(seen, m, torch.zeros_like(m))  # NaN and +inf stay and propagate
        # under autograd (sparse-aware training, gating/adapt.py) nothing saved is overwritten
        p = (s - m).exp() if track else s.sub_(m).exp_()
        l = p.sum(-1, keepdim=True)
        o = torch.matmul(p.view(B, Hkv, G * (r1 - r0), kv_end), vf[:, :, :kv_end])
        o = o.view(B, Hkv, G, r1 - r0, -1)
        # clamp: l >= 1 where a row sees a key; rows that see none (l = 0) give no NaN gradient
        out[:, :, :, r0:r1] = torch.where(seen, o / (l.clamp_min(1.0) if track else l),
                                          torch.zeros_like(o)).to(q.dtype)
        lse[:, :, :, r0:r1] = torch.where(seen, m + torch.log(l), float("-inf")).squeeze(-1)
    if return_lse:
        return result, lse.view(B, Hq, N)
    return result
