"""Block-sparse attention on the GPU: ours (Triton) vs FlexAttention vs SDPA-flash, same masks.

Every timed config is checked first against an fp64 oracle on sampled query blocks and heads;
a config whose check fails gets no speedup. Useful FLOPs = 4 * D * Hq * B * (query/key pairs
that the mask keeps and causality allows); SDPA is credited with the dense causal pairs.

    python3 benchmarks/attention.py --json out.json --md out.md [--seqlens 4096,8192 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

from adaptive_sparse.attention.triton import (block_attention_maps_triton,
                                              scores_to_kv_indices,
                                              triton_block_sparse_attention,
                                              triton_dense_causal_attention)
from adaptive_sparse.attention.flex import kernel_options
from adaptive_sparse.masks import BlockSparseMask, block_causal, diagonal_blocks

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64),
          "gemma3-270m": (4, 1, 256)}  # Hq, Hkv, D (Gemma 3: its global layers)


def environment() -> dict:
    import triton
    env = {"torch": torch.__version__, "triton": triton.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
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


def flex_block_mask(mask: BlockSparseMask, hq: int):
    """Flex BlockMask of the same blocks: tiles crossed by the diagonal are partial (plain
    causal mask_mod), every other selected tile is a full block (no mask_mod evaluated)."""
    from torch.nn.attention.flex_attention import BlockMask

    dense = mask.expand_heads(hq).to_dense()  # [1, Hq, Qb, Kb]
    diag = diagonal_blocks(mask.q_len, mask.kv_len, mask.block_size, device=dense.device)
    if mask.kv_len % mask.block_size:
        diag[:, -1] = True
    offset = mask.kv_len - mask.q_len

    def indices(d):
        kb = d.shape[-1]
        key = (~d).to(torch.int32) * kb + torch.arange(kb, device=d.device, dtype=torch.int32)
        idx = torch.sort(key, dim=-1).values
        return d.sum(-1, dtype=torch.int32), torch.where(idx >= kb, idx - kb, idx).contiguous()

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    num, idx = indices(dense & diag)
    full_num, full_idx = indices(dense & ~diag)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=mask.block_size,
                                    mask_mod=causal, seq_lengths=(mask.q_len, mask.kv_len))


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


def sdpa_dense(q, k, v, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = SDPBackend.FLASH_ATTENTION if q.is_cuda else SDPBackend.MATH
    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() \
        else flex_attention


def run_case(shape, n, bs, densities, gen, flex_fn, log, masks=None) -> list[dict]:
    """Dense kernel, then one row per mask: random masks at `densities`, or the given
    `masks` [(label, BlockSparseMask)] (e.g. a trained gate's per-layer masks) instead."""
    Hq, Hkv, D = SHAPES[shape]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q = torch.randn(1, Hq, n, D, generator=gen, device=dev).to(dt)
    k = torch.randn(1, Hkv, n, D, generator=gen, device=dev).to(dt)
    v = torch.randn(1, Hkv, n, D, generator=gen, device=dev).to(dt)
    scale = 1 / math.sqrt(D)
    qb = -(-n // bs)
    qblocks = sorted({qb - 1, qb // 2, int(torch.randint(qb, (1,), generator=gen, device=dev))})
    heads = sorted({0, Hq - 1, int(torch.randint(Hq, (1,), generator=gen, device=dev))})
    table = pair_table(n, n, bs, dev)
    dense_pairs = int(table.sum())
    dense_flops = 4 * D * Hq * dense_pairs
    base = dict(shape=shape, Hq=Hq, Hkv=Hkv, D=D, N=n, block_size=bs)
    rows_out = []

    sdpa_ms = bench(lambda: sdpa_dense(q, k, v, scale))
    full = BlockSparseMask.full(1, 1, block_size=bs, q_len=n, kv_len=n, device=dev)
    ref, rows = oracle_rows(q, k, v, full, scale, heads, qblocks)
    err_sdpa = rel_err(sdpa_dense(q, k, v, scale)[0, heads][:, rows], ref)
    out = triton_dense_causal_attention(q, k, v, scale, block_size=bs)
    err_dense = rel_err(out[0, heads][:, rows], ref)
    ok_dense = err_dense < 1e-2 and err_dense <= 2 * err_sdpa + 1e-3
    dense_ms = bench(lambda: triton_dense_causal_attention(q, k, v, scale, block_size=bs))
    rows_out.append({**base, "provider": "ours-dense-kernel", "density": 1.0, "ms": dense_ms,
                     "tflops": dense_flops / dense_ms / 1e9, "err": err_dense, "ok": ok_dense,
                     "sdpa_ms": sdpa_ms, "sdpa_tflops": dense_flops / sdpa_ms / 1e9,
                     "err_sdpa": err_sdpa,
                     "speedup_vs_sdpa": sdpa_ms / dense_ms if ok_dense else None})
    log(rows_out[-1])
    del out
    cases = masks if masks is not None else \
        ((dens, random_mask(Hkv, n, bs, dens, gen, dev)) for dens in densities)
    for dens, mask in cases:
        mask = mask.to(dev)
        pairs = int((mask.to_dense()[0].long() * table).sum()) * (Hq // mask.heads)
        flops = 4 * D * pairs
        ref, rows = oracle_rows(q, k, v, mask, scale, heads, qblocks)
        out = triton_block_sparse_attention(q, k, v, mask, scale)
        err = rel_err(out[0, heads][:, rows], ref)
        del out
        row = {**base, "provider": "ours", "density": mask.density(), "target_density": dens,
               "mask_heads": mask.heads,
               "ms": None, "tflops": None, "err": err, "sdpa_ms": sdpa_ms,
               "sdpa_tflops": dense_flops / sdpa_ms / 1e9, "err_sdpa": err_sdpa}
        ours_ms = bench(lambda: triton_block_sparse_attention(q, k, v, mask, scale))
        row.update(ms=ours_ms, tflops=flops / ours_ms / 1e9,
                   graph_ms=graph_bench(lambda: triton_block_sparse_attention(q, k, v, mask,
                                                                              scale)))
        if flex_fn is not None:
            bm = flex_block_mask(mask, Hq)
            kopt = kernel_options(bs) if torch.cuda.is_available() else None
            flex = lambda: flex_fn(q, k, v, block_mask=bm, scale=scale,  # noqa: E731
                                   kernel_options=kopt, enable_gqa=Hq != Hkv)
            fl = flex()
            err_flex = rel_err(fl[0, heads][:, rows], ref)
            del fl
            flex_ms = bench(flex)
            flex_graph = graph_bench(flex)
            row.update(flex_ms=flex_ms, flex_tflops=flops / flex_ms / 1e9, err_flex=err_flex,
                       flex_graph_ms=flex_graph)
            del bm
        row["ok"] = err < 1e-2 and err <= 2 * min(err_sdpa, row.get("err_flex", 1.0)) + 1e-3
        row["speedup_vs_sdpa"] = sdpa_ms / ours_ms if row["ok"] else None
        row["speedup_vs_flex"] = row["flex_ms"] / ours_ms if row["ok"] and "flex_ms" in row \
            else None
        row["graph_speedup_vs_flex"] = row["flex_graph_ms"] / row["graph_ms"] \
            if row["ok"] and row.get("flex_graph_ms") and row.get("graph_ms") else None
        rows_out.append(row)
        log(row)
    return rows_out


def artifact_masks(path) -> list[tuple[str, BlockSparseMask]]:
    """[(label "<artifact> L<layer>", mask)] of a masks artifact (verified on load), one per
    layer; all must share one length and block size."""
    from adaptive_sparse.export.masks import load_masks

    art = load_masks(path)
    out = [(f"{os.path.basename(os.path.normpath(path))} L{layer}", m)
           for layer, m in sorted(art.layer_masks().items())]
    if len({(m.q_len, m.kv_len, m.block_size) for _, m in out}) != 1:
        raise ValueError(f"mask_artifact: expected one length and block size for every layer "
                         f"in {path}")
    return out


def artifact_case(path, shape, gen, flex_fn, log) -> list[dict]:
    """run_case on a masks artifact's per-layer masks, plus a row summing every layer."""
    masks = artifact_masks(path)
    m0 = masks[0][1]
    rows = run_case(shape, m0.q_len, m0.block_size, [], gen, flex_fn, log, masks=masks)
    layers = [r for r in rows if r["provider"] == "ours"]
    total = {k: sum(r[k] for r in layers) if all(r.get(k) is not None for r in layers) else None
             for k in ("ms", "flex_ms", "graph_ms", "flex_graph_ms")}
    print(json.dumps({"artifact": path, "layers": len(layers), "sum_ms": total,
                      "sdpa_ms_x_layers": layers[0]["sdpa_ms"] * len(layers),
                      "all_ok": all(r["ok"] for r in layers)}), flush=True)
    return rows


def target_case(n, bs, gen, log) -> dict:
    Hq, Hkv, D = SHAPES["llama3-8b"]
    q = torch.randn(1, Hq, n, D, generator=gen, device="cuda").to(torch.bfloat16)
    k = torch.randn(1, Hkv, n, D, generator=gen, device="cuda").to(torch.bfloat16)
    v = torch.randn(1, Hkv, n, D, generator=gen, device="cuda").to(torch.bfloat16)
    scale = 1 / math.sqrt(D)
    sdpa_ms = bench(lambda: sdpa_dense(q, k, v, scale))
    block_attention_maps_triton(q, k, block_size=bs)  # autotunes the lse pass
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    bmax, bsum = block_attention_maps_triton(q, k, block_size=bs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    out_bytes = bmax.numel() * 4 * 2
    ms = bench(lambda: block_attention_maps_triton(q, k, block_size=bs))
    heads = [0, Hq - 1]
    ok = bool(torch.allclose(bsum.sum(-1), torch.ones((), device="cuda"), atol=1e-3))
    err_max = err_sum = None
    if n <= 8192:
        from adaptive_sparse.attention.block_maps import block_attention_maps
        rmax, rsum = block_attention_maps(q[:, heads].double(), k[:, [0, Hkv - 1]].double(),
                                          block_size=bs)
        err_max = float((bmax[:, heads].double() - rmax).abs().max())
        err_sum = float((bsum[:, heads].double() - rsum).abs().max())
        ok = ok and err_max < 1e-4 and err_sum < 1e-4
    row = dict(kind="target", N=n, block_size=bs, Hq=Hq, Hkv=Hkv, D=D, ms=ms, sdpa_ms=sdpa_ms,
               ratio_vs_sdpa=ms / sdpa_ms, peak_extra_bytes=peak, output_bytes=out_bytes,
               err_max=err_max, err_sum=err_sum, ok=ok)
    log(row)
    return row


def gate_case(n, bs, density, gen, log) -> dict:
    Hq, Hkv, D = SHAPES["llama3-8b"]
    qb = -(-n // bs)
    scores = torch.randn(1, Hq, qb, qb, generator=gen, device="cuda")
    top_k = max(1, round(density * (qb + 1) / 2))
    ms = bench(lambda: scores_to_kv_indices(scores, q_len=n, kv_len=n, block_size=bs,
                                            top_k=top_k))
    q = torch.randn(1, Hq, n, D, generator=gen, device="cuda").to(torch.bfloat16)
    k = torch.randn(1, Hkv, n, D, generator=gen, device="cuda").to(torch.bfloat16)
    sdpa_ms = bench(lambda: sdpa_dense(q, k, k, 1 / math.sqrt(D)))
    row = dict(kind="gate_topk", N=n, block_size=bs, top_k=top_k, ms=ms, sdpa_ms=sdpa_ms,
               fraction_of_dense=ms / sdpa_ms)
    log(row)
    return row


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(env, rows, targets, gates) -> str:
    lines = [f"### {env['device']}, torch {env['torch']}, triton {env['triton']}, "
             f"CUDA {env.get('cuda')}",
             f"Ceilings measured in the same run: bf16 8192^3 matmul "
             f"{env.get('matmul_bf16_tflops')} TFLOP/s, device copy {env.get('copy_tb_per_s')} "
             "TB/s (read + write).", "",
             "B=1, bf16, causal, random block masks (diagonal + sink kept, one mask per KV "
             "group, Flex given the same blocks expanded to Hq heads, full blocks off the "
             "diagonal). Useful TFLOP/s = 4 * D * Hq * (visible query/key pairs in kept "
             "tiles) / time; SDPA-flash is dense causal (4 * D * Hq * N(N+1)/2). Median ms. "
             "Speedups are left out (-) where the fp64 check failed. Graph columns: the same "
             "call captured in a CUDA graph and replayed (no host launch cost).", "",
             "| shape | bs | N | density | ours ms | ours TFLOP/s | Flex ms | Flex TFLOP/s | "
             "SDPA ms | x Flex | x SDPA | err ours / Flex | ok | ours graph ms | Flex graph ms | "
             "x Flex (graphs) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["shape"] + (" (dense kernel)" if r["provider"] == "ours-dense-kernel" else "")
        lines.append(
            f"| {name} | {r['block_size']} | {r['N']} | {r['density']:.3f} | {r['ms']:.3f} | "
            f"{r['tflops']:.0f} | {_fmt(r.get('flex_ms'), '.3f')} | "
            f"{_fmt(r.get('flex_tflops'), '.0f')} | {r['sdpa_ms']:.3f} | "
            f"{_fmt(r.get('speedup_vs_flex'), '.2f')} | {_fmt(r.get('speedup_vs_sdpa'), '.2f')} | "
            f"{r['err']:.1e} / {_fmt(r.get('err_flex'), '.1e')} | {'yes' if r['ok'] else 'NO'} | "
            f"{_fmt(r.get('graph_ms'), '.3f')} | {_fmt(r.get('flex_graph_ms'), '.3f')} | "
            f"{_fmt(r.get('graph_speedup_vs_flex'), '.2f')} |")
    if targets:
        lines += ["", "Target kernel (block-max + block-sum maps, llama3-8b shape) vs one "
                  "SDPA-flash forward; peak = memory allocated beyond the inputs:", "",
                  "| N | bs | maps ms | SDPA ms | ratio | peak MiB | outputs MiB | "
                  "max err (fp64, N<=8k) | ok |", "|---|---|---|---|---|---|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['N']} | {t['block_size']} | {t['ms']:.3f} | {t['sdpa_ms']:.3f} "
                         f"| {t['ratio_vs_sdpa']:.2f} | {t['peak_extra_bytes'] / 2**20:.1f} | "
                         f"{t['output_bytes'] / 2**20:.1f} | {_fmt(t['err_max'], '.1e')} | "
                         f"{'yes' if t['ok'] else 'NO'} |")
    if gates:
        lines += ["", "Scores -> kv_indices (top-k, one Triton launch, Hq=32 score rows) vs dense "
                  "SDPA-flash; the gate network's own forward is not included:", "",
                  "| N | bs | top_k | ms | fraction of dense SDPA |", "|---|---|---|---|---|"]
        for g in gates:
            lines.append(f"| {g['N']} | {g['block_size']} | {g['top_k']} | {g['ms']:.3f} | "
                         f"{g['fraction_of_dense']:.4f} |")
    return "\n".join(lines) + "\n"


def _write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama3-8b,smollm2-135m")
    ap.add_argument("--seqlens", default="4096,8192,32768,131072")
    ap.add_argument("--densities", default="1.0,0.5,0.2,0.1,0.05")
    ap.add_argument("--block-sizes", default="128")
    ap.add_argument("--target-seqlens", default="8192,32768")
    ap.add_argument("--gate-seqlens", default="8192,32768")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--mask-artifact", default=None,
                    help="also time every layer's mask of this masks artifact (`adaptive-sparse "
                    "export masks`, e.g. a trained gate's) at --mask-shape")
    ap.add_argument("--mask-shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--json", default="attention.json")
    ap.add_argument("--md", default="attention.md")
    a = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    env = environment()
    print(json.dumps(env), flush=True)
    gen = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(0)
    flex_fn = None if a.no_flex else _compiled_flex()
    rows, targets, gates, logged = [], [], [], []

    def log(r):
        logged.append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                          for k, v in r.items()}), flush=True)
        _write(a.json, json.dumps({"env": env, "partial": logged}, indent=1))

    for shape in a.shapes.split(","):
        for bs in ints(a.block_sizes):
            for n in ints(a.seqlens):
                t0 = time.time()
                try:
                    rows += run_case(shape, n, bs, [float(x) for x in a.densities.split(",")],
                                     gen, flex_fn, log)
                except torch.OutOfMemoryError as e:
                    print(f"OOM {shape} N={n} bs={bs}: {e}", file=sys.stderr, flush=True)
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
                print(f"# {shape} N={n} bs={bs}: {time.time() - t0:.1f} s", flush=True)
    if a.mask_artifact:
        rows += artifact_case(a.mask_artifact, a.mask_shape, gen, flex_fn, log)
    if torch.cuda.is_available():
        for n in ints(a.target_seqlens):
            for bs in (64, 128):
                targets.append(target_case(n, bs, gen, log))
        for n in ints(a.gate_seqlens):
            gates.append(gate_case(n, 64, 0.1, gen, log))
    from adaptive_sparse.attention.triton.forward import bsa_fwd_autotuned
    tuned = {str(k): str(v) for k, v in bsa_fwd_autotuned.cache.items()}  # key -> chosen config
    _write(a.json, json.dumps({"env": env, "rows": rows, "targets": targets, "gates": gates,
                               "autotuned": tuned}, indent=1))
    md = markdown(env, rows, targets, gates)
    _write(a.md, md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
