"""Helpers shared by the GPU benchmarks: device and version record with the measured ceilings,
timing (events, CUDA-graph replay, host cost), the dense SDPA baselines (cuDNN and flash), the
random block masks and the fp64 oracle on sampled rows."""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch

from adaptive_sparse.masks import BlockSparseMask, block_causal, diagonal_blocks

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64),
          "qwen2.5-coder-0.5b": (14, 2, 64),
          "gemma3-270m": (4, 1, 256)}  # Hq, Hkv, D (Gemma 3: its global layers)
DENSE_BACKENDS = ("cudnn", "flash")  # SDPA backends timed as the dense baseline, CUDA only


def environment() -> dict:
    """Device, versions and the ceilings measured here: bf16 8192^3 matmul TFLOP/s and device
    copy TB/s (read + write)."""
    import triton
    env = {"torch": torch.__version__, "triton": triton.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        ms = bench(lambda: a @ b)
        env["matmul_bf16_tflops"] = round(2 * 8192**3 / ms / 1e9, 1)
        x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        ms = bench(lambda: y.copy_(x))
        env["copy_tb_per_s"] = round(2 * x.numel() / ms / 1e9, 2)
        del a, b, x, y
    return env


def bench(fn) -> float:
    """Median milliseconds: triton.testing.do_bench (>= 200 ms of repeats) on CUDA; calls over
    20 ms are timed 3 times with CUDA events instead. One wall-clock call on CPU."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    if start.elapsed_time(end) > 20:
        times = []
        for _ in range(3):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def graph_bench(fn) -> float | None:
    """Median ms of replaying `fn` captured in a CUDA graph (no CPU launch cost); None off CUDA
    or when capture fails."""
    if not torch.cuda.is_available():
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench(graph.replay)
    except RuntimeError as e:
        print(f"graph capture failed: {e}", file=sys.stderr, flush=True)
        return None


def random_mask(heads, n, bs, density, gen, device) -> BlockSparseMask:
    """Bernoulli blocks of the causal region with diagonal and sink kept; overall density (with
    the forced blocks) close to `density`. heads = mask heads, batch 1."""
    allowed = block_causal(n, n, bs, device=device)
    forced = diagonal_blocks(n, n, bs, device=device)
    forced[:, 0] = True
    forced &= allowed
    total, n_forced = int(allowed.sum()), int(forced.sum())
    p = min(1.0, max(0.0, (density * total - n_forced) / max(1, total - n_forced)))
    rnd = torch.rand(1, heads, *allowed.shape, generator=gen, device=device)
    dense = ((rnd < p) | forced) & allowed
    return BlockSparseMask.from_dense(dense, block_size=bs, q_len=n, kv_len=n)


def pair_table(n, m, bs, device) -> torch.Tensor:
    """int64 [Qb, Kb]: visible (query, key) pairs of each tile under the end-aligned causal rule."""
    qb, kb = -(-n // bs), -(-m // bs)
    starts = torch.arange(kb, device=device) * bs
    width = torch.clamp(m - starts, max=bs)
    out = torch.zeros(qb, kb, dtype=torch.int64, device=device)
    chunk = max(bs, (1 << 24) // kb // bs * bs)
    for r0 in range(0, n, chunk):
        rows = torch.arange(r0, min(n, r0 + chunk), device=device)
        vis = torch.clamp(rows[:, None] + (m - n) + 1 - starts[None, :], min=0)
        vis = torch.minimum(vis, width[None, :])  # [R, Kb]
        out.index_add_(0, rows // bs, vis)
    return out


def oracle_rows(q, k, v, mask, scale, heads, qblocks):
    """fp64 attention for the rows of `qblocks` and the query `heads`: [len(heads), R, D]."""
    Hq, N, Hkv, M = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    bs, G = mask.block_size, Hq // Hkv
    rows = torch.cat([torch.arange(b * bs, min(N, b * bs + bs), device=q.device)
                      for b in qblocks])
    dense = mask.to_dense()[0]  # [Hm, Qb, Kb]
    cols = torch.arange(M, device=q.device)
    outs = []
    for h in heads:
        s = q[0, h, rows].double() @ k[0, h // G].double().T * scale  # [R, M]
        keep = dense[h // (Hq // mask.heads)][rows // bs][:, cols // bs]
        keep &= cols[None, :] <= rows[:, None] + (M - N)
        s = s.masked_fill(~keep, -math.inf)
        p = torch.softmax(s, -1).nan_to_num(0.0)
        outs.append(p @ v[0, h // G].double())
    return torch.stack(outs), rows


def rel_err(x, ref) -> float:
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def sdpa_dense(q, k, v, scale, backend: str = "cudnn"):
    """Dense causal SDPA through one backend ("cudnn", "flash"; "math" on CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "math": SDPBackend.MATH}[backend if q.is_cuda else "math"]
    with sdpa_kernel(which):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def dense_baselines(q, k, v, scale) -> dict[str, float]:
    """Median ms of dense causal SDPA per backend of DENSE_BACKENDS (one "math" entry on CPU);
    a backend that refuses the shape is left out."""
    out = {}
    for name in DENSE_BACKENDS if q.is_cuda else ("math",):
        try:
            sdpa_dense(q, k, v, scale, name)
        except RuntimeError as e:
            print(f"SDPA {name} refused {tuple(q.shape)}: {str(e).splitlines()[0]}",
                  file=sys.stderr, flush=True)
            continue
        out[name] = bench(lambda name=name: sdpa_dense(q, k, v, scale, name))
    return out


def best_dense(times: dict[str, float]) -> tuple[str, float]:
    """(backend, ms) of the fastest dense baseline."""
    return min(times.items(), key=lambda kv: kv[1])


def host_us(fn, calls=200) -> float:
    """Microseconds per call of back-to-back launches (one sync at the end): the host-bound time
    when it exceeds the kernel time."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def fmt(x, spec: str) -> str:
    """`format(x, spec)`, or "-" for a missing value (a table cell)."""
    return "-" if x is None else format(x, spec)


def floats(text: str) -> list[float]:
    """A comma-separated list of numbers (a command-line value); empty items are skipped."""
    return [float(x) for x in text.split(",") if x]
