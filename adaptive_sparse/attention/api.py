"""`block_sparse_attention`: the one public entry. Validates, then dispatches by backend name.

Explicitly named backends never fall back silently; `auto` picks triton on CUDA and the
reference elsewhere, and logs which.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from adaptive_sparse.masks import BlockSparseMask

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "gather", "triton", "flex")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_head_tensor(name: str, t, dtypes=_DTYPES) -> None:
    """A rank-4 tensor of one of `dtypes`: q [B, Hq, N, D] or k/v [B, Hkv, M, D]."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        want = "[B, Hq, N, D]" if name == "q" else "[B, Hkv, M, D]"
        raise ValueError(f"{name}: expected rank 4 {want}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name}: expected dtype in ({names}), got {t.dtype}")


def _check_inputs(q, k, v, mask, scale, check_finite: bool) -> float:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_head_tensor(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, N, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"k: expected batch {B} (that of q), got {k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"k: expected head_dim {D} (that of q), got {k.shape[3]}")
    Hkv = k.shape[1]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"k: expected a KV head count dividing Hq={Hq}, got Hkv={Hkv}")
    if N < 1 or k.shape[2] < 1:
        raise ValueError(f"q, k: expected non-empty sequences, got N={N}, M={k.shape[2]}")
    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"mask: expected a BlockSparseMask, got {type(mask).__name__}")
    if mask.q_len != N:
        raise ValueError(f"mask: expected q_len == q.shape[2] == {N}, got q_len={mask.q_len}")
    if mask.kv_len != k.shape[2]:
        raise ValueError(f"mask: expected kv_len == k.shape[2] == {k.shape[2]}, "
                         f"got kv_len={mask.kv_len}")
    if mask.batch not in (1, B):
        raise ValueError(f"mask: expected batch 1 or {B}, got {mask.batch}")
    if mask.heads not in (1, Hkv, Hq):
        raise ValueError(f"mask: expected heads 1, Hkv={Hkv} or Hq={Hq}, got {mask.heads}")
    if mask.device != q.device:
        raise ValueError(f"mask: expected device {q.device} (that of q), got {mask.device}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite float, got {scale!r}")
    if check_finite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: expected finite values, found NaN or inf")
    return float(scale)


def _triton_usable(q) -> bool:
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: BlockSparseMask, *, scale: float | None = None,
                           backend: str = "auto", return_lse: bool = False,
                           check_finite: bool = False):
    """Attention of q over the key blocks that `mask` selects.

    q:    [B, Hq, N, D] float32 | float16 | bfloat16
    k, v: [B, Hkv, M, D], Hq % Hkv == 0 (GQA; K/V are not repeated)
    mask: BlockSparseMask with q_len = N, kv_len = M, batch 1|B, heads 1|Hkv|Hq
    scale: defaults to 1 / sqrt(D)
    backend: "auto" (triton on CUDA, reference elsewhere), "reference", "gather" (PyTorch,
        work proportional to density: the fast path on CPU), "triton", "flex"
    return_lse: also return the natural-log log-sum-exp, float32 [B, Hq, N] (-inf for rows
        that select no block; their output is zeros)
    check_finite: refuse NaN/inf inputs (one extra pass over q, k, v)

    Returns out [B, Hq, N, D] in q's dtype (fp32 accumulation), or (out, lse).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    scale = _check_inputs(q, k, v, mask, scale, check_finite)
    if backend == "auto":
        backend = "triton" if q.is_cuda and _triton_available() else "reference"
        log.debug("block_sparse_attention: auto picked backend %r", backend)
    match backend:
        case "reference":
            from adaptive_sparse.attention.reference import reference_attention
            return reference_attention(q, k, v, mask, scale, return_lse)
        case "gather":
            from adaptive_sparse.attention.gather import gather_attention
            return gather_attention(q, k, v, mask, scale, return_lse)
        case "flex":
            from adaptive_sparse.attention.flex import flex_attention_forward
            return flex_attention_forward(q, k, v, mask, scale, return_lse)
        case "triton":
            if not _triton_available():
                raise RuntimeError("backend 'triton': the triton package is not installed "
                                   "(pip install triton)")
            if not _triton_usable(q):
                raise RuntimeError("backend 'triton': needs CUDA tensors (or TRITON_INTERPRET=1 "
                                   f"for the CPU interpreter); got device {q.device}")
            from adaptive_sparse.attention.triton import triton_block_sparse_attention
            return triton_block_sparse_attention(q, k, v, mask, scale, return_lse)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
