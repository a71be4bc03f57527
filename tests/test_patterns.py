"""Structure of every pattern: widths, globals, seeded randomness, budgets, causality."""

import inspect
import math

import pytest
import torch

from adaptive_sparse.attention.block_maps import block_attention_maps
from adaptive_sparse.masks import BlockSparseMask, block_causal, diagonal_blocks, num_blocks
from adaptive_sparse.patterns import (INPUT_DEPENDENT, PATTERN_PARAMS, PATTERNS, antidiagonal,
                                      bigbird, hierarchical, longformer, lsh, make_pattern,
                                      oracle, sliding_window, strided, vertical_slash)
from adaptive_sparse.patterns.antidiagonal import antidiagonal_scores
from adaptive_sparse.patterns.vertical_slash import last_query_attention
from adaptive_sparse.policies import Policy

GEOMS = [(1000, 1000, 64), (300, 777, 64), (513, 513, 128), (50, 700, 32)]

PARAMS = {
    "dense": {}, "sliding_window": {"window": 130}, "longformer": {"window": 64},
    "bigbird": {"window": 64, "random_blocks": 2, "seed": 3},
    "strided": {"local_blocks": 1, "stride": 3},
    "lsh": {"n_buckets": 4, "n_rounds": 2}, "hierarchical": {"budget": 4, "super_block": 2},
    "vertical_slash": {"n_vertical": 2, "n_slash": 2, "last_q": 32},
    "antidiagonal": {"stride": 8, "threshold": 0.8},
    "oracle": {"policy": {"kind": "top_k", "k": 3}},
}


def _qk(q_len, kv_len, Hq=4, Hkv=2, D=16, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, q_len, D, generator=g), torch.randn(B, Hkv, kv_len, D, generator=g))


def _first_diag(q_len, kv_len, bs):
    return (torch.arange(num_blocks(q_len, bs)) * bs + kv_len - q_len) // bs


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("geom", GEOMS)
def test_every_pattern_is_causal_and_keeps_diagonal(name, geom):
    q_len, kv_len, bs = geom
    q, k = _qk(q_len, kv_len)
    m = make_pattern(name, q_len=q_len, kv_len=kv_len, num_heads=4, block_size=bs, batch=2,
                     q=q, k=k, **PARAMS[name])
    assert isinstance(m, BlockSparseMask) and m.causal
    assert (m.q_len, m.kv_len, m.block_size, m.batch, m.heads) == (q_len, kv_len, bs, 2, 4)
    dense = m.to_dense()
    assert not (dense & ~block_causal(q_len, kv_len, bs)).any()
    assert dense[..., diagonal_blocks(q_len, kv_len, bs)].all()
    again = make_pattern(name, q_len=q_len, kv_len=kv_len, num_heads=4, block_size=bs, batch=2,
                         q=q, k=k, **PARAMS[name])
    assert again == m


def test_pattern_params_match_signatures():
    geometry = {"q_len", "kv_len", "num_heads", "block_size", "batch", "device", "q", "k"}
    for name, fn in PATTERNS.items():
        sig = set(inspect.signature(fn).parameters) - geometry
        assert sig == set(PATTERN_PARAMS[name]), name
        assert fn.__doc__ and all(p in fn.__doc__ for p in PATTERN_PARAMS[name]), name
    assert set(PATTERN_PARAMS) == set(PATTERNS)


def test_dense_is_full():
    m = make_pattern("dense", q_len=300, kv_len=777, num_heads=3, block_size=64)
    assert m.density() == 1.0 and m.heads == 3


@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("window", [0, 1, 64, 100, 200])
def test_sliding_window_width(geom, window):
    q_len, kv_len, bs = geom
    m = sliding_window(q_len=q_len, kv_len=kv_len, num_heads=2, block_size=bs, window=window)
    dense = m.to_dense()[0, 0]
    first = _first_diag(q_len, kv_len, bs)
    diag = diagonal_blocks(q_len, kv_len, bs)
    w = math.ceil(window / bs)
    for r in range(dense.shape[0]):
        cols = dense[r].nonzero().flatten().tolist()
        lo = max(0, int(first[r]) - w)
        assert cols == list(range(lo, int(diag[r].nonzero().max()) + 1))
    # token level: every query sees its `window` most recent keys
    off = kv_len - q_len
    for i in range(0, q_len, 7):
        pos = i + off
        keys = torch.arange(max(0, pos - window + 1), pos + 1)
        assert dense[i // bs, keys // bs].all()


def test_sliding_window_sink():
    m = sliding_window(q_len=1000, kv_len=1000, block_size=64, window=64, sink_blocks=2)
    dense = m.to_dense()[0, 0]
    assert dense[:, :2][block_causal(1000, 1000, 64)[:, :2]].all()
    assert dense.sum(-1)[-1] == 4


@pytest.mark.parametrize("geom", GEOMS)
def test_longformer_globals(geom):
    q_len, kv_len, bs = geom
    g = 2
    m = longformer(q_len=q_len, kv_len=kv_len, num_heads=1, block_size=bs, window=bs,
                   global_blocks=g)
    dense = m.to_dense()[0, 0]
    allowed = block_causal(q_len, kv_len, bs)
    assert dense[:, :g][allowed[:, :g]].all()
    rows = (torch.arange(dense.shape[0]) * bs + kv_len - q_len) < g * bs
    assert torch.equal(dense[rows], allowed[rows])
    local = sliding_window(q_len=q_len, kv_len=kv_len, block_size=bs, window=bs).to_dense()[0, 0]
    rest = dense.clone()
    rest[:, :g] = False
    rest[rows] = False
    assert torch.equal(rest, local & ~rows[:, None] & (torch.arange(dense.shape[1]) >= g))


@pytest.mark.parametrize("geom", GEOMS)
def test_bigbird_random_blocks_seeded(geom):
    q_len, kv_len, bs = geom
    kw = dict(q_len=q_len, kv_len=kv_len, num_heads=3, batch=2, block_size=bs, window=bs,
              global_blocks=1, random_blocks=2)
    a, b, c = bigbird(**kw, seed=1), bigbird(**kw, seed=1), bigbird(**kw, seed=2)
    assert a == b
    base = longformer(q_len=q_len, kv_len=kv_len, num_heads=3, batch=2, block_size=bs,
                      window=bs, global_blocks=1).to_dense()
    allowed = block_causal(q_len, kv_len, bs)
    extra = a.to_dense() & ~base
    free = (allowed & ~base[0, 0]).sum(-1)
    assert torch.equal(extra.sum(-1), free.clamp(max=2).expand(2, 3, -1))
    assert (a.to_dense() | base).eq(a.to_dense()).all()
    if int(free.sum()) > 4:
        assert a != c
        assert not torch.equal(extra[0, 0], extra[0, 1])  # heads draw independently


def test_strided_columns():
    q_len = kv_len = 64 * 20
    m = strided(q_len=q_len, kv_len=kv_len, block_size=64, local_blocks=1, stride=4)
    dense = m.to_dense()[0, 0]
    for r in range(20):
        want = {c for c in range(0, r + 1, 4)} | {r, max(0, r - 1)}
        assert set(dense[r].nonzero().flatten().tolist()) == want


def test_lsh_identical_and_opposite_vectors():
    bs, n = 64, 64 * 8
    g = torch.Generator().manual_seed(0)
    v = torch.randn(16, generator=g)
    noise = torch.randn(1, 4, 8, 64, 16, generator=g) * 0.01
    q = (v + noise - noise.mean(3, keepdim=True)).reshape(1, 4, n, 16)  # block means are v
    k = torch.stack([v.expand(n, 16), -v.expand(n, 16)])[None]  # kv head 0 = v, head 1 = -v
    m = lsh(q=q, k=k, block_size=bs, n_buckets=8, n_rounds=3, seed=5, keep_sink=False)
    dense = m.to_dense()[0]
    allowed = block_causal(n, n, bs)
    assert torch.equal(dense[0], allowed) and torch.equal(dense[1], allowed)
    diag = diagonal_blocks(n, n, bs)
    assert torch.equal(dense[2], diag) and torch.equal(dense[3], diag)
    shared = lsh(q=q, k=k, block_size=bs, n_buckets=8, n_rounds=3, seed=5, keep_sink=False,
                 shared_kv_group=True)
    assert shared.heads == 2 and torch.equal(shared.to_dense()[0, 1], diag)


def test_lsh_seeds_rounds_and_scale_invariance():
    q, k = _qk(64 * 16, 64 * 16, D=32, seed=1)
    kw = dict(q=q, k=k, block_size=64, n_buckets=8)
    a = lsh(**kw, n_rounds=1, seed=0)
    assert a == lsh(**kw, n_rounds=1, seed=0)
    assert a != lsh(**kw, n_rounds=1, seed=1)
    assert lsh(q=q * 3.0, k=k * 0.5, block_size=64, n_buckets=8, n_rounds=1, seed=0) == a
    assert lsh(**kw, n_rounds=4, seed=0).density() > a.density()
    assert lsh(**kw, n_rounds=1, seed=0).density() < \
        lsh(q=q, k=k, block_size=64, n_buckets=2, n_rounds=1, seed=0).density()


def test_hierarchical_equals_top_k_when_everything_expands():
    q, k = _qk(64 * 12 + 5, 64 * 12 + 5, seed=2)
    m = hierarchical(q=q, k=k, block_size=64, budget=4, super_block=1, expand=100)
    pad = torch.nn.functional.pad
    qb = pad(q, (0, 0, 0, 59)).view(2, 4, 13, 64, 16).sum(3)
    qb[:, :, -1] /= 5
    qb[:, :, :-1] /= 64
    kb = pad(k, (0, 0, 0, 59)).view(2, 2, 13, 64, 16).sum(3)
    kb[:, :, -1] /= 5
    kb[:, :, :-1] /= 64
    scores = qb @ kb.repeat_interleave(2, 1).transpose(-1, -2) / 4.0
    want = Policy("top_k", k=4).to_mask(scores, q_len=q.shape[2], kv_len=k.shape[2],
                                        block_size=64)
    assert m == want


def test_hierarchical_budget_and_super_blocks():
    n = 64 * 32
    q, k = _qk(n, n, seed=3)
    forced = Policy("top_k", k=1).select(torch.zeros(1, 1, 32, 32), q_len=n, kv_len=n,
                                         block_size=64)[0, 0]
    for budget, sb, expand in ((6, 4, 1), (6, 2, 2), (0.25, 4, None), (6, 4, None)):
        m = hierarchical(q=q, k=k, block_size=64, budget=budget, super_block=sb, expand=expand)
        dense = m.to_dense()
        per_row = block_causal(n, n, 64).sum(-1)
        k_rows = torch.full_like(per_row, budget) if budget >= 1 else \
            torch.ceil(per_row * budget - 1e-9).long()
        assert (dense.sum(-1) <= torch.maximum(k_rows, forced.sum(-1))).all()
        if expand is not None:
            free = dense & ~forced
            supers = free.view(2, 4, 32, 32 // sb, sb).any(-1).sum(-1)
            assert (supers <= expand).all()
        else:  # about 2x the budget expands: late rows reach it exactly
            assert torch.equal(dense.sum(-1)[..., 16:], k_rows[16:].expand(2, 4, -1))


def test_hierarchical_shared_group_and_reproducible():
    q, k = _qk(640, 640, Hq=6, Hkv=2, seed=4)
    m = hierarchical(q=q, k=k, block_size=64, budget=3, shared_kv_group=True)
    assert m.heads == 2 and m.kv_num_blocks[..., 3:].eq(3).all()


def test_vertical_slash_estimates_match_fp64():
    q, k = _qk(200, 333, Hq=4, Hkv=2, seed=5)
    probs, pos = last_query_attention(q, k, 64, 0.25)
    s = q[:, :, -64:].double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * 0.25
    cols = torch.arange(333)
    s = s.masked_fill(cols > pos[:, None], -math.inf)
    assert torch.allclose(probs.double(), torch.softmax(s, -1), atol=1e-6)
    assert pos.tolist() == list(range(333 - 64, 333))


def test_vertical_slash_finds_planted_column_and_diagonal():
    bs, n, D = 64, 64 * 16, 32
    g = torch.Generator().manual_seed(6)
    k = torch.randn(1, 1, n, D, generator=g)
    q = 4.0 * torch.roll(k, 3 * bs, dims=2)  # query i matches key i - 192: block diagonal 3
    m = vertical_slash(q=q, k=k, block_size=bs, n_vertical=0, n_slash=1, last_q=64,
                       keep_sink=False)
    dense = m.to_dense()[0, 0]
    want = diagonal_blocks(n, n, bs).clone()
    r = torch.arange(3, 16)
    want[r, r - 3] = True
    assert torch.equal(dense, want)
    v = torch.randn(D, generator=g)
    q2 = torch.randn(1, 1, n, D, generator=g) * 0.1 + v
    k2 = torch.randn(1, 1, n, D, generator=g) * 0.1
    k2[0, 0, 5 * bs + 7] = 3.0 * v  # a heavy key in block 5
    m = vertical_slash(q=q2, k=k2, block_size=bs, n_vertical=1, n_slash=0, keep_sink=False)
    dense = m.to_dense()[0, 0]
    assert dense[5:, 5].all() and dense.sum() == diagonal_blocks(n, n, bs).sum() + 10


def _antidiag_fp64(q, k, bs, S, scale):
    """Element-wise definition: logits summed along the antidiagonal of each S x S sub-tile."""
    B, Hq, N, D = q.shape
    M = k.shape[2]
    G = Hq // k.shape[1]
    Qb, Kb = num_blocks(N, bs), num_blocks(M, bs)
    qp = torch.nn.functional.pad(q.double(), (0, 0, 0, Qb * bs - N))
    kp = torch.nn.functional.pad(k.double(), (0, 0, 0, Kb * bs - M)).repeat_interleave(G, 1)
    full = qp @ kp.transpose(-1, -2) * scale  # [B, Hq, Qb*bs, Kb*bs]
    n, m = Qb * bs // S, Kb * bs // S
    sub = full.view(B, Hq, n, S, m, S)
    anti = sum(sub[:, :, :, S - 1 - u, :, u] for u in range(S)) / S  # [B, Hq, n, m]
    a, b = torch.arange(n), torch.arange(m)
    vis = (b[None, :] * S <= a[:, None] * S + S - 1 + M - N) & (b[None, :] * S < M)
    p = torch.softmax(anti.masked_fill(~vis, -math.inf), -1) * (a * S < N)[:, None]
    tiles = p.view(B, Hq, Qb, bs // S, Kb, bs // S).sum((3, 5))
    groups = torch.ceil(torch.clamp(N - torch.arange(Qb) * bs, max=bs).double() / S)
    return tiles / groups[:, None]


@pytest.mark.parametrize("geom,S", [((200, 333, 64), 8), ((64, 64, 32), 4), ((130, 1000, 64), 16)])
def test_antidiagonal_scores_match_fp64(geom, S):
    q_len, kv_len, bs = geom
    q, k = _qk(q_len, kv_len, seed=7)
    got = antidiagonal_scores(q, k, block_size=bs, stride=S, scale=0.25)
    want = _antidiag_fp64(q, k, bs, S, 0.25)
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(()), atol=1e-5)


def test_antidiagonal_keeps_threshold_mass():
    q, k = _qk(64 * 10, 64 * 10, seed=8)
    est = antidiagonal_scores(q, k, block_size=64, stride=8, scale=0.25)
    for th in (0.5, 0.9):
        m = antidiagonal(q=q, k=k, block_size=64, stride=8, threshold=th)
        kept = (est * m.to_dense()).sum(-1)
        assert (kept >= th - 1e-5).all()
    assert antidiagonal(q=q, k=k, block_size=64, threshold=0.5).density() < \
        antidiagonal(q=q, k=k, block_size=64, threshold=0.99).density()


@pytest.mark.parametrize("target", ["sum", "max"])
def test_oracle_is_policy_on_true_maps(target):
    q, k = _qk(300, 500, seed=9)
    pol = Policy("top_p", p=0.9)
    m = oracle(q=q, k=k, block_size=64, policy=pol.to_dict(), target=target)
    bmax, bsum = block_attention_maps(q, k, block_size=64)
    want = pol.to_mask(bsum if target == "sum" else bmax, q_len=300, kv_len=500, block_size=64,
                       scores_are_probs=True)
    assert m == want
    shared = oracle(q=q, k=k, block_size=64, policy=pol, target=target, shared_kv_group=True)
    assert shared.heads == 2


def test_oracle_recall_beats_window_at_equal_budget():
    n = 64 * 16
    q, k = _qk(n, n, seed=10)
    q = q * 3
    _, bsum = block_attention_maps(q, k, block_size=64)
    m = oracle(q=q, k=k, block_size=64, policy=Policy("top_k", k=4, keep_sink=False,
                                                     keep_diagonal=False))
    win = sliding_window(q_len=n, kv_len=n, num_heads=4, batch=2, block_size=64, window=192)
    assert torch.equal(m.kv_num_blocks, win.kv_num_blocks)
    rec = (bsum * m.to_dense()).sum(-1)
    assert (rec >= (bsum * win.to_dense()).sum(-1) - 1e-6).all()


def test_oracle_layer_schedule():
    q, k = _qk(64 * 12, 64 * 12, seed=11)
    pol = Policy("top_k", k=2, layer_schedule="linear", layer_scale_end=2.0)
    a = oracle(q=q, k=k, policy=pol, layer_idx=0, num_layers=3)
    b = oracle(q=q, k=k, policy=pol, layer_idx=2, num_layers=3)
    assert a.kv_num_blocks[..., -1].eq(2).all() and b.kv_num_blocks[..., -1].eq(4).all()


@pytest.mark.parametrize("name", sorted(INPUT_DEPENDENT - {"oracle"}))
def test_input_dependent_gqa_heads(name):
    q, k = _qk(64 * 6, 64 * 9, Hq=6, Hkv=2, seed=12)
    m = make_pattern(name, q_len=384, kv_len=576, num_heads=6, block_size=64, batch=2, q=q, k=k)
    assert m.heads == 6
    s = make_pattern(name, q_len=384, kv_len=576, num_heads=6, block_size=64, batch=2, q=q, k=k,
                     shared_kv_group=True)
    assert s.heads == 2


def test_static_patterns_ignore_q_k():
    q, k = _qk(256, 256)
    a = make_pattern("sliding_window", q_len=256, kv_len=256, num_heads=4, q=q, k=k, window=64)
    b = make_pattern("sliding_window", q_len=256, kv_len=256, num_heads=4, window=64)
    assert a == b


def _bad_values(kind):
    """(value, exception) pairs that every parameter of type `kind` must refuse."""
    if kind is int:
        return [("3", TypeError), (1.5, TypeError), (True, TypeError), (-1, ValueError)]
    if kind is float:
        return [("0.5", TypeError), (True, TypeError), (float("nan"), ValueError),
                (-1.0, ValueError), (float("inf"), ValueError)]
    if kind is bool:
        return [(1, TypeError), ("yes", TypeError)]
    if kind is str:
        return [(3, TypeError), ("bogus", ValueError)]
    return [(3, TypeError), ("top_k", TypeError)]  # Policy


BAD_PARAMS = [(name, key, value, exc) for name in sorted(PATTERN_PARAMS)
              for key, kind in PATTERN_PARAMS[name].items() for value, exc in _bad_values(kind)]


@pytest.mark.parametrize("name,key,value,exc", BAD_PARAMS)
def test_every_pattern_parameter_is_validated(name, key, value, exc):
    q, k = _qk(200, 200)
    params = dict(PARAMS[name]) | {key: value}
    with pytest.raises(exc, match=rf"^{key}: expected"):
        make_pattern(name, q_len=200, kv_len=200, num_heads=4, batch=2, block_size=64, q=q, k=k,
                     **params)


@pytest.mark.parametrize("name", ["hierarchical", "vertical_slash", "antidiagonal", "oracle"])
@pytest.mark.parametrize("scale", [-1, 0, 0.0, float("nan"), -float("inf")])
def test_scale_must_be_finite_positive(name, scale):
    q, k = _qk(200, 200)
    with pytest.raises(ValueError, match=r"^scale: expected a positive finite float"):
        make_pattern(name, q_len=200, kv_len=200, num_heads=4, batch=2, q=q, k=k, scale=scale,
                     **PARAMS[name])


@pytest.mark.parametrize("name", ["hierarchical", "vertical_slash", "antidiagonal", "oracle"])
def test_explicit_default_scale_equals_none(name):
    q, k = _qk(200, 200)
    a = make_pattern(name, q_len=200, kv_len=200, num_heads=4, batch=2, q=q, k=k, **PARAMS[name])
    b = make_pattern(name, q_len=200, kv_len=200, num_heads=4, batch=2, q=q, k=k, scale=0.25,
                     **PARAMS[name])
    c = make_pattern(name, q_len=200, kv_len=200, num_heads=4, batch=2, q=q, k=k, scale=None,
                     **PARAMS[name])
    assert a == b == c  # D = 16: the default scale is 1 / 4


@pytest.mark.parametrize("device", ["bogus", "tpu", 3.5] +
                         ([] if torch.cuda.is_available() else ["cuda", "cuda:0"]))
@pytest.mark.parametrize("name", ["dense", "sliding_window", "bigbird"])
def test_unavailable_device_is_named(name, device):
    with pytest.raises(ValueError, match=r"^device: expected"):
        make_pattern(name, q_len=200, kv_len=200, num_heads=2, device=device, **PARAMS[name])


def test_antidiagonal_takes_transposed_views_of_q_and_k():
    # transformers hands the attention q/k as transposed views ([B, N, H, D] storage, seen as
    # [B, H, N, D]); a `.view` in the scores crashed on them (found by the demo)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 96, 4, 16, generator=g).transpose(1, 2)  # [1, 4, 96, 16], not contiguous
    k = torch.randn(1, 96, 2, 16, generator=g).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    got = antidiagonal_scores(q, k, block_size=32, stride=8, scale=0.25)
    want = antidiagonal_scores(q.contiguous(), k.contiguous(), block_size=32, stride=8,
                               scale=0.25)
    assert torch.equal(got, want)
    mask = antidiagonal(q=q, k=k, q_len=96, kv_len=96, num_heads=4, block_size=32, stride=8,
                        threshold=0.8)
    assert mask.density() > 0
