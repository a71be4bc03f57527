"""Fused block-pooled attention maps (the gate's training target) in O(N^2 / block^2) memory.

Two passes over the causal region. Pass 1 is the forward kernel without its P @ V product: the
log-sum-exp of every query row. Pass 2 recomputes each [block, block] score tile, turns it into
probabilities with that log-sum-exp and writes one max and one sum per tile. No N x N and no
N x Kb scratch exists at any time.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from adaptive_sparse.attention.triton.forward import (LOG2E, SMEM_BUDGET, check_head_dim,
                                                     launch_forward)


def check_fits(elem_bytes: int, block_size: int, head_dim: int, dtype=None) -> None:
    """A query tile and one key tile of `block_size` x `head_dim` must fit in shared memory
    (`SMEM_BUDGET`) for the block-map pass; refuses what cannot run (fp32 at 128 x 256)."""
    if 2 * elem_bytes * block_size * head_dim > SMEM_BUDGET:
        raise ValueError(
            f"block_size: {block_size} with head_dim {head_dim} in {dtype or elem_bytes} does "
            f"not fit in GPU shared memory for the block maps; use block_size <= "
            f"{SMEM_BUDGET // (2 * elem_bytes * head_dim)} or 16-bit inputs")


@triton.jit
def _map_tile(q, k_base, lse2, rows, start_n, stride_km, N_Q, N_KV, OFFSET, QK_SCALE,
              HEAD_DIM: tl.constexpr, BS: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BS)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = k_base + offs_n.to(tl.int64)[None, :] * stride_km + offs_d[:, None]
    if MASKED:
        k = tl.load(k_ptrs, mask=offs_n[None, :] < N_KV, other=0.0)
    else:
        k = tl.load(k_ptrs)
    s = tl.dot(q, k, input_precision=DOT_PREC)  # [BS, BS]
    p = tl.math.exp2(s * QK_SCALE - lse2[:, None])
    if MASKED:
        keep = (offs_n[None, :] < N_KV) & (rows[:, None] < N_Q)
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= rows[:, None] + OFFSET)
        p = tl.where(keep, p, 0.0)
    return tl.max(tl.max(p, 1), 0), tl.sum(tl.sum(p, 1), 0)


@triton.jit
def block_maps_kernel(Q, K, LSE, BMAX, BSUM,
                      stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_km,
                      H_Q, N_Q, N_KV, OFFSET, QK_SCALE, QB, KB,
                      G: tl.constexpr, BS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Grid (Qb, B * H_Q). Q [B, H_Q, N_Q, D], K [B, H_Q // G, N_KV, D], LSE fp32 [B, H_Q, N_Q]
    (natural log); BMAX, BSUM fp32 [B, H_Q, Qb, Kb]: max and sum of the probabilities of each
    tile, written for the tiles of the causal region only."""
    qb = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H_Q
    h = bh % H_Q
    hk = h // G
    rows = qb * BS + tl.arange(0, BS)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < N_Q
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_qm
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * N_Q + rows, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    k_base = K + b * stride_kb + hk * stride_kh
    out_base = (bh * QB + qb) * KB
    if CAUSAL:
        n_blk = (tl.minimum(qb * BS + BS, N_Q) - 1 + OFFSET) // BS + 1
        full_below = tl.minimum(qb * BS + OFFSET + 1, N_KV) // BS
    else:
        n_blk = tl.cdiv(N_KV, BS)
        full_below = N_KV // BS
    n_full = tl.where(qb * BS + BS <= N_Q, tl.minimum(n_blk, full_below), 0)
    for kb in range(0, n_full):
        bmax, bsum = _map_tile(q, k_base, lse2, rows, kb * BS, stride_km, N_Q, N_KV, OFFSET,
                               QK_SCALE, HEAD_DIM, BS, False, CAUSAL, DOT_PREC)
        tl.store(BMAX + out_base + kb, bmax)
        tl.store(BSUM + out_base + kb, bsum)
    for kb in range(n_full, n_blk):
        bmax, bsum = _map_tile(q, k_base, lse2, rows, kb * BS, stride_km, N_Q, N_KV, OFFSET,
                               QK_SCALE, HEAD_DIM, BS, True, CAUSAL, DOT_PREC)
        tl.store(BMAX + out_base + kb, bmax)
        tl.store(BSUM + out_base + kb, bsum)


def block_attention_maps_triton(q: torch.Tensor, k: torch.Tensor, *, block_size: int,
                                scale: float | None = None, causal: bool = True,
                                num_warps: int | None = None, lse_config: dict | None = None):
    """Block-pooled maps of softmax(q k^T * scale), end-aligned causal rule, fused on the GPU.

    q [B, Hq, N, D], k [B, Hkv, M, D] (GQA by Hq % Hkv == 0), fp32/fp16/bf16.
    Returns (block_max, block_sum), float32 [B, Hq, Qb, Kb], as
    `adaptive_sparse.attention.block_maps.block_attention_maps`: block_max row-normalized,
    block_sum = tile mass averaged over the tile's rows (rows sum to 1); tiles outside the
    causal region are 0. Memory beyond the outputs: the row log-sum-exp, fp32 [B, Hq, N].
    """
    if block_size not in (16, 32, 64, 128):
        raise ValueError(f"block_size: expected one of (16, 32, 64, 128), got {block_size!r}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q, k: expected rank 4, got {tuple(q.shape)} and {tuple(k.shape)}")
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    check_head_dim(D)
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k: expected [B={B}, Hkv, M, D={D}], got {tuple(k.shape)}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"k: expected a KV head count dividing Hq={Hq}, got {Hkv}")
    if causal and N > M:
        raise ValueError(f"q: expected q_len <= kv_len ({M}) when causal, got {N}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q = q.contiguous()
    k = k.contiguous()
    interpreted = not q.is_cuda
    if not interpreted:
        check_fits(q.element_size(), block_size, D, q.dtype)
    if lse_config is None and interpreted:
        lse_config = {"GH": 1, "RB": min(64, block_size), "BLOCK_N": min(64, block_size),
                      "USE_DESC": False, "num_warps": 4, "num_stages": 2}
    dummy = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=q.device)
    _, lse = launch_forward(q, k, k, kv_num_blocks=dummy[..., 0], kv_indices=dummy,
                            block_size=block_size, causal=causal, scale=scale, heads_per_mask=Hq,
                            shared=True, dense=True, write_o=False, return_lse=True,
                            config=lse_config)
    Qb, Kb = triton.cdiv(N, block_size), triton.cdiv(M, block_size)
    bmax = torch.zeros(B, Hq, Qb, Kb, dtype=torch.float32, device=q.device)
    bsum = torch.zeros_like(bmax)
    if num_warps is None:
        num_warps = 8 if block_size * D >= 128 * 128 else 4
    # pipelined K tiles next to the Q tile must fit in shared memory (fp32 at head_dim 256)
    tile = q.element_size() * block_size * D
    num_stages = max(1, min(3, (SMEM_BUDGET - tile) // tile))
    block_maps_kernel[(Qb, B * Hq)](
        q, k, lse, bmax, bsum, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), Hq, N, M, M - N if causal else 0,
        scale * LOG2E, Qb, Kb, G=Hq // Hkv, BS=block_size, HEAD_DIM=D, CAUSAL=causal,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps,
        num_stages=num_stages)
    rows = torch.clamp(N - torch.arange(Qb, device=q.device) * block_size, max=block_size)
    bsum = bsum / rows.float()[:, None]
    bmax = bmax / bmax.sum(-1, keepdim=True).clamp_min(1e-30)
    return bmax, bsum
