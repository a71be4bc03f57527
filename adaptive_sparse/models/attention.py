"""Route the attention of any Hugging Face causal LM through `block_sparse_attention`.

`register()` adds the name "adaptive_sparse" to transformers' `AttentionInterface` (the attention
function) and `AttentionMaskInterface` (the mask builder). No modeling file is copied: every model
whose attention layers call `ALL_ATTENTION_FUNCTIONS.get_interface(...)` (Llama, Mistral, Qwen,
Gemma 3, ...) runs through it once `model.config._attn_implementation == "adaptive_sparse"`.

For each layer a *provider* decides the mask: `provider(layer_idx, q, k) -> BlockSparseMask | None`
with q [B, Hq, N, D] (after rotary) and k [B, Hkv, M, D] (the whole KV cache when decoding,
N < M); None means dense causal attention.

An *observer* sees every attention layer, global and sliding-window: `observer(call)` with an
`AttentionCall` (layer index, q, k, v, scale, window) before the layer's attention runs.
`observe_attention(model, observer)` runs the model densely through SDPA (`dense_attention`:
flash / the CPU flash kernel, no N x M tensor) while observing it; `sparse_attention(...,
observer=...)` observes a sparse run.

Limits:
- No padding: the mask builder returns no mask (causality is applied by the attention itself)
  and refuses a 2D attention mask with padded positions; run one sequence per batch or equal
  lengths.
- Layers that the model marks as sliding-window (Gemma 3's local layers) run exact sliding-window
  attention (`dense_attention`); the provider is not called for them (the observer is).
- No attention dropout and no logit soft-capping.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from adaptive_sparse.attention.api import BACKENDS, PRECISIONS, block_sparse_attention
from adaptive_sparse.attention.decode import decode_attention_from_mask
from adaptive_sparse.errors import fail
from adaptive_sparse.masks import SUPPORTED_BLOCK_SIZES, BlockSparseMask

ATTN_NAME = "adaptive_sparse"
_STATE = "_adaptive_sparse_state"
_STACK = "_adaptive_sparse_stack"
_LOCAL_CHUNK = 2048  # benchmarks/local_window.py: fastest of 256-2048 at 8k and 32k on an H100


@dataclass(frozen=True)
class AttentionCall:
    """One attention layer's call, as an observer sees it (before the attention runs).

    q [B, Hq, N, D] after rotary; k, v [B, Hkv, M, D] (M >= N: the whole KV cache when
    decoding). The attention mask is always causal and end-aligned with no padding (the mask
    builder refuses padding): query i sits at position i + `q_offset` (= M - N) and sees keys
    j <= i + q_offset, on a sliding-window layer only those with j > i + q_offset - window."""

    layer_idx: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    window: int | None = None  # the layer's sliding window; None on a global layer

    @property
    def kind(self) -> str:
        """The layer's kind: "sliding" (the model marks it sliding-window) or "global"."""
        return "global" if self.window is None else "sliding"

    @property
    def q_offset(self) -> int:
        return self.k.shape[2] - self.q.shape[2]


Observer = Callable[[AttentionCall], None]


@dataclass(frozen=True)
class _State:
    """What the attention function needs, stored on every attention module of one model.
    sdpa: global layers too run `dense_attention` (the provider is then None)."""

    provider: object
    block_size: int
    backend: str
    precision: str = "input"
    observer: Observer | None = None
    sdpa: bool = False


def adaptive_sparse_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0,
                         kv_offset=0, mask_function=None, attention_mask=None, **kwargs):
    """AttentionMaskInterface entry: no mask (our attention applies causality itself).

    Refuses a 2D attention mask that pads any position, which this attention cannot honour."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 \
            and not bool(attention_mask.all()):
        raise ValueError("attention_mask: padding is not supported by the adaptive_sparse "
                         "attention; pass sequences of equal length without padding")
    return None


def check_unsupported(attention_mask, dropout, softcap, where: str) -> None:
    """Refuse what transformers may hand an attention function that `where` does not do:
    an explicit mask, attention dropout, logit soft-capping."""
    if attention_mask is not None:
        raise ValueError(f"attention_mask: {where} takes no explicit mask (padding and custom "
                         "masks are not supported)")
    if dropout:
        raise ValueError(f"dropout: expected 0 (no attention dropout), got {dropout}")
    if softcap is not None:
        raise ValueError(f"softcap: logit soft-capping is not supported, got {softcap}")


def adaptive_sparse_attention_forward(module, query: torch.Tensor, key: torch.Tensor,
                                      value: torch.Tensor, attention_mask, scaling=None,
                                      dropout: float = 0.0, sliding_window=None, softcap=None,
                                      **kwargs):
    """AttentionInterface entry.

    query [B, Hq, N, D], key/value [B, Hkv, M, D] (M >= N; queries are the last N positions).
    Returns (out [B, N, Hq, D], None)."""
    state = module.__dict__.get(_STATE)
    if state is None:
        raise RuntimeError("adaptive_sparse attention: this model has no provider; wrap the call "
                           "in `with sparse_attention(model, provider):`")
    check_unsupported(attention_mask, dropout, softcap, "the adaptive_sparse attention")
    B, Hq, N, D = query.shape
    M = key.shape[2]
    scale = float(scaling) if scaling is not None else D ** -0.5
    window = None if sliding_window is None else int(sliding_window)
    if state.observer is not None:
        state.observer(AttentionCall(module.layer_idx, query, key, value, scale, window))
    if window is not None or state.sdpa:
        out = dense_attention(query, key, value, scale=scale, window=window)
    else:
        mask = state.provider(module.layer_idx, query, key) if state.provider is not None else None
        if mask is None:
            mask = _full_mask(N, M, state.block_size, str(query.device))
        backend = state.backend  # "auto": block_sparse_attention's (triton on CUDA, else gather)
        if N == 1:  # a decode step: the split-KV decode kernel on CUDA
            out = decode_attention_from_mask(query, key, value, mask, scale=scale,
                                             backend=backend)
        else:
            out = block_sparse_attention(query, key, value, mask, scale=scale, backend=backend,
                                         precision=state.precision)
    return out.transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=64)
def _full_mask(q_len: int, kv_len: int, block_size: int, device: str) -> BlockSparseMask:
    return BlockSparseMask.full(1, 1, block_size=block_size, q_len=q_len, kv_len=kv_len,
                                device=torch.device(device))


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                    window: int | None = None) -> torch.Tensor:
    """Exact causal attention, end-aligned (query i at position i + M - N), through
    `F.scaled_dot_product_attention`; window: a sliding window (keys pos - window < j <= pos).

    Where every causal key is in the window and N == M (a prefill) or N == 1 (a decode step):
    one SDPA call with `is_causal` (flash on CUDA, the flash kernel on CPU; no N x M tensor),
    GQA as transformers' "sdpa" attention does it; otherwise `local_window_attention`'s chunks.
    q [B, Hq, N, D], k/v [B, Hkv, M, D] -> [B, Hq, N, Dv]."""
    N, M = q.shape[2], k.shape[2]
    if (window is not None and window < M) or 1 < N < M:
        return local_window_attention(q, k, v, window=M if window is None else window,
                                      scale=scale)
    groups = q.shape[1] // k.shape[1]
    # CUDA: repeated heads, never enable_gqa: with it, fp32 inputs (featurization) fall to SDPA's
    # math kernel, which materializes the N x M scores (56 GB for Qwen2.5 at 32k); without it they
    # take the memory-efficient kernel, 16-bit ones flash or cuDNN
    gqa = groups > 1 and k.shape[-1] == v.shape[-1] <= 256 and not q.is_cuda
    if groups > 1 and not gqa:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=N > 1,
                                          enable_gqa=gqa)


def local_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int,
                           scale: float, chunk: int = _LOCAL_CHUNK) -> torch.Tensor:
    """Exact causal sliding-window attention, end-aligned: query i (absolute position
    i + M - N) sees keys j with pos - window < j <= pos.

    q [B, Hq, N, D], k/v [B, Hkv, M, D] -> [B, Hq, N, D]; memory O(chunk * (chunk + window))."""
    B, Hq, N, D = q.shape
    M = k.shape[2]
    offset = M - N
    out = torch.empty(B, Hq, N, v.shape[-1], dtype=q.dtype, device=q.device)
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        k0 = max(0, r0 + offset - window + 1)
        k1 = r1 + offset
        pos = torch.arange(r0, r1, device=q.device)[:, None] + offset
        cols = torch.arange(k0, k1, device=q.device)[None, :]
        keep = (cols <= pos) & (cols > pos - window)  # [R, C]
        out[:, :, r0:r1] = F.scaled_dot_product_attention(
            q[:, :, r0:r1], k[:, :, k0:k1], v[:, :, k0:k1], attn_mask=keep, scale=scale,
            enable_gqa=Hq != k.shape[1])
    return out


def register() -> None:
    """Add "adaptive_sparse" to transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, adaptive_sparse_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, adaptive_sparse_mask)


def _attention_modules(model):
    mods = [m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and "Attention" in type(m).__name__]
    if not mods:
        raise ValueError(f"model: no attention modules with a layer_idx found in "
                         f"{type(model).__name__}")
    return mods


def _set_impl(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        model.config._attn_implementation = name


def enable_sparse_attention(model, provider, *, block_size: int = 64, backend: str = "auto",
                            precision: str = "input", observer: Observer | None = None) -> None:
    """Route `model`'s attention through `provider` until `disable_sparse_attention(model)`.

    provider: callable (layer_idx, q [B,Hq,N,D], k [B,Hkv,M,D]) -> BlockSparseMask | None,
        or None for dense causal attention through `block_sparse_attention`.
    block_size: block size of the dense mask used when the provider returns None.
    backend: passed to `block_sparse_attention`, whose "auto" is the one meaning everywhere
        (triton on CUDA, gather elsewhere). Calls nest (the previous state is restored).
    precision: `block_sparse_attention`'s ("fp8": 8-bit Q.K^T and P.V in the prefill, Triton on
        CUDA only; decode steps stay in the input precision).
    observer: callable (AttentionCall) -> None, called on every attention layer (sliding-window
        ones included) before its attention runs."""
    if provider is not None and not callable(provider):
        raise TypeError(f"provider: expected a callable (layer_idx, q, k) -> BlockSparseMask | "
                        f"None, got {type(provider).__name__}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size: expected one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    _enable(model, _State(provider, block_size, backend, precision, _check_observer(observer)))


def _check_observer(observer, *, required: bool = False):
    if (observer is not None or required) and not callable(observer):
        raise fail("observer", "a callable (AttentionCall) -> None", observer, cls=TypeError)
    return observer


def _enable(model, state: _State) -> None:
    register()
    mods = _attention_modules(model)
    stack = model.__dict__.setdefault(_STACK, [])
    stack.append((model.config._attn_implementation, mods[0].__dict__.get(_STATE)))
    for m in mods:
        m.__dict__[_STATE] = state
    _set_impl(model, ATTN_NAME)


def disable_sparse_attention(model) -> None:
    """Undo the last `enable_sparse_attention` on `model`."""
    stack = model.__dict__.get(_STACK)
    if not stack:
        raise RuntimeError("model: sparse attention is not enabled")
    impl, previous = stack.pop()
    for m in _attention_modules(model):
        if previous is None:
            m.__dict__.pop(_STATE, None)
        else:
            m.__dict__[_STATE] = previous
    _set_impl(model, impl)


@contextlib.contextmanager
def sparse_attention(model, provider, *, block_size: int = 64, backend: str = "auto",
                     precision: str = "input", observer: Observer | None = None):
    """`with sparse_attention(model, provider): model(ids)` runs every attention layer through
    `block_sparse_attention` with the provider's masks (sliding-window layers: exact windows),
    calls `observer` (if given) on every layer, and restores the previous attention
    implementation on exit."""
    enable_sparse_attention(model, provider, block_size=block_size, backend=backend,
                            precision=precision, observer=observer)
    try:
        yield model
    finally:
        disable_sparse_attention(model)


@contextlib.contextmanager
def observe_attention(model, observer: Observer):
    """`with observe_attention(model, observer): model(ids)` runs every attention layer as
    exact dense attention through SDPA (`dense_attention`; sliding-window layers keep their
    window) and calls `observer(AttentionCall)` on each, global and sliding-window, before
    its attention runs. Restores the previous attention implementation on exit."""
    observer = _check_observer(observer, required=True)
    _enable(model, _State(None, 64, "auto", observer=observer, sdpa=True))
    try:
        yield model
    finally:
        disable_sparse_attention(model)
