"""Block-sparse decode attention: one new query token per sequence over a KV cache.

`sparse_decode_attention` is the one public entry (validates, then dispatches by backend name);
`decode_reference` is its PyTorch twin and the ground truth of the tests. The Triton split-KV
kernel lives in `adaptive_sparse.attention.triton.decode`.

Selection is per KV head and shared by the head's GQA query group: for sequence b and KV head h
the query heads h * G .. h * G + G - 1 read the cache blocks
`kv_indices[b, h, :kv_num_blocks[b, h]]` (distinct block numbers; block j holds the tokens
j * block_size .. j * block_size + block_size - 1). Sequence b holds `cache_seqlens[b]` valid
tokens; the new token's query sees every selected token before that length (the token itself is
already in the cache, as transformers' caches hold it). Blocks at or past the end of a sequence
and tokens past its length contribute nothing, so the last partial block is handled without
padding. A query whose selection is empty returns zeros and a log-sum-exp of -inf.
"""

from __future__ import annotations

import math

import torch

from adaptive_sparse.attention.api import check_head_tensor, check_triton
from adaptive_sparse.errors import fail
from adaptive_sparse.masks import SUPPORTED_BLOCK_SIZES, BlockSparseMask

DECODE_BACKENDS = ("auto", "reference", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_int_table(name: str, t, shape: str, rank: int, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32 or t.dim() != rank:
        raise fail(name, f"int32 {shape}", f"{t.dtype} of shape {tuple(t.shape)}")
    if t.device != device:
        raise fail(name, f"device {device} (that of q)", t.device)


def _validate(q, k_cache, v_cache, cache_seqlens, kv_num_blocks, kv_indices, block_size, scale,
              out, check_indices) -> float:
    """Checks shapes, dtypes and devices (no view or allocation: this runs every decode step);
    returns the scale."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q: expected a torch.Tensor, got {type(q).__name__}")
    if not (q.dim() == 3 or (q.dim() == 4 and q.shape[2] == 1)):
        raise fail("q", "[B, Hq, D] or [B, Hq, 1, D] (one query token)", tuple(q.shape))
    if q.dtype not in DTYPES:
        raise fail("q", f"a dtype in {DTYPES}", q.dtype)
    check_head_tensor("k", k_cache)
    check_head_tensor("v", v_cache)
    B, Hq, D = q.shape[0], q.shape[1], q.shape[-1]
    Bk, Hkv, M, Dk = k_cache.shape
    dev = q.device
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise fail("k, v", f"dtype {q.dtype} (that of q)", f"{k_cache.dtype}, {v_cache.dtype}")
    if k_cache.device != dev or v_cache.device != dev:
        raise fail("k, v", f"device {dev} (that of q)", f"{k_cache.device}, {v_cache.device}")
    if Bk != B or Dk != D:
        raise fail("k", f"[{B}, Hkv, M, {D}] (batch and head_dim of q)", tuple(k_cache.shape))
    if v_cache.shape != k_cache.shape:
        raise fail("v", f"the shape of k {tuple(k_cache.shape)}", tuple(v_cache.shape))
    if Hq % Hkv:
        raise fail("k", f"a KV head count dividing Hq={Hq}", f"Hkv={Hkv}")
    if isinstance(block_size, bool) or block_size not in SUPPORTED_BLOCK_SIZES:
        raise fail("block_size", f"one of {SUPPORTED_BLOCK_SIZES}", block_size)
    if cache_seqlens is not None:
        _check_int_table("cache_seqlens", cache_seqlens, "[B]", 1, dev)
        if cache_seqlens.shape[0] != B:
            raise fail("cache_seqlens", f"shape [{B}]", tuple(cache_seqlens.shape))
    if (kv_num_blocks is None) != (kv_indices is None):
        raise fail("kv_num_blocks, kv_indices", "both given (sparse) or both None (dense)",
                   f"{type(kv_num_blocks).__name__}, {type(kv_indices).__name__}")
    if kv_indices is not None:
        _check_int_table("kv_num_blocks", kv_num_blocks, "[B, Hkv]", 2, dev)
        _check_int_table("kv_indices", kv_indices, "[B, Hkv, Kmax]", 3, dev)
        if kv_num_blocks.shape[0] not in (1, B) or kv_num_blocks.shape[1] not in (1, Hkv):
            raise fail("kv_num_blocks", f"[{B} or 1, {Hkv} or 1]", tuple(kv_num_blocks.shape))
        if kv_indices.shape[:2] != kv_num_blocks.shape:
            raise fail("kv_indices", f"leading dims {tuple(kv_num_blocks.shape)} "
                       "(those of kv_num_blocks)", tuple(kv_indices.shape))
        if check_indices:
            seqlens = cache_seqlens if cache_seqlens is not None \
                else torch.full((B,), M, dtype=torch.int32, device=dev)
            _check_indices(kv_num_blocks, kv_indices, seqlens, M, block_size)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale) or scale <= 0:
        raise fail("scale", "a positive finite float", scale)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
        if out.shape != q.shape or out.dtype != q.dtype or out.device != dev:
            raise fail("out", f"{tuple(q.shape)} {q.dtype} on {dev} (like q)",
                       f"{tuple(out.shape)} {out.dtype} on {out.device}")
    return float(scale)


def _check_indices(kv_num_blocks, kv_indices, cache_seqlens, M, block_size) -> None:
    """One device sync: counts in [0, Kmax], listed indices in [0, ceil(M / bs)), distinct."""
    kmax = kv_indices.shape[2]
    if bool(((kv_num_blocks < 0) | (kv_num_blocks > kmax)).any()):
        raise fail("kv_num_blocks", f"counts in [0, {kmax}]", "a count out of range")
    if int(cache_seqlens.min()) < 0 or int(cache_seqlens.max()) > M:
        raise fail("cache_seqlens", f"lengths in [0, {M}] (the cache's length)",
                    cache_seqlens.tolist())
    listed = torch.arange(kmax, device=kv_indices.device) < kv_num_blocks[..., None]
    idx = torch.where(listed, kv_indices.long(), -1)
    if bool((listed & ((idx < 0) | (idx >= -(-M // block_size)))).any()):
        raise fail("kv_indices", f"block numbers in [0, {-(-M // block_size)})",
                    "an index out of range")
    s = idx.sort(-1).values
    if bool(((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)).any()):
        raise fail("kv_indices", "distinct block numbers per (batch, KV head)", "a repeat")


def token_mask(cache_seqlens, kv_num_blocks, kv_indices, M: int, block_size: int, heads: int):
    """bool [B, Hkv, M]: the cache tokens each (sequence, KV head) reads (dense when the
    tables are None). Listed block numbers outside the cache are ignored."""
    B = cache_seqlens.shape[0]
    pos = torch.arange(M, device=cache_seqlens.device)
    valid = (pos[None, :] < cache_seqlens.long()[:, None])[:, None].expand(B, heads, M)
    if kv_indices is None:
        return valid
    kb = -(-M // block_size)
    kmax = kv_indices.shape[-1]
    listed = torch.arange(kmax, device=kv_indices.device) < kv_num_blocks[..., None]
    idx = torch.where(listed & (kv_indices >= 0) & (kv_indices < kb), kv_indices.long(), kb)
    blocks = torch.zeros(B, heads, kb + 1, dtype=torch.bool, device=kv_indices.device)
    blocks.scatter_(2, idx, True)
    return valid & blocks[:, :, pos // block_size]


def decode_reference(q, k_cache, v_cache, cache_seqlens, kv_num_blocks, kv_indices, *,
                     block_size: int, scale: float):
    """PyTorch twin of the decode kernel. q [B, Hq, D], caches [B, Hkv, M, D], tables as in
    `sparse_decode_attention` (already validated). Computes in float32, or float64 for float64
    inputs (the tests' oracle). Returns (out [B, Hq, D] in q.dtype, lse [B, Hq] float32|64)."""
    B, Hq, D = q.shape
    Hkv, M = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    ct = torch.promote_types(q.dtype, torch.float32)
    keep = token_mask(cache_seqlens, kv_num_blocks, kv_indices, M, block_size, Hkv)
    s = torch.einsum("bhgd,bhmd->bhgm", q.view(B, Hkv, G, D).to(ct), k_cache.to(ct)) * scale
    s = s.masked_fill(~keep[:, :, None], float("-inf"))  # [B, Hkv, G, M]
    lse = torch.logsumexp(s, -1)  # [B, Hkv, G]
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    o = torch.einsum("bhgm,bhmd->bhgd", p, v_cache.to(ct))
    return o.reshape(B, Hq, D).to(q.dtype), lse.reshape(B, Hq)


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                            cache_seqlens: torch.Tensor | None = None,
                            kv_num_blocks: torch.Tensor | None = None,
                            kv_indices: torch.Tensor | None = None, block_size: int = 64,
                            scale: float | None = None, backend: str = "auto",
                            return_lse: bool = False, out: torch.Tensor | None = None,
                            num_splits: int | None = None, check_indices: bool = False,
                            blocks_per_row: float | None = None):
    """Attention of one new token per sequence over the selected blocks of its KV cache.

    q:       [B, Hq, D] or [B, Hq, 1, D], float32 | float16 | bfloat16
    k_cache, v_cache: [B, Hkv, M, D] (Hq % Hkv == 0; GQA heads share their KV head's selection)
    cache_seqlens: int32 [B], valid tokens per sequence (None: all M); may differ per sequence
    kv_num_blocks: int32 [B, Hkv] and kv_indices: int32 [B, Hkv, Kmax] (leading dims may be 1
        to broadcast): the selected blocks, the first kv_num_blocks entries of each row; both
        None = dense (every block of the sequence)
    block_size: tokens per cache block (64 or 128 on the GPU; 16/32 for small tests)
    backend: "auto" (triton on CUDA, reference elsewhere), "reference", "triton"
    out: optional output buffer shaped like q (written in place and returned)
    num_splits: split-KV parallelism of the triton kernel (None = chosen from the shapes)
    check_indices: validate the tables' values (one device sync)
    blocks_per_row: selected blocks per row as known on the host (sizes the triton kernel's
        splits; None: the width of kv_indices); never changes the result

    Returns out (q's shape and dtype), and lse float32 [B, Hq] (or [B, Hq, 1] for a 4-D q)
    when `return_lse`."""
    if backend not in DECODE_BACKENDS:
        raise fail("backend", f"one of {DECODE_BACKENDS}", backend)
    if blocks_per_row is not None and (isinstance(blocks_per_row, bool) or not isinstance(
            blocks_per_row, (int, float)) or not blocks_per_row > 0
            or not math.isfinite(blocks_per_row)):
        raise fail("blocks_per_row", "None or a positive finite number", blocks_per_row)
    scale = _validate(q, k_cache, v_cache, cache_seqlens, kv_num_blocks, kv_indices, block_size,
                      scale, out, check_indices)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    if backend == "triton":
        check_triton(q)
        from adaptive_sparse.attention.triton.decode import triton_sparse_decode
        result, lse = triton_sparse_decode(q, k_cache, v_cache, cache_seqlens, kv_num_blocks,
                                           kv_indices, block_size=block_size, scale=scale,
                                           out=out, num_splits=num_splits,
                                           blocks_per_row=blocks_per_row)
    else:
        B, Hq, D = q.shape[0], q.shape[1], q.shape[-1]
        Hkv, M = k_cache.shape[1], k_cache.shape[2]
        seqlens = cache_seqlens if cache_seqlens is not None \
            else torch.full((B,), M, dtype=torch.int32, device=q.device)
        num = idx = None
        if kv_indices is not None:
            num = kv_num_blocks.expand(B, Hkv)
            idx = kv_indices.expand(B, Hkv, kv_indices.shape[2])
        o, lse = decode_reference(q.reshape(B, Hq, D), k_cache, v_cache, seqlens, num, idx,
                                  block_size=block_size, scale=scale)
        lse = lse.float()
        result = o.view(q.shape) if out is None else out.copy_(o.view(q.shape))
    if return_lse:
        return result, (lse.unsqueeze(2) if q.dim() == 4 else lse)
    return result


def decode_tables_from_mask(mask: BlockSparseMask, num_kv_heads: int):
    """(kv_num_blocks [Bm, Hm], kv_indices [Bm, Hm, Kmax]) of a one-query-block mask whose
    heads are 1 or the KV heads (what `sparse_decode_attention` reads), or None when the mask
    has a selection per query head of a GQA group (the decode kernel shares one per group)."""
    if mask.kv_num_blocks.shape[2] != 1:
        raise fail("mask", "one query block (q_len <= block_size)", f"q_len={mask.q_len}")
    if mask.heads not in (1, num_kv_heads):
        return None
    return mask.kv_num_blocks[:, :, 0], mask.kv_indices[:, :, 0]


def decode_attention_from_mask(q, k, v, mask: BlockSparseMask, *, scale: float,
                               backend: str = "auto"):
    """The decode step of a model's attention function. q [B, Hq, 1, D], k/v [B, Hkv, M, D],
    mask with q_len 1 and kv_len M. `backend` takes the prefill names: "triton"/"auto" run the
    split-KV kernel on CUDA, "reference"/"gather" (and "auto" on CPU) the PyTorch decode
    reference; "flex" and masks with a selection per query head of a GQA group run through
    `block_sparse_attention`. Returns [B, Hq, 1, D]."""
    from adaptive_sparse.attention.api import block_sparse_attention

    tables = decode_tables_from_mask(mask, k.shape[1])
    if tables is None or backend == "flex":
        return block_sparse_attention(q, k, v, mask, scale=scale, backend=backend)
    decode_backend = {"gather": "reference"}.get(backend, backend)
    num, idx = tables
    return sparse_decode_attention(q, k, v, kv_num_blocks=num.contiguous(),
                                   kv_indices=idx.contiguous(), block_size=mask.block_size,
                                   scale=scale, backend=decode_backend,
                                   blocks_per_row=mask.blocks_per_row)
