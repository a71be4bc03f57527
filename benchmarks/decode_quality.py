"""Quality of sparse decoding against dense decoding (issue 15, item 5), on held-out text.

For one model (--model) this trains decode gates on the training split of the corpora (or loads
--decode-gates, a decode-gate artifact or a save_decode_gates file; trained gates are written to
OUT/decode_gates as an artifact and reused on a restart; only when --sources has "gate": "bounds",
the keys' per-block min / max bound, and "oracle" need none), then, per context length N and per
decode budget (each source in --sources at each density in --densities; a density d is a token
budget of round(d * N) tokens, i.e. a top-k of ceil(d * N / block) cache blocks per KV head with
the sink and the newest block forced), measures against dense decoding on the same prompts:

- teacher-forced perplexity (task "tf"): each held-out sequence of N + 1 tokens is prefilled
  densely up to N - T tokens, then its last T tokens are fed one at a time through the decode
  path (sparse or dense), each step scoring the next token: T NLLs per sequence, every one
  predicted by a decode step (--tf-tokens T, default 256; 32 on CPU);
- needle retrieval ("needle"): adaptive_sparse.data.needle prompts of N - 16 tokens, the prompt
  but its last token prefilled densely, then greedy decode steps (the first one reads the last
  prompt token) answer; accuracy of the 7-digit value;
- greedy generation ("gen"): chat prompts of N - G tokens (a held-out document, then "explain
  it in detail"), prefilled densely but for the last token, then up to G greedy tokens
  (--gen-tokens G, default 256), stopping when every sequence has produced EOS. Agreement with
  dense: share of the dense answer's positions (up to its EOS) where the sparse token is equal,
  and the mean common prefix; generated length: tokens up to and including EOS, capped at G.

Prefill is always dense (the model's own SDPA attention), once per (task, corpus, length) or
needle sample; only decode steps differ. The "dense" row runs the same decode path with every
block selected (the project's decode kernel: Triton split-KV on CUDA, its PyTorch reference on
CPU), so the comparison isolates the selection. Batching: the sequences of one (corpus, length)
are one batch, and the budgets are decoded together: the prefill cache is repeated once per
budget and `gates.decode.SplitBatchProvider` serves each copy with its own provider, so one
model step advances every budget (--budgets-per-run caps how many share a step, for memory).
The plan line gives the budget-steps to run; after each run the measured time per budget-step
and the decode time left are printed.

    PYTHONPATH=. python benchmarks/decode_quality.py --model qwen2.5-coder-0.5b \\
        --contexts 16384 32768 --device cuda --out runs/decode_quality

Writes OUT/decode_quality.json (environment, shapes, the gates' training, every row with its
per-sequence numbers) and OUT/decode_quality.md after every row; a restart skips rows present.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adaptive_sparse.errors import fail
from adaptive_sparse.gates.decode import model_step
from adaptive_sparse.gates.network import model_shapes
from benchmarks.quality import Results

DENSITIES = (0.05, 0.1, 0.2)
CORPORA = ("stdlib", "essays")
# selections: the decode gates, the oracle, the bounds (the group's max of the per-head bounds)
# and "bounds_mean" (the group's mean of per-head softmaxes); a source may end in "+localN":
# the N cache blocks before the newest forced too, inside the same token budget
SOURCES = ("gate", "oracle", "bounds", "bounds_mean")
_LOCAL = re.compile(r"^(?P<name>[a-z_]+)(\+local(?P<n>[0-9]+))?$")


def parse_source(spec: str) -> tuple[str, int]:
    """"NAME" or "NAME+localN" -> (NAME, N); NAME in SOURCES (exit 2 otherwise)."""
    m = _LOCAL.match(spec)
    if m is None or m["name"] not in SOURCES:
        raise fail("--sources", f"each one of {SOURCES}, optionally with +localN (e.g. "
                   "bounds+local2)", spec)
    return m["name"], int(m["n"] or 0)
INSTRUCTION = ("\n\nExplain in detail what the text above says or does, part by part, "
               "quoting the important names.")
NEEDLE_TOKENS = 12
NEEDLE_DEPTHS = (0.1, 0.5, 0.9)


def held_out(corpus: str) -> list:
    """The documents of `corpus` outside its training split (validation, then test)."""
    from adaptive_sparse.data import load_corpus, split_documents

    split = split_documents(load_corpus(corpus))
    return split["validation"] + split["test"]


def budgets(args) -> list[tuple[str, float | None]]:
    """(source, density) of every run: dense first."""
    return [("dense", None)] + [(s, d) for s in args.sources for d in args.densities]


def make_provider(source: str, density: float | None, n: int, gates, args, num_layers: int):
    from adaptive_sparse.gates.decode import DecodeProvider, token_budget_policy

    if source == "dense":
        return DecodeProvider(decode="dense", block_size=args.block_size), None
    name, local = parse_source(source)
    policy = token_budget_policy(max(1, round(density * n)), args.block_size,
                                 local_blocks=local)
    return DecodeProvider(policy, gates=gates if name == "gate" else None,
                          decode="bounds" if name.startswith("bounds") else name,
                          bounds_combine="mean_prob" if name == "bounds_mean" else "max",
                          block_size=args.block_size, num_layers=num_layers), policy


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def prefill(model, ids: torch.Tensor):
    """Dense prefill of ids [B, L] with the model's own attention: the KV cache."""
    return model_step(model, ids)[1]


@torch.no_grad()
def decode_steps(model, cache, first: torch.Tensor, steps: int, provider, *, block_size: int,
                 backend: str, targets: torch.Tensor | None = None, eos: torch.Tensor | None = None,
                 check_every: int = 8) -> dict:
    """Feed `first` [B] and then `steps - 1` more tokens one at a time through `provider`.

    targets [B, steps]: teacher forcing (step t scores targets[:, t], then feeds it); else greedy
    (the argmax is fed), stopping once every row has produced a token of `eos` (checked every
    `check_every` steps, one host sync each). The cache is cropped back to its entry length.
    Returns {"nll" [B, steps] | "tokens" [B, <= steps], "steps", "seconds"}."""
    from adaptive_sparse.models import sparse_attention

    start = cache.get_seq_length()
    cur, nll, tokens = first[:, None], [], []
    sync(first.device)
    t0 = time.perf_counter()
    with sparse_attention(model, provider, block_size=block_size, backend=backend):
        for t in range(steps):
            logits = model_step(model, cur, cache)[0][:, -1]
            if targets is not None:
                nll.append(F.cross_entropy(logits.float(), targets[:, t], reduction="none"))
                cur = targets[:, t, None]
            else:
                cur = logits.argmax(-1, keepdim=True)
                tokens.append(cur)
                if eos is not None and (t + 1) % check_every == 0 and bool(
                        torch.isin(torch.cat(tokens, 1), eos).any(1).all()):
                    break
    sync(first.device)
    out = {"seconds": time.perf_counter() - t0, "steps": cache.get_seq_length() - start}
    cache.crop(-out["steps"])
    if targets is not None:
        out["nll"] = torch.stack(nll, 1).cpu()
    else:
        out["tokens"] = torch.cat(tokens, 1).cpu()
    return out


def run_budgets(model, cache, first: torch.Tensor, steps: int, chunk, gates, args, n: int, *,
                targets=None, eos=None, check_every: int = 8) -> list[dict]:
    """The budgets of `chunk` ([(source, density)]) decoded together: the cache of B sequences
    repeated once per budget (rows p * B ..), one `SplitBatchProvider`, then the cache restored
    to its B rows. Returns per budget {"nll" | "tokens" (its B rows), "density", "policy",
    "steps", "seconds" (of the whole batched run)}."""
    from adaptive_sparse.gates.decode import SplitBatchProvider

    B, P = first.shape[0], len(chunk)
    layers = model_shapes(model)["num_layers"]
    made = [make_provider(s, d, n, gates, args, layers) for s, d in chunk]
    rows = torch.arange(B, device=first.device)
    cache.reorder_cache(rows.repeat(P))
    r = decode_steps(model, cache, first.repeat(P), steps,
                     SplitBatchProvider([p for p, _ in made], block_size=args.block_size),
                     block_size=args.block_size, backend=args.backend,
                     targets=None if targets is None else targets.repeat(P, 1), eos=eos,
                     check_every=check_every)
    cache.reorder_cache(rows)
    out = []
    for i, (provider, policy) in enumerate(made):
        part = {k: v[i * B:(i + 1) * B] for k, v in r.items() if k in ("nll", "tokens")}
        out.append({**part, "density": provider.decode_density(), "steps": r["steps"],
                    "seconds": r["seconds"], "policy": None if policy is None
                    else policy.to_dict(), "batched_budgets": P})
    return out


def chunks(todo: list, size: int) -> list[list]:
    size = size or len(todo)
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def answer_length(tokens: torch.Tensor, eos: set[int]) -> list[int]:
    """Per row of tokens [B, L]: tokens up to and including the first EOS, else L."""
    out = []
    for row in tokens.tolist():
        hit = next((i for i, t in enumerate(row) if t in eos), None)
        out.append(len(row) if hit is None else hit + 1)
    return out


def agreement(dense: torch.Tensor, sparse: torch.Tensor, lengths: list[int]) -> dict:
    """Agreement of greedy tokens with dense over the dense answers (lengths: each dense
    answer's length): share of equal positions and mean common prefix."""
    same, prefixes = 0, []
    for b, n in enumerate(lengths):
        d, s = dense[b, :n].tolist(), sparse[b, :n].tolist()
        eq = [x == y for x, y in zip(d, s)] + [False] * (n - min(n, len(s)))
        same += sum(eq)
        prefixes.append(next((i for i, e in enumerate(eq) if not e), n))
    return {"agreement": same / max(1, sum(lengths)),
            "matching_prefix": sum(prefixes) / len(prefixes)}


def chat_parts(tokenizer, chat: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after the document in a generation prompt."""
    pre, post = "", INSTRUCTION
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}],
                                             add_generation_prompt=True, tokenize=False)
        pre, tail = text.split("\x00")
        post = INSTRUCTION + tail

    def enc(s):
        return list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []

    return enc(pre), enc(post)


class Plan:
    """Budget-steps (a decode step of one budget; budgets decoded together share a step) planned
    and done, for the time estimate: the seconds per budget-step measured so far times those
    left (prefill counted apart)."""

    def __init__(self, total_steps: int):
        self.total, self.done, self.seconds = total_steps, 0, 0.0
        self.t0 = time.perf_counter()

    def step(self, planned: int, seconds: float) -> None:
        self.done += planned
        self.seconds += seconds

    def eta(self) -> str:
        elapsed = time.perf_counter() - self.t0
        if not self.seconds:
            return f"[{elapsed:.0f} s]"
        per = self.seconds / max(1, self.done)
        return (f"[{elapsed:.0f} s, {1e3 * per:.1f} ms/budget-step, "
                f"~{per * (self.total - self.done):.0f} s of decode left]")


def obtain_gates(args, model, tok, out: Path, log):
    """(DecodeGateSet on the device, training info or None)."""
    from adaptive_sparse.export.decode import (
        load_decode_gate_artifact, load_decode_gates_any, save_decode_gate_artifact)
    from adaptive_sparse.gates.decode import token_budget_policy, train_decode_gates

    if args.decode_gates:
        log(f"== decode gates from {args.decode_gates}")
        gates = load_decode_gates_any(args.decode_gates, model, check="architecture")
        info = None
    elif (out / "decode_gates" / "manifest.json").exists():
        art = load_decode_gate_artifact(out / "decode_gates", model, check="architecture")
        gates, info = art.gates, art.manifest["method"]["params"]
        log(f"== decode gates reused from {out / 'decode_gates'} ({info.get('steps')} steps)")
    else:
        from adaptive_sparse.data import load_corpus, pack, split_documents

        seqs = torch.cat([pack(tok, split_documents(load_corpus(c))["train"],
                               args.train_seq_len, args.train_seqs) for c in args.corpora])
        log(f"== training decode gates: {args.train_steps} steps, {seqs.shape[0]} x "
            f"{seqs.shape[1]} tokens of the training split of {', '.join(args.corpora)}")
        t0 = time.perf_counter()
        gates, hist = train_decode_gates(model, seqs.to(args.device), steps=args.train_steps,
                                         lr=2e-3, queries=32, block_size=args.block_size,
                                         log_every=max(1, args.train_steps // 5))
        info = {"steps": args.train_steps, "sequences": seqs.shape[0],
                "seq_len": seqs.shape[1], "corpora": list(args.corpora),
                "seconds": time.perf_counter() - t0, "kl_first": hist[0], "kl_last": hist[-1],
                "kl_last10": sum(hist[-10:]) / len(hist[-10:])}
        log(f"   KL {hist[0]:.3f} -> {info['kl_last10']:.3f} (mean of the last 10) in "
            f"{info['seconds']:.0f} s")
        save_decode_gate_artifact(out / "decode_gates", gates.cpu(),
                                  token_budget_policy(round(0.1 * args.contexts[-1]),
                                                      args.block_size),
                                  model=model, params=info, overwrite=True)
    if gates.config.block_size != args.block_size:
        raise fail("--block-size", f"{gates.config.block_size} (that of the gates)",
                   args.block_size)
    return gates.to(args.device).eval(), info


def run_group(task: str, corpus: str, n: int, ids: torch.Tensor, results: Results, gates,
              args, model, plan: Plan, log, *, steps: int, targets=None, eos=None,
              extra=None) -> None:
    """Every budget of one (task, corpus, length) on the batch ids [B, L]: one dense prefill of
    ids[:, :-1], then the decode runs (dense first), --budgets-per-run budgets at a time."""
    todo = [(s, d) for s, d in budgets(args)
            if results.get(row_key(task, corpus, n, s, d)) is None]
    if not todo:
        return
    dense = results.get(row_key(task, corpus, n, "dense", None))  # the sparse rows' reference
    if dense is not None and targets is None:
        dense = torch.tensor(dense["token_ids"])
    sync(args.device)
    t0 = time.perf_counter()
    cache = prefill(model, ids[:, :-1])
    sync(args.device)
    log(f"  [{task} {corpus} {n}] prefill {ids.shape[0]} x {ids.shape[1] - 1} tokens in "
        f"{time.perf_counter() - t0:.1f} s")
    for chunk in chunks(todo, args.budgets_per_run):
        measured = run_budgets(model, cache, ids[:, -1], steps, chunk, gates, args, n,
                               targets=targets, eos=eos)
        plan.step(steps * len(chunk), measured[0]["seconds"])
        for (source, density), r in zip(chunk, measured):
            row = {"key": row_key(task, corpus, n, source, density), "task": task,
                   "corpus": corpus, "context": n, "source": source,
                   "target_density": density, "policy": r["policy"], "density": r["density"],
                   "batch": ids.shape[0], "prompt_tokens": ids.shape[1], "steps": r["steps"],
                   "seconds": r["seconds"], "batched_budgets": r["batched_budgets"],
                   "ms_per_step": 1e3 * r["seconds"] / max(1, r["steps"])}
            if targets is not None:
                nll = r["nll"].double()
                row.update(nll=float(nll.mean()), perplexity=math.exp(float(nll.mean())),
                           tokens=nll.numel(), nll_per_sequence=nll.mean(1).tolist())
            if source == "dense":
                dense = r["tokens"] if targets is None else row
            if targets is None:
                row.update(extra(r["tokens"], dense))
            elif source != "dense":
                row["ppl_change"] = row["perplexity"] / dense["perplexity"] - 1.0
            results.add(row)
            log(f"  [{task} {corpus} {n}] {label(source, density):<12} {summary_cell(row)}  "
                f"{row['ms_per_step']:.1f} ms/step ({len(chunk)} budgets) {plan.eta()}")
    del cache


def label(source: str, density) -> str:
    return "dense" if source == "dense" else f"{source}@{density:g}"


def row_key(task, corpus, n, source, density) -> str:
    return f"{task}|{corpus}|{n}|{source}|{density}"


def summary_cell(r: dict) -> str:
    dens = "-" if r["density"] is None else f"{r['density']:.3f}"
    if r["task"] == "tf":
        ch = r.get("ppl_change")
        return f"density {dens} ppl {r['perplexity']:.4f}" + (
            "" if ch is None else f" ({100 * ch:+.2f}%)")
    if r["task"] == "needle":
        return f"density {dens} needle {r['needle_accuracy']:.3f}"
    return (f"density {dens} agreement {r['agreement']:.3f} prefix {r['matching_prefix']:.1f} "
            f"length {r['mean_length']:.1f}")


def markdown(results: Results) -> str:
    meta = results.data["meta"]
    rows = results.data["rows"]
    lines = [f"Model {meta.get('model')}, block {meta.get('block_size')}, "
             f"{meta.get('environment', {}).get('device')}, dtype {meta.get('dtype')}; "
             f"prefill dense, decode through the decode path. Density: mean share of the "
             f"cache blocks read per decode step.", ""]
    tf = [r for r in rows if r["task"] == "tf"]
    if tf:
        lines += [f"Teacher-forced perplexity over the last {meta.get('tf_tokens')} tokens "
                  "(each predicted by a decode step):", "",
                  "| corpus | context | budget | density | perplexity | vs dense | seqs |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(tf, key=_order):
            ch = r.get("ppl_change")
            lines.append(f"| {r['corpus']} | {r['context']} | "
                         f"{label(r['source'], r['target_density'])} | {_f(r['density'])} | "
                         f"{r['perplexity']:.4f} | {'-' if ch is None else f'{100 * ch:+.2f}%'}"
                         f" | {r['batch']} |")
        lines.append("")
    nd = [r for r in rows if r["task"] == "needle"]
    if nd:
        lines += ["Needle retrieval (greedy answer, decode path):", "",
                  "| context | budget | density | accuracy | samples |", "|---|---|---|---|---|"]
        for r in sorted(nd, key=_order):
            lines.append(f"| {r['context']} | {label(r['source'], r['target_density'])} | "
                         f"{_f(r['density'])} | {r['needle_accuracy']:.3f} | {r['samples']} |")
        lines.append("")
    gen = [r for r in rows if r["task"] == "gen"]
    if gen:
        lines += [f"Greedy generation (up to {meta.get('gen_tokens')} tokens, chat prompts): "
                  "agreement with dense over the dense answer, mean common prefix, answer "
                  "length (to EOS, capped):", "",
                  "| corpus | context | budget | density | agreement | common prefix | "
                  "mean length | capped |", "|---|---|---|---|---|---|---|---|"]
        for r in sorted(gen, key=_order):
            lines.append(f"| {r['corpus']} | {r['context']} | "
                         f"{label(r['source'], r['target_density'])} | {_f(r['density'])} | "
                         f"{r['agreement']:.3f} | {r['matching_prefix']:.1f} | "
                         f"{r['mean_length']:.1f} | {r['capped']}/{r['batch']} |")
        lines.append("")
    return "\n".join(lines)


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _order(r):
    return (r.get("corpus", ""), r["context"], r["source"] != "dense", r["source"],
            r["target_density"] or 0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/decode_quality")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--contexts", type=int, nargs="+", default=None,
                   help="context lengths N (default: 16384 32768 on CUDA, 1024 2048 on CPU)")
    p.add_argument("--corpora", nargs="+", default=list(CORPORA))
    p.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    p.add_argument("--sources", nargs="+", default=["gate"],
                   help="selections to measure: the decode gates (gate), the keys' per-block "
                        "min / max bound (bounds, training-free; bounds_mean: the query group "
                        "combined by its mean softmax), the oracle (the true attention mass per "
                        "block, a bound); NAME+localN also forces the N blocks before the newest")
    p.add_argument("--block-size", type=int, choices=(16, 32, 64, 128), default=64)
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"))
    p.add_argument("--eval-seqs", type=int, default=None,
                   help="held-out sequences per corpus and length (default 4 CUDA, 2 CPU)")
    p.add_argument("--tf-tokens", type=int, default=None,
                   help="teacher-forced decode steps T (default 256 CUDA, 32 CPU)")
    p.add_argument("--gen-tokens", type=int, default=None,
                   help="greedy tokens generated at most (default 256 CUDA, 32 CPU)")
    p.add_argument("--needle-per-depth", type=int, default=None,
                   help="needle samples per depth 0.1/0.5/0.9 (default 2 CUDA, 1 CPU)")
    p.add_argument("--tasks", nargs="+", choices=("tf", "needle", "gen"),
                   default=["tf", "needle", "gen"])
    p.add_argument("--budgets-per-run", type=int, default=0,
                   help="budgets decoded together, each on its own copy of the batch "
                        "(default 0: all of them in one run)")
    p.add_argument("--decode-gates", default=None,
                   help="decode-gate artifact directory or save_decode_gates file (else train)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="decode-gate distillation steps (default 300 CUDA, 20 CPU)")
    p.add_argument("--train-seq-len", type=int, default=None,
                   help="training sequence length (default 4096 CUDA, 512 CPU)")
    p.add_argument("--train-seqs", type=int, default=16,
                   help="training sequences per corpus (default %(default)s)")
    return p


def defaults(args) -> argparse.Namespace:
    cuda = args.device.startswith("cuda")
    for name, gpu, cpu in (("contexts", [16384, 32768], [1024, 2048]), ("eval_seqs", 4, 2),
                           ("tf_tokens", 256, 32), ("gen_tokens", 256, 32),
                           ("needle_per_depth", 2, 1), ("train_steps", 300, 20),
                           ("train_seq_len", 4096, 512),
                           ("dtype", "bfloat16", "float32")):
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    if args.budgets_per_run < 0:
        raise fail("--budgets-per-run", "an int >= 0", args.budgets_per_run)
    for name in ("eval_seqs", "tf_tokens", "gen_tokens", "needle_per_depth", "train_steps",
                 "train_seq_len", "train_seqs"):
        if getattr(args, name) < 1:
            raise fail(f"--{name.replace('_', '-')}", "a positive int", getattr(args, name))
    for spec in args.sources:
        parse_source(spec)
    if any(d <= 0 or d > 1 for d in args.densities):
        raise fail("--densities", "values in (0, 1]", args.densities)
    small = min(args.contexts)
    if small <= max(args.tf_tokens, args.gen_tokens, NEEDLE_TOKENS + 4) + 256:
        raise fail("--contexts", "lengths above the decoded tokens + 256", small)
    if cuda and not torch.cuda.is_available():
        raise fail("--device", "cpu, or cuda on a machine with CUDA", args.device)
    return args


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = defaults(parser.parse_args(argv))
    except ValueError as e:
        parser.error(str(e))  # exit status 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from adaptive_sparse.data import make_needle_samples, pack, score_answer
    from adaptive_sparse.io import atomic_write_text
    from adaptive_sparse.models import load_model
    from benchmarks.common import environment

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    model.to(args.device)
    log(f"== {args.model} ({args.dtype}) on {args.device} in {time.perf_counter() - t0:.0f} s")
    gates, training = obtain_gates(args, model, tok, out, log) \
        if any(parse_source(spec)[0] == "gate" for spec in args.sources) \
        else (None, None)
    import transformers
    env = {**environment(), "transformers": transformers.__version__}
    shapes = dict(model_shapes(model))
    results = Results(out / "decode_quality.json", {
        "model": args.model, "dtype": args.dtype, "environment": env, "shapes": shapes,
        "block_size": args.block_size, "backend": args.backend, "training": training,
        "decode_gates": (args.decode_gates or str(out / "decode_gates"))
        if gates is not None else None,
        "tf_tokens": args.tf_tokens, "gen_tokens": args.gen_tokens,
        "needle_tokens": NEEDLE_TOKENS, "split": "validation + test (held out)",
        "corpora": list(args.corpora)})

    B, needle_n = args.eval_seqs, len(NEEDLE_DEPTHS) * args.needle_per_depth
    steps = {"tf": args.tf_tokens, "gen": args.gen_tokens, "needle": needle_n * NEEDLE_TOKENS}
    total = sum(steps[t] for t in args.tasks for n in args.contexts
                for c in (args.corpora if t != "needle" else ["essays"])
                for s, d in budgets(args) if results.get(row_key(t, c, n, s, d)) is None)
    plan = Plan(total)
    log(f"== plan: contexts {args.contexts}, corpora {args.corpora}, budgets "
        f"{[label(s, d) for s, d in budgets(args)]}, batch {B}: at most {total} budget-steps "
        f"left + {len(args.contexts) * (2 * len(args.corpora) + needle_n)} prefills;"
        " the time left is printed after each run from the measured ms/step")
    eos_ids = {tok.eos_token_id} | set(
        [model.generation_config.eos_token_id] if isinstance(
            model.generation_config.eos_token_id, int)
        else (model.generation_config.eos_token_id or []))
    eos_ids.discard(None)
    eos = torch.tensor(sorted(eos_ids), device=args.device)
    chat = bool(getattr(tok, "chat_template", None))
    pre, post = chat_parts(tok, chat)

    def gen_extra(tokens, dense):
        lengths = answer_length(tokens, eos_ids)
        ref = dense if dense is not None else tokens
        ref_len = answer_length(ref, eos_ids)
        return {**agreement(ref, tokens, ref_len), "lengths": lengths,
                "mean_length": sum(lengths) / len(lengths),
                "capped": sum(n >= args.gen_tokens for n in lengths),
                "dense_lengths": ref_len, "token_ids": tokens.tolist()}

    for n in args.contexts:
        for corpus in args.corpora:
            docs = None
            if "tf" in args.tasks:
                docs = held_out(corpus)
                ids = pack(tok, docs, n + 1, B).to(args.device)  # [B, N + 1]
                T = args.tf_tokens
                # prefill ids[:, :N - T + 1][:, :-1] = N - T tokens; feed x[N - T .. N - 1]
                run_group("tf", corpus, n, ids[:, :n - T + 1], results, gates, args, model,
                          plan, log, steps=T, targets=ids[:, n - T + 1:])
                atomic_write_text(out / "decode_quality.md", markdown(results))
            if "gen" in args.tasks:
                docs = docs or held_out(corpus)
                body = pack(tok, docs, n - args.gen_tokens - len(pre) - len(post), B)
                ids = torch.cat([torch.tensor([pre] * body.shape[0], dtype=torch.long), body,
                                 torch.tensor([post] * body.shape[0], dtype=torch.long)], 1)
                run_group("gen", corpus, n, ids.to(args.device), results, gates, args, model,
                          plan, log, steps=args.gen_tokens, eos=eos, extra=gen_extra)
                atomic_write_text(out / "decode_quality.md", markdown(results))
        if "needle" in args.tasks:
            needle(n, args, model, tok, gates, results, plan, log, eos, eos_ids, score_answer,
                   make_needle_samples)
            atomic_write_text(out / "decode_quality.md", markdown(results))
    md = markdown(results)
    atomic_write_text(out / "decode_quality.md", md)
    log(md)
    log(f"== done in {time.perf_counter() - t0:.0f} s; {out / 'decode_quality.json'}")
    return 0


def needle(n, args, model, tok, gates, results, plan, log, eos, eos_ids, score_answer,
           make_needle_samples) -> None:
    """Needle accuracy per budget at context n: each sample prefilled once (B = 1: prompt
    lengths differ), the budgets' greedy answers decoded from that cache together."""
    todo = [(s, d) for s, d in budgets(args)
            if results.get(row_key("needle", "essays", n, s, d)) is None]
    if not todo:
        return
    samples = make_needle_samples(tok, length=n - NEEDLE_TOKENS - 4, depths=NEEDLE_DEPTHS,
                                  samples_per_depth=args.needle_per_depth, seed=0)
    runs = {b: {"answers": [], "seconds": 0.0, "steps": 0, "sel": 0.0} for b in todo}
    for s in samples:
        ids = s.input_ids[None].to(args.device)
        cache = prefill(model, ids[:, :-1])
        for chunk in chunks(todo, args.budgets_per_run):
            measured = run_budgets(model, cache, ids[:, -1], NEEDLE_TOKENS, chunk, gates, args,
                                   n, eos=eos, check_every=1)
            plan.step(NEEDLE_TOKENS * len(chunk), measured[0]["seconds"])
            for budget, r in zip(chunk, measured):
                text = tok.decode([t for t in r["tokens"][0].tolist() if t not in eos_ids],
                                  skip_special_tokens=True)
                run = runs[budget]
                run["answers"].append({"answer": text, "expected": s.answer, "depth": s.depth,
                                       "prompt_tokens": ids.shape[1],
                                       "correct": score_answer(text, s.answer)})
                run["seconds"] += r["seconds"]
                run["steps"] += r["steps"]
                run["policy"] = r["policy"]
                if r["density"] is not None:
                    run["sel"] += r["density"] * r["steps"]
        del cache
    for (source, density), run in runs.items():
        acc = sum(a["correct"] for a in run["answers"]) / len(run["answers"])
        row = {"key": row_key("needle", "essays", n, source, density), "task": "needle",
               "corpus": "essays", "context": n, "source": source, "target_density": density,
               "policy": run["policy"], "density": run["sel"] / run["steps"]
               if source != "dense" else None, "needle_accuracy": acc,
               "samples": len(samples), "answers": run["answers"], "steps": run["steps"],
               "seconds": run["seconds"], "batch": 1,
               "ms_per_step": 1e3 * run["seconds"] / max(1, run["steps"])}
        results.add(row)
        log(f"  [needle {n}] {label(source, density):<12} {summary_cell(row)} {plan.eta()}")


if __name__ == "__main__":
    sys.exit(main())
