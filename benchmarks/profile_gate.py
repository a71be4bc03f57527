"""Profile one learned-gate `GateProvider` call (one layer) on SmolLM2-135M's architecture.

Builds the model exactly as `benchmarks/e2e.py` does (config, seeded random weights, bf16),
loads a trained gate set, runs one prefill so the provider's hooks capture every layer's
pre-rotary q/k, then for one layer:

- wall time of a whole provider call (synchronize before and after), median over `--reps`;
- the three stages timed apart (CUDA events on CUDA, wall clock on CPU), plus the host time
  spent issuing each stage (perf_counter without a sync): gate network (`GateProvider.scores`,
  i.e. pool + project + rotary + score), `Policy.select` (dense tile selection), and
  `BlockSparseMask.from_dense` (indices); `Policy.to_mask` = select + from_dense;
- one provider call under `torch.profiler` (CPU + CUDA, record_shapes): op tables sorted by
  self CPU time and by CUDA time.

    PYTHONPATH=. python3 benchmarks/profile_gate.py --gates .e2e/gates [--seqlen 8192]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from adaptive_sparse.masks import BlockSparseMask
from adaptive_sparse.policies import Policy
from benchmarks.e2e import SMOLLM2_135M, build_model


def _timed(fn, cuda: bool) -> tuple[float, float]:
    """(device-or-wall ms, host issue ms) of one call of fn, after a synchronize."""
    if cuda:
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        fn()
        b.record()
        host = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        return a.elapsed_time(b), host
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return ms, ms


def _median(fn, reps: int, cuda: bool) -> tuple[float, float]:
    pairs = [_timed(fn, cuda) for _ in range(reps)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def _wall(fn, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gates", required=True, help="gate directory (gates.json + safetensors)")
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25)
    a = ap.parse_args(argv)
    from gating import GateProvider, load_gates

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"N={a.seqlen}, layer {a.layer}, density {a.density}", flush=True)
    model = build_model(dev, torch.bfloat16)
    gates = load_gates(a.gates, model, map_location=dev)
    policy = Policy(kind="density", density=a.density)
    n = a.seqlen
    gen = torch.Generator(device="cpu").manual_seed(n)
    ids = torch.randint(SMOLLM2_135M["vocab_size"], (1, n), generator=gen).to(dev)
    hq, hkv = SMOLLM2_135M["num_attention_heads"], SMOLLM2_135M["num_key_value_heads"]
    d = SMOLLM2_135M["head_dim"]
    q = torch.randn(1, hq, n, d, device=dev, dtype=torch.bfloat16)  # [B, Hq, N, D]: shape only
    k = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)  # [B, Hkv, N, D]
    L, bs, nl = a.layer, gates.config.block_size, gates.config.num_layers
    with GateProvider(gates, policy, model) as gate, torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=1)  # fills the capture hooks
        call = lambda: gate(L, q, k)  # noqa: E731
        for _ in range(a.warmup):
            call()
        walls = [_wall(call, cuda) for _ in range(a.reps)]
        print(f"\nprovider call wall (sync around), median of {a.reps}: "
              f"{statistics.median(walls):.3f} ms (min {min(walls):.3f}, max {max(walls):.3f})")

        scores = gate.scores(L, n, n).to(dev)
        dense = policy.select(scores, q_len=n, kv_len=n, block_size=bs, layer_idx=L,
                              num_layers=nl, validate=False)
        stages = {
            "whole provider call": call,
            "gate network (GateProvider.scores)": lambda: gate.scores(L, n, n),
            "Policy.select": lambda: policy.select(
                scores, q_len=n, kv_len=n, block_size=bs, layer_idx=L, num_layers=nl,
                validate=False),
            "BlockSparseMask.from_dense": lambda: BlockSparseMask.from_dense(
                dense, block_size=bs, q_len=n, kv_len=n, causal=True, validate=False),
            "Policy.to_mask (select + from_dense)": lambda: policy.to_mask(
                scores, q_len=n, kv_len=n, block_size=bs, layer_idx=L, num_layers=nl,
                validate=False),
        }
        unit = "CUDA-event" if cuda else "wall"
        print(f"\nstage timings, median of {a.reps} ({unit} ms | host issue ms):")
        for name, fn in stages.items():
            fn()
            dms, hms = _median(fn, a.reps, cuda)
            print(f"  {name:40s} {dms:8.3f} | {hms:8.3f}")

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=acts, record_shapes=True) as prof:
            call()
            if cuda:
                torch.cuda.synchronize()
    ka = prof.key_averages()
    print("\n== one provider call, sorted by self CPU time ==")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=a.rows))
    if cuda:
        print("\n== one provider call, sorted by CUDA time ==")
        print(ka.table(sort_by="cuda_time_total", row_limit=a.rows))
        print("\n== by input shape, sorted by self CPU time ==")
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
