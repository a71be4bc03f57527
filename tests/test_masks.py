"""BlockSparseMask round trips (hypothesis): dense <-> indices <-> Flex BlockMask <-> scipy BSR."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_sparse.masks import (BlockSparseMask, block_causal, blocks_per_row_for_density,
                                   combine, diagonal_blocks, num_blocks)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def masks(draw, max_heads=3):
    bs = draw(st.sampled_from([16, 32, 64]))
    causal = draw(st.booleans())
    kv_len = draw(st.integers(1, 5 * bs + 7))
    q_len = draw(st.integers(1, kv_len)) if causal else draw(st.integers(1, 5 * bs + 7))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, max_heads))
    seed, p = draw(st.integers(0, 2**31 - 1)), draw(st.floats(0.0, 1.0))
    g = torch.Generator().manual_seed(seed)
    allowed = block_causal(q_len, kv_len, bs, causal=causal)
    dense = (torch.rand(B, H, *allowed.shape, generator=g) < p) & allowed
    return BlockSparseMask.from_dense(dense, block_size=bs, q_len=q_len, kv_len=kv_len,
                                      causal=causal), dense


@SETTINGS
@given(masks())
def test_dense_round_trip(md):
    m, dense = md
    assert torch.equal(m.to_dense(), dense)
    assert torch.equal(m.kv_num_blocks, dense.sum(-1, dtype=torch.int32))
    num, idx = m.kv_num_blocks, m.kv_indices
    valid = torch.arange(idx.shape[-1]) < num[..., None]
    step = idx[..., 1:] - idx[..., :-1]
    assert ((step > 0) | ~valid[..., 1:]).all()


@SETTINGS
@given(masks(), st.integers(0, 2**31 - 1))
def test_indices_round_trip_unsorted(md, seed):
    m, dense = md
    g = torch.Generator().manual_seed(seed)
    num, idx = m.kv_num_blocks, m.kv_indices.clone()
    kb = idx.shape[-1]
    valid = torch.arange(kb) < num[..., None]
    # shuffle the valid prefix of every row
    noise = torch.rand(idx.shape, generator=g) + (~valid).float() * 2
    perm = noise.argsort(-1)
    shuffled = torch.gather(idx, -1, perm)
    back = BlockSparseMask.from_indices(num, shuffled, block_size=m.block_size, q_len=m.q_len,
                                        kv_len=m.kv_len, causal=m.causal)
    assert back == m and torch.equal(back.to_dense(), dense)


@SETTINGS
@given(masks())
def test_flex_round_trip(md):
    m, dense = md
    bm = m.to_flex()
    assert tuple(bm.seq_lengths) == (m.q_len, m.kv_len)
    back = BlockSparseMask.from_flex(bm, causal=m.causal)
    assert back == m
    assert torch.equal(bm.to_dense()[..., :m.num_q_blocks, :m.num_kv_blocks].bool(), dense)


@SETTINGS
@given(masks())
def test_bsr_round_trip(md):
    m, dense = md
    mats = [[m.to_bsr(b, h) for h in range(m.heads)] for b in range(m.batch)]
    bs = m.block_size
    for b in range(m.batch):
        for h in range(m.heads):
            arr = mats[b][h].toarray()
            assert arr.shape == (m.num_q_blocks * bs, m.num_kv_blocks * bs)
            blocks = arr.reshape(m.num_q_blocks, bs, m.num_kv_blocks, bs).any((1, 3))
            assert np.array_equal(blocks, dense[b, h].numpy())
            indptr, indices = m.bsr_layout(b, h)
            assert indptr.dtype == np.int32 and indices.dtype == np.int32
            assert np.array_equal(np.diff(indptr), m.kv_num_blocks[b, h].numpy())
    back = BlockSparseMask.from_bsr(mats, block_size=bs, q_len=m.q_len, kv_len=m.kv_len,
                                    causal=m.causal)
    assert back == m


@SETTINGS
@given(masks())
def test_density(md):
    m, dense = md
    allowed = block_causal(m.q_len, m.kv_len, m.block_size, causal=m.causal)
    total = int(allowed.sum()) * m.batch * m.heads
    assert m.density() == pytest.approx(int(dense.sum()) / total)
    per_head = dense.sum((0, 2, 3)).double() / (int(allowed.sum()) * m.batch)
    assert torch.allclose(m.density_per_head(), per_head)


@SETTINGS
@given(masks(), st.integers(1, 4))
def test_expand_heads_and_group_union(md, rep):
    m, dense = md
    e = m.expand_heads(m.heads * rep)
    assert e.heads == m.heads * rep
    assert torch.equal(e.to_dense(), dense.repeat_interleave(rep, dim=1))
    assert e.group_union(rep) == m
    # union of distinct heads: any over each group
    if m.heads > 1:
        u = m.group_union(m.heads)
        assert torch.equal(u.to_dense(), dense.any(1, keepdim=True))


def test_full_diagonal_and_combine():
    for q_len, kv_len, bs in ((100, 100, 32), (37, 300, 64), (300, 300, 128), (1, 1, 16)):
        full = BlockSparseMask.full(1, 2, block_size=bs, q_len=q_len, kv_len=kv_len)
        assert full.density() == 1.0
        allowed = block_causal(q_len, kv_len, bs)
        # element-level check of the causal region and diagonal
        off = kv_len - q_len
        rows = torch.arange(q_len)[:, None]
        cols = torch.arange(kv_len)[None, :]
        vis = cols <= rows + off
        tiles = torch.zeros(num_blocks(q_len, bs), num_blocks(kv_len, bs), dtype=torch.bool)
        tiles.index_put_((rows.expand_as(vis)[vis] // bs, cols.expand_as(vis)[vis] // bs),
                         torch.tensor(True))
        assert torch.equal(allowed, tiles)
        diag = diagonal_blocks(q_len, kv_len, bs)
        on = cols == rows + off
        dt = torch.zeros_like(tiles)
        dt.index_put_((rows.expand_as(on)[on] // bs, cols.expand_as(on)[on] // bs),
                      torch.tensor(True))
        assert torch.equal(diag, dt)
        d = BlockSparseMask.from_dense(diag.expand(1, 2, *diag.shape).contiguous(),
                                       block_size=bs, q_len=q_len, kv_len=kv_len)
        assert combine(full, d, op="and") == d and combine(full, d, op="or") == full


def test_blocks_per_row_for_density():
    q_len = kv_len = 64 * 64
    allowed = block_causal(q_len, kv_len, 64).sum(-1)
    for d in (0.1, 0.25, 0.5):
        k = blocks_per_row_for_density(d, q_len, kv_len, 64)
        got = float(allowed.clamp(max=k).sum()) / float(allowed.sum())
        worse = [float(allowed.clamp(max=j).sum()) / float(allowed.sum()) for j in (k - 1, k + 1)]
        assert all(abs(got - d) <= abs(w - d) for w in worse)


def _causal_indices(dtype):
    """A valid 2x2-block causal mask's indices in `dtype`: rows [0] and [0, 1]."""
    num = torch.tensor([[[1, 2]]], dtype=dtype)
    idx = torch.tensor([[[[0, 1], [1, 0]]]], dtype=dtype)  # row 1 unsorted
    return num, idx


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_from_indices_takes_any_integer_dtype(dtype):
    num, idx = _causal_indices(dtype)
    m = BlockSparseMask.from_indices(num, idx, block_size=16, q_len=32, kv_len=32)
    assert m.kv_indices.dtype == torch.int32 and m.kv_indices[0, 0, 1].tolist() == [0, 1]
    assert torch.equal(m.to_dense()[0, 0], block_causal(32, 32, 16))


@pytest.mark.parametrize("name,value", [("kv_indices", 2**32 + 1), ("kv_indices", 2**31),
                                        ("kv_indices", -2**32), ("kv_num_blocks", 2**32 + 1),
                                        ("kv_num_blocks", -1)])
@pytest.mark.parametrize("sort", [True, False])
def test_from_indices_checks_values_before_the_int32_cast(name, value, sort):
    num, idx = _causal_indices(torch.int64)
    (idx if name == "kv_indices" else num).view(-1)[1] = value  # 2**32 + 1 would wrap to 1
    with pytest.raises(ValueError, match=rf"^{name}: expected values in \[0, \d\], got {value}$"):
        BlockSparseMask.from_indices(num, idx, block_size=16, q_len=32, kv_len=32, sort=sort)


@pytest.mark.parametrize("name,bad", [("kv_num_blocks", lambda n, i: (n.float(), i)),
                                      ("kv_indices", lambda n, i: (n, i.bool())),
                                      ("kv_indices", lambda n, i: (n, i.tolist())),
                                      ("kv_num_blocks", lambda n, i: (n[0], i))])
def test_from_indices_refuses_non_integer_or_misshaped_tensors(name, bad):
    num, idx = bad(*_causal_indices(torch.int64))
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        BlockSparseMask.from_indices(num, idx, block_size=16, q_len=32, kv_len=32)


def _element_mask(m):
    """bool [B, H, Qb*bs, Kb*bs]: the visible (query, key) pairs of `m`, padded to whole tiles."""
    bs = m.block_size
    el = m.to_dense().repeat_interleave(bs, 2).repeat_interleave(bs, 3)
    rows = torch.arange(el.shape[2])[:, None]
    cols = torch.arange(el.shape[3])[None, :]
    ok = (rows < m.q_len) & (cols < m.kv_len)
    if m.causal:
        ok &= cols <= rows + m.kv_len - m.q_len
    return el & ok


def _flex_dense(num, idx, qb, kb):
    out = torch.zeros(*idx.shape[:2], qb, kb, dtype=torch.bool)
    valid = torch.arange(idx.shape[-1]) < num[..., :qb, None]
    out.scatter_(3, idx[..., :qb, :].long(), valid)
    return out[..., :kb]


@SETTINGS
@given(masks())
def test_to_flex_full_blocks_are_exactly_the_wholly_visible_kept_tiles(md):
    m, dense = md
    bm = m.to_flex()
    qb, kb, bs = m.num_q_blocks, m.num_kv_blocks, m.block_size
    partial = _flex_dense(bm.kv_num_blocks, bm.kv_indices, qb, kb)
    full = _flex_dense(bm.full_kv_num_blocks, bm.full_kv_indices, qb, kb)
    el = _element_mask(m).view(m.batch, m.heads, qb, bs, kb, bs)
    whole = el.all(5).all(3)  # every pair of the tile visible
    assert torch.equal(full, dense & whole)
    assert torch.equal(partial, dense & ~whole)
    rows = torch.arange(m.q_len)[:, None]
    cols = torch.arange(m.kv_len)[None, :]
    got = bm.mask_mod(torch.tensor(0), torch.tensor(0), rows, cols)
    assert torch.equal(got, _element_mask(m)[0, 0, :m.q_len, :m.kv_len])


@pytest.mark.parametrize("q_len,kv_len,bs,n_partial,n_full", [
    (256, 256, 64, 4, 6),     # aligned: only the diagonal is cut
    (200, 200, 64, 7, 3),     # ragged last query block: its row is partial
    (128, 320, 64, 2, 7),     # q_len < kv_len, offset 192 cuts the last kept tile of each row
    (100, 300, 64, 7, 3),     # offset 200 cuts tiles mid-block; ragged rows and keys
    (256, 256, 16, 16, 120),  # small blocks
])
def test_to_flex_block_counts_of_a_full_causal_mask(q_len, kv_len, bs, n_partial, n_full):
    bm = BlockSparseMask.full(1, 1, block_size=bs, q_len=q_len, kv_len=kv_len).to_flex()
    assert int(bm.kv_num_blocks.sum()) == n_partial
    assert int(bm.full_kv_num_blocks.sum()) == n_full


def test_to_flex_output_equals_the_reference_with_full_blocks():
    from adaptive_sparse import block_sparse_attention

    g = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (200, 260, 260))
    dense = block_causal(200, 260, 32) & (torch.rand(1, 2, 7, 9, generator=g) < 0.7)
    m = BlockSparseMask.from_dense(dense, block_size=32, q_len=200, kv_len=260)
    assert int(m.to_flex().full_kv_num_blocks.sum()) > 0
    out = torch.full_like(q, float("nan"))
    block_sparse_attention(q, k, v, m, backend="flex", out=out)
    ref = block_sparse_attention(q, k, v, m, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_compare_masks_counts_tiles_and_rows_that_differ():
    from adaptive_sparse.masks import compare_masks

    allowed = block_causal(256, 256, 64)  # [4, 4]
    a = allowed[None, None].repeat(1, 2, 1, 1)
    b = a.clone()
    b[0, 1, 3, 0] = False  # one tile of one row of head 1
    b[0, 0, 2, 1] = False
    ma, mb = (BlockSparseMask.from_dense(x, block_size=64, q_len=256, kv_len=256) for x in (a, b))
    same = compare_masks({0: ma, 1: ma}, {0: ma, 1: ma})
    assert same == dict(exact=True, tiles_differ=0, rows_differ=0, tiles=64, tile_fraction=0.0)
    diff = compare_masks({0: ma, 1: ma}, {0: ma, 1: mb})
    assert not diff["exact"] and diff["tiles_differ"] == 2 and diff["rows_differ"] == 2
    assert diff["tile_fraction"] == 2 / 64
    with pytest.raises(ValueError, match="^ref: expected the keys of masks"):
        compare_masks({0: ma}, {1: ma})
    other = BlockSparseMask.from_dense(block_causal(128, 128, 64)[None, None], block_size=64,
                                       q_len=128, kv_len=128)
    with pytest.raises(ValueError, match=r"^ref\[0\]: expected the block_size"):
        compare_masks({0: ma}, {0: other})
