"""Sparse decoding end to end with one model (issue 15): kernels at the model's shapes, then
tokens per second of generation, dense against sparse decode.

1. Kernels (`benchmarks/decode.py` at the model's attention shapes, `--kernel-*` options): the
   decode gate's per-token cost over every layer (one fused launch per layer, eager and from
   one CUDA graph) against dense decode attention of every layer (SDPA cuDNN / flash and our
   kernel, eager and graphed); our sparse kernel and compiled FlexAttention at q_len 1 on the
   same block selection, next to SDPA.
2. Generation: `model.generate` greedy from prompts of `--context - --new-tokens` held-out
   tokens (`--corpus`, validation + test split; one distinct sequence per batch row while the
   corpus has them), prefill dense in every run. Three decodes: the model's own attention
   ("dense"), dense through the adaptive_sparse attention routing ("dense, routed": what the
   routing itself costs), and the decode gates ("sparse": `DecodeProvider`, one fused Triton
   launch per layer for the gate and the split-KV kernel on its selection) under a token
   budget of `--density` x context; with `--decode-select bounds` the keys' per-block min / max
   bound selects instead (training-free, eager PyTorch scoring, no decode gates). Reported
   per batch: prefill seconds (to the first token's logits), decode-only tokens per second
   (tokens after the first over the time after the prefill), total tokens per second, the
   decode density and greedy agreement with dense.

Decode gates: `--decode-gates` (the artifact `benchmarks/decode_quality.py` writes to
OUT/decode_gates, or a save_decode_gates file), else trained here as decode_quality.py trains
them (`--train-steps`, about 90 s on an H200 at its defaults) and written to OUT/decode_gates;
none with `--decode-select bounds`.

    PYTHONPATH=. python3 benchmarks/decode_e2e.py --model qwen2.5-coder-0.5b \\
        --decode-gates runs/decode_quality/decode_gates --out runs/decode_e2e

Writes OUT/decode_kernels.json / .md (step 1), OUT/decode_e2e.json and OUT/decode_e2e.md (both
steps' tables).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from adaptive_sparse.errors import fail


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b" if cuda else "smollm2-135m")
    p.add_argument("--out", default="runs/decode_e2e")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--decode-select", choices=("gate", "bounds"), default="gate",
                   help="sparse decode selection: the decode gates or the keys' per-block "
                        "min / max bound (training-free, no gates) (default %(default)s)")
    p.add_argument("--decode-gates", default=None,
                   help="decode-gate artifact folder or save_decode_gates file (else trained)")
    p.add_argument("--context", type=int, default=32768 if cuda else 1024,
                   help="prompt + new tokens (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=128 if cuda else 8,
                   help="greedy tokens per run (default %(default)s)")
    p.add_argument("--batches", type=_ints, default=[1, 16] if cuda else [1, 2],
                   help="batch sizes of the generation runs (default %(default)s)")
    p.add_argument("--density", type=float, default=0.1,
                   help="decode token budget as a share of --context (default %(default)s)")
    p.add_argument("--corpus", default="essays", help="prompt text (held-out split)")
    p.add_argument("--block-size", type=int, choices=(64, 128), default=64)
    p.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto",
                   help="sparse attention backend (default: triton on CUDA)")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="run step 1 (default on)")
    p.add_argument("--kernel-contexts", type=_ints, default=None,
                   help="contexts of step 1 (default: --context)")
    p.add_argument("--kernel-batches", type=_ints, default=[1, 16])
    p.add_argument("--kernel-densities", default="0.05,0.1,0.2")
    p.add_argument("--train-steps", type=int, default=None,
                   help="decode-gate distillation steps without --decode-gates (default 300 "
                        "CUDA, 20 CPU)")
    p.add_argument("--train-seq-len", type=int, default=None,
                   help="training sequence length (default 4096 CUDA, 512 CPU)")
    p.add_argument("--train-seqs", type=int, default=16, help="training sequences per corpus")
    p.add_argument("--corpora", nargs="+", default=["stdlib", "essays"],
                   help="training corpora of the decode gates")
    return p


def kernel_step(args, out: Path, log) -> str | None:
    """Step 1 through benchmarks.decode.main; its markdown, or None when skipped."""
    from benchmarks import decode

    if args.model not in decode.SHAPES:
        log(f"== kernels skipped: no benchmarks.decode shape named {args.model!r}")
        return None
    contexts = args.kernel_contexts or [args.context]
    argv = ["--shape", args.model, "--device", args.device, "--flex",
            "--contexts", ",".join(map(str, contexts)),
            "--batches", ",".join(map(str, args.kernel_batches)),
            "--densities", args.kernel_densities, "--block-size", str(args.block_size),
            "--gate-contexts", ",".join(map(str, contexts)),
            "--gate-batches", ",".join(map(str, args.kernel_batches)),
            "--gate-density", str(args.density),
            "--json", str(out / "decode_kernels.json"), "--md", str(out / "decode_kernels.md")]
    if args.decode_gates:
        argv += ["--decode-gates", args.decode_gates]
    log("== kernels: benchmarks/decode.py " + " ".join(argv))
    t0 = time.perf_counter()
    try:
        rc = decode.main(argv)
    except Exception:  # noqa: BLE001 - step 2 still runs; the rows measured so far are saved
        import traceback
        log("== kernels FAILED:\n" + traceback.format_exc())
        rc = "failed"
    log(f"== kernels done in {time.perf_counter() - t0:.0f} s (exit {rc})")
    return (out / "decode_kernels.md").read_text() if (out / "decode_kernels.md").exists() \
        else None


def generation_rows(res: dict, routed: tuple, B: int) -> list[dict]:
    """The three decodes of one batch as table rows."""
    tokens, seconds, first = routed
    T = res["new_tokens"]
    rows = []
    for name, total, prefill, density in (
            ("dense", res["dense_seconds"], res["dense_prefill_seconds"], None),
            ("dense, routed", seconds, first, None),
            ("sparse", res["sparse_seconds"], res["sparse_prefill_seconds"],
             res["decode_density"])):
        rows.append({"batch": B, "decode": name, "prompt_tokens": res["prompt_tokens"],
                     "new_tokens": T, "seconds": total, "prefill_seconds": prefill,
                     "tokens_per_s": B * T / total,
                     "decode_tokens_per_s": B * (T - 1) / (total - prefill),
                     "decode_density": density})
    rows[2].update(agreement=res["agreement"], matching_prefix=res["matching_prefix"])
    return rows


def markdown(meta: dict, rows: list[dict], kernels: str | None) -> str:
    lines = [f"Model {meta['model']} ({meta['dtype']}) on {meta['device_name']}, torch "
             f"{meta['torch']}, transformers {meta['transformers']}; prompts of "
             f"{meta['prompt_tokens']} held-out tokens ({meta['corpus']}), {meta['new_tokens']} "
             f"greedy tokens, prefill dense; sparse decode: {meta['selection']}, "
             f"token budget {meta['budget_tokens']} ({meta['density']:g} of {meta['context']}), "
             f"block {meta['block_size']}.", "",
             "| batch | decode | prefill s | decode tokens/s | total tokens/s | decode density "
             "| greedy agreement with dense | common prefix |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dens = "-" if r["decode_density"] is None else f"{r['decode_density']:.3f}"
        agr = f"{r['agreement']:.3f}" if "agreement" in r else "-"
        pre = f"{r['matching_prefix']:.1f}" if "matching_prefix" in r else "-"
        lines.append(f"| {r['batch']} | {r['decode']} | {r['prefill_seconds']:.3f} | "
                     f"{r['decode_tokens_per_s']:.2f} | {r['tokens_per_s']:.2f} | {dens} | "
                     f"{agr} | {pre} |")
    for B in sorted({r["batch"] for r in rows}):
        d, s = (next(r for r in rows if r["batch"] == B and r["decode"] == name)
                for name in ("dense", "sparse"))
        lines.append(f"\nBatch {B}: sparse / dense decode tokens per second "
                     f"{s['decode_tokens_per_s'] / d['decode_tokens_per_s']:.2f}x, total "
                     f"{s['tokens_per_s'] / d['tokens_per_s']:.2f}x.")
    if kernels:
        lines += ["", "Kernels at the model's shapes (benchmarks/decode.py):", "", kernels]
    return "\n".join(lines) + "\n"


def check_args(args) -> argparse.Namespace:
    """Defaults filled in, bad values refused (ValueError naming the flag; `main` exits 2)."""
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise fail("--device", "cpu, or cuda on a machine with CUDA", args.device)
    if args.train_steps is None:
        args.train_steps = 300 if cuda else 20
    if args.train_seq_len is None:
        args.train_seq_len = 4096 if cuda else 512
    if args.decode_select == "bounds" and args.decode_gates is not None:
        raise fail("--decode-gates", "no decode gates with --decode-select bounds",
                   args.decode_gates)
    if not 0 < args.density <= 1:
        raise fail("--density", "a share in (0, 1]", args.density)
    if args.new_tokens < 2 or args.context <= args.new_tokens + args.block_size:
        raise fail("--new-tokens", f"at least 2 and below --context - {args.block_size}",
                   args.new_tokens)
    return args


def main(argv: list[str] | None = None) -> int:
    p = parser()
    try:
        args = check_args(p.parse_args(argv))
    except ValueError as e:
        p.error(str(e))  # exit status 2
    cuda = args.device.startswith("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.perf_counter()
    kernels = kernel_step(args, out, log) if args.kernels else None

    import transformers

    from adaptive_sparse.data import pack
    from adaptive_sparse.gates.decode import DecodeProvider, token_budget_policy
    from adaptive_sparse.gates.network import model_shapes
    from adaptive_sparse.io import atomic_write_json, atomic_write_text
    from adaptive_sparse.models import load_model
    from adaptive_sparse.models.generate import compare_generation, greedy_generate
    from benchmarks.decode_quality import held_out, obtain_gates

    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=dtype)
    model.to(args.device)
    log(f"== {args.model} on {args.device} in {time.perf_counter() - t0:.0f} s")
    gate_args = argparse.Namespace(
        decode_gates=args.decode_gates, block_size=args.block_size, corpora=args.corpora,
        train_seq_len=args.train_seq_len, train_seqs=args.train_seqs,
        train_steps=args.train_steps, device=args.device, contexts=[args.context])
    gates, training = obtain_gates(gate_args, model, tok, out, log) \
        if args.decode_select == "gate" else (None, None)
    layers = model_shapes(model)["num_layers"]
    budget = max(1, round(args.density * args.context))
    policy = token_budget_policy(budget, args.block_size)
    prompt_len = args.context - args.new_tokens
    seqs = pack(tok, held_out(args.corpus), prompt_len, max(args.batches))  # [S, prompt]
    fast = cuda  # the fused gate step; on CPU the eager gate (the interpreter would take hours)
    meta = {"model": args.model, "dtype": str(dtype).replace("torch.", ""),
            "device_name": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "prompt_tokens": prompt_len, "new_tokens": args.new_tokens, "corpus": args.corpus,
            "distinct_prompts": seqs.shape[0], "context": args.context,
            "density": args.density, "budget_tokens": budget, "policy": policy.to_dict(),
            "block_size": args.block_size, "fused_gate_step": fast and gates is not None,
            "decode_select": args.decode_select,
            "selection": "the keys' per-block min / max bound" if gates is None else
            f"decode gates ({args.decode_gates or out / 'decode_gates'})",
            "gates": None if gates is None else args.decode_gates or str(out / "decode_gates"),
            "training": training}
    rows, raw = [], []
    for B in args.batches:
        ids = seqs[torch.arange(B) % seqs.shape[0]].to(args.device)
        provider = DecodeProvider(policy, gates=gates, block_size=args.block_size,
                                  num_layers=layers, fast=fast,
                                  decode="gate" if gates is not None else "bounds")
        t0 = time.perf_counter()
        res = compare_generation(model, ids, provider, max_new_tokens=args.new_tokens,
                                 block_size=args.block_size, backend=args.backend, warmup=2)
        routed = greedy_generate(model, ids, max_new_tokens=args.new_tokens,
                                 provider=DecodeProvider(decode="dense",
                                                         block_size=args.block_size),
                                 sparse=True, block_size=args.block_size, backend=args.backend)
        rows += generation_rows(res, routed, B)
        raw.append(res)
        log(f"== batch {B} in {time.perf_counter() - t0:.0f} s: " + "; ".join(
            f"{r['decode']} {r['decode_tokens_per_s']:.1f} decode tokens/s" for r in rows[-3:])
            + f"; agreement {res['agreement']:.3f}, density {res['decode_density']:.3f}")
        if cuda:
            torch.cuda.empty_cache()
        atomic_write_json(out / "decode_e2e.json", {"meta": meta, "rows": rows, "runs": raw})
        atomic_write_text(out / "decode_e2e.md", markdown(meta, rows, kernels))
    md = markdown(meta, rows, kernels)
    log(md)
    log(f"== done in {time.perf_counter() - t_start:.0f} s; {out / 'decode_e2e.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
