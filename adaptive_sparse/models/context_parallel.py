"""Context-parallel prefill of a Hugging Face causal LM.

Every rank runs the model on its zigzag shard of the tokens (`shard_sequence`), with the
tokens' global positions as `position_ids`, so rotary embeddings are those of the full sequence.
Embeddings, norms and MLPs act per token and need nothing from other ranks; the attention layers
run `context_parallel_attention` through transformers' `AttentionInterface` (name
"adaptive_sparse_cp"), which moves only the K/V tiles that the layer's mask reads.

A provider for this path is `provider(layer_idx, q_local [B, Hq, L, D], k_local [B, Hkv, L, D])
-> BlockSparseMask (global, N x N, identical on every rank) | LocalMask (this rank's rows) |
None (dense causal)`. Same limits as `adaptive_sparse.models.attention` (no padding, no
attention dropout or soft-capping); sliding-window layers are refused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from adaptive_sparse.attention.api import BACKENDS, auto_backend
from adaptive_sparse.attention.distributed import (
    _world, context_parallel_attention, local_positions, padded_length, shard_sequence)
from adaptive_sparse.models.attention import (
    _attention_modules, _set_impl, adaptive_sparse_mask, check_unsupported)

CP_ATTN_NAME = "adaptive_sparse_cp"
_CP_STATE = "_adaptive_sparse_cp_state"


@dataclass
class CPModelState:
    """What the attention layers of one context-parallel call share; `stats` collects one
    `CPStats` per attention call."""

    seq_len: int
    block_size: int
    group: object = None
    layout: str = "zigzag"
    backend: str = "auto"
    provider: object = None
    kernel_config: dict | None = None
    stats: list = field(default_factory=list)


def cp_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask, scaling=None, dropout: float = 0.0,
                         sliding_window=None, softcap=None, **kwargs):
    """AttentionInterface entry: query [B, Hq, L, D], key/value [B, Hkv, L, D] of this rank's
    shard. Returns (out [B, L, Hq, D], None)."""
    state = module.__dict__.get(_CP_STATE)
    if state is None:
        raise RuntimeError("adaptive_sparse_cp attention: wrap the call in "
                           "`with context_parallel_model(model, seq_len=...)`")
    check_unsupported(attention_mask, dropout, softcap, "the context-parallel attention")
    if sliding_window is not None:
        raise ValueError(f"sliding_window: context parallel runs full-attention layers only, "
                         f"got a window of {sliding_window}")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    mask = state.provider(module.layer_idx, query, key) if state.provider is not None else None
    backend = auto_backend(query, "gather") if state.backend == "auto" else state.backend
    out, stats = context_parallel_attention(
        query, key, value, mask, seq_len=state.seq_len, block_size=state.block_size,
        group=state.group, layout=state.layout, scale=scale, backend=backend,
        kernel_config=state.kernel_config, return_stats=True)
    state.stats.append(stats)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Add "adaptive_sparse_cp" to transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CP_ATTN_NAME, cp_attention_forward)
    AttentionMaskInterface.register(CP_ATTN_NAME, adaptive_sparse_mask)


@contextlib.contextmanager
def context_parallel_model(model, *, seq_len: int, block_size: int = 64, group=None,
                           layout: str = "zigzag", backend: str = "auto", provider=None,
                           kernel_config: dict | None = None):
    """Within the block, `model`'s attention layers are context parallel over `group` for a
    sequence of `seq_len` tokens; yields the `CPModelState` (its `stats` fill per layer).
    kernel_config pins the Triton tile config (backend "triton"), as in
    `context_parallel_attention`."""
    if provider is not None and not callable(provider):
        raise TypeError(f"provider: expected a callable (layer_idx, q_local, k_local) -> "
                        f"BlockSparseMask | LocalMask | None, got {type(provider).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    padded_length(seq_len, 1, block_size)  # validates seq_len and block_size
    register()
    mods = _attention_modules(model)
    previous = model.config._attn_implementation
    state = CPModelState(seq_len, block_size, group, layout, backend, provider, kernel_config)
    for m in mods:
        m.__dict__[_CP_STATE] = state
    _set_impl(model, CP_ATTN_NAME)
    try:
        yield state
    finally:
        for m in mods:
            m.__dict__.pop(_CP_STATE, None)
        _set_impl(model, previous)


def context_parallel_prefill(model, input_ids: torch.Tensor, *, block_size: int = 64,
                             group=None, layout: str = "zigzag", backend: str = "auto",
                             provider=None, kernel_config: dict | None = None,
                             **model_kwargs):
    """Prefill `input_ids` [B, N] (the full sequence, the same on every rank) with each rank
    holding its shard of the hidden states.

    Returns (the model's output for this rank's rows [B, L, ...], positions int64 [L], the
    per-layer `CPStats`). `gather_sequence(out.logits, dim=1, seq_len=N)` reassembles the full
    sequence; rows at positions >= N are padding."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a tensor [B, N], got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    rank, world = _world(group)
    B, N = input_ids.shape
    ids = shard_sequence(input_ids, dim=1, rank=rank, world=world, block_size=block_size,
                         layout=layout)
    pos = local_positions(N, rank, world, block_size, layout, device=input_ids.device)
    with context_parallel_model(model, seq_len=N, block_size=block_size, group=group,
                                layout=layout, backend=backend, provider=provider,
                                kernel_config=kernel_config) as state:
        out = model(input_ids=ids, position_ids=pos[None].expand(B, -1), use_cache=False,
                    **model_kwargs)
    return out, pos, state.stats


__all__ = ["CP_ATTN_NAME", "CPModelState", "context_parallel_model", "context_parallel_prefill",
           "cp_attention_forward", "register"]
