"""Time every kernel config of `bsa_fwd_kernel` at a few (shape, N, density) points, on the GPU.

Each config is first checked against an fp64 oracle on sampled rows (as in attention.py); a config
that fails to compile or to match is listed with its reason and not timed. Also times the
autotuned launch (its pick printed), the host cost of one launch (back-to-back calls, one sync at
the end) and the CUDA-graph replay. Prints one table per point, writes JSON.

    python3 benchmarks/sweep_configs.py --json sweep.json \\
        --points llama3-8b:32768:1.0,smollm2-135m:8192:0.1

A config listed in --configs may also set a kernel constexpr, e.g. "EXP2_POLY": 4 (a quarter of
the exponentials on the FMA pipes); it becomes a column of the table. `--exp2-poly 0,0.25`
times every config at each of those fractions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import triton
import triton.testing

from adaptive_sparse.attention.triton import (mean_blocks_per_row, triton_block_sparse_attention,
                                              triton_dense_causal_attention)
from adaptive_sparse.attention.triton.forward import autotune_configs, exp2_poly_code, keep
from adaptive_sparse.masks import BlockSparseMask
from benchmarks.common import (SHAPES, graph_bench, host_us, oracle_rows, pair_table,
                               random_mask, rel_err)


def candidates(path=None, fractions=()) -> list[dict]:
    """The autotuner's configs, or the config dicts listed in the JSON file `path`; with
    `fractions`, each of them once per fraction of exp2 on the FMA pipes (EXP2_POLY)."""
    if path:
        with open(path) as f:
            out = json.load(f)
    else:
        out = [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
               for c in autotune_configs()]
    return [{**c, "EXP2_POLY": exp2_poly_code(f)} for c in out for f in fractions] \
        if fractions else out


def sweep_point(shape, n, density, bs, gen, configs=None, fractions=()) -> dict:
    Hq, Hkv, D = SHAPES[shape]
    q = torch.randn(1, Hq, n, D, generator=gen, device="cuda").to(torch.bfloat16)
    k = torch.randn(1, Hkv, n, D, generator=gen, device="cuda").to(torch.bfloat16)
    v = torch.randn(1, Hkv, n, D, generator=gen, device="cuda").to(torch.bfloat16)
    scale = 1 / math.sqrt(D)
    dense_kernel = density >= 1.0
    mask = BlockSparseMask.full(1, 1, block_size=bs, q_len=n, kv_len=n, device="cuda") \
        if dense_kernel else random_mask(Hkv, n, bs, density, gen, "cuda")
    qb = -(-n // bs)
    qblocks = sorted({qb - 1, qb // 2, int(torch.randint(qb, (1,), generator=gen,
                                                         device="cuda"))})
    heads = sorted({0, Hq - 1})
    ref, rows = oracle_rows(q, k, v, mask, scale, heads, qblocks)
    pairs = int((mask.to_dense()[0].long() * pair_table(n, n, bs, "cuda")).sum()) \
        * (Hq // mask.heads)
    flops = 4 * D * pairs
    bpr = mean_blocks_per_row(mask)

    def call(cfg=None):
        if dense_kernel:
            return triton_dense_causal_attention(q, k, v, scale, block_size=bs, config=cfg)
        return triton_block_sparse_attention(q, k, v, mask, scale, config=cfg)

    results = []
    args = {"BS": bs, "HEAD_DIM": D, "G": Hq // Hkv, "SHARED": True}
    for cfg in candidates(configs, fractions):
        tc = triton.Config({k_: v_ for k_, v_ in cfg.items()
                            if k_ not in ("num_warps", "num_stages")},
                           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if configs is None and not keep(tc, args):  # listed configs are timed as given
            continue
        row = {"config": cfg}
        try:
            out = call(cfg)
            err = rel_err(out[0, heads][:, rows], ref)
            del out
            row["err"] = err
            if not err < 1e-2:
                row["failed"] = f"error {err:.2e}"
            else:
                row["ms"] = float(triton.testing.do_bench(lambda: call(cfg), warmup=25, rep=150,
                                                          return_mode="median"))
                row["tflops"] = flops / row["ms"] / 1e9
        except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
            row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        results.append(row)
        print(json.dumps(row), flush=True)
    point = dict(shape=shape, N=n, density=mask.density(), blocks_per_row=bpr, block_size=bs,
                 flops=flops, configs=results)
    if configs is None:  # the autotuned launch, next to the configs it chose from
        auto_out = call()
        auto_err = rel_err(auto_out[0, heads][:, rows], ref)
        del auto_out
        auto_ms = float(triton.testing.do_bench(call, warmup=25, rep=150, return_mode="median"))
        from adaptive_sparse.attention.triton.forward import bsa_fwd_autotuned
        point.update(auto_ms=auto_ms, auto_tflops=flops / auto_ms / 1e9, auto_err=auto_err,
                     auto_config=str(bsa_fwd_autotuned.best_config), host_us=host_us(call),
                     graph_ms=graph_bench(call))
    return point


def table(point) -> str:
    extra = sorted({k for r in point["configs"] for k in r["config"]}
                   - {"GH", "RB", "BLOCK_N", "USE_DESC", "num_warps", "num_stages"})
    auto = (f": autotuned {point['auto_ms']:.3f} ms = {point['auto_tflops']:.0f} TFLOP/s "
            f"({point['auto_config']}), host {point['host_us']:.0f} us/call, graph "
            f"{point['graph_ms']}") if "auto_ms" in point else ""
    lines = [f"## {point['shape']} N={point['N']} density={point['density']:.3f} "
             f"(blocks/row {point['blocks_per_row']:.1f}){auto}",
             "| GH | RB | BLOCK_N | TMA | warps | stages | " + "".join(f"{k} | " for k in extra)
             + "ms | TFLOP/s | err |", "|---|---|---|---|---|---|" + "---|" * (len(extra) + 3)]
    ok = sorted((r for r in point["configs"] if "ms" in r), key=lambda r: r["ms"])
    for r in ok:
        c = r["config"]
        lines.append(f"| {c['GH']} | {c['RB']} | {c['BLOCK_N']} | {int(c['USE_DESC'])} | "
                     f"{c['num_warps']} | {c['num_stages']} | "
                     + "".join(f"{int(c.get(k, 0))} | " for k in extra) +
                     f"{r['ms']:.3f} | {r['tflops']:.0f} | {r['err']:.1e} |")
    for r in point["configs"]:
        if "failed" in r:
            lines.append(f"| failed: {r['config']} | {r['failed']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="llama3-8b:32768:1.0,llama3-8b:32768:0.1")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--configs", default=None,
                    help="JSON list of config dicts to time instead of the autotuner's")
    ap.add_argument("--exp2-poly", default="",
                    help="fractions (comma list) of exp2 on the FMA pipes to time each config at")
    ap.add_argument("--json", default="sweep.json")
    a = ap.parse_args(argv)
    try:
        fractions = [float(x) for x in a.exp2_poly.split(",") if x]
        for f in fractions:
            exp2_poly_code(f)
    except ValueError as e:
        ap.error(f"--exp2-poly: {e}")
    gen = torch.Generator(device="cuda").manual_seed(1)
    points = []
    for spec in a.points.split(","):
        shape, n, dens = spec.split(":")
        points.append(sweep_point(shape, int(n), float(dens), a.block_size, gen, a.configs,
                                  fractions))
        with open(a.json, "w") as f:
            json.dump(points, f, indent=1)
        torch.cuda.empty_cache()
    for p in points:
        print(table(p), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
