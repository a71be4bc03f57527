"""`block_sparse_attention`: the one public entry. Validates, then dispatches by backend name.

Explicitly named backends never fall back silently; `auto` (`auto_backend`) picks the reference
for float64 inputs, triton on CUDA and gather elsewhere (what models run), and logs which.
"reference" is the ground truth of the tests.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from adaptive_sparse.masks import BlockSparseMask

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "gather", "triton", "flex")
PRECISIONS = ("input", "fp8")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # tensor-core dots: no float64
DTYPES = (*TRITON_DTYPES, torch.float64)  # the PyTorch backends also take float64


def check_head_tensor(name: str, t, dtypes=TRITON_DTYPES) -> None:
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
        check_head_tensor(name, t, DTYPES)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, N, D = q.shape
    if Hq < 1:
        raise ValueError(f"q: expected at least one query head, got shape {tuple(q.shape)}")
    if D < 1:
        raise ValueError(f"q: expected head_dim >= 1, got shape {tuple(q.shape)}")
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
    scale = check_scale(scale, D)
    if check_finite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: expected finite values, found NaN or inf")
    return scale


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale: None gives 1 / sqrt(head_dim); otherwise a finite positive number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite float, got {scale!r}")
    return float(scale)


def _check_out(out, q, k, v) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    want = (*q.shape[:3], v.shape[-1])
    if tuple(out.shape) != want or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out: expected shape {want}, dtype {q.dtype}, device {q.device}, got "
                         f"{tuple(out.shape)}, {out.dtype}, {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous tensor, got strides {out.stride()}")
    if out.numel() and any(t.numel() and out.untyped_storage().data_ptr()
                           == t.untyped_storage().data_ptr() for t in (q, k, v)):
        raise ValueError("out: expected a buffer that shares no memory with q, k or v")


def triton_available() -> bool:
    """Whether the triton package imports (the backend may still need CUDA)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def auto_backend(q: torch.Tensor, elsewhere: str) -> str:
    """What backend "auto" means for q: "reference" for float64 (the kernels have no float64;
    the reference computes in it), "triton" for CUDA tensors when triton imports, else
    `elsewhere` ("gather" for attention, "reference" for block maps)."""
    if q.dtype == torch.float64:
        return "reference"
    if q.is_cuda and triton_available():
        return "triton"
    return elsewhere


def check_triton(q: torch.Tensor) -> None:
    """Raise unless an explicitly requested triton backend can run on q: TypeError for a dtype
    the kernels lack (float64), RuntimeError without triton or a CUDA device / the interpreter."""
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"q: expected float16, bfloat16 or float32 for backend 'triton', got "
                        f"{q.dtype} (backend 'auto' or 'reference' takes float64)")
    if not triton_available():
        raise RuntimeError("backend 'triton': the triton package is not installed "
                           "(pip install triton)")
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError("backend 'triton': needs CUDA tensors (or TRITON_INTERPRET=1 "
                           f"for the CPU interpreter); got device {q.device}")


def _check_fp8(backend: str, return_lse: bool) -> None:
    if backend != "triton":
        raise ValueError(f"precision: 'fp8' runs on backend 'triton' only (CUDA, or "
                         f"TRITON_INTERPRET=1), got backend {backend!r}")
    if return_lse:
        raise ValueError("return_lse: expected False with precision 'fp8' (the fp8 kernel "
                         "writes no lse), got True")


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: BlockSparseMask, *, scale: float | None = None,
                           backend: str = "auto", return_lse: bool = False,
                           check_finite: bool = False, out: torch.Tensor | None = None,
                           precision: str = "input"):
    """Attention of q over the key blocks that `mask` selects.

    q:    [B, Hq, N, D] float32 | float16 | bfloat16 | float64 (not with "triton"), Hq >= 1,
          D >= 1 (B = 0 gives empty outputs)
    k, v: [B, Hkv, M, D], Hq % Hkv == 0 (GQA; K/V are not repeated)
    mask: BlockSparseMask with q_len = N, kv_len = M, batch 1|B, heads 1|Hkv|Hq
    scale: defaults to 1 / sqrt(D)
    backend: "auto" = "reference" for float64 inputs (the kernels have no float64; a TypeError
        for an explicit "triton"), else "triton" on CUDA when triton imports, else "gather" (the
        path models run); "reference" (plain PyTorch, the ground truth of the tests), "gather"
        (PyTorch, work proportional to density), "triton", "flex". A named backend never falls
        back.
    return_lse: also return the natural-log log-sum-exp, float32 [B, Hq, N] (-inf for rows
        that select no block; their output is zeros)
    check_finite: refuse NaN/inf in q, k, v (one extra pass). Without it non-finite inputs
        propagate as in torch SDPA: a row that attends to a NaN or inf input is non-finite
        (NaN), never a plausible zero.
    out: a contiguous [B, Hq, N, D] tensor of q's dtype and device that receives the output
        (every element is written); None allocates one.
    precision: "input" (the dots in the inputs' dtype, fp32 accumulation) or "fp8" (opt-in:
        int8 Q K^T (per-token Q and per-block K scales, K smoothed) and e4m3 P V by default,
        fp32 accumulation; the triton backend only, which "auto" must pick (CUDA), no lse;
        relative error 2-5e-2 against fp64 where bf16 is ~2e-3; see
        `attention/triton/forward_fp8.py`).

    Returns out [B, Hq, N, D] in q's dtype (fp32 accumulation), or (out, lse).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    scale = _check_inputs(q, k, v, mask, scale, check_finite)
    if out is not None:
        _check_out(out, q, k, v)
    if backend == "auto":
        backend = auto_backend(q, "gather")
        log.debug("block_sparse_attention: auto picked backend %r", backend)
    if precision == "fp8":
        _check_fp8(backend, return_lse)
    if backend == "triton":
        check_triton(q)
    if q.shape[0] == 0:  # an empty batch: nothing to compute
        if out is None:
            out = q.new_empty(*q.shape[:3], v.shape[-1])
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    match backend:
        case "reference":
            from adaptive_sparse.attention.reference import reference_attention
            return reference_attention(q, k, v, mask, scale, return_lse, out=out)
        case "gather":
            from adaptive_sparse.attention.gather import gather_attention
            return gather_attention(q, k, v, mask, scale, return_lse, out=out)
        case "flex":
            from adaptive_sparse.attention.flex import flex_attention_forward
            return flex_attention_forward(q, k, v, mask, scale, return_lse, out=out)
        case "triton" if precision == "fp8":
            from adaptive_sparse.attention.triton import triton_fp8_block_sparse_attention
            return triton_fp8_block_sparse_attention(q, k, v, mask, scale, out=out)
        case "triton":
            from adaptive_sparse.attention.triton import triton_block_sparse_attention
            return triton_block_sparse_attention(q, k, v, mask, scale, return_lse, out=out)
