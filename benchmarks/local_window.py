"""Sliding-window attention of Gemma 3's local layers: our exact chunked path vs SDPA.

`adaptive_sparse.models.attention.local_window_attention` runs the layers a model marks as
sliding-window (Gemma 3: window 512, 5 of every 6 layers) in query chunks, each against the keys
its window reaches. Timed on random bf16 q/k/v of one layer (Gemma-3-270M: 4 query heads, 1 KV
head, d=256) for several chunk sizes, next to:
- `sdpa-mask`: SDPA with the dense [N, N] sliding-window boolean mask (what transformers' SDPA
  path builds for these layers);
- `cudnn-causal`, `flash-causal`: dense causal SDPA through the cuDNN and the flash backend, a
  lower bound's neighbour (more work, the best dense kernels).
Every output is compared with an fp64 evaluation at N <= --check-max-len (relative error).
Median of `triton.testing.do_bench` on CUDA (one call on CPU).

    PYTHONPATH=. python3 benchmarks/local_window.py --seqlens 8192,32768 --json lw.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from adaptive_sparse.models.attention import local_window_attention
from adaptive_sparse.io import atomic_write_text
from benchmarks.common import DENSE_BACKENDS, bench, environment, sdpa_dense


def window_mask(n: int, window: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", default="8192,32768")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--heads", default="4,1,256", help="Hq,Hkv,D")
    ap.add_argument("--chunks", default="256,512,1024,2048")
    ap.add_argument("--check-max-len", type=int, default=8192)
    ap.add_argument("--json", default="local_window.json")
    a = ap.parse_args(argv)
    hq, hkv, d = (int(x) for x in a.heads.split(","))
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dt = torch.bfloat16 if cuda else torch.float32
    env = environment()
    rows = []
    for n in (int(x) for x in a.seqlens.split(",") if x):
        g = torch.Generator(device=dev).manual_seed(n)
        q = torch.randn(1, hq, n, d, generator=g, device=dev).to(dt)
        k, v = (torch.randn(1, hkv, n, d, generator=g, device=dev).to(dt) for _ in range(2))
        scale = d ** -0.5
        ref = None
        if n <= a.check_max_len:
            mask = window_mask(n, a.window, dev)
            ref = F.scaled_dot_product_attention(
                q.double(), k.double().repeat_interleave(hq // hkv, 1),
                v.double().repeat_interleave(hq // hkv, 1), attn_mask=mask, scale=scale)

        def err(out):
            return None if ref is None else float((out.double() - ref).norm() / ref.norm())

        cases = {f"ours-chunk{c}": (lambda c=c: local_window_attention(
            q, k, v, window=a.window, scale=scale, chunk=c)) for c in
            (int(x) for x in a.chunks.split(","))}
        mask = window_mask(n, a.window, dev)
        cases["sdpa-mask"] = lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=hq != hkv)
        for backend in DENSE_BACKENDS if q.is_cuda else ():
            cases[f"{backend}-causal"] = lambda b=backend: sdpa_dense(q, k, v, scale, b)
        for name, fn in cases.items():
            try:
                out = fn()
                row = dict(N=n, case=name, ms=bench(fn),
                           err=None if name.endswith("-causal") else err(out))
            except torch.OutOfMemoryError:
                row = dict(N=n, case=name, ms=None, err=None, oom=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del mask
    atomic_write_text(a.json, json.dumps({"env": env, "window": a.window, "heads": [hq, hkv, d],
                               "rows": rows}, indent=1))
    print(f"\n| N | case | ms | rel err vs fp64 |\n|---|---|---|---|")
    for r in rows:
        ms = "OOM" if r["ms"] is None else f"{r['ms']:.3f}"
        e = "-" if r["err"] is None else f"{r['err']:.1e}"
        print(f"| {r['N']} | {r['case']} | {ms} | {e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
