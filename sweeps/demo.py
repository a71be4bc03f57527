"""`make demo`: the whole flow on the bundled SmolLM2-135M, small enough for 2 CPU cores.

    featurize + train gates -> bring every method to one density -> evaluate -> short sweep
    -> export

It lives in `sweeps` because it is the one place that may import every layer
(sweeps -> gating -> adaptive_sparse). Every number it prints is measured in the run; the
results land in OUT/ (results.md, results.json, tradeoff.png, per_layer_density.png, the gate
run, the sweep study, the exported artifacts).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

SEQ_LEN = 2048
BLOCK_SIZE = 32
WHY = (
    "Why these settings: what decides whether block sparsity pays is the number of key blocks "
    "in a query row, not the length. {seq_len} tokens in blocks of {bs} give {kb} per row, as "
    "many as 4096 tokens in blocks of 64; there the oracle keeps perplexity within a few "
    "percent at density 0.25, while at 16 per row (1024 tokens, block 64) every method, the "
    "oracle too, loses perplexity. The gate uses the threshold policy: per row and head it "
    "keeps the blocks whose predicted attention mass is above tau, so its budget follows the "
    "attention, while a pattern keeps one shape. Each method's knob (tau, window, budget, ...) "
    "is set so that its density on the first evaluation sequence is the one asked for; the "
    "table reports the density measured over all of them.")


def _step(msg: str, t0: float) -> None:
    print(f"\n== [{time.perf_counter() - t0:5.0f} s] {msg}", flush=True)


def train_gates(out: Path, *, model: str, seq_len: int, block_size: int, train_seqs: int,
                val_seqs: int, steps: int, extra: list[str] | None = None) -> Path:
    """Featurize (cached, resumable) and distill gates through the LightningCLI entry; `extra`
    are more `--key value` overrides (e.g. `--trainer.accelerator gpu`)."""
    from gating.cli import DEFAULT_CONFIG, train_main

    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
               "init_args": {"save_dir": str(out / "gates"), "name": "demo", "version": 0}}]
    argv = ["fit", "--config", str(DEFAULT_CONFIG),
            "--data.model", model, "--data.cache_dir", str(out / "gate_cache"),
            "--data.seq_len", str(seq_len), "--data.block_size", str(block_size),
            "--data.num_train", str(train_seqs), "--data.num_val", str(val_seqs),
            "--trainer.max_steps", str(steps), "--trainer.check_val_every_n_epoch", "5",
            "--trainer.default_root_dir", str(out / "gates"),
            "--trainer.logger", json.dumps(logger), "--trainer.enable_progress_bar", "false",
            *(extra or [])]
    train_main(argv)
    gates = out / "gates" / "demo" / "version_0" / "gates"
    if not (gates / "gates.json").exists():
        raise RuntimeError(f"gate training finished but wrote no gates at {gates}")
    return gates


def pattern_knobs(seq_len: int, bs: int) -> dict[str, tuple]:
    """family -> (params of knob x, lowest x, highest x, integer knob): every pattern of the
    zoo with one knob whose growth raises the density."""
    kb = math.ceil(seq_len / bs)
    return {
        "sliding_window": (lambda x: {"window": x * bs, "sink_blocks": 1}, 1, kb, True),
        "longformer": (lambda x: {"window": x * bs, "global_blocks": 1}, 1, kb, True),
        "bigbird": (lambda x: {"window": x * bs, "global_blocks": 1, "random_blocks": 2,
                               "seed": 0}, 1, kb, True),
        # half of the budget local, the rest from every stride-th key block
        "strided": (lambda x: {"local_blocks": max(1, x // 2),
                               "stride": max(2, round(2 * kb / max(1, x)))}, 1, kb, True),
        "lsh": (lambda x: {"n_buckets": max(2, 2 * (kb // 2 + 1 - x)), "n_rounds": 2,
                           "seed": 0}, 1, kb // 2, True),
        "hierarchical": (lambda x: {"budget": float(x)}, 1, kb, True),
        "vertical_slash": (lambda x: {"n_vertical": max(1, x // 2),
                                      "n_slash": max(1, x - x // 2)}, 1, kb, True),
        "antidiagonal": (lambda x: {"threshold": x, "stride": 16}, 0.3, 0.999, False),
    }


def bring_to_density(ev, target: float, *, seq_len: int, bs: int, log=print) -> dict:
    """name -> (family, params, screened density): the gate (threshold policy), the oracle
    (block-sum ranking; threshold and density policies) and every pattern, each calibrated to
    `target`."""
    from adaptive_sparse.policies import calibrate_to_density as calibrate

    def screen(family):
        return lambda params: ev.screen(family, params)["density"]

    out = {}
    # tau grows -> density falls: bisect on 1/tau
    params, d = calibrate(screen("gate"), lambda x: {"policy": {"kind": "threshold",
                                                                 "tau": 1.0 / x}},
                          2.0, 1e4, target, integer=False, iters=9, log=True)
    out["gate (learned), threshold"] = ("gate", params, d)
    params, d = calibrate(screen("oracle"), lambda x: {"policy": {"kind": "threshold",
                                                                   "tau": 1.0 / x},
                                                        "target": "sum"},
                          2.0, 1e4, target, integer=False, iters=9, log=True)
    out["oracle (block sum), threshold"] = ("oracle", params, d)
    oracle = {"policy": {"kind": "density", "density": target}, "target": "sum"}
    out["oracle (block sum), density"] = ("oracle", oracle, screen("oracle")(oracle))
    for family, (make, lo, hi, integer) in pattern_knobs(seq_len, bs).items():
        params, d = calibrate(screen(family), make, lo, hi, target, integer=integer)
        out[family] = (family, params, d)
    for name, (_, params, d) in out.items():
        log(f"  {name:<30} density {d:.3f} on the calibration sequence  {_short(params)}")
    return out


def _short(params: dict) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    flat = {**{k: v for k, v in params.items() if k != "policy"},
            **{k: v for k, v in params.get("policy", {}).items() if k != "kind"}}
    return " ".join(f"{k}={fmt(v)}" for k, v in flat.items())


def evaluate_all(ev, methods: dict, log=print) -> list[dict]:
    rows = []
    for name, (family, params, screened) in methods.items():
        r = ev.evaluate(family, params)
        rows.append({"name": name, "family": family, "params": params,
                     "screen_density": screened, "density": r["density"],
                     "perplexity_dense": r["perplexity_dense"], "perplexity": r["perplexity"],
                     "ppl_change": r["perplexity"] / r["perplexity_dense"] - 1.0,
                     "recall": r["recall"], "per_layer_density": r["per_layer_density"]})
        log(f"  {name:<30} density {r['density']:.3f}  ppl {r['perplexity']:.3f} "
            f"({100 * rows[-1]['ppl_change']:+.2f}%)  recall {r['recall']:.3f}")
    return rows


def table(rows: list[dict]) -> str:
    head = ("| method | density | perplexity | change vs dense | attention recall | knob |\n"
            "|---|---|---|---|---|---|")
    lines = [f"| dense | 1.000 | {rows[0]['perplexity_dense']:.3f} | - | 1.000 | - |"]
    for r in sorted(rows, key=lambda r: r["ppl_change"]):
        lines.append(f"| {r['name']} | {r['density']:.3f} | {r['perplexity']:.3f} | "
                     f"{100 * r['ppl_change']:+.2f}% | {r['recall']:.3f} | "
                     f"{_short(r['params'])} |")
    return "\n".join([head, *lines])


def verdict(rows: list[dict], target: float) -> str:
    """One sentence: does the gate beat every pattern at (about) equal density?"""
    gate = next(r for r in rows if r["family"] == "gate")
    patterns = [r for r in rows if r["family"] not in ("gate", "oracle")]
    best = min(patterns, key=lambda r: r["ppl_change"])
    spread = max(abs(r["density"] - target) for r in rows)
    beaten = [r["name"] for r in patterns if r["ppl_change"] <= gate["ppl_change"]]
    head = (f"The learned gate ({100 * gate['ppl_change']:+.2f}% at density "
            f"{gate['density']:.3f}) is ahead of every pattern; the best pattern, "
            f"{best['name']}, loses {100 * best['ppl_change']:+.2f}% at {best['density']:.3f}."
            if not beaten else
            f"The learned gate ({100 * gate['ppl_change']:+.2f}% at density "
            f"{gate['density']:.3f}) is NOT ahead of {', '.join(beaten)} here.")
    return (f"{head} Densities differ from the target {target} by at most {spread:.3f}: a "
            "pattern's knob moves in whole blocks, and a threshold's density varies from "
            "sequence to sequence (it was set on the first one).")


def short_sweep(out: Path, gates_dir: Path, *, model_obj, seqs, block_size: int, trials: int,
                progress: bool) -> dict:
    from sweeps.cli import SweepConfig, run_sweep
    from sweeps.evaluators import ModelEvaluator
    from sweeps.frontier import format_table, write_report

    kb = math.ceil(seqs.shape[1] / block_size)
    cfg = SweepConfig.from_dict({
        "name": "demo-frontier", "n_trials": trials, "seed": 0, "n_startup_trials": 3,
        "objectives": ["density", "ppl_change"], "budgets": [0.02, 0.05],
        "method_allocation": "round_robin",
        "methods": {
            "gate/threshold": {"tau": {"low": 0.0005, "high": 0.05, "log": True}},
            "oracle/top_k": {"k": {"low": 2, "high": kb // 2}, "target": "sum"},
            "sliding_window": {"window": {"low": block_size, "high": seqs.shape[1] // 2,
                                          "step": block_size}, "sink_blocks": 1},
        },
    })
    evaluator = ModelEvaluator(seq_len=seqs.shape[1], num_sequences=1, gates=str(gates_dir),
                               block_size=block_size, model_obj=model_obj, sequences=seqs[:1])
    run_sweep(cfg, out / "sweep", evaluator=evaluator, progress=progress)
    report = write_report(out / "sweep")
    print(format_table(report))
    return report


def run_demo(out: str | Path = "runs/demo", *, model: str = "smollm2-135m",
             seq_len: int = SEQ_LEN, block_size: int = BLOCK_SIZE, train_seqs: int = 8,
             val_seqs: int = 2, steps: int = 200, eval_seqs: int = 2, density: float = 0.25,
             trials: int = 9, progress: bool = True) -> dict:
    """Run the demo and write OUT/results.md; returns the numbers."""
    from adaptive_sparse.data import load_corpus, pack, split_documents
    from adaptive_sparse.export.build import export_and_verify
    from adaptive_sparse.gates import load_gates
    from adaptive_sparse.io import atomic_write_json, atomic_write_text
    from adaptive_sparse.models import load_model
    from adaptive_sparse.plots import plot_layer_density, plot_tradeoff
    from adaptive_sparse.policies import Policy
    from sweeps.evaluators import ModelEvaluator

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kb = math.ceil(seq_len / block_size)
    why = WHY.format(seq_len=seq_len, bs=block_size, kb=kb)
    print(why, flush=True)
    t0 = time.perf_counter()
    _step(f"1/5 featurize {train_seqs}+{val_seqs} sequences of {seq_len} tokens and train "
          f"gates for {steps} steps (Lightning)", t0)
    gates_dir = train_gates(out, model=model, seq_len=seq_len, block_size=block_size,
                            train_seqs=train_seqs, val_seqs=val_seqs, steps=steps)
    t_train = time.perf_counter() - t0
    net, tok = load_model(model)
    docs = split_documents(load_corpus("default"), seed=0)["validation"]
    seqs = pack(tok, docs, seq_len, max_sequences=eval_seqs)
    ev = ModelEvaluator(model_obj=net, sequences=seqs, gates=str(gates_dir),
                        block_size=block_size, screen_sequences=1)
    _step(f"2/5 bring every method to density {density} on the first of {eval_seqs} held-out "
          f"sequences (validation documents the gate never saw)", t0)
    methods = bring_to_density(ev, density, seq_len=seq_len, bs=block_size)
    _step(f"3/5 perplexity on {eval_seqs} held-out sequences of {seq_len} tokens", t0)
    rows = evaluate_all(ev, methods)
    print(table(rows))
    summary = verdict(rows, density)
    print(summary)
    title = f"{model}, {seq_len} tokens, block {block_size}, target density {density}"
    plot_tradeoff(rows, out / "tradeoff.png", title=title)
    plot_layer_density({r["name"]: r["per_layer_density"] for r in rows
                        if r["family"] in ("gate", "oracle", "sliding_window", "antidiagonal")},
                       out / "per_layer_density.png", title=title, target=density)
    _step(f"4/5 sweep: {trials} Optuna trials over gate / oracle / sliding window", t0)
    report = short_sweep(out, gates_dir, model_obj=net, seqs=seqs, block_size=block_size,
                         trials=trials, progress=progress)
    _step("5/5 export the gate and its masks, reload, compare logits", t0)
    gate_set = load_gates(gates_dir, net)
    gate_params = methods["gate (learned), threshold"][1]
    verified = export_and_verify(net, seqs[:1], gate_set, Policy(**gate_params["policy"]),
                                 out / "export")
    print(f"  gate artifact reloaded: identical logits = {verified['gate_logits_equal']}; "
          f"mask artifact: identical logits = {verified['masks_logits_equal']} "
          f"(max abs diff {verified['max_abs_diff']})")
    total = time.perf_counter() - t0
    md = [f"# adaptive-sparse demo ({model})", "",
          f"Gates trained on {train_seqs} sequences of {seq_len} tokens for {steps} steps "
          f"({t_train:.0f} s including featurization). Evaluated on {eval_seqs} validation "
          f"sequences the gate never saw, block {block_size} ({kb} key blocks per row), every "
          f"method brought to density {density}.", "", why, "", table(rows), "", summary, "",
          "Pictures: tradeoff.png, per_layer_density.png, sweep/frontier.png.", "",
          f"Export: identical logits after reload: gate {verified['gate_logits_equal']}, "
          f"masks {verified['masks_logits_equal']}.", "", f"Total time: {total:.0f} s."]
    atomic_write_text(out / "results.md", "\n".join(md) + "\n")
    result = {"seq_len": seq_len, "block_size": block_size, "target_density": density,
              "rows": rows, "verdict": summary,
              "export": {k: v for k, v in verified.items()
                         if k in ("gate_logits_equal", "masks_logits_equal", "max_abs_diff")},
              "sweep_files": report.get("files", []), "seconds": total,
              "seconds_train": t_train}
    atomic_write_json(out / "results.json", result)
    _step(f"done in {total:.0f} s; see {out}/results.md", t0)
    return result
