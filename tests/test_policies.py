"""Policies against a per-row Python oracle in fp64, plus budgets, schedules and serialization."""

import json
import math
import time

import pytest
import torch

from adaptive_sparse.masks import block_causal, diagonal_blocks, num_blocks
from adaptive_sparse.policies import (Policy, density_mask, forced_blocks, threshold_mask,
                                      top_k_mask, top_p_mask)

GEOMS = [(300, 420, 64), (257, 257, 64), (40, 1000, 32), (1000, 1000, 128), (63, 64, 16)]


def _scores(q_len, kv_len, bs, B=2, H=3, seed=0, probs=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, H, num_blocks(q_len, bs), num_blocks(kv_len, bs), generator=g) * 2
    return s.exp() if probs else s


def _row_probs64(scores, allowed, probs):
    s = scores.double()
    if probs:
        p = torch.where(allowed, s, 0.0)
        return p / p.sum(-1, keepdim=True)
    return torch.softmax(s.masked_fill(~allowed, -math.inf), -1)


def _brute(scores, q_len, kv_len, bs, kind, val, forced, probs=False):
    """Per-row Python selection: forced blocks first, then the rest by descending probability."""
    allowed = block_causal(q_len, kv_len, bs)
    p = _row_probs64(scores, allowed, probs)
    out = torch.zeros(scores.shape, dtype=torch.bool)
    B, H, Qb, Kb = scores.shape
    for b in range(B):
        for h in range(H):
            for r in range(Qb):
                cols = [c for c in range(Kb) if allowed[r, c]]
                f = [c for c in cols if forced[r, c]]
                rest = sorted((c for c in cols if not forced[r, c]), key=lambda c: -p[b, h, r, c])
                if kind == "threshold":
                    keep = f + [c for c in rest if p[b, h, r, c] >= val]
                elif kind == "top_k":
                    keep = f + rest[:max(0, val - len(f))]
                elif kind == "density":
                    budget = math.ceil(val * len(cols) - 1e-9)
                    keep = f + rest[:max(0, budget - len(f))]
                else:
                    keep, mass = [], 0.0
                    for c in sorted(f, key=lambda c: -p[b, h, r, c]) + rest:
                        if mass >= val - 1e-5:  # the policy reaches p within 1e-5
                            break
                        keep.append(c)
                        mass += float(p[b, h, r, c])
                    keep += f
                out[b, h, r, keep] = True
    return out


@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("kind,val", [("top_k", 1), ("top_k", 3), ("top_p", 0.5), ("top_p", 0.9),
                                      ("threshold", 0.05), ("density", 0.3), ("density", 1.0)])
@pytest.mark.parametrize("sink,diag,local", [(True, True, 0), (False, False, 0), (True, False, 2)])
def test_policy_matches_brute_force(geom, kind, val, sink, diag, local):
    q_len, kv_len, bs = geom
    scores = _scores(q_len, kv_len, bs, seed=GEOMS.index(geom) * 100 + int(val * 10))
    forced = forced_blocks(q_len, kv_len, bs, keep_sink=sink, keep_diagonal=diag,
                           local_blocks=local)
    pol = Policy(kind, **{{"top_k": "k", "top_p": "p", "threshold": "tau",
                           "density": "density"}[kind]: val},
                 keep_sink=sink, keep_diagonal=diag, local_blocks=local)
    mask = pol.to_mask(scores, q_len=q_len, kv_len=kv_len, block_size=bs)
    want = _brute(scores, q_len, kv_len, bs, kind, val, forced)
    assert torch.equal(mask.to_dense(), want)
    assert mask.causal and (mask.batch, mask.heads) == (2, 3)


@pytest.mark.parametrize("kind,val", [("top_p", 0.8), ("top_k", 2), ("threshold", 0.1)])
def test_scores_are_probs_normalizes_rows(kind, val):
    q_len, kv_len, bs = 500, 700, 64
    maps = _scores(q_len, kv_len, bs, probs=True, seed=3)
    forced = forced_blocks(q_len, kv_len, bs)
    name = {"top_k": "k", "top_p": "p", "threshold": "tau"}[kind]
    got = Policy(kind, **{name: val}).select(maps * 7.5, q_len=q_len, kv_len=kv_len,
                                             block_size=bs, scores_are_probs=True)
    assert torch.equal(got, _brute(maps, q_len, kv_len, bs, kind, val, forced, probs=True))


def test_forced_blocks_count_inside_top_k():
    q_len = kv_len = 64 * 10
    scores = _scores(q_len, kv_len, 64, seed=1)
    dense = top_k_mask(scores, 4, q_len=q_len, kv_len=kv_len, block_size=64).to_dense()
    assert dense[..., 0].all()
    assert (dense & diagonal_blocks(q_len, kv_len, 64)).sum(-1).eq(1).all()
    per_row = dense.sum(-1)
    assert per_row[..., 3:].eq(4).all()
    assert per_row[..., :4].tolist() == [[[1, 2, 3, 4]] * 3] * 2
    # forced blocks beyond the budget are still kept
    dense = top_k_mask(scores, 1, q_len=q_len, kv_len=kv_len, block_size=64,
                       local_blocks=3).to_dense()
    assert dense.sum(-1)[..., 9].eq(5).all()


def test_top_p_forced_mass_counts():
    q_len = kv_len = 64 * 6
    # all mass on the sink: top_p keeps only the forced blocks
    scores = torch.full((1, 1, 6, 6), -30.0)
    scores[..., 0] = 10.0
    dense = top_p_mask(scores, 0.9, q_len=q_len, kv_len=kv_len, block_size=64).to_dense()
    want = forced_blocks(q_len, kv_len, 64)
    assert torch.equal(dense[0, 0], want)
    dense = top_p_mask(scores, 0.9, q_len=q_len, kv_len=kv_len, block_size=64,
                       keep_diagonal=False, keep_sink=False).to_dense()
    assert dense[0, 0].sum(-1).eq(1).all() and dense[0, 0, :, 0].all()


def test_top_p_one_keeps_every_block_with_mass():
    q_len = kv_len = 64 * 8
    scores = _scores(q_len, kv_len, 64, seed=4)
    scores[..., 2] = -math.inf  # a block with no mass is not needed to reach p = 1
    dense = top_p_mask(scores, 1.0, q_len=q_len, kv_len=kv_len, block_size=64,
                       keep_sink=False, keep_diagonal=False).to_dense()
    want = block_causal(q_len, kv_len, 64).clone()
    want[:, 2] = False
    assert torch.equal(dense, want.expand_as(dense))


def test_density_budget_per_row():
    q_len, kv_len = 64 * 20, 64 * 30
    scores = _scores(q_len, kv_len, 64, seed=5)
    allowed = block_causal(q_len, kv_len, 64).sum(-1)
    for d in (0.1, 0.25, 0.5):
        dense = density_mask(scores, d, q_len=q_len, kv_len=kv_len, block_size=64).to_dense()
        want = torch.ceil(allowed.double() * d - 1e-9).clamp_min(2).long()
        assert torch.equal(dense.sum(-1), want.expand(2, 3, -1))


def test_threshold_keeps_blocks_above_tau():
    q_len = kv_len = 64 * 12
    scores = _scores(q_len, kv_len, 64, seed=6)
    allowed = block_causal(q_len, kv_len, 64)
    p = _row_probs64(scores, allowed, False)
    dense = threshold_mask(scores, 0.2, q_len=q_len, kv_len=kv_len, block_size=64,
                           keep_sink=False, keep_diagonal=False).to_dense()
    assert torch.equal(dense, (p >= 0.2) & allowed)
    assert dense.sum() > 0


def test_linear_layer_schedule():
    q_len = kv_len = 64 * 32
    scores = _scores(q_len, kv_len, 64, seed=7)
    pol = Policy("top_k", k=4, layer_schedule="linear", layer_scale_end=3.0)
    counts = [pol.to_mask(scores, q_len=q_len, kv_len=kv_len, block_size=64, layer_idx=i,
                          num_layers=5).kv_num_blocks[..., -1].unique().tolist() for i in range(5)]
    assert counts == [[4], [6], [8], [10], [12]]
    assert pol.layer_factor(0, 5) == 1.0 and pol.layer_factor(4, 5) == 3.0
    const = Policy("top_k", k=4, layer_scale_end=3.0)
    assert const.layer_factor(4, 5) == 1.0
    down = Policy("density", density=0.5, layer_schedule="linear", layer_scale_end=0.5)
    d0 = down.to_mask(scores, q_len=q_len, kv_len=kv_len, block_size=64, layer_idx=0,
                      num_layers=2).density()
    d1 = down.to_mask(scores, q_len=q_len, kv_len=kv_len, block_size=64, layer_idx=1,
                      num_layers=2).density()
    assert d1 < 0.75 * d0


def test_head_budgets_multipliers_and_absolute():
    q_len = kv_len = 64 * 32
    scores = _scores(q_len, kv_len, 64, H=3, seed=8)
    m = Policy("top_k", k=4, head_budgets=[0.5, 1.0, 2.0]).to_mask(
        scores, q_len=q_len, kv_len=kv_len, block_size=64)
    assert m.kv_num_blocks[..., -1].tolist() == [[2, 4, 8]] * 2
    m = Policy("density", density=0.5, head_budgets=[3, 5, 7]).to_mask(
        scores, q_len=q_len, kv_len=kv_len, block_size=64)
    assert m.kv_num_blocks[..., -1].tolist() == [[3, 5, 7]] * 2
    lo = Policy("top_p", p=0.9, head_budgets=[0.5, 1.0, 1.0]).to_mask(
        scores, q_len=q_len, kv_len=kv_len, block_size=64).density_per_head()
    assert lo[0] < lo[1]
    th = Policy("threshold", tau=0.05, head_budgets=[1.0, 1.0, 4.0]).to_mask(
        scores, q_len=q_len, kv_len=kv_len, block_size=64).density_per_head()
    assert th[2] > th[1]


def test_neg_inf_logits_and_causality():
    q_len, kv_len = 130, 900
    scores = _scores(q_len, kv_len, 64, seed=9)
    scores[..., 1::2] = -math.inf
    allowed = block_causal(q_len, kv_len, 64)
    for pol in (Policy("top_k", k=50), Policy("top_p", p=0.99), Policy("threshold", tau=0.0)):
        dense = pol.to_mask(scores, q_len=q_len, kv_len=kv_len, block_size=64).to_dense()
        assert not (dense & ~allowed).any()


def test_dict_round_trip():
    for pol in (Policy("top_p", p=0.95, keep_sink=False),
                Policy("top_k", k=8, local_blocks=2, layer_schedule="linear",
                       layer_scale_end=0.5, head_budgets=[1.0, 2.0]),
                Policy("density", density=0.25, head_budgets=[2, 3])):
        d = json.loads(json.dumps(pol.to_dict()))
        assert Policy.from_dict(d) == pol
        assert Policy.coerce(d) == pol


def test_fast_at_8k_by_30_layers():
    qb = 8192 // 64
    scores = torch.randn(1, 9, qb, qb)
    t0 = time.perf_counter()
    for layer in range(30):
        Policy("top_p", p=0.9, local_blocks=1, layer_schedule="linear",
               layer_scale_end=0.5).to_mask(scores, q_len=8192, kv_len=8192, block_size=64,
                                            layer_idx=layer, num_layers=30)
    assert time.perf_counter() - t0 < 30.0


@pytest.mark.parametrize("policy", [
    Policy(kind="top_k", k=3), Policy(kind="top_k", k=2, local_blocks=1),
    Policy(kind="density", density=0.3), Policy(kind="density", density=0.2, keep_sink=False),
    Policy(kind="top_k", k=4, layer_schedule="linear", layer_scale_end=2.0),
])
@pytest.mark.parametrize("n", [200, 517])
def test_unvalidated_fast_path_equals_validated_and_host_count_matches(policy, n):
    """The sync-free path (validate=False) builds the same mask, which passes full validation;
    the host-side expected blocks per row equals the mask's real mean."""
    from adaptive_sparse.masks import BlockSparseMask

    g = torch.Generator().manual_seed(n)
    qb = (n + 31) // 32
    scores = torch.randn(1, 3, qb, qb, generator=g)
    kw = dict(q_len=n, kv_len=n, block_size=32, layer_idx=2, num_layers=4)
    fast = policy.to_mask(scores, validate=False, **kw)
    slow = policy.to_mask(scores, **kw)
    assert fast == slow
    BlockSparseMask(fast.kv_num_blocks, fast.kv_indices, 32, n, n)  # full validation passes
    expect = policy.expected_blocks_per_row(q_len=n, kv_len=n, block_size=32, layer_idx=2,
                                            num_layers=4, heads=3)
    assert expect == pytest.approx(float(slow.kv_num_blocks.float().mean()))


def test_threshold_and_top_p_have_no_host_count():
    for pol in (Policy(kind="threshold", tau=0.05), Policy(kind="top_p", p=0.9)):
        assert pol.expected_blocks_per_row(q_len=256, kv_len=256, block_size=32) is None


BAD_POLICIES = [
    ({"kind": "bogus", "k": 1}, "kind"), ({"kind": 3, "k": 1}, "kind"),
    *[({"kind": "threshold", "tau": v}, "tau") for v in (-0.1, 1.5, float("nan"), "0.5", True,
                                                         None)],
    *[({"kind": "top_k", "k": v}, "k") for v in (0, -1, 1.5, True, "3", float("nan"), None)],
    *[({"kind": "top_p", "p": v}, "p") for v in (0, 1.5, float("nan"), -float("inf"), "0.9")],
    *[({"kind": "density", "density": v}, "density") for v in (0.0, 1.01, float("nan"), [0.5])],
    ({"kind": "top_k", "k": 2, "tau": 0.5}, "tau"),
    ({"kind": "top_k", "k": 2, "keep_sink": 1}, "keep_sink"),
    ({"kind": "top_k", "k": 2, "keep_diagonal": "no"}, "keep_diagonal"),
    *[({"kind": "top_k", "k": 2, "local_blocks": v}, "local_blocks") for v in (-1, 1.5, True)],
    ({"kind": "top_k", "k": 2, "layer_schedule": "cosine"}, "layer_schedule"),
    *[({"kind": "top_k", "k": 2, "layer_scale_end": v}, "layer_scale_end")
      for v in (0, -1.0, float("nan"), float("inf"), "2")],
    *[({"kind": "top_k", "k": 2, "head_budgets": v}, "head_budgets")
      for v in ([], [0.5, 0.0], [1.0, float("nan")], "1", [1, 2.0])],
    ({"kind": "threshold", "tau": 0.1, "head_budgets": [1, 2]}, "head_budgets"),
]


@pytest.mark.parametrize("params,name", BAD_POLICIES)
def test_bad_policy_parameters_are_named(params, name):
    with pytest.raises((ValueError, TypeError), match=rf"^{name}: "):
        Policy(**params)
    with pytest.raises((ValueError, TypeError), match=rf"^{name}: "):
        Policy.from_dict(params)


@pytest.mark.parametrize("layer_idx,num_layers,name", [(-1, 4, "layer_idx"), (4, 4, "layer_idx"),
                                                        (0, 0, "num_layers"), (1.0, 4, "layer_idx"),
                                                        (0, float("nan"), "num_layers")])
def test_bad_layer_position_is_named(layer_idx, num_layers, name):
    scores = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        Policy("top_k", k=2).to_mask(scores, q_len=256, kv_len=256, block_size=64,
                                     layer_idx=layer_idx, num_layers=num_layers)


def _threshold_screen(scores, calls):
    def screen(policy):
        calls.append(policy.tau)
        return float(policy.to_mask(scores, q_len=1024, kv_len=1024, block_size=64).density())
    return screen


def test_calibrate_to_density_bisects_a_threshold_to_its_target():
    from adaptive_sparse.policies import calibrate_to_density

    scores = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * 3
    calls = []
    policy, d = calibrate_to_density(_threshold_screen(scores, calls),
                                     lambda x: Policy(kind="threshold", tau=1.0 / x),
                                     1.0, 1e7, 0.3, log=True, iters=16)
    assert len(calls) == len(set(calls)) <= 18  # each tau screened once
    assert abs(d - 0.3) < 0.02 and policy.kind == "threshold"
    assert d == pytest.approx(_threshold_screen(scores, [])(policy))
    # the best of every screened tau, not only of the last bracket
    dens = [_threshold_screen(scores, [])(Policy(kind="threshold", tau=t)) for t in calls]
    assert abs(d - 0.3) == min(abs(x - 0.3) for x in dens)


def test_calibrate_to_density_on_an_integer_knob_ties_to_the_sparser():
    from adaptive_sparse.policies import calibrate_to_density

    seen = []

    def screen(k):
        seen.append(k)
        return k / 10  # density 0.1 per step

    params, d = calibrate_to_density(screen, lambda x: x, 0, 10, 0.35, integer=True, iters=20)
    assert (params, d) == (3, 0.3) and len(seen) == len(set(seen))


@pytest.mark.parametrize("args,match", [
    ((1.0, 1.0, 0.1), "^lo, hi: expected"), ((0.0, 1.0, 0.1, True), "^lo, hi: expected"),
    ((1.0, 2.0, 0.0), "^target: expected"), ((1.0, 2.0, float("nan")), "^target: expected"),
])
def test_calibrate_to_density_refuses_bad_arguments(args, match):
    from adaptive_sparse.policies import calibrate_to_density

    lo, hi, target, *log = args
    with pytest.raises(ValueError, match=match):
        calibrate_to_density(float, float, lo, hi, target, log=bool(log))
    with pytest.raises(ValueError, match="^iters: expected"):
        calibrate_to_density(float, float, 1.0, 2.0, 0.5, iters=0)


def test_nearest_to_densities_screens_each_candidate_once_ties_sparser():
    from adaptive_sparse.policies import nearest_to_densities

    calls = []

    def screen(c):
        calls.append(c)
        return {"density": c / 10, "recall": 1 - c / 10}

    near = nearest_to_densities(screen, [1, 2, 4, 8], [0.1, 0.3, 0.6, 1.0])
    assert calls == [1, 2, 4, 8]
    assert {t: c for t, (c, _) in near.items()} == {0.1: 1, 0.3: 2, 0.6: 4, 1.0: 8}
    assert near[0.3][1] == {"density": 0.2, "recall": 0.8}
    with pytest.raises(ValueError, match="^candidates: expected at least one"):
        nearest_to_densities(screen, [], [0.1])
