"""The triton forward's `out=` buffer: written in place, checked against fp64, bad buffers refused."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from adaptive_sparse.attention.reference import reference_attention  # noqa: E402
from adaptive_sparse.masks import BlockSparseMask, block_causal  # noqa: E402

CUDA = torch.cuda.is_available()
runnable = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                              reason="needs CUDA or TRITON_INTERPRET=1")


def _inputs(dtype, gen):
    dev = "cuda" if CUDA else "cpu"
    q = torch.randn(1, 4, 48, 32, generator=gen).to(dev, dtype)
    k, v = (torch.randn(1, 2, 48, 32, generator=gen).to(dev, dtype) for _ in range(2))
    dense = block_causal(48, 48, 16) & (torch.rand(3, 3, generator=gen) < 0.7)
    dense |= torch.eye(3, dtype=torch.bool)
    mask = BlockSparseMask.from_dense(dense[None, None].to(dev), block_size=16, q_len=48,
                                      kv_len=48)
    return q, k, v, mask


@runnable
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_out_buffer_is_written_in_place(dtype):
    from adaptive_sparse.attention.triton import triton_block_sparse_attention

    q, k, v, mask = _inputs(dtype, torch.Generator().manual_seed(3))
    out = torch.full_like(q, float("nan"))
    got = triton_block_sparse_attention(q, k, v, mask, 0.2, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all()
    ref = reference_attention(q.double(), k.double(), v.double(), mask, 0.2)
    err = float((out.double() - ref).norm() / ref.norm())
    assert err < (1e-5 if dtype == torch.float32 else 2e-3), err


@runnable
def test_bad_out_buffer_is_refused():
    from adaptive_sparse.attention.triton import triton_block_sparse_attention

    q, k, v, mask = _inputs(torch.float32, torch.Generator().manual_seed(4))
    bad = {"shape": q.new_empty(1, 4, 48, 16), "dtype": torch.empty_like(q, dtype=torch.float16),
           "contiguity": q.new_empty(1, 4, 32, 48).transpose(-1, -2)}
    for out in bad.values():
        with pytest.raises(ValueError, match="out: expected"):
            triton_block_sparse_attention(q, k, v, mask, 0.2, out=out)
    with pytest.raises(TypeError, match="out: expected a torch.Tensor"):
        triton_block_sparse_attention(q, k, v, mask, 0.2, out=q.numpy())
    with pytest.raises(TypeError, match="q: expected float16, bfloat16 or float32"):
        triton_block_sparse_attention(q.double(), k.double(), v.double(), mask, 0.2)



@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128, 256])
def test_gpu_autotuned_out_buffer_bf16(D):
    """The autotuned bf16 launch writes every element of a NaN-poisoned `out`, within bf16 error
    of fp64 (head_dim 256 takes the 128-row, 8-warp tiles)."""
    from test_triton import random_mask

    from adaptive_sparse.attention.triton import triton_block_sparse_attention

    gen = torch.Generator().manual_seed(D)
    q = torch.randn(1, 8, 1100, D, generator=gen).to("cuda", torch.bfloat16)
    k, v = (torch.randn(1, 2, 1100, D, generator=gen).to("cuda", torch.bfloat16)
            for _ in range(2))
    mask = random_mask(1, 2, 1100, 1100, 128, 0.5, gen=gen, device="cuda")
    out = torch.full_like(q, float("nan"))
    triton_block_sparse_attention(q, k, v, mask, D ** -0.5, out=out)
    ref = reference_attention(q.double(), k.double(), v.double(), mask, D ** -0.5)
    assert torch.isfinite(out).all()
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-2
