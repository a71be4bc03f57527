"""Decode attention per step: the block-sparse split-KV kernel against dense decode.

One new token per sequence attends to a KV cache of `--contexts` tokens (`--shape`: Llama-3-8B's
32 query / 8 KV heads, head_dim 128, or Qwen2.5-Coder-0.5B's 14 / 2, head_dim 64; bf16). Dense
baselines timed in the same run: SDPA with the flash and cuDNN backends (the GQA group folded
into the query length, which is exact for one query token and needs no K/V copy), the project's
kernel in dense mode and, with --flex, compiled FlexAttention (whole cache). Sparse: each
(sequence, KV head) reads `density` of its cache blocks (sink and last block included, the rest
at random), through our kernel and, with --flex, through compiled FlexAttention at q_len 1 with a
BlockMask built from the same kv indices (built once, outside the timing). Before timing, every
kernel's output is compared with an fp64 oracle on two sequences (all heads): the error
relative to the oracle's largest magnitude must be within 2x that of the PyTorch reference on
the same bf16 inputs or 2^-7 (bf16 rounding of the probabilities); a row whose check fails is
reported and not timed.

The decode gate's per-token cost (`--gate-contexts` x `--gate-batches`, every layer of the
shape): per layer one launch of `DecodeGate.fused_select` (the last cache block's key features,
the query projection, scores of every block, top-k with sink and last block forced), timed
eagerly and replayed from one CUDA graph of all layers (what a deployment that graphs its decode
step does), against dense decode attention of all layers (each dense method above, eager and
graphed; each layer its own cache, so no layer reads another's from L2). Also timed: the gate
plus our sparse kernel on the gate's selection, all layers, graphed. `--gate-kinds gate,bounds`
adds the same rows for the training-free bounds step (`decode_bounds_select`: the last block's
key min / max, Quest scores of every block from the per-block bounds, the same top-k).

    PYTHONPATH=. python benchmarks/decode.py --json decode.json
    PYTHONPATH=. python benchmarks/decode.py --shape qwen2.5-coder-0.5b --flex --json q.json
Kernel rows are timed eagerly (one call from Python: includes the host's launch work where it
outlasts the GPU's) and replayed from a CUDA graph of one call ("ms, CUDA graph": the GPU's
time; not for compiled Flex). "ours-sparse-2launch" is our kernel with the merge of the splits
as a launch of its own (the default merges in the split launch). The gate table's K/V caches
are one per layer while all fit in 48 GiB, else shared in turn (each far larger than L2).
Times: triton.testing.do_bench medians (benchmarks/common.bench, CUDA events). Bytes moved by
dense decode: 2 * B * Hkv * M * D * 2 (K and V, bf16); "TB/s" is that over the time (sparse
rows: the bytes of the blocks read). On CPU (TRITON_INTERPRET=1, --device cpu) it runs as a dry
run: one wall-clock call per row, SDPA's math backend as the dense baseline, no graphs.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from adaptive_sparse.attention.decode import decode_reference, sparse_decode_attention
from adaptive_sparse.attention.triton.decode import triton_sparse_decode
from adaptive_sparse.io import atomic_write_json
from benchmarks.common import bench, environment, graph_bench

# Hq, Hkv, head_dim, layers
SHAPES = {"llama3-8b": (32, 8, 128, 32), "qwen2.5-coder-0.5b": (14, 2, 64, 24),
          "smollm2-135m": (9, 3, 64, 30)}


def dense_names(device) -> tuple[str, ...]:
    return ("cudnn", "flash") if torch.device(device).type == "cuda" else ("math",)


def sdpa_decode(q, k, v, scale, backend):
    """Dense decode through one SDPA backend: q [B, Hq, D] folded to [B, Hkv, G, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, Hq, _ = q.shape
    Hkv = k.shape[1]
    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "math": SDPBackend.MATH}[backend]
    with sdpa_kernel(which):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.view(B, Hkv, Hq // Hkv, -1), k, v, scale=scale)
    return o.reshape(B, Hq, -1)


def ours_dense(q, k, v, scale):
    return sparse_decode_attention(q, k, v, scale=scale, backend="triton")


def flex_decode_fn(block_size):
    """FlexAttention at q_len 1 (compiled on CUDA): run(q, k, v, scale, block_mask=None) over the
    whole cache, or over the blocks of a BlockMask (`BlockSparseMask.to_flex`)."""
    from torch.nn.attention.flex_attention import flex_attention

    from adaptive_sparse.attention.flex import kernel_options

    cuda = torch.cuda.is_available()
    fn = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention

    options = {"tiles": cuda}  # Flex's tile options for a 64-block mask, dropped if refused

    def run(q, k, v, scale, block_mask=None):
        if options["tiles"] and block_mask is not None:
            try:
                return fn(q[:, :, None], k, v, block_mask=block_mask, scale=scale,
                          enable_gqa=True, kernel_options=kernel_options(block_size))[:, :, 0]
            except Exception as e:  # noqa: BLE001 - a comparison only; retried without
                print(f"flex with kernel_options {kernel_options(block_size)} failed "
                      f"({type(e).__name__}: {str(e)[:200]}); retrying without", flush=True)
                options["tiles"] = False
        o = fn(q[:, :, None], k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
        return o[:, :, 0]
    return run


def flex_block_mask(num, idx, kb, M, bs, Hq):
    """The BlockMask (q_len 1, kv_len M, one row per query head) of a decode selection."""
    from adaptive_sparse.masks import BlockSparseMask

    B, Hkv = num.shape
    listed = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    dense = torch.zeros(B, Hkv, kb, dtype=torch.bool, device=idx.device)
    dense.scatter_(-1, idx.long(), listed)
    mask = BlockSparseMask.from_dense(dense[:, :, None], block_size=bs, q_len=1, kv_len=M)
    return mask.expand_heads(Hq).to_flex()


def random_selection(B, Hkv, kb, density, gen, device):
    """(kv_num_blocks [B, Hkv], kv_indices [B, Hkv, n]) ascending: block 0, the last block and
    random others, n = max(2, round(density * kb)) blocks per row."""
    n = max(2, min(kb, round(density * kb)))
    r = torch.rand(B, Hkv, kb, generator=gen, device=device)
    r[..., 0] = r[..., kb - 1] = 2.0  # forced: sink and the block of the new token
    idx = r.topk(n, dim=-1).indices.sort(-1).values.to(torch.int32)
    return torch.full((B, Hkv), n, dtype=torch.int32, device=device), idx.contiguous()


def oracle_error(out, q, k, v, num, idx, bs, scale, rows) -> tuple[float, float]:
    """(max abs error of `out` against the fp64 oracle over sequences `rows`, the same for the
    PyTorch reference on the bf16 inputs), both divided by the oracle's largest magnitude."""
    err = eager = peak = 0.0
    for b in rows:
        sl = slice(b, b + 1)
        tabs = (None, None) if num is None else (num[sl], idx[sl])
        seq = torch.full((1,), k.shape[2], dtype=torch.int32, device=q.device)
        ref, _ = decode_reference(q[sl].double(), k[sl].double(), v[sl].double(), seq, *tabs,
                                  block_size=bs, scale=scale)
        low, _ = decode_reference(q[sl], k[sl], v[sl], seq, *tabs, block_size=bs, scale=scale)
        err = max(err, float((out[sl].double() - ref).abs().max()))
        eager = max(eager, float((low.double() - ref).abs().max()))
        peak = max(peak, float(ref.abs().max()))
    return err / peak, eager / peak


def load_gates(path, shape, bs, device):
    """The decode gates timed by gate_step_cost: an artifact / save_decode_gates file (its
    shapes must be `shape`'s), else untrained ones (timing does not depend on the weights)."""
    from adaptive_sparse.gates.decode import DecodeGateConfig, DecodeGateSet

    Hq, Hkv, D, L = shape
    if path:
        from adaptive_sparse.export.decode import load_decode_gates_any
        gates = load_decode_gates_any(path)
        c = gates.config
        if (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.block_size) != \
                (L, Hq, Hkv, D, bs):
            raise SystemExit(f"--decode-gates: expected gates of {L} layers, {Hq}/{Hkv} heads, "
                             f"head_dim {D}, block {bs}; got {c.num_layers}, {c.num_heads}/"
                             f"{c.num_kv_heads}, {c.head_dim}, {c.block_size}")
    else:
        gates = DecodeGateSet(DecodeGateConfig(num_layers=L, num_heads=Hq, num_kv_heads=Hkv,
                                               head_dim=D, block_size=bs, init="random"))
    return gates.to(device).eval()


def check_fused_selection(scores, t, top_k) -> None:
    """A fused step's selection of one layer is a top-k of the eager scores [B, Hkv, Kb] (from
    the buffers the step completed): every kept block scores at least the best dropped one, up
    to float rounding; sink and last block kept."""
    scores = scores.float()
    kb = scores.shape[-1]
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(
        -1, t["idx"].long(), torch.arange(kb, device=scores.device) < t["num"][..., None])
    if not bool((t["num"] == top_k).all()) or not bool(kept[..., 0].all() & kept[..., -1].all()):
        raise RuntimeError(f"fused selection step: counts {t['num'].unique().tolist()} (expected "
                           f"{top_k}) or the sink / last block dropped")
    free = kept.clone()
    free[..., 0] = free[..., -1] = False
    low = scores.masked_fill(~free, float("inf")).amin(-1)
    high = scores.masked_fill(kept, float("-inf")).amax(-1)
    tol = 1e-3 * scores.abs().amax(-1).clamp_min(1.0)
    if not bool((low >= high - tol).all()):
        raise RuntimeError("fused selection step: a dropped block scores above a kept one")


def gate_step_cost(M, B, shape, bs, density, gates, gen, dev, log, kinds=("gate",),
                   cache_budget: int = 48 << 30) -> list[dict]:
    """Per-token selection work of every layer (one fused launch each; a row per kind: "gate"
    the decode gate's step, "bounds" the Quest-style bounds step) against dense decode of every
    layer, eager and from one CUDA graph; plus the selection + our sparse kernel, graphed."""
    from adaptive_sparse.attention.triton.decode_bounds import decode_bounds_select
    from adaptive_sparse.gates.decode import bounds_scores, token_budget_policy, uniform_top_k

    Hq, Hkv, D, L = shape
    kb = -(-M // bs)
    scale = D ** -0.5
    dtype = torch.bfloat16 if torch.device(dev).type == "cuda" else torch.float32
    top_k = uniform_top_k(token_budget_policy(round(density * M), bs), kv_len=M, block_size=bs)
    gd = gates.config.gate_dim
    # every layer its own query, key features and tables; its own K/V cache while all layers'
    # fit in `cache_budget` bytes, else layers take turns over as many caches as fit (each
    # then many times L2's size, so no layer finds another's cache in L2)
    kv_bytes = 2 * B * Hkv * M * D * torch.empty((), dtype=dtype).element_size()
    distinct = max(1, min(L, cache_budget // kv_bytes))
    caches = [(torch.randn(B, Hkv, M, D, device=dev, dtype=dtype, generator=gen),
               torch.randn(B, Hkv, M, D, device=dev, dtype=dtype, generator=gen))
              for _ in range(distinct)]
    layers = []
    for i in range(L):
        bounds = torch.randn(2, B, Hkv, kb, D, device=dev, dtype=dtype, generator=gen)
        layers.append({
            "kmin": bounds.amin(0), "kmax": bounds.amax(0),
            "q": torch.randn(B, Hq, D, device=dev, dtype=dtype, generator=gen),
            "k": caches[i % distinct][0], "v": caches[i % distinct][1],
            "kg": torch.randn(B, Hkv, kb, gd, device=dev, generator=gen),
            "num": torch.full((B, Hkv), -1, dtype=torch.int32, device=dev),
            "idx": torch.full((B, Hkv, kb), -1, dtype=torch.int32, device=dev),
            "out": torch.empty(B, Hq, D, device=dev, dtype=dtype)})

    def select(kind, g, t):
        if kind == "gate":
            g.fused_select(t["q"], t["k"], t["kg"], top_k=top_k, out=(t["num"], t["idx"]))
        else:
            decode_bounds_select(t["q"], t["k"], t["kmin"], t["kmax"], top_k=top_k,
                                 block_size=bs, out=(t["num"], t["idx"]))

    def gate_step(kind):
        for g, t in zip(gates, layers):
            select(kind, g, t)

    def gate_and_sparse(kind):
        for g, t in zip(gates, layers):
            select(kind, g, t)
            sparse_decode_attention(t["q"], t["k"], t["v"], kv_num_blocks=t["num"],
                                    kv_indices=t["idx"], block_size=bs, scale=scale,
                                    backend="triton", out=t["out"], blocks_per_row=top_k)

    base = {"context": M, "batch": B, "layers": L, "hq": Hq, "hkv": Hkv, "head_dim": D,
            "block_size": bs, "density": top_k / kb, "top_k": top_k, "kv_caches": distinct}
    rows = []
    for kind in kinds:
        gate_step(kind)
        t = layers[0]
        with torch.no_grad():
            q = t["q"][:, :, None]
            scores = gates[0].scores(q, t["kg"]) if kind == "gate" else \
                bounds_scores(q, t["kmin"], t["kmax"], scale=scale)
        check_fused_selection(scores[:, :, 0], t, top_k)
        rows.append({"kind": kind, **base, "gate_ms": bench(lambda: gate_step(kind)),
                     "gate_graph_ms": graph_bench(lambda: gate_step(kind))})
    dense = {}
    for name in dense_names(dev) + ("ours-dense",):
        def step(name=name):
            for t in layers:
                if name == "ours-dense":
                    ours_dense(t["q"], t["k"], t["v"], scale)
                else:
                    sdpa_decode(t["q"], t["k"], t["v"], scale, name)
        try:
            step()
        except RuntimeError as e:
            log(f"dense {name} refused B={B} M={M}: {str(e).splitlines()[0]}")
            continue
        dense[name] = {"eager_ms": bench(step), "graph_ms": graph_bench(step)}
    best = min(((f"{n} {kind[:-3]}", ms) for n, d in dense.items() for kind, ms in d.items()
                if ms is not None), key=lambda x: x[1])
    for row in rows:
        row["dense"] = dense
        row["best_dense"], row["best_dense_ms"] = best
        row["gate_sparse_graph_ms"] = graph_bench(lambda: gate_and_sparse(row["kind"]))
        gate_ms = row["gate_graph_ms"] if row["gate_graph_ms"] is not None else row["gate_ms"]
        row["gate_share_of_dense"] = gate_ms / best[1]
        row["gate_timing"] = "graph" if row["gate_graph_ms"] is not None else "eager"
    del layers, caches
    return rows


def run(args, log, save=lambda rows, gates: None) -> tuple[list[dict], list[dict]]:
    dev = args.device
    cuda = torch.device(dev).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    HQ, HKV, D, _ = SHAPES[args.shape]
    gen = torch.Generator(device=dev).manual_seed(0)
    scale = D ** -0.5
    rows, gates = [], []
    fx = flex_decode_fn(args.block_size) if args.flex else None
    for M in args.contexts:
        for B in args.batches:
            bs = args.block_size
            kb = -(-M // bs)
            q = torch.randn(B, HQ, D, device=dev, dtype=dtype, generator=gen)
            k = torch.randn(B, HKV, M, D, device=dev, dtype=dtype, generator=gen)
            v = torch.randn(B, HKV, M, D, device=dev, dtype=dtype, generator=gen)
            check = sorted({0, B - 1})
            dense_bytes = 2 * B * HKV * M * D * k.element_size()
            base = {"context": M, "batch": B, "hq": HQ, "hkv": HKV, "head_dim": D,
                    "block_size": bs, "dtype": str(dtype).replace("torch.", "")}
            dense, dense_graph = {}, {}
            for name in dense_names(dev):
                try:
                    out = sdpa_decode(q, k, v, scale, name)
                except RuntimeError as e:
                    log(f"SDPA {name} refused B={B} M={M}: {str(e).splitlines()[0]}")
                    continue
                err, eager = oracle_error(out, q, k, v, None, None, bs, scale, check)
                dense[name] = bench(lambda name=name: sdpa_decode(q, k, v, scale, name))
                graph = graph_bench(lambda name=name: sdpa_decode(q, k, v, scale, name))
                if graph is not None:
                    dense_graph[name] = graph
                rows.append({**base, "method": f"sdpa-{name}", "density": 1.0,
                             "ms": dense[name], "graph_ms": graph, "max_err": err,
                             "eager_err": eager, "tb_per_s": dense_bytes / dense[name] / 1e9})
            best_name, best_ms = min(dense.items(), key=lambda kv: kv[1])
            best_graph = min(dense_graph.items(), key=lambda kv: kv[1]) if dense_graph \
                else (None, None)
            out = torch.full_like(q, float("nan"))
            cases = [("ours-dense", 1.0, None, None)]
            if fx is not None:
                cases.append(("flex-dense", 1.0, None, None))
            for dens in args.densities:
                num, idx = random_selection(B, HKV, kb, dens, gen, dev)
                cases.append(("ours-sparse", float(num[0, 0]) / kb, num, idx))
                cases.append(("ours-sparse-2launch", float(num[0, 0]) / kb, num, idx))
                if fx is not None:
                    cases.append(("flex-sparse", float(num[0, 0]) / kb, num, idx))
            for method, dens, num, idx in cases:
                try:
                    if method.startswith("flex"):
                        bm = None if num is None else flex_block_mask(num, idx, kb, M, bs, HQ)

                        def call(bm=bm):
                            return out.copy_(fx(q, k, v, scale, bm))
                    elif method.endswith("2launch"):  # the merge as a launch of its own
                        def call(num=num, idx=idx):
                            return triton_sparse_decode(q, k, v, None, num, idx, block_size=bs,
                                                        scale=scale, out=out, merge="separate")
                    else:
                        def call(num=num, idx=idx):
                            return sparse_decode_attention(
                                q, k, v, kv_num_blocks=num, kv_indices=idx, block_size=bs,
                                backend="triton", out=out)
                    out.fill_(float("nan"))
                    call()
                except Exception as e:  # Flex is a comparison only: report and go on
                    if not method.startswith("flex"):
                        raise
                    log(f"{method} failed B={B} M={M}: {type(e).__name__}: {str(e)[:300]}")
                    continue
                err, eager = oracle_error(out, q, k, v, num, idx, bs, scale, check)
                ok = err <= max(2 * eager, 2 ** -7) and not bool(torch.isnan(out).any())
                row = {**base, "method": method, "density": dens, "max_err": err,
                       "eager_err": eager, "correct": ok, "best_dense": best_name,
                       "best_dense_ms": best_ms, "best_dense_graph": best_graph[0],
                       "best_dense_graph_ms": best_graph[1]}
                if ok:
                    # compiled Flex is timed eagerly only (a failed capture of an inductor
                    # graph could poison the rest of the run)
                    ms = bench(call)
                    graph = None if method.startswith("flex") else graph_bench(call)
                    row.update(ms=ms, speedup_vs_best_dense=best_ms / ms,
                               bound=1.0 / dens, tb_per_s=dense_bytes * dens / ms / 1e9,
                               graph_ms=graph)
                    if graph is not None and best_graph[1] is not None:
                        row["graph_speedup_vs_best_dense_graph"] = best_graph[1] / graph
                else:
                    log(f"CORRECTNESS FAILED {method} B={B} M={M} density={dens:.3f}: "
                        f"err {err:.3g} vs eager {eager:.3g}; not timed")
                rows.append(row)
                log(" ".join(f"{key}={val:.4g}" if isinstance(val, float) else f"{key}={val}"
                             for key, val in row.items() if key not in base or key == "batch"))
            del q, k, v, out
            if cuda:
                torch.cuda.empty_cache()
            save(rows, gates)  # what is measured so far survives a time limit
    if args.gate_contexts and args.gate_batches:
        shape = SHAPES[args.shape][:3] + (args.layers or SHAPES[args.shape][3],)
        gate_set = load_gates(args.decode_gates, shape, args.block_size, dev)
        for M in args.gate_contexts:
            for B in args.gate_batches:
                for g in gate_step_cost(M, B, shape, args.block_size, args.gate_density,
                                        gate_set, gen, dev, log, kinds=args.gate_kinds):
                    gates.append(g)
                    log(f"{g['kind']} B={B} M={M}, {g['layers']} layers: eager "
                        f"{g['gate_ms']:.4f} ms, graph {g['gate_graph_ms']} ms; best dense "
                        f"{g['best_dense']} {g['best_dense_ms']:.4f} ms; share "
                        f"{g['gate_share_of_dense']:.3f}")
                if cuda:
                    torch.cuda.empty_cache()
                save(rows, gates)
    return rows, gates


def _ms(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def table(env, rows, gates, shape) -> str:
    HQ, HKV, D, _ = SHAPES[shape]
    bs = (rows or gates)[0]["block_size"] if rows or gates else "-"
    lines = [f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {shape}: "
             f"Hq {HQ} / Hkv {HKV}, D {D}, block {bs}",
             "| context | batch | method | density | ms | ms, CUDA graph | TB/s | speedup vs "
             "best dense | speedup, graphs | 1/density | rel. err (reference) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = f"{r['ms']:.4f}" if "ms" in r else "FAILED"
        sp = f"{r['speedup_vs_best_dense']:.2f}x" if "speedup_vs_best_dense" in r else "-"
        gsp = r.get("graph_speedup_vs_best_dense_graph")
        gsp = "-" if gsp is None else f"{gsp:.2f}x"
        bound = f"{r['bound']:.1f}" if "bound" in r else "-"
        tb = f"{r['tb_per_s']:.2f}" if "tb_per_s" in r else "-"
        lines.append(f"| {r['context']} | {r['batch']} | {r['method']} | {r['density']:.3f} | "
                     f"{ms} | {_ms(r.get('graph_ms'))} | {tb} | {sp} | {gsp} | {bound} | "
                     f"{r['max_err']:.2e} ({r['eager_err']:.2e}) |")
    if gates:
        names = sorted({n for g in gates for n in g["dense"]})
        lines += ["", f"Decode gate per token, all {gates[0]['layers']} layers (one fused "
                  "launch per layer) vs "
                  "dense decode attention of all layers; ms (eager / CUDA graph):", "",
                  "| step | context | batch | density | gate eager | gate graph | "
                  + " | ".join(f"{n} eager / graph" for n in names)
                  + " | best dense | gate / best dense | gate + sparse, graph |",
                  "|---|---|---|---|---|---|" + "---|" * len(names) + "---|---|---|"]
        for g in gates:
            cells = [f"{_ms(g['dense'][n]['eager_ms'])} / {_ms(g['dense'][n]['graph_ms'])}"
                     if n in g["dense"] else "-" for n in names]
            lines.append(f"| {g['kind']} | {g['context']} | {g['batch']} | {g['density']:.3f} | "
                         f"{_ms(g['gate_ms'])} | {_ms(g['gate_graph_ms'])} | "
                         + " | ".join(cells)
                         + f" | {g['best_dense']} {g['best_dense_ms']:.4f} | "
                         f"{100 * g['gate_share_of_dense']:.1f}% ({g['gate_timing']}) | "
                         f"{_ms(g['gate_sparse_graph_ms'])} |")
    return "\n".join(lines)


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def _floats(text):
    return [float(x) for x in text.split(",") if x]


def _kinds(text):
    kinds = tuple(x for x in text.split(",") if x)
    if not kinds or set(kinds) - {"gate", "bounds"}:
        raise argparse.ArgumentTypeError(f"expected gate and / or bounds, got {text!r}")
    return kinds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b",
                   help="attention shapes (heads, head_dim, layers) (default %(default)s)")
    p.add_argument("--contexts", type=_ints, default=[32768, 131072])
    p.add_argument("--batches", type=_ints, default=[1, 8, 16, 32])
    p.add_argument("--densities", type=_floats, default=[0.05, 0.1, 0.2, 0.3])
    p.add_argument("--block-size", type=int, choices=(64, 128), default=64)
    p.add_argument("--gate-contexts", type=_ints, default=[32768],
                   help="contexts at which the decode gate's per-token cost is timed ('' none)")
    p.add_argument("--gate-batches", type=_ints, default=[1, 16],
                   help="batches of the gate timing (default 1,16)")
    p.add_argument("--gate-density", type=float, default=0.1,
                   help="token budget of the timed gate, a share of the context")
    p.add_argument("--gate-kinds", type=_kinds, default=("gate",),
                   help="selection steps timed per token: gate (the decode gate's fused step), "
                        "bounds (the Quest-style bounds step), comma-separated (default gate)")
    p.add_argument("--layers", type=int, default=None,
                   help="layers of the gate timing (default: the shape's)")
    p.add_argument("--decode-gates", default=None,
                   help="decode gates to time (artifact or save_decode_gates file; default: "
                        "untrained gates of the shape)")
    p.add_argument("--flex", action="store_true",
                   help="also time FlexAttention (compiled on CUDA): dense and on each sparse "
                        "selection")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run under "
                   "TRITON_INTERPRET=1")
    p.add_argument("--json", default=None, help="write the rows and the environment here")
    p.add_argument("--md", default=None, help="write the markdown tables here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/decode.py: needs CUDA (or --device cpu with TRITON_INTERPRET=1)",
              file=sys.stderr)
        return 2

    def log(msg):
        print(msg, flush=True)

    env = environment()
    log(json.dumps(env))

    def save(rows, gates):
        text = table(env, rows, gates, args.shape)
        if args.json:
            atomic_write_json(args.json, {"environment": env, "args": vars(args), "rows": rows,
                                          "gates": gates, "table": text})
        if args.md:
            from adaptive_sparse.io import atomic_write_text
            atomic_write_text(args.md, text + "\n")

    rows, gates = run(args, log, save)
    print(table(env, rows, gates, args.shape))
    save(rows, gates)
    failed = [r for r in rows if r.get("correct") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
