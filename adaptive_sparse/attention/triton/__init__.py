"""Triton kernels: the block-sparse attention forward and the fused block-map (gate target) kernel.

Stand-alone: nothing here imports the reference implementation.
"""

from __future__ import annotations

import torch

from adaptive_sparse.attention.triton.block_maps import block_attention_maps_triton
from adaptive_sparse.attention.triton.forward import check_head_dim, default_config, launch_forward
from adaptive_sparse.attention.triton.forward_fp8 import fp8_block_sparse_attention
from adaptive_sparse.attention.triton.gate import scores_to_kv_indices
from adaptive_sparse.masks import BlockSparseMask

__all__ = ["triton_block_sparse_attention", "triton_fp8_block_sparse_attention",
           "triton_dense_causal_attention",
           "block_attention_maps_triton", "scores_to_kv_indices", "mean_blocks_per_row"]


def _prepare(q, k, v):
    check_head_dim(q.shape[-1])
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"v: expected head_dim {q.shape[-1]} (that of q), got {v.shape[-1]}")
    return tuple(t if t.stride(-1) == 1 and t.is_contiguous() else t.contiguous()
                 for t in (q, k, v))


def _interpreted(q) -> bool:
    return not q.is_cuda


def mean_blocks_per_row(mask: BlockSparseMask) -> float:
    """Mean kept key blocks per (batch, head, query block) row of `mask`: the autotune bucket.

    `mask.blocks_per_row` when the mask carries it (no device read). Otherwise, during CUDA-graph
    capture (no sync allowed) the width of `kv_indices` (exact for top-k masks, an upper bound
    otherwise), else one device read, kept on the mask while `kv_num_blocks` is unmodified."""
    if mask.blocks_per_row is not None:
        return mask.blocks_per_row
    num = mask.kv_num_blocks
    if num.is_cuda and torch.cuda.is_current_stream_capturing():
        return float(min(mask.kv_indices.shape[-1], mask.num_kv_blocks))
    version = None if num.is_inference() else num._version  # inference tensors have none
    measured = mask.__dict__.get("_measured_blocks_per_row")
    if measured is not None and version is not None and measured[0] == version:
        return measured[1]
    value = float(num.float().mean())
    object.__setattr__(mask, "_measured_blocks_per_row", (version, value))
    return value


def triton_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  mask: BlockSparseMask, scale: float, return_lse: bool = False,
                                  *, config: dict | None = None,
                                  blocks_per_row: float | None = None,
                                  out: torch.Tensor | None = None):
    """Block-sparse attention over the key blocks listed in `mask`.

    q [B, Hq, N, D], k/v [B, Hkv, M, D] (Hq % Hkv == 0; K/V never repeated), fp32/fp16/bf16,
    D in (16, 32, 64, 128, 256); mask: batch 1|B, heads 1|Hkv|Hq, q_len N, kv_len M.
    When the mask has 1 or Hkv heads, a program serves several query heads of one KV group.
    `config` pins the kernel's tile config (keys GH, RB, BLOCK_N, USE_DESC, num_warps,
    num_stages); None autotunes on CUDA, keyed by the number of query blocks and the mean kept
    blocks per row (`blocks_per_row`, else `mean_blocks_per_row(mask)`: the mask's hint), and
    uses a small fixed config in the interpreter.
    Returns out [B, Hq, N, D] in q.dtype (written into `out`, a contiguous tensor of that
    shape, dtype and device, when given), and lse fp32 [B, Hq, N] (natural log, -inf for rows
    with no visible key) when `return_lse`.
    """
    q, k, v = _prepare(q, k, v)
    Hq, Hkv = q.shape[1], k.shape[1]
    shared = mask.heads in (1, Hkv)
    if config is None and _interpreted(q):
        config = default_config(mask.block_size, q.shape[-1], Hq // Hkv, shared)
    if config is None and blocks_per_row is None:
        blocks_per_row = mean_blocks_per_row(mask)
    out, lse = launch_forward(
        q, k, v, kv_num_blocks=mask.kv_num_blocks.contiguous(),
        kv_indices=mask.kv_indices.contiguous(), block_size=mask.block_size, causal=mask.causal,
        scale=float(scale), heads_per_mask=Hq // mask.heads, shared=shared,
        return_lse=return_lse, config=config, blocks_per_row=blocks_per_row, out=out)
    return (out, lse) if return_lse else out


def triton_fp8_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      mask: BlockSparseMask, scale: float, *,
                                      out: torch.Tensor | None = None):
    """`fp8_block_sparse_attention` (e4m3 dots, per-block scales) with the checks and the
    autotune hint of `triton_block_sparse_attention`. Returns out [B, Hq, N, D] in q.dtype."""
    q, k, v = _prepare(q, k, v)
    hint = None if _interpreted(q) else mean_blocks_per_row(mask)
    return fp8_block_sparse_attention(q, k, v, mask, scale, out=out, blocks_per_row=hint)


def triton_dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  scale: float, return_lse: bool = False, *,
                                  causal: bool = True, block_size: int = 128,
                                  config: dict | None = None):
    """Dense (causal, end-aligned) attention with the same kernel, no index tables read.
    Shapes as in `triton_block_sparse_attention`."""
    q, k, v = _prepare(q, k, v)
    Hq, Hkv = q.shape[1], k.shape[1]
    if config is None and _interpreted(q):
        config = default_config(block_size, q.shape[-1], Hq // Hkv, True)
    dummy = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=q.device)
    out, lse = launch_forward(
        q, k, v, kv_num_blocks=dummy[..., 0], kv_indices=dummy, block_size=block_size,
        causal=causal, scale=float(scale), heads_per_mask=Hq, shared=True, dense=True,
        return_lse=return_lse, config=config)
    return (out, lse) if return_lse else out
