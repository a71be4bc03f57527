"""The true attention, pooled to blocks: targets for gates, the oracle, and attention recall.

`block_attention_maps` is the one entry: "reference" is the chunked PyTorch computation below
(only one chunk's [rows, kv_len] scores exist at a time; causal chunks read only the keys they
can see), "triton" the fused kernel of `attention/triton/block_maps.py`.
"""

from __future__ import annotations

import torch

from adaptive_sparse.attention.api import DTYPES, auto_backend, check_scale, check_triton
from adaptive_sparse.masks import SUPPORTED_BLOCK_SIZES, num_blocks

MAP_BACKENDS = ("auto", "reference", "triton")
_CHUNK_ELEMENTS = 1 << 25


def block_attention_maps(q: torch.Tensor, k: torch.Tensor, *, block_size: int,
                         scale: float | None = None, causal: bool = True,
                         backend: str = "auto", chunk_elements: int = _CHUNK_ELEMENTS):
    """Block-pooled maps of softmax(q k^T * scale) with the end-aligned causal rule.

    q [B, Hq, N, D], k [B, Hkv, M, D] (GQA by Hq % Hkv == 0, K not repeated); N <= M if causal.
    q, k: float32 | float16 | bfloat16 | float64 (float64 not with "triton": TypeError).
    backend: "auto" (reference for float64 inputs, else triton on CUDA when importable, else
        reference), "reference" (PyTorch, chunked: `chunk_elements` bounds the scores of one
        chunk; computed in float32, or float64 for float64 inputs: the oracle of the tests),
        "triton" (CUDA, or the interpreter with TRITON_INTERPRET=1).
    Returns (block_max, block_sum), float32 [B, Hq, Qb, Kb]:
      block_max: max probability inside each tile, then normalized so each row sums to 1
                 (the gate's distillation target);
      block_sum: attention mass of each tile averaged over the tile's query rows (rows sum to 1):
                 the recall of a mask is the sum of block_sum over its selected tiles / Qb rows.
    Tiles outside the causal region are 0.
    """
    if backend not in MAP_BACKENDS:
        raise ValueError(f"backend: expected one of {MAP_BACKENDS}, got {backend!r}")
    _check(q, k, block_size, causal)
    scale = check_scale(scale, q.shape[-1])
    if backend == "auto":
        backend = auto_backend(q, "reference")
    if backend == "triton":
        check_triton(q)
        from adaptive_sparse.attention.triton import block_attention_maps_triton

        return block_attention_maps_triton(q, k, block_size=block_size, scale=scale,
                                           causal=causal)
    return _maps_reference(q, k, block_size, scale, causal, chunk_elements)


def _check(q, k, block_size, causal) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a rank-4 tensor, got {got}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}: expected dtype in {DTYPES}, got {t.dtype}")
    B, Hq, N, D = q.shape
    if Hq < 1 or N < 1 or D < 1:
        raise ValueError(f"q: expected at least one head, row and head_dim, got {tuple(q.shape)}")
    if k.shape[0] != B or k.shape[3] != D or k.shape[2] < 1:
        raise ValueError(f"k: expected [B={B}, Hkv, M, D={D}], got {tuple(k.shape)}")
    if k.shape[1] < 1 or Hq % k.shape[1]:
        raise ValueError(f"k: expected a KV head count dividing Hq={Hq}, got {k.shape[1]}")
    if isinstance(block_size, bool) or block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size: expected one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {causal!r}")
    if causal and N > k.shape[2]:
        raise ValueError(f"q: expected q_len <= kv_len ({k.shape[2]}) when causal, got {N}")


def _maps_reference(q, k, bs: int, scale, causal: bool, chunk_elements: int):
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G = Hq // Hkv
    Qb, Kb = num_blocks(N, bs), num_blocks(M, bs)
    offset = M - N if causal else 0
    work = torch.promote_types(q.dtype, torch.float32)  # float64 inputs: computed in float64
    bmax = torch.zeros(B, Hkv, G, Qb, Kb, dtype=work, device=q.device)
    bsum = torch.zeros_like(bmax)
    qg = q.to(work).view(B, Hkv, G, N, D)
    kt = k.to(work).transpose(-1, -2)
    rows_per_chunk = max(bs, (chunk_elements // max(1, B * Hq * M)) // bs * bs)
    for r0 in range(0, N, rows_per_chunk):
        r1 = min(N, r0 + rows_per_chunk)
        R = r1 - r0
        kv_end = min(M, r1 + offset) if causal else M
        s = torch.matmul(qg[:, :, :, r0:r1].reshape(B, Hkv, G * R, D), kt[..., :kv_end])
        s = s.view(B, Hkv, G, R, kv_end).mul_(scale)  # [B, Hkv, G, R, kv_end]
        d0 = r0 + offset + 1  # keys from d0 on are hidden from some row of the chunk
        if causal and d0 < kv_end:
            hidden = torch.arange(d0, kv_end, device=q.device)[None, :] > \
                (torch.arange(r0, r1, device=q.device)[:, None] + offset)
            s[..., d0:kv_end].masked_fill_(hidden, float("-inf"))
        s.sub_(s.amax(-1, keepdim=True)).exp_()
        s.div_(s.sum(-1, keepdim=True))
        kb_end = num_blocks(kv_end, bs)
        pad_k, pad_r = kb_end * bs - kv_end, num_blocks(R, bs) * bs - R
        if pad_k or pad_r:
            s = torch.nn.functional.pad(s, (0, pad_k, 0, pad_r))
        qb0 = r0 // bs
        qb1 = qb0 + num_blocks(R, bs)
        s = s.view(B, Hkv, G, qb1 - qb0, bs, kb_end, bs)
        bmax[..., qb0:qb1, :kb_end] = s.amax(-1).amax(4)
        bsum[..., qb0:qb1, :kb_end] = s.sum(-1).sum(4)
    rows_in_block = torch.clamp(N - torch.arange(Qb, device=q.device) * bs, max=bs).to(work)
    bsum /= rows_in_block[:, None]
    bmax /= bmax.sum(-1, keepdim=True).clamp_min(1e-30)
    return bmax.view(B, Hq, Qb, Kb).float(), bsum.view(B, Hq, Qb, Kb).float()


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


def screen_masks(pairs) -> dict[str, float]:
    """{"density", "recall"}: the means over layers of (mask or None, true block sums
    [B, H, Qb, Kb]) pairs, a None mask (dense) counting density 1 and recall 1. How a method is
    screened on recorded q/k without a forward (sweeps' ModelEvaluator.screen, the demo)."""
    dens, recs = [], []
    for mask, bsum in pairs:
        if mask is None:
            dens.append(1.0)
            recs.append(1.0)
            continue
        dm = mask.to_dense()
        dens.append(float(mask.density()))
        recs.append(float(attention_recall(bsum, dm.expand(bsum.shape[0], *dm.shape[1:]))
                          .mean()))
    return {"density": sum(dens) / len(dens), "recall": sum(recs) / len(recs)}
