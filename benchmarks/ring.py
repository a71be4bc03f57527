"""Context-parallel (ring) block-sparse attention on P GPUs vs our single-GPU kernel.

One process per GPU (spawned here, or started by torchrun). For each sequence length and mask
(random blocks, or "vslash": sink + local window + per-head key columns, the shape learned masks
take) at each density, it times the single-GPU Triton kernel on the full sequence (rank 0 alone)
and `context_parallel_attention` over all ranks (the call includes building the schedule, i.e.
every host sync of the plan), counts the K/V bytes moved against a dense ring ((P-1) shards to
every rank), and at density 1.0 times PyTorch's dense context parallel
(`torch.distributed.tensor.experimental.context_parallel` with SDPA) in the same run. A
`--gate-seqlens` row times a random gate end to end (pooled-K all_gather, local scores, policy,
schedule, attention) against the same on one GPU, and `--prefill-seqlens` rows the prefill of a
random-weight Qwen2 model of Qwen2.5-0.5B's shapes (context-parallel attention layers) against
rank 0 alone. Configs that would start after `--time-budget` seconds are skipped and listed.
Correctness comes first: at `--check-seqlen` the gathered output is compared with the single-GPU
kernel and both with an fp64 oracle on sampled rows (no timing when that fails), and every timed
config's gathered output with the single-GPU output (beyond `--single-max-seqlen`: with fp64 on
sampled rows).

    NCCL_NVLS_ENABLE=0 PYTHONPATH=. python benchmarks/ring.py --nproc 2 --json ring.json
    PYTHONPATH=. python benchmarks/ring.py --cpu-smoke --json smoke.json   # gloo, tiny, CPU

Kernel tiles: the Triton config is autotuned once per density at `--tune-seqlen` on one GPU and
pinned for every call of that density (single GPU and context parallel alike), so no multi-second
call is autotuned.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time

os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off: it can take shared GPUs down

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from adaptive_sparse.attention import block_sparse_attention  # noqa: E402
from adaptive_sparse.attention.distributed import (  # noqa: E402
    context_parallel_attention, gate_local_scores, gather_sequence, local_mask_from_scores,
    local_positions, plan_context_parallel, shard_sequence)
from adaptive_sparse.masks import BlockSparseMask, block_causal, diagonal_blocks  # noqa: E402
from adaptive_sparse.io import atomic_write_text  # noqa: E402
from benchmarks.common import SHAPES, environment, oracle_rows, random_mask  # noqa: E402

SMOKE = dict(shape=(4, 2, 16), seqlens=[500, 1024], densities=[0.1, 1.0], block_size=16,
             check_seqlen=300, gate_seqlens=[400], tune_seqlen=0, reps=1, single_max_seqlen=600,
             prefill_seqlens=[200], prefill_reps=1)


def vslash_mask(heads, n, bs, density, gen, device) -> BlockSparseMask:
    """Sink, a local window of w blocks and v key columns per head (random, causal), sized so
    that the density is close to `density`: w ~ d*Kb/4 and v ~ d*Kb/2 (a column is read by the
    rows below it, half of them on average)."""
    allowed = block_causal(n, n, bs, device=device)
    kb = allowed.shape[1]
    w = max(1, round(density * kb / 4))
    v = max(0, round(density * kb / 2))
    r = torch.arange(kb, device=device)
    dense = ((r[:, None] - r[None, :]) < w) | diagonal_blocks(n, n, bs, device=device)
    dense = dense.expand(1, heads, kb, kb).clone()
    dense[..., 0] = True
    cols = torch.rand(1, heads, kb, generator=gen, device=device).argsort(-1)[..., :v]
    colmask = torch.zeros(1, heads, kb, dtype=torch.bool, device=device)
    colmask.scatter_(2, cols, True)
    dense = (dense | colmask[:, :, None, :]) & allowed
    return BlockSparseMask.from_dense(dense, block_size=bs, q_len=n, kv_len=n)


def make_mask(kind, heads, n, bs, density, device) -> BlockSparseMask:
    """The same mask on every rank: its generator is seeded by the config alone."""
    gen = torch.Generator(device=device).manual_seed(n * 1000 + round(density * 997)
                                                     + (kind == "vslash"))
    if density >= 1.0:
        return BlockSparseMask.full(1, 1, block_size=bs, q_len=n, kv_len=n, device=device)
    maker = random_mask if kind == "random" else vslash_mask
    return maker(heads, n, bs, density, gen, device)


def timed(fn, reps: int, *, collective: bool) -> float:
    """Median wall milliseconds of `fn` over `reps` calls after one warm-up call, synchronized;
    with `collective`, every rank calls it (a barrier before each call) and the slowest rank's
    median is returned. Deterministic call count (no adaptive repeats: ranks must agree)."""
    cuda = torch.cuda.is_available()
    fn()
    times = []
    for _ in range(reps):
        if collective:
            dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    ms = statistics.median(times)
    if collective:
        t = torch.tensor([ms], dtype=torch.float64, device="cuda" if cuda else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        ms = float(t)
    return ms


def p2p_gb_per_s(rank: int, world: int, device) -> float | None:
    """GB/s of a 1 GiB send from rank 0 to rank 1 (the P2P path the K/V tiles take)."""
    if world < 2:
        return None
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dist.barrier()  # a first collective on the group before any P2P (NCCL asks for it)

    def fn():
        if rank < 2:
            op = dist.P2POp(dist.isend if rank == 0 else dist.irecv, buf, 1 - rank)
            for w in dist.batch_isend_irecv([op]):
                w.wait()

    ms = timed(fn, 3, collective=True)
    return round(buf.numel() / ms / 1e6, 1)


def past_budget(t_start: float, budget: float, device) -> bool:
    """Whether any rank is past the time budget (every rank gets the same answer)."""
    late = torch.tensor([float(time.monotonic() - t_start > budget)], device=device)
    dist.all_reduce(late, op=dist.ReduceOp.MAX)
    return bool(late)


def total(x: int | float, device) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def tuned_configs(q, k, v, masks: dict, scale, rank: int, device) -> dict:
    """{density: tile config}: the kernel autotuned on each mask on rank 0 (one GPU), sent to
    every rank as JSON, so all ranks pin the same tiles."""
    from adaptive_sparse.attention.triton import triton_block_sparse_attention
    from adaptive_sparse.attention.triton.forward import bsa_fwd_autotuned

    text = ""
    if rank == 0:
        configs = {}
        for d, mask in masks.items():
            triton_block_sparse_attention(q, k, v, mask, scale, True)
            cfg = bsa_fwd_autotuned.best_config
            configs[d] = {**cfg.kwargs, "num_warps": cfg.num_warps,
                          "num_stages": cfg.num_stages}
        text = json.dumps([[d, c] for d, c in configs.items()])
    size = torch.tensor([len(text.encode())], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    data = torch.zeros(int(size), dtype=torch.uint8, device=device)
    if rank == 0:
        data.copy_(torch.tensor(list(text.encode()), dtype=torch.uint8))
    dist.broadcast(data, src=0)
    return {float(d): c for d, c in json.loads(bytes(data.tolist()).decode())}


def single_fn(q, k, v, mask, scale, backend, config):
    if config is not None:
        from adaptive_sparse.attention.triton import triton_block_sparse_attention
        return lambda: triton_block_sparse_attention(q, k, v, mask, scale, config=config)
    return lambda: block_sparse_attention(q, k, v, mask, scale=scale, backend=backend)


_MESH = None


def torch_cp_dense(q, k, v, scale, reps, world):
    """PyTorch's dense context parallel (SDPA, causal, its load balancer): (ms, detail)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    global _MESH
    if _MESH is None:
        _MESH = init_device_mesh("cuda", (world,))
    mesh = _MESH
    errors = []
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("flash", SDPBackend.FLASH_ATTENTION)):
        for gqa in (True, False):
            qc = q.clone()
            kc = k.clone() if gqa else k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            vc = v.clone() if gqa else v.repeat_interleave(q.shape[1] // k.shape[1], 1)
            try:
                with context_parallel(mesh, buffers=[qc, kc, vc], buffer_seq_dims=[2, 2, 2],
                                      no_restore_buffers={qc, kc, vc}), sdpa_kernel(backend):
                    def fn():
                        return torch.nn.functional.scaled_dot_product_attention(
                            qc, kc, vc, is_causal=True, scale=scale,
                            enable_gqa=gqa and qc.shape[1] != kc.shape[1])
                    ms = timed(fn, reps, collective=True)
                return ms, f"sdpa-{name}{'' if gqa else ', K/V heads repeated'}"
            except Exception as e:  # noqa: BLE001 - try the next SDPA backend, report all
                errors.append(f"{name}/gqa={gqa}: {type(e).__name__}: {str(e)[:160]}")
                ok = torch.tensor([1.0], device="cuda")
                dist.all_reduce(ok)  # resynchronize the ranks after a failed attempt
    return None, "; ".join(errors)


def check(rank, world, q, k, v, mask, scale, backend, config, bs, gen):
    """Gathered CP output vs the single-GPU kernel; both vs fp64 on sampled rows (rank 0)."""
    n = q.shape[2]
    sh = dict(rank=rank, world=world, block_size=bs)
    out = context_parallel_attention(*(shard_sequence(t, dim=2, **sh) for t in (q, k, v)),
                                     mask, scale=scale, backend=backend, kernel_config=config)
    full = gather_sequence(out, dim=2, seq_len=n)
    if rank:
        return None
    single = single_fn(q, k, v, mask, scale, backend, config)()
    qb = -(-n // bs)
    blocks = sorted({0, qb // 2, qb - 1, int(torch.randint(qb, (1,), generator=gen,
                                                           device=q.device))})
    heads = sorted({0, q.shape[1] - 1})
    oracle, rows = oracle_rows(q, k, v, mask, scale, heads, blocks)
    err_cp = float((full[0, heads][:, rows].double() - oracle).abs().max())
    err_single = float((single[0, heads][:, rows].double() - oracle).abs().max())
    return dict(n=n, density=round(mask.density(), 4), err_cp_vs_fp64=err_cp,
                err_single_vs_fp64=err_single,
                max_err_vs_single=float((full.float() - single.float()).abs().max()),
                ok=bool(err_cp <= 2 * err_single + 1e-3))


def gate_row(rank, world, q, k, v, scale, density, reps, backend, config, bs, device):
    """A random gate end to end: single GPU (gate, policy, kernel) vs context parallel (pooled-K
    all_gather, local scores, policy, schedule, attention)."""
    from adaptive_sparse.gates.network import Gate, GateConfig
    from adaptive_sparse.policies import Policy

    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[3]
    n = q.shape[2]
    torch.manual_seed(11)
    gate = Gate(GateConfig(num_layers=1, num_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                           block_size=bs, share_kv_group=True, init="random")).to(device)
    policy = Policy(kind="density", density=density)
    sh = dict(rank=rank, world=world, block_size=bs)
    ql, kl, vl = (shard_sequence(t, dim=2, **sh) for t in (q, k, v))

    def cp():
        with torch.no_grad():
            scores = gate_local_scores(gate, ql, kl, seq_len=n)
            lm = local_mask_from_scores(scores, policy, seq_len=n, block_size=bs, rank=rank,
                                        world=world)
            return context_parallel_attention(ql, kl, vl, lm, scale=scale, backend=backend,
                                              kernel_config=config, return_stats=True)

    def single():
        with torch.no_grad():
            mask = policy.to_mask(gate(q, k), q_len=n, kv_len=n, block_size=bs)
            return single_fn(q, k, v, mask, scale, backend, config)(), mask

    ms_cp = timed(cp, reps, collective=True)
    out, stats = cp()
    full = gather_sequence(out, dim=2, seq_len=n)
    sent = total(stats.bytes_sent, device)
    dense_ring = total(stats.dense_ring_bytes, device)
    ms_single = timed(single, reps, collective=False) if rank == 0 else 0.0
    dist.barrier()
    if rank:
        return None
    ref, mask = single()
    return dict(kind="gate", n=n, density=round(mask.density(), 4), ms_single=ms_single,
                ms_cp=ms_cp, speedup=ms_single / ms_cp, bytes_cp=sent,
                bytes_dense_ring=dense_ring, bytes_ratio=sent / dense_ring,
                max_err_vs_single=float((full.float() - ref.float()).abs().max()))


def measure(rank, world, args, full_qkv, local_qkv, mask, kind, cfg, scale, backend,
            device) -> dict:
    """One timed config: schedule, context parallel, single GPU (up to --single-max-seqlen;
    beyond it the output is checked against fp64 on sampled rows), PyTorch CP at density 1."""
    q, k, v = full_qkv
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[3]
    n, bs = q.shape[2], mask.block_size
    plan_ms = timed(lambda: plan_context_parallel(
        mask, batch=1, q_heads=Hq, kv_heads=Hkv, head_dim=D, elem_bytes=q.element_size()),
        1, collective=True)

    def cp():
        return context_parallel_attention(*local_qkv, mask, scale=scale, backend=backend,
                                          kernel_config=cfg, return_stats=True)

    ms_cp = timed(cp, args.reps, collective=True)
    out, stats = cp()
    sent = total(stats.bytes_sent, device)
    dense_ring = total(stats.dense_ring_bytes, device)
    ms_single = err = err_rows = None
    if n <= args.single_max_seqlen:
        full = gather_sequence(out, dim=2, seq_len=n)
        if rank == 0:
            fn = single_fn(q, k, v, mask, scale, backend, cfg)
            ms_single = timed(fn, args.reps, collective=False)
            err = float((full.float() - fn().float()).abs().max())
        del full
    else:
        err_rows = sampled_fp64_err(rank, world, q, k, v, out, mask, scale, device)
    del out
    ms_torch, torch_detail = None, "not run (CPU)" if args.cpu_smoke else ""
    if mask.density() >= 1.0 and not args.cpu_smoke:
        ms_torch, torch_detail = torch_cp_dense(q, k, v, scale, args.reps, world)
    dist.barrier()
    return dict(n=n, mask=kind, density=round(mask.density(), 4), ms_single=ms_single,
                ms_cp=ms_cp, ms_plan=plan_ms,
                speedup=None if ms_single is None else ms_single / ms_cp, bytes_cp=sent,
                bytes_dense_ring=dense_ring, bytes_ratio=sent / dense_ring,
                ms_torch_cp=ms_torch, torch_cp=torch_detail, max_err_vs_single=err,
                err_vs_fp64_sampled=err_rows, kernel_config=cfg)


def sampled_fp64_err(rank, world, q, k, v, out_local, mask, scale, device) -> float:
    """Max |error| against fp64 on the middle and last query blocks (heads 0 and Hq-1), each
    checked by the rank that owns it; the maximum over ranks."""
    bs, n = mask.block_size, q.shape[2]
    pos = local_positions(n, rank, world, bs, device=device)
    err = 0.0
    for blk in sorted({(-(-n // bs)) // 2, -(-n // bs) - 1}):
        where = (pos == blk * bs).nonzero()
        if not where.numel():
            continue
        r0 = int(where[0, 0])
        for h in (0, q.shape[1] - 1):
            oracle, rows = oracle_rows(q, k, v, mask, scale, [h], [blk])
            got = out_local[0, h, r0:r0 + rows.numel()].double()
            err = max(err, float((got - oracle[0]).abs().max()))
    t = torch.tensor([err], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


PREFILL_MODEL = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                     max_position_embeddings=1 << 22, rope_theta=1e6)  # Qwen2.5-0.5B shapes
TINY_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  max_position_embeddings=4096)


def prefill_rows(rank, world, args, bs, backend, device, t_start, skipped) -> list[dict]:
    """Prefill of a random-weight Qwen2 base model (Qwen2.5-0.5B shapes; the final hidden
    states, no logits) with every attention layer on a vslash mask of each density: context
    parallel over all ranks vs the same path on rank 0 alone (a group of one: one kernel call
    per layer on the whole sequence). Error: max |difference| of the final hidden states
    relative to their max |value| (bf16 through every layer)."""
    from transformers import Qwen2Config, Qwen2Model

    from adaptive_sparse.models.context_parallel import context_parallel_prefill

    smoke = args.cpu_smoke
    solo = dist.new_group([0])
    if past_budget(t_start, args.time_budget, device):
        skipped.append(dict(kind="prefill", n=args.prefill_seqlens,
                            density=args.prefill_densities))
        return []
    torch.manual_seed(0)  # the same weights on every rank
    cfg = Qwen2Config(**(TINY_MODEL if smoke else PREFILL_MODEL))
    dtype = torch.float32 if smoke else torch.bfloat16
    model = Qwen2Model(cfg).to(device=device, dtype=dtype).eval()
    hkv, hq = cfg.num_key_value_heads, cfg.num_attention_heads
    d_head = cfg.hidden_size // hq
    configs = {}
    if not smoke and args.tune_seqlen:
        g = torch.Generator(device=device).manual_seed(1)
        q, k, v = (torch.randn(1, h, args.tune_seqlen, d_head, generator=g, device=device,
                               dtype=dtype) for h in (hq, hkv, hkv))
        masks = {d: make_mask("vslash", hkv, args.tune_seqlen, bs, d, device)
                 for d in args.prefill_densities}
        configs = tuned_configs(q, k, v, masks, d_head ** -0.5, rank, device)
        del q, k, v, masks
    rows = []
    for n in args.prefill_seqlens:
        ids = torch.randint(0, cfg.vocab_size, (1, n),
                            generator=torch.Generator().manual_seed(n)).to(device)
        for d in args.prefill_densities:
            if past_budget(t_start, args.time_budget, device):
                skipped.append(dict(kind="prefill", n=n, density=d))
                continue
            mask = make_mask("vslash", hkv, n, bs, d, device)
            run = dict(block_size=bs, backend=backend, provider=lambda i, q, k: mask,
                       kernel_config=configs.get(d))

            def cp():
                with torch.no_grad():
                    return context_parallel_prefill(model, ids, **run)

            ms_cp = timed(cp, args.prefill_reps, collective=True)
            out, _, stats = cp()
            hidden = gather_sequence(out.last_hidden_state, dim=1, seq_len=n)
            del out
            sent = total(sum(s.bytes_sent for s in stats), device)
            dense_ring = total(sum(s.dense_ring_bytes for s in stats), device)
            ms_single = err = None
            if rank == 0:
                def single():
                    with torch.no_grad():
                        return context_parallel_prefill(model, ids, group=solo, **run)
                ms_single = timed(single, args.prefill_reps, collective=False)
                ref = single()[0].last_hidden_state[:, :n].float()
                err = float((hidden.float() - ref).abs().max() / ref.abs().max())
                del ref
            del hidden
            dist.barrier()
            row = dict(kind="prefill", mask="prefill vslash", n=n,
                       density=round(mask.density(), 4), ms_single=ms_single, ms_cp=ms_cp,
                       speedup=None if ms_single is None else ms_single / ms_cp,
                       bytes_cp=sent, bytes_dense_ring=dense_ring,
                       bytes_ratio=sent / dense_ring, ms_torch_cp=None,
                       max_err_vs_single=err, err_kind="relative, final hidden states",
                       kernel_config=configs.get(d), layers=len(stats))
            rows.append(row)
            if rank == 0:
                print(f"prefill N={n} d={row['density']:.3f}: 1 GPU {ms_single:.1f} ms, "
                      f"{world} ranks {ms_cp:.1f} ms, bytes {row['bytes_ratio']:.3f} of a "
                      f"dense ring, rel err {err:.1e}", flush=True)
    return rows


def worker(rank, world, args, init):
    smoke = args.cpu_smoke
    if smoke:
        store = None if init is None else dist.FileStore(init, world)  # None: torchrun's env
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        device, dtype, backend = torch.device("cpu"), torch.float32, "gather"
        torch.set_num_threads(1)
    else:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device, dtype, backend = torch.device("cuda", local), torch.bfloat16, "triton"
        if init is None:
            dist.init_process_group("nccl", device_id=device,
                                    timeout=datetime.timedelta(seconds=600))
        else:
            dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world,
                                    device_id=device, timeout=datetime.timedelta(seconds=600))
    Hq, Hkv, D = SMOKE["shape"] if smoke else SHAPES[args.shape]
    bs = args.block_size
    scale = 1 / math.sqrt(D)
    t_start = time.monotonic()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    env = environment() if rank == 0 else {}
    if not smoke:
        env["p2p_gb_per_s"] = p2p_gb_per_s(rank, world, device)
    gen = torch.Generator(device=device).manual_seed(0)  # rank 0's oracle row sampling

    def inputs(n):
        g = torch.Generator(device=device).manual_seed(n)  # the same tensors on every rank
        return tuple(torch.randn(1, h, n, D, generator=g, device=device, dtype=dtype)
                     for h in (Hq, Hkv, Hkv))

    configs = {}
    if not smoke and args.tune_seqlen:
        q, k, v = inputs(args.tune_seqlen)
        masks = {d: make_mask("random", Hkv, args.tune_seqlen, bs, d, device)
                 for d in args.densities}
        configs = tuned_configs(q, k, v, masks, scale, rank, device)
        del masks
        log(f"pinned kernel configs (tuned at N={args.tune_seqlen}): {configs}")
        del q, k, v
    checks = []
    q, k, v = inputs(args.check_seqlen)
    for d in sorted({min(args.densities), 1.0}):
        m = make_mask("random", Hkv, args.check_seqlen, bs, d, device)
        checks.append(check(rank, world, q, k, v, m, scale, backend, configs.get(d), bs, gen))
    del q, k, v
    if rank == 0:
        for c in checks:
            log(f"check N={c['n']} density={c['density']}: CP vs fp64 {c['err_cp_vs_fp64']:.2e}"
                f", single vs fp64 {c['err_single_vs_fp64']:.2e}, CP vs single "
                f"{c['max_err_vs_single']:.2e} -> {'ok' if c['ok'] else 'FAIL'}")
    ok = torch.tensor([float(all(c["ok"] for c in checks)) if rank == 0 else 1.0],
                      device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    rows, skipped = [], []
    for n in args.seqlens if bool(ok) else []:
        q, k, v = inputs(n)
        sh = dict(rank=rank, world=world, block_size=bs)
        ql, kl, vl = (shard_sequence(t, dim=2, **sh) for t in (q, k, v))
        for d in args.densities:
            for kind in (["dense"] if d >= 1.0 else args.masks):
                if past_budget(t_start, args.time_budget, device):
                    skipped.append(dict(n=n, density=d, mask=kind))
                    continue
                row = measure(rank, world, args, (q, k, v), (ql, kl, vl),
                              make_mask(kind, Hkv, n, bs, d, device), kind, configs.get(d),
                              scale, backend, device)
                rows.append(row)
                if rank == 0:
                    log(table(dict(report_head(env, world, Hq, Hkv, D, bs, dtype), rows=[row],
                                   gates=[], skipped=[]), header=False).splitlines()[-1])
        del q, k, v, ql, kl, vl
    gates = []
    for n in args.gate_seqlens if bool(ok) else []:
        q, k, v = inputs(n)
        d = 0.1 if 0.1 in configs or smoke else min(args.densities)
        gates.append(gate_row(rank, world, q, k, v, scale, d, args.reps, backend,
                              configs.get(d), bs, device))
        del q, k, v
    def save(prefill, final):
        if rank:
            return
        report = dict(report_head(env, world, Hq, Hkv, D, bs, dtype), backend=backend,
                      checks=checks, rows=rows, gates=[g for g in gates if g], prefill=prefill,
                      skipped=skipped, prefill_model=TINY_MODEL if smoke else PREFILL_MODEL,
                      nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"), complete=final,
                      wall_s=round(time.monotonic() - t_start, 1))
        atomic_write_text(args.json, json.dumps(report, indent=1))
        if final:
            print(table(report), flush=True)
            if args.md:
                atomic_write_text(args.md, table(report) + "\n")

    save([], False)  # the attention rows survive a failure in the prefill rows
    prefill = []
    if bool(ok) and args.prefill_seqlens:
        if importlib.util.find_spec("transformers") is None:
            skipped.append(dict(kind="prefill", reason="transformers is not installed"))
        else:
            prefill = prefill_rows(rank, world, args, bs, backend, device, t_start, skipped)
    save(prefill, True)
    dist.barrier()
    dist.destroy_process_group()


def report_head(env, world, Hq, Hkv, D, bs, dtype) -> dict:
    return dict(env=env, world=world, shape=dict(Hq=Hq, Hkv=Hkv, D=D, batch=1), block_size=bs,
                dtype=str(dtype))


def table(report, header: bool = True) -> str:
    env, w = report["env"], report["world"]
    lines = [f"{env.get('device')} x{w}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"Hq/Hkv/D = {report['shape']['Hq']}/{report['shape']['Hkv']}/"
             f"{report['shape']['D']}, block {report['block_size']}, {report['dtype']}",
             "",
             f"| N | mask | density | 1 GPU ms | {w} GPUs ms | speedup | plan ms | "
             "bytes / dense ring | torch CP ms | max err vs 1 GPU |",
             "|---|---|---|---|---|---|---|---|---|---|"] if header else []
    def f(x, spec, suffix=""):
        return "-" if x is None else f"{x:{spec}}{suffix}"

    for r in report["rows"] + report["gates"] + report.get("prefill", []):
        tcp = f"{r['ms_torch_cp']:.2f} ({r['torch_cp']})" if r.get("ms_torch_cp") else "-"
        err = f(r["max_err_vs_single"], ".1e") if r.get("err_vs_fp64_sampled") is None \
            else f"{r['err_vs_fp64_sampled']:.1e} (fp64, sampled rows)"
        lines.append(f"| {r['n']} | {r.get('mask', r.get('kind'))} | {r['density']:.3f} | "
                     f"{f(r['ms_single'], '.2f')} | {r['ms_cp']:.2f} | "
                     f"{f(r['speedup'], '.2f', 'x')} | {f(r.get('ms_plan'), '.2f')} | "
                     f"{r['bytes_ratio']:.3f} | {tcp} | {err} |")
    if report["skipped"]:
        lines.append(f"skipped (time budget): {report['skipped']}")
    return "\n".join(lines)


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def _floats(s):
    return [float(x) for x in s.split(",") if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2, help="processes (GPUs) to spawn")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--seqlens", type=_ints, default=_ints("131072,262144,524288"))
    ap.add_argument("--densities", type=_floats, default=_floats("0.05,0.1,0.25,0.5,1.0"))
    ap.add_argument("--masks", default="random,vslash")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--check-seqlen", type=int, default=16384)
    ap.add_argument("--tune-seqlen", type=int, default=32768)
    ap.add_argument("--gate-seqlens", type=_ints, default=_ints("262144"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prefill-seqlens", type=_ints, default=_ints("131072,262144"),
                    help="model-level prefill rows (empty: none)")
    ap.add_argument("--prefill-densities", type=_floats, default=_floats("0.1,1.0"))
    ap.add_argument("--prefill-reps", type=int, default=2)
    ap.add_argument("--single-max-seqlen", type=int, default=524288,
                    help="longest N timed on one GPU; longer ones are checked against fp64 "
                         "on sampled rows instead")
    ap.add_argument("--time-budget", type=float, default=330.0,
                    help="seconds after which remaining configs are skipped (and listed)")
    ap.add_argument("--json", default="ring.json")
    ap.add_argument("--md", default=None)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="2 gloo processes on CPU at tiny sizes (tests the script)")
    args = ap.parse_args(argv)
    args.masks = [m for m in args.masks.split(",") if m]
    bad = [m for m in args.masks if m not in ("random", "vslash")]
    if bad or not args.masks:
        ap.error(f"--masks: expected names from random,vslash, got {bad or 'nothing'}")
    if args.nproc < 1:
        ap.error(f"--nproc: expected >= 1, got {args.nproc}")
    if args.cpu_smoke:
        args.nproc = 2
        for key in ("seqlens", "densities", "block_size", "check_seqlen", "gate_seqlens",
                    "tune_seqlen", "reps", "single_max_seqlen", "prefill_seqlens",
                    "prefill_reps"):
            setattr(args, key, SMOKE[key])
    elif not torch.cuda.is_available():
        ap.error("no CUDA device: run with --cpu-smoke on CPU")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.cpu_smoke:
            init = os.path.join(tmp, "store")
        else:
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        mp.start_processes(worker, args=(args.nproc, args, init), nprocs=args.nproc,
                           join=True, start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
