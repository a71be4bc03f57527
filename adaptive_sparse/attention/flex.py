"""FlexAttention backend: the same mask, converted with `BlockSparseMask.to_flex()`."""

from __future__ import annotations

import torch

from adaptive_sparse.masks import BlockSparseMask


def flex_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: BlockSparseMask, scale: float, return_lse: bool = False,
                           compile: bool | None = None, *, out: torch.Tensor | None = None):
    """q [B, Hq, N, D], k/v [B, Hkv, M, D]. Rows with no block give zeros (Flex's behaviour).
    Flex allocates its own output; with `out` it is copied there.

    `compile` defaults to True on CUDA (eager Flex materializes scores) and False elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    Hq, Hkv = q.shape[1], k.shape[1]
    m = mask if mask.heads in (1, Hq) else mask.expand_heads(Hq)
    fn = flex_attention
    if compile is None:
        compile = q.is_cuda
    if compile:
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                            or v.requires_grad)
        fn = _compiled(train=grad and m.block_size < 128)
    kwargs = {}
    if return_lse:
        from torch.nn.attention.flex_attention import AuxRequest
        kwargs["return_aux"] = AuxRequest(lse=True)
    if compile:
        kwargs["kernel_options"] = kernel_options(m.block_size)
    res = fn(q, k, v, block_mask=m.to_flex(), scale=scale, enable_gqa=Hq != Hkv, **kwargs)
    o, aux = res if return_lse else (res, None)
    if out is not None:
        o = out.copy_(o)
    if return_lse:
        return o, aux.lse.float()  # natural-log lse; Flex gives -inf for rows with no block
    return o


_COMPILED: dict = {}


def kernel_options(block_size: int) -> dict:
    """Compiled Flex's tile sizes for a BlockMask of `block_size`: its default 128-row query
    tile must divide the mask's blocks, so smaller blocks get tiles of their own size."""
    return {} if block_size >= 128 else {"BLOCK_M": block_size, "BLOCK_N": block_size}


def _compiled(train: bool = False):
    """Compiled Flex. `train`: a backward through masks of blocks under 128 (sparse-aware
    training): Inductor's one default backward tile on Hopper at head_dim 64-128 is 128 keys
    wide, which a 64-block mask rules out ("NoValidChoicesError" on the H200), so that compile
    autotunes over its candidate tiles (32-64 wide among them)."""
    if train not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention
        _COMPILED[train] = torch.compile(
            flex_attention, dynamic=False,
            **({"mode": "max-autotune-no-cudagraphs"} if train else {}))
    return _COMPILED[train]
