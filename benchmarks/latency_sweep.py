"""The sparsity frontier against measured latency: an Optuna sweep with objectives
[latency_ms, ppl_change] (issue 13), latency measured by our kernel on each trial's own masks.

    python3 benchmarks/latency_sweep.py --model qwen2.5-coder-0.5b --seq-len 32768 \\
        --gates G --out OUT --trials 40 --time-budget 170

Every method of the zoo (learned gate with threshold and top-p policies when ``--gates`` is
given, the oracle with a threshold policy, and the patterns: sliding window, Longformer, BigBird,
strided, LSH, hierarchical, vertical-slash, antidiagonal) gets the same share of trials (slot i
-> method i mod M). A trial evaluates perplexity on ``--docs`` held-out sequences (the
validation split of ``--corpus``, which gate training never reads) with the model in
``--dtype``, then times our kernel on the masks it recorded (``sweeps.latency``: attention_ms
summed over layers, plus the provider's mask-building time for input-dependent methods).

Dense baselines, timed in the same run at the same shapes (B = 1, Hq, Hkv, N, D, the model's
dtype), every layer: SDPA cuDNN and flash (``benchmarks.common.dense_baselines``, per-layer
median x layers: the layers' shapes are identical) and our kernel with the full causal mask
(``sweeps.latency.attention_ms``, exactly as a trial's masks are timed).

Resumable: the study is a journal in OUT (study.log); running the same command again skips
finished trials and continues up to ``--trials``. ``--time-budget`` (seconds since start) stops
before a trial that would not finish in time (estimated from the last one), keeping what is done.
Writes OUT/latency_front.json and .md (the Pareto front per method and overall, device,
versions, shapes, dense baselines) and, through ``sweeps.frontier.write_report``,
OUT/frontier.{json,csv,png} with latency_ms as the cost, and OUT/latency_front.png: every
method's Pareto front against latency (faint: every trial), the dense baselines as labelled
vertical lines. Exit status 2 for a bad argument.

Redraw a committed result without a model (no sweep, no GPU): ``--render JSON`` reads a
latency_front.json and writes the picture and table beside it (JSON's name with .png / .md)::

    python3 benchmarks/latency_sweep.py \\
        --render benchmarks/results/latency_front_qwen25_32k_h200.json

A JSON written before the trials were kept in it (``trials``) holds the fronts only: the picture
then draws the Pareto fronts alone and says so in its title and in the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

OBJECTIVES = ["latency_ms", "ppl_change"]
STOP_RESERVE_S = 10.0  # kept for the report at the end of a --time-budget run
# a front row of latency_front.json, and the keys --render reads
ROW_KEYS = ("trial", "method", "latency_ms", "attention_ms", "mask_ms", "density", "ppl_change",
            "recall", "params")
TOP_KEYS = ("model", "environment", "timed_on", "shapes", "docs", "corpus", "dense_ms", "counts",
            "fronts")


def methods(seq_len: int, bs: int) -> dict[str, dict]:
    """Search ranges of every method at this length (sweep config ``methods``); knobs in tokens
    or blocks grow with the number of key blocks ``kb``."""
    kb = math.ceil(seq_len / bs)
    tau = {"low": 1e-4, "high": 0.1, "log": True}
    window = {"low": bs, "high": max(bs, seq_len // 4), "log": True}
    return {
        "gate/threshold": {"tau": tau, "keep_sink": True, "keep_diagonal": True},
        "gate/top_p": {"p": {"low": 0.7, "high": 0.999}, "keep_sink": True,
                       "keep_diagonal": True},
        "oracle/threshold": {"tau": tau, "target": "sum"},
        "sliding_window": {"window": window, "sink_blocks": 1},
        "longformer": {"window": window, "global_blocks": {"low": 1, "high": 4}},
        "bigbird": {"window": {**window, "high": max(bs, seq_len // 8)},
                    "global_blocks": {"low": 1, "high": 2},
                    "random_blocks": {"low": 0, "high": max(1, kb // 64)}, "seed": 0},
        "strided": {"local_blocks": {"low": 1, "high": max(1, kb // 16)},
                    "stride": {"low": 2, "high": max(2, kb // 4), "log": True}},
        "lsh": {"n_buckets": [b for b in (4, 8, 16, 32, 64) if b <= max(4, kb)],
                "n_rounds": {"low": 1, "high": 2}, "seed": 0},
        "hierarchical": {"budget": {"low": 2.0, "high": max(2.0, kb / 4), "log": True}},
        "vertical_slash": {"n_vertical": {"low": 1, "high": max(1, kb // 8), "log": True},
                           "n_slash": {"low": 1, "high": max(1, kb // 8), "log": True}},
        "antidiagonal": {"threshold": {"low": 0.5, "high": 0.99}, "stride": 16},
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latency_sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="preset or path (load_model)")
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--gates", default=None,
                   help="trained gate folder (gate/threshold and gate/top_p; none: no gate)")
    p.add_argument("--out", default="runs/latency_sweep")
    p.add_argument("--trials", type=int, default=40, help="trial slots of the study in all")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds since start; no trial is started that would end later "
                        "(0: none)")
    p.add_argument("--docs", type=int, default=1, help="held-out sequences per evaluation")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    p.add_argument("--methods", nargs="+", default=None, help="default: every method")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.03, 0.05],
                   help="quality budgets of the report (0.01 = +1%% perplexity)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--corpus", default="default")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="model and timing dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--backend", default="auto",
                   help="attention backend of evaluation and timing (auto: triton on CUDA, "
                        "gather on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", default=None, metavar="JSON",
                   help="redraw JSON's picture (.png) and table (.md) beside it from a "
                        "latency_front.json, without a model; --budgets when JSON has none")
    return p


def check_args(args) -> dict[str, dict]:
    """The methods to sweep; ValueError naming the bad argument."""
    from adaptive_sparse.attention.api import BACKENDS
    from adaptive_sparse.errors import fail
    from adaptive_sparse.masks import SUPPORTED_BLOCK_SIZES

    for name, low in (("seq_len", 2), ("trials", 1), ("docs", 1), ("reps", 1)):
        if getattr(args, name) < low:
            raise fail(f"--{name.replace('_', '-')}", f"an int >= {low}", getattr(args, name))
    if not (args.time_budget >= 0 and math.isfinite(args.time_budget)):
        raise fail("--time-budget", "seconds >= 0 (0: none)", args.time_budget)
    if args.block_size not in SUPPORTED_BLOCK_SIZES:
        raise fail("--block-size", f"one of {SUPPORTED_BLOCK_SIZES}", args.block_size)
    if args.seq_len < args.block_size:
        raise fail("--seq-len", f"at least the block size {args.block_size}", args.seq_len)
    if args.backend not in BACKENDS:
        raise fail("--backend", f"one of {list(BACKENDS)}", args.backend)
    if any(not (b >= 0 and math.isfinite(b)) for b in args.budgets):
        raise fail("--budgets", "numbers >= 0 (0.01 = +1% perplexity)", args.budgets)
    dev = args.device
    if not (dev == "cpu" or dev.split(":")[0] == "cuda") or \
            (dev != "cpu" and not torch.cuda.is_available()):
        raise fail("--device", "cpu, or cuda[:N] on a machine with a GPU", dev)
    if args.gates is not None:
        from adaptive_sparse.gates import resolve_gates_dir
        try:
            args.gates = str(resolve_gates_dir(args.gates).resolve())
        except ValueError as e:
            raise ValueError(f"--{e}") from None
    every = methods(args.seq_len, args.block_size)
    wanted = args.methods or [m for m in every if args.gates or not m.startswith("gate/")]
    unknown = [m for m in wanted if m not in every]
    if unknown:
        raise fail("--methods", f"names from {sorted(every)}", unknown)
    if args.gates is None and any(m.startswith("gate/") for m in wanted):
        raise fail("--gates", "a trained gate folder for the gate/* methods", None)
    return {m: every[m] for m in wanted}


def dense_rows(model, args, dtype) -> dict[str, float]:
    """ms of dense attention summed over the layers at the model's shapes: SDPA per backend
    (per-layer median x layers) and our kernel with full causal masks (as trials are timed)."""
    from adaptive_sparse.gates import model_shapes
    from adaptive_sparse.masks import BlockSparseMask
    from benchmarks.common import dense_baselines
    from sweeps.latency import attention_ms

    s = model_shapes(model)
    n, layers = args.seq_len, s["num_layers"]
    q_shape, kv_shape = (1, s["num_heads"], n, s["head_dim"]), (1, s["num_kv_heads"], n,
                                                                s["head_dim"])
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    q, k, v = (torch.randn(*shape, generator=gen, device=args.device, dtype=dtype)
               for shape in (q_shape, kv_shape, kv_shape))
    rows = {f"sdpa_{name}": ms * layers
            for name, ms in dense_baselines(q, k, v, s["head_dim"] ** -0.5).items()}
    del q, k, v
    full = BlockSparseMask.full(1, 1, block_size=args.block_size, q_len=n, kv_len=n,
                                device=args.device)
    rows["ours_dense"] = attention_ms([{layer: full for layer in range(layers)}], q_shape,
                                      kv_shape, dtype=dtype, device=args.device,
                                      backend=args.backend, reps=args.reps)
    return rows


def sweep(cfg, out: Path, evaluator, args, t0: float) -> str | None:
    """Run the study slot by slot up to ``args.trials`` (``sweeps.cli.run_sweep`` per added
    slot, so the time budget is checked between trials). Returns why it stopped early, or
    None. A resumed run starts at the slots the study already has (they are finished or
    retried first)."""
    from sweeps.cli import run_sweep
    from sweeps.frontier import load_run
    from sweeps.study import trial_counts

    have = trial_counts(load_run(out)[1])["slots"] if (out / "sweep.json").exists() else 0
    last = 0.0
    for n in range(max(1, min(have, args.trials)), args.trials + 1):
        left = args.time_budget - (time.monotonic() - t0) - STOP_RESERVE_S
        if args.time_budget and last > left:
            return (f"time budget: {n - 1} of {args.trials} slots after "
                    f"{time.monotonic() - t0:.0f} s (the last trial took {last:.1f} s); run "
                    f"the same command again to continue")
        start = time.monotonic()
        # a fresh sampler per call: seeded per slot so it does not propose the same point again
        run_sweep(dataclasses.replace(cfg, n_trials=n, seed=args.seed + n), out,
                  evaluator=evaluator, progress=False)
        last = time.monotonic() - start
    return None


def front_rows(report: dict, dense: dict[str, float]) -> dict[str, list[dict]]:
    """{"overall" | method: the rows of its Pareto front, by latency}, with the speedup over
    each dense baseline."""
    rows = {r["trial"]: r for r in report["trials"]}
    keys = ROW_KEYS
    out = {}
    for name, trials in report["fronts"].items():
        picked = sorted((rows[t] for t in trials), key=lambda r: r["latency_ms"])
        out[name] = [{**{k: r.get(k) for k in keys},
                      **{f"speedup_vs_{d}": ms / r["latency_ms"] for d, ms in dense.items()}}
                     for r in picked]
    return out


# display names of dense_rows' keys in the picture
BASELINE_NAMES = {"sdpa_cudnn": "SDPA cuDNN", "sdpa_flash": "SDPA flash",
                  "sdpa_efficient": "SDPA efficient", "sdpa_math": "SDPA math",
                  "ours_dense": "ours, full mask"}
FRONTS_ONLY = "Pareto fronts only: this JSON does not hold the other trials"


def plot_rows(data: dict) -> tuple[list[dict], bool]:
    """The picture's points: the JSON's ``trials`` (every trial, its front flagged) when it
    holds them, else the rows of every method's front; and whether they are fronts only."""
    if data.get("trials"):
        return data["trials"], False
    return [{**r, "front_method": True} for name, rows in data["fronts"].items()
            if name != "overall" for r in rows], True


def render(data: dict, json_path: Path, budgets) -> tuple[Path, Path]:
    """Write the picture (``json_path`` with .png: fronts against latency_ms, dense baselines
    as vertical lines) and the table (.md) of a latency_front.json dict; returns their paths."""
    from adaptive_sparse.io import atomic_write_text
    from adaptive_sparse.plots import plot_frontier

    rows, fronts_only = plot_rows(data)
    png, md = json_path.with_suffix(".png"), json_path.with_suffix(".md")
    shapes = data["shapes"]
    plot_frontier(rows, png, cost="latency_ms", budgets=data.get("budgets") or budgets,
                  baselines={BASELINE_NAMES.get(k, k): v for k, v in data["dense_ms"].items()},
                  title=f"{data['model']}, {shapes['seq_len']} tokens, {data['timed_on']}",
                  note=FRONTS_ONLY if fronts_only else "")
    atomic_write_text(md, markdown(data, picture=png.name, fronts_only=fronts_only))
    return png, md


def _rows_problem(rows, keys) -> bool:
    """Whether ``rows`` is not a list of dicts with ``keys``, latency_ms and ppl_change numbers."""
    return not isinstance(rows, list) or any(
        not isinstance(r, dict) or not set(keys) <= set(r)
        or not all(isinstance(r[k], (int, float)) for k in ("latency_ms", "ppl_change"))
        for r in rows)


def _front_problem(data) -> str | None:
    """What a latency_front.json dict lacks for ``render`` (None: nothing)."""
    if not isinstance(data, dict):
        return f"a {type(data).__name__}, not an object"
    missing = [k for k in TOP_KEYS if k not in data]
    if missing:
        return f"no {', '.join(missing)}"
    dense, fronts, shapes = data["dense_ms"], data["fronts"], data["shapes"]
    if not isinstance(dense, dict) or not all(isinstance(v, (int, float)) for v in dense.values()):
        return "dense_ms is not {name: ms}"
    need = ("heads", "kv_heads", "seq_len", "head_dim", "dtype", "block_size", "layers")
    if not isinstance(shapes, dict) or not set(need) <= set(shapes) or \
            not isinstance(data["environment"], dict):
        return f"shapes without {', '.join(need)}, or environment not an object"
    if not isinstance(fronts, dict) or not fronts:
        return "fronts is not {method: rows}"
    keys = (*ROW_KEYS, *(f"speedup_vs_{d}" for d in dense))
    for name, rows in fronts.items():
        if _rows_problem(rows, keys):
            return f"fronts[{name!r}] has rows without {', '.join(keys)}"
    if data.get("trials") and _rows_problem(data["trials"], ("method", "front_method")):
        return "trials has rows without method, latency_ms, ppl_change, front_method"
    return None


def load_front(path: str) -> dict:
    """A latency_front.json as a dict, checked for what ``render`` reads; ValueError naming
    --render."""
    from adaptive_sparse.errors import fail

    expected = "a latency_front.json written by latency_sweep.py"
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail("--render", expected, f"{path} ({type(e).__name__}: {e})") from None
    problem = _front_problem(data)
    if problem:
        raise fail("--render", expected, f"{path} ({problem})")
    return data


def _cell(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(data: dict, picture: str | None = None, fronts_only: bool = False) -> str:
    env, shapes, dense = data["environment"], data["shapes"], data["dense_ms"]
    lines = [f"# Latency / perplexity front: {data['model']} at {shapes['seq_len']} tokens", "",
             f"Timed on {data['timed_on']}; torch {env.get('torch')}, triton "
             f"{env.get('triton')}, transformers {env.get('transformers')}, optuna "
             f"{env.get('optuna')}. Shapes per layer: B=1, Hq={shapes['heads']}, "
             f"Hkv={shapes['kv_heads']}, N={shapes['seq_len']}, D={shapes['head_dim']}, "
             f"{shapes['dtype']}, block {shapes['block_size']}, {shapes['layers']} layers. "
             f"Perplexity on {data['docs']} held-out sequence(s) ({data['corpus']}, validation "
             f"split). {data['counts']}.", "",
             "Dense attention, all layers: " + ", ".join(f"{k} {v:.2f} ms"
                                                         for k, v in dense.items()) + ".",
             "latency_ms = attention_ms + mask_ms for input-dependent methods (gate, oracle, "
             "lsh, hierarchical, vertical_slash, antidiagonal); static patterns reuse one mask "
             "per length, so theirs is attention_ms alone (mask_ms shown for reference).", ""]
    if data.get("stopped"):
        lines += [f"Stopped early: {data['stopped']}.", ""]
    if picture:
        lines += [f"![latency / perplexity front]({picture})", "",
                  f"`{picture}`: each method's Pareto front, perplexity change against latency"
                  + (f". {FRONTS_ONLY}." if fronts_only else ", every trial faint.")
                  + " Dense attention of all layers: grey vertical lines; quality budgets: "
                  "dotted.", ""]
    base = next((k for k in ("sdpa_cudnn", "sdpa_flash", "sdpa_math") if k in dense), None)
    for name, rows in data["fronts"].items():
        lines += [f"## Pareto front: {name} ({len(rows)} trials)", "",
                  "| trial | method | latency ms | attention ms | mask ms | "
                  + (f"x vs {base} | " if base else "")
                  + "density | ppl change | recall | params |",
                  "|---" * (9 + bool(base)) + "|"]
        for r in rows:
            lines.append(
                f"| {r['trial']} | {r['method']} | {r['latency_ms']:.2f} | "
                f"{_cell(r['attention_ms'], '.2f')} | {_cell(r['mask_ms'], '.2f')} | "
                + (f"{r[f'speedup_vs_{base}']:.2f} | " if base else "")
                + f"{r['density']:.3f} | {100 * r['ppl_change']:+.2f}% | "
                f"{_cell(r['recall'], '.3f')} | `{json.dumps(r['params'], sort_keys=True)}` |")
        lines.append("")
    return "\n".join(lines)


def environment(device: str) -> dict:
    import optuna
    import transformers

    from benchmarks.common import environment as device_environment

    env = device_environment() if device.startswith("cuda") else {
        "torch": torch.__version__, "device": "cpu", "cpu_threads": torch.get_num_threads()}
    try:
        import triton
        env.setdefault("triton", triton.__version__)
    except ImportError:
        env.setdefault("triton", None)
    return {**env, "transformers": transformers.__version__, "optuna": optuna.__version__}


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    args = _parser().parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.render is not None:
        try:
            data = load_front(args.render)
        except ValueError as e:
            print(f"latency_sweep.py: error: {e}", file=sys.stderr)
            return 2
        png, md = render(data, Path(args.render), args.budgets)
        print(f"wrote {png}, {md}", flush=True)
        return 0
    try:
        chosen = check_args(args)
        model = _load(args)
    except ValueError as e:
        print(f"latency_sweep.py: error: {e}", file=sys.stderr)
        return 2
    import optuna

    from adaptive_sparse.gates import model_shapes
    from adaptive_sparse.io import atomic_write_json
    from sweeps.cli import SweepConfig
    from sweeps.evaluators import build_evaluator
    from sweeps.frontier import format_table, write_report
    from sweeps.latency import device_label

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    ev_args = {"model": args.model, "seq_len": args.seq_len, "num_seqs": args.docs,
               "block_size": args.block_size, "corpus": args.corpus, "gates": args.gates,
               "device": args.device, "backend": args.backend, "dtype": args.dtype,
               "latency_reps": args.reps,
               "gate_fast": None if args.device.startswith("cuda") else False}
    cfg = SweepConfig.from_dict({
        "name": f"latency-{Path(args.model).name}-{args.seq_len}", "methods": chosen,
        "objectives": OBJECTIVES, "sampler": "tpe", "seed": args.seed, "n_trials": args.trials,
        "storage": f"journal:{out / 'study.log'}", "latency": "sweeps.latency:kernel_latency",
        "method_allocation": "round_robin", "n_startup_trials": 2 * len(chosen),
        "budgets": list(args.budgets),
        "evaluator": {"factory": "sweeps.evaluators:ModelEvaluator", "args": ev_args}})
    evaluator = build_evaluator(cfg.evaluator)  # load_model's cache: the model loaded above
    print(f"== dense baselines [{time.monotonic() - t0:.0f} s]", flush=True)
    dense = dense_rows(model, args, dtype)
    print("   " + ", ".join(f"{k} {v:.2f} ms" for k, v in dense.items()), flush=True)
    print(f"== sweep: {len(chosen)} methods, up to {args.trials} trials "
          f"[{time.monotonic() - t0:.0f} s]", flush=True)
    stopped = sweep(cfg, out, evaluator, args, t0)
    try:
        report = write_report(out, budgets=args.budgets)
    except ValueError as e:  # no completed trial yet (all failed, or no time for one)
        print(f"latency_sweep.py: no front: {e}" + (f" ({stopped})" if stopped else ""),
              file=sys.stderr)
        return 1
    print(format_table(report), flush=True)
    s = model_shapes(model)
    counts = report["counts"]
    data = {"model": args.model, "environment": environment(args.device),
            "timed_on": device_label(args.device, args.backend, dtype),
            "shapes": {"batch": 1, "heads": s["num_heads"], "kv_heads": s["num_kv_heads"],
                       "seq_len": args.seq_len, "head_dim": s["head_dim"],
                       "layers": s["num_layers"], "dtype": args.dtype,
                       "block_size": args.block_size},
            "docs": args.docs, "corpus": args.corpus, "gates": args.gates,
            "objectives": OBJECTIVES, "budgets": list(args.budgets), "dense_ms": dense,
            "counts": ", ".join(f"{v} {k}" for k, v in counts.items() if v),
            "stopped": stopped, "seconds": time.monotonic() - t0,
            "fronts": front_rows(report, dense), "files": report["files"],
            "trials": [{k: r.get(k) for k in ("trial", "method", "latency_ms", "ppl_change",
                                              "front_method")} for r in report["trials"]]}
    atomic_write_json(out / "latency_front.json", data)
    png, md = render(data, out / "latency_front.json", args.budgets)
    print(md.read_text(), flush=True)
    print(f"wrote {out / 'latency_front.json'}, {md}, {png}, {out / 'frontier.png'} in "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    return 0


def _load(args):
    """The model (``load_model``'s per-process cache hands the evaluator the same object), on
    ``--device`` in ``--dtype``; a preset that is not installed is a bad ``--model``."""
    from adaptive_sparse.models import load_model

    try:
        model, _ = load_model(args.model, dtype=getattr(torch, args.dtype))
    except (OSError, ValueError) as e:
        raise ValueError(f"--model: cannot load {args.model!r}: {e}") from None
    return model.to(args.device).eval()


if __name__ == "__main__":
    sys.exit(main())
