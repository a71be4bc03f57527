"""Block-gather attention in plain PyTorch: the CPU fast path (`backend="gather"`).

Same semantics as the reference, but work proportional to the mask's density: for each query
block it gathers only the listed key blocks ([B, Hq, n_max, bs, D]) and takes an fp32 softmax
over them. Memory per step is O(Hq * n_max * bs * D). Tested against the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptive_sparse.masks import BlockSparseMask


def gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,
                     scale: float, return_lse: bool = False, *, out: torch.Tensor | None = None):
    """q [B, Hq, N, D], k/v [B, Hkv, M, D]; mask of batch 1|B and heads 1|Hkv|Hq.

    Writes into `out` [B, Hq, N, D] when given. Rows that see no key give zeros (lse -inf),
    rows that see a non-finite score give NaN, as in the reference."""
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bs = mask.block_size
    Kb = mask.num_kv_blocks
    offset = M - N if mask.causal else 0
    pad = Kb * bs - M
    work = torch.promote_types(q.dtype, torch.float32)  # float64 inputs: computed in float64
    kb = F.pad(k.to(work), (0, 0, 0, pad)).view(B, Hkv, Kb, bs, D)
    vb = F.pad(v.to(work), (0, 0, 0, pad)).view(B, Hkv, Kb, bs, v.shape[-1])
    num = mask.kv_num_blocks.expand(B, -1, -1)      # [B, Hm, Qb]
    idx = mask.kv_indices.expand(B, -1, -1, -1)     # [B, Hm, Qb, Kb]
    Hm = mask.heads
    # key/value head read by each mask head, and mask head used by each query head
    if Hm == Hq:
        kv_head_of_mask = torch.arange(Hq, device=q.device) // G
    elif Hm == Hkv:
        kv_head_of_mask = torch.arange(Hkv, device=q.device)
    else:
        kv_head_of_mask = None  # H = 1: every KV head, same blocks
    if out is None:
        out = torch.empty(B, Hq, N, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, N), float("-inf"), dtype=torch.float32, device=q.device)
    b_ar = torch.arange(B, device=q.device)[:, None, None]
    for qb in range(mask.num_q_blocks):
        n_max = int(num[:, :, qb].max())
        r0, r1 = qb * bs, min(N, (qb + 1) * bs)
        if n_max == 0:
            out[:, :, r0:r1] = 0
            continue
        sel = idx[:, :, qb, :n_max].long()                                  # [B, Hm, n]
        valid = torch.arange(n_max, device=q.device) < num[:, :, qb, None]  # [B, Hm, n]
        if kv_head_of_mask is None:  # gather for every KV head with the one shared row
            kh = torch.arange(Hkv, device=q.device)[None, :, None]
            sel_h, valid_h = sel.expand(B, Hkv, n_max), valid.expand(B, Hkv, n_max)
            kg, vg = kb[b_ar, kh, sel_h], vb[b_ar, kh, sel_h]
        else:
            kh = kv_head_of_mask[None, :, None]
            kg, vg = kb[b_ar, kh, sel], vb[b_ar, kh, sel]   # [B, Hm', n, bs, D]
            sel_h, valid_h = sel, valid
        Hg = kg.shape[1]  # KV heads (per-group or broadcast mask) or query heads
        qc = q[:, :, r0:r1].to(work).reshape(B, Hg, (Hq // Hg) * (r1 - r0), D)
        s = torch.matmul(qc, kg.reshape(B, Hg, n_max * bs, D).transpose(-1, -2)).mul_(scale)
        s = s.view(B, Hg, Hq // Hg, r1 - r0, n_max, bs)
        cols = sel_h[..., None] * bs + torch.arange(bs, device=q.device)    # [B, Hg, n, bs]
        ok = valid_h[..., None] & (cols < M)
        keep = ok[:, :, None, None]
        if mask.causal:
            rows = torch.arange(r0, r1, device=q.device)
            keep = keep & (cols[:, :, None, None] <= (rows + offset)[:, None, None])
        s = s.masked_fill_(~keep, float("-inf")).view(B, Hg, Hq // Hg, r1 - r0, n_max * bs)
        seen = keep.flatten(-2).any(-1, keepdim=True)  # [B, Hg, 1, R|1, 1]: rows that see a key
        m = s.amax(-1, keepdim=True)
        m = torch.where(seen, m, torch.zeros_like(m))  # NaN and +inf stay and propagate
        p = s.sub_(m).exp_()
        l = p.sum(-1, keepdim=True)
        o = torch.matmul(p.view(B, Hg, -1, n_max * bs), vg.reshape(B, Hg, n_max * bs, -1))
        o = o.view(B, Hg, Hq // Hg, r1 - r0, -1)
        o = torch.where(seen, o / l, torch.zeros_like(o))
        out[:, :, r0:r1] = o.reshape(B, Hq, r1 - r0, -1).to(q.dtype)
        lse[:, :, r0:r1] = torch.where(seen, m + torch.log(l),
                                       float("-inf")).reshape(B, Hq, r1 - r0)
    if return_lse:
        return out, lse
    return out
