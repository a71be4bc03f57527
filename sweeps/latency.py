"""Measured latency for sweeps: our block-sparse kernel timed on each trial's own masks.

For a sweep with ``objectives: [latency_ms, ppl_change]``, name ``latency:
sweeps.latency:kernel_latency`` and give the evaluator ``latency_reps: N`` (``ModelEvaluator``
then keeps every layer's masks of every evaluated sequence, on the model's device, and times the
provider; see ``LatencyInputs``). Per trial:

- ``attention_ms``: ``block_sparse_attention`` (the evaluator's backend: "auto" is triton on
  CUDA, gather on CPU) at the model's shapes (B = 1, Hq, Hkv, N, D, the model's dtype) on
  seeded random q/k/v (this kernel's time does not depend on their values), one launch per layer
  with that layer's mask, summed over layers; the median of ``reps`` repetitions after one
  warm-up (which also autotunes), timed with CUDA events on CUDA and the wall clock elsewhere;
  the mean over the evaluated sequences.
- ``mask_ms``: the method's provider building the masks of the last evaluated sequence again
  from its recorded q/k, every layer (gate scoring and selection, a pattern's construction, the
  oracle's attention maps), timed the same way (median of ``reps``) by the evaluator.
- ``latency_ms = attention_ms + mask_ms`` for every method whose masks depend on the input (the
  gate, the oracle and the input-dependent patterns: ``adaptive_sparse.patterns.INPUT_DEPENDENT``);
  for the static patterns (sliding window, Longformer, BigBird, strided) the mask depends only
  on the length, is built once and reused, so ``latency_ms = attention_ms`` and ``mask_ms`` is
  reported but not added. ``latency_device`` names the device, backend and dtype timed ("cpu"
  when no GPU: then the CPU backend's time, not a GPU's).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adaptive_sparse.attention.api import auto_backend, block_sparse_attention
from adaptive_sparse.errors import fail
from adaptive_sparse.masks import BlockSparseMask
from adaptive_sparse.patterns import INPUT_DEPENDENT, PATTERNS


@dataclass(frozen=True)
class LatencyInputs:
    """What an evaluator recorded for ``kernel_latency`` (``ModelEvaluator(latency_reps=N)``).

    masks: per evaluated sequence, layer -> its mask (on ``device``); q_shape (B, Hq, N, D) and
    kv_shape (B, Hkv, M, D) of the attention calls; dtype, device and backend of the model's
    attention; reps: timed repetitions; mask_ms: the provider's time for one sequence's masks,
    every layer (median of ``reps``)."""

    masks: list[dict[int, BlockSparseMask]]
    q_shape: tuple[int, ...]
    kv_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    backend: str
    reps: int
    mask_ms: float


def timed_ms(fn: Callable[[], Any], reps: int, device) -> float:
    """Median milliseconds of ``reps`` calls of ``fn`` after one untimed warm-up call: CUDA
    events around each call on a CUDA device, the wall clock elsewhere."""
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise fail("reps", "a positive int", reps)
    cuda = torch.device(device).type == "cuda"
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return float(statistics.median(times))


def provider_ms(provider, qk: Mapping[int, tuple[torch.Tensor, torch.Tensor]], *,
                reps: int) -> float:
    """Median ms of ``provider(layer, q, k)`` over every layer of ``qk`` (layer -> (q [B, Hq,
    N, D], k [B, Hkv, M, D]) as the attention saw them). A gate provider scores the pre-rotary
    q/k it captured in the last forward, so call this before it is detached."""
    if not qk:
        raise fail("qk", "the q/k of at least one layer", dict(qk))
    layers = sorted(qk)

    def build():
        for layer in layers:
            provider(layer, *qk[layer])

    return timed_ms(build, reps, qk[layers[0]][0].device)


def attention_ms(masks: list[Mapping[int, BlockSparseMask]], q_shape, kv_shape, *, dtype,
                 device, backend: str = "auto", reps: int = 5, seed: int = 0) -> float:
    """Median ms of ``block_sparse_attention`` with each layer's mask, summed over the layers of
    one sequence (mean over the sequences of ``masks``), at q [q_shape] and k/v [kv_shape] of
    seeded random values in ``dtype`` on ``device``."""
    if not masks or not all(masks):
        raise fail("masks", "a non-empty list of non-empty {layer: mask} mappings", masks)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=gen, device=device, dtype=dtype)
               for shape in (q_shape, kv_shape, kv_shape))
    out = torch.empty_like(q)
    calls = [mask.to(q.device) for seq in masks for _, mask in sorted(seq.items())]

    def run():
        for mask in calls:
            block_sparse_attention(q, k, v, mask, backend=backend, out=out)

    return timed_ms(run, reps, q.device) / len(masks)


def device_label(device, backend: str, dtype) -> str:
    """e.g. "NVIDIA H200 (triton, bfloat16)" or "cpu (gather, float32)": what was timed."""
    device = torch.device(device)
    probe = torch.empty(0, dtype=dtype, device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    used = auto_backend(probe, "gather") if backend == "auto" else backend
    return f"{name} ({used}, {str(dtype).removeprefix('torch.')})"


def mask_cost_included(family: str) -> bool:
    """Whether ``latency_ms`` adds the provider's mask time: every family but the static
    patterns (their masks depend only on the length and are built once)."""
    return not (family in PATTERNS and family not in INPUT_DEPENDENT)


def kernel_latency(family: str, params: Mapping[str, Any], result: Mapping[str, Any]) -> dict:
    """The sweep latency callable (``latency: sweeps.latency:kernel_latency``): {"latency_ms",
    "attention_ms", "mask_ms", "mask_ms_included", "latency_device"} of one trial (module
    docstring), from ``result["latency_inputs"]``."""
    inputs = result.get("latency_inputs")
    if not isinstance(inputs, LatencyInputs):
        raise fail("result", "the latency_inputs of an evaluator that records masks "
                   "(ModelEvaluator(latency_reps=N), N >= 1, or evaluator.args.latency_reps)",
                   sorted(result))
    attn = attention_ms(inputs.masks, inputs.q_shape, inputs.kv_shape, dtype=inputs.dtype,
                        device=inputs.device, backend=inputs.backend, reps=inputs.reps)
    included = mask_cost_included(family)
    return {"latency_ms": attn + (inputs.mask_ms if included else 0.0), "attention_ms": attn,
            "mask_ms": inputs.mask_ms, "mask_ms_included": included,
            "latency_device": device_label(inputs.device, inputs.backend, inputs.dtype)}
