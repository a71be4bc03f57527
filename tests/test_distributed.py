"""Context-parallel block-sparse attention on 2 and 4 gloo processes (CPU).

One spawn per world size runs every case; rank 0 checks the gathered output against the
single-process `block_sparse_attention` and an fp64 oracle and writes a JSON report that the
tests read. Processes get a dist init timeout, and the parent kills them after a deadline, so
a hung rank fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaptive_sparse.attention import block_sparse_attention
from adaptive_sparse.attention.distributed import (
    LocalMask, chunk_ids, context_parallel_attention, gate_local_scores, gather_sequence,
    local_mask, local_mask_from_scores, local_positions, padded_length, plan_context_parallel,
    shard_sequence, unshard_sequence)
from adaptive_sparse.masks import BlockSparseMask, block_causal, diagonal_blocks
from test_reference import fp64_attention  # tests/ is on sys.path (rootdir-relative modules)

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 240

# name, B, Hq, Hkv, N, D, bs, mask heads ("1" | "kv" | "q"), mask batch, density, layout
CASES = [
    ("gqa_kv_heads_uneven", 2, 4, 2, 200, 16, 16, "kv", 2, 0.4, "zigzag"),
    ("q_heads_batch_broadcast", 2, 4, 2, 256, 16, 16, "q", 1, 0.3, "zigzag"),
    ("one_head_odd_length", 1, 6, 2, 333, 8, 16, "1", 1, 0.5, "zigzag"),
    ("mha_contiguous", 1, 2, 2, 190, 16, 32, "q", 1, 0.5, "contiguous"),
    ("dense_full", 1, 4, 1, 250, 16, 16, "1", 1, 1.0, "zigzag"),
]


def _mask(g, case, window_only=False):
    _, B, Hq, Hkv, N, _, bs, mh, mb, density, _ = case
    heads = {"1": 1, "kv": Hkv, "q": Hq}[mh]
    allowed = block_causal(N, N, bs)
    if window_only:  # the diagonal only: no rank needs another rank's keys
        dense = diagonal_blocks(N, N, bs).expand(mb, heads, -1, -1).clone()
    else:
        dense = (torch.rand(mb, heads, *allowed.shape, generator=g) < density) & allowed
        dense |= diagonal_blocks(N, N, bs) & (torch.rand(1, heads, allowed.shape[0], 1,
                                                         generator=g) < 0.8)
    return BlockSparseMask.from_dense(dense, block_size=bs, q_len=N, kv_len=N)


def _inputs(g, case):
    _, B, Hq, Hkv, N, D, *_ = case
    return (torch.randn(B, Hq, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g),
            torch.randn(B, Hkv, N, D, generator=g))


def _sum(x: int, device="cpu") -> int:
    t = torch.tensor([x], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t)


def _run_case(rank, world, case, mask, q, k, v, *, backend="gather", local=False,
              kernel_config=None):
    """Shard, run, gather; rank 0 compares. Returns a report dict (rank 0) or None."""
    layout, bs, N = case[-1], mask.block_size, mask.q_len
    shard = dict(rank=rank, world=world, block_size=bs, layout=layout)
    ql, kl, vl = (shard_sequence(t, dim=2, **shard) for t in (q, k, v))
    m = local_mask(mask, rank=rank, world=world, layout=layout) if local else mask
    out, lse, stats = context_parallel_attention(ql, kl, vl, m, group=None, layout=layout,
                                                 backend=backend, kernel_config=kernel_config,
                                                 return_lse=True, return_stats=True)
    full = gather_sequence(out, dim=2, seq_len=N, layout=layout)
    full_lse = gather_sequence(lse, dim=2, seq_len=N, layout=layout)
    sent, received = _sum(stats.bytes_sent, q.device), _sum(stats.bytes_received, q.device)
    if rank:
        return None
    ref, ref_lse = block_sparse_attention(q, k, v, mask, backend="reference", return_lse=True)
    q, k, v, mask, ref, full, full_lse = (t.to("cpu") for t in (q, k, v, mask, ref, full,
                                                                 full_lse))
    oracle, oracle_lse = fp64_attention(q, k, v, mask, q.shape[-1] ** -0.5)
    fin = torch.isfinite(oracle_lse)
    return dict(
        err=float((full.double() - oracle).abs().max()),
        ref_err=float((ref.double() - oracle).abs().max()),
        vs_ref=float((full.float() - ref.float()).abs().max()),
        lse_err=float((full_lse.double() - oracle_lse)[fin].abs().max()) if fin.any() else 0.0,
        lse_inf_match=bool(torch.equal(torch.isinf(full_lse), ~fin)),
        finite=bool(torch.isfinite(full).all()),
        sent=sent, received=received, dense_ring=stats.dense_ring_bytes,
        metadata=stats.metadata_bytes, density=mask.density())


def _cases(rank, world, report):
    g = torch.Generator().manual_seed(1000 + world)
    for case in CASES:
        mask = _mask(g, case)
        q, k, v = _inputs(g, case)
        report[case[0]] = _run_case(rank, world, case, mask, q, k, v)
    case = CASES[0]
    mask = _mask(g, case)
    q, k, v = _inputs(g, case)
    report["local_rows"] = _run_case(rank, world, case, mask, q, k, v, local=True)
    report["reference_backend"] = _run_case(rank, world, case, mask, q, k, v,
                                            backend="reference")
    report["empty_shards"] = _run_case(rank, world, case, _mask(g, case, window_only=True),
                                       q, k, v)
    # non-causal (no padding: N = 256 is a multiple of 2 * world * 16): only the reference
    nc = ("non_causal", 1, 4, 2, 256, 16, 16, "q", 1, 0.3, "zigzag")
    dense = torch.rand(1, 4, 16, 16, generator=g) < 0.3
    mask_nc = BlockSparseMask.from_dense(dense, block_size=16, q_len=256, kv_len=256,
                                         causal=False)
    report["non_causal"] = _run_case(rank, world, nc, mask_nc, *_inputs(g, nc))
    # one plan reused: a second call with fresh inputs
    plan = plan_context_parallel(mask, batch=2, q_heads=4, kv_heads=2, head_dim=16,
                                 elem_bytes=4)
    q2, k2, v2 = _inputs(g, case)
    sh = dict(rank=rank, world=world, block_size=16, layout="zigzag")
    o1 = context_parallel_attention(*(shard_sequence(t, dim=2, **sh) for t in (q2, k2, v2)),
                                    plan=plan, backend="gather")
    o2 = context_parallel_attention(*(shard_sequence(t, dim=2, **sh) for t in (q2, k2, v2)),
                                    mask, backend="gather")
    report.setdefault("plan_reuse", {})[rank] = bool(torch.equal(o1, o2))
    # the per-rank stats of a mask that needs the diagonal only
    _, stats = context_parallel_attention(*(shard_sequence(t, dim=2, **sh) for t in (q2, k2, v2)),
                                          _mask(g, case, window_only=True), backend="gather",
                                          return_stats=True)
    report.setdefault("window_peers", {})[rank] = [stats.peers_sent, stats.peers_received]
    _gate_case(rank, world, report)
    _bad_input_case(rank, world, report)


def _bad_input_case(rank, world, report):
    """Errors raised identically on every rank, before any communication."""
    sh = dict(rank=rank, world=world, block_size=16)
    q, k, v = (shard_sequence(torch.randn(1, h, 100, 16), dim=2, **sh) for h in (4, 2, 2))
    lb = q.shape[2] // 16
    messages = []
    bad = [
        LocalMask(torch.ones(1, 2, lb + 1, 7, dtype=torch.bool), 100, 16),  # wrong shape
        BlockSparseMask.full(1, 1, block_size=16, q_len=100, kv_len=100, causal=False),
        BlockSparseMask.full(1, 1, block_size=16, q_len=90, kv_len=100),  # q_len != kv_len
        BlockSparseMask.full(1, 1, block_size=16, q_len=300, kv_len=300),  # other shard size
        BlockSparseMask.full(1, 3, block_size=16, q_len=100, kv_len=100),  # 3 heads
    ]
    for mask in bad:
        try:
            context_parallel_attention(q, k, v, mask, backend="gather")
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    report.setdefault("bad_input", {})[rank] = messages


def _gate_case(rank, world, report):
    from adaptive_sparse.gates.network import Gate, GateConfig
    from adaptive_sparse.policies import Policy

    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    cfg = GateConfig(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                     gate_dim=8, init="random")
    gate = Gate(cfg)
    N = 230
    q, k = torch.randn(1, 4, N, 16, generator=g), torch.randn(1, 2, N, 16, generator=g)
    sh = dict(rank=rank, world=world, block_size=16, layout="zigzag")
    scores = gate_local_scores(gate, shard_sequence(q, dim=2, **sh),
                               shard_sequence(k, dim=2, **sh), seq_len=N)
    policy = Policy(kind="top_k", k=3)
    lm = local_mask_from_scores(scores, policy, seq_len=N, block_size=16, rank=rank,
                                world=world)
    with torch.no_grad():
        full = gate(q, k)  # [1, H, Qb, Kb]
    ref_mask = policy.to_mask(full, q_len=N, kv_len=N, block_size=16)
    ref_rows = local_mask(ref_mask, rank=rank, world=world).rows
    lb = scores.shape[2]
    gathered = [torch.empty_like(scores) for _ in range(world)]
    dist.all_gather(gathered, scores.contiguous())
    allscores = unshard_sequence(gathered, dim=2, seq_len=full.shape[2])
    fin = torch.isfinite(full)
    entry = dict(scores_err=float((allscores[fin] - full[fin]).abs().max()),
                 inf_match=bool(torch.equal(torch.isinf(allscores), ~fin)),
                 rows_equal=bool(torch.equal(lm.rows, ref_rows)), lb=lb)
    report.setdefault("gate", {})[rank] = entry


def _worker(rank, world, store_path, out_path, what):
    store = dist.FileStore(store_path, world)
    timeout = datetime.timedelta(seconds=60)
    if what == "gpu":
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world,
                                timeout=timeout, device_id=torch.device("cuda", rank))
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=timeout)
    torch.set_num_threads(1)
    report = {}
    try:
        steps = {"attention": [_cases], "all": [_cases, _model_case, _triton_case],
                 "gpu": [_gpu_cases]}[what]
        for step in steps:
            step(rank, world, report)
        dist.barrier()
    except Exception:  # noqa: BLE001 - the report carries the traceback to the test
        report["error"] = traceback.format_exc()
    Path(f"{out_path}.{rank}").write_text(json.dumps(report))
    dist.destroy_process_group()


def _spawn(world, tmp_path, what, env=None):
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})  # inherited by the spawned processes
    try:
        ctx = mp.start_processes(_worker, args=(world, str(tmp_path / "store"),
                                                str(tmp_path / "report"), what),
                                 nprocs=world, join=False, start_method="spawn")
    finally:
        for key, val in saved.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val
    import time
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"context-parallel workers ({world} ranks) did not finish within "
                        f"{DEADLINE_S} s")
    reports = [json.loads((tmp_path / f"report.{r}").read_text()) for r in range(world)]
    for r, rep in enumerate(reports):
        assert "error" not in rep, f"rank {r}:\n{rep['error']}"
    return reports


@pytest.fixture(scope="module")
def reports2(tmp_path_factory):
    """2 ranks: the attention cases, the model prefill and the Triton steps (interpreter)."""
    return _spawn(2, tmp_path_factory.mktemp("cp2"), "all", env={"TRITON_INTERPRET": "1"})


@pytest.fixture(scope="module")
def reports4(tmp_path_factory):
    return _spawn(4, tmp_path_factory.mktemp("cp4"), "attention")


@pytest.fixture(params=[2, 4])
def attention_reports(request):
    return request.param, request.getfixturevalue(f"reports{request.param}")


@pytest.mark.parametrize("name", [c[0] for c in CASES] + ["local_rows", "reference_backend",
                                                         "empty_shards"])
def test_matches_single_process_and_fp64_oracle(attention_reports, name):
    world, reports = attention_reports
    rep = reports[0][name]
    assert rep["finite"] and rep["lse_inf_match"]
    # fp32 everywhere: the merged output is as close to fp64 as the single-process reference
    assert rep["err"] <= 2 * rep["ref_err"] + 1e-5, rep
    assert rep["vs_ref"] < 1e-4 and rep["lse_err"] < 1e-4, rep
    assert rep["sent"] == rep["received"]


def test_non_causal_matches_single_process(attention_reports):
    world, reports = attention_reports
    rep = reports[0]["non_causal"]
    assert rep["finite"] and rep["vs_ref"] < 1e-5 and rep["sent"] == rep["received"] > 0, rep


def test_bytes_follow_the_mask(attention_reports):
    world, reports = attention_reports
    rep = reports[0]
    assert rep["empty_shards"]["received"] == 0  # diagonal-only mask: nothing moves
    dense = rep["dense_full"]
    # dense causal with zigzag: a rank needs one chunk of each lower rank, both of each higher
    assert 0 < dense["received"] < dense["dense_ring"] * world
    sparse = rep["one_head_odd_length"]
    assert sparse["received"] <= sparse["dense_ring"] * world
    assert rep["local_rows"]["metadata"] > 0 and rep["gqa_kv_heads_uneven"]["metadata"] == 0
    assert rep["local_rows"]["received"] > 0
    for r in range(world):
        assert reports[r]["window_peers"][str(r)] == [0, 0]
        assert reports[r]["plan_reuse"][str(r)] is True


def test_bad_input_under_dist_names_the_argument(attention_reports):
    world, reports = attention_reports
    expected = ["mask.rows", "non-causal", "q_len == kv_len", "q_local", "heads 1, Hkv=2"]
    for r in range(world):
        messages = reports[r]["bad_input"][str(r)]
        assert all(m is not None for m in messages), messages
        for want, got in zip(expected, messages):
            assert want in got, (want, got)


def test_gate_scores_from_local_q_and_gathered_pooled_k(attention_reports):
    world, reports = attention_reports
    for r in range(world):
        gate = reports[r]["gate"][str(r)]
        assert gate["inf_match"] and gate["scores_err"] < 1e-5, gate
        assert gate["rows_equal"], gate


def test_shard_helpers_round_trip():
    x = torch.arange(2 * 77 * 3).view(2, 77, 3)
    for world in (1, 2, 3):
        for layout in ("zigzag", "contiguous"):
            shards = [shard_sequence(x, dim=1, rank=r, world=world, block_size=16,
                                     layout=layout) for r in range(world)]
            assert all(s.shape[1] == padded_length(77, world, 16) // world for s in shards)
            assert torch.equal(unshard_sequence(shards, dim=1, seq_len=77, layout=layout), x)
            pos = local_positions(77, world - 1, world, 16, layout)
            assert torch.equal(shards[-1][0, :, 0][pos < 77], x[0, pos[pos < 77], 0])
    assert chunk_ids(0, 4) == (0, 7) and chunk_ids(3, 4) == (3, 4)
    assert chunk_ids(1, 4, "contiguous") == (2, 3)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="layout"):
        chunk_ids(0, 2, "ring")
    with pytest.raises(ValueError, match="block_size"):
        padded_length(100, 2, 48)
    with pytest.raises(RuntimeError, match="not initialized"):
        context_parallel_attention(torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16),
                                   torch.randn(1, 2, 64, 16), None, seq_len=128, block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        shard_sequence(torch.zeros(1, 10), dim=1, rank=0, world=2, block_size=48)


def _tiny_model(arch):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)  # the same weights on every rank
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    cfg = config_cls(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                     max_position_embeddings=4096)
    return model_cls(cfg).eval()


def _model_case(rank, world, report):
    from adaptive_sparse.models import sparse_attention
    from adaptive_sparse.models.context_parallel import context_parallel_prefill

    N, bs = 150, 16
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 128, (1, N), generator=g)
    masks = [_mask(g, ("m", 1, 4, 2, N, 16, bs, "kv", 1, 0.4, "zigzag")) for _ in range(2)]
    for arch in ("llama", "qwen2"):
        model = _tiny_model(arch)
        with torch.no_grad():
            ref = model(ids).logits
            with sparse_attention(model, lambda i, q, k: masks[i], block_size=bs,
                                  backend="gather"):
                ref_sparse = model(ids).logits
            out, pos, stats = context_parallel_prefill(model, ids, block_size=bs)
            out_sparse, _, _ = context_parallel_prefill(
                model, ids, block_size=bs, provider=lambda i, q, k: masks[i])
        full = gather_sequence(out.logits, dim=1, seq_len=N)
        full_sparse = gather_sequence(out_sparse.logits, dim=1, seq_len=N)
        report[arch] = dict(max_abs_diff=float((full - ref).abs().max()),
                            max_abs_diff_sparse=float((full_sparse - ref_sparse).abs().max()),
                            sparse_vs_dense=float((ref_sparse - ref).abs().max()),
                            layers=len(stats), positions=int(pos.max()))


def test_model_prefill_matches_single_process(reports2):
    for arch in ("llama", "qwen2"):
        rep = reports2[0][arch]
        assert rep["max_abs_diff"] < 1e-4, (arch, rep)
        assert rep["max_abs_diff_sparse"] < 1e-4, (arch, rep)
        assert rep["sparse_vs_dense"] > 1e-3, (arch, rep)  # the sparse check is not the dense one
        assert rep["layers"] == 2 and rep["positions"] == 191, (arch, rep)  # 150 -> 192 padded


def _triton_case(rank, world, report):
    from adaptive_sparse.attention.triton.forward import default_config

    g = torch.Generator().manual_seed(9)
    case = ("t", 1, 4, 2, 100, 16, 16, "kv", 1, 0.4, "zigzag")
    mask = _mask(g, case)
    q, k, v = _inputs(g, case)
    report["auto_config"] = _run_case(rank, world, case, mask, q, k, v, backend="triton")
    sh = dict(rank=rank, world=world, block_size=16)
    out = context_parallel_attention(*(shard_sequence(t, dim=2, **sh) for t in (q, k, v)), mask,
                                     backend="triton",
                                     kernel_config=default_config(16, 16, 2, True))
    full = gather_sequence(out, dim=2, seq_len=100)
    if rank == 0:
        ref = block_sparse_attention(q, k, v, mask, backend="reference")
        report["pinned_config_vs_ref"] = float((full - ref).abs().max())


def test_triton_kernel_steps_in_the_interpreter(reports2):
    """The GPU path (Triton steps, pinned tile config) on the CPU interpreter."""
    rep = reports2[0]
    auto = rep["auto_config"]
    assert auto["finite"] and auto["err"] <= 2 * auto["ref_err"] + 1e-5, auto
    assert auto["vs_ref"] < 1e-4 and rep["pinned_config_vs_ref"] < 1e-4, rep


def _gpu_cases(rank, world, report):
    from adaptive_sparse.attention.triton.forward import default_config

    g = torch.Generator().manual_seed(11)
    dev = torch.device("cuda", rank)
    for case in (CASES[0], CASES[1], CASES[3]):  # head_dim 16 (the kernel's smallest)
        _, B, Hq, Hkv, N, D, bs, *_ = case
        mask = _mask(g, case).to(dev)
        q, k, v = (t.to(dev, torch.bfloat16) for t in _inputs(g, case))
        pinned = default_config(bs, D, Hq // Hkv, mask.heads in (1, Hkv))  # no autotuning
        report[case[0]] = _run_case(rank, world, case, mask, q, k, v, backend="triton",
                                    kernel_config=pinned)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_nccl_matches_reference_and_fp64(tmp_path):
    reports = _spawn(2, tmp_path, "gpu")
    for name, rep in reports[0].items():
        assert rep["finite"] and rep["lse_inf_match"], (name, rep)
        # bf16: the merged output is as close to fp64 as the single-GPU reference's bf16 output
        assert rep["err"] <= 2 * rep["ref_err"] + 1e-3, (name, rep)
        assert rep["lse_err"] < 1e-2 and rep["sent"] == rep["received"], (name, rep)


def test_ring_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "ring.json"
    proc = subprocess.run([sys.executable, "benchmarks/ring.py", "--cpu-smoke", "--json",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["world"] == 2 and data["rows"]
    assert {row["ms_single"] is None for row in data["rows"]} == {True, False}
    for row in data["rows"]:
        err = row["err_vs_fp64_sampled"] if row["ms_single"] is None else row["max_err_vs_single"]
        assert err < 1e-4, row
        assert row["bytes_cp"] <= row["bytes_dense_ring"]
    assert data["complete"] and len(data["prefill"]) == 2 and data["gates"]
    for row in data["prefill"] + data["gates"]:
        assert row["max_err_vs_single"] < 1e-4 and row["ms_cp"] > 0, row
    assert "| 1024 | vslash |" in proc.stdout
