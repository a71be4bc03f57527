"""Per-layer cost of the learned-gate `GateProvider`: reference path vs fast path vs fast path
replayed from CUDA graphs, next to one layer's dense SDPA attention (fastest of cuDNN and flash)
at the same shape.

`--shape smollm2-135m` builds the model exactly as `benchmarks/e2e.py` does (config, seeded
random weights, bf16) and loads a trained gate set; `--shape llama3-8b` builds a `--layers`-layer
Llama with Llama-3-8B's attention (32 query / 8 KV heads, d=128, hidden 4096) and random
weights, with `--gates random` (a seeded random gate set at `--block-size`: the gate's cost does
not depend on its weight values under the density policy). Either runs one prefill so the
provider's hooks capture every layer's pre-rotary q/k, then times three providers on those
captured tensors:

- `eager`: the reference path (`Gate.forward` + `Policy.to_mask`), `GateProvider(fast=False)`;
- `fast`: cached per-length tables, `Gate.fast_scores`, one-launch `scores_to_kv_indices`,
  `GateProvider(cuda_graphs=False)`;
- `graphed`: the fast path replayed from one CUDA graph per layer (captured on a layer's second
  call), `GateProvider(cuda_graphs=True)`.

Two timings per path, medians over `--reps`: `call_ms`, one provider call of layer `--layer`
with a synchronize before and after (wall clock); `layer_ms`, all layers called back to back
with one synchronize at the end, divided by the number of layers (what a forward pays per
layer). Speedups are eager / path. Before timing, every layer's mask from `fast` and `graphed`
(third call: a replay) is compared with `eager` (tiles that differ, rows that differ);
`graphed` must equal `fast` exactly, else no speedup is reported for it. `--profile` adds the
kernel-launch count of one call per path (torch.profiler). `sdpa_layer_ms`: median
time (`benchmarks.common.bench`) of dense causal SDPA (the faster of the cuDNN and flash
backends, named in `sdpa_backend`; GQA) on random bf16
q/k/v of one layer's shape; `share` = layer_ms / sdpa_layer_ms. Prints a table; `--json PATH`
writes the rows.

    PYTHONPATH=. python3 benchmarks/profile_gate.py --gates .e2e/gates --json gate.json
    PYTHONPATH=. python3 benchmarks/profile_gate.py --shape llama3-8b --gates random \
        --block-size 128 --seqlens 32768,131072 --json gate_llama.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from adaptive_sparse.io import atomic_write_text
from adaptive_sparse.masks import compare_masks
from adaptive_sparse.policies import Policy
from benchmarks.common import best_dense, dense_baselines
from benchmarks.e2e import build_model

PATHS = ("eager", "fast", "graphed")
# Llama-3-8B's attention shapes (the kernel benchmark's llama3-8b shape); MLP as in the model
LLAMA3_8B = dict(vocab_size=1024, hidden_size=4096, intermediate_size=14336,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False)


def build_llama_shape(dev, layers: int, seed: int = 0):
    """A `layers`-layer LlamaForCausalLM with Llama-3-8B attention shapes, random bf16 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B, num_hidden_layers=layers,
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
    """Kernel launches (and graph launches) of one call of fn, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(cuda)
    with profile(activities=acts) as prof:
        fn()
        _sync(cuda)
    counts = {"kernel_launches": 0, "graph_launches": 0, "memcpy": 0}
    for e in prof.key_averages():
        if "LaunchKernel" in e.key:
            counts["kernel_launches"] += e.count
        elif "GraphLaunch" in e.key:
            counts["graph_launches"] += e.count
        elif "Memcpy" in e.key and e.key.startswith("cuda"):
            counts["memcpy"] += e.count
    return counts


def run_length(model, gates, policy, n, a, cuda, dev) -> list[dict]:
    from adaptive_sparse.gates import GateProvider

    nl = gates.config.num_layers
    gen = torch.Generator(device="cpu").manual_seed(n)
    ids = torch.randint(model.config.vocab_size, (1, n), generator=gen).to(dev)
    hq, hkv, d = gates.config.num_heads, gates.config.num_kv_heads, gates.config.head_dim
    q = torch.empty(1, hq, n, d, device=dev, dtype=torch.bfloat16)  # [B, Hq, N, D]: shape only
    k = torch.empty(1, hkv, n, d, device=dev, dtype=torch.bfloat16)  # [B, Hkv, N, D]
    providers = {"eager": GateProvider(gates, policy, fast=False),
                 "fast": GateProvider(gates, policy, fast=cuda, cuda_graphs=False),
                 "graphed": GateProvider(gates, policy, fast=cuda, cuda_graphs=True)}
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
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gates", required=True,
                    help="gate directory (a gate artifact: manifest.json + gates.safetensors), "
                    "or 'random'")
    ap.add_argument("--shape", default="smollm2-135m", choices=("smollm2-135m", "llama3-8b"))
    ap.add_argument("--layers", type=int, default=2, help="layers of the llama3-8b shape")
    ap.add_argument("--block-size", type=int, default=64, help="block of --gates random")
    ap.add_argument("--seqlens", default="8192,32768")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--policy", default=None,
                    help="policy as JSON (overrides --density), e.g. '{\"kind\": \"top_k\", "
                         "\"k\": 8}'")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="count kernel launches per call")
    ap.add_argument("--json", default=None, help="write the rows (and environment) here")
    a = ap.parse_args(argv)
    from adaptive_sparse.gates import load_gates

    import triton

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    env = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda if cuda else None)
    policy = Policy.from_dict(json.loads(a.policy)) if a.policy else \
        Policy(kind="density", density=a.density)
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}; {a.shape} "
          f"shapes, bf16, batch 1; policy {policy.to_dict()}", flush=True)
    if a.layer < 0:
        ap.error(f"--layer: expected a layer index >= 0, got {a.layer}")
    if a.shape == "llama3-8b":
        model = build_llama_shape(dev, a.layers)
        a.layer = min(a.layer, a.layers - 1)
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
          "(tiles / rows differing) | launches | dense SDPA ms per layer (backend) | share |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        v = r["vs_eager"]
        cmp = "-" if v is None else ("exact" if v["exact"] else
                                     f"{v['tiles_differ']} / {v['rows_differ']}")
        launches = r.get("kernel_launches", "-")
        if r.get("graph_launches"):
            launches = f"{launches} + {r['graph_launches']} graph"
        print(f"| {r['N']} | {r['path']} | {r['call_ms']:.3f} | {r['layer_ms']:.3f} | "
              f"{r['speedup_call'] or '-'} | {r['speedup_layer'] or '-'} | {cmp} | {launches} | "
              f"{r['sdpa_layer_ms'] or '-'} ({r['sdpa_backend'] or '-'}) | "
              f"{'-' if r['share'] is None else format(100 * r['share'], '.1f') + '%'} |")
    if a.json:
        atomic_write_text(a.json, json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
