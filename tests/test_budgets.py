"""Per-layer / per-head budgets (`Policy.head_budgets` tables, `BudgetCalibrator`), the row
floor (`min_blocks`) and tail rows (`tail_blocks`, `tail_scale`) of adaptive_sparse.policies."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from adaptive_sparse.attention.block_maps import attention_recall
from adaptive_sparse.masks import block_causal
from adaptive_sparse.policies import BudgetCalibrator, Policy, row_probs

BS, N = 16, 256  # 16 x 16 blocks


def _maps(heads, concentration, seed=0, n=N):
    """(logits [1, H, Qb, Kb], block_sum [1, H, Qb, Kb]): each head's true mass is a softmax of
    random logits times its concentration (large: a few blocks hold the mass, a steep recall
    curve; small: spread, a flat one); the logits are the truth plus noise."""
    g = torch.Generator().manual_seed(seed)
    qb = n // BS
    allowed = block_causal(n, n, BS)
    true = torch.randn(1, heads, qb, qb, generator=g) * torch.tensor(concentration)[None, :, None,
                                                                                    None]
    bsum = row_probs(true, allowed)
    logits = (true + 0.3 * torch.randn(true.shape, generator=g)).masked_fill(~allowed,
                                                                              float("-inf"))
    return logits, bsum


def _calibrator(kind, layers_conc, seed=0, n=N, **base):
    pol = Policy(kind, **({"tau": 0.1} if kind == "threshold" else {"density": 0.1}), **base)
    cal = BudgetCalibrator(pol, num_layers=len(layers_conc))
    for i, conc in enumerate(layers_conc):
        logits, bsum = _maps(len(conc), conc, seed=seed + i, n=n)
        cal.update(i, logits, bsum, q_len=n, kv_len=n, block_size=BS)
    return cal


@pytest.mark.parametrize("kind", ["threshold", "density"])
def test_curves_are_what_select_keeps(kind):
    """Every point of a calibration curve is the density and recall of `select` at that knob
    (forced blocks, the floor and tail rows counted)."""
    base = dict(min_blocks=3, tail_blocks=2, tail_scale=2.0, local_blocks=1)
    cal = _calibrator(kind, [[4.0, 1.0, 0.3]], **base)
    logits, bsum = _maps(3, [4.0, 1.0, 0.3], seed=0)
    dens, rec = cal.curves()
    for g in (0, 9, 20, 40, 63):
        knob = cal.knobs[g]
        pol = Policy(kind, **({"tau": knob} if kind == "threshold" else {"density": knob}), **base)
        mask = pol.to_mask(logits, q_len=N, kv_len=N, block_size=BS)
        assert dens[0, :, g].tolist() == pytest.approx(mask.density_per_head().tolist(), abs=1e-9)
        assert rec[0, :, g].tolist() == pytest.approx(
            attention_recall(bsum, mask.to_dense()).tolist(), abs=1e-6)


@pytest.mark.parametrize("kind", ["threshold", "density"])
def test_allocation_hits_the_target_and_gives_flat_curves_more(kind):
    # layer 0: concentrated heads (steep recall curves); layer 1: spread heads (flatter: recall
    # 0.9 needs a higher density), 64 key blocks per row
    n, layers = 1024, [[5.0, 5.0], [2.0, 2.0]]
    cal = _calibrator(kind, layers, n=n)
    dens, rec = cal.curves()
    at90 = [float(dens[i, 0][(rec[i, 0] >= 0.9).nonzero()[0, 0]]) for i in range(2)]
    assert at90[1] > at90[0]
    pol, info = cal.policy(0.3)
    assert info["density"] == pytest.approx(0.3, abs=0.01)
    lo, hi = info["per_layer_density"]
    assert hi > 1.3 * lo, info["per_layer_density"]  # the flatter layer gets more blocks
    assert pol.per_layer_heads and len(pol.head_budgets) == 2 and len(pol.head_budgets[0]) == 2
    # the calibrated policy, applied to the calibration maps, keeps what the curves promised
    got = []
    for i, conc in enumerate(layers):
        logits, _ = _maps(2, conc, seed=i, n=n)
        got.append(pol.to_mask(logits, q_len=n, kv_len=n, block_size=BS, layer_idx=i,
                               num_layers=2).density())
    assert sum(got) / 2 == pytest.approx(info["density"], abs=1e-3)
    # water-filling beats one share for every head at about the same density; a threshold on
    # well-calibrated scores is already near that optimum (see the oracle test)
    g = min(range(64), key=lambda g: abs(float(dens[..., g].mean()) - info["density"]))
    assert abs(float(dens[..., g].mean()) - info["density"]) < 0.02
    uniform = float(rec[..., g].mean())
    assert info["recall"] > (uniform + 0.02 if kind == "density" else uniform - 2e-3)


def test_oracle_ranking_threshold_calibration_is_nearly_uniform():
    """Ranked by the true mass itself, a threshold's marginal gain at tau is tau: equal marginal
    gain means one threshold for every head (the plain oracle threshold policy)."""
    pol = Policy("threshold", tau=0.1)
    cal = BudgetCalibrator(pol, num_layers=2)
    for i, conc in enumerate([[6.0, 1.0], [0.5, 3.0]]):
        _, bsum = _maps(2, conc, seed=i)
        cal.update(i, bsum, bsum, q_len=N, kv_len=N, block_size=BS, scores_are_probs=True)
    _, info = cal.policy(0.25)
    taus = [t for row in info["knobs"] for t in row]
    assert max(taus) / min(taus) < 1.35 ** 2  # within two grid steps


def test_density_hits_target_over_many_targets():
    cal = _calibrator("density", [[4.0, 1.0, 0.3], [2.0, 0.7, 0.2]], n=1024)
    for t in (0.1, 0.2, 0.4, 0.6):
        _, info = cal.policy(t)
        assert abs(info["density"] - t) < 0.03, (t, info["density"])


def test_round_trip_and_json():
    cal = _calibrator("threshold", [[4.0, 0.5], [1.0, 1.0]])
    pol, _ = cal.policy(0.2)
    d = json.loads(json.dumps(pol.to_dict()))
    assert Policy.from_dict(d) == pol and Policy.coerce(d).to_dict() == d
    lever = Policy("threshold", tau=0.01, min_blocks=2, tail_blocks=1, tail_scale=4.0)
    assert Policy.from_dict(json.loads(json.dumps(lever.to_dict()))) == lever
    assert lever.kernel_form is None and Policy("threshold", tau=0.1).kernel_form \
        == "prob_thresholds" and Policy("top_k", k=2, tail_blocks=1).kernel_form == "row_budgets"


def test_table_rows_follow_the_layer():
    pol = Policy("top_k", k=2, head_budgets=[[1.0, 3.0], [2.0, 0.5]])
    scores = torch.randn(1, 2, N // BS, N // BS)
    for layer, want in ((0, [2, 6]), (1, [4, 1])):
        rb = pol.row_budgets(q_len=N, kv_len=N, block_size=BS, heads=2, layer_idx=layer,
                             num_layers=2)
        assert rb[:, -1].tolist() == want
        m = pol.to_mask(scores, q_len=N, kv_len=N, block_size=BS, layer_idx=layer, num_layers=2)
        assert m.kv_num_blocks[0, :, -1].tolist() == [max(w, 2) for w in want]  # sink+diag
        assert pol.expected_blocks_per_row(q_len=N, kv_len=N, block_size=BS, layer_idx=layer,
                                           num_layers=2) == pytest.approx(
            m.kv_num_blocks.float().mean().item())


def test_tail_rows_and_floor():
    scores = torch.randn(1, 2, N // BS, N // BS)
    plain = Policy("threshold", tau=0.2).select(scores, q_len=N, kv_len=N, block_size=BS)
    tail = Policy("threshold", tau=0.2, tail_blocks=2, tail_scale=8.0).select(
        scores, q_len=N, kv_len=N, block_size=BS)
    assert torch.equal(plain[:, :, :-2], tail[:, :, :-2])  # only the last two rows change
    assert tail[:, :, -2:].sum() > plain[:, :, -2:].sum()
    floor = Policy("threshold", tau=0.9, min_blocks=5, keep_sink=False,
                   keep_diagonal=False).select(scores, q_len=N, kv_len=N, block_size=BS)
    per_row = block_causal(N, N, BS).sum(-1)
    assert torch.equal(floor.sum(-1)[0, 0], per_row.clamp(max=5))
    # a decoding step (one query row) is a tail row
    one = torch.randn(1, 2, 1, N // BS)
    k1 = Policy("density", density=0.1, tail_blocks=1, tail_scale=3.0).row_budgets(
        q_len=1, kv_len=N, block_size=BS, heads=2)
    assert k1.tolist() == [[math.ceil(0.3 * 16 - 1e-9)]] * 2
    assert Policy("top_k", k=1, min_blocks=4).to_mask(
        one, q_len=1, kv_len=N, block_size=BS).kv_num_blocks.tolist() == [[[4], [4]]]
    with pytest.raises(ValueError, match="^min_blocks, tail_blocks: a threshold policy"):
        Policy("threshold", tau=0.1, min_blocks=1).prob_thresholds(heads=2)


@pytest.mark.parametrize("kwargs, name", [
    (dict(kind="top_k", k=2, min_blocks=-1), "min_blocks"),
    (dict(kind="top_k", k=2, tail_blocks=1.5), "tail_blocks"),
    (dict(kind="top_k", k=2, tail_blocks=1, tail_scale=0.0), "tail_scale"),
    (dict(kind="top_k", k=2, tail_scale=2.0), "tail_scale"),
    (dict(kind="top_k", k=2, head_budgets=[[1.0, 2.0], [1.0]]), "head_budgets"),
    (dict(kind="top_k", k=2, head_budgets=[[1.0, 2.0], 1.0]), "head_budgets"),
    (dict(kind="threshold", tau=0.1, head_budgets=[[1, 2], [1, 2]]), "head_budgets"),
])
def test_bad_policy_arguments_name_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=f"^{name}: "):
        Policy(**kwargs)


def test_bad_calibration_arguments_name_the_argument():
    with pytest.raises(ValueError, match="^base: "):
        BudgetCalibrator(Policy("top_p", p=0.9), num_layers=2)
    with pytest.raises(ValueError, match="^base: "):
        BudgetCalibrator(Policy("density", density=0.1, head_budgets=[1.0, 2.0]), num_layers=2)
    with pytest.raises(ValueError, match="^num_layers: "):
        BudgetCalibrator(Policy("density", density=0.1), num_layers=0)
    with pytest.raises(ValueError, match="^knobs: "):
        BudgetCalibrator(Policy("threshold", tau=0.1), num_layers=1, knobs=[0.1, 0.2])
    cal = _calibrator("density", [[1.0]])
    with pytest.raises(ValueError, match="^target: "):
        cal.policy(0.0)
    with pytest.raises(ValueError, match="^layer_idx: "):
        cal.update(3, *_maps(1, [1.0]), q_len=N, kv_len=N, block_size=BS)
    with pytest.raises(ValueError, match="^block_sum: "):
        cal.update(0, _maps(1, [1.0])[0], torch.zeros(1, 1, 2, 2), q_len=N, kv_len=N,
                   block_size=BS)
    two = BudgetCalibrator(Policy("density", density=0.1), num_layers=2)
    two.update(0, *_maps(1, [1.0]), q_len=N, kv_len=N, block_size=BS)
    with pytest.raises(ValueError, match=r"^layers: expected calibration data .* \[1\]"):
        two.policy(0.1)
    pol = Policy("top_k", k=2, head_budgets=[[1.0], [2.0]])
    with pytest.raises(ValueError, match=r"^head_budgets: expected 1 rows \(one per layer"):
        pol.to_mask(torch.randn(1, 1, 4, 4), q_len=64, kv_len=64, block_size=16)


def test_cli_refuses_a_bad_floor_with_exit_2():
    r = subprocess.run([sys.executable, "-m", "adaptive_sparse.cli", "eval", "--pattern",
                        "oracle", "--param", "kind=threshold", "--param", "tau=0.1",
                        "--param", "tail_scale=2"], capture_output=True, text=True)
    assert r.returncode == 2 and "tail_scale" in r.stderr, r.stderr


@pytest.mark.skipif(not (torch.cuda.is_available() or __import__("os").environ.get(
    "TRITON_INTERPRET") == "1"), reason="triton selection: needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("pol", [
    dict(kind="threshold", tau=0.05, head_budgets=[[1.0, 2.0, 0.5], [4.0, 1.0, 0.25]]),
    dict(kind="density", density=0.2, head_budgets=[[1.0, 2.0, 0.5], [3.0, 1.0, 0.25]]),
    dict(kind="top_k", k=2, min_blocks=3, tail_blocks=2, tail_scale=2.0),
])
def test_kernel_selection_reproduces_tables_and_tails(pol):
    """The gates' one-launch selection, fed by `prob_thresholds` / `row_budgets`, keeps what
    `to_mask` keeps for a per-layer table (layer 1 of 2) and for row-budget tails / floors."""
    from adaptive_sparse.attention.triton.gate import scores_to_kv_indices
    from adaptive_sparse.masks import BlockSparseMask

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    policy = Policy(**pol)
    assert policy.kernel_form is not None
    for q_len, kv_len in ((160, 160), (1, 200)):
        qb, kb = -(-q_len // BS), -(-kv_len // BS)
        g = torch.Generator().manual_seed(q_len)
        logits = (2 * torch.randn(2, 3, qb, kb, generator=g)).to(dev).masked_fill(
            ~block_causal(q_len, kv_len, BS, device=dev), float("-inf"))
        where = dict(heads=3, layer_idx=1, num_layers=2)
        want = policy.to_mask(logits, q_len=q_len, kv_len=kv_len, block_size=BS, layer_idx=1,
                              num_layers=2).to_dense()
        args = dict(q_len=q_len, kv_len=kv_len, block_size=BS)
        if policy.kernel_form == "prob_thresholds":
            args["prob_threshold"] = policy.prob_thresholds(**where).to(dev)
        else:
            args["row_budgets"] = policy.row_budgets(q_len=q_len, kv_len=kv_len, block_size=BS,
                                                     **where).to(torch.int32).to(dev)
        num, idx = scores_to_kv_indices(logits, **args)
        got = BlockSparseMask.from_indices(num, idx, block_size=BS, q_len=q_len,
                                           kv_len=kv_len).to_dense()
        assert torch.equal(got, want)
