"""Correctness of the sparse decode path as a generation drives it (issue 15), no model needed.

Random gates and caches at a model's decode shapes (default Qwen2.5-Coder-0.5B: 14 query / 2 KV
heads, head_dim 64, block 64, 24 layers, bf16). The prompt's cache ends mid-block
(`--context` - `--steps` tokens) and grows by one token per step, as transformers' cache does
(a new contiguous tensor per step); every layer runs in turn, so the layers share the kernels'
workspaces. Each step and layer compares:

- selection: `DecodeProvider(fast=True)` (the fused Triton gate step, several programs per row,
  the last to arrive selecting) against `DecodeProvider(fast=False)` (the eager gate:
  `DecodeKeyCache.update`, `DecodeGate.scores`, `select_decode_blocks`). A difference whose
  blocks all score within `--tie` of the row's k-th eager score is a near tie (fp32 summation
  order), counted apart; any other is a mismatch. Also the fused step with one program per row
  (`decode_gate_select(programs=1)`, no cross-program arrival count): must equal the fused
  selection exactly.
- output: `decode_attention_from_mask` on the fused selection (what the model's attention calls:
  the split kernel with the fused merge, splits sized by the gate's top-k hint) against
  `decode_reference` (fp32) on the same tables; and the kernel with the merge as its own launch,
  with one split (no merge), and without the hint (splits sized by the whole cache).

Then (`--ragged`) a batch of 2 with different lengths through `DecodeGate.fused_select` and
`sparse_decode_attention` with `cache_seqlens`, against per-sequence eager references.

Prints the first mismatches of each kind and a summary; exit 1 on any mismatch (near ties do
not count). GPU (bf16, about a minute with compilation on an H200):

    PYTHONPATH=. python benchmarks/decode_check.py --json decode_check.json
CPU dry run (TRITON_INTERPRET=1, tiny shapes):

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/decode_check.py --device cpu \\
        --dtype float16 --context 120 --steps 6 --layers 2 --heads 4 --kv-heads 2 \\
        --head-dim 16 --block-size 16 --density 0.5 --batches 1,2
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# |out - ref| <= ATOL + RTOL * |ref| elementwise (the kernel rounds its output to the dtype)
TOLERANCE = {torch.bfloat16: (4e-3, 2e-2), torch.float16: (1e-3, 4e-3),
             torch.float32: (1e-4, 1e-4)}
PINNED = {"num_warps": 4, "num_stages": 2}  # the variants' config (BLOCK_N: <= the block)


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    p.add_argument("--context", type=int, default=32800,
                   help="cache tokens after the last step (default: block 512 begins at step "
                        "18: a new block, a wider table and key-feature buffer)")
    p.add_argument("--steps", type=int, default=50, help="decode steps (the cache grows by 1)")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--density", type=float, default=0.1, help="token budget / context")
    p.add_argument("--batches", type=_ints, default=[1, 2])
    p.add_argument("--ragged", type=int, default=77,
                   help="the second sequence's shortfall in the ragged phase (0: no phase)")
    p.add_argument("--tie", type=float, default=1e-4,
                   help="near tie: score gap <= tie * (1 + max |score|)")
    p.add_argument("--show", type=int, default=5, help="mismatches printed per kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.context - args.steps < 1 or args.layers < 1:
        p.error("expected steps >= 1, context > steps, layers >= 1")
    return args


def kept(num: torch.Tensor, idx: torch.Tensor, kb: int) -> torch.Tensor:
    """bool [B, H, kb]: the blocks a (num [B, H], idx [B, H, W]) table lists."""
    listed = torch.arange(idx.shape[-1], device=idx.device) < num[..., None].long()
    out = torch.zeros(*idx.shape[:2], kb + 1, dtype=torch.bool, device=idx.device)
    out.scatter_(2, torch.where(listed, idx.long().clamp(0, kb), kb), True)
    return out[..., :kb]


class Tally:
    """Counts and the first few reports of each kind."""

    def __init__(self, show: int):
        self.show, self.counts, self.checked, self.max_err, self.first = show, {}, {}, {}, {}

    def check(self, kind: str, ok: bool, where: str, err: float | None = None) -> None:
        self.checked[kind] = self.checked.get(kind, 0) + 1
        if err is not None:
            self.max_err[kind] = max(self.max_err.get(kind, 0.0), err)
        if ok:
            return
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        self.first.setdefault(kind, where)
        if n <= self.show:
            print(f"MISMATCH {kind}: {where}" + ("" if err is None else f" err {err:.3g}"),
                  flush=True)


def selection_diff(a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor, policy, tie: float):
    """(rows differing, rows differing beyond a near tie). a, b bool [B, H, kb] (fused, eager),
    scores fp32 [B, H, kb] (eager); a differing block is a near tie when its score is within
    `tie` of the eager selection's lowest kept score that was not forced."""
    kb = scores.shape[-1]
    cols = torch.arange(kb, device=scores.device)
    forced = (cols >= kb - 1 - policy.local_blocks) & (cols < kb - 1)
    if policy.keep_sink:
        forced |= cols == 0
    if policy.keep_diagonal:
        forced |= cols == kb - 1
    kth = scores.masked_fill(~b | forced, float("inf")).amin(-1)  # [B, H]
    diff = a ^ b
    rows = diff.any(-1)
    gap = torch.where(diff, (scores - kth[..., None]).abs().nan_to_num(float("inf")),
                      0.0).amax(-1)
    scale = scores.masked_fill(~torch.isfinite(scores), 0.0).abs().amax(-1)
    real = rows & (gap > tie * (1 + scale))
    return int(rows.sum()), int(real.sum())


def output_check(tally, kind, out, ref, dtype, where):
    atol, rtol = TOLERANCE[dtype]
    err = (out.float() - ref.float()).abs()
    bad = err > atol + rtol * ref.float().abs()
    bad |= ~torch.isfinite(out.float())
    tally.check(kind, not bool(bad.any()), where, float(err.nan_to_num(float("inf")).max()))


def generation_phase(args, B: int, dtype, device, gates, tally) -> None:
    from adaptive_sparse.attention.decode import decode_attention_from_mask, decode_reference
    from adaptive_sparse.attention.triton.decode import triton_sparse_decode
    from adaptive_sparse.attention.triton.decode_gate import decode_gate_select
    from adaptive_sparse.gates.decode import DecodeProvider, token_budget_policy

    c = gates.config
    L, Hq, Hkv, D, bs = c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.block_size
    policy = token_budget_policy(max(1, round(args.density * args.context)), bs)
    fast = DecodeProvider(policy, gates=gates, fast=True, num_layers=L)
    eager = DecodeProvider(policy, gates=gates, fast=False, num_layers=L)
    gen = torch.Generator(device=device).manual_seed(args.seed + B)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    P = args.context - args.steps
    ks = [randn(B, Hkv, P, D) for _ in range(L)]
    vs = [randn(B, Hkv, P, D) for _ in range(L)]
    for layer in range(L):  # the prefill: the providers pool the prompt's blocks
        q = randn(B, 2, Hq, D).transpose(1, 2)  # a prefill call (its queries are not read)
        for p in (fast, eager):
            assert p(layer, q, ks[layer]) is None
    scale = D ** -0.5
    for step in range(args.steps):
        M = P + step + 1
        kb = -(-M // bs)
        for layer in range(L):
            ks[layer] = k = torch.cat([ks[layer], randn(B, Hkv, 1, D)], dim=2)
            vs[layer] = v = torch.cat([vs[layer], randn(B, Hkv, 1, D)], dim=2)
            q = randn(B, 1, Hq, D).transpose(1, 2)  # [B, Hq, 1, D] as the model's view
            where = f"batch {B} step {step} (cache {M} tokens) layer {layer}"
            a = fast(layer, q, k)
            b = eager(layer, q, k)
            num, idx = a.kv_num_blocks[:, :, 0], a.kv_indices[:, :, 0]
            got = kept(num, idx, kb)
            want = kept(b.kv_num_blocks[:, :, 0].expand(B, Hkv),
                        b.kv_indices[:, :, 0].expand(B, Hkv, -1), kb)
            with torch.no_grad():
                s = gates[layer].scores(q, eager.caches[layer].buf[:, :, :kb])[:, :, 0].float()
            rows, real = selection_diff(got, want, s, policy, args.tie)
            tally.check("selection fused vs eager", real == 0, f"{where}: {real} rows")
            tally.check("selection near ties (not a failure)", rows == real, where)
            one = decode_gate_select(q, k, gates[layer].wq, gates[layer].wk,
                                     fast.caches[layer].buf, top_k=int(a.blocks_per_row),
                                     block_size=bs, poolings=c.k_pooling,
                                     q_scale=c.gate_dim ** -0.5,
                                     keep_sink=policy.keep_sink,
                                     keep_diagonal=policy.keep_diagonal,
                                     local_blocks=policy.local_blocks, programs=1)
            tally.check("selection fused vs one program per row",
                        torch.equal(one[0], num) and torch.equal(one[1], idx), where)
            out = decode_attention_from_mask(q, k, v, a, scale=scale, backend="triton")
            seqlens = torch.full((B,), M, dtype=torch.int32, device=device)
            ref, _ = decode_reference(q[:, :, 0], k, v, seqlens, num, idx, block_size=bs,
                                      scale=scale)
            output_check(tally, "output fused merge (as generation)", out[:, :, 0], ref, dtype,
                         where)
            for kind, opts in (("output merge launch", dict(merge="separate")),
                               ("output one split", dict(num_splits=1)),
                               ("output no hint", dict(blocks_per_row=None, merge="fused"))):
                hint = opts.pop("blocks_per_row", a.blocks_per_row)
                o, _ = triton_sparse_decode(q, k, v, None, num, idx, block_size=bs, scale=scale,
                                            config={**PINNED, "BLOCK_N": min(64, bs)},
                                            blocks_per_row=hint, **opts)
                output_check(tally, kind, o[:, :, 0], ref, dtype, where)


def ragged_phase(args, dtype, device, gates, tally) -> None:
    """B = 2, lengths M and M - ragged: the fused step and the kernel with cache_seqlens."""
    from adaptive_sparse.attention.decode import decode_reference, sparse_decode_attention
    from adaptive_sparse.gates.decode import (select_decode_blocks, token_budget_policy,
                                              uniform_top_k)

    c = gates.config
    Hq, Hkv, D, bs = c.num_heads, c.num_kv_heads, c.head_dim, c.block_size
    policy = token_budget_policy(max(1, round(args.density * args.context)), bs)
    gen = torch.Generator(device=device).manual_seed(args.seed + 99)
    P = args.context - args.steps
    Mx = args.context
    k_all = torch.randn(2, Hkv, Mx, D, generator=gen, device=device).to(dtype)
    v_all = torch.randn(2, Hkv, Mx, D, generator=gen, device=device).to(dtype)
    gate = gates[0]
    for step in range(args.steps):
        M = P + step + 1
        lens = [M, max(1, M - args.ragged)]
        kb = -(-M // bs)
        k, v = k_all[:, :, :M].contiguous(), v_all[:, :, :M].contiguous()
        q = torch.randn(2, Hq, 1, D, generator=gen, device=device).to(dtype)
        kg = torch.full((2, Hkv, kb + 8, c.gate_dim), float("nan"), device=device)
        feats = []
        with torch.no_grad():
            for b, n in enumerate(lens):
                f = gate.project_keys(gate.pooled_keys(k[b:b + 1, :, :n]))[0]  # [Hkv, nb, gd]
                kg[b, :, :f.shape[1] - 1] = f[:, :-1]
                feats.append(f)
        seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
        top_k = uniform_top_k(policy, kv_len=M, block_size=bs)
        num, idx = gate.fused_select(q, k, kg, top_k=top_k, keep_sink=policy.keep_sink,
                                     keep_diagonal=policy.keep_diagonal,
                                     local_blocks=policy.local_blocks, cache_seqlens=seqlens)
        where = f"ragged step {step} (lengths {lens})"
        got = kept(num, idx, kb)
        for b, n in enumerate(lens):
            with torch.no_grad():
                s = gate.scores(q[b:b + 1], feats[b][None])[:, :, 0].float()  # [1, Hkv, nb]
            want_mask = select_decode_blocks(s, policy, kv_len=n, block_size=bs)
            nb = s.shape[-1]
            want = kept(want_mask.kv_num_blocks[:, :, 0], want_mask.kv_indices[:, :, 0], nb)
            rows, real = selection_diff(got[b:b + 1, :, :nb], want, s, policy, args.tie)
            tally.check("ragged selection fused vs eager", real == 0 and not
                        bool(got[b, :, nb:].any()), f"{where} sequence {b}: {real} rows")
        out = sparse_decode_attention(q, k, v, cache_seqlens=seqlens, kv_num_blocks=num,
                                      kv_indices=idx, block_size=bs, scale=D ** -0.5,
                                      blocks_per_row=float(top_k), backend="triton")
        ref, _ = decode_reference(q[:, :, 0], k, v, seqlens, num, idx, block_size=bs,
                                  scale=D ** -0.5)
        output_check(tally, "ragged output fused merge", out[:, :, 0], ref, dtype, where)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def main(argv=None) -> int:
    args = parse(argv)
    from adaptive_sparse.gates.decode import DecodeGateConfig, DecodeGateSet

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available (CPU: TRITON_INTERPRET=1 "
              "--device cpu)", file=sys.stderr)
        return 2
    if device.type != "cuda" and not _interpreting():
        print("error: the Triton kernels need CUDA or TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    gates = DecodeGateSet(DecodeGateConfig(
        num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        head_dim=args.head_dim, block_size=args.block_size, init="random")).to(device)
    tally = Tally(args.show)
    t0 = time.perf_counter()
    for B in args.batches:
        generation_phase(args, B, dtype, device, gates, tally)
        print(f"batch {B}: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.ragged:
        ragged_phase(args, dtype, device, gates, tally)
        print(f"ragged: {time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - t0
    print(f"\nsummary ({args.dtype}, {args.layers} layers, heads {args.heads}/{args.kv_heads}, "
          f"d {args.head_dim}, block {args.block_size}, cache {args.context - args.steps + 1}"
          f"..{args.context}, batches {args.batches}, {seconds:.0f} s):")
    failed = 0
    for kind, n in tally.checked.items():
        bad = tally.counts.get(kind, 0)
        if "not a failure" not in kind:
            failed += bad
        err = f", max err {tally.max_err[kind]:.3g}" if kind in tally.max_err else ""
        first = f"; first: {tally.first[kind]}" if kind in tally.first else ""
        print(f"  {kind}: {bad} of {n} differ{err}{first}")
    print("RESULT: " + ("OK" if not failed else f"{failed} MISMATCHES"))
    if args.json:
        from adaptive_sparse.io import atomic_write_json

        atomic_write_json(args.json, {"args": vars(args), "seconds": seconds,
                                      "checked": tally.checked, "mismatches": tally.counts,
                                      "max_err": tally.max_err, "first": tally.first,
                                      "ok": not failed})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
