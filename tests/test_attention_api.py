"""`block_sparse_attention`'s contract, the same for every backend: the `out=` buffer is fully
written, non-finite inputs show in the output (or are refused), degenerate shapes are named."""

import logging
import math
import os

import pytest
import torch

from adaptive_sparse import BlockSparseMask, block_sparse_attention
from adaptive_sparse.masks import block_causal

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CPU_BACKENDS = ["reference", "gather", "flex"] + (["triton"] if INTERPRET else [])


def _inputs(seed, B=1, Hq=4, Hkv=2, N=80, M=96, D=16, bs=16, heads=2, p=0.5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=g)
    k, v = torch.randn(B, Hkv, M, D, generator=g), torch.randn(B, Hkv, M, D, generator=g)
    allowed = block_causal(N, M, bs)
    dense = (torch.rand(1, heads, *allowed.shape, generator=g) < p) & allowed
    dense[..., 0] = True
    dense[:, 0, 1] = False  # query block 1 of head 0 selects nothing
    mask = BlockSparseMask.from_dense(dense, block_size=bs, q_len=N, kv_len=M)
    return q, k, v, mask


def _fp64(q, k, v, mask):
    """Dense masked softmax in fp64 (rows that see nothing: zeros)."""
    G, bs = q.shape[1] // k.shape[1], mask.block_size
    N, M = q.shape[2], k.shape[2]
    d = mask.to_dense().repeat_interleave(q.shape[1] // mask.heads, 1)
    rows, cols = torch.arange(N), torch.arange(M)
    keep = d[:, :, rows // bs][..., cols // bs] & (cols <= rows[:, None] + M - N)
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.softmax(s.masked_fill(~keep, -math.inf), -1).nan_to_num(0.0)
    return p @ v.double().repeat_interleave(G, 1), keep


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_buffer_poisoned_with_nan_is_fully_written(backend):
    q, k, v, mask = _inputs(11)
    out = torch.full_like(q, float("nan"))
    got = block_sparse_attention(q, k, v, mask, backend=backend, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all()
    want, keep = _fp64(q, k, v, mask)
    assert (out[:, 0, 16:32] == 0).all()  # the empty query block: zeros, written
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "gather"])
def test_out_buffer_fully_written_when_no_row_selects_anything(backend):
    q, k, v, mask = _inputs(12)
    empty = BlockSparseMask.from_dense(torch.zeros(1, 1, 5, 6, dtype=torch.bool), block_size=16,
                                       q_len=80, kv_len=96)
    out = torch.full_like(q, float("nan"))
    out_, lse = block_sparse_attention(q, k, v, empty, backend=backend, out=out, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("bad,match", [
    (lambda q: q.new_empty(1, 4, 80, 8), "out: expected shape"),
    (lambda q: q.new_empty(1, 4, 80, 16, dtype=torch.float64), "out: expected shape"),
    (lambda q: q.new_empty(1, 4, 16, 80).transpose(-1, -2), "out: expected a contiguous"),
    (lambda q: q, "out: expected a buffer that shares no memory"),
])
def test_bad_out_buffer_is_refused(bad, match):
    q, k, v, mask = _inputs(13)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, v, mask, out=bad(q))
    with pytest.raises(TypeError, match="out: expected a torch.Tensor"):
        block_sparse_attention(q, k, v, mask, out=q.numpy())


def test_auto_is_gather_off_cuda(caplog):
    q, k, v, mask = _inputs(14)
    with caplog.at_level(logging.DEBUG, logger="adaptive_sparse.attention.api"):
        got = block_sparse_attention(q, k, v, mask)
    assert "auto picked backend 'gather'" in caplog.text
    assert torch.equal(got, block_sparse_attention(q, k, v, mask, backend="gather"))


NONFINITE_BACKENDS = ["reference", "gather", "flex"] + (["triton"] if INTERPRET else [])


@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
def test_nan_in_a_query_row_gives_nan_in_that_row_only(backend):
    q, k, v, mask = _inputs(15)
    q[0, 1, 40, 3] = float("nan")
    out = torch.full_like(q, 7.0)
    _, lse = block_sparse_attention(q, k, v, mask, backend=backend, out=out, return_lse=True)
    assert torch.isnan(out[0, 1, 40]).all()
    if backend != "flex":  # Flex's lse of a NaN row is -inf
        assert torch.isnan(lse[0, 1, 40])
    out[0, 1, 40] = 0
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_nonfinite_key_shows_in_every_row_that_sees_it(backend, value):
    q, k, v, mask = _inputs(16, p=0.8)
    j = 70  # key 70: hidden (causal) from rows < 54, and from rows whose mask drops block 4
    k[0, 0, j] = value
    out = block_sparse_attention(q, k, v, mask, backend=backend)
    _, keep = _fp64(q, k, v, mask)
    sees = keep[0, :2, :, j]  # [heads of KV group 0, N]
    assert sees.any() and (~sees).any()
    assert torch.isnan(out[0, :2][sees]).all()
    assert torch.isfinite(out[0, :2][~sees]).all()
    assert torch.isfinite(out[0, 2:]).all()  # KV group 1 never reads it


@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
def test_nonfinite_value_shows_in_every_row_that_sees_it(backend):
    q, k, v, mask = _inputs(17, p=0.8)
    v[0, 1, 20, 5] = float("inf")
    out = block_sparse_attention(q, k, v, mask, backend=backend)
    _, keep = _fp64(q, k, v, mask)
    sees = keep[0, 2:, :, 20]
    assert sees.any()
    assert (~torch.isfinite(out[0, 2:][sees])).any(-1).all()


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_refuses_and_names_the_tensor(name, value):
    q, k, v, mask = _inputs(18)
    t = {"q": q, "k": k, "v": v}[name]
    t[0, 0, 5, 0] = value
    with pytest.raises(ValueError, match=f"^{name}: expected finite values"):
        block_sparse_attention(q, k, v, mask, check_finite=True)


@pytest.mark.parametrize("backend", ["reference", "gather", "flex"])
def test_empty_batch_gives_empty_outputs(backend):
    q, k, v = torch.randn(0, 4, 80, 16), torch.randn(0, 2, 96, 16), torch.randn(0, 2, 96, 16)
    mask = _inputs(19)[3]
    out, lse = block_sparse_attention(q, k, v, mask, backend=backend, return_lse=True)
    assert out.shape == (0, 4, 80, 16) and lse.shape == (0, 4, 80) and lse.dtype == torch.float32
    buf = torch.empty(0, 4, 80, 16)
    assert block_sparse_attention(q, k, v, mask, backend=backend, out=buf) is buf


@pytest.mark.parametrize("shapes,match", [
    (((1, 4, 80, 0), (1, 2, 96, 0)), "^q: expected head_dim >= 1"),
    (((1, 0, 80, 16), (1, 2, 96, 16)), "^q: expected at least one query head"),
    (((1, 4, 80, 16), (1, 0, 96, 16)), "^k: expected a KV head count dividing"),
    (((1, 4, 0, 16), (1, 2, 96, 16)), "^q, k: expected non-empty sequences"),
])
def test_degenerate_shapes_are_named(shapes, match):
    mask = _inputs(20)[3]
    q, k = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, k.clone(), mask)


@pytest.mark.parametrize("dtype,cuda,triton,elsewhere,want", [
    (torch.float64, True, True, "gather", "reference"),  # the kernels have no float64
    (torch.float64, False, False, "gather", "reference"),
    (torch.float32, True, True, "gather", "triton"),
    (torch.bfloat16, True, False, "gather", "gather"),  # no triton: the PyTorch path
    (torch.float16, False, True, "reference", "reference"),
])
def test_auto_backend_routes_float64_to_the_reference(monkeypatch, dtype, cuda, triton, elsewhere,
                                                      want):
    from types import SimpleNamespace

    from adaptive_sparse.attention import api

    monkeypatch.setattr(api, "triton_available", lambda: triton)
    assert api.auto_backend(SimpleNamespace(dtype=dtype, is_cuda=cuda), elsewhere) == want


def test_float64_auto_is_the_reference_computed_in_float64(caplog):
    q, k, v, mask = (t.double() if isinstance(t, torch.Tensor) else t for t in _inputs(21))
    out = torch.full_like(q, float("nan"))
    with caplog.at_level(logging.DEBUG, logger="adaptive_sparse.attention.api"):
        block_sparse_attention(q, k, v, mask, out=out)
    assert "auto picked backend 'reference'" in caplog.text
    want, _ = _fp64(q, k, v, mask)
    assert float((out - want).abs().max()) < 1e-12  # float64 throughout, not an fp32 softmax
    got = block_sparse_attention(q, k, v, mask, backend="gather")
    assert got.dtype == torch.float64 and float((got - want).abs().max()) < 1e-12


def test_float64_block_maps_auto_computed_in_float64():
    from adaptive_sparse.attention.block_maps import block_attention_maps

    g = torch.Generator().manual_seed(22)
    q, k = torch.randn(1, 2, 40, 16, generator=g).double(), torch.randn(1, 1, 48, 16, generator=g)
    k = k.double() * 4  # peaked rows
    bmax, bsum = block_attention_maps(q, k, block_size=16)
    s = (q @ k.transpose(-1, -2)).div(4).masked_fill(~(torch.arange(48) <= torch.arange(40)[:, None]
                                                         + 8), -math.inf)
    p = torch.softmax(s, -1)  # [1, 2, 40, 48]
    want = torch.nn.functional.pad(p, (0, 0, 0, 8)).view(1, 2, 3, 16, 3, 16).sum((3, 5))
    want = want / torch.tensor([16.0, 16.0, 8.0], dtype=torch.float64)[:, None]
    assert bsum.dtype == torch.float32
    assert float((bsum.double() - want).abs().max()) < 1e-7


def test_explicit_triton_refuses_float64_naming_the_dtype():
    from adaptive_sparse.attention.block_maps import block_attention_maps

    q, k, v, mask = (t.double() if isinstance(t, torch.Tensor) else t for t in _inputs(23))
    with pytest.raises(TypeError, match="^q: expected float16, bfloat16 or float32 for backend "
                                        "'triton', got torch.float64"):
        block_sparse_attention(q, k, v, mask, backend="triton")
    with pytest.raises(TypeError, match="got torch.float64"):
        block_attention_maps(q, k, block_size=16, backend="triton")
