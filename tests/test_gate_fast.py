"""The gate's fast path: `Gate.fast_scores` against `Gate.forward` and an fp64 oracle, the
Triton selection `scores_to_kv_indices` against `Policy.to_mask` (same kept blocks, same
index layout), the `GateProvider` fast path against its reference path, and CUDA-graph replay
against eager on fresh inputs.

The selection and provider tests run the Triton kernel: on CUDA, or on CPU under
TRITON_INTERPRET=1 (`TRITON_INTERPRET=1 pytest tests/test_gate_fast.py`)."""

from __future__ import annotations

import itertools

import pytest
import torch

from adaptive_sparse.masks import BlockSparseMask, block_causal, num_blocks
from adaptive_sparse.policies import Policy
from adaptive_sparse.gates import GateProvider
from adaptive_sparse.gates.network import Gate, GateConfig, GateSet, gate_tables
from marks import CUDA, gpu, needs_cuda, needs_triton as needs_kernel
from test_gates import tiny_llama  # tests/ is on sys.path (rootdir-relative test modules)

DEV = "cuda" if CUDA else "cpu"


def gate_config(**kw):
    base = dict(num_layers=1, num_heads=6, num_kv_heads=2, head_dim=16, block_size=16,
                init="random")
    return GateConfig(**(base | kw))


def pre_rotary(B, H, N, D, dtype, gen):
    """A fresh random [B, H, N, D] laid out as captured: a transposed view of [B, N, H, D]."""
    return torch.randn(B, N, H, D, generator=gen).to(dtype).transpose(1, 2)


GATE_CASES = [  # (share_kv_group, use_rotary, q_pooling, k_pooling)
    (False, True, ("avg",), ("max", "min", "avg")),
    (True, True, ("avg",), ("max", "min", "avg")),
    (False, False, ("avg", "max"), ("min",)),
    (True, True, ("max",), ("avg", "max")),
]


@pytest.mark.parametrize("shared, rotary, qp, kp", GATE_CASES)
@pytest.mark.parametrize("q_len, kv_len", [(128, 128), (48, 160), (100, 100), (37, 150)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_scores_match_forward_and_fp64(shared, rotary, qp, kp, q_len, kv_len, dtype):
    gen = torch.Generator().manual_seed(q_len * 1000 + kv_len)
    c = gate_config(share_kv_group=shared, use_rotary=rotary, q_pooling=qp, k_pooling=kp)
    gate = Gate(c)
    q = pre_rotary(2, 6, q_len, 16, dtype, gen)
    k = pre_rotary(2, 2, kv_len, 16, dtype, gen)
    want = gate(q, k)  # [B, H, Qb, Kb] float32
    oracle = Gate(c).double()
    oracle.load_state_dict(gate.state_dict())
    exact = oracle(q.double(), k.double())
    got = gate.fast_scores(q, k, gate_tables(c, q_len, kv_len))
    assert got.dtype == torch.float32 and got.shape == want.shape
    allowed = block_causal(q_len, kv_len, 16)
    assert torch.isneginf(got[..., ~allowed]).all()
    err_fast = (got[..., allowed].double() - exact[..., allowed]).abs().max()
    err_eager = (want[..., allowed].double() - exact[..., allowed]).abs().max()
    assert err_fast <= 4 * err_eager + 1e-5
    raw = gate.fast_scores(q, k, gate_tables(c, q_len, kv_len), causal_fill=False)
    assert torch.isfinite(raw).all()
    assert torch.equal(raw[..., allowed], got[..., allowed])


def test_fast_scores_follow_weight_updates_and_check_tables():
    gen = torch.Generator().manual_seed(1)
    c = gate_config()
    gate = Gate(c)
    q, k = pre_rotary(1, 6, 64, 16, torch.float32, gen), pre_rotary(1, 2, 64, 16,
                                                                       torch.float32, gen)
    t = gate_tables(c, 64, 64)
    before = gate.fast_scores(q, k, t)
    with torch.no_grad():
        gate.wk.mul_(-2.0)  # in place: the cached fused weights must be rebuilt
    after = gate.fast_scores(q, k, t)
    torch.testing.assert_close(after, gate(q, k), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before[torch.isfinite(before)], after[torch.isfinite(after)])
    with pytest.raises(ValueError, match="^tables: expected gate tables for q_len=64, kv_len=80"):
        gate.fast_scores(q, pre_rotary(1, 2, 80, 16, torch.float32, gen), t)


POLICIES = [
    dict(kind="top_k", k=3),
    dict(kind="top_k", k=2, keep_sink=False),
    dict(kind="top_k", k=4, keep_diagonal=False, local_blocks=1),
    dict(kind="density", density=0.3),
    dict(kind="density", density=0.5, keep_sink=False, keep_diagonal=False),
    dict(kind="density", density=0.2, local_blocks=2, layer_schedule="linear",
         layer_scale_end=2.0),
    dict(kind="density", density=0.25, head_budgets=[0.5, 1.0, 2.0]),
    dict(kind="top_k", k=1, head_budgets=[1, 3, 6]),
    dict(kind="threshold", tau=0.05),
    dict(kind="threshold", tau=0.1, keep_sink=False, keep_diagonal=False),
    dict(kind="threshold", tau=0.02, head_budgets=[0.5, 1.0, 3.0], local_blocks=1),
]


def _selection_args(policy, q_len, kv_len, bs, heads, layer_idx, num_layers, device):
    where = dict(heads=heads, layer_idx=layer_idx, num_layers=num_layers)
    args = dict(q_len=q_len, kv_len=kv_len, block_size=bs, keep_sink=policy.keep_sink,
                keep_diagonal=policy.keep_diagonal, local_blocks=policy.local_blocks)
    if policy.kind == "threshold":
        args["prob_threshold"] = policy.prob_thresholds(**where).to(device)
    else:
        budgets = policy.row_budgets(q_len=q_len, kv_len=kv_len, block_size=bs, **where)
        args["row_budgets"] = budgets.to(torch.int32).to(device)
    return args


@needs_kernel
@pytest.mark.parametrize("pol", POLICIES, ids=lambda d: "-".join(f"{v}" for v in d.values()))
@pytest.mark.parametrize("q_len, kv_len, bs", [(160, 160, 16), (100, 170, 16), (1, 200, 16)])
def test_kernel_selection_equals_policy_to_mask(pol, q_len, kv_len, bs):
    from adaptive_sparse.attention.triton.gate import scores_to_kv_indices

    policy = Policy(**pol)
    gen = torch.Generator().manual_seed(q_len * 7 + kv_len)
    qb, kb = num_blocks(q_len, bs), num_blocks(kv_len, bs)
    raw = (2.0 * torch.randn(2, 3, qb, kb, generator=gen)).to(DEV)  # fresh, finite everywhere
    allowed = block_causal(q_len, kv_len, bs, device=DEV)
    logits = raw.masked_fill(~allowed, float("-inf"))  # what the gate hands to the policy
    # layer 3 of 4: the linear schedule's factor is not 1
    want = policy.to_mask(logits, q_len=q_len, kv_len=kv_len, block_size=bs, layer_idx=3,
                          num_layers=4)
    args = _selection_args(policy, q_len, kv_len, bs, 3, 3, 4, DEV)
    num, idx = scores_to_kv_indices(raw, **args)  # outside the causal region: ignored
    assert torch.equal(num, want.kv_num_blocks)
    assert torch.equal(idx, want.kv_indices)  # kept ascending, then the rest ascending
    BlockSparseMask(num, idx, bs, q_len, kv_len)  # validates range, order, causality


@needs_kernel
def test_kernel_row_budgets_beyond_row_and_scalar_modes_agree():
    from adaptive_sparse.attention.triton.gate import scores_to_kv_indices

    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(1, 2, 6, 6, generator=gen).to(DEV)
    geo = dict(q_len=96, kv_len=96, block_size=16)
    top = scores_to_kv_indices(scores, top_k=3, **geo)
    rows = scores_to_kv_indices(scores, row_budgets=torch.full((2, 6), 3, dtype=torch.int32,
                                                               device=DEV), **geo)
    assert torch.equal(top[0], rows[0]) and torch.equal(top[1], rows[1])
    big = scores_to_kv_indices(scores, row_budgets=torch.full((2, 6), 99, dtype=torch.int32,
                                                              device=DEV), **geo)
    assert torch.equal(big[0].cpu(), torch.arange(1, 7, dtype=torch.int32).expand(1, 2, 6))


def test_selection_arguments_are_checked():
    from adaptive_sparse.attention.triton.gate import scores_to_kv_indices

    s = torch.randn(1, 2, 4, 4)
    geo = dict(q_len=64, kv_len=64, block_size=16)
    with pytest.raises(ValueError, match="^row_budgets: expected an int32 tensor \\[H, Qb\\]"):
        scores_to_kv_indices(s, row_budgets=torch.ones(2, 3, dtype=torch.int32), **geo)
    with pytest.raises(ValueError, match="^row_budgets: expected an int32"):
        scores_to_kv_indices(s, row_budgets=torch.ones(2, 4), **geo)
    with pytest.raises(ValueError, match="^prob_threshold: expected a float32 tensor \\[H\\]"):
        scores_to_kv_indices(s, prob_threshold=torch.ones(3), **geo)
    with pytest.raises(ValueError, match="^top_k, threshold, row_budgets, prob_threshold"):
        scores_to_kv_indices(s, top_k=2, threshold=0.1, **geo)
    with pytest.raises(ValueError, match="^local_blocks: expected a non-negative int"):
        scores_to_kv_indices(s, top_k=2, local_blocks=-1, **geo)
    with pytest.raises(ValueError, match="^kind: expected 'top_k' or 'density'"):
        Policy(kind="threshold", tau=0.1).row_budgets(q_len=64, kv_len=64, block_size=16,
                                                      heads=2)
    with pytest.raises(ValueError, match="^kind: expected 'threshold'"):
        Policy(kind="top_k", k=2).prob_thresholds(heads=2)
    with pytest.raises(ValueError, match="^head_budgets: expected 3 entries"):
        Policy(kind="top_k", k=2, head_budgets=[1, 2]).row_budgets(
            q_len=64, kv_len=64, block_size=16, heads=3)
    gates = GateSet(GateConfig(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                               block_size=16))
    with pytest.raises(ValueError, match="^fast: expected None or a bool"):
        GateProvider(gates, dict(kind="top_k", k=2), fast="yes")
    with pytest.raises(ValueError, match="^cuda_graphs: expected None or a bool"):
        GateProvider(gates, dict(kind="top_k", k=2), cuda_graphs=1)


def test_row_budgets_and_thresholds_match_expected_blocks_per_row():
    pol = Policy(kind="density", density=0.3, head_budgets=[0.5, 2.0], layer_schedule="linear",
                 layer_scale_end=0.5)
    rb = pol.row_budgets(q_len=200, kv_len=300, block_size=16, heads=2, layer_idx=2,
                         num_layers=3)
    allowed = block_causal(200, 300, 16)
    assert rb.shape == (2, num_blocks(200, 16)) and rb.dtype == torch.int64
    m = torch.tensor([0.5, 2.0], dtype=torch.float64) * 0.5
    want = torch.ceil(torch.clamp(m * 0.3, max=1)[:, None] * allowed.sum(-1) - 1e-9).long()
    assert torch.equal(rb, want.clamp_min(1))
    th = Policy(kind="threshold", tau=0.2, head_budgets=[0.5, 4.0]).prob_thresholds(heads=2)
    assert th.dtype == torch.float32 and torch.equal(th, torch.tensor([0.4, 0.05]))


def _run_model(model, provider, ids, **kw):
    from adaptive_sparse.models import sparse_attention

    masks = {}

    def recording(layer_idx, q, k):
        masks[layer_idx] = provider(layer_idx, q, k)
        return masks[layer_idx]

    with torch.no_grad(), sparse_attention(model, recording, block_size=16,
                                           backend="reference"):
        out = model(ids, **kw)
    return out, masks


@needs_kernel
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("pol", [POLICIES[0], POLICIES[5], POLICIES[8],
                                 dict(kind="top_p", p=0.8)], ids=lambda d: d["kind"])
def test_provider_fast_path_equals_reference_path(shared, pol):
    model = tiny_llama().to(DEV)
    gates = GateSet(GateConfig.from_model(model, block_size=16, init="random",
                                          share_kv_group=shared)).to(DEV)
    policy = Policy(**pol)
    fast = GateProvider(gates, policy, model, fast=True, cuda_graphs=False)
    ref = GateProvider(gates, policy, fast=False)
    ids = torch.randint(0, 128, (2, 83), generator=torch.Generator().manual_seed(2)).to(DEV)
    _, got = _run_model(model, fast, ids)
    ref.capture = fast.capture  # the same captured pre-rotary q/k
    for layer in range(2):
        q = torch.empty(2, 4, 83, 16, device=DEV)
        k = torch.empty(2, 2, 83, 16, device=DEV)
        want = ref(layer, q, k)
        assert got[layer] == want
        assert torch.equal(got[layer].kv_num_blocks, want.kv_num_blocks)
        assert torch.equal(got[layer].kv_indices, want.kv_indices)
    fast.detach()


@needs_kernel
def test_provider_fast_path_decoding_with_cache_and_kept_scores():
    model = tiny_llama(seed=1).to(DEV)
    gates = GateSet(GateConfig.from_model(model, block_size=16, init="random")).to(DEV)
    policy = Policy(kind="density", density=0.4, local_blocks=1)
    fast = GateProvider(gates, policy, model, fast=True)
    fast.keep_scores = True
    ref_gates = GateProvider(gates, policy, fast=False)
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(4)).to(DEV)
    out, _ = _run_model(model, fast, ids, use_cache=True)
    ref_gates.capture = fast.capture
    for step in range(2):  # decoding: q_len 1 against the whole cache
        nxt = out.logits[:, -1:].argmax(-1)
        out, got = _run_model(model, fast, nxt, use_cache=True,
                              past_key_values=out.past_key_values)
        kv_len = 71 + step
        for layer in range(2):
            assert got[layer].q_len == 1 and got[layer].kv_len == kv_len
            k_pre = fast._k_hist[layer]
            assert k_pre.shape[2] == kv_len
            scores = gates[layer](fast.capture.q[layer], k_pre)
            want = policy.to_mask(scores, q_len=1, kv_len=kv_len, block_size=16,
                                  layer_idx=layer, num_layers=2)
            assert got[layer] == want
            kept = fast.last_scores[layer]
            fin = torch.isfinite(scores)
            assert torch.equal(fin, torch.isfinite(kept))
            torch.testing.assert_close(kept[fin], scores[fin], rtol=1e-5, atol=1e-5)
    fast.detach()


def test_provider_policy_assignment_drops_caches():
    gates = GateSet(GateConfig(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                               block_size=16))
    p = GateProvider(gates, dict(kind="top_k", k=2))
    p._select_args[("x",)] = {}
    p.policy = dict(kind="density", density=0.5)
    assert p.policy == Policy(kind="density", density=0.5) and not p._select_args
    assert not p._use_fast()  # CPU gates: the reference path by default


def _gpu_model(seq_len):
    model = tiny_llama(layers=3, heads=6, kv_heads=2, hidden=384).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (1, seq_len), device="cuda")
    return model, ids


@gpu
@needs_cuda
@pytest.mark.parametrize("pol", [dict(kind="density", density=0.2), dict(kind="top_k", k=5),
                                 dict(kind="threshold", tau=0.02)], ids=lambda d: d["kind"])
@pytest.mark.parametrize("seq_len", [1024, 1000])
def test_gpu_graph_replay_equals_eager_and_reference(pol, seq_len):
    model, _ = _gpu_model(seq_len)
    gates = GateSet(GateConfig.from_model(model, block_size=64, init="random")).cuda()
    policy = Policy(**pol)
    graphed = GateProvider(gates, policy, model, cuda_graphs=True)
    eager = GateProvider(gates, policy, cuda_graphs=False)
    ref = GateProvider(gates, policy, fast=False)
    for forward in range(4):  # eager, capture + replay, replay, replay: fresh inputs each
        # time, so a stale static buffer would show
        ids = torch.randint(0, 128, (1, seq_len), device="cuda")
        _, got = _run_gpu(model, graphed, ids)
        eager.capture = ref.capture = graphed.capture
        for layer in range(3):
            q = torch.empty(1, 6, seq_len, 64, device="cuda")
            k = torch.empty(1, 2, seq_len, 64, device="cuda")
            e, r = eager(layer, q, k), ref(layer, q, k)
            assert torch.equal(got[layer].kv_num_blocks, e.kv_num_blocks)
            assert torch.equal(got[layer].kv_indices, e.kv_indices)
            dense_g, dense_r = got[layer].to_dense(), r.to_dense()
            assert float((dense_g != dense_r).float().mean()) < 1e-3  # float32 boundary ties
    assert sum(v is not None for v in graphed._graphs.values()) == 3
    graphed.detach()


@gpu
@needs_cuda
def test_gpu_default_graphs_replay_from_pooled_inputs():
    """cuda_graphs=None replays graphs at every length; their static inputs are the pooled
    features (no copy of q/k), shared by the layers of one shape; masks equal eager."""
    model, _ = _gpu_model(1024)
    gates = GateSet(GateConfig.from_model(model, block_size=64, init="random")).cuda()
    policy = Policy(kind="threshold", tau=0.02)
    default = GateProvider(gates, policy, model)
    eager = GateProvider(gates, policy, cuda_graphs=False)
    q = torch.empty(1, 6, 1024, 64, device="cuda")
    k = torch.empty(1, 2, 1024, 64, device="cuda")
    for _ in range(3):
        ids = torch.randint(0, 128, (1, 1024), device="cuda")
        _, got = _run_gpu(model, default, ids)
        eager.capture = default.capture
        for layer, m in got.items():
            e = eager(layer, q, k)
            assert torch.equal(m.kv_num_blocks, e.kv_num_blocks)
            assert torch.equal(m.kv_indices, e.kv_indices)
    assert sum(v is not None for v in default._graphs.values()) == 3
    (statics,) = default._static.values()  # one shape: one set of static buffers
    assert statics[0].shape == (1, 6, 16, 64) and statics[1].shape == (1, 2, 16, 3 * 64)
    with torch.no_grad():  # weights changed in place: the graph is captured again
        gates[0].wq.mul_(-1.0)
    ids = torch.randint(0, 128, (1, 1024), device="cuda")
    for _ in range(2):
        _, got = _run_gpu(model, default, ids)
    eager.capture = default.capture
    assert torch.equal(got[0].kv_indices, eager(0, q, k).kv_indices)
    default.detach()


@gpu
@needs_cuda
@pytest.mark.parametrize("pol", [dict(kind="threshold", tau=0.02),
                                 dict(kind="density", density=0.2)], ids=lambda d: d["kind"])
@pytest.mark.parametrize("graphs", [True, False])
def test_gpu_gate_and_kernel_launch_without_host_sync(pol, graphs):
    """After a key's first call, the provider and the attention kernel's launch read nothing
    back from the device (torch.cuda.set_sync_debug_mode("error") around both); the hint a
    threshold mask carries is the mean of the previous call's mask (same inputs:
    exact)."""
    from adaptive_sparse.attention import block_sparse_attention

    model, ids = _gpu_model(1024)
    gates = GateSet(GateConfig.from_model(model, block_size=64, init="random")).cuda()
    provider = GateProvider(gates, Policy(**pol), model, cuda_graphs=graphs)
    q = torch.randn(1, 6, 1024, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 1024, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for _ in range(3):  # eager, capture, replay; kernels compiled and autotuned
        _, got = _run_gpu(model, provider, ids)
        for layer in got:
            block_sparse_attention(q, k, v, provider(layer, q, k), backend="triton")
    torch.cuda.synchronize()
    syncs = provider.hint_syncs
    masks = {}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer in range(3):
            masks[layer] = provider(layer, q, k)
            block_sparse_attention(q, k, v, masks[layer], backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert provider.hint_syncs == syncs
    for m in masks.values():
        assert m.blocks_per_row is not None
        assert m.blocks_per_row == pytest.approx(float(m.kv_num_blocks.float().mean()))
    provider.detach()


def _run_gpu(model, provider, ids):
    from adaptive_sparse.models import sparse_attention

    masks = {}

    def recording(layer_idx, q, k):
        masks[layer_idx] = provider(layer_idx, q, k)
        return masks[layer_idx]

    with torch.no_grad(), sparse_attention(model, recording, block_size=64, backend="triton"):
        out = model(ids, use_cache=False)
    return out, masks


@gpu
@needs_cuda
def test_gpu_kernel_selection_equals_policy_on_fresh_scores():
    from adaptive_sparse.attention.triton.gate import scores_to_kv_indices

    for pol, (n, m) in itertools.product(POLICIES, [(8192, 8192), (1000, 4000)]):
        policy = Policy(**pol)
        qb, kb = num_blocks(n, 64), num_blocks(m, 64)
        raw = 2.0 * torch.randn(1, 3, qb, kb, device="cuda")
        logits = raw.masked_fill(~block_causal(n, m, 64, device="cuda"), float("-inf"))
        want = policy.to_mask(logits, q_len=n, kv_len=m, block_size=64, layer_idx=1,
                              num_layers=4)
        num, idx = scores_to_kv_indices(
            raw, **_selection_args(policy, n, m, 64, 3, 1, 4, "cuda"))
        assert torch.equal(num, want.kv_num_blocks), pol
        assert torch.equal(idx, want.kv_indices), pol


@needs_kernel
@pytest.mark.parametrize("kinds", [("avg",), ("max", "min", "avg"), ("min", "avg")])
@pytest.mark.parametrize("N, bs, D", [(64, 16, 16), (75, 16, 24), (40, 32, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_pooling_matches_pool_blocks_fp64(kinds, N, bs, D, dtype):
    from adaptive_sparse.attention.triton.gate import pool_blocks_triton
    from adaptive_sparse.gates.network import pool_blocks

    gen = torch.Generator().manual_seed(N * D)
    x = pre_rotary(2, 3, N, D, dtype, gen).to(DEV)  # strided, as captured
    want = pool_blocks(x.double(), bs, kinds)
    got = torch.full((2, 3, num_blocks(N, bs), len(kinds) * D), float("nan"), device=DEV)
    assert pool_blocks_triton(x, bs, kinds, out=got) is got  # NaN-poisoned output
    assert not torch.isnan(got).any()
    torch.testing.assert_close(pool_blocks_triton(x, bs, kinds), got, rtol=0, atol=0)
    for i, p in enumerate(kinds):
        torch.testing.assert_close(got[..., i * D:(i + 1) * D].double(), want[p],
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="^kinds: expected distinct poolings"):
        pool_blocks_triton(x, bs, ("avg", "avg"))
    with pytest.raises(ValueError, match="^block_size: expected a power of two"):
        pool_blocks_triton(x, 24, ("avg",))
    with pytest.raises(ValueError, match="^out: expected a contiguous float32 tensor"):
        pool_blocks_triton(x, bs, kinds, out=got[:1])


@needs_kernel
@pytest.mark.parametrize("shared", [False, True])
def test_fast_scores_with_triton_pooling(shared):
    gen = torch.Generator().manual_seed(9)
    c = gate_config(share_kv_group=shared)
    gate = Gate(c).to(DEV)
    q = pre_rotary(1, 6, 90, 16, torch.bfloat16, gen).to(DEV)
    k = pre_rotary(1, 2, 150, 16, torch.bfloat16, gen).to(DEV)
    got = gate.fast_scores(q, k, gate_tables(c, 90, 150, device=DEV), triton_pooling=True)
    torch.testing.assert_close(got, gate(q, k), rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("shared", [False, True])
def test_pool_into_static_buffers_and_scores_from_pooled_equal_fast_scores(shared):
    """The two stages the graphed path runs (pool into given float32 buffers, scores into a
    given buffer) give exactly `fast_scores`; wrong buffers are refused."""
    gen = torch.Generator().manual_seed(11)
    c = gate_config(share_kv_group=shared)
    gate = Gate(c).to(DEV)
    q = pre_rotary(1, 6, 96, 16, torch.bfloat16, gen).to(DEV)
    k = pre_rotary(1, 2, 96, 16, torch.bfloat16, gen).to(DEV)
    t = gate_tables(c, 96, 96, device=DEV)
    want = gate.fast_scores(q, k, t, causal_fill=False, triton_pooling=True)
    sq = torch.full((1, 6, 6, 16), float("nan"), device=DEV)
    sk = torch.full((1, 2, 6, 3 * 16), float("nan"), device=DEV)
    out = torch.full(want.shape, float("nan"), device=DEV)
    qcat, kcat = gate.pool(q, k, triton_pooling=True, out=(sq, sk))
    assert qcat is sq and kcat is sk
    got = gate.scores_from_pooled(sq, sk, t, causal_fill=False, out=out)
    assert got is out and torch.equal(got, want)
    torch.testing.assert_close(gate.scores_from_pooled(sq, sk, t),
                               gate.fast_scores(q, k, t, triton_pooling=True), rtol=0, atol=0)
    with pytest.raises(ValueError, match="^out: expected a contiguous torch.float32 tensor"):
        gate.scores_from_pooled(sq, sk, t, out=out[:, :1])
    with pytest.raises(ValueError, match="^out: expected None unless pooling with Triton"):
        gate.pool(q, k, triton_pooling=False, out=(sq, sk))
    with pytest.raises(ValueError, match="^qcat/kcat: expected"):
        gate.scores_from_pooled(sq, sk, gate_tables(c, 96, 160, device=DEV))
