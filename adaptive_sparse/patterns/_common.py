"""Shared checks and helpers of the pattern functions."""

from __future__ import annotations

import math

import torch

from adaptive_sparse.masks import SUPPORTED_BLOCK_SIZES, BlockSparseMask, block_causal


def check_int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return value


def check_float(name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name}: expected a float in {interval}, got {value!r}")
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return value


def check_device(device) -> None:
    """None, or a device torch knows and this machine has."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device: expected None or a torch device such as 'cpu' or 'cuda', "
                         f"got {device!r}") from None
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device: expected an available device, got {device!r} (CUDA devices "
                         f"here: {torch.cuda.device_count() if torch.cuda.is_available() else 0})")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected None, 'cpu' or 'cuda', got {device!r}")


def check_geometry(q_len, kv_len, num_heads, block_size, batch, device=None) -> None:
    check_device(device)
    check_int("q_len", q_len, 1)
    check_int("kv_len", kv_len, 1)
    if q_len > kv_len:
        raise ValueError(f"q_len: expected <= kv_len ({kv_len}) for a causal mask, got {q_len}")
    check_int("num_heads", num_heads, 1)
    check_int("batch", batch, 1)
    if isinstance(block_size, bool) or block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size: expected one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")


def check_qk(q, k, *, q_len, kv_len, num_heads, batch, block_size, device):
    """Validate q [B, Hq, N, D] and k [B, Hkv, M, D] against the geometry arguments (which
    default to the tensors' own) and return (N, M, B, Hq, Hkv)."""
    from adaptive_sparse.attention.api import DTYPES, check_head_tensor

    for name, t in (("q", q), ("k", k)):
        check_head_tensor(name, t, DTYPES)
    if q.device != k.device:
        raise ValueError(f"k: expected device {q.device} (that of q), got {k.device}")
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    if k.shape[0] != B:
        raise ValueError(f"k: expected batch {B} (that of q), got {k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"k: expected head_dim {D} (that of q), got {k.shape[3]}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"k: expected a KV head count dividing Hq={Hq}, got Hkv={Hkv}")
    for name, given, actual in (("q_len", q_len, N), ("kv_len", kv_len, M),
                                ("num_heads", num_heads, Hq), ("batch", batch, B)):
        if given is not None and given != actual:
            raise ValueError(f"{name}: expected {actual} (from q and k), got {given!r}")
    if device is not None and torch.device(device) != q.device:
        raise ValueError(f"device: expected {q.device} (that of q) or None, got {device}")
    check_geometry(N, M, Hq, block_size, B)
    if not bool(torch.isfinite(q).all()) or not bool(torch.isfinite(k).all()):
        raise ValueError("q, k: expected finite values, found NaN or inf")
    return N, M, B, Hq, Hkv


def block_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean over the rows of each block: [B, H, L, D] -> float32 [B, H, ceil(L / bs), D]."""
    B, H, L, D = x.shape
    nb = (L + block_size - 1) // block_size
    pad = nb * block_size - L
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, pad))
    counts = torch.clamp(L - torch.arange(nb, device=x.device) * block_size, max=block_size)
    return xf.view(B, H, nb, block_size, D).sum(3) / counts[:, None].float()


def group_mean(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, ...] -> [B, Hkv, ...]: the mean over the query heads of each KV group."""
    B, Hq = x.shape[:2]
    return x.view(B, hkv, Hq // hkv, *x.shape[2:]).mean(2)


def finish(dense: torch.Tensor, *, q_len: int, kv_len: int, block_size: int) -> BlockSparseMask:
    """bool [B, H, Qb, Kb] -> causal BlockSparseMask (tiles outside the causal region dropped)."""
    allowed = block_causal(q_len, kv_len, block_size, device=dense.device)
    return BlockSparseMask.from_dense((dense & allowed).contiguous(), block_size=block_size,
                                      q_len=q_len, kv_len=kv_len, causal=True)
