"""The fused bounds decode selection (`attention.triton.decode_bounds`) against an fp64 torch
oracle and the eager path (`gates.decode`: block_key_bounds, bounds_scores,
select_decode_blocks): the last block's key bounds it writes, the kept blocks (a top-k of the
scores, sink / last / local blocks forced) and the FlexAttention table layout; ragged caches,
GQA groups, the programs per row; on CUDA also bf16, larger shapes and a CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch

from marks import CUDA, gpu, needs_cuda, needs_interpreter, needs_triton  # tests/ is on sys.path

pytestmark = needs_triton


def bounds_case(B, Hq, Hkv, M, D, bs, *, dtype, device, seed, seqlens=None, cap=None):
    """Fresh random q [B, Hq, D], keys [B, Hkv, M, D] (each block's keys scaled by its own
    random factor and shifted by its own random vector, so block scores are far apart and
    kmin does not mirror kmax), cache lengths int32 [B], and kmin / kmax
    [B, Hkv, cap, D] holding the true bounds of each sequence's blocks before its last one,
    NaN elsewhere (the last block's rows are the step's to write)."""
    gen = torch.Generator().manual_seed(seed)
    kb = -(-M // bs)
    cap = cap or kb + 2
    q = torch.randn(B, Hq, D, generator=gen)
    spread = torch.rand(B, Hkv, kb, 1, 1, generator=gen) * 3 + 0.25
    shift = torch.randn(B, Hkv, kb, 1, D, generator=gen) * 2
    k = (torch.randn(B, Hkv, kb, bs, D, generator=gen) * spread + shift).flatten(2, 3)[:, :, :M]
    q, k = q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)
    lens = [M] * B if seqlens is None else list(seqlens)
    kmin = torch.full((B, Hkv, cap, D), float("nan"), dtype=dtype, device=device)
    kmax = kmin.clone()
    for b, n in enumerate(lens):
        done = -(-n // bs) - 1
        blocks = k[b, :, :done * bs].unflatten(1, (done, bs))  # [Hkv, nb - 1, bs, D]
        kmin[b, :, :blocks.shape[1]] = blocks.amin(2)
        kmax[b, :, :blocks.shape[1]] = blocks.amax(2)
    return q, k, lens, kmin, kmax


def reference_scores(q, k, n, bs, scale):
    """fp64 scores [Hkv, nb] of one sequence's n cached tokens: per block the bounds of its
    real keys, u[g, j] = scale * sum_d max(q_g * kmax_j, q_g * kmin_j), max over the group."""
    Hq, D = q.shape
    Hkv = k.shape[0]
    nb = -(-n // bs)
    x = torch.nn.functional.pad(k[:, :n].double(), (0, 0, 0, nb * bs - n), value=float("nan"))
    blocks = x.unflatten(1, (nb, bs))  # [Hkv, nb, bs, D]
    lo, hi = blocks.nan_to_num(float("inf")).amin(2), blocks.nan_to_num(float("-inf")).amax(2)
    qg = q.double().view(Hkv, Hq // Hkv, 1, D)
    u = torch.maximum(qg * hi[:, None], qg * lo[:, None]).sum(-1) * scale  # [Hkv, G, nb]
    return u.amax(1), lo, hi


def forced_blocks(nb, keep_sink=True, keep_diagonal=True, local_blocks=0):
    last = nb - 1
    forced = set(range(max(0, last - local_blocks), last))
    if keep_sink:
        forced.add(0)
    if keep_diagonal:
        forced.add(last)
    return forced


def check_selection(num, idx, scores, kb, top_k, options, eager):
    """One row: NUM = min(top_k, blocks), the kept blocks ascending then every other block of
    the table ascending, forced blocks kept, and the free kept blocks a top-k of the fp64
    scores: equal to the oracle's pick (ties to the lower block) and to `eager` (the eager
    path's kept blocks) unless the k-th and (k+1)-th free scores are within float rounding."""
    nb = scores.numel()
    c = int(num)
    assert c == min(top_k, nb)
    got = idx[:c].tolist()
    assert got == sorted(set(got)) and all(0 <= j < nb for j in got), got
    assert idx[c:].tolist() == sorted(set(range(kb)) - set(got))
    forced = forced_blocks(nb, **options)
    assert forced <= set(got), (forced, got)
    free = sorted((j for j in range(nb) if j not in forced), key=lambda j: (-scores[j], j))
    want = sorted(forced | set(free[:c - len(forced)]))
    tol = 1e-4 * float(scores.abs().max()) + 1e-6
    kept_free = [float(scores[j]) for j in got if j not in forced]
    dropped = [float(scores[j]) for j in range(nb) if j not in got]
    if kept_free and dropped:
        assert min(kept_free) >= max(dropped) - tol
    n_free = c - len(forced)
    near_tie = 0 < n_free < len(free) and \
        float(scores[free[n_free - 1]] - scores[free[n_free]]) <= tol
    if not near_tie:
        assert got == want == eager, (got, want, eager)


def run_and_check(case, bs, top_k, *, scale=None, options=(), programs=None, ragged=True):
    from adaptive_sparse.attention.triton.decode_bounds import decode_bounds_select
    from adaptive_sparse.gates.decode import (block_key_bounds, bounds_scores,
                                              select_decode_blocks)
    from adaptive_sparse.policies import Policy

    q, k, lens, kmin, kmax = case
    options = dict(options)
    B, Hkv, D = q.shape[0], k.shape[1], q.shape[-1]
    kb = -(-k.shape[2] // bs)
    before = (kmin.clone(), kmax.clone())
    out = (torch.full((B, Hkv), -1, dtype=torch.int32, device=q.device),
           torch.full((B, Hkv, kb), -1, dtype=torch.int32, device=q.device))
    seqlens = torch.tensor(lens, dtype=torch.int32, device=q.device) if ragged else None
    num, idx = decode_bounds_select(q, k, kmin, kmax, top_k=top_k, block_size=bs, scale=scale,
                                    cache_seqlens=seqlens, out=out, programs=programs,
                                    **options)
    assert num is out[0] and idx is out[1]
    scale = D ** -0.5 if scale is None else scale
    for b, n in enumerate(lens):
        nb = -(-n // bs)
        scores, lo, hi = reference_scores(q[b].cpu(), k[b].cpu(), n, bs, scale)
        # the last block's bounds written exactly, the earlier ones and the rest untouched
        assert torch.equal(kmin[b, :, nb - 1].cpu().double(), lo[:, -1])
        assert torch.equal(kmax[b, :, nb - 1].cpu().double(), hi[:, -1])
        for t, was in zip((kmin, kmax), before):
            assert torch.equal(t[b, :, :nb - 1], was[b, :, :nb - 1])
            assert t[b, :, nb:].isnan().all()
        lo_e, hi_e = block_key_bounds(k[b:b + 1, :, :n], bs)  # the eager path
        eager = select_decode_blocks(bounds_scores(q[b:b + 1, :, None], lo_e, hi_e,
                                                   scale=scale)[:, :, 0],
                                     Policy(kind="top_k", k=top_k, **options), kv_len=n,
                                     block_size=bs)
        for h in range(Hkv):
            c = int(eager.kv_num_blocks[0, h, 0])
            kept = sorted(eager.kv_indices[0, h, 0, :c].tolist())
            check_selection(num[b, h].cpu(), idx[b, h].cpu(), scores[h], kb, top_k, options,
                            kept)
    return num, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,M,D,bs,seqlens,top_k,options", [
    (1, 4, 2, 150, 64, 16, None, 5, {}),
    (3, 6, 2, 97, 64, 16, [97, 33, 64], 5, dict(local_blocks=1)),  # a block boundary; one past
    (3, 3, 3, 130, 128, 32, [130, 1, 33], 3, dict(keep_sink=False)),  # G 1; a single token
    (2, 8, 2, 64, 64, 16, None, 9, {}),  # top_k beyond the blocks: every block
    (2, 4, 1, 500, 64, 16, [500, 190], 7, dict(local_blocks=2, keep_diagonal=False)),
    (2, 4, 2, 300, 256, 128, [300, 257], 2, dict(keep_sink=False)),
])
def test_bounds_step_matches_fp64(dtype, B, Hq, Hkv, M, D, bs, seqlens, top_k, options):
    """The step on poisoned outputs (-1 tables, NaN bound rows past each sequence's earlier
    blocks) against the fp64 twin, per sequence and KV head; without cache_seqlens every
    sequence holds M tokens."""
    dev = "cuda" if CUDA else "cpu"
    case = bounds_case(B, Hq, Hkv, M, D, bs, dtype=dtype, device=dev, seed=M + D,
                       seqlens=seqlens)
    run_and_check(case, bs, top_k, options=options, ragged=seqlens is not None)


def test_programs_per_row_and_scale_never_change_the_layout():
    """programs=1 (a row in one program), 3 and 8 (the arrival count across programs) give the
    same tables; a scale other than D**-0.5 is applied; bad arguments name themselves."""
    from adaptive_sparse.attention.triton.decode_bounds import decode_bounds_select

    dev = "cuda" if CUDA else "cpu"
    got = []
    for programs in (1, 3, 8):
        case = bounds_case(2, 4, 2, 300, 64, 16, dtype=torch.float32, device=dev, seed=11,
                           seqlens=[300, 211])
        got.append(run_and_check(case, 16, 5, scale=0.3, programs=programs))
    for num, idx in got[1:]:
        assert torch.equal(num, got[0][0]) and torch.equal(idx, got[0][1])
    q, k, _, kmin, kmax = case
    for bad, match in [(dict(top_k=0), "top_k"), (dict(programs=0), "programs"),
                       (dict(kmin=kmin.half()), "kmin"), (dict(kmax=kmax[:, :, :5]), "kmax"),
                       (dict(block_size=24), "block_size"), (dict(k=k[:, :1, :, :32]), "k:"),
                       (dict(out=(got[0][0], got[0][1][..., :3])), "out")]:
        call = {**dict(q=q, k=k, kmin=kmin, kmax=kmax, top_k=3, block_size=16), **bad}
        with pytest.raises(ValueError, match=match):
            decode_bounds_select(**call)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,D,bs,Hq,Hkv", [
    (torch.bfloat16, 64, 16, 14, 2), (torch.bfloat16, 128, 64, 32, 8),
    (torch.bfloat16, 256, 128, 8, 8), (torch.bfloat16, 128, 32, 9, 3),
    (torch.float16, 128, 64, 32, 8), (torch.float32, 64, 16, 14, 2)])
def test_gpu_bounds_step_matches_fp64(dtype, D, bs, Hq, Hkv):
    """Autotuned on the GPU at longer ragged caches: every configuration it may pick agrees."""
    M = 4099
    case = bounds_case(3, Hq, Hkv, M, D, bs, dtype=dtype, device="cuda", seed=D + bs,
                       seqlens=[M, 2 * bs, 1000])
    run_and_check(case, bs, 9, options=dict(local_blocks=1))
    case = bounds_case(2, Hq, Hkv, M, D, bs, dtype=dtype, device="cuda", seed=D + bs + 1)
    run_and_check(case, bs, 9, ragged=False)


@gpu
@needs_cuda
def test_gpu_bounds_step_replays_from_a_cuda_graph():
    """Captured once (no host sync, no allocation inside), replayed as the cache grows by a
    token per step (cache_seqlens updated in place): each replay equals an eager call."""
    from adaptive_sparse.attention.triton.decode_bounds import decode_bounds_select

    B, Hq, Hkv, M, D, bs = 2, 8, 2, 2048, 128, 64
    lens = [1500, 1023]
    q, k, _, kmin, kmax = bounds_case(B, Hq, Hkv, M, D, bs, dtype=torch.bfloat16,
                                      device="cuda", seed=5, seqlens=lens)
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    kb = -(-M // bs)
    out = (torch.empty(B, Hkv, dtype=torch.int32, device="cuda"),
           torch.empty(B, Hkv, kb, dtype=torch.int32, device="cuda"))

    def step():
        decode_bounds_select(q, k, kmin, kmax, top_k=6, block_size=bs, cache_seqlens=seqlens,
                             out=out)

    step()  # tunes and caches the scratch
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        seqlens += 1
        q.normal_()
        out[0].fill_(-1)
        out[1].fill_(-1)
        graph.replay()
        want = decode_bounds_select(q, k, kmin.clone(), kmax.clone(), top_k=6, block_size=bs,
                                    cache_seqlens=seqlens)
        assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])


@needs_interpreter
@pytest.mark.parametrize("policy", [dict(kind="top_k", k=3), dict(kind="density", density=0.4,
                                                                   local_blocks=1)])
def test_fast_bounds_provider_selects_as_the_eager_one(policy):
    """DecodeProvider(decode="bounds", fast=True) (one `decode_bounds_select` launch per step,
    the bounds buffer grown without a launch, the last block's rows written by the kernel)
    keeps the blocks the eager bounds provider keeps, over a prompt and 14 steps across a block
    boundary; the cache is bounded once per prompt."""
    from adaptive_sparse.gates.decode import DecodeProvider

    fast = DecodeProvider(policy, decode="bounds", block_size=16, fast=True)
    eager = DecodeProvider(policy, decode="bounds", block_size=16, fast=False)
    gen = torch.Generator().manual_seed(5)
    # blocks shifted apart (as bounds_case does): no near-ties between block scores
    k = (torch.randn(2, 2, 6, 16, 16, generator=gen) * (torch.rand(2, 2, 6, 1, 1, generator=gen)
         * 3 + 0.25) + torch.randn(2, 2, 6, 1, 16, generator=gen) * 2).flatten(2, 3)[:, :, :90]
    for p in (fast, eager):
        for layer in (0, 1):
            assert p(layer, torch.randn(2, 4, 56, 16), k[:, :, :56]) is None  # dense prefill
    for M in range(57, 71):
        q = torch.randn(2, 4, 1, 16, generator=gen)
        for layer in (0, 1):
            a, b = fast(layer, q, k[:, :, :M]), eager(layer, q, k[:, :, :M])
            assert a.kv_len == b.kv_len == M
            assert torch.equal(a.to_dense(), b.to_dense()), (M, layer)
    assert fast.caches[0].recomputes == 1
    assert fast.decode_density() == pytest.approx(eager.decode_density())
    assert fast.decode_density() < 0.9
