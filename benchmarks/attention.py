"""Block-sparse attention on the GPU: ours (Triton, bf16 and the opt-in FP8) vs compiled
FlexAttention given the same blocks vs the dense SDPA backends (cuDNN, flash), same masks.

Every timed kernel is checked first against an fp64 oracle on sampled query blocks and heads;
a bf16 config whose check fails gets no speedup. Useful FLOPs = 4 * D * Hq * B * (query/key
pairs that the mask keeps and causality allows); dense SDPA is credited with the dense causal
pairs. Every "x dense" divides the time of the fastest dense backend timed in the same run
(named in the table) by ours. One table per shape (head_dim 128, 64, 256).
`--exp2-poly 0,0.125,0.25,0.5` times, instead of that table, each fraction of the exponentials
computed on the FMA pipes (issue 14) side by side, bf16 and FP8, dense kernel and mask path.

    python3 benchmarks/attention.py --json out.json --md out.md [--seqlens 8192,32768 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from adaptive_sparse.attention.flex import kernel_options
from adaptive_sparse.attention.triton import (block_attention_maps_triton,
                                              scores_to_kv_indices,
                                              triton_block_sparse_attention,
                                              triton_dense_causal_attention)
from adaptive_sparse.attention.triton.forward import bsa_fwd_autotuned, exp2_poly, exp2_poly_code
from adaptive_sparse.attention.triton.forward_fp8 import (DEFAULT_PV_ACCUMULATE,
                                                          DEFAULT_QK_FORMAT, DEFAULT_QUANTIZE,
                                                          PV_ACCUMULATE,
                                                          bsa_fwd_fp8_autotuned,
                                                          fp8_block_sparse_attention,
                                                          fp8_defaults)
from adaptive_sparse.attention.triton.quantize import quantize_qkv
from adaptive_sparse.io import atomic_write_text
from adaptive_sparse.masks import BlockSparseMask, diagonal_blocks
from benchmarks.common import (SHAPES, bench, best_dense, dense_baselines, environment, floats,
                               fmt, graph_bench, oracle_rows, pair_table, random_mask, rel_err,
                               sdpa_dense)

GRAPH_MAX_N = 16384  # CUDA-graph replays only where host cost can matter


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


def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() \
        else flex_attention


FP8_DEFAULT = {"qk_format": DEFAULT_QK_FORMAT, "quantize": DEFAULT_QUANTIZE,
               "pv_accumulate": DEFAULT_PV_ACCUMULATE}
# FP8 paths compared in the accuracy table and timed at density 1.0 next to the chosen one:
# Q.K^T format / quantization / P @ V accumulation; "e4m3/torch/chain" is the previous path
FP8_VARIANTS = tuple(dict(zip(("qk_format", "quantize", "pv_accumulate"), v)) for v in (
    ("int8", "fused", "tile"), ("int8", "fused", "chain"), ("e4m3", "fused", "tile"),
    ("e4m3", "torch", "chain")))


def fp8_label(fp8: dict) -> str:
    return f"{fp8['qk_format']}/{fp8['quantize']}/{fp8['pv_accumulate']}"


def run_case(shape, n, bs, densities, gen, flex_fn, log, masks=None,
             fp8: dict | None = FP8_DEFAULT, fp8_variants=()) -> list[dict]:
    """Dense kernels (ours bf16 / fp8 vs SDPA), then one row per mask: random masks at
    `densities`, or the given `masks` [(label, BlockSparseMask)] (e.g. a trained gate's
    per-layer masks) instead. `fp8`: None (no FP8 columns) or the FP8 options
    {"qk_format", "quantize", "pv_accumulate"}; FP8 times include the quantization, timed
    alone too; with `fp8_variants`, the dense-kernel row also times those other FP8 paths."""
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
    dense_flops = 4 * D * Hq * int(table.sum())
    graphs = n <= GRAPH_MAX_N
    full = BlockSparseMask.full(1, 1, block_size=bs, q_len=n, kv_len=n, device=dev)
    ref, rows = oracle_rows(q, k, v, full, scale, heads, qblocks)
    sdpa_ms = dense_baselines(q, k, v, scale)
    sdpa_err = {name: rel_err(sdpa_dense(q, k, v, scale, name)[0, heads][:, rows], ref)
                for name in sdpa_ms}
    dense_name, dense_ms = best_dense(sdpa_ms)
    base = dict(shape=shape, Hq=Hq, Hkv=Hkv, D=D, N=n, block_size=bs,
                sdpa_ms=sdpa_ms, sdpa_err=sdpa_err, best_dense=dense_name,
                best_dense_ms=dense_ms, best_dense_tflops=dense_flops / dense_ms / 1e9)
    err_floor = min(sdpa_err.values())
    rows_out = []

    quant_ms = bench(lambda: quantize_qkv(q, k, v, bs, **_quant_args(fp8))) if fp8 else None

    def add_fp8(row, call, flops, ref_rows, reference_ms):
        if not fp8:
            return
        out = call()
        row["err_fp8"] = rel_err(out[0, heads][:, rows], ref_rows)
        del out
        row["fp8_ms"] = bench(call)
        row["fp8_quant_ms"] = quant_ms
        row["fp8_path"] = dict(fp8)
        row["fp8_tflops"] = flops / row["fp8_ms"] / 1e9
        row["fp8_speedup_vs_bf16"] = reference_ms / row["fp8_ms"]

    out = triton_dense_causal_attention(q, k, v, scale, block_size=bs)
    err_dense = rel_err(out[0, heads][:, rows], ref)
    del out
    ok_dense = err_dense < 1e-2 and err_dense <= 2 * err_floor + 1e-3
    ours_dense_ms = bench(lambda: triton_dense_causal_attention(q, k, v, scale, block_size=bs))
    row = {**base, "provider": "ours-dense-kernel", "density": 1.0, "ms": ours_dense_ms,
           "tflops": dense_flops / ours_dense_ms / 1e9, "err": err_dense, "ok": ok_dense,
           "speedup_vs_dense": dense_ms / ours_dense_ms if ok_dense else None}
    if bs == 128:
        add_fp8(row, lambda: fp8_block_sparse_attention(q, k, v, None, scale, **_fp8_kw(fp8)),
                dense_flops, ref, ours_dense_ms)
        if fp8 and fp8_variants:
            row["fp8_quant_ms_torch"] = bench(
                lambda: quantize_qkv(q, k, v, bs, qk_format="e4m3", method="torch"))
        for var in (fp8_variants if fp8 else ()):
            if _fp8_kw(var) != _fp8_kw(fp8):
                row.setdefault("fp8_variants_ms", {})[fp8_label(var)] = _try_bench(
                    lambda: fp8_block_sparse_attention(q, k, v, None, scale, **_fp8_kw(var)))
    rows_out.append(row)
    log(row)
    cases = masks if masks is not None else \
        ((dens, random_mask(Hkv, n, bs, dens, gen, dev)) for dens in densities)
    for dens, mask in cases:
        mask = mask.to(dev)
        pairs = int((mask.to_dense()[0].long() * table).sum()) * (Hq // mask.heads)
        flops = 4 * D * pairs
        ref_m, rows_m = oracle_rows(q, k, v, mask, scale, heads, qblocks)
        assert torch.equal(rows_m, rows)
        out = triton_block_sparse_attention(q, k, v, mask, scale)
        err = rel_err(out[0, heads][:, rows], ref_m)
        del out
        row = {**base, "provider": "ours", "density": mask.density(), "target_density": dens,
               "mask_heads": mask.heads, "err": err}
        ours = lambda: triton_block_sparse_attention(q, k, v, mask, scale)  # noqa: E731
        row["ms"] = bench(ours)
        row["tflops"] = flops / row["ms"] / 1e9
        row["graph_ms"] = graph_bench(ours) if graphs else None
        add_fp8(row, lambda: fp8_block_sparse_attention(q, k, v, mask, scale, **_fp8_kw(fp8)),
                flops, ref_m, row["ms"])
        if flex_fn is not None:
            bm = flex_block_mask(mask, Hq)
            kopt = kernel_options(bs) if torch.cuda.is_available() else None
            flex = lambda: flex_fn(q, k, v, block_mask=bm, scale=scale,  # noqa: E731
                                   kernel_options=kopt, enable_gqa=Hq != Hkv)
            fl = flex()
            row["err_flex"] = rel_err(fl[0, heads][:, rows], ref_m)
            del fl
            row["flex_ms"] = bench(flex)
            row["flex_tflops"] = flops / row["flex_ms"] / 1e9
            row["flex_graph_ms"] = graph_bench(flex) if graphs else None
            del bm
        row["ok"] = err < 1e-2 and err <= 2 * min(err_floor, row.get("err_flex", 1.0)) + 1e-3
        ok = row["ok"]
        row["speedup_vs_dense"] = dense_ms / row["ms"] if ok else None
        row["speedup_vs_flex"] = row["flex_ms"] / row["ms"] if ok and "flex_ms" in row else None
        row["graph_speedup_vs_flex"] = row["flex_graph_ms"] / row["graph_ms"] \
            if ok and row.get("flex_graph_ms") and row.get("graph_ms") else None
        rows_out.append(row)
        log(row)
    return rows_out


def picked_config(autotuned) -> dict | None:
    """The config `autotuned` ran last (pinned form: kwargs + num_warps, num_stages); None off
    CUDA, where the forwards use their fixed interpreter config."""
    c = getattr(autotuned, "best_config", None) if torch.cuda.is_available() else None
    return None if c is None else {**c.kwargs, "num_warps": c.num_warps,
                                   "num_stages": c.num_stages}


def exp2_case(shape, n, bs, densities, fractions, gen, log, fp8: dict | None = FP8_DEFAULT
              ) -> list[dict]:
    """Each fraction of exp2 on the FMA pipes (`exp2_poly`) side by side, bf16 and FP8
    (quantization included): the dense kernel, then random masks (one per KV group) at
    `densities`, next to SDPA cuDNN and flash on the same inputs. Every variant runs the config
    the autotuner picked for the dense kernel with every exponential on MUFU (pinned: an A/B
    of the exponential alone, one compile per variant) and is checked against fp64 on sampled
    rows. One row per (kernel, density, fraction)."""
    Hq, Hkv, D = SHAPES[shape]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q, k, v = (torch.randn(1, h, n, D, generator=gen, device=dev).to(dt) for h in (Hq, Hkv, Hkv))
    scale = 1 / math.sqrt(D)
    qb = -(-n // bs)
    qblocks = sorted({qb - 1, qb // 2, int(torch.randint(qb, (1,), generator=gen, device=dev))})
    heads = sorted({0, Hq - 1, int(torch.randint(Hq, (1,), generator=gen, device=dev))})
    table = pair_table(n, n, bs, dev)
    full = BlockSparseMask.full(1, 1, block_size=bs, q_len=n, kv_len=n, device=dev)
    ref, rows = oracle_rows(q, k, v, full, scale, heads, qblocks)
    sdpa_ms = dense_baselines(q, k, v, scale)
    sdpa_err = {name: rel_err(sdpa_dense(q, k, v, scale, name)[0, heads][:, rows], ref)
                for name in sdpa_ms}
    dense_flops = 4 * D * Hq * int(table.sum())
    dense_name, dense_ms = best_dense(sdpa_ms)
    base = dict(kind="exp2_poly", shape=shape, Hq=Hq, Hkv=Hkv, D=D, N=n, block_size=bs,
                sdpa_ms=sdpa_ms, sdpa_err=sdpa_err, best_dense=dense_name,
                best_dense_ms=dense_ms, best_dense_tflops=dense_flops / dense_ms / 1e9)
    err_floor = min(sdpa_err.values())
    fp8_kw = _fp8_kw(fp8)
    triton_dense_causal_attention(q, k, v, scale, block_size=bs)  # autotunes (all MUFU)
    cfg = picked_config(bsa_fwd_autotuned)
    cfg8 = None
    if fp8 and bs == 128:
        fp8_block_sparse_attention(q, k, v, None, scale, **fp8_kw)
        cfg8 = picked_config(bsa_fwd_fp8_autotuned)
    kernels = [("bf16", "dense kernel", ref, dense_flops,
                lambda: triton_dense_causal_attention(q, k, v, scale, block_size=bs,
                                                      config=cfg), cfg)]
    if fp8 and bs == 128:
        kernels.append(("fp8", "dense kernel", ref, dense_flops,
                        lambda: fp8_block_sparse_attention(q, k, v, None, scale, config=cfg8,
                                                           **fp8_kw), cfg8))
    for dens in densities:
        mask = random_mask(Hkv, n, bs, dens, gen, dev)
        flops = 4 * D * int((mask.to_dense()[0].long() * table).sum()) * (Hq // mask.heads)
        ref_m, _ = oracle_rows(q, k, v, mask, scale, heads, qblocks)
        kernels.append(("bf16", mask.density(), ref_m, flops,
                        lambda m=mask: triton_block_sparse_attention(q, k, v, m, scale,
                                                                     config=cfg), cfg))
        if fp8:
            kernels.append(("fp8", mask.density(), ref_m, flops,
                            lambda m=mask: fp8_block_sparse_attention(q, k, v, m, scale,
                                                                      config=cfg8, **fp8_kw),
                            cfg8))
    out_rows = []
    for precision, density, ref_k, flops, call, config in kernels:
        for frac in fractions:
            row = {**base, "precision": precision, "density": density, "fraction": frac,
                   "config": config, "fp8_path": dict(fp8) if precision == "fp8" else None}
            try:
                with exp2_poly(frac):
                    out = call()
                    row["err"] = rel_err(out[0, heads][:, rows], ref_k)
                    del out
                    row["ms"] = bench(call)
                row["tflops"] = flops / row["ms"] / 1e9
                row["x_dense"] = dense_ms / row["ms"]
                row["ok"] = (row["err"] < 1e-2 and row["err"] <= 2 * err_floor + 1e-3) \
                    if precision == "bf16" else row["err"] < 1e-1
            except Exception as e:  # noqa: BLE001  (a variant that does not compile is reported)
                row["failed"] = f"{e!r:.200}"
            out_rows.append(row)
            log(row)
        timed = [r for r in out_rows[-len(fractions):] if "ms" in r]
        mufu = next((r["ms"] for r in timed if r["fraction"] == 0), None)
        for r in timed:
            r["x_mufu"] = mufu / r["ms"] if mufu else None
    return out_rows


def exp2_table(env, rows) -> list[str]:
    """The `exp2_case` rows: one table, per shape the SDPA baselines of the same run."""
    lines = ["Exponentials on the FMA pipes (issue 14): `fraction` of each score tile's exp2 by "
             "a polynomial (Cody-Waite + minimax, degree 3 for bf16 P, 2 for e4m3 P), the rest "
             "on MUFU. Every variant runs the config the autotuner picked for the all-MUFU "
             "dense kernel (pinned). x MUFU = ms at fraction 0 / ms; x dense = fastest dense "
             "SDPA of the same run / ms; FP8 times include quantizing Q, K, V; error vs fp64 on "
             "sampled rows.", ""] + env_lines(env) + [""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == shape]
        r0 = rs[0]
        flops = r0["best_dense_tflops"] * r0["best_dense_ms"]  # dense causal FLOP / 1e9
        fp8_cfg = next((r["config"] for r in rs if r["precision"] == "fp8"), None)
        lines += [f"{shape} (Hq {r0['Hq']}, Hkv {r0['Hkv']}, head_dim {r0['D']}, N {r0['N']}): "
                  + ", ".join(f"SDPA-{k} {ms:.3f} ms ({flops / ms:.0f} TFLOP/s, err "
                              f"{r0['sdpa_err'][k]:.1e})"
                              for k, ms in sorted(r0["sdpa_ms"].items()))
                  + f"; pinned configs bf16 {r0['config']}, FP8 {fp8_cfg}", "",
                  "| precision | density | fraction | ms | TFLOP/s | x MUFU | x dense | err | ok |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            dens = "1.0 (dense kernel)" if r["density"] == "dense kernel" \
                else format(r["density"], ".3f")
            if "failed" in r:
                lines.append(f"| {r['precision']} | {dens} | {r['fraction']} | failed: "
                             f"{r['failed']} | | | | | |")
                continue
            lines.append(f"| {r['precision']} | {dens} | {r['fraction']} | {r['ms']:.3f} | "
                         f"{r['tflops']:.0f} | {fmt(r.get('x_mufu'), '.3f')} | "
                         f"{r['x_dense']:.2f} | {r['err']:.1e} | {'yes' if r['ok'] else 'NO'} |")
        lines.append("")
    return lines


def _quant_args(fp8: dict) -> dict:
    return {"qk_format": fp8["qk_format"], "method": fp8["quantize"]}


def _fp8_kw(fp8: dict | None) -> dict:
    return {} if not fp8 else {k: fp8[k] for k in ("qk_format", "quantize", "pv_accumulate")}


def _try_bench(call) -> float | str:
    """bench(call), or the error (cut) of a path that fails on this device."""
    try:
        return bench(call)
    except Exception as e:  # noqa: BLE001  (an FP8 variant that does not compile is reported)
        return f"failed: {e!r:.200}"


def fp8_inputs(shape, n, gen, dev, outliers: bool):
    """bf16 q, k, v of `shape` at length n: random normal, or with the outliers of trained
    models (a channel-wise bias on K, a few channels 4x larger in K and 3x in Q, a V offset)."""
    Hq, Hkv, D = SHAPES[shape]
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q, k, v = (torch.randn(1, h, n, D, generator=gen, device=dev) for h in (Hq, Hkv, Hkv))
    if outliers:
        ch = torch.randperm(D, generator=gen, device=dev)[:max(1, D // 16)]
        k = k + 1.5 * torch.randn(D, generator=gen, device=dev)
        k[..., ch] = 4 * k[..., ch] + 8 * torch.randn(len(ch), generator=gen, device=dev)
        q[..., ch] *= 3
        v[..., :2] += 5
    return q.to(dt), k.to(dt), v.to(dt)


def fp8_accuracy(shape, n, gen, log) -> list[dict]:
    """Error vs fp64 (sampled rows, dense causal) of the bf16 kernel and of each FP8 variant,
    on random inputs and on inputs with outliers; variants that fail record the error. FP8
    runs one pinned config on CUDA (the first the autotuner admits)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    Hq, Hkv, D = SHAPES[shape]
    bs, scale = 128, 1 / math.sqrt(D)
    qb = -(-n // bs)
    heads = sorted({0, Hq // 2, Hq - 1})
    cfg = None
    if dev == "cuda":
        from adaptive_sparse.attention.triton.forward_fp8 import autotune_configs, keep
        c = next(c for c in autotune_configs()
                 if keep(c, {"BS": bs, "HEAD_DIM": D, "G": Hq // Hkv, "SHARED": True}))
        cfg = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
    out_rows = []
    for outliers in (False, True):
        q, k, v = fp8_inputs(shape, n, gen, dev, outliers)
        full = BlockSparseMask.full(1, 1, block_size=bs, q_len=n, kv_len=n, device=dev)
        ref, rows = oracle_rows(q, k, v, full, scale, heads, sorted({0, qb // 2, qb - 1}))
        row = dict(kind="fp8_accuracy", shape=shape, N=n, D=D,
                   inputs="outliers" if outliers else "random",
                   err_bf16=rel_err(triton_dense_causal_attention(q, k, v, scale)[0, heads]
                                    [:, rows], ref), err_fp8={})
        for var in FP8_VARIANTS:
            try:  # one pinned config (the error does not depend on it; no autotune compiles)
                out = fp8_block_sparse_attention(q, k, v, None, scale, config=cfg,
                                                 **_fp8_kw(var))
                row["err_fp8"][fp8_label(var)] = rel_err(out[0, heads][:, rows], ref)
            except Exception as e:  # noqa: BLE001  (a variant that does not compile is reported)
                row["err_fp8"][fp8_label(var)] = f"failed: {e!r:.200}"
        log(row)
        out_rows.append(row)
    return out_rows


def fp8_perplexity(model_name: str, seqlens, docs: int, corpus: str, log) -> list[dict]:
    """Perplexity of a real model (`load_model` preset) on `docs` validation sequences of each
    length: SDPA (cuDNN on CUDA), our bf16 kernel (dense), and our kernel under every FP8 path
    (dense, block 64 as the prefill table); the change is against SDPA."""
    from adaptive_sparse.models import sparse_attention
    from benchmarks.e2e import dense_contexts, load_real, perplexity

    cuda = torch.cuda.is_available()
    model, data = load_real(model_name, "cuda" if cuda else "cpu", corpus, seqlens, docs)
    out = []
    for n in seqlens:
        seqs = data[n][1]
        base = perplexity(model, seqs, dense_contexts(cuda)[0][1])

        def ours(precision):
            return lambda: sparse_attention(model, None, block_size=64, backend="triton",
                                            precision=precision)

        configs = [("ours bf16", ours("input"), {})] + [
            (f"fp8 {fp8_label(v)}", ours("fp8"), _fp8_kw(v)) for v in FP8_VARIANTS]
        for name, ctx, kw in configs:
            try:
                with fp8_defaults(**kw):
                    ppl = perplexity(model, seqs, ctx)
                row = dict(kind="fp8_ppl", model=model_name, N=n, docs=int(seqs.shape[0]),
                           config=name, ppl=ppl, sdpa_ppl=base, ppl_change=ppl / base - 1)
            except Exception as e:  # noqa: BLE001  (a path that fails is reported)
                row = dict(kind="fp8_ppl", model=model_name, N=n, config=name,
                           failed=f"{e!r:.200}")
            log(row)
            out.append(row)
    return out


def fp8_ppl_lines(rows) -> list[str]:
    lines = ["Perplexity of a real model, dense causal attention, block 64: change vs SDPA "
             "(first dense backend) on the same validation sequences:", "",
             "| model | N | docs | config | perplexity | change vs SDPA |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['model']} | {r['N']} | - | {r['config']} | {r['failed']} | - |")
        else:
            lines.append(f"| {r['model']} | {r['N']} | {r['docs']} | {r['config']} | "
                         f"{r['ppl']:.4f} | {100 * r['ppl_change']:+.3f}% |")
    return lines


def fp8_preflight(fp8: dict) -> dict:
    """Run the chosen FP8 path once on a small CUDA input; if it raises (a kernel that does not
    compile on this device), fall back to chained P @ V accumulation, then to e4m3 Q.K^T, then
    to the previous path (e4m3, torch quantization, chained), for this run, and say so."""
    if not torch.cuda.is_available():
        return fp8
    Hq, Hkv, D = SHAPES["llama3-8b"]
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, h, 512, D, generator=g, device="cuda", dtype=torch.bfloat16)
               for h in (Hq, Hkv, Hkv))
    errors = []
    for cand in (fp8, {**fp8, "pv_accumulate": "chain"}, {**fp8, "qk_format": "e4m3"},
                 FP8_VARIANTS[-1]):
        try:
            fp8_block_sparse_attention(q, k, v, None, **_fp8_kw(cand))
            torch.cuda.synchronize()
            return {**cand, "failed": errors} if errors else dict(cand)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{cand}: {e!r:.300}")
            print(f"FP8 path {cand} failed: {e!r:.300}", file=sys.stderr, flush=True)
    raise RuntimeError(f"every FP8 path failed: {errors}")


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


def artifact_case(path, shape, gen, flex_fn, log, fp8: dict | None = FP8_DEFAULT) -> list[dict]:
    """run_case on a masks artifact's per-layer masks, plus a row summing every layer."""
    masks = artifact_masks(path)
    m0 = masks[0][1]
    rows = run_case(shape, m0.q_len, m0.block_size, [], gen, flex_fn, log, masks=masks,
                    fp8=fp8)
    layers = [r for r in rows if r["provider"] == "ours"]
    total = {k: sum(r[k] for r in layers) if all(r.get(k) is not None for r in layers) else None
             for k in ("ms", "flex_ms", "graph_ms", "flex_graph_ms")}
    print(json.dumps({"artifact": path, "layers": len(layers), "sum_ms": total,
                      "dense_ms_x_layers": layers[0]["best_dense_ms"] * len(layers),
                      "all_ok": all(r["ok"] for r in layers)}), flush=True)
    return rows


def target_case(n, bs, gen, log) -> dict:
    Hq, Hkv, D = SHAPES["llama3-8b"]
    q = torch.randn(1, Hq, n, D, generator=gen, device="cuda").to(torch.bfloat16)
    k = torch.randn(1, Hkv, n, D, generator=gen, device="cuda").to(torch.bfloat16)
    v = torch.randn(1, Hkv, n, D, generator=gen, device="cuda").to(torch.bfloat16)
    scale = 1 / math.sqrt(D)
    sdpa_ms = best_dense(dense_baselines(q, k, v, scale))[1]
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
    sdpa_ms = best_dense(dense_baselines(q, k, k, 1 / math.sqrt(D)))[1]
    row = dict(kind="gate_topk", N=n, block_size=bs, top_k=top_k, ms=ms, sdpa_ms=sdpa_ms,
               fraction_of_dense=ms / sdpa_ms)
    log(row)
    return row


def env_lines(env) -> list[str]:
    return [f"{env['device']}, torch {env['torch']}, triton {env['triton']}, CUDA "
            f"{env.get('cuda')}, cuDNN {env.get('cudnn')}. Ceilings measured in the same run: "
            f"bf16 8192^3 matmul {env.get('matmul_bf16_tflops')} TFLOP/s, device copy "
            f"{env.get('copy_tb_per_s')} TB/s (read + write)."]


def shape_table(env, rows) -> list[str]:
    r0 = rows[0]
    names = sorted(r0["sdpa_ms"])
    lines = [f"### {r0['shape']} (Hq {r0['Hq']}, Hkv {r0['Hkv']}, head_dim {r0['D']}, block "
             f"{r0['block_size']})", ""] + env_lines(env) + ["",
             "| N | density | ours ms | ours TFLOP/s | FP8 ms | FP8 quant ms | FP8 / bf16 | "
             "Flex ms | "
             + " | ".join(f"SDPA-{n} ms" for n in names) + " | best dense | x dense | x Flex | "
             "err ours / FP8 / Flex | ok | graph ms ours / Flex |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(names) + "---|---|---|---|---|---|"]
    for r in rows:
        dense = r["provider"] == "ours-dense-kernel"
        lines.append(
            f"| {r['N']} | {'1.0 (dense kernel)' if dense else format(r['density'], '.3f')} | "
            f"{r['ms']:.3f} | {r['tflops']:.0f} | {fmt(r.get('fp8_ms'), '.3f')} | "
            f"{fmt(r.get('fp8_quant_ms'), '.3f')} | {fmt(r.get('fp8_speedup_vs_bf16'), '.2f')} | "
            f"{fmt(r.get('flex_ms'), '.3f')} | "
            + " | ".join(fmt(r["sdpa_ms"].get(n), ".3f") for n in names) +
            f" | {r['best_dense']} {r['best_dense_tflops']:.0f} TFLOP/s | "
            f"{fmt(r.get('speedup_vs_dense'), '.2f')} | {fmt(r.get('speedup_vs_flex'), '.2f')} "
            f"| {r['err']:.1e} / {fmt(r.get('err_fp8'), '.1e')} / "
            f"{fmt(r.get('err_flex'), '.1e')} | {'yes' if r['ok'] else 'NO'} | "
            f"{fmt(r.get('graph_ms'), '.3f')} / {fmt(r.get('flex_graph_ms'), '.3f')} |")
    return lines


def fp8_accuracy_table(acc) -> list[str]:
    labels = [fp8_label(v) for v in FP8_VARIANTS]
    lines = ["FP8 error vs fp64 (dense causal, sampled rows; relative Frobenius) next to the bf16 "
             "kernel's. 'outliers': K with a channel-wise bias and a few channels 4x larger (Q "
             "3x), V offset on two channels. FP8 columns: Q.K^T format / quantization / P @ V "
             "accumulation (e4m3/torch/chain = the previous path):", "",
             "| shape | D | N | inputs | bf16 | " + " | ".join(labels) + " |",
             "|---|---|---|---|---|" + "---|" * len(labels)]
    for r in acc:
        errs = [r["err_fp8"].get(lb) for lb in labels]
        lines.append(f"| {r['shape']} | {r['D']} | {r['N']} | {r['inputs']} | "
                     f"{r['err_bf16']:.2e} | " + " | ".join(
                         e if isinstance(e, str) else fmt(e, '.2e') for e in errs) + " |")
    return lines


def fp8_variant_lines(rows) -> list[str]:
    timed = [r for r in rows if r.get("fp8_variants_ms")]
    if not timed:
        return []
    labels = list(dict.fromkeys(lb for r in timed for lb in r["fp8_variants_ms"]))
    lines = ["FP8 paths at density 1.0 (dense causal kernel, ms, quantization included; 'FP8 ms' "
             "of the table above is the path named first; quantization alone: fused Triton "
             "kernels / torch ops):", "",
             "| shape | N | bf16 ms | " + fp8_label(timed[0]["fp8_path"]) + " | "
             + " | ".join(labels) + " | quant ms fused / torch |",
             "|---|---|---|---|" + "---|" * len(labels) + "---|"]
    for r in timed:
        vals = [r["fp8_variants_ms"].get(lb) for lb in labels]
        lines.append(f"| {r['shape']} | {r['N']} | {r['ms']:.3f} | {fmt(r.get('fp8_ms'), '.3f')}"
                     " | " + " | ".join(v if isinstance(v, str) else fmt(v, '.3f')
                                        for v in vals)
                     + f" | {fmt(r.get('fp8_quant_ms'), '.3f')} / "
                       f"{fmt(r.get('fp8_quant_ms_torch'), '.3f')} |")
    return lines


def markdown(env, rows, targets, gates, acc=(), ppl=(), exp2=()) -> str:
    lines = ["B=1, bf16, causal, random block masks (diagonal + sink kept, one mask per KV "
             "group; Flex gets the same blocks expanded to Hq heads, full blocks off the "
             "diagonal). Useful TFLOP/s = 4 * D * Hq * (visible query/key pairs in kept tiles) "
             "/ time; dense SDPA is credited with the dense causal pairs. Median ms. x dense = "
             "time of the fastest dense SDPA backend of the same run (column 'best dense') / "
             "ours; x Flex = Flex / ours; FP8 / bf16 = ours bf16 / ours FP8 (its time and "
             "error include the 8-bit quantization of Q, K, V; 'FP8 quant ms' times that "
             "quantization alone). Speedups are left out (-) where the fp64 check "
             "failed. Graph columns (N <= 16k): the call replayed from a CUDA graph.", ""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        lines += shape_table(env, [r for r in rows if r["shape"] == shape]) + [""]
    if exp2:
        lines += exp2_table(env, exp2)
    variants = fp8_variant_lines(rows)
    if variants:
        lines += variants + [""]
    if acc:
        lines += fp8_accuracy_table(acc) + [""]
    if ppl:
        lines += fp8_ppl_lines(ppl) + [""]
    if targets:
        lines += ["Target kernel (block-max + block-sum maps, llama3-8b shape) vs one dense "
                  "SDPA forward (fastest backend); peak = memory allocated beyond the inputs:",
                  "", "| N | bs | maps ms | dense ms | ratio | peak MiB | outputs MiB | "
                  "max err (fp64, N<=8k) | ok |", "|---|---|---|---|---|---|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['N']} | {t['block_size']} | {t['ms']:.3f} | {t['sdpa_ms']:.3f} "
                         f"| {t['ratio_vs_sdpa']:.2f} | {t['peak_extra_bytes'] / 2**20:.1f} | "
                         f"{t['output_bytes'] / 2**20:.1f} | {fmt(t['err_max'], '.1e')} | "
                         f"{'yes' if t['ok'] else 'NO'} |")
    if gates:
        lines += ["", "Scores -> kv_indices (top-k, one Triton launch, Hq=32 score rows) vs dense "
                  "SDPA (fastest backend); the gate network's own forward is not included:", "",
                  "| N | bs | top_k | ms | fraction of dense |", "|---|---|---|---|---|"]
        for g in gates:
            lines.append(f"| {g['N']} | {g['block_size']} | {g['top_k']} | {g['ms']:.3f} | "
                         f"{g['fraction_of_dense']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama3-8b,smollm2-135m,gemma3-270m")
    ap.add_argument("--seqlens", default="8192,32768,131072")
    ap.add_argument("--densities", default="1.0,0.5,0.2,0.1,0.05")
    ap.add_argument("--block-sizes", default="128")
    ap.add_argument("--target-seqlens", default="")
    ap.add_argument("--gate-seqlens", default="")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument("--fp8-qk", default=DEFAULT_QK_FORMAT, choices=("int8", "e4m3"),
                    help="Q.K^T format of the timed FP8 path")
    ap.add_argument("--fp8-quantize", default=DEFAULT_QUANTIZE, choices=("fused", "torch"),
                    help="quantization of the timed FP8 path (Triton kernels or torch ops)")
    ap.add_argument("--fp8-pv", default=DEFAULT_PV_ACCUMULATE, choices=PV_ACCUMULATE,
                    help="P @ V accumulation of the timed FP8 path")
    ap.add_argument("--fp8-ppl", default=None, metavar="MODEL",
                    help="perplexity of this load_model preset under bf16 and every FP8 path")
    ap.add_argument("--fp8-ppl-seqlens", default="16384,32768")
    ap.add_argument("--fp8-ppl-docs", type=int, default=2)
    ap.add_argument("--fp8-ppl-corpus", default="default")
    ap.add_argument("--fp8-variants", action="store_true",
                    help="also time every FP8 path of the accuracy table at density 1.0")
    ap.add_argument("--fp8-accuracy", default="",
                    help="lengths (comma list) of an FP8 error table per shape: bf16 and every "
                    "FP8 variant vs fp64, random inputs and inputs with outliers")
    ap.add_argument("--exp2-poly", default="",
                    help="fractions (comma list, each 0, 0.125, 0.25, 0.5 or 1) of the "
                    "exponentials computed on the FMA pipes: times them side by side (bf16 and "
                    "FP8, dense kernel and --densities masks, pinned configs) instead of the "
                    "main table")
    ap.add_argument("--mask-artifact", default=None,
                    help="also time every layer's mask of this masks artifact (`adaptive-sparse "
                    "export masks`, e.g. a trained gate's) at --mask-shape")
    ap.add_argument("--mask-shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--json", default="attention.json")
    ap.add_argument("--md", default="attention.md")
    a = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    try:
        fractions = floats(a.exp2_poly)
        for f in fractions:
            exp2_poly_code(f)
    except ValueError as e:
        ap.error(f"--exp2-poly: {e}")
    env = environment()
    print(json.dumps(env), flush=True)
    gen = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(0)
    flex_fn = None if a.no_flex else _compiled_flex()
    rows, targets, gates, logged, acc, ppl, exp2 = [], [], [], [], [], [], []
    fp8 = None if a.no_fp8 else fp8_preflight({"qk_format": a.fp8_qk,
                                                "quantize": a.fp8_quantize,
                                                "pv_accumulate": a.fp8_pv})

    def log(r):
        logged.append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                          for k, v in r.items()}), flush=True)
        atomic_write_text(a.json, json.dumps({"env": env, "partial": logged}, indent=1))

    interrupted = False
    try:  # SIGINT (e.g. `timeout -s INT`) ends the measuring; what finished is written
        if a.fp8_ppl:
            ppl = fp8_perplexity(a.fp8_ppl, ints(a.fp8_ppl_seqlens), a.fp8_ppl_docs,
                                 a.fp8_ppl_corpus, log)
        for shape in a.shapes.split(","):
            for n in ints(a.fp8_accuracy):
                acc += fp8_accuracy(shape, n, gen, log)
            for bs in ints(a.block_sizes):
                for n in ints(a.seqlens):
                    t0 = time.time()
                    try:
                        if fractions:
                            exp2 += exp2_case(shape, n, bs, floats(a.densities), fractions, gen,
                                              log, fp8=fp8)
                        else:
                            rows += run_case(shape, n, bs, floats(a.densities), gen, flex_fn,
                                             log, fp8=fp8, fp8_variants=FP8_VARIANTS
                                             if a.fp8_variants else ())
                    except torch.OutOfMemoryError as e:
                        print(f"OOM {shape} N={n} bs={bs}: {e}", file=sys.stderr, flush=True)
                    torch.cuda.empty_cache() if torch.cuda.is_available() else None
                    print(f"# {shape} N={n} bs={bs}: {time.time() - t0:.1f} s", flush=True)
        if a.mask_artifact:
            rows += artifact_case(a.mask_artifact, a.mask_shape, gen, flex_fn, log, fp8=fp8)
        if torch.cuda.is_available():
            for n in ints(a.target_seqlens):
                for bs in (64, 128):
                    targets.append(target_case(n, bs, gen, log))
            for n in ints(a.gate_seqlens):
                gates.append(gate_case(n, 64, 0.1, gen, log))
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: writing the rows finished so far", file=sys.stderr, flush=True)
        rows = [r for r in logged if "provider" in r]
        exp2 = [r for r in logged if r.get("kind") == "exp2_poly"]
        acc = [r for r in logged if r.get("kind") == "fp8_accuracy"]
        ppl = [r for r in logged if r.get("kind") == "fp8_ppl"]
        targets = [r for r in logged if r.get("kind") == "target"]
        gates = [r for r in logged if r.get("kind") == "gate_topk"]
    tuned = {str(k): str(v) for k, v in bsa_fwd_autotuned.cache.items()}  # key -> chosen config
    tuned_fp8 = {str(k): str(v) for k, v in bsa_fwd_fp8_autotuned.cache.items()}
    atomic_write_text(a.json, json.dumps({"env": env, "fp8": fp8, "interrupted": interrupted,
                                          "rows": rows,
                                          "targets": targets, "gates": gates,
                                          "fp8_accuracy": acc, "fp8_ppl": ppl,
                                          "exp2_poly": exp2,
                                          "autotuned": tuned,
                                          "autotuned_fp8": tuned_fp8}, indent=1))
    md = markdown(env, rows, targets, gates, acc, ppl, exp2)
    atomic_write_text(a.md, md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
