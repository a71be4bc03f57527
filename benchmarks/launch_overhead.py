"""Host cost of one forward launch (GPU): microseconds per call of back-to-back calls with one sync
at the end, for the public entry points and for the bare kernel with a pinned config, next to the
CUDA-graph replay time of the same call; then the top host functions under cProfile.

    python3 benchmarks/launch_overhead.py --shape smollm2-135m --seqlen 8192 --density 0.1
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import sys

import torch

from adaptive_sparse.attention.triton import (triton_block_sparse_attention,
                                              triton_dense_causal_attention)
from adaptive_sparse.attention.triton.forward import bsa_fwd_autotuned
from benchmarks.common import SHAPES, graph_bench, host_us, random_mask


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--density", type=float, default=0.1)
    a = ap.parse_args(argv)
    Hq, Hkv, D = SHAPES[a.shape]
    n, bs = a.seqlen, 128
    gen = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(1, Hq, n, D, generator=gen, device="cuda").to(torch.bfloat16)
    k = torch.randn(1, Hkv, n, D, generator=gen, device="cuda").to(torch.bfloat16)
    v = torch.randn(1, Hkv, n, D, generator=gen, device="cuda").to(torch.bfloat16)
    mask = random_mask(Hkv, n, bs, a.density, gen, "cuda")
    scale = 1 / math.sqrt(D)
    sparse = lambda: triton_block_sparse_attention(q, k, v, mask, scale)  # noqa: E731
    sparse()
    best = bsa_fwd_autotuned.best_config
    pinned_cfg = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
    calls = {
        "sparse (autotuned)": sparse,
        "sparse (pinned config)": lambda: triton_block_sparse_attention(q, k, v, mask, scale,
                                                                        config=pinned_cfg),
        "dense kernel (autotuned)": lambda: triton_dense_causal_attention(q, k, v, scale,
                                                                          block_size=bs),
        "empty torch op (reference)": lambda: torch.empty_like(q),
    }
    print(f"{a.shape} N={n} density={mask.density():.3f} pinned={pinned_cfg}")
    print("| call | host us/call | graph replay ms |\n|---|---|---|")
    for name, fn in calls.items():
        print(f"| {name} | {host_us(fn):.1f} | {graph_bench(fn)} |", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        sparse()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
