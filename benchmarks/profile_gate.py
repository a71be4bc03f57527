"""Per-layer cost of the learned-gate `GateProvider`: reference path vs fast path vs fast path
replayed from CUDA graphs, next to one layer's dense SDPA attention (fastest of cuDNN and flash)
at the same shape.

`--shape smollm2-135m` builds the model exactly as `benchmarks/e2e.py` does (config, seeded
random weights, bf16) and loads a trained gate set; `--shape llama3-8b` builds a `--layers`-layer
Llama with Llama-3-8B's attention (32 query / 8 KV heads, d=128, hidden 4096) and random
weights, with `--gates random` (a seeded random gate set at `--block-size`: the gate's cost does
not depend on its weight values under the density policy); `--shape qwen2.5-coder-0.5b` a
`--layers`-layer (default 24) Qwen2 with Qwen2.5-Coder-0.5B's shapes (14 query / 2 KV heads,
d=64, hidden 896, rope theta 1e6) and random weights, with trained gates of that model (only
the shapes are checked) or `--gates random`. Either runs one prefill so the
provider's hooks capture every layer's pre-rotary q/k, then times three providers on those
captured tensors:

- `eager`: the reference path (`Gate.forward` + `Policy.to_mask`), `GateProvider(fast=False)`;
- `fast`: cached per-length tables, `Gate.fast_scores`, one-launch `scores_to_kv_indices`,
  `GateProvider(cuda_graphs=False)`;
- `graphed`: q/k pooled eagerly into small static buffers, the rest of the scoring replayed
  from one CUDA graph per layer (captured on a layer's second call), the selection eager,
  `GateProvider(cuda_graphs=True)`.

Two timings per path, medians over `--reps`: `call_ms`, one provider call of layer `--layer`
with a synchronize before and after (wall clock); `layer_ms`, all layers called back to back
with one synchronize at the end, divided by the number of layers (what a forward pays per
layer). Speedups are eager / path. Before timing, every layer's mask from `fast` and `graphed`
(third call: a replay) is compared with `eager` (tiles that differ, rows that differ);
`graphed` must equal `fast` exactly, else no speedup is reported for it. `--profile` adds the
kernel-launch count of one call per path (torch.profiler; on CPU the count of non-view aten
ops, `aten_ops`, a proxy). `stages` (fast path, layer `--layer`, median over `--reps`, CUDA
events): `pool` (q and k, two launches), `scores` (projections, rotary, block dots),
`select` (one launch), and `copy_qk`, what copying q and k into static graph inputs would
cost (the session-6 graphed path paid it every call). `--sync-check` (CUDA): after two warm-up
forwards through `sparse_attention` with the `fast` and `graphed` providers, one more forward
runs every attention function call (gate, mask and kernel launch) under
`torch.cuda.set_sync_debug_mode("error")`; `host_sync` is "none" or the error raised, and
`hint_syncs` the provider's first-call waits for its autotune hint. `sdpa_layer_ms`: median
time (`benchmarks.common.bench`) of dense causal SDPA (the faster of the cuDNN and flash
backends, named in `sdpa_backend`; GQA) on random bf16
q/k/v of one layer's shape; `share` = layer_ms / sdpa_layer_ms. Prints a table; `--json PATH`
writes the rows.

    PYTHONPATH=. python3 benchmarks/profile_gate.py --gates .e2e/gates --json gate.json
    PYTHONPATH=. python3 benchmarks/profile_gate.py --shape llama3-8b --gates random \
        --block-size 128 --seqlens 32768,131072 --json gate_llama.json
    PYTHONPATH=. python3 benchmarks/profile_gate.py --shape qwen2.5-coder-0.5b --gates G \
        --seqlens 32768 --tau 0.00374 --sync-check --profile --json gate_qwen.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from adaptive_sparse.io import atomic_write_text
from adaptive_sparse.masks import compare_masks
from adaptive_sparse.policies import Policy
from benchmarks.common import best_dense, dense_baselines
from benchmarks.e2e import build_model, forward, sync_debug_error, wrapped_attention

PATHS = ("eager", "fast", "graphed")
# Llama-3-8B's attention shapes (the kernel benchmark's llama3-8b shape); MLP as in the model
LLAMA3_8B = dict(vocab_size=1024, hidden_size=4096, intermediate_size=14336,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False)
# Qwen2.5-Coder-0.5B's shapes (Qwen2Config fields of the preset); a small vocabulary
QWEN25_05B = dict(vocab_size=1024, hidden_size=896, intermediate_size=4864,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
VIEW_OPS = {"aten::view", "aten::reshape", "aten::transpose", "aten::permute", "aten::empty",
            "aten::as_strided", "aten::t", "aten::expand", "aten::select", "aten::slice",
            "aten::detach", "aten::alias", "aten::unsqueeze", "aten::squeeze",
            "aten::_unsafe_view", "aten::empty_strided", "aten::lift_fresh", "aten::contiguous",
            "aten::to", "aten::_to_copy", "aten::resolve_conj", "aten::resolve_neg"}


def build_llama_shape(dev, layers: int, seed: int = 0):
    """A `layers`-layer LlamaForCausalLM with Llama-3-8B attention shapes, random bf16 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B, num_hidden_layers=layers,
                                         attn_implementation="sdpa"))
    return model.eval().requires_grad_(False).to(device=dev, dtype=torch.bfloat16)


def build_qwen_shape(dev, layers: int, seed: int = 0):
    """A `layers`-layer Qwen2ForCausalLM with Qwen2.5-Coder-0.5B's shapes, random bf16 weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B, num_hidden_layers=layers,
                                         attn_implementation="sdpa"))
    return model.eval().requires_grad_(False).to(device=dev, dtype=torch.bfloat16)


def sdpa_layer_ms(hq: int, hkv: int, n: int, d: int, dev) -> tuple[str, float] | None:
    """(backend, median ms) of one layer's dense causal SDPA forward, the faster of cuDNN and
    flash (CUDA only)."""
    if dev.type != "cuda":
        return None
    q = torch.randn(1, hq, n, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    return best_dense(dense_baselines(q, k, v, 1 / d ** 0.5))


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _wall_ms(fn, cuda: bool) -> float:
    _sync(cuda)
    t0 = time.perf_counter()
    fn()
    _sync(cuda)
    return (time.perf_counter() - t0) * 1e3


def _launches(fn, cuda: bool) -> dict:
    """Kernel launches (and graph launches, device-to-host copies) of one call of fn, from
    torch.profiler; `aten_ops`: top-level non-view aten ops (on CPU, a proxy for launches)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(cuda)
    with profile(activities=acts) as prof:
        fn()
        _sync(cuda)
    counts = {"kernel_launches": 0, "graph_launches": 0, "memcpy": 0, "aten_ops": 0}
    for e in prof.key_averages():
        if "LaunchKernel" in e.key:
            counts["kernel_launches"] += e.count
        elif "GraphLaunch" in e.key:
            counts["graph_launches"] += e.count
        elif "Memcpy" in e.key and e.key.startswith("cuda"):
            counts["memcpy"] += e.count
    for e in prof.events():
        if e.cpu_parent is None and e.name.startswith("aten::") and e.name not in VIEW_OPS:
            counts["aten_ops"] += 1
    return counts


def _event_ms(fn, cuda: bool, reps: int) -> float:
    """Median ms of fn: CUDA events on CUDA (GPU time), wall clock on CPU."""
    times = []
    for _ in range(reps):
        _sync(cuda)
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def stage_ms(provider, layer: int, n: int, reps: int, cuda: bool) -> dict:
    """Median ms of the fast path's stages for one layer on its captured q/k: pool, scores,
    select, and copy_qk (copying q and k into static graph inputs)."""
    from adaptive_sparse.attention.triton.gate import scores_to_kv_indices
    from adaptive_sparse.gates.network import gate_tables

    gate, c = provider.gate_set[layer], provider.gate_set.config
    q_pre, k_pre = provider.capture.q[layer], provider.capture.k[layer]
    tables = gate_tables(c, n, n, device=q_pre.device)
    qcat, kcat = gate.pool(q_pre, k_pre)
    scores = gate.scores_from_pooled(qcat, kcat, tables, causal_fill=False)
    args = provider.selection_args(layer, n, n, scores.shape[1], scores.device)
    sq, sk = torch.empty_like(q_pre), torch.empty_like(k_pre)
    stages = {"pool": lambda: gate.pool(q_pre, k_pre),
              "scores": lambda: gate.scores_from_pooled(qcat, kcat, tables, causal_fill=False),
              "select": lambda: scores_to_kv_indices(scores, **args),
              "copy_qk": lambda: (sq.copy_(q_pre), sk.copy_(k_pre))}
    for fn in stages.values():
        fn()
    return {name: round(_event_ms(fn, cuda, reps), 4) for name, fn in stages.items()}


def sync_check(model, provider, ids, block_size: int) -> str:
    """"none" when a forward through `sparse_attention` with `provider` (after two warm-up
    forwards) makes no host-device sync inside any attention function call, else the error
    `torch.cuda.set_sync_debug_mode("error")` raised (first line)."""
    from adaptive_sparse.models import sparse_attention
    from adaptive_sparse.models.attention import ATTN_NAME

    with sparse_attention(model, provider, block_size=block_size, backend="triton"):
        for _ in range(2):
            forward(model, ids)
        torch.cuda.synchronize()
        try:
            with wrapped_attention(ATTN_NAME, sync_debug_error):
                forward(model, ids)
        except RuntimeError as exc:
            return str(exc).splitlines()[0][:300]
        torch.cuda.synchronize()
    return "none"


def run_length(model, gates, policy, n, a, cuda, dev) -> list[dict]:
    from adaptive_sparse.gates import GateProvider

    nl = gates.config.num_layers
    gen = torch.Generator(device="cpu").manual_seed(n)
    ids = torch.randint(model.config.vocab_size, (1, n), generator=gen).to(dev)
    hq, hkv, d = gates.config.num_heads, gates.config.num_kv_heads, gates.config.head_dim
    q = torch.empty(1, hq, n, d, device=dev, dtype=torch.bfloat16)  # [B, Hq, N, D]: shape only
    k = torch.empty(1, hkv, n, d, device=dev, dtype=torch.bfloat16)  # [B, Hkv, N, D]
    fast = cuda or os.environ.get("TRITON_INTERPRET") == "1"  # CPU: the Triton interpreter
    providers = {"eager": GateProvider(gates, policy, fast=False),
                 "fast": GateProvider(gates, policy, fast=fast, cuda_graphs=False),
                 "graphed": GateProvider(gates, policy, fast=fast, cuda_graphs=True)}
    rows = []
    with providers["eager"].attach(model), torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=1)  # fills the capture hooks
        for p in providers.values():
            p.capture = providers["eager"].capture
        for _ in range(3):  # graphed: eager, then capture + replay, then replay
            masks = {name: {L: p(L, q, k) for L in range(nl)} for name, p in providers.items()}
        checks = {"fast": compare_masks(masks["fast"], masks["eager"]),
                  "graphed": compare_masks(masks["graphed"], masks["eager"])}
        graphed_ok = compare_masks(masks["graphed"], masks["fast"])["exact"]
        del masks
        timings = {}
        for name, p in providers.items():
            call = lambda p=p: p(a.layer, q, k)  # noqa: E731
            every = lambda p=p: [p(L, q, k) for L in range(nl)]  # noqa: E731
            for _ in range(a.warmup):
                every()
            call_ms = statistics.median(_wall_ms(call, cuda) for _ in range(a.reps))
            layer_ms = statistics.median(_wall_ms(every, cuda) / nl for _ in range(a.reps))
            timings[name] = (call_ms, layer_ms, _launches(call, cuda) if a.profile else None)
        stages = stage_ms(providers["fast"], a.layer, n, a.reps, cuda)
        syncs = {}
        if a.sync_check and cuda:
            for name in ("fast", "graphed"):
                before = providers[name].hint_syncs
                syncs[name] = (sync_check(model, providers[name], ids, gates.config.block_size),
                               providers[name].hint_syncs - before)
    dense = sdpa_layer_ms(hq, hkv, n, d, dev)
    sdpa_ms = None if dense is None else dense[1]
    base_call, base_layer = timings["eager"][:2]
    for name in PATHS:
        call_ms, layer_ms, launches = timings[name]
        ok = name != "graphed" or graphed_ok
        row = dict(N=n, path=name, policy=policy.to_dict(), layer=a.layer, num_layers=nl,
                   call_ms=round(call_ms, 4), layer_ms=round(layer_ms, 4),
                   speedup_call=round(base_call / call_ms, 2) if ok else None,
                   speedup_layer=round(base_layer / layer_ms, 2) if ok else None,
                   equal_to_fast=graphed_ok if name == "graphed" else None,
                   vs_eager=checks.get(name), shape=a.shape, heads=[hq, hkv], head_dim=d,
                   block_size=gates.config.block_size,
                   sdpa_layer_ms=None if sdpa_ms is None else round(sdpa_ms, 4),
                   sdpa_backend=None if dense is None else dense[0],
                   share=None if sdpa_ms is None else round(layer_ms / sdpa_ms, 4))
        if launches is not None:
            row.update(launches)
        if name == "fast":
            row["stages"] = stages
        if name in syncs:
            row["host_sync"], row["hint_syncs"] = syncs[name]
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gates", required=True,
                    help="gate directory (a gate artifact: manifest.json + gates.safetensors), "
                    "or 'random'")
    ap.add_argument("--shape", default="smollm2-135m",
                    choices=("smollm2-135m", "llama3-8b", "qwen2.5-coder-0.5b"))
    ap.add_argument("--layers", type=int, default=None,
                    help="layers of the llama3-8b (default 2) or qwen2.5-coder-0.5b (24) shape")
    ap.add_argument("--block-size", type=int, default=64, help="block of --gates random")
    ap.add_argument("--seqlens", default="8192,32768")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--policy", default=None,
                    help="policy as JSON (overrides --density), e.g. '{\"kind\": \"top_k\", "
                         "\"k\": 8}'")
    ap.add_argument("--tau", type=float, default=None,
                    help="the threshold policy with this tau (overrides --density)")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="count kernel launches per call")
    ap.add_argument("--sync-check", action="store_true",
                    help="CUDA: check that a forward's attention calls (gate, mask, kernel "
                         "launch) make no host-device sync, for the fast and graphed paths")
    ap.add_argument("--json", default=None, help="write the rows (and environment) here")
    a = ap.parse_args(argv)
    from adaptive_sparse.gates import load_gates

    import triton

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    env = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda if cuda else None)
    if a.policy and a.tau is not None:
        ap.error("--policy, --tau: expected at most one of them")
    policy = Policy.from_dict(json.loads(a.policy)) if a.policy else \
        Policy(kind="threshold", tau=a.tau) if a.tau is not None else \
        Policy(kind="density", density=a.density)
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}; {a.shape} "
          f"shapes, bf16, batch 1; policy {policy.to_dict()}", flush=True)
    if a.layer < 0:
        ap.error(f"--layer: expected a layer index >= 0, got {a.layer}")
    if a.layers is not None and a.layers < 1:
        ap.error(f"--layers: expected a positive int, got {a.layers}")
    if a.shape in ("llama3-8b", "qwen2.5-coder-0.5b"):
        layers = a.layers or (2 if a.shape == "llama3-8b" else 24)
        model = (build_llama_shape if a.shape == "llama3-8b" else build_qwen_shape)(dev, layers)
        a.layer = min(a.layer, layers - 1)
    else:
        model = build_model(dev, torch.bfloat16)
    if a.gates == "random":
        from adaptive_sparse.gates import GateConfig, GateSet

        torch.manual_seed(0)
        gates = GateSet(GateConfig.from_model(model, block_size=a.block_size, init="random"))
        gates = gates.to(dev).eval()
    else:
        gates = load_gates(a.gates, model, map_location=dev)
    if a.layer >= gates.config.num_layers:
        ap.error(f"--layer: expected < {gates.config.num_layers} (the gates' layers), got {a.layer}")
    rows = []
    for n in (int(x) for x in a.seqlens.split(",")):
        rows += run_length(model, gates, policy, n, a, cuda, dev)
    print(f"\n| N | path | call ms (sync around) | per-layer ms (all {gates.config.num_layers} "
          "layers back to back) | speedup call | speedup per layer | masks vs eager "
          "(tiles / rows differing) | launches | dense SDPA ms per layer (backend) | share | "
          "host sync in a forward |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        v = r["vs_eager"]
        cmp = "-" if v is None else ("exact" if v["exact"] else
                                     f"{v['tiles_differ']} / {v['rows_differ']}")
        launches = r.get("kernel_launches", "-")
        if launches == 0 and r.get("aten_ops"):  # CPU: no kernels, the aten op count
            launches = f"{r['aten_ops']} aten ops"
        if r.get("graph_launches"):
            launches = f"{launches} + {r['graph_launches']} graph"
        print(f"| {r['N']} | {r['path']} | {r['call_ms']:.3f} | {r['layer_ms']:.3f} | "
              f"{r['speedup_call'] or '-'} | {r['speedup_layer'] or '-'} | {cmp} | {launches} | "
              f"{r['sdpa_layer_ms'] or '-'} ({r['sdpa_backend'] or '-'}) | "
              f"{'-' if r['share'] is None else format(100 * r['share'], '.1f') + '%'} | "
              f"{r.get('host_sync', '-')} |")
    for r in rows:
        if "stages" in r:
            print(f"N={r['N']}, layer {r['layer']}, fast path stages (ms): " + ", ".join(
                f"{k} {v:.4f}" for k, v in r["stages"].items()))
    if a.json:
        atomic_write_text(a.json, json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
