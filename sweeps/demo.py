"""`make demo`: the whole flow on the bundled SmolLM2-135M, small enough for 2 CPU cores.

    featurize + train gates -> bring every method to one density -> evaluate -> short sweep
    -> export

It lives in `sweeps` because it is the one place that may import every layer
(sweeps -> gating -> adaptive_sparse). Every number it prints is measured in the run; the
results land in OUT/ (results.md, results.json, tradeoff.png, per_layer_density.png, the gate
run, the sweep study, the exported artifacts). Each step prints its wall and CPU (user + sys) time;
results.md and results.json keep them.
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
    "is set so that its density on the first evaluation sequence is the one asked for (from "
    "one dense forward over it: its q, k, true block sums and the gate's scores), and the table "
    "reports the density measured over all of them in the sparse runs.")


class Clock:
    """Wall and CPU (user + sys of this process, all threads) time per step of the demo."""

    def __init__(self):
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        self.steps: list[dict] = []
        self._open: tuple | None = None

    def step(self, name: str, msg: str) -> None:
        """Close the running step and open `name` (announced with `msg`)."""
        self.stop()
        print(f"\n== [{time.perf_counter() - self.t0:5.0f} s] {msg}", flush=True)
        self._open = (name, time.perf_counter(), time.process_time())

    def stop(self) -> None:
        if self._open is not None:
            name, wall, cpu = self._open
            self.steps.append({"step": name, "wall_s": time.perf_counter() - wall,
                               "cpu_s": time.process_time() - cpu})
            print(f"   ({name}: {self.steps[-1]['wall_s']:.0f} s wall, "
                  f"{self.steps[-1]['cpu_s']:.0f} s CPU)", flush=True)
            self._open = None

    def total(self) -> dict:
        return {"step": "total", "wall_s": time.perf_counter() - self.t0,
                "cpu_s": time.process_time() - self.cpu0}

    def table(self) -> str:
        rows = [*self.steps, self.total()]
        return "\n".join(["| step | wall (s) | CPU, user + sys (s) |", "|---|---|---|",
                          *(f"| {r['step']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |"
                            for r in rows)])


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
    from adaptive_sparse.gates import resolve_gates_dir

    train_main(argv)
    return resolve_gates_dir(out / "gates" / "demo" / "version_0")  # refused when none


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


class Screens:
    """Every method screened on one dense forward over `sequence` LongTensor [1, N]: it records
    each layer's post-rotary q, k, true block sums and the learned gate's scores (from the
    pre-rotary q, k its hooks capture); a screen then builds the method's masks from those and
    measures density and attention recall, with no further forward (gate_params: any gate
    setting, for the hooks; None: no gate scores). The gate's and the
    oracle's masks go through their policy (`Policy.to_mask`, as `GateProvider` and
    `OracleProvider` do), a pattern's through its provider."""

    def __init__(self, ev, model, sequence, *, block_size: int, gate_params: dict | None):
        import torch
        from adaptive_sparse.models import RecordingProvider, sparse_attention

        gate = ev.provider("gate", gate_params) if gate_params is not None else None
        self.ev, self.block_size = ev, block_size
        self.gate_scores: dict = {}

        def scores(layer, q, k):
            if gate is not None:
                self.gate_scores[layer] = gate.scores(layer, q.shape[2], k.shape[2])
            return None  # dense attention

        rec = RecordingProvider(scores, block_size=block_size, qk=True, maps=True,
                                last_only=True)
        try:
            with torch.no_grad(), sparse_attention(model, rec, block_size=block_size):
                model(input_ids=sequence)
        finally:
            if gate is not None:
                gate.detach()
        self.layers = {layer: (*rec.qk[layer][0], rec.block_sums[layer][0])
                       for layer in sorted(rec.qk)}

    def masks(self, family: str, params: dict) -> list:
        """The method's mask per recorded layer (None: dense)."""
        from adaptive_sparse.policies import Policy

        n = len(self.layers)
        if family in ("gate", "oracle"):
            if family == "oracle" and params.get("target", "sum") != "sum":
                raise ValueError(f"target: the demo screens the oracle by block sums, got "
                                 f"{params.get('target')!r}")
            policy = Policy.coerce(params["policy"])
            return [policy.to_mask(self.gate_scores[layer] if family == "gate" else bsum,
                                   q_len=q.shape[2], kv_len=k.shape[2],
                                   block_size=self.block_size, layer_idx=layer, num_layers=n,
                                   scores_are_probs=family == "oracle")
                    for layer, (q, k, bsum) in self.layers.items()]
        provider = self.ev.provider(family, params)
        return [provider(layer, q, k) for layer, (q, k, _) in self.layers.items()]

    def screen(self, family: str, params: dict) -> dict:
        """{"density", "recall"}: means over the layers."""
        import torch
        from adaptive_sparse.attention.block_maps import screen_masks

        with torch.no_grad():
            return screen_masks(zip(self.masks(family, params),
                                    [bsum for _, _, bsum in self.layers.values()]))


def bring_to_density(screens: Screens, target: float, *, seq_len: int, bs: int,
                     log=print) -> dict:
    """name -> (family, params, its screen {"density", "recall"}): the gate (threshold
    policy), the oracle (block-sum ranking; threshold and density policies) and every pattern,
    each knob bisected until its screened density is `target`."""
    from adaptive_sparse.policies import calibrate_to_density as calibrate

    def screen(family):
        return lambda params: screens.screen(family, params)["density"]

    out = {}
    # tau grows -> density falls: bisect on 1/tau; screens are cheap, so bisect finely
    params, d = calibrate(screen("gate"), lambda x: {"policy": {"kind": "threshold",
                                                                 "tau": 1.0 / x}},
                          2.0, 1e4, target, integer=False, iters=16, log=True)
    out["gate (learned), threshold"] = ("gate", params, d)
    params, d = calibrate(screen("oracle"), lambda x: {"policy": {"kind": "threshold",
                                                                   "tau": 1.0 / x},
                                                        "target": "sum"},
                          2.0, 1e4, target, integer=False, iters=16, log=True)
    out["oracle (block sum), threshold"] = ("oracle", params, d)
    oracle = {"policy": {"kind": "density", "density": target}, "target": "sum"}
    out["oracle (block sum), density"] = ("oracle", oracle, screen("oracle")(oracle))
    for family, (make, lo, hi, integer) in pattern_knobs(seq_len, bs).items():
        params, d = calibrate(screen(family), make, lo, hi, target, integer=integer,
                              iters=8 if integer else 12)
        out[family] = (family, params, d)
    for name, (family, params, d) in out.items():
        out[name] = (family, params, screens.screen(family, params))
        log(f"  {name:<30} density {d:.3f}, recall {out[name][2]['recall']:.3f} on the "
            f"calibration sequence  {_short(params)}")
    return out


def same_masks(screens: Screens, methods: dict) -> dict:
    """name -> the earlier name whose masks are identical, for static patterns (masks that
    depend on the length only, so equal on the screened sequence means equal on every one):
    such a method is evaluated once."""
    from adaptive_sparse.patterns import INPUT_DEPENDENT

    seen, out = [], {}
    for name, (family, params, _) in methods.items():
        if family in ("gate", "oracle") or family in INPUT_DEPENDENT:
            continue
        dense = [None if m is None else m.to_dense() for m in screens.masks(family, params)]
        for other, odense in seen:
            if all((a is None and b is None) or (a is not None and b is not None
                                                and a.shape == b.shape and bool((a == b).all()))
                   for a, b in zip(dense, odense)):
                out[name] = other
                break
        else:
            seen.append((name, dense))
    return out


def _short(params: dict) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    flat = {**{k: v for k, v in params.items() if k != "policy"},
            **{k: v for k, v in params.get("policy", {}).items() if k != "kind"}}
    return " ".join(f"{k}={fmt(v)}" for k, v in flat.items())


def evaluate_all(ev, model, seqs, methods: dict, same: dict | None = None, *,
                 block_size: int, log=print) -> list[dict]:
    """Perplexity and density of every method over `seqs` (`adaptive_sparse.evaluate`, its
    dense pass run once for all), providers from `ev`; recall is the screen's (the dense
    attention of the calibration sequence), so the sparse passes compute no block maps. A
    method in `same` (name -> a method with identical masks) takes that method's numbers."""
    from adaptive_sparse.evaluate import evaluate

    dense: dict = {}
    rows, done = [], {}
    for name, (family, params, screened) in methods.items():
        if same and name in same:
            r = done[same[name]]
        else:
            provider = ev.provider(family, params)
            try:
                r = evaluate(model, seqs, provider, dense_cache=dense, recall=False,
                             block_size=block_size, progress=False)
            finally:
                if hasattr(provider, "detach"):
                    provider.detach()
        done[name] = r
        rows.append({"name": name, "family": family, "params": params,
                     "screen_density": screened["density"], "density": r["density"],
                     "perplexity_dense": r["perplexity_dense"], "perplexity": r["perplexity"],
                     "ppl_change": r["ppl_change"], "recall": screened["recall"],
                     "per_layer_density": [row["density"] for row in r["per_layer"]],
                     "same_masks_as": (same or {}).get(name)})
        note = f"  (the same masks as {same[name]}: not run again)" if same and name in same \
            else ""
        log(f"  {name:<30} density {r['density']:.3f}  ppl {r['perplexity']:.3f} "
            f"({100 * r['ppl_change']:+.2f}%){note}")
    return rows


def table(rows: list[dict]) -> str:
    head = ("| method | density | perplexity | change vs dense | attention recall (first "
            "sequence) | knob |\n"
            "|---|---|---|---|---|---|")
    lines = [f"| dense | 1.000 | {rows[0]['perplexity_dense']:.3f} | - | 1.000 | - |"]
    for r in sorted(rows, key=lambda r: r["ppl_change"]):
        name = r["name"] + (f" (the same masks as {r['same_masks_as']})"
                            if r.get("same_masks_as") else "")
        lines.append(f"| {name} | {r['density']:.3f} | {r['perplexity']:.3f} | "
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
            "sequence to sequence and between the dense forward it was set on and the sparse "
            f"runs (the gate: {gate['screen_density']:.3f} on the calibration forward, "
            f"{gate['density']:.3f} over the sparse runs).")


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
    evaluator = ModelEvaluator(gates=str(gates_dir), block_size=block_size, model_obj=model_obj, sequences=seqs[:1])
    run_sweep(cfg, out / "sweep", evaluator=evaluator, progress=progress)
    report = write_report(out / "sweep")
    print(format_table(report))
    return report


def run_demo(out: str | Path = "runs/demo", *, model: str = "smollm2-135m",
             seq_len: int = SEQ_LEN, block_size: int = BLOCK_SIZE, train_seqs: int = 8,
             val_seqs: int = 2, steps: int = 200, eval_seqs: int = 2, density: float = 0.25,
             trials: int = 9, progress: bool = True) -> dict:
    """Run the demo and write OUT/results.md; returns the numbers."""
    import torch
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
    threads = torch.get_num_threads()
    clock = Clock()
    clock.step("train", f"1/5 featurize {train_seqs}+{val_seqs} sequences of {seq_len} tokens "
               f"and train gates for {steps} steps (Lightning)")
    gates_dir = train_gates(out, model=model, seq_len=seq_len, block_size=block_size,
                            train_seqs=train_seqs, val_seqs=val_seqs, steps=steps)
    # the gate config trains on 1 thread (tiny tensors); the model forwards use every core
    torch.set_num_threads(threads)
    clock.step("calibrate", f"2/5 bring every method to density {density} on the first of "
               f"{eval_seqs} held-out sequences (validation documents the gate never saw): one "
               f"dense forward records q, k, the true block sums and the gate's scores, then "
               f"each knob is bisected on them ({threads} torch threads from here on)")
    net, tok = load_model(model)
    docs = split_documents(load_corpus("default"), seed=0)["validation"]
    seqs = pack(tok, docs, seq_len, max_sequences=eval_seqs)
    ev = ModelEvaluator(model_obj=net, sequences=seqs, gates=str(gates_dir),
                        block_size=block_size)
    screens = Screens(ev, net, seqs[:1], block_size=block_size,
                      gate_params={"policy": {"kind": "threshold", "tau": 0.01}})
    methods = bring_to_density(screens, density, seq_len=seq_len, bs=block_size)
    same = same_masks(screens, methods)
    del screens
    clock.step("perplexity", f"3/5 perplexity of {len(methods) - len(same)} methods and dense "
               f"on {eval_seqs} held-out sequences of {seq_len} tokens")
    rows = evaluate_all(ev, net, seqs, methods, same, block_size=block_size)
    print(table(rows))
    summary = verdict(rows, density)
    print(summary)
    title = f"{model}, {seq_len} tokens, block {block_size}, target density {density}"
    plot_tradeoff(rows, out / "tradeoff.png", title=title)
    plot_layer_density({r["name"]: r["per_layer_density"] for r in rows
                        if r["family"] in ("gate", "oracle", "sliding_window", "antidiagonal")},
                       out / "per_layer_density.png", title=title, target=density)
    clock.step("sweep", f"4/5 sweep: {trials} Optuna trials over gate / oracle / sliding window "
               f"on the first held-out sequence")
    report = short_sweep(out, gates_dir, model_obj=net, seqs=seqs, block_size=block_size,
                         trials=trials, progress=progress)
    clock.step("export", "5/5 export the gate and its masks, reload, compare logits")
    gate_set = load_gates(gates_dir, net)
    gate_params = methods["gate (learned), threshold"][1]
    verified = export_and_verify(net, seqs[:1], gate_set, Policy(**gate_params["policy"]),
                                 out / "export")
    print(f"  gate artifact reloaded: identical logits = {verified['gate_logits_equal']}; "
          f"mask artifact: identical logits = {verified['masks_logits_equal']} "
          f"(max abs diff {verified['max_abs_diff']})")
    clock.stop()
    times = [*clock.steps, clock.total()]
    total = times[-1]["wall_s"]
    md = [f"# adaptive-sparse demo ({model})", "",
          f"Gates trained on {train_seqs} sequences of {seq_len} tokens for {steps} steps "
          f"(including featurization). Evaluated on {eval_seqs} validation sequences the gate "
          f"never saw, block {block_size} ({kb} key blocks per row), every method brought to "
          f"density {density}.", "", why, "", table(rows), "", summary, "",
          "Pictures: tradeoff.png, per_layer_density.png, sweep/frontier.png.", "",
          f"Export: identical logits after reload: gate {verified['gate_logits_equal']}, "
          f"masks {verified['masks_logits_equal']}.", "",
          f"Time per step ({threads} torch threads after training, which runs on the gate "
          f"config's threads; CPU is this process's user + sys over all its threads):", "",
          clock.table()]
    atomic_write_text(out / "results.md", "\n".join(md) + "\n")
    result = {"seq_len": seq_len, "block_size": block_size, "target_density": density,
              "rows": rows, "verdict": summary,
              "export": {k: v for k, v in verified.items()
                         if k in ("gate_logits_equal", "masks_logits_equal", "max_abs_diff")},
              "sweep_files": report.get("files", []), "seconds": total,
              "seconds_train": times[0]["wall_s"], "threads": threads, "steps": times}
    atomic_write_json(out / "results.json", result)
    print(f"\n{clock.table()}\n\n== done in {total:.0f} s; see {out}/results.md", flush=True)
    return result
