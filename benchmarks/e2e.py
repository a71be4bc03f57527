"""End-to-end prefill of SmolLM2-135M: SDPA dense vs our attention (dense mask, trained gate).

The model is built from SmolLM2-135M's config with random weights in bf16 (the GGUF cannot
travel to the GPU machine); attention time does not depend on weight values, and the gate's
density policy fixes how many blocks each row keeps, so the timings hold for the real weights.
Perplexity is not measured here (it needs the real weights: see the CPU runs).

Per sequence length, in one process on identical token ids:
- correctness: logits of bf16 SDPA and of our backend with the dense mask against an fp64 SDPA
  oracle (same weights); our error may not exceed twice SDPA's (no speedup reported otherwise);
- full-model prefill (use_cache=False, logits of the last token only), median ms over `--reps`
  CUDA-event-timed calls after warmup, for SDPA dense, ours with the dense mask, the trained gate
  at each density (gate network and mask building included), and the same masks replayed
  without the gate;
- one instrumented call per config: time inside the attention function summed over layers,
  and inside the gate provider (CUDA events around each call).

    python3 benchmarks/e2e.py --gates .e2e/gates --json out.json --md out.md [--seqlens 8192]
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

from adaptive_sparse.models import sparse_attention
from adaptive_sparse.policies import Policy
from benchmarks.attention import _write, environment

# LlamaConfig fields of SmolLM2-135M(-Instruct), as `load_model("smollm2-135m").config` reports
# them; `--check-config` compares them with the loaded GGUF model where it is installed.
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu",
    max_position_embeddings=8192, rms_norm_eps=9.999999747378752e-06,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, attention_bias=False,
    mlp_bias=False, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TRAINED_CONTEXT = SMOLLM2_135M["max_position_embeddings"]


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
    """Wraps a mask provider: times each call on `clock`, optionally keeps the masks."""

    def __init__(self, inner, clock: Clock | None = None, keep: bool = False):
        self.inner, self.clock, self.keep = inner, clock, keep
        self.masks: dict[int, object] = {}

    def __call__(self, layer_idx, q, k):
        t = self.clock.start() if self.clock else None
        mask = self.inner(layer_idx, q, k)
        if self.clock:
            self.clock.stop(t)
        if self.keep:
            self.masks[layer_idx] = mask
        return mask


class ReplayProvider:
    """Returns the masks recorded by an earlier call (the gate's masks without the gate)."""

    def __init__(self, masks: dict):
        self.masks = masks

    def __call__(self, layer_idx, q, k):
        return self.masks[layer_idx]


@contextlib.contextmanager
def timed_attention(name: str, clock: Clock):
    """Time every call of the attention function registered as `name` (local override of
    transformers' ALL_ATTENTION_FUNCTIONS, removed on exit)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner = ALL_ATTENTION_FUNCTIONS[name]

    def wrapper(*args, **kwargs):
        t = clock.start()
        out = inner(*args, **kwargs)
        clock.stop(t)
        return out

    ALL_ATTENTION_FUNCTIONS[name] = wrapper
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS[name]


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


def check_logits(model, ids, backend: str, block_size: int) -> dict:
    """Full logits of bf16 SDPA and of ours (dense mask) against an fp64 SDPA oracle."""
    oracle_model = copy.deepcopy(model).to(torch.float64)
    ref = forward(oracle_model, ids, keep_logits=0).double()
    del oracle_model
    sdpa = forward(model, ids, keep_logits=0).double()
    with sparse_attention(model, None, block_size=block_size, backend=backend):
        ours = forward(model, ids, keep_logits=0).double()
    norm = ref.norm()
    out = dict(err_sdpa=float((sdpa - ref).norm() / norm),
               err_ours=float((ours - ref).norm() / norm),
               max_abs_ours_vs_sdpa=float((ours - sdpa).abs().max()),
               max_abs_sdpa_vs_oracle=float((sdpa - ref).abs().max()),
               max_abs_ours_vs_oracle=float((ours - ref).abs().max()),
               logits_abs_max=float(ref.abs().max()))
    out["ok"] = bool(torch.isfinite(ours).all()) and out["err_ours"] <= 2 * out["err_sdpa"] + 1e-6
    return out


def run_length(model, gates, n, densities, a, cuda, log) -> list[dict]:
    from gating import GateProvider

    dev = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(n)
    ids = torch.randint(SMOLLM2_135M["vocab_size"], (1, n), generator=gen).to(dev)
    layers = SMOLLM2_135M["num_hidden_layers"]
    base = dict(N=n, block_size=a.block_size, backend=a.backend, layers=layers,
                beyond_trained_context=n > TRAINED_CONTEXT)
    check = check_logits(model, ids, a.backend, a.block_size) if n <= a.check_max_len else None
    if check is not None:
        log({**base, "kind": "check", **check})
    ok = check is None or check["ok"]

    def measure(name, attn_name, ctx_factory, density=None, clock_provider=None):
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
        row = {**base, "kind": "prefill", "config": name, "density": density, "ms": ms,
               "times_ms": [round(t, 3) for t in times], "attn_fn_ms": attn_ms,
               "gate_ms": gate_ms, "kernel_ms": attn_ms - gate_ms, "ok": ok}
        log(row)
        return row

    rows = [measure("sdpa-dense", "sdpa", contextlib.nullcontext)]
    sdpa_ms = rows[0]["ms"]
    rows.append(measure("ours-dense", "adaptive_sparse", lambda: sparse_attention(
        model, None, block_size=a.block_size, backend=a.backend)))
    for d in densities:
        policy = Policy(kind="density", density=d)
        with GateProvider(gates, policy, model) as gate:
            recorder = TimedProvider(gate, keep=True)
            with sparse_attention(model, recorder, block_size=a.block_size, backend=a.backend):
                forward(model, ids)
            masks = recorder.masks
            achieved = statistics.mean(m.density() for m in masks.values())
            timed = TimedProvider(gate)
            rows.append(measure(f"gate-{d}", "adaptive_sparse", lambda: sparse_attention(
                model, timed, block_size=a.block_size, backend=a.backend), achieved, timed))
            rows[-1]["target_density"] = d
        replay = ReplayProvider(masks)
        rows.append(measure(f"masks-{d}-replayed", "adaptive_sparse", lambda: sparse_attention(
            model, replay, block_size=a.block_size, backend=a.backend), achieved))
        rows[-1]["target_density"] = d
        del masks, replay
    for r in rows:
        r["sdpa_ms"] = sdpa_ms
        r["speedup_vs_sdpa"] = sdpa_ms / r["ms"] if ok else None
        r["gate_share"] = r["gate_ms"] / r["ms"]
    return ([{**base, "kind": "check", **check}] if check else []) + rows


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(env, rows, a) -> str:
    L = SMOLLM2_135M["num_hidden_layers"]
    lines = [f"### {env['device']}, torch {env['torch']}, triton {env['triton']}, "
             f"transformers {env['transformers']}, CUDA {env.get('cuda')}", "",
             f"SmolLM2-135M architecture (30 layers, 9 query / 3 KV heads, d=64), **random "
             f"weights** in bf16 built from its config (attention time does not depend on weight "
             f"values; the density policy fixes the kept blocks per row). Batch 1, prefill with "
             f"use_cache=False, last-token logits. Backend `{a.backend}`, block {a.block_size}. "
             f"Gate: trained SmolLM2 gate set (`{a.gates}`), policy `density` (share of each "
             f"row's causal blocks; sink and diagonal kept), achieved density = mean over layers. "
             f"'replayed' = the same masks returned without running the gate. Prefill: median of "
             f"{a.reps} CUDA-event-timed calls after {a.warmup} warmup. Attention fn / gate: one "
             f"instrumented call, CUDA events around each layer's attention function (gate "
             f"included) and around the gate provider, summed over {L} layers; kernel = attention "
             f"fn - gate. Rows beyond {TRAINED_CONTEXT} tokens exceed the trained context (rope "
             f"as-is): timing only.", ""]
    checks = [r for r in rows if r["kind"] == "check"]
    if checks:
        lines += ["Correctness (full logits vs an fp64 SDPA oracle with the same weights, "
                  "relative Frobenius error):", "",
                  "| N | SDPA bf16 err | ours (dense mask) err | max abs ours - SDPA | "
                  "max abs logit | ok |", "|---|---|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['N']} | {c['err_sdpa']:.2e} | {c['err_ours']:.2e} | "
                         f"{c['max_abs_ours_vs_sdpa']:.2e} | {c['logits_abs_max']:.2e} | "
                         f"{'yes' if c['ok'] else 'NO'} |")
        lines.append("")
    lines += ["| N | config | density | prefill ms | speedup vs SDPA | attention fn ms (sum) | "
              "per layer ms | gate ms (sum) | gate % of prefill |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "prefill":
            continue
        n = f"{r['N']}{' (beyond ctx)' if r['beyond_trained_context'] else ''}"
        dens = "1.0" if r["density"] is None else f"{r['density']:.3f}"
        lines.append(f"| {n} | {r['config']} | {dens} | {r['ms']:.2f} | "
                     f"{_fmt(r['speedup_vs_sdpa'], '.2f')} | {r['attn_fn_ms']:.2f} | "
                     f"{r['attn_fn_ms'] / L:.3f} | {r['gate_ms']:.2f} | "
                     f"{100 * r['gate_share']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gates", required=True, help="gate directory (gates.json + safetensors)")
    ap.add_argument("--seqlens", default="8192,16384,32768")
    ap.add_argument("--densities", default="0.1,0.25,0.5")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--check-max-len", type=int, default=8192,
                    help="fp64 logits check at lengths up to this")
    ap.add_argument("--check-config", action="store_true",
                    help="first compare SMOLLM2_135M with the installed GGUF model's config")
    ap.add_argument("--json", default="e2e.json")
    ap.add_argument("--md", default="e2e.md")
    a = ap.parse_args(argv)
    if a.check_config:
        diff = check_config()
        if diff:
            print("config differs: " + "; ".join(diff), file=sys.stderr)
            return 1
        print("config matches the installed SmolLM2-135M", flush=True)
    import transformers

    from gating import load_gates

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    env = {**environment(), "transformers": transformers.__version__,
           "model": "SmolLM2-135M config, random weights", "dtype": "bfloat16"}
    print(json.dumps(env), flush=True)
    model = build_model(dev, torch.bfloat16)
    gates = load_gates(a.gates, model, map_location=dev)
    rows, logged = [], []

    def log(r):
        logged.append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                          for k, v in r.items() if k != "times_ms"}), flush=True)
        _write(a.json, json.dumps({"env": env, "partial": logged}, indent=1))

    densities = [float(x) for x in a.densities.split(",") if x]
    for n in [int(x) for x in a.seqlens.split(",") if x]:
        t0 = time.time()
        try:
            rows += run_length(model, gates, n, densities, a, cuda, log)
        except torch.OutOfMemoryError as e:
            print(f"OOM N={n}: {e}", file=sys.stderr, flush=True)
        if cuda:
            torch.cuda.empty_cache()
        print(f"# N={n}: {time.time() - t0:.1f} s", flush=True)
    _write(a.json, json.dumps({"env": env, "args": vars(a), "rows": rows}, indent=1))
    md = markdown(env, rows, a)
    _write(a.md, md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
