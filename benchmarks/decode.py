"""Decode attention per step: the block-sparse split-KV kernel against dense decode.

One new token per sequence attends to a KV cache of `--contexts` tokens (Llama-3-8B shapes: 32
query / 8 KV heads, head_dim 128, bf16). Dense baselines timed in the same run: SDPA with the
flash and cuDNN backends (the GQA group folded into the query length, which is exact for one
query token and needs no K/V copy), the project's kernel in dense mode and, with --flex,
compiled FlexAttention. Sparse: each (sequence, KV head) reads `density` of its cache blocks
(sink and last block included, the rest at random). Before timing, every kernel's output is
compared with an fp64 oracle on two sequences (all heads): the error relative to the oracle's
largest magnitude must be within 2x that of the PyTorch reference on the same bf16 inputs or
2^-7 (bf16 rounding of the probabilities); a row whose check fails is reported and not timed. The decode gate's per-token cost (query projection, block scores, top-k
selection, the partial last block's key features) is timed eagerly and replayed from a CUDA
graph, against dense decode at the same shape.

    PYTHONPATH=. python benchmarks/decode.py --json decode.json
Times: triton.testing.do_bench medians (benchmarks/common.bench). Bytes moved by dense decode:
2 * B * Hkv * M * D * 2 (K and V, bf16); "TB/s" is that over the time (sparse rows: the bytes
of the blocks read).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from adaptive_sparse.attention.decode import decode_reference, sparse_decode_attention
from adaptive_sparse.io import atomic_write_json
from benchmarks.common import bench, environment, graph_bench

HQ, HKV, D = 32, 8, 128


def sdpa_decode(q, k, v, scale, backend):
    """Dense decode through one SDPA backend: q [B, Hq, D] folded to [B, Hkv, G, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, Hq, _ = q.shape
    Hkv = k.shape[1]
    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    with sdpa_kernel(which):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.view(B, Hkv, Hq // Hkv, -1), k, v, scale=scale)
    return o.reshape(B, Hq, -1)


def flex_decode_fn():
    """Compiled FlexAttention over the whole cache (its decode path for short queries)."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, scale):
        o = compiled(q[:, :, None], k, v, scale=scale, enable_gqa=True)
        return o[:, :, 0]
    return run


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


def gate_cost(M, bs, density, q, k, dense_ms) -> dict:
    """Per-token decode-gate work on cached key features: query projection, scores over all
    blocks, top-k selection (Policy), key features of the partial last block."""
    from adaptive_sparse.gates.decode import DecodeGate, DecodeGateConfig, select_decode_blocks
    from adaptive_sparse.policies import Policy

    gate = DecodeGate(DecodeGateConfig(num_layers=1, num_heads=HQ, num_kv_heads=HKV,
                                       head_dim=D, block_size=bs)).to(q.device)
    kb = -(-M // bs)
    with torch.no_grad():
        kg = gate.project_keys(gate.pooled_keys(k[:, :, :(kb - 1) * bs]))  # cached features
    kg = torch.cat([kg, kg[:, :, -1:]], dim=2).contiguous()  # [B, Hkv, Kb, gd]
    policy = Policy(kind="top_k", k=max(2, round(density * kb)))
    tail = k[:, :, (kb - 1) * bs:]

    def step():
        with torch.no_grad():
            kg[:, :, -1:] = gate.project_keys(gate.pooled_keys(tail))
            scores = gate.scores(q[:, :, None], kg)[:, :, 0]
            return select_decode_blocks(scores, policy, kv_len=M, block_size=bs)

    mask = step()
    assert int(mask.kv_num_blocks.min()) == policy.k
    eager = bench(step)
    graphed = graph_bench(step)
    return {"gate_ms": eager, "gate_graph_ms": graphed,
            "gate_share_of_dense": (graphed or eager) / dense_ms}


def run(args, log, save=lambda rows, gates: None) -> tuple[list[dict], list[dict]]:
    dev = "cuda"
    dtype = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    scale = D ** -0.5
    rows, gates = [], []
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
                    "block_size": bs, "dtype": "bf16"}
            dense = {}
            for name in ("cudnn", "flash"):
                try:
                    out = sdpa_decode(q, k, v, scale, name)
                except RuntimeError as e:
                    log(f"SDPA {name} refused B={B} M={M}: {str(e).splitlines()[0]}")
                    continue
                err, eager = oracle_error(out, q, k, v, None, None, bs, scale, check)
                dense[name] = bench(lambda name=name: sdpa_decode(q, k, v, scale, name))
                rows.append({**base, "method": f"sdpa-{name}", "density": 1.0,
                             "ms": dense[name], "max_err": err, "eager_err": eager,
                             "tb_per_s": dense_bytes / dense[name] / 1e9})
            if args.flex:
                try:
                    fx = flex_decode_fn()
                    out = fx(q, k, v, scale)
                    err, eager = oracle_error(out, q, k, v, None, None, bs, scale, check)
                    dense["flex"] = bench(lambda: fx(q, k, v, scale))
                    rows.append({**base, "method": "flex", "density": 1.0, "ms": dense["flex"],
                                 "max_err": err, "eager_err": eager,
                                 "tb_per_s": dense_bytes / dense["flex"] / 1e9})
                except Exception as e:  # a comparison only: report and go on
                    log(f"flex failed B={B} M={M}: {type(e).__name__}: {str(e)[:200]}")
            best_name, best_ms = min(dense.items(), key=lambda kv: kv[1])
            out = torch.full_like(q, float("nan"))
            cases = [("ours-dense", 1.0, None, None)]
            for dens in args.densities:
                num, idx = random_selection(B, HKV, kb, dens, gen, dev)
                cases.append(("ours-sparse", float(num[0, 0]) / kb, num, idx))
            for method, dens, num, idx in cases:
                def call(num=num, idx=idx):
                    return sparse_decode_attention(q, k, v, kv_num_blocks=num, kv_indices=idx,
                                                   block_size=bs, backend="triton", out=out)
                out.fill_(float("nan"))
                call()
                err, eager = oracle_error(out, q, k, v, num, idx, bs, scale, check)
                ok = err <= max(2 * eager, 2 ** -7) and not bool(torch.isnan(out).any())
                row = {**base, "method": method, "density": dens, "max_err": err,
                       "eager_err": eager, "correct": ok, "best_dense": best_name,
                       "best_dense_ms": best_ms}
                if ok:
                    ms = bench(call)
                    row.update(ms=ms, speedup_vs_best_dense=best_ms / ms,
                               bound=1.0 / dens, tb_per_s=dense_bytes * dens / ms / 1e9)
                else:
                    log(f"CORRECTNESS FAILED {method} B={B} M={M} density={dens:.3f}: "
                        f"err {err:.3g} vs eager {eager:.3g}; not timed")
                rows.append(row)
                log(" ".join(f"{key}={val:.4g}" if isinstance(val, float) else f"{key}={val}"
                             for key, val in row.items() if key not in base or key == "batch"))
            if M in args.gate_contexts:
                for dens in (0.1,):
                    g = {**base, "density": dens, "best_dense": best_name,
                         "best_dense_ms": best_ms, **gate_cost(M, bs, dens, q, k, best_ms)}
                    gates.append(g)
                    log(f"gate B={B} M={M}: eager {g['gate_ms']:.4f} ms, graph "
                        f"{g['gate_graph_ms']} ms, share of dense {g['gate_share_of_dense']:.3f}")
            del q, k, v, out
            torch.cuda.empty_cache()
            save(rows, gates)  # what is measured so far survives a time limit
    return rows, gates


def table(env, rows, gates) -> str:
    lines = [f"{env['device']}, torch {env['torch']}, triton {env['triton']}, "
             f"Hq {HQ} / Hkv {HKV}, D {D}, bf16, block {rows[0]['block_size'] if rows else '-'}",
             "| context | batch | method | density | ms | TB/s | speedup vs best dense | "
             "1/density | rel. err (reference) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = f"{r['ms']:.4f}" if "ms" in r else "FAILED"
        sp = f"{r['speedup_vs_best_dense']:.2f}x" if "speedup_vs_best_dense" in r else "-"
        bound = f"{r['bound']:.1f}" if "bound" in r else "-"
        tb = f"{r['tb_per_s']:.2f}" if "tb_per_s" in r else "-"
        lines.append(f"| {r['context']} | {r['batch']} | {r['method']} | {r['density']:.3f} | "
                     f"{ms} | {tb} | {sp} | {bound} | {r['max_err']:.2e} "
                     f"({r['eager_err']:.2e}) |")
    if gates:
        lines += ["", "| context | batch | gate eager ms | gate graph ms | best dense ms | "
                      "gate / dense |", "|---|---|---|---|---|---|"]
        for g in gates:
            gg = f"{g['gate_graph_ms']:.4f}" if g["gate_graph_ms"] is not None else "-"
            lines.append(f"| {g['context']} | {g['batch']} | {g['gate_ms']:.4f} | {gg} | "
                         f"{g['best_dense_ms']:.4f} | {g['gate_share_of_dense']:.3f} |")
    return "\n".join(lines)


def _ints(text):
    return [int(x) for x in text.split(",")]


def _floats(text):
    return [float(x) for x in text.split(",")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=_ints, default=[32768, 131072])
    p.add_argument("--batches", type=_ints, default=[1, 8, 16, 32])
    p.add_argument("--densities", type=_floats, default=[0.05, 0.1, 0.2, 0.3])
    p.add_argument("--block-size", type=int, choices=(64, 128), default=64)
    p.add_argument("--gate-contexts", type=_ints, default=[32768],
                   help="contexts at which the decode gate's per-token cost is timed")
    p.add_argument("--flex", action="store_true", help="also time compiled FlexAttention")
    p.add_argument("--json", default=None, help="write the rows and the environment here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/decode.py: needs CUDA", file=sys.stderr)
        return 2

    def log(msg):
        print(msg, flush=True)

    env = environment()
    log(json.dumps(env))
    def save(rows, gates):
        if args.json:
            atomic_write_json(args.json, {"environment": env, "args": vars(args), "rows": rows,
                                          "gates": gates, "table": table(env, rows, gates)})

    rows, gates = run(args, log, save)
    print(table(env, rows, gates))
    save(rows, gates)
    failed = [r for r in rows if r.get("correct") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
