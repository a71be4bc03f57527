"""Quality at fixed densities: the learned gate vs the oracle vs every zoo pattern.

Issue 3's table: perplexity change and attention recall at densities 0.05 / 0.1 / 0.25 / 0.5, on
validation documents the gate never trained on, for the learned gate (``density`` policy), the
oracle (same policy on the true block-sum map) and each pattern of the zoo, its parameters
calibrated to the density. Then, optionally, issue 5's Optuna sweep over every method at one
length, and its frontier report.

    PYTHONPATH=. python3 benchmarks/quality.py --out runs/quality --seq-lens 4096 8192 \\
        --train-seq-len 8192 --train-docs 48 --steps 600 --eval-docs 8 --device cuda \\
        --sweep-seq-len 4096 --sweep-trials 150

Every stage resumes: trained gates are reused, each evaluation is appended to OUT/quality.json
as it finishes (a restart skips what is there), the sweep is an Optuna study in OUT/sweep.

Research levers (issue 13), each an ablation row of the same table and of the needle stage:
- ``--budgets gate/threshold oracle/density ...``: per-layer, per-head budgets calibrated on
  ``--calib-docs`` sequences of the corpus's ``--calib-split`` (default "test": never trained
  on, never evaluated) by equal marginal gain (``policies.BudgetCalibrator``), rows
  ``<family>/<kind>+budgets``;
- ``--tail-blocks/--tail-scale/--min-blocks``: the gate's threshold policy with a larger
  budget on the last query rows (every decoding step's row included) and/or a per-row floor,
  row ``gate/threshold+<lever>``, and in the needle stage the best gate's policy with the lever;
- ``--needle-diagnose``: the best gate's needle run with dense decoding steps, and with a dense
  prefill, to tell which step loses the needle. Every sparse needle run reports the density
  its masks kept in the prefill and in the decoding steps (forced and floor blocks included);
- ``--decode-gates DIR``: the best gate's masks in the prefill and the decode gates (issue 15,
  trained on decode-position queries) in every decoding step, at a decode token budget of the
  best gate's needle prefill density and at each --tail-scale multiple of it, rows
  ``best gate + decode gates xS``: the prefill gate's decoding rows against the decode gates'
  at the same decode density;
- ``--decode-bounds``: the same rows with the training-free selection of the keys' per-block
  min / max bound (Quest; `DecodeProvider(decode="bounds")`, ``--bounds-combine`` max or
  mean_prob) in every decoding step, rows ``best gate + bounds decode xS``.

Calibration. A pattern's parameters for a target density come from one ordered family per
pattern (one knob; the others fixed at common settings, written in ``FAMILIES``): every member
is screened (masks built on one sequence's recorded q/k, no forward; ``ModelEvaluator.screen``)
and the member whose density is closest to the target is evaluated. Static patterns cannot go
below their forced blocks (sink + diagonal), so the achieved density is always reported.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from adaptive_sparse.policies import nearest_to_densities

DENSITIES = (0.05, 0.1, 0.25, 0.5)
TOP_PS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999)


def _ints(lo: int, hi: int, n: int = 14) -> list[int]:
    """About n distinct integers from lo to hi, geometrically spaced."""
    if hi <= lo:
        return [lo]
    vals = {round(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)}
    return sorted(v for v in vals if lo <= v <= hi)


def families(seq_len: int, bs: int) -> dict[str, tuple[str, list[dict]]]:
    """label -> (evaluator family, members ordered by increasing density): the threshold
    policies of the gate and the oracle, and every pattern (one knob each)."""
    kb = math.ceil(seq_len / bs)
    win = _ints(1, kb)
    taus = [round(0.2 * 0.6 ** i, 6) for i in range(16)]  # 0.2 ... 9.4e-5, decreasing
    return {
        "gate/threshold": ("gate", [{"policy": {"kind": "threshold", "tau": t}} for t in taus]),
        "gate/top_p": ("gate", [{"policy": {"kind": "top_p", "p": p}} for p in TOP_PS]),
        "oracle/threshold": ("oracle", [{"policy": {"kind": "threshold", "tau": t},
                                         "target": "sum"} for t in taus]),
        "sliding_window": ("sliding_window", [{"window": w * bs, "sink_blocks": 1}
                                              for w in win]),
        "longformer": ("longformer", [{"window": w * bs, "global_blocks": 1} for w in win]),
        "bigbird": ("bigbird", [{"window": w * bs, "global_blocks": 1, "random_blocks": 2,
                                 "seed": 0} for w in win]),
        # half of the budget local, the rest from every stride-th key block
        "strided": ("strided", [{"local_blocks": max(1, w // 2),
                                 "stride": max(2, round(2 * kb / max(1, w)))} for w in win]),
        "lsh": ("lsh", [{"n_buckets": 2 * b, "n_rounds": 2, "seed": 0}
                        for b in reversed(_ints(1, max(2, kb // 4)))]),
        "hierarchical": ("hierarchical", [{"budget": float(w)} for w in win]),
        "vertical_slash": ("vertical_slash", [{"n_vertical": max(1, w // 2),
                                               "n_slash": max(1, w - w // 2)} for w in win]),
        "antidiagonal": ("antidiagonal", [{"threshold": t, "stride": 16} for t in (
            0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999)]),
    }


BUDGET_FAMILIES = ("gate/threshold", "gate/density", "oracle/threshold", "oracle/density")
BUDGET_SPREAD = (0.85, 1.0, 1.15)  # members per target density, for the screening


def lever_policy(args, scale: float | None = None) -> dict:
    """The needle lever's policy fields from the flags ({} when no lever is asked for), with
    the first --tail-scale or `scale`."""
    out = {}
    if args.tail_blocks:
        out.update(tail_blocks=args.tail_blocks,
                   tail_scale=float(args.tail_scale[0] if scale is None else scale))
    if args.min_blocks:
        out["min_blocks"] = args.min_blocks
    return out


def lever_label(lever: dict) -> str:
    """"tail1x4", "floor2", "tail1x4+floor2": the lever's name in method labels."""
    parts = []
    if lever.get("tail_blocks"):
        parts.append(f"tail{lever['tail_blocks']}x{lever['tail_scale']:g}")
    if lever.get("min_blocks"):
        parts.append(f"floor{lever['min_blocks']}")
    return "+".join(parts)


def budget_members(cal, family: str, targets) -> list[dict]:
    """Calibrated settings for targets x BUDGET_SPREAD (calibration-data densities), ordered by
    density; each {"policy", ["target"], "_calibration": info}."""
    members = []
    for t in sorted({min(1.0, t * f) for t in targets for f in BUDGET_SPREAD}):
        pol, info = cal.policy(t)
        m = {"policy": pol.to_dict()}
        if family.startswith("oracle"):
            m["target"] = "sum"
        members.append({**m, "_calibration": {k: info[k] for k in (
            "target", "density", "recall", "per_layer_density")}})
    return members


def calibrate(evaluator, family: str, members: list[dict], targets) -> dict[float, dict]:
    """target density -> {"params", "screen_density", "screen_recall"} of the closest member
    (ties: the sparser). Screens each member once."""
    def params(p):
        return {k: v for k, v in p.items() if not k.startswith("_")}

    near = nearest_to_densities(lambda p: evaluator.screen(family, params(p)), members, targets)
    return {t: {"params": params(p), "screen_density": float(s["density"]),
                "screen_recall": float(s.get("recall", float("nan"))),
                **({"calibration": p["_calibration"]} if "_calibration" in p else {})}
            for t, (p, s) in near.items()}


class Results:
    """Rows in OUT/quality.json, written atomically after every evaluation."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"rows": []}
        self.data.setdefault("meta", {}).update({k: v for k, v in meta.items() if v is not None})

    def key(self, seq_len: int, method: str, target: float) -> str:
        return f"{seq_len}|{method}|{target}"

    def get(self, key: str, table: str = "rows"):
        """The row of `key` in `table` ("rows": the quality table, "needle": needle runs)."""
        return next((r for r in self.data.setdefault(table, []) if r["key"] == key), None)

    def add(self, row: dict, table: str = "rows") -> None:
        self.data[table] = [r for r in self.data.setdefault(table, [])
                            if r["key"] != row["key"]] + [row]
        self.save()

    def needle(self, key: str):
        return self.get(key, "needle")

    def add_needle(self, row: dict) -> None:
        self.add(row, "needle")

    def save(self) -> None:
        from adaptive_sparse.io import atomic_write_json
        atomic_write_json(self.path, self.data)


def make_evaluator(model, sequences, seq_len: int, gates: Path, args):
    """A sweeps ModelEvaluator on a model loaded once (in --eval-dtype) and packed held-out
    sequences (its perplexity applies the LM head in chunks, `evaluate.sequence_nll`: the
    [N, vocab] fp32 logits of one 32k-token Qwen2.5 sequence alone would take 20 GB)."""
    from sweeps.evaluators import ModelEvaluator

    return ModelEvaluator(args.model, seq_len=seq_len, block_size=args.block_size, gates=str(gates),
                     device=args.device, backend=args.backend, model_obj=model,
                     sequences=sequences, gate_fast=None if args.device.startswith("cuda")
                     else False)


class PhaseDensity:
    """Wraps a provider: calls it on every layer call (a gate keeps its key history) and counts
    the share of causal blocks its masks keep, apart for the prefill (more than one query) and
    for decoding steps; `dense="prefill"|"decode"` returns None (dense attention) in that phase
    instead of the mask (what a needle run with one phase dense measures). Dense calls count
    density 1."""

    def __init__(self, inner, dense: str | None = None):
        if dense not in (None, "prefill", "decode"):
            raise ValueError(f"dense: expected None, 'prefill' or 'decode', got {dense!r}")
        self.inner, self.dense = inner, dense
        self.kept = {"prefill": 0.0, "decode": 0.0}
        self.total = {"prefill": 0.0, "decode": 0.0}

    def __call__(self, layer_idx, q, k):
        from adaptive_sparse.masks import block_causal

        mask = self.inner(layer_idx, q, k)
        phase = "decode" if q.shape[2] == 1 else "prefill"
        if phase == self.dense:
            mask = None
        bs = mask.block_size if mask is not None else getattr(self.inner, "block_size", 64)
        blocks = float(block_causal(q.shape[2], k.shape[2], bs).sum())
        self.total[phase] += blocks
        self.kept[phase] += blocks * (1.0 if mask is None else mask.density())
        return mask

    def densities(self) -> dict:
        return {f"{p}_density": self.kept[p] / self.total[p] if self.total[p] else None
                for p in ("prefill", "decode")}


def needle_stage(evaluator, tokenizer, results: Results, seq_len: int, args, log=print) -> None:
    """Needle retrieval (adaptive_sparse.data.needle) at `seq_len` tokens for dense attention
    (the model's own SDPA), and at --needle-density for the best gate, the best oracle and the
    best pattern of the quality table at that length (lowest perplexity change among the rows
    of that target density whose achieved density is at most 1.2x the target). Sparse runs use
    the method's masks in the prefill and in every decoding step; each row records the density
    its masks kept in both. Ablations: with --budgets the best gate with calibrated budgets;
    with a lever (--tail-blocks / --min-blocks) the best gate's policy plus the lever; with
    --needle-diagnose the best gate with dense decoding steps and with a dense prefill; with
    --decode-gates (loaded by `main` into args.decode_gate_set) and / or --decode-bounds the
    best gate's prefill and that decode selection in the decoding steps (`decode_picks`)."""
    from adaptive_sparse.data import make_needle_samples
    from adaptive_sparse.evaluate import evaluate_needle

    model = evaluator._load()[0]
    d = args.needle_density
    samples = make_needle_samples(tokenizer, length=seq_len, depths=args.needle_depths,
                                  samples_per_depth=args.needle_samples)
    rows = [r for r in results.data["rows"] if r["seq_len"] == seq_len
            and r["target_density"] == d and r["density"] <= 1.2 * d]
    picks = [("dense", None, None)]
    budget_gates = tuple(f"{f}+budgets" for f in getattr(args, "budgets", ()) or ()
                         if f.startswith("gate"))
    for label, keep in (("best gate", lambda m: m in ALL_GATES),
                        ("best oracle", lambda m: m in ALL_ORACLES),
                        ("best pattern", _is_pattern),
                        ("best budget gate", lambda m: m in budget_gates)):
        cands = [r for r in rows if keep(r["method"])]
        if cands:
            picks.append((label, min(cands, key=lambda r: r["ppl_change"]), None))
    gate = next((row for label, row, _ in picks if label == "best gate"), None)
    picks = [(label, row, ph) for label, row, ph in picks  # no second run of the best gate
             if label != "best budget gate" or gate is None or row["key"] != gate["key"]]
    for scale in (args.tail_scale if args.tail_blocks else [None]):
        lever = lever_policy(args, scale)
        if gate is not None and lever:
            params = {**gate["params"], "policy": {**gate["params"]["policy"], **lever}}
            picks.append((f"best gate + {lever_label(lever)}", {**gate, "params": params},
                          None))
    if gate is not None and getattr(args, "needle_diagnose", False):
        picks += [("best gate, dense decode", gate, "decode"),
                  ("best gate, dense prefill", gate, "prefill")]
    decode_gates = getattr(args, "decode_gate_set", None)
    sources = [s for s, on in (("decode gates", decode_gates is not None),
                               ("bounds decode", getattr(args, "decode_bounds", False))) if on]
    if gate is not None:
        picks += [pick for source in sources for pick in decode_picks(gate, source, args)]
    elif sources:
        log(f"  [{seq_len}] needle: no best gate at density {d}, no {' / '.join(sources)} rows")
    for label, row, dense_phase in picks:
        key = f"{seq_len}|needle|{label}|{d}"
        if results.needle(key) is not None:
            continue
        t0 = time.perf_counter()
        phases, budget = {}, {}
        if row is None:
            r = evaluate_needle(model, tokenizer, samples, sparse=False, progress=False)
        else:
            family = "gate" if row["method"].startswith("gate") else \
                "oracle" if row["method"].startswith("oracle") else row["method"]
            family = row.get("family", family)
            with evaluator._detached(evaluator.provider(family, row["params"])) as provider:
                if isinstance(dense_phase, tuple):  # a decode row: (source, budget multiple)
                    provider, budget = decode_provider(
                        provider, *dense_phase, results.needle(f"{seq_len}|needle|best gate|{d}"),
                        seq_len, args)
                counted = PhaseDensity(provider, dense=None if budget else dense_phase)
                r = evaluate_needle(model, tokenizer, samples, counted, sparse=True,
                                    block_size=args.block_size, backend=args.backend,
                                    progress=False)
            phases = counted.densities()
        results.add_needle({"key": key, "seq_len": seq_len, "label": label,
                            "method": "dense" if row is None else row["method"],
                            "target_density": None if row is None else d,
                            "density": 1.0 if row is None else row["density"],
                            "ppl_change": 0.0 if row is None else row["ppl_change"],
                            **({} if row is None else {"params": row["params"]}), **phases,
                            **budget,
                            "needle_accuracy": r["needle_accuracy"], "answers": r["answers"],
                            "samples": len(samples), "seconds": time.perf_counter() - t0})
        log(f"  [{seq_len}] needle {label:<24} "
            f"{'dense' if row is None else row['method']:<18} accuracy "
            f"{r['needle_accuracy']:.2f} ({time.perf_counter() - t0:.1f} s)")


def decode_picks(gate: dict, source: str, args) -> list[tuple[str, dict, tuple[str, float]]]:
    """The needle picks of --decode-gates (source "decode gates") or --decode-bounds ("bounds
    decode"): (label, the best gate's row, (source, the decode budget's multiple S of the
    prefill density)), S = 1 and each --tail-scale, labels "best gate + <source> xS". They
    follow the plain best gate's run, whose measured prefill density sets the budget."""
    scales = dict.fromkeys([1.0, *args.tail_scale])
    return [(f"best gate + {source} x{s:g}", gate, (source, float(s))) for s in scales]


def decode_provider(prefill, source: str, scale: float, best: dict | None, seq_len: int, args):
    """(provider, row fields) of one decode needle run: `prefill` (the best gate's provider) for
    the prompt, then in every decoding step the decode gates (source "decode gates",
    args.decode_gate_set) or the keys' per-block min / max bound ("bounds decode",
    --bounds-combine) under a token budget of round(scale * p * seq_len) tokens
    (`token_budget_policy`: ceil(tokens / block) cache blocks per KV head, the sink and the
    newest block forced), p the prefill density the best gate's plain needle run measured (its
    table density when that run is missing)."""
    from adaptive_sparse.gates.decode import DecodeProvider, token_budget_policy

    p = (best or {}).get("prefill_density")
    budget_source = "best gate needle prefill density"
    if p is None:
        p, budget_source = (best or {}).get("density"), "best gate table density"
    if p is None:
        raise RuntimeError(f"{source} needle rows need the best gate's needle run first")
    tokens = max(1, min(seq_len, round(scale * p * seq_len)))
    policy = token_budget_policy(tokens, args.block_size)
    if source == "decode gates":
        provider = DecodeProvider(policy, gates=args.decode_gate_set, prefill=prefill,
                                  decode="gate", block_size=args.block_size)
        fields = {"decode_gates": str(args.decode_gates)}
    else:
        provider = DecodeProvider(policy, prefill=prefill, decode="bounds",
                                  block_size=args.block_size, bounds_combine=args.bounds_combine)
        fields = {"decode_select": "bounds", "bounds_combine": args.bounds_combine}
    return provider, {**fields, "decode_budget_scale": scale,
                      "decode_budget_density": p * scale, "decode_budget_source": budget_source,
                      "decode_budget_tokens": tokens, "decode_policy": policy.to_dict()}


def load_needle_decode_gates(path, model, args):
    """The decode gates of --decode-gates on --device (fp32: the fused CUDA step wants it),
    refused (ValueError naming the flag) when their block size or shapes are not the model's."""
    from adaptive_sparse.errors import fail
    from adaptive_sparse.export.decode import load_decode_gates_any
    from adaptive_sparse.gates.network import model_shapes

    try:
        gates = load_decode_gates_any(path, model, check="architecture")
    except Exception as e:  # noqa: BLE001 - any unreadable file is the flag's error
        raise fail("--decode-gates", "a decode-gate artifact or save_decode_gates file of "
                   "this model", f"{path} ({e})") from None
    c, shapes = gates.config, model_shapes(model)
    got = {k: getattr(c, k) for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim")}
    want = {k: shapes[k] for k in got}
    if got != want:
        raise fail("--decode-gates", f"gates of the model's shapes {want}", f"{got} in {path}")
    if c.block_size != args.block_size:
        raise fail("--decode-gates", f"gates of --block-size {args.block_size}",
                   f"block size {c.block_size} in {path}")
    return gates.float().to(args.device).eval()


def needle_markdown(results: Results) -> str:
    rows = results.data.get("needle", [])
    if not rows:
        return ""
    lines = ["### Needle retrieval", "",
             "| tokens | which | method | density | ppl change (table) | accuracy | prompts | "
             "needle prefill density | decode density |",
             "|---|---|---|---|---|---|---|---|---|"]

    def dens(x):
        return "-" if x is None else f"{x:.3f}"

    for r in sorted(rows, key=lambda r: (r["seq_len"], r["key"])):
        lines.append(f"| {r['seq_len']} | {r['label']} | {r['method']} | {r['density']:.3f} | "
                     f"{100 * r['ppl_change']:+.2f}% | {r['needle_accuracy']:.2f} | "
                     f"{r['samples']} | {dens(r.get('prefill_density'))} | "
                     f"{dens(r.get('decode_density'))} |")
    return "\n".join(lines) + "\n"


def evaluate_table(evaluator, results: Results, seq_len: int, *, densities=DENSITIES,
                   block_size: int = 64, patterns: list[str] | None = None,
                   extra_gates: dict[str, str] | None = None, budgets=(),
                   calib_sequences=None, lever: dict | None = None, log=print) -> None:
    """Gate, oracle and the calibrated patterns at each density, appended to `results`.
    extra_gates: NAME -> gate folder, evaluated as "gate[NAME]" (density policy) and
    "gate[NAME]/threshold" (calibrated), the ablation rows. budgets: families of
    `BUDGET_FAMILIES` evaluated with per-layer, per-head budgets calibrated on
    `calib_sequences` (LongTensor [S, N], disjoint from the evaluation's), rows
    "<family>+budgets". lever: policy fields (`lever_policy`) added to the gate's thresholds,
    row "gate/threshold+<lever_label>"."""
    fams = families(seq_len, block_size)
    if patterns is not None:
        fams = {k: v for k, v in fams.items() if k in patterns}
    taus = families(seq_len, block_size)["gate/threshold"][1]
    for name, folder in (extra_gates or {}).items():
        fams[f"gate[{name}]/threshold"] = ("gate", [{**m, "gates": folder} for m in taus])
    if lever:
        fams[f"gate/threshold+{lever_label(lever)}"] = (
            "gate", [{"policy": {**m["policy"], **lever}} for m in taus])
    todo_budgets = [f for f in budgets if any(
        results.get(results.key(seq_len, f"{f}+budgets", d)) is None for d in densities)]
    if todo_budgets:
        if calib_sequences is None:
            raise ValueError("calib_sequences: expected calibration token ids [S, N] for "
                             f"--budgets {todo_budgets}, got None")
        cals = evaluator.budget_calibrators(calib_sequences, todo_budgets, log=log)
        for f, cal in cals.items():
            fams[f"{f}+budgets"] = (f.split("/")[0], budget_members(cal, f, densities))
    plan = []
    for d in densities:
        policy = {"kind": "density", "density": d}
        plan.append(("gate", "gate", d, {"policy": policy}, None))
        plan.append(("oracle", "oracle", d, {"policy": policy, "target": "sum"}, None))
        for name, folder in (extra_gates or {}).items():
            plan.append((f"gate[{name}]", "gate", d, {"policy": policy, "gates": folder}, None))
    for label, (fam, members) in fams.items():
        todo = [d for d in densities if results.get(results.key(seq_len, label, d)) is None]
        if not todo:
            continue
        t0 = time.perf_counter()
        cal = calibrate(evaluator, fam, members, todo)
        log(f"  calibrated {label} in {time.perf_counter() - t0:.1f} s: " + ", ".join(
            f"{d} -> {c['screen_density']:.3f}" for d, c in cal.items()))
        plan.extend((label, fam, d, c["params"], c) for d, c in cal.items())
    for method, fam, d, params, cal in plan:
        key = results.key(seq_len, method, d)
        if results.get(key) is not None:
            continue
        t0 = time.perf_counter()
        r = evaluator.evaluate(fam, params)
        row = {"key": key, "seq_len": seq_len, "method": method, "family": fam,
               "target_density": d,
               "params": params, "density": r["density"], "ppl_change":
               r["perplexity"] / r["perplexity_dense"] - 1.0, "perplexity": r["perplexity"],
               "perplexity_dense": r["perplexity_dense"], "recall": r["recall"],
               "per_layer_density": r["per_layer_density"],
               "seconds": time.perf_counter() - t0}
        if cal is not None:
            row["screen_density"] = cal["screen_density"]
            if "calibration" in cal:
                row["calibration"] = cal["calibration"]
        results.add(row)
        log(f"  [{seq_len}] {method:<15} target {d:<5} density {row['density']:.3f}  ppl "
            f"{100 * row['ppl_change']:+7.2f}%  recall {row['recall']:.3f}  "
            f"({row['seconds']:.1f} s)")


def reach_density(points: list[tuple[float, float]], ppl: float) -> tuple[float, bool] | None:
    """(density, bound): the lowest density at which a curve of (density, ppl_change) first
    reaches a perplexity change <= `ppl`, going up in density. Between the last point above
    `ppl` and the first at or below it the density is interpolated (log(ppl_change) when both
    are positive, else linearly); when the sparsest measured point is already at or below,
    that point's density with bound=True (the method reaches `ppl` at that density or lower).
    None when no point reaches `ppl`."""
    pts = sorted(points)
    for i, (d1, p1) in enumerate(pts):
        if p1 > ppl:
            continue
        if i == 0:
            return d1, True
        d0, p0 = pts[i - 1]
        if p0 > 0 and p1 > 0 and ppl > 0:
            t = (math.log(ppl) - math.log(p0)) / (math.log(p1) - math.log(p0))
        else:
            t = (ppl - p0) / (p1 - p0)
        return d0 + t * (d1 - d0), False
    return None


def equal_ppl(results: Results, seq_len: int, levels=(0.01, 0.03)) -> list[dict]:
    """The goals' comparison at equal perplexity: per level (ppl change +1%, +3%), the lowest
    density at which the gates (every policy of `ALL_GATES`), the oracles (`ALL_ORACLES`) and
    the patterns first reach it (`reach_density`, the best curve of each group), and the gate's
    density over the oracle's and over the best pattern's. A ratio whose denominator is a bound
    (the sparsest measured point already reached the level) is a lower bound: `*_bound`."""
    rows = [r for r in results.data["rows"] if r["seq_len"] == seq_len]
    groups = {"gate": lambda m: m in ALL_GATES, "oracle": lambda m: m in ALL_ORACLES,
              "pattern": _is_pattern}
    out = []
    for level in levels:
        row = {"level": level}
        for name, keep in groups.items():
            found = []
            for m in dict.fromkeys(r["method"] for r in rows if keep(r["method"])):
                hit = reach_density([(r["density"], r["ppl_change"]) for r in rows
                                     if r["method"] == m], level)
                if hit is not None:
                    found.append((hit[0], hit[1], m))
            best = min(found) if found else None
            row[name] = None if best is None else \
                {"density": best[0], "bound": best[1], "method": best[2]}
        g = row["gate"]
        for other in ("oracle", "pattern"):
            o = row[other]
            row[f"gate_over_{other}"] = None if g is None or o is None \
                else g["density"] / o["density"]
            # gate's bound makes the ratio an upper bound, the other's a lower bound
            row[f"gate_over_{other}_bound"] = None if row[f"gate_over_{other}"] is None else \
                ">=" if o["bound"] and not g["bound"] else \
                "<=" if g["bound"] and not o["bound"] else "?" if g["bound"] else ""
        out.append(row)
    return out


GATES = ("gate", "gate/threshold", "gate/top_p")
ORACLES = ("oracle", "oracle/threshold")
# every gate policy that competes for "best gate", every oracle curve of the comparison
ALL_GATES = GATES + ("gate/threshold+budgets", "gate/density+budgets")
ALL_ORACLES = ORACLES + ("oracle/threshold+budgets", "oracle/density+budgets")
NAMES = {"gate": "gate (density)", "gate/threshold": "gate (threshold)",
         "gate/top_p": "gate (top-p)", "oracle": "oracle (density)",
         "oracle/threshold": "oracle (threshold)"}


def _is_pattern(method: str) -> bool:
    """Patterns of the zoo; not the gates (also ablation gate sets, "gate[NAME]...") or the
    oracles."""
    return not method.startswith(("gate", "oracle"))


def _densities(results: Results, seq_len: int) -> list[float]:
    return sorted({r["target_density"] for r in results.data["rows"] if r["seq_len"] == seq_len})


def summary(results: Results, seq_len: int, densities=None) -> dict:
    """Per target density: each gate and oracle policy, the best gate (lowest ppl change among
    the gate policies of `ALL_GATES` within 1.2x the target density, else the sparsest), the
    best pattern (lowest ppl change among patterns whose achieved density is at most 1.1x the
    best gate's), the oracle density reaching the best gate's perplexity (`reach_density` on
    each oracle policy's curve of `ALL_ORACLES`, the lowest; `oracle_density_bound` when it is
    the sparsest measured point, so the ratio is a lower bound), and whether the best gate
    beats every pattern."""
    rows = [r for r in results.data["rows"] if r["seq_len"] == seq_len]
    densities = _densities(results, seq_len) if densities is None else densities
    by = {(r["method"], r["target_density"]): r for r in rows}
    curves = [[(r["density"], r["ppl_change"]) for r in rows if r["method"] == m]
              for m in ALL_ORACLES]
    out = []
    for d in densities:
        gates = [by[(m, d)] for m in ALL_GATES if (m, d) in by]
        if not gates:
            continue
        near = [r for r in gates if r["density"] <= 1.2 * d]
        gate = min(near, key=lambda r: r["ppl_change"]) if near \
            else min(gates, key=lambda r: r["density"])
        pats = [r for r in rows if _is_pattern(r["method"]) and r["target_density"] == d
                and r["density"] <= 1.1 * gate["density"]]
        best = min(pats, key=lambda r: r["ppl_change"]) if pats else None
        found = [x for x in (reach_density(c, gate["ppl_change"]) for c in curves)
                 if x is not None]
        same_ppl, bound = min(found) if found else (None, False)
        out.append({"target": d, **{m: by.get((m, d)) for m in GATES + ORACLES},
                    "best_gate": gate, "best_pattern": best,
                    "oracle_density_at_gate_ppl": same_ppl, "oracle_density_bound": bound,
                    "gate_over_oracle_density": None if same_ppl is None
                    else gate["density"] / same_ppl,
                    "gate_beats_patterns": None if not pats
                    else all(gate["ppl_change"] < r["ppl_change"] for r in pats)})
    return {"seq_len": seq_len, "rows": out}


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    return f"{r['density']:.3f} / {100 * r['ppl_change']:+.1f}% / {r['recall']:.3f}"


def markdown(results: Results, seq_lens) -> str:
    lines = []
    for n in seq_lens:
        s = summary(results, n)
        if not s["rows"]:
            continue
        dense = s["rows"][0]["best_gate"]["perplexity_dense"]
        lines += [f"### {n} tokens (dense perplexity {dense:.3f})", "",
                  "Cells: achieved density / perplexity change vs dense / attention recall. "
                  "Best pattern: the lowest perplexity among patterns at most 1.1x the best "
                  "gate's density.", "",
                  "| target | " + " | ".join(NAMES[m] for m in GATES + ORACLES)
                  + " | best pattern | its cell | oracle density at the best gate's ppl | "
                  "best gate / oracle density | best gate beats every pattern |",
                  "|---" * 11 + "|"]
        for row in s["rows"]:
            best = row["best_pattern"]
            ratio = row["gate_over_oracle_density"]
            od = row["oracle_density_at_gate_ppl"]
            le = "<= " if row.get("oracle_density_bound") else ""
            ge = ">= " if row.get("oracle_density_bound") else ""
            beats = {None: "-", True: "yes", False: "no"}[row["gate_beats_patterns"]]
            lines.append(
                f"| {row['target']} | " + " | ".join(_cell(row[m]) for m in GATES + ORACLES)
                + f" | {best['method'] if best else '-'} | {_cell(best)} | "
                f"{'-' if od is None else f'{le}{od:.3f}'} | "
                f"{'-' if ratio is None else f'{ge}{ratio:.2f}x'} | {beats} |")
        lines += ["", "Equal perplexity (the goals): the lowest density at which each group's "
                  "best curve first reaches the level (`<=`: its sparsest measured point already "
                  "did; ratios with such a bound are bounds).", "",
                  "| ppl change | gate | oracle | best pattern | gate / oracle | "
                  "gate / pattern |", "|---" * 6 + "|"]
        for e in equal_ppl(results, n):
            cells = []
            for name in ("gate", "oracle", "pattern"):
                c = e[name]
                cells.append("not reached" if c is None else
                             f"{'<= ' if c['bound'] else ''}{c['density']:.3f} ({c['method']})")
            for other in ("oracle", "pattern"):
                r = e[f"gate_over_{other}"]
                b = e[f"gate_over_{other}_bound"]
                cells.append("-" if r is None else f"{b + ' ' if b else ''}{r:.2f}x")
            lines.append(f"| +{100 * e['level']:g}% | " + " | ".join(cells) + " |")
        dens = _densities(results, n)
        lines += ["", "Every method (parameters in quality.json; `gate[NAME]`: an ablation gate "
                  "set, see quality.json's meta):", "",
                  "| method | " + " | ".join(str(d) for d in dens) + " |",
                  "|---" * (len(dens) + 1) + "|"]
        rows = [r for r in results.data["rows"] if r["seq_len"] == n]
        order = [*GATES, *ORACLES, *families(n, 64)]
        for m in sorted(dict.fromkeys(r["method"] for r in rows),
                        key=lambda m: order.index(m) if m in order else len(order)):
            by = {r["target_density"]: r for r in rows if r["method"] == m}
            lines.append(f"| {NAMES.get(m, m)} | "
                         + " | ".join(_cell(by.get(d)) for d in dens) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: Results, seq_lens, path: Path) -> Path | None:
    """Perplexity change vs achieved density, one panel per length, one curve per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adaptive_sparse.plots import method_style

    lens = [n for n in seq_lens if any(r["seq_len"] == n for r in results.data["rows"])]
    if not lens:
        return None
    fig, axes = plt.subplots(1, len(lens), figsize=(6.5 * len(lens), 4.6), squeeze=False)
    for ax, n in zip(axes[0], lens):
        rows = [r for r in results.data["rows"] if r["seq_len"] == n]
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["density"], 100 * r["ppl_change"]) for r in rows if r["method"] == m)
            style = method_style(m)  # one colour per method in every figure
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ms=3, label=NAMES.get(m, m),
                    **style)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("density (share of causal blocks computed)")
        ax.set_ylabel("perplexity change vs dense (%)")
        ax.set_title(f"{results.data['meta'].get('model', 'smollm2-135m')}, {n} tokens, "
                     "held-out documents")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def union_fronts(reports: list[str], out: Path, budgets=(0.01, 0.05)) -> str:
    """Pool the trials of several sweeps over the same sequences (frontier.json files written
    by `adaptive-sparse frontier`; their dense perplexities must agree), flag the Pareto fronts
    of the pool, plot it to OUT/frontier_union.png and return the markdown table of the
    sparsest setting per method within each budget, with the ratio of the best gate's density
    to the best pattern's (the issue-5 target: <= 0.5 at +1%). Dense perplexities may differ
    by GPU rounding (1e-4 relative), no more."""
    from adaptive_sparse.plots import plot_frontier
    from sweeps.frontier import best_within, flag_fronts

    rows, dense = [], set()
    for i, path in enumerate(reports):
        data = json.loads(Path(path).read_text())
        for r in data["trials"]:
            dense.add(r["perplexity_dense"])
            rows.append({**r, "trial": f"{i}:{r['trial']}"})
    if max(dense) > min(dense) * (1 + 1e-4):
        raise ValueError(f"reports: the sweeps measured different dense perplexities "
                         f"{sorted(dense)}; they did not run on the same sequences")
    flag_fronts(rows, ["density", "ppl_change"])
    out.mkdir(parents=True, exist_ok=True)
    plot_frontier(rows, out / "frontier_union.png", cost="density", budgets=budgets)
    methods = sorted({r["method"] for r in rows})
    lines = [f"{len(rows)} completed trials from {len(reports)} sweeps (dense perplexity "
             f"{min(dense):.3f}).", "",
             "| method | trials | " + " | ".join(f"sparsest within +{100 * b:g}%" for b in budgets)
             + " |", "|---" * (2 + len(budgets)) + "|"]
    best = {}
    for m in methods:
        cells = []
        for b in budgets:
            r = best_within(rows, b, "density", [m])
            best[(m, b)] = r
            cells.append("none" if r is None else
                         f"{r['density']:.3f} ({100 * r['ppl_change']:+.2f}%, trial {r['trial']})")
        lines.append(f"| {m} | {sum(r['method'] == m for r in rows)} | " + " | ".join(cells)
                     + " |")
    lines.append("")
    gate_pts = [r for r in rows if r["method"].startswith("gate")]
    free = sorted((r["method"], round(r["density"], 3), round(100 * r["ppl_change"], 2))
                  for r in rows if "/" not in r["method"] and not any(
                      g["density"] <= r["density"] and g["ppl_change"] <= r["ppl_change"]
                      for g in gate_pts))
    n_pat = sum("/" not in r["method"] for r in rows)
    lines.append(f"Pattern trials not dominated by a gate trial (lower or equal density and "
                 f"perplexity change): {len(free)} of {n_pat}"
                 + (": " + ", ".join(f"{m} {d} / {p:+.2f}%" for m, d, p in free) if free
                    else "") + ".")
    for b in budgets:
        gates = [best[(m, b)] for m in methods if m.startswith("gate") and best[(m, b)]]
        pats = [best[(m, b)] for m in methods if "/" not in m and best[(m, b)]]
        if gates and pats:
            g = min(gates, key=lambda r: r["density"])
            p = min(pats, key=lambda r: r["density"])
            lines.append(f"Within +{100 * b:g}%: best gate {g['method']} at density "
                         f"{g['density']:.3f}, best pattern {p['method']} at {p['density']:.3f}: "
                         f"ratio {g['density'] / p['density']:.2f}.")
    return "\n".join(lines)


def environment(device: str) -> dict:
    import transformers
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": device,
           "cpu_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--gates", default=None, help="trained gate directory (else train them)")
    p.add_argument("--seq-lens", type=int, nargs="*", default=[4096],
                   help="lengths of the quality table (none: train and/or sweep only)")
    p.add_argument("--train-seq-len", type=int, default=4096)
    p.add_argument("--train-docs", type=int, default=24)
    p.add_argument("--val-docs", type=int, default=4)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-docs", type=int, default=8)
    p.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--corpus", default="default",
                   help="held-out text: the validation split of this corpus (default: code and "
                   "essays interleaved)")
    p.add_argument("--eval-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights and activations of the evaluation passes")
    p.add_argument("--train-extra", default="",
                   help="more LightningCLI overrides for training, one string, e.g. "
                   "\"--model.target sum\"")
    p.add_argument("--extra-gates", nargs="*", default=[], metavar="NAME=DIR",
                   help="ablation gate sets evaluated next to --gates as gate[NAME]")
    p.add_argument("--needle-lens", type=int, nargs="*", default=[],
                   help="lengths of the needle runs (dense, best gate/oracle/pattern)")
    p.add_argument("--needle-density", type=float, default=0.1)
    p.add_argument("--needle-depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--needle-samples", type=int, default=2, help="prompts per depth")
    p.add_argument("--budgets", nargs="*", default=[], choices=BUDGET_FAMILIES,
                   help="rows FAMILY+budgets: per-layer, per-head budgets calibrated on "
                   "--calib-docs held-out sequences by equal marginal gain")
    p.add_argument("--calib-docs", type=int, default=2,
                   help="calibration sequences of --budgets (per length)")
    p.add_argument("--calib-split", default="test", choices=("train", "test"),
                   help="split of --corpus the calibration sequences come from (never the "
                   "evaluation's validation split)")
    p.add_argument("--tail-blocks", type=int, default=0,
                   help="lever: the last N query blocks of every call (each decoding step's "
                   "row included) get --tail-scale times the budget")
    p.add_argument("--tail-scale", type=float, nargs="+", default=[1.0],
                   help="the tail rows' budget factor; the table row uses the first value, "
                   "the needle stage runs the best gate with each")
    p.add_argument("--min-blocks", type=int, default=0,
                   help="lever: every row keeps at least its N best blocks")
    p.add_argument("--needle-diagnose", action="store_true",
                   help="also run the best gate's needle with dense decoding steps and with a "
                   "dense prefill (which step loses the needle)")
    p.add_argument("--decode-gates", default=None, metavar="DIR",
                   help="decode-gate artifact (decode_e2e.py / decode_quality.py OUT/decode_gates) "
                   "or save_decode_gates file: needle rows with the best gate's prefill and "
                   "these gates in the decoding steps, at a token budget of the prefill density "
                   "times 1 and each --tail-scale")
    p.add_argument("--decode-bounds", action="store_true",
                   help="needle rows like --decode-gates' with the keys' per-block min / max "
                   "bound (training-free, no gates) selecting the decoding steps' blocks")
    p.add_argument("--bounds-combine", choices=("max", "mean_prob"), default="max",
                   help="--decode-bounds: a KV head's query group combined by the max of its "
                   "bounds (default) or the mean of their softmax over the blocks")
    p.add_argument("--patterns", nargs="*", default=None,
                   help="the families of the table: the policies gate/threshold, gate/top_p, "
                   "oracle/threshold and the patterns by name (default: all of them; the gate "
                   "and oracle at a uniform density are always in)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="gather",
                   help="attention backend of the sparse passes, fp32 ('reference' is the "
                   "faster exact one on a GPU: no per-block host syncs)")
    p.add_argument("--sweep-seq-len", type=int, default=0, help="0: no sweep")
    p.add_argument("--sweep-trials", type=int, default=150)
    p.add_argument("--sweep-docs", type=int, default=4)
    p.add_argument("--sweep-config", default="sweeps/configs/smollm2-frontier.yaml")
    p.add_argument("--sweep-allocation", default="round_robin", choices=("sample", "round_robin"),
                   help="how trials are shared among methods (sweeps.objectives.SearchSpace)")
    p.add_argument("--union", nargs="+", default=None, metavar="FRONTIER_JSON",
                   help="only pool these sweeps' frontier.json files: print the sparsest "
                   "setting per method within +1%% / +5%% and write OUT/frontier_union.png")
    p.add_argument("--merge", nargs="+", default=None, metavar="QUALITY_JSON",
                   help="only merge these quality.json files into OUT (rows by key, later "
                   "files win) and write OUT/quality.md and quality.png")
    return p


def merge(out: Path, files: list[str], seq_lens) -> Results:
    results = Results(out / "quality.json", {})
    for f in files:
        data = json.loads(Path(f).read_text())
        results.data["meta"].update({k: v for k, v in data.get("meta", {}).items()
                                     if v is not None})
        for table in ("rows", "needle"):  # later files win, row by row
            for row in data.get(table, []):
                results.data[table] = [r for r in results.data.get(table, [])
                                       if r["key"] != row["key"]]
                results.data[table].append(row)
    results.save()
    lens = sorted({r["seq_len"] for r in results.data["rows"]}, reverse=True) \
        if not seq_lens else seq_lens
    (out / "quality.md").write_text(markdown(results, lens) + needle_markdown(results))
    plot(results, lens, out / "quality.png")
    return results


def train(out: Path, args) -> tuple[Path, dict]:
    """Gates trained through the LightningCLI entry (`sweeps.demo.train_gates`; reused when
    present), and their cost: featurization (the frozen model's pooled features and block
    targets, cached in OUT/gate_cache) and distillation, in seconds of `--device`, and tokens."""
    import shlex

    from sweeps.demo import train_gates

    info_path = out / "training.json"
    gates = out / "gates" / "demo" / "version_0" / "gates"
    if (gates / "manifest.json").exists() and info_path.exists():
        return gates, json.loads(info_path.read_text())
    accel = "gpu" if args.device.startswith("cuda") else "cpu"
    t0 = time.perf_counter()
    gates = train_gates(out, model=args.model, seq_len=args.train_seq_len,
                        block_size=args.block_size, train_seqs=args.train_docs,
                        val_seqs=args.val_docs, steps=args.steps,
                        extra=["--trainer.accelerator", accel,
                               "--data.num_threads", "null" if accel == "gpu" else "1",
                               *shlex.split(args.train_extra)])
    info = {"seconds": time.perf_counter() - t0, "steps": args.steps,
            "train_sequences": args.train_docs, "val_sequences": args.val_docs,
            "seq_len": args.train_seq_len, "block_size": args.block_size,
            "train_tokens": args.train_docs * args.train_seq_len,
            "tokens_seen": args.steps * args.train_seq_len, "device": args.device,
            "extra": args.train_extra}
    from adaptive_sparse.io import atomic_write_json
    atomic_write_json(info_path, info)
    return gates, info


def run_sweep_stage(out: Path, args, gates: Path) -> dict:
    from sweeps.cli import SweepConfig, run_sweep
    from sweeps.evaluators import ModelEvaluator
    from sweeps.frontier import format_table, write_report

    cfg = SweepConfig.load(args.sweep_config)
    cfg = SweepConfig.from_dict({**asdict(cfg), "n_trials": args.sweep_trials,
                                 "name": f"{cfg.name}-{args.sweep_seq_len}",
                                 "method_allocation": args.sweep_allocation})
    evaluator = ModelEvaluator(args.model, seq_len=args.sweep_seq_len,
                               num_seqs=args.sweep_docs, gates=str(gates),
                               device=args.device, backend=args.backend, gate_fast=False)
    run_sweep(cfg, out / "sweep", evaluator=evaluator, progress=True)
    report = write_report(out / "sweep")
    print(format_table(report), flush=True)
    return report


def check_args(args) -> dict:
    """The lever's policy fields, after refusing bad lever / calibration values (ValueError
    naming the flag; `main` exits 2 with it)."""
    from adaptive_sparse.errors import fail
    from adaptive_sparse.policies import Policy

    if args.calib_docs < 1:
        raise fail("--calib-docs", "a positive int", args.calib_docs)
    if args.tail_scale != [1.0] and not args.tail_blocks:
        raise fail("--tail-scale", "values with --tail-blocks >= 1", args.tail_scale)
    if args.decode_gates is not None:
        if not Path(args.decode_gates).exists():
            raise fail("--decode-gates", "an existing decode-gate artifact directory or "
                       "save_decode_gates file", args.decode_gates)
        if not args.needle_lens:
            raise fail("--decode-gates", "--needle-lens (the decode gates serve the needle "
                       "runs)", "no needle lengths")
    if args.decode_bounds and not args.needle_lens:
        raise fail("--decode-bounds", "--needle-lens (the bounds serve the needle runs)",
                   "no needle lengths")
    try:
        for scale in args.tail_scale:
            Policy("threshold", tau=0.01, **lever_policy(args, scale))
    except ValueError as e:
        name, _, rest = str(e).partition(":")
        raise ValueError(f"--{name.replace('_', '-')}:{rest}") from None
    return lever_policy(args)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        lever = check_args(args)
    except ValueError as e:
        parser.error(str(e))  # exit status 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.union:
        print(union_fronts(args.union, out))
        return 0
    if args.merge:
        results = merge(out, args.merge, None)
        print(markdown(results, sorted({r["seq_len"] for r in results.data["rows"]},
                                       reverse=True)))
        return 0
    t0 = time.perf_counter()
    if args.gates:
        gates, training = Path(args.gates), None
    else:
        print(f"== training gates at {args.train_seq_len} tokens on {args.device}", flush=True)
        gates, training = train(out, args)
        print(f"   {training}", flush=True)
    extra = dict(item.split("=", 1) for item in args.extra_gates)
    results = Results(out / "quality.json", {"model": args.model,
                                             "environment": environment(args.device),
                                             "gates": str(gates), "training": training,
                                             "extra_gates": extra or None,
                                             "eval_docs": args.eval_docs, "split": "validation",
                                             "corpus": args.corpus, "eval_dtype": args.eval_dtype,
                                             "block_size": args.block_size,
                                             "backend": args.backend,
                                             "budgets": {"families": args.budgets,
                                                         "calib_docs": args.calib_docs,
                                                         "calib_split": args.calib_split}
                                             if args.budgets else None,
                                             "lever": lever or None,
                                             "decode_gates": args.decode_gates,
                                             "decode_bounds": args.bounds_combine
                                             if args.decode_bounds else None})
    lens = list(dict.fromkeys([*args.seq_lens, *args.needle_lens]))
    if lens:
        from adaptive_sparse.data import load_corpus, pack, split_documents
        from adaptive_sparse.models import load_model

        model, tok = load_model(args.model, dtype=getattr(torch, args.eval_dtype))
        model.to(args.device).eval()
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("sdpa")  # dense needle runs: never eager at 32k
        split = split_documents(load_corpus(args.corpus), seed=0, fractions=(0.8, 0.1, 0.1))
        docs, calib_docs = split["validation"], split[args.calib_split]
        if args.budgets and {d.id for d in docs} & {d.id for d in calib_docs}:
            raise ValueError("--calib-split: calibration documents overlap the evaluation's")
        if args.decode_gates:
            try:
                args.decode_gate_set = load_needle_decode_gates(args.decode_gates, model, args)
            except ValueError as e:
                parser.error(str(e))  # exit status 2
    for n in lens:
        print(f"== quality table at {n} tokens, {args.eval_docs} held-out sequences "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        ev = make_evaluator(model, pack(tok, docs, n, args.eval_docs), n, gates, args)
        if n in args.seq_lens:
            calib = pack(tok, calib_docs, n, args.calib_docs) if args.budgets else None
            evaluate_table(ev, results, n, densities=args.densities, patterns=args.patterns,
                           block_size=args.block_size, extra_gates=extra,
                           budgets=args.budgets, calib_sequences=calib, lever=lever)
            (out / "quality.md").write_text(markdown(results, args.seq_lens)
                                            + needle_markdown(results))
            plot(results, args.seq_lens, out / "quality.png")
        if n in args.needle_lens:
            print(f"== needle at {n} tokens [{time.perf_counter() - t0:.0f} s]", flush=True)
            needle_stage(ev, tok, results, n, args)
            (out / "quality.md").write_text(markdown(results, args.seq_lens)
                                            + needle_markdown(results))
        del ev
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(markdown(results, args.seq_lens) + needle_markdown(results), flush=True)
    if args.sweep_seq_len:
        print(f"== sweep at {args.sweep_seq_len} tokens [{time.perf_counter() - t0:.0f} s]",
              flush=True)
        run_sweep_stage(out, args, gates)
    print(f"== done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
