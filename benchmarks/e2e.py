"""End-to-end prefill: SDPA dense vs our attention (dense mask, trained gate), time and perplexity.

Two modes:
- default: SmolLM2-135M's architecture with seeded random weights in bf16, random token ids
  (timing only: attention time does not depend on weight values, and the gate's density policy
  fixes how many blocks each row keeps);
- `--model NAME` (a preset of `adaptive_sparse.models.load_model`, e.g. smollm2-135m,
  gemma3-270m): the real weights in bf16, token ids packed from the validation split of
  `--corpus` (documents the gates never trained on), and the perplexity of every config on
  `--ppl-docs` sequences next to its time. Gemma 3's sliding-window layers run exact local
  attention in our path (the gate only serves its global layers); SDPA runs them with its mask.

Per sequence length, in one process on identical token ids:
- correctness: the final hidden states of bf16 SDPA and of our backend with the dense mask
  against an fp64 SDPA oracle (same weights), at lengths up to `--check-max-len`; our error may
  not exceed twice SDPA's (no speedup reported otherwise);
- policies: the gate's `density` policy at each of `--densities`, and (`--thresholds`) its
  `threshold` policy with tau calibrated by bisection to each target mean density on one more
  validation sequence (not one the perplexity is measured on; random ids in the default mode);
  `--budgets`: the threshold policy with per-(layer, head) budgets calibrated on that same
  sequence for each target density (`policies.BudgetCalibrator`, fed as
  `benchmarks/quality.py --budgets gate/threshold` feeds it: `ModelEvaluator.budget_calibrators`);
- full-model prefill (use_cache=False, logits of the last token only), median ms over `--reps`
  CUDA-event-timed calls after warmup, for SDPA dense, ours with the dense mask, the trained gate
  at each density (gate network and mask building included), and the same masks replayed
  without the gate;
- one instrumented call per config: time inside the attention function summed over layers,
  and inside the gate provider (CUDA events around each call);
- on CUDA, the fast gate path's masks against the reference path's (tiles that differ).

    python3 benchmarks/e2e.py --gates .e2e/gates --json out.json --md out.md [--seqlens 8192]
    python3 benchmarks/e2e.py --model gemma3-270m --gates G --seqlens 32768 --thresholds 0.1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time

import torch

from adaptive_sparse.evaluate import final_hidden
from adaptive_sparse.io import atomic_write_text
from adaptive_sparse.masks import compare_masks
from adaptive_sparse.models import RecordingProvider, sparse_attention, text_config
from adaptive_sparse.policies import Policy, calibrate_to_density
from benchmarks.common import DENSE_BACKENDS, environment, floats, fmt

# LlamaConfig fields of SmolLM2-135M(-Instruct), as `load_model("smollm2-135m").config` reports
# them; `--check-config` compares them with the loaded GGUF model where it is installed.
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu",
    max_position_embeddings=8192, rms_norm_eps=9.999999747378752e-06,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, attention_bias=False,
    mlp_bias=False, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def check_config() -> list[str]:
    """Fields of SMOLLM2_135M that differ from the installed GGUF model's config (empty: same)."""
    from adaptive_sparse.models import load_model

    cfg = load_model("smollm2-135m")[0].config
    return [f"{k}: {v!r} here, {getattr(cfg, k, None)!r} in the model"
            for k, v in SMOLLM2_135M.items() if getattr(cfg, k, None) != v]


def build_model(device, dtype, seed: int = 0):
    """LlamaForCausalLM with SmolLM2-135M's config and seeded random weights, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M, attn_implementation="sdpa"))
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype)


class Clock:
    """Interval timer: CUDA events on CUDA (read after one synchronize), wall clock on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.pairs = []

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.pairs.append((start, ev))
        else:
            self.pairs.append((start, time.perf_counter()))

    def total_ms(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.pairs)
        return sum(b - a for a, b in self.pairs) * 1e3


class TimedProvider:
    """Wraps a mask provider and times each call on `clock` (set by `measure`; None: untimed).
    Recording the masks is `adaptive_sparse.models.RecordingProvider`'s job (see `recorded_masks`)."""

    def __init__(self, inner, clock: Clock | None = None):
        self.inner, self.clock = inner, clock

    def __call__(self, layer_idx, q, k):
        t = self.clock.start() if self.clock else None
        mask = self.inner(layer_idx, q, k)
        if self.clock:
            self.clock.stop(t)
        return mask


class ReplayProvider:
    """Returns the masks recorded by an earlier call (the gate's masks without the gate)."""

    def __init__(self, masks: dict):
        self.masks = masks

    def __call__(self, layer_idx, q, k):
        return self.masks[layer_idx]


@contextlib.contextmanager
def wrapped_attention(name: str, around):
    """Run every call of the attention function registered as `name` inside `around()` (a
    context manager factory), through a local override of transformers'
    ALL_ATTENTION_FUNCTIONS, removed on exit."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner = ALL_ATTENTION_FUNCTIONS[name]

    def wrapper(*args, **kwargs):
        with around():
            return inner(*args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[name] = wrapper
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS[name]


def timed_attention(name: str, clock: Clock):
    """Time every call of the attention function registered as `name` on `clock`."""
    @contextlib.contextmanager
    def timed():
        t = clock.start()
        yield
        clock.stop(t)
    return wrapped_attention(name, timed)


@contextlib.contextmanager
def sync_debug_error():
    """torch.cuda.set_sync_debug_mode("error") inside (a host-device sync raises)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def forward(model, ids, keep_logits: int = 1):
    """Logits [1, keep, V] (all when keep_logits=0). no_grad, not inference_mode: the triton
    backend caches per-mask statistics keyed on tensor version counters, which inference
    tensors lack."""
    with torch.no_grad():
        return model(ids, use_cache=False, logits_to_keep=keep_logits).logits


def median_ms(fn, reps: int, warmup: int, cuda: bool) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        clock = Clock(cuda)
        t = clock.start()
        fn()
        clock.stop(t)
        times.append(clock.total_ms())
    return statistics.median(times), times


def check_hidden(model, ids, backend: str, block_size: int) -> dict:
    """Final hidden states (after the last norm, before the LM head) of bf16 SDPA and of ours
    (dense mask) against an fp64 SDPA oracle with the same weights: relative Frobenius errors."""
    oracle_model = copy.deepcopy(model).to(torch.float64)
    ref = final_hidden(oracle_model, ids).double()
    del oracle_model
    sdpa = final_hidden(model, ids).double()
    with sparse_attention(model, None, block_size=block_size, backend=backend):
        ours = final_hidden(model, ids).double()
    norm = ref.norm()
    out = dict(err_sdpa=float((sdpa - ref).norm() / norm),
               err_ours=float((ours - ref).norm() / norm),
               max_abs_ours_vs_sdpa=float((ours - sdpa).abs().max()),
               max_abs_sdpa_vs_oracle=float((sdpa - ref).abs().max()),
               max_abs_ours_vs_oracle=float((ours - ref).abs().max()),
               hidden_abs_max=float(ref.abs().max()))
    out["ok"] = bool(torch.isfinite(ours).all()) and out["err_ours"] <= 2 * out["err_sdpa"] + 1e-6
    return out


def mean_density(masks: dict) -> float:
    """Mean density over the layers the provider served (Gemma 3: its global layers)."""
    return statistics.mean(float(m.density()) for m in masks.values())


def gate_masks(model, gates, policy, ids, a, fast=None) -> dict:
    """layer -> mask of one forward with the gate under `policy`."""
    from adaptive_sparse.gates import GateProvider

    with GateProvider(gates, policy, model, fast=fast) as gate:
        return recorded_masks(model, gate, ids, a)


def recorded_masks(model, provider, ids, a) -> dict:
    """layer -> the mask `provider` returned in one forward over `ids` (kept on its device)."""
    recorder = RecordingProvider(provider, block_size=a.block_size, last_only=True, device=None)
    with sparse_attention(model, recorder, block_size=a.block_size, backend=a.backend):
        forward(model, ids)
    return {layer: kept[0] for layer, kept in recorder.masks.items()}


def calibrate_tau(model, gates, ids, target: float, a, fast=None, iters: int = 16) -> dict:
    """tau of the `threshold` policy whose mean density on `ids` is closest to `target`:
    bisection in log(1 / tau) over [1, 1e7] (density falls as tau grows)."""
    def screen(policy):
        return mean_density(gate_masks(model, gates, policy, ids, a, fast))

    policy, d = calibrate_to_density(screen, lambda x: Policy(kind="threshold", tau=1.0 / x),
                                     1.0, 1e7, target, log=True, iters=iters)
    return {"tau": policy.tau, "density": d}


def threshold_budgets(model, cal_ids, n: int, a, fast=None):
    """A `policies.BudgetCalibrator` of the gate's threshold policy fed with every layer of
    one dense forward over `cal_ids` [1, n] (`ModelEvaluator.budget_calibrators`, the
    calibration `quality.py --budgets gate/threshold` runs); `.policy(target)` gives the
    policy with per-(layer, head) budgets."""
    from sweeps.evaluators import ModelEvaluator

    dev = next(model.parameters()).device
    evaluator = ModelEvaluator(a.model or "e2e", seq_len=n, block_size=a.block_size,
                               gates=a.gates, device=str(dev), backend=a.backend,
                               model_obj=model, sequences=cal_ids, gate_fast=fast)
    return evaluator.budget_calibrators(cal_ids, ["gate/threshold"],
                                        log=lambda *_: None)["gate/threshold"]


def mask_agreement(model, gates, policy, ids, a) -> dict:
    """Tiles where the fast gate path's masks differ from the reference path's, all layers."""
    fast = gate_masks(model, gates, policy, ids, a, fast=True)
    ref = gate_masks(model, gates, policy, ids, a, fast=False)
    cmp = compare_masks(fast, ref)
    return {"tiles_differ": cmp["tiles_differ"], "tiles": cmp["tiles"]}


def perplexity(model, seqs, ctx_factory) -> float | None:
    """Perplexity over the rows of `seqs` under the context, None without them."""
    from adaptive_sparse.evaluate import sequence_nll
    from adaptive_sparse.metrics import Perplexity

    if seqs is None:
        return None
    ppl = Perplexity()
    with ctx_factory():
        for row in seqs:
            ppl.update(*sequence_nll(model, row[None]))
    return float(ppl.compute())


def dense_contexts(cuda: bool):
    """[(name, context factory)] of the dense SDPA baselines: each backend of DENSE_BACKENDS
    on CUDA (cuDNN, flash), the default dispatch on CPU."""
    if not cuda:
        return [("dense", contextlib.nullcontext)]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    return [(name, lambda b=which[name]: sdpa_kernel(b)) for name in DENSE_BACKENDS]


def run_length(model, gates, n, a, cuda, log, data=None) -> list[dict]:
    """data: (calibration ids [1, n], perplexity ids [S, n]) of real text, or None (random)."""
    from adaptive_sparse.gates import GateProvider

    dev = next(model.parameters()).device
    cfg = text_config(model)
    if data is None:
        gen = torch.Generator(device="cpu").manual_seed(n)
        ids = torch.randint(cfg.vocab_size, (1, n), generator=gen).to(dev)
        cal_ids = torch.randint(cfg.vocab_size, (1, n), generator=gen).to(dev)
        ppl_seqs = None
    else:
        cal_ids, ppl_seqs = data[0].to(dev), data[1].to(dev)
        ids = ppl_seqs[:1]
    layers = cfg.num_hidden_layers
    ctx = getattr(cfg, "max_position_embeddings", None)
    base = dict(N=n, block_size=a.block_size, backend=a.backend, layers=layers,
                beyond_trained_context=ctx is not None and n > ctx)
    check = check_hidden(model, ids, a.backend, a.block_size) if n <= a.check_max_len else None
    extra = []  # check, calibration and mask-agreement rows, logged and returned

    def note(row):
        log(row)
        extra.append(row)

    if check is not None:
        note({**base, "kind": "check", **check})
    ok = check is None or check["ok"]

    fast = None if a.gate_fast == "auto" else False
    policies = [(f"gate-{d}", d, Policy(kind="density", density=d)) for d in a.density_list]
    for t in a.threshold_list:
        t0 = time.time()
        cal = calibrate_tau(model, gates, cal_ids, t, a, fast)
        note({**base, "kind": "calibration", "target_density": t, **cal,
              "seconds": time.time() - t0})
        policies.append((f"gate-tau{cal['tau']:.3g}", t, Policy(kind="threshold", tau=cal["tau"])))
    if a.budget_list:
        t0 = time.time()
        cal = threshold_budgets(model, cal_ids, n, a, fast)
        for t in a.budget_list:
            policy, info = cal.policy(t)
            note({**base, "kind": "budget_calibration", "target_density": t, "tau": policy.tau,
                  "density": info["density"], "recall": info["recall"],
                  "seconds": time.time() - t0})
            policies.append((f"gate-tau{policy.tau:.3g}+budgets", t, policy))
    if cuda and fast is None and policies:
        agree = mask_agreement(model, gates, policies[0][2], ids, a)
        note({**base, "kind": "fast_vs_reference_masks", "config": policies[0][0], **agree})

    def measure(name, attn_name, ctx_factory, density=None, clock_provider=None, ppl=True):
        with ctx_factory():
            ms, times = median_ms(lambda: forward(model, ids), a.reps, a.warmup, cuda)
        attn_clock = Clock(cuda)
        if clock_provider is not None:
            clock_provider.clock = Clock(cuda)
        with ctx_factory(), timed_attention(attn_name, attn_clock):
            if cuda:
                torch.cuda.synchronize()
            forward(model, ids)
            attn_ms = attn_clock.total_ms()
        gate_ms = clock_provider.clock.total_ms() if clock_provider is not None else 0.0
        if clock_provider is not None:
            clock_provider.clock = None
        row = {**base, "kind": "prefill", "config": name, "density": density, "ms": ms,
               "times_ms": [round(t, 3) for t in times], "attn_fn_ms": attn_ms,
               "gate_ms": gate_ms, "kernel_ms": attn_ms - gate_ms, "ok": ok,
               "perplexity": perplexity(model, ppl_seqs, ctx_factory) if ppl else None}
        log(row)
        return row

    rows = [measure(f"sdpa-{name}", "sdpa", factory, ppl=i == 0)
            for i, (name, factory) in enumerate(dense_contexts(cuda))]
    sdpa_ppl = rows[0]["perplexity"]
    best = min(rows, key=lambda r: r["ms"])
    sdpa_ms = best["ms"]
    rows.append(measure("ours-dense", "adaptive_sparse", lambda: sparse_attention(
        model, None, block_size=a.block_size, backend=a.backend)))
    if a.fp8:
        rows.append(measure("ours-dense fp8", "adaptive_sparse", lambda: sparse_attention(
            model, None, block_size=a.block_size, backend=a.backend, precision="fp8")))
    for name, target, policy in policies:
        with GateProvider(gates, policy, model, fast=fast) as gate:
            masks = recorded_masks(model, gate, ids, a)
            achieved = mean_density(masks)
            timed = TimedProvider(gate)
            rows.append(measure(name, "adaptive_sparse", lambda: sparse_attention(
                model, timed, block_size=a.block_size, backend=a.backend), achieved, timed))
            rows[-1].update(target_density=target, policy=policy.to_dict())
            if a.fp8:
                rows.append(measure(f"{name} fp8", "adaptive_sparse", lambda: sparse_attention(
                    model, timed, block_size=a.block_size, backend=a.backend,
                    precision="fp8"), achieved, timed))
                rows[-1].update(target_density=target, policy=policy.to_dict())
        replay = ReplayProvider(masks)
        # replayed masks belong to the timed sequence only: no perplexity for them
        rows.append(measure(f"{name} replayed", "adaptive_sparse", lambda: sparse_attention(
            model, replay, block_size=a.block_size, backend=a.backend), achieved, ppl=False))
        rows[-1]["target_density"] = target
        del masks, replay
    for r in rows:
        r["sdpa_ms"] = sdpa_ms
        r["best_dense"] = best["config"]
        r["speedup_vs_sdpa"] = sdpa_ms / r["ms"] if ok else None
        r["gate_share"] = r["gate_ms"] / r["ms"]
        r["ppl_change"] = None if sdpa_ppl is None or r["perplexity"] is None \
            else r["perplexity"] / sdpa_ppl - 1.0
    return extra + rows


def markdown(env, rows, a) -> str:
    L = next((r["layers"] for r in rows), 0)
    real = a.model is not None
    lines = [f"### {env['device']}, torch {env['torch']}, triton {env['triton']}, "
             f"transformers {env['transformers']}, CUDA {env.get('cuda')}", ""]
    if real:
        lines.append(
            f"**{a.model}, real weights** in bf16, token ids from the validation split of corpus "
            f"`{a.corpus}`; perplexity over {a.ppl_docs} sequence(s) of N tokens (the first one is "
            f"also the timed one), ppl change vs SDPA dense.")
    else:
        lines.append(
            "SmolLM2-135M architecture (30 layers, 9 query / 3 KV heads, d=64), **random "
            "weights** in bf16 built from its config (attention time does not depend on weight "
            "values; the density policy fixes the kept blocks per row), random token ids.")
    lines += [
        f"Batch 1, prefill with use_cache=False, last-token logits. Backend `{a.backend}`, block "
        f"{a.block_size}. Gate: trained gate set (`{a.gates}`); `gate-D`: policy `density` D "
        f"(share of each row's causal blocks; sink and diagonal kept); `gate-tauT`: policy "
        f"`threshold` with tau T calibrated to the target density on another sequence; "
        f"`gate-tauT+budgets`: the threshold policy with per-(layer, head) budgets calibrated on "
        f"that sequence (`policies.BudgetCalibrator`). Density = "
        f"mean over the layers the gate serves. 'replayed' = the same masks returned without "
        f"running the gate (timing only). Prefill: median of {a.reps} CUDA-event-timed calls "
        f"after {a.warmup} warmup. Attention fn / gate: one instrumented call, CUDA events "
        f"around each layer's attention function (gate included) and around the gate provider, summed over {L} "
        f"layers. Rows beyond the model's context (max_position_embeddings) are timing only.", ""]
    checks = [r for r in rows if r["kind"] == "check"]
    if checks:
        lines += ["Correctness (final hidden states vs an fp64 SDPA oracle with the same weights, "
                  "relative Frobenius error):", "",
                  "| N | SDPA bf16 err | ours (dense mask) err | max abs ours - SDPA | "
                  "max abs hidden | ok |", "|---|---|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['N']} | {c['err_sdpa']:.2e} | {c['err_ours']:.2e} | "
                         f"{c['max_abs_ours_vs_sdpa']:.2e} | {c['hidden_abs_max']:.2e} | "
                         f"{'yes' if c['ok'] else 'NO'} |")
        lines.append("")
    for r in rows:
        if r["kind"] == "fast_vs_reference_masks":
            lines.append(f"Fast vs reference gate path, N={r['N']}, {r['config']}: "
                         f"{r['tiles_differ']} of {r['tiles']} tiles differ.")
        if r["kind"] == "calibration":
            lines.append(f"Calibration, N={r['N']}: target density {r['target_density']} -> tau "
                         f"{r['tau']:.4g} (density {r['density']:.3f} on the calibration "
                         f"sequence).")
        if r["kind"] == "budget_calibration":
            lines.append(f"Budgets, N={r['N']}: target density {r['target_density']} -> tau "
                         f"{r['tau']:.4g} with per-(layer, head) budgets (density "
                         f"{r['density']:.3f}, recall {r['recall']:.3f} on the calibration "
                         f"sequence).")
    lines += ["", "Speedup: the fastest dense SDPA row of the same length ('best dense') / the "
              "row.", "", "| N | config | density | prefill ms | speedup vs best dense | "
              "best dense | perplexity | "
              "ppl change | attention fn ms (sum) | per layer ms | gate ms (sum) | "
              "attention fn - gate ms | gate % of prefill |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "prefill":
            continue
        n = f"{r['N']}{' (beyond ctx)' if r['beyond_trained_context'] else ''}"
        dens = "1.0" if r["density"] is None else f"{r['density']:.3f}"
        pc = None if r["ppl_change"] is None else 100 * r["ppl_change"]
        lines.append(f"| {n} | {r['config']} | {dens} | {r['ms']:.2f} | "
                     f"{fmt(r['speedup_vs_sdpa'], '.2f')} | {r['best_dense']} | "
                     f"{fmt(r['perplexity'], '.3f')} | "
                     f"{fmt(pc, '+.2f')}{'' if pc is None else '%'} | {r['attn_fn_ms']:.2f} | "
                     f"{r['attn_fn_ms'] / L:.3f} | {r['gate_ms']:.2f} | "
                     f"{r['attn_fn_ms'] - r['gate_ms']:.2f} | {100 * r['gate_share']:.1f} |")
    lines.append("")
    for r in rows:  # Amdahl: what attention's share of each dense SDPA prefill allows
        if r["kind"] == "prefill" and r["config"].startswith("sdpa-") and r["ms"] > 0:
            if r["attn_fn_ms"] >= r["ms"]:
                lines.append(f"N={r['N']}: {r['config']}'s instrumented attention time "
                             f"({r['attn_fn_ms']:.2f} ms) exceeds its median prefill "
                             f"({r['ms']:.2f} ms): no share from this row.")
                continue
            share = r["attn_fn_ms"] / r["ms"]
            lines.append(
                f"N={r['N']}: attention is {100 * share:.1f}% of the {r['config']} prefill "
                f"({r['attn_fn_ms']:.2f} of {r['ms']:.2f} ms); the prefill speedup is bounded by "
                f"{1 / (1 - share):.2f}x (attention free), {1 / (1 - share + share / 6):.2f}x "
                f"with attention 6x faster, {1 / (1 - share + share / 10):.2f}x with 10x.")
    return "\n".join(lines) + "\n"


def load_real(name: str, dev, corpus: str, seqlens, ppl_docs: int):
    """(model bf16 on dev with SDPA attention, {n: (calibration ids [1, n], ppl ids [S, n])})
    from the validation split of `corpus` (the split the quality benchmarks evaluate on)."""
    from adaptive_sparse.data import load_corpus, pack, split_documents
    from adaptive_sparse.models import load_model

    model, tok = load_model(name, dtype=torch.bfloat16)
    model = model.to(dev)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")
    else:
        model.config._attn_implementation = "sdpa"
    docs = split_documents(load_corpus(corpus), seed=0, fractions=(0.8, 0.1, 0.1))["validation"]
    data = {}
    for n in seqlens:
        seqs = pack(tok, docs, n, ppl_docs + 1)
        if seqs.shape[0] < ppl_docs + 1:
            raise ValueError(f"--ppl-docs: corpus {corpus!r} packs {seqs.shape[0]} validation "
                             f"sequences of {n} tokens, need {ppl_docs + 1} (one to calibrate)")
        data[n] = (seqs[-1:], seqs[:ppl_docs])
    return model, data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gates", default=None, help="gate directory (a gate artifact: manifest.json "
                    "+ gates.safetensors); required unless --render")
    ap.add_argument("--model", default=None,
                    help="real weights of this load_model preset (default: SmolLM2-135M's "
                         "config with random weights)")
    ap.add_argument("--corpus", default="default", help="text for --model (validation split)")
    ap.add_argument("--ppl-docs", type=int, default=1, help="perplexity sequences (--model)")
    ap.add_argument("--seqlens", default="8192,16384,32768")
    ap.add_argument("--densities", default="0.1,0.25,0.5", help="density-policy targets")
    ap.add_argument("--thresholds", default="",
                    help="target densities for the threshold policy (tau calibrated)")
    ap.add_argument("--budgets", default="",
                    help="target densities for the threshold policy with per-(layer, head) "
                         "budgets calibrated on the calibration sequence")
    ap.add_argument("--gate-fast", default="auto", choices=("auto", "off"),
                    help="GateProvider fast path: auto (on CUDA) or off (reference path)")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--fp8", action="store_true",
                    help="also time ours-dense and every gate config with precision='fp8' (8-bit "
                    "Q.K^T and P.V: forward_fp8's defaults), with their perplexity")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--check-max-len", type=int, default=8192,
                    help="fp64 hidden-state check at lengths up to this")
    ap.add_argument("--check-config", action="store_true",
                    help="first compare SMOLLM2_135M with the installed GGUF model's config")
    ap.add_argument("--json", default="e2e.json")
    ap.add_argument("--md", default="e2e.md")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="only write --md again from a finished run's --json (no measuring)")
    a = ap.parse_args(argv)
    if a.render:
        from pathlib import Path

        data = json.loads(Path(a.render).read_text())
        md = markdown(data["env"], data["rows"], argparse.Namespace(**data["args"]))
        atomic_write_text(a.md, md)
        print(md, flush=True)
        return 0
    if not a.gates:
        ap.error("--gates: expected a gate directory")
    try:
        a.density_list, a.threshold_list = floats(a.densities), floats(a.thresholds)
        a.budget_list = floats(a.budgets)
        seqlens = [int(x) for x in a.seqlens.split(",") if x]
    except ValueError as e:
        ap.error(f"--densities/--thresholds/--budgets/--seqlens: expected comma-separated "
                 f"numbers ({e})")
    bad = [d for d in a.density_list + a.threshold_list + a.budget_list if not 0 < d <= 1]
    if bad:
        ap.error(f"--densities/--thresholds/--budgets: expected densities in (0, 1], got {bad}")
    if a.ppl_docs < 1:
        ap.error(f"--ppl-docs: expected at least 1, got {a.ppl_docs}")
    if a.check_config:
        diff = check_config()
        if diff:
            print("config differs: " + "; ".join(diff), file=sys.stderr)
            return 1
        print("config matches the installed SmolLM2-135M", flush=True)
    import transformers

    from adaptive_sparse.gates import load_gates

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    env = {**environment(), "transformers": transformers.__version__, "dtype": "bfloat16",
           "model": f"{a.model}, real weights" if a.model else
           "SmolLM2-135M config, random weights"}
    print(json.dumps(env), flush=True)
    if a.model:
        model, data = load_real(a.model, dev, a.corpus, seqlens, a.ppl_docs)
    else:
        model, data = build_model(dev, torch.bfloat16), {}
    gates = load_gates(a.gates, model, map_location=dev)
    rows, logged = [], []

    def log(r):
        logged.append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                          for k, v in r.items() if k != "times_ms"}), flush=True)
        atomic_write_text(a.json, json.dumps({"env": env, "partial": logged}, indent=1))

    for n in seqlens:
        t0 = time.time()
        try:
            rows += run_length(model, gates, n, a, cuda, log, data.get(n))
        except torch.OutOfMemoryError as e:
            print(f"OOM N={n}: {e}", file=sys.stderr, flush=True)
        if cuda:
            torch.cuda.empty_cache()
        print(f"# N={n}: {time.time() - t0:.1f} s", flush=True)
    args = {k: v for k, v in vars(a).items()
            if k not in ("density_list", "threshold_list", "budget_list")}
    atomic_write_text(a.json, json.dumps({"env": env, "args": args, "rows": rows}, indent=1))
    md = markdown(env, rows, a)
    atomic_write_text(a.md, md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
