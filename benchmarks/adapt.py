"""Sparse-aware adaptation (issue 13, lever "sparse-aware adaptation"): a LoRA trained under the
learned gate's masks, and what it buys at equal density.

    PYTHONPATH=. python3 benchmarks/adapt.py --model qwen2.5-coder-0.5b --gates GATES \\
        --out runs/adapt --device cuda --seq-len 16384 --steps 150 --eval-seq-len 32768 \\
        --eval-docs 3 --densities 0.05 0.1 --needle-lens 32768

1. Training (`gating.adapt.train_adapter`): `--train-docs` sequences of `--seq-len` tokens from
   the corpus's "train" split (the split the gates trained on; quality.py evaluates on
   "validation"), `--steps` steps of one sequence, loss KL(dense base || gate-masked student)
   (`--loss lm`: cross entropy), masks of density policies `--train-densities` in turn.
   Checkpoints in OUT/train/checkpoints (a rerun resumes); the verified adapter artifact in
   OUT/adapter (a rerun with it present and trained for `--steps` skips training).
2. Evaluation on `--eval-docs` held-out "validation" sequences of `--eval-seq-len` tokens
   (quality.py's `make_evaluator`): perplexity of dense, dense+LoRA, and of every gate row (a
   density policy per `--densities`, a threshold policy per `--taus`, and the rows of
   `--rows-from QUALITY_JSON` named by `--methods` at that length, e.g. the calibrated-budget
   gate) without and with the LoRA, each with the density its masks kept; perplexity change
   against the base model's dense perplexity.
3. `--needle-lens`: needle accuracy (adaptive_sparse.data.needle) of dense, dense+LoRA, and the
   gate row at `--needle-density` without and with the LoRA.
Rows go to OUT/adapt.json as they finish (a rerun skips them), the table to OUT/adapt.md, with
device, versions, shapes, tokens trained and wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.quality import Results, environment, make_evaluator  # noqa: E402

VARIANTS = ("base", "lora")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="preset or model path")
    p.add_argument("--gates", required=True, help="a trained gate set (as quality.py --gates)")
    p.add_argument("--out", default="runs/adapt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="weights' dtype (default bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--corpus", default="default")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=16384, help="training tokens per sequence")
    p.add_argument("--train-docs", type=int, default=16, help="training sequences")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    p.add_argument("--loss", default="kl", choices=("kl", "lm"))
    p.add_argument("--train-densities", type=float, nargs="+", default=[0.05, 0.1],
                   help="density policies of the training masks, one per step in turn")
    p.add_argument("--train-backend", default=None, choices=("flex", "reference"),
                   help="differentiable attention (default flex on CUDA, reference on CPU)")
    p.add_argument("--chunk", type=int, default=1024, help="positions per LM-head chunk")
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-seq-len", type=int, default=32768)
    p.add_argument("--eval-docs", type=int, default=3)
    p.add_argument("--densities", type=float, nargs="*", default=[0.05, 0.1],
                   help="gate rows with the density policy")
    p.add_argument("--taus", type=float, nargs="*", default=[],
                   help="gate rows with the threshold policy")
    p.add_argument("--rows-from", default=None, metavar="QUALITY_JSON",
                   help="gate rows of a quality.py table (their params) at --eval-seq-len")
    p.add_argument("--methods", nargs="*", default=["gate/threshold+budgets"],
                   help="which --rows-from methods (default %(default)s)")
    p.add_argument("--backend", default="auto", help="evaluation attention backend")
    p.add_argument("--needle-lens", type=int, nargs="*", default=[])
    p.add_argument("--needle-density", type=float, default=None,
                   help="the gate row of the needle runs (default: the first --densities)")
    p.add_argument("--needle-depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--needle-samples", type=int, default=1, help="prompts per depth")
    return p


def check_args(args) -> None:
    """Refuse bad values (ValueError naming the flag; `main` exits 2 with it)."""
    from adaptive_sparse.errors import fail
    from adaptive_sparse.masks import SUPPORTED_BLOCK_SIZES

    if not Path(args.gates).exists():
        raise fail("--gates", "an existing gate folder (a gates, version_N or run folder)",
                   args.gates)
    if args.block_size not in SUPPORTED_BLOCK_SIZES:
        raise fail("--block-size", f"one of {SUPPORTED_BLOCK_SIZES}", args.block_size)
    for flag in ("seq_len", "eval_seq_len"):
        v = getattr(args, flag)
        if v < 2 * args.block_size:
            raise fail(f"--{flag.replace('_', '-')}", f"at least 2 blocks ({2 * args.block_size}"
                       " tokens)", v)
    for flag in ("train_docs", "steps", "rank", "eval_docs", "chunk", "checkpoint_every",
                 "needle_samples"):
        if getattr(args, flag) < 1:
            raise fail(f"--{flag.replace('_', '-')}", "a positive int", getattr(args, flag))
    if not args.lr > 0 or not args.alpha > 0:
        raise fail("--lr" if not args.lr > 0 else "--alpha", "a positive number",
                   args.lr if not args.lr > 0 else args.alpha)
    for flag in ("train_densities", "densities"):
        bad = [d for d in getattr(args, flag) if not 0 < d <= 1]
        if bad:
            raise fail(f"--{flag.replace('_', '-')}", "densities in (0, 1]", bad)
    if any(not 0 < t < 1 for t in args.taus):
        raise fail("--taus", "thresholds in (0, 1)", args.taus)
    if args.rows_from is not None and not Path(args.rows_from).is_file():
        raise fail("--rows-from", "a quality.json file", args.rows_from)
    if not (args.densities or args.taus or args.rows_from):
        raise fail("--densities", "at least one gate row (--densities, --taus or --rows-from)",
                   args.densities)
    if args.needle_lens:
        if args.needle_density is None and not args.densities:
            raise fail("--needle-density", "a density (or --densities)", None)
        d = args.needle_density if args.needle_density is not None else args.densities[0]
        if not 0 < d <= 1:
            raise fail("--needle-density", "a density in (0, 1]", d)
        if any(n < 64 for n in args.needle_lens):
            raise fail("--needle-lens", "lengths >= 64 tokens", args.needle_lens)


def gate_rows(args) -> list[tuple[str, float, dict]]:
    """(method, target, params) of every gate row: density and threshold policies, and the
    named rows of --rows-from at --eval-seq-len (their stored params)."""
    rows = [("gate", d, {"policy": {"kind": "density", "density": d}}) for d in args.densities]
    rows += [("gate/threshold", t, {"policy": {"kind": "threshold", "tau": t}})
             for t in args.taus]
    if args.rows_from:
        from adaptive_sparse.errors import fail

        table = json.loads(Path(args.rows_from).read_text())
        found = [r for r in table.get("rows", []) if r.get("seq_len") == args.eval_seq_len
                 and r.get("method") in args.methods and r.get("family", "gate") == "gate"]
        if not found:
            raise fail("--rows-from", f"gate rows {args.methods} at {args.eval_seq_len} tokens",
                       args.rows_from)
        rows += [(r["method"], r["target_density"], {"policy": r["params"]["policy"]})
                 for r in found]
    return rows


def train_stage(model, tok, args, out: Path, gates: Path, train_seqs) -> dict:
    """The adapter: loaded (verified) from OUT/adapter when it was trained for --steps, else
    trained (resuming OUT/train's checkpoint) and saved there. Returns its training record."""
    from adaptive_sparse.adapters import (
        detach_lora, gate_weights_sha256, get_lora, load_adapter, read_adapter, save_adapter)
    from gating.adapt import train_adapter

    where = out / "adapter"
    sha = gate_weights_sha256(gates)
    detach_lora(model)
    if (where / "manifest.json").is_file():
        meta = read_adapter(where)[0]["meta"]
        if meta.get("steps") == args.steps:
            load_adapter(where, model, gates_sha256=sha)
            print(f"== adapter in {where} ({args.steps} steps): training skipped", flush=True)
            return {**meta, "reused": True}
    print(f"== training the adapter: {args.steps} steps of {args.seq_len} tokens on "
          f"{args.device}", flush=True)
    info = train_adapter(model, str(gates), train_seqs, out / "train", steps=args.steps,
                         lr=args.lr, rank=args.rank, alpha=args.alpha, targets=args.targets,
                         loss=args.loss, densities=args.train_densities,
                         block_size=args.block_size, backend=args.train_backend,
                         device=args.device, chunk=args.chunk,
                         checkpoint_every=args.checkpoint_every, log_every=args.log_every)
    info.update(model=args.model, corpus=args.corpus, split="train",
                train_sequences=int(len(train_seqs)), seq_len=args.seq_len)
    save_adapter(where, model, info, gates_sha256=sha, overwrite=True)
    get_lora(model).manifest = read_adapter(where)[0]
    print(f"   {info['steps']} steps, {info['tokens']} tokens, {info['seconds']:.0f} s; "
          f"adapter in {where}", flush=True)
    return info


def eval_stage(model, args, results: Results, gates: Path, eval_seqs) -> None:
    """Perplexity rows of both variants (adapter off / on) at --eval-seq-len."""
    from adaptive_sparse.adapters import get_lora

    lora = get_lora(model)
    n = args.eval_seq_len
    base_dense = None
    for variant in VARIANTS:
        lora.enabled = variant == "lora"
        ev = make_evaluator(model, eval_seqs, n, gates, args)
        suffix = "+LoRA" if variant == "lora" else ""
        for method, target, params in gate_rows(args):
            key = results.key(n, f"{method}{suffix}", target)
            if results.get(key) is not None:
                continue
            t0 = time.perf_counter()
            r = ev.evaluate("gate", params)
            dense_key = results.key(n, f"dense{suffix}", 1.0)
            if results.get(dense_key) is None:
                results.add({"key": dense_key, "seq_len": n, "variant": variant,
                             "method": f"dense{suffix}", "target_density": 1.0,
                             "density": 1.0, "perplexity": r["perplexity_dense"]})
            base_dense = results.get(results.key(n, "dense", 1.0))
            row = {"key": key, "seq_len": n, "variant": variant, "method": f"{method}{suffix}",
                   "target_density": target, "params": params, "density": r["density"],
                   "recall": r["recall"], "perplexity": r["perplexity"],
                   "perplexity_dense_variant": r["perplexity_dense"],
                   "per_layer_density": r["per_layer_density"],
                   "seconds": time.perf_counter() - t0}
            results.add(row)
            print(f"  [{n}] {row['method']:<28} target {target:<6g} density "
                  f"{row['density']:.3f}  ppl {row['perplexity']:.4f} ({row['seconds']:.1f} s)",
                  flush=True)
        del ev
    lora.enabled = True
    _fill_changes(results)


def _fill_changes(results: Results) -> None:
    """ppl_change of every row against the base model's dense perplexity at its length."""
    for r in results.data["rows"]:
        base = results.get(results.key(r["seq_len"], "dense", 1.0))
        if base is not None:
            r["ppl_change"] = r["perplexity"] / base["perplexity"] - 1.0
    results.save()


def needle_stage(model, tok, args, results: Results, gates: Path, eval_seqs) -> None:
    """Needle accuracy of dense and the --needle-density gate row, adapter off and on."""
    from adaptive_sparse.adapters import get_lora
    from adaptive_sparse.data import make_needle_samples
    from adaptive_sparse.evaluate import evaluate_needle

    lora = get_lora(model)
    d = args.needle_density if args.needle_density is not None else args.densities[0]
    params = {"policy": {"kind": "density", "density": d}}
    for n in args.needle_lens:
        samples = make_needle_samples(tok, length=n, depths=args.needle_depths,
                                      samples_per_depth=args.needle_samples)
        for variant in VARIANTS:
            lora.enabled = variant == "lora"
            suffix = "+LoRA" if variant == "lora" else ""
            for method in ("dense", "gate"):
                key = f"{n}|needle|{method}{suffix}|{d if method == 'gate' else 1.0}"
                if results.needle(key) is not None:
                    continue
                t0 = time.perf_counter()
                if method == "dense":
                    r = evaluate_needle(model, tok, samples, sparse=False, progress=False)
                else:
                    ev = make_evaluator(model, eval_seqs, args.eval_seq_len, gates, args)
                    provider = ev.provider("gate", params)
                    try:
                        r = evaluate_needle(model, tok, samples, provider, sparse=True,
                                            block_size=args.block_size, backend=args.backend,
                                            progress=False)
                    finally:
                        provider.detach()
                results.add_needle({"key": key, "seq_len": n, "variant": variant,
                                    "method": f"{method}{suffix}",
                                    "target_density": d if method == "gate" else None,
                                    "needle_accuracy": r["needle_accuracy"],
                                    "answers": r["answers"], "samples": len(samples),
                                    "seconds": time.perf_counter() - t0})
                print(f"  [{n}] needle {method}{suffix:<6} accuracy {r['needle_accuracy']:.2f} "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
    lora.enabled = True


def markdown(results: Results) -> str:
    meta = results.data["meta"]
    env, tr = meta.get("environment", {}), meta.get("training") or {}
    lines = [f"# Sparse-aware adaptation: {meta.get('model')}", "",
             f"Device {env.get('gpu', env.get('device'))}, torch {env.get('torch')}, "
             f"transformers {env.get('transformers')}; gates {meta.get('gates')}.",
             f"LoRA rank {tr.get('rank')} alpha {tr.get('alpha')} on {tr.get('targets')}, loss "
             f"{tr.get('loss')}, training densities {tr.get('densities')}: {tr.get('steps')} "
             f"steps x {tr.get('tokens_per_step')} tokens = {tr.get('tokens')} tokens "
             f"({tr.get('train_sequences')} train-split sequences), "
             f"{(tr.get('seconds') or 0) / 60:.2f} device-minutes"
             f"{' (reused)' if tr.get('reused') else ''}.",
             f"Evaluation: {meta.get('eval_docs')} held-out validation sequences; wall time "
             f"{(meta.get('seconds') or 0) / 60:.2f} minutes in all.", "",
             "| length | method | target | density | perplexity | change vs dense |",
             "|---|---|---|---|---|---|"]
    for r in sorted(results.data["rows"], key=lambda r: (r["seq_len"], r["variant"] == "lora",
                                                         r["method"], r["target_density"])):
        ch = r.get("ppl_change")
        lines.append(f"| {r['seq_len']} | {r['method']} | {r['target_density']:g} | "
                     f"{r['density']:.3f} | {r['perplexity']:.4f} | "
                     f"{'' if ch is None else f'{100 * ch:+.2f}%'} |")
    if results.data.get("needle"):
        lines += ["", "| length | needle run | target | accuracy |", "|---|---|---|---|"]
        for r in results.data["needle"]:
            t = r["target_density"]
            lines.append(f"| {r['seq_len']} | {r['method']} | {'' if t is None else f'{t:g}'} "
                         f"| {r['needle_accuracy']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        gate_rows(args)
    except ValueError as e:
        parser.error(str(e))  # exit status 2
    from adaptive_sparse.data import load_corpus, pack, split_documents
    from adaptive_sparse.gates import resolve_gates_dir
    from adaptive_sparse.models import load_model

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        gates = resolve_gates_dir(args.gates)
    except ValueError as e:
        parser.error(f"--gates: {e}")
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    model, tok = load_model(args.model, dtype=getattr(torch, dtype))
    model.to(args.device).eval()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")
    split = split_documents(load_corpus(args.corpus), seed=0, fractions=(0.8, 0.1, 0.1))
    if {d.id for d in split["train"]} & {d.id for d in split["validation"]}:
        raise RuntimeError("corpus split: training and evaluation documents overlap")
    train_seqs = pack(tok, split["train"], args.seq_len, args.train_docs)
    eval_seqs = pack(tok, split["validation"], args.eval_seq_len, args.eval_docs)
    from adaptive_sparse.adapters import detach_lora

    try:
        return _run(model, tok, args, out, gates, train_seqs, eval_seqs, dtype, t0, parser)
    finally:
        detach_lora(model)  # the model object may be shared (load_model's cache)


def _run(model, tok, args, out, gates, train_seqs, eval_seqs, dtype, t0, parser) -> int:
    from adaptive_sparse.io import atomic_write_text

    try:
        info = train_stage(model, tok, args, out, gates, train_seqs)
    except ValueError as e:  # a gate folder or an adapter that does not verify
        parser.error(str(e))
    shapes = {"layers": model.config.num_hidden_layers,
              "heads": model.config.num_attention_heads,
              "kv_heads": model.config.num_key_value_heads,
              "train": list(train_seqs.shape), "eval": list(eval_seqs.shape)}
    from adaptive_sparse.adapters import get_lora

    adapter = get_lora(model).manifest["manifest_sha256"]
    previous = Results(out / "adapt.json", {})
    if previous.data["meta"].get("adapter_sha256") not in (None, adapter):
        for table in ("rows", "needle"):  # measured with another adapter: measured again
            previous.data[table] = [r for r in previous.data.get(table, [])
                                    if r.get("variant") != "lora"]
        previous.save()
    results = Results(out / "adapt.json", {
        "adapter_sha256": adapter,
        "model": args.model, "environment": environment(args.device), "gates": str(gates),
        "training": info, "shapes": shapes, "eval_docs": int(len(eval_seqs)),
        "split": "validation", "corpus": args.corpus, "dtype": dtype,
        "backend": args.backend, "block_size": args.block_size})
    print(f"== evaluation at {args.eval_seq_len} tokens, {len(eval_seqs)} held-out sequences "
          f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    eval_stage(model, args, results, gates, eval_seqs)
    if args.needle_lens:
        print(f"== needle at {args.needle_lens} [{time.perf_counter() - t0:.0f} s]", flush=True)
        needle_stage(model, tok, args, results, gates, eval_seqs)
    results.data["meta"]["seconds"] = time.perf_counter() - t0
    results.save()
    text = markdown(results)
    atomic_write_text(out / "adapt.md", text)
    print(text, flush=True)
    print(f"== done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
