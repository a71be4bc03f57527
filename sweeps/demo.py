"""`make demo`: the whole flow on the bundled SmolLM2-135M, small enough for 2 CPU cores.

    featurize + train gates -> evaluate gate vs oracle vs patterns -> short sweep -> export

It lives in `sweeps` because it is the one place that may import every layer
(sweeps -> gating -> adaptive_sparse). Every number it prints is measured in the run; the
results land in OUT/ (results.md, results.json, PNG pictures, the gate run, the sweep study, the
exported artifacts).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def _step(msg: str, t0: float) -> None:
    print(f"\n== [{time.perf_counter() - t0:5.0f} s] {msg}", flush=True)


def train_gates(out: Path, *, model: str, seq_len: int, train_docs: int, val_docs: int,
                steps: int, extra: list[str] | None = None) -> Path:
    """Featurize (cached, resumable) and distill gates through the LightningCLI entry; `extra`
    are more `--key value` overrides (e.g. `--trainer.accelerator gpu`)."""
    from gating.cli import DEFAULT_CONFIG, train_main

    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
               "init_args": {"save_dir": str(out / "gates"), "name": "demo", "version": 0}}]
    argv = ["fit", "--config", str(DEFAULT_CONFIG),
            "--data.model", model, "--data.cache_dir", str(out / "gate_cache"),
            "--data.seq_len", str(seq_len), "--data.num_train", str(train_docs),
            "--data.num_val", str(val_docs), "--trainer.max_steps", str(steps),
            "--trainer.check_val_every_n_epoch", "5",
            "--trainer.default_root_dir", str(out / "gates"),
            "--trainer.logger", json.dumps(logger), "--trainer.enable_progress_bar", "false",
            *(extra or [])]
    train_main(argv)
    gates = out / "gates" / "demo" / "version_0" / "gates"
    if not (gates / "gates.json").exists():
        raise RuntimeError(f"gate training finished but wrote no gates at {gates}")
    return gates


def compare(model, tokenizer, gates_dir: Path, *, seq_len: int, docs: int, density: float,
            progress: bool) -> tuple[list[dict], torch.Tensor]:
    """Dense vs the learned gate vs the oracle vs zoo patterns at one target density, on
    validation documents the gate never saw. Returns (rows, sequences LongTensor [S, N])."""
    from adaptive_sparse.data import load_corpus, pack, split_documents
    from adaptive_sparse.evaluate import evaluate
    from adaptive_sparse.masks import blocks_per_row_for_density
    from adaptive_sparse.models import OracleProvider, PatternProvider
    from adaptive_sparse.policies import Policy
    from adaptive_sparse.gates import GateProvider, load_gates

    bs = 64
    layers = model.config.num_hidden_layers
    docs_all = split_documents(load_corpus("default"), seed=0)["validation"]
    seqs = pack(tokenizer, docs_all, seq_len, max_sequences=docs)
    policy = Policy(kind="density", density=density)
    # the window: the uniform per-row budget closest to the target, less the diagonal block
    window = max(1, blocks_per_row_for_density(density, seq_len, seq_len, bs) - 1) * bs
    gate_set = load_gates(gates_dir, model)
    settings = [
        ("gate (learned), density", lambda: GateProvider(gate_set, policy, model)),
        ("oracle (block sum), density", lambda: OracleProvider(policy, target="sum",
                                                               block_size=bs, num_layers=layers)),
        (f"sliding_window {window - bs} + sink block", lambda: PatternProvider(
            "sliding_window", block_size=bs, window=max(bs, window - bs), sink_blocks=1)),
        (f"longformer {window - bs} + 1 global", lambda: PatternProvider(
            "longformer", block_size=bs, window=window - bs, global_blocks=1)),
        (f"bigbird {max(bs, window - 2 * bs)} + 1 global + 1 random", lambda: PatternProvider(
            "bigbird", block_size=bs, window=max(bs, window - 2 * bs), global_blocks=1,
            random_blocks=1, seed=0)),
    ]
    rows, cache = [], {}
    for name, make in settings:
        provider = make()
        if hasattr(provider, "__enter__"):
            with provider as p:
                r = evaluate(model, seqs, p, dense_cache=cache, progress=progress, desc=name)
        else:
            r = evaluate(model, seqs, provider, dense_cache=cache, progress=progress, desc=name)
        rows.append({"name": name, **{k: r[k] for k in ("perplexity_dense", "perplexity",
                                                         "ppl_change", "density", "recall")}})
        print(f"  {name:<44} density {r['density']:.3f}  ppl {r['perplexity']:.3f} "
              f"({100 * r['ppl_change']:+.2f}%)  recall {r['recall']:.3f}", flush=True)
    return rows, seqs


def table(rows: list[dict]) -> str:
    head = "| method | density | perplexity | change vs dense | attention recall |\n|---|---|---|---|---|"
    lines = [f"| dense | 1.000 | {rows[0]['perplexity_dense']:.3f} | - | 1.000 |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['density']:.3f} | {r['perplexity']:.3f} | "
                     f"{100 * r['ppl_change']:+.2f}% | {r['recall']:.3f} |")
    return "\n".join([head, *lines])


def short_sweep(out: Path, gates_dir: Path, *, model_obj, seqs, trials: int,
                progress: bool) -> dict:
    from sweeps.cli import SweepConfig, run_sweep
    from sweeps.evaluators import ModelEvaluator
    from sweeps.frontier import format_table, write_report

    cfg = SweepConfig.from_dict({
        "name": "demo-frontier", "n_trials": trials, "seed": 0, "n_startup_trials": 4,
        "objectives": ["density", "ppl_change"], "budgets": [0.01, 0.05],
        "methods": {
            "gate/top_k": {"k": {"low": 2, "high": 12}},
            "oracle/top_k": {"k": {"low": 2, "high": 12}, "target": "sum"},
            "sliding_window": {"window": {"low": 64, "high": 768, "step": 64}},
        },
    })
    evaluator = ModelEvaluator(seq_len=seqs.shape[1], num_sequences=1, gates=str(gates_dir),
                               model_obj=model_obj, sequences=seqs[:1])
    run_sweep(cfg, out / "sweep", evaluator=evaluator, progress=progress)
    report = write_report(out / "sweep")
    print(format_table(report))
    return report


def run_demo(out: str | Path = "runs/demo", *, model: str = "smollm2-135m", seq_len: int = 1024,
             train_docs: int = 6, val_docs: int = 2, steps: int = 150, eval_docs: int = 2,
             density: float = 0.35, trials: int = 9, progress: bool = True) -> dict:
    """Run the demo and write OUT/results.md; returns the numbers."""
    from adaptive_sparse.export.build import export_and_verify
    from adaptive_sparse.models import load_model
    from adaptive_sparse.policies import Policy
    from adaptive_sparse.gates import load_gates

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _step(f"1/4 featurize {train_docs}+{val_docs} documents of {seq_len} tokens and train "
          f"gates for {steps} steps (Lightning)", t0)
    gates_dir = train_gates(out, model=model, seq_len=seq_len, train_docs=train_docs,
                            val_docs=val_docs, steps=steps)
    t_train = time.perf_counter() - t0
    net, tok = load_model(model)
    _step(f"2/4 evaluate on {eval_docs} held-out documents at density ~{density}", t0)
    rows, seqs = compare(net, tok, gates_dir, seq_len=seq_len, docs=eval_docs,
                         density=density, progress=progress)
    print(table(rows))
    from adaptive_sparse.plots import plot_tradeoff

    plot_tradeoff(rows, out / "tradeoff.png", title=f"{model}, {seq_len} tokens")
    _step(f"3/4 sweep: {trials} Optuna trials over gate / oracle / sliding window", t0)
    report = short_sweep(out, gates_dir, model_obj=net, seqs=seqs, trials=trials,
                         progress=progress)
    _step("4/4 export the gate and its masks, reload, compare logits", t0)
    gate_set = load_gates(gates_dir, net)
    verified = export_and_verify(net, seqs[:1], gate_set, Policy(kind="density", density=density),
                                 out / "export")
    print(f"  gate artifact reloaded: identical logits = {verified['gate_logits_equal']}; "
          f"mask artifact: identical logits = {verified['masks_logits_equal']} "
          f"(max abs diff {verified['max_abs_diff']})")
    total = time.perf_counter() - t0
    md = [f"# adaptive-sparse demo ({model})", "",
          f"Gates trained on {train_docs} documents of {seq_len} tokens for {steps} steps "
          f"({t_train:.0f} s including featurization). Evaluated on {eval_docs} validation "
          f"documents the gate never saw, block 64, target density {density}.", "",
          table(rows), "", "Pictures: tradeoff.png, sweep/frontier.png.", "",
          f"Export: identical logits after reload: gate {verified['gate_logits_equal']}, "
          f"masks {verified['masks_logits_equal']}.", "", f"Total time: {total:.0f} s."]
    (out / "results.md").write_text("\n".join(md) + "\n")
    result = {"rows": rows, "export": {k: v for k, v in verified.items()
                                       if k in ("gate_logits_equal", "masks_logits_equal",
                                                "max_abs_diff")},
              "sweep_files": report.get("files", []), "seconds": total,
              "seconds_train": t_train}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    _step(f"done in {total:.0f} s; see {out}/results.md", t0)
    return result
