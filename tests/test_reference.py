"""The reference (and Flex on CPU) against an fp64 dense masked softmax; block maps against fp64."""

import math

import pytest
import torch

from adaptive_sparse import BlockSparseMask, block_sparse_attention
from adaptive_sparse.attention.block_maps import attention_recall, block_attention_maps
from adaptive_sparse.masks import block_causal, num_blocks

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _random_mask(B, H, q_len, kv_len, bs, p, seed, empty_rows=True):
    g = torch.Generator().manual_seed(seed)
    allowed = block_causal(q_len, kv_len, bs)
    dense = (torch.rand(B, H, *allowed.shape, generator=g) < p) & allowed
    if empty_rows and dense.shape[2] > 1:
        dense[..., 1, :] = False  # one query block selects nothing
    return BlockSparseMask.from_dense(dense, block_size=bs, q_len=q_len, kv_len=kv_len)


def fp64_attention(q, k, v, mask, scale):
    """Dense masked softmax in fp64: out [B, Hq, N, Dv], lse [B, Hq, N] (-inf on empty rows)."""
    B, Hq, N, _ = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G, bs = Hq // Hkv, mask.block_size
    d = mask.to_dense()
    d = d.expand(-1, Hq, -1, -1) if mask.heads == 1 else d.repeat_interleave(Hq // mask.heads, 1)
    d = d.expand(B, -1, -1, -1)
    rows, cols = torch.arange(N), torch.arange(M)
    keep = d[:, :, rows // bs][..., cols // bs] & (cols[None, :] <= rows[:, None] + M - N)
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) * scale
    s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.where(keep, torch.exp(s - lse[..., None].clamp_min(-1e300)), 0.0)
    p = torch.nan_to_num(p, nan=0.0)
    return p @ v.double().repeat_interleave(G, 1), lse


CASES = [  # B, Hq, Hkv, N, M, D, bs, mask heads ("1", "kv", "q"), density
    (1, 2, 2, 333, 333, 16, 64, "q", 0.6),      # odd lengths
    (2, 3, 1, 50, 50, 8, 64, "1", 0.9),         # shorter than one block, H=1 broadcast
    (1, 4, 4, 100, 300, 16, 64, "q", 0.5),      # q_len < kv_len
    (1, 6, 2, 200, 257, 16, 64, "kv", 0.5),     # GQA 3:1, per-KV-group mask
    (2, 8, 2, 260, 260, 32, 128, "q", 0.5),     # GQA 4:1, block 128
    (1, 4, 1, 129, 500, 16, 128, "1", 0.3),     # MQA, H=1, q_len < kv_len
    (1, 2, 1, 1, 70, 8, 64, "q", 1.0),          # one query
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_matches_fp64(case, dtype):
    B, Hq, Hkv, N, M, D, bs, mh, p = case
    g = torch.Generator().manual_seed(CASES.index(case))
    q = torch.randn(B, Hq, N, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, M, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, M, D, generator=g).to(dtype)
    H = {"1": 1, "kv": Hkv, "q": Hq}[mh]
    mask = _random_mask(B, H, N, M, bs, p, seed=CASES.index(case))
    scale = 1 / math.sqrt(D)
    out, lse = block_sparse_attention(q, k, v, mask, backend="reference", return_lse=True)
    want, want_lse = fp64_attention(q, k, v, mask, scale)
    assert out.dtype == dtype and out.shape == (B, Hq, N, D)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), want, atol=TOL[dtype], rtol=TOL[dtype])
    empty = torch.isinf(want_lse)
    assert torch.equal(torch.isinf(lse), empty)
    assert (out[empty] == 0).all()
    assert torch.allclose(lse[~empty].double(), want_lse[~empty], atol=1e-4)


def test_reference_empty_rows_zero_and_neg_inf():
    q, k, v = (torch.randn(1, 2, 130, 16) for _ in range(3))
    dense = block_causal(130, 130, 64).expand(1, 2, 3, 3).clone()
    dense[:, 0, 2] = False
    dense[:, 1] = False
    mask = BlockSparseMask.from_dense(dense, block_size=64, q_len=130, kv_len=130)
    out, lse = block_sparse_attention(q, k, v, mask, backend="reference", return_lse=True)
    assert (out[0, 1] == 0).all() and torch.isneginf(lse[0, 1]).all()
    assert (out[0, 0, 128:] == 0).all() and torch.isneginf(lse[0, 0, 128:]).all()
    assert torch.isfinite(lse[0, 0, :128]).all()


def test_reference_chunking_is_invisible():
    from adaptive_sparse.attention.reference import reference_attention
    q, k, v = torch.randn(1, 4, 300, 16), torch.randn(1, 2, 400, 16), torch.randn(1, 2, 400, 16)
    mask = _random_mask(1, 4, 300, 400, 64, 0.6, seed=3)
    a = reference_attention(q, k, v, mask, 0.25, chunk_elements=1)
    b = reference_attention(q, k, v, mask, 0.25)
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("case", [(1, 2, 2, 200, 200, 16, 64, "q"),
                                  (1, 4, 2, 100, 333, 16, 32, "kv"),
                                  (2, 4, 1, 50, 50, 8, 16, "1")])
def test_flex_matches_reference_on_cpu(case):
    B, Hq, Hkv, N, M, D, bs, mh = case
    g = torch.Generator().manual_seed(N)
    q = torch.randn(B, Hq, N, D, generator=g)
    k, v = torch.randn(B, Hkv, M, D, generator=g), torch.randn(B, Hkv, M, D, generator=g)
    H = {"1": 1, "kv": Hkv, "q": Hq}[mh]
    mask = _random_mask(B, H, N, M, bs, 0.6, seed=N)
    ref, ref_lse = block_sparse_attention(q, k, v, mask, backend="reference", return_lse=True)
    out, lse = block_sparse_attention(q, k, v, mask, backend="flex", return_lse=True)
    assert torch.allclose(out, ref, atol=1e-5)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert torch.allclose(lse[fin], ref_lse[fin], atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bs", [32, 64, 128])
def test_compiled_flex_takes_every_block_size_on_gpu(bs):
    """Compiled Flex's default 128-row tile must divide the mask's blocks: smaller blocks get
    their own tile size (`kernel_options`), with results equal to the reference."""
    from adaptive_sparse.attention.flex import flex_attention_forward

    g = torch.Generator(device="cuda").manual_seed(bs)
    q = torch.randn(1, 4, 1000, 64, generator=g, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 1000, 64, generator=g, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    mask = _random_mask(1, 4, 1000, 1000, bs, 0.5, seed=bs).to("cuda")
    ref = fp64_attention(q.cpu(), k.cpu(), v.cpu(), mask.to("cpu"), 0.125)[0].cuda()
    out = torch.full_like(q, float("nan"))
    out.copy_(flex_attention_forward(q, k, v, mask, scale=0.125, compile=True))
    eager = block_sparse_attention(q, k, v, mask, backend="reference").double()
    assert torch.isfinite(out).all()
    err, err_eager = ((x.double() - ref).norm() / ref.norm() for x in (out, eager))
    assert err <= 2 * err_eager + 1e-3, (err, err_eager)


def _maps_fp64(q, k, bs):
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    s = q.double() @ k.double().repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) / math.sqrt(D)
    rows, cols = torch.arange(N), torch.arange(M)
    p = torch.softmax(s.masked_fill(cols[None, :] > rows[:, None] + M - N, -math.inf), -1)
    Qb, Kb = num_blocks(N, bs), num_blocks(M, bs)
    p = torch.nn.functional.pad(p, (0, Kb * bs - M, 0, Qb * bs - N))
    p = p.view(B, Hq, Qb, bs, Kb, bs)
    bmax = p.amax((3, 5))
    bsum = p.sum((3, 5)) / torch.clamp(N - torch.arange(Qb) * bs, max=bs).double()[:, None]
    return bmax / bmax.sum(-1, keepdim=True), bsum


@pytest.mark.parametrize("shape", [(1, 2, 2, 200, 200, 64), (2, 6, 2, 77, 300, 32),
                                   (1, 4, 1, 130, 130, 128)])
def test_block_attention_maps_match_fp64(shape):
    B, Hq, Hkv, N, M, bs = shape
    g = torch.Generator().manual_seed(N)
    q, k = torch.randn(B, Hq, N, 16, generator=g) * 2, torch.randn(B, Hkv, M, 16, generator=g)
    bmax, bsum = block_attention_maps(q, k, block_size=bs)
    wmax, wsum = _maps_fp64(q, k, bs)
    assert torch.allclose(bmax.double(), wmax, atol=1e-6)
    assert torch.allclose(bsum.double(), wsum, atol=1e-6)
    assert torch.allclose(bsum.sum(-1), torch.ones(()), atol=1e-5)
    small, _ = block_attention_maps(q, k, block_size=bs, chunk_elements=1)
    assert torch.allclose(small, bmax, atol=1e-6)
    full = torch.ones(1, 1, *bsum.shape[2:], dtype=torch.bool)
    assert torch.allclose(attention_recall(bsum, full), torch.ones(Hq), atol=1e-5)


@pytest.mark.parametrize("q_shape,k_shape,kw,match", [
    ((1, 2, 64, 0), (1, 2, 64, 0), {}, "^q: expected at least one head"),
    ((1, 0, 64, 16), (1, 1, 64, 16), {}, "^q: expected at least one head"),
    ((1, 2, 64, 16), (1, 2, 0, 16), {}, r"^k: expected \[B=1"),
    ((1, 3, 64, 16), (1, 2, 64, 16), {}, "^k: expected a KV head count dividing"),
    ((1, 2, 80, 16), (1, 2, 64, 16), {}, r"^q: expected q_len <= kv_len"),
    ((1, 2, 64, 16), (1, 2, 64, 16), {"block_size": 48}, "^block_size: expected one of"),
    ((1, 2, 64, 16), (1, 2, 64, 16), {"scale": -1.0}, "^scale: expected a positive finite"),
    ((1, 2, 64, 16), (1, 2, 64, 16), {"scale": float("nan")}, "^scale: expected"),
    ((1, 2, 64, 16), (1, 2, 64, 16), {"backend": "cuda"}, "^backend: expected one of"),
])
def test_block_attention_maps_names_bad_inputs(q_shape, k_shape, kw, match):
    kw = {"block_size": 16} | kw
    with pytest.raises(ValueError, match=match):
        block_attention_maps(torch.randn(q_shape), torch.randn(k_shape), **kw)


def test_block_attention_maps_of_an_empty_batch_are_empty():
    bmax, bsum = block_attention_maps(torch.randn(0, 2, 40, 16), torch.randn(0, 1, 40, 16),
                                      block_size=16)
    assert bmax.shape == bsum.shape == (0, 2, 3, 3)


def test_block_attention_maps_triton_without_cuda_is_refused():
    if torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("triton can run here")
    with pytest.raises(RuntimeError, match="backend 'triton'"):
        block_attention_maps(torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16), block_size=16,
                             backend="triton")
