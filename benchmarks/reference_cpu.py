"""CPU time and peak memory of the reference attention (SmolLM2-135M layer shapes).

    python benchmarks/reference_cpu.py [--lengths 8192 32768] [--json out.json]

Prints a table and writes JSON with versions and shapes. Peak memory is the process's max RSS
growth during the call (Linux ru_maxrss), so run each length in a fresh process (the default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch


def one(n: int, density: float, heads: int, kv_heads: int, dim: int, block: int) -> dict:
    from adaptive_sparse import BlockSparseMask, block_sparse_attention
    from adaptive_sparse.masks import block_causal, diagonal_blocks

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, n, dim, generator=g)
    k = torch.randn(1, kv_heads, n, dim, generator=g)
    v = torch.randn(1, kv_heads, n, dim, generator=g)
    allowed = block_causal(n, n, block)
    keep = (torch.rand(1, heads, *allowed.shape, generator=g) < density) & allowed
    keep |= diagonal_blocks(n, n, block)
    keep[..., 0] = True
    mask = BlockSparseMask.from_dense(keep, block_size=block, q_len=n, kv_len=n)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = block_sparse_attention(q, k, v, mask, backend="reference")
    dt = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(out).all()
    return {"n": n, "density": round(mask.density(), 4), "heads": heads, "kv_heads": kv_heads,
            "head_dim": dim, "block_size": block, "seconds": round(dt, 3),
            "peak_rss_growth_mib": round((rss1 - rss0) / 1024, 1),
            "qkv_mib": round((q.numel() + k.numel() + v.numel()) * 4 / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.25])
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, type=float, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(int(a.child[0]), a.child[1], 9, 3, 64, 64)))
        return
    rows = []
    for n in a.lengths:
        for d in a.densities:
            r = subprocess.run([sys.executable, __file__, "--child", str(n), str(d)],
                               capture_output=True, text=True, check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    meta = {"device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}
    print(f"\nreference attention on CPU ({meta['cpus']} cores, torch {meta['torch']}); "
          "one layer: B=1, Hq=9, Hkv=3, d=64, block 64, fp32")
    print(f"{'N':>7} {'density':>8} {'seconds':>8} {'peak RSS growth MiB':>20} {'q+k+v MiB':>10}")
    for r in rows:
        print(f"{r['n']:>7} {r['density']:>8.3f} {r['seconds']:>8.2f} "
              f"{r['peak_rss_growth_mib']:>20.1f} {r['qkv_mib']:>10.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
