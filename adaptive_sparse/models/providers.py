"""Mask providers: per layer, `(layer_idx, q [B,Hq,N,D], k [B,Hkv,M,D]) -> BlockSparseMask | None`.

- `ProviderSpec` + `build_provider(spec, model)`: the one way from a setting (CLI flags, a
  `compare --settings` entry, a sweep trial, a policy file) to a provider.

- `PatternProvider`: a named pattern of the zoo (`adaptive_sparse.patterns.make_pattern`).
- `OracleProvider`: the true attention's block map through a `Policy` (the upper bound).
- `RecordingProvider`: wraps any provider (or none: dense) and keeps, per layer and call, the
  mask it returned and, on request, the layer's q / k and true block maps.
- `CaptureProvider`: wraps any provider and records, per layer, the density of its masks and
  (optionally) their attention recall, the share of the true attention mass they keep. Recall
  needs the true block maps, computed chunked from the q and k the layer sees: about the cost of
  one more dense attention per layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from adaptive_sparse.attention.block_maps import attention_recall, block_attention_maps
from adaptive_sparse.errors import fail
from adaptive_sparse.masks import SUPPORTED_BLOCK_SIZES, BlockSparseMask


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or block_size not in SUPPORTED_BLOCK_SIZES:
        raise fail("block_size", f"one of {SUPPORTED_BLOCK_SIZES}", block_size)
    return block_size


def _check_inner(inner) -> None:
    if inner is not None and not callable(inner):
        raise fail("inner", "a provider callable or None", type(inner).__name__, cls=TypeError)


def _check_layers(layers):
    if layers is None:
        return None
    try:
        out = frozenset(int(i) for i in layers)
    except (TypeError, ValueError):
        raise TypeError(f"layers: expected an iterable of layer indices, got {layers!r}") from None
    if any(i < 0 for i in out):
        raise ValueError(f"layers: expected non-negative layer indices, got {sorted(out)}")
    return out


class PatternProvider:
    """A pattern of the zoo for every layer (or only `layers`; the others stay dense).

    name: a key of `adaptive_sparse.patterns.PATTERNS`; params: that pattern's parameters
    (`PATTERN_PARAMS[name]`). Input-dependent patterns get the layer's q and k."""

    def __init__(self, name: str, block_size: int = 64, layers=None, **params):
        from adaptive_sparse.patterns import PATTERN_PARAMS, PATTERNS

        if name not in PATTERNS:
            raise ValueError(f"name: expected one of {sorted(PATTERNS)}, got {name!r}")
        unknown = sorted(set(params) - set(PATTERN_PARAMS.get(name, {})))
        if unknown:
            raise ValueError(f"params: {unknown} are not parameters of pattern {name!r} "
                             f"(it takes {sorted(PATTERN_PARAMS.get(name, {}))})")
        self.name = name
        self.block_size = _check_block_size(block_size)
        self.layers = _check_layers(layers)
        self.params = params

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor):
        from adaptive_sparse.patterns import make_pattern

        if self.layers is not None and layer_idx not in self.layers:
            return None
        B, Hq, N, _ = q.shape
        return make_pattern(self.name, q_len=N, kv_len=k.shape[2], num_heads=Hq,
                            block_size=self.block_size, batch=B, q=q, k=k, device=q.device,
                            **self.params)

    def describe(self) -> dict:
        return {"pattern": self.name, "block_size": self.block_size,
                "layers": sorted(self.layers) if self.layers is not None else None,
                **{k: v for k, v in self.params.items()}}


class OracleProvider:
    """Masks from the true attention: `patterns.oracle_with_maps` (block maps of q and k ranked
    by `target`, "sum": attention mass per tile, "max": row-normalized tile max, through
    `policy`), the one oracle code path.

    policy: a `Policy` or its dict. num_layers: the model's layer count, for per-layer budget
    schedules (`Policy.layer_schedule`); None treats every layer as layer 0 of 1 unless the
    schedule is constant. Non-finite q or k are refused (ValueError "q, k: expected finite
    values ..." naming the layer), as by the `oracle` pattern: no mask can be ranked from them."""

    def __init__(self, policy, target: str = "sum", block_size: int = 64,
                 num_layers: int | None = None, layers=None):
        from adaptive_sparse.patterns.oracle import TARGETS
        from adaptive_sparse.policies import Policy

        if target not in TARGETS:
            raise fail("target", " or ".join(map(repr, TARGETS)), target)
        if num_layers is not None and (isinstance(num_layers, bool)
                                       or not isinstance(num_layers, int) or num_layers < 1):
            raise fail("num_layers", "a positive int or None", num_layers)
        self.policy = Policy.coerce(policy)
        self.target = target
        self.block_size = _check_block_size(block_size)
        self.num_layers = num_layers
        self.layers = _check_layers(layers)
        self.last_maps = None  # (q, block_sum) of the last call, reused by CaptureProvider

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor):
        from adaptive_sparse.patterns.oracle import oracle_with_maps

        if self.layers is not None and layer_idx not in self.layers:
            return None
        layer, layers = (0, 1) if self.num_layers is None else (layer_idx, self.num_layers)
        try:
            mask, _, bsum = oracle_with_maps(q=q, k=k, block_size=self.block_size,
                                             policy=self.policy, target=self.target,
                                             layer_idx=layer, num_layers=layers)
        except ValueError as e:
            raise ValueError(f"{e} (oracle, layer {layer_idx})") from None
        self.last_maps = (q, bsum)
        return mask

    def describe(self) -> dict:
        return {"pattern": "oracle", "target": self.target, "block_size": self.block_size,
                "policy": self.policy.to_dict()}


class RecordingProvider:
    """Wraps `inner` (a provider, or None for dense attention) and returns its masks unchanged,
    keeping per layer one entry per call (all calls, or only the last with `last_only`):
      masks[layer]      the returned mask, a dense-causal one where `inner` returned None
      qk[layer]         (q [B, Hq, N, D], k [B, Hkv, M, D]) post-rotary, detached (qk=True)
      block_sums[layer] true block maps float32 [B, Hq, Qb, Kb] (maps=True)
    Kept tensors are moved to `device` ("cpu" by default; None keeps them where they are)."""

    def __init__(self, inner=None, *, block_size: int = 64, qk: bool = False,
                 maps: bool = False, last_only: bool = False, device="cpu"):
        _check_inner(inner)
        self.inner, self.block_size = inner, _check_block_size(block_size)
        self.keep_qk, self.keep_maps, self.last_only = bool(qk), bool(maps), bool(last_only)
        self.device = device
        self.masks: dict[int, list[BlockSparseMask]] = {}
        self.qk: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.block_sums: dict[int, list[torch.Tensor]] = {}

    def _keep(self, store: dict, layer_idx: int, value) -> None:
        if self.last_only:
            store[layer_idx] = [value]
        else:
            store.setdefault(layer_idx, []).append(value)

    def _moved(self, x):
        return x if self.device is None else x.to(self.device)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor):
        mask = self.inner(layer_idx, q, k) if self.inner is not None else None
        shown = mask if mask is not None else BlockSparseMask.full(
            1, 1, block_size=self.block_size, q_len=q.shape[2], kv_len=k.shape[2],
            device=q.device)
        self._keep(self.masks, layer_idx, self._moved(shown))
        if self.keep_qk:
            self._keep(self.qk, layer_idx, (self._moved(q.detach()), self._moved(k.detach())))
        if self.keep_maps:
            _, bsum = block_attention_maps(q, k, block_size=self.block_size)
            self._keep(self.block_sums, layer_idx, self._moved(bsum))
        return mask


class CaptureProvider:
    """Wraps `inner` (a provider or None for dense) and records per layer:
    density of the masks (over the causal region) and, with `recall`, the attention recall
    (share of the true attention mass inside the selected tiles), mean and per head.

    keep_maps: also keep the last call's masks (bool [B, H, Qb, Kb]) and true block maps
    (block_max, block_sum float [B, Hq, Qb, Kb]) per layer, in `self.masks` / `self.maps`.
    block_size: block size of the dense mask when `inner` returns None."""

    def __init__(self, inner=None, *, recall: bool = True, keep_maps: bool = False,
                 block_size: int = 64):
        _check_inner(inner)
        self.inner = inner
        self.recall = bool(recall)
        self.keep_maps = bool(keep_maps)
        self.block_size = _check_block_size(getattr(inner, "block_size", block_size))
        self.reset()

    def reset(self) -> None:
        self.stats: dict[int, dict] = {}
        self.masks: dict[int, torch.Tensor] = {}
        self.maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor):
        mask = self.inner(layer_idx, q, k) if self.inner is not None else None
        B, Hq, N, _ = q.shape
        M = k.shape[2]
        shown = mask if mask is not None else BlockSparseMask.full(
            1, 1, block_size=self.block_size, q_len=N, kv_len=M, device=q.device)
        st = self.stats.setdefault(layer_idx, {"calls": 0, "selected": 0.0, "total": 0.0,
                                               "recall_sum": torch.zeros(Hq, dtype=torch.float64),
                                               "recall_calls": 0})
        st["calls"] += 1
        st["selected"] += shown.density()
        st["total"] += 1.0
        need_maps = self.keep_maps or (self.recall and mask is not None)
        bmax = bsum = None
        if need_maps:
            last = getattr(self.inner, "last_maps", None)
            if last is not None and last[0] is q and not self.keep_maps \
                    and last[1].shape[-1] == shown.num_kv_blocks:
                bsum = last[1]
            else:
                bmax, bsum = block_attention_maps(q, k, block_size=shown.block_size)
        if self.recall:
            if mask is None:
                rec = torch.ones(Hq, dtype=torch.float64)
            else:
                dense = shown.to_dense()
                if dense.shape[0] not in (1, B):
                    raise ValueError(f"mask: expected batch 1 or {B}, got {dense.shape[0]}")
                rec = attention_recall(bsum, dense.expand(B, *dense.shape[1:])).double().cpu()
            st["recall_sum"] += rec
            st["recall_calls"] += 1
        if self.keep_maps:
            self.masks[layer_idx] = shown.to_dense().cpu()
            self.maps[layer_idx] = (bmax.cpu(), bsum.cpu())
        return mask

    def per_layer(self) -> list[dict]:
        """[{layer, density, recall, recall_per_head}] in layer order (recall None when off)."""
        out = []
        for layer in sorted(self.stats):
            st = self.stats[layer]
            row = {"layer": layer, "density": st["selected"] / max(st["total"], 1.0),
                   "recall": None, "recall_per_head": None}
            if st["recall_calls"]:
                heads = st["recall_sum"] / st["recall_calls"]
                row["recall"] = float(heads.mean())
                row["recall_per_head"] = [float(x) for x in heads]
            out.append(row)
        return out

    def summary(self) -> dict:
        """Mean density and recall over the recorded layers."""
        rows = self.per_layer()
        if not rows:
            return {"density": None, "recall": None}
        recalls = [r["recall"] for r in rows if r["recall"] is not None]
        return {"density": sum(r["density"] for r in rows) / len(rows),
                "recall": sum(recalls) / len(recalls) if recalls else None}


SPEC_KINDS = ("dense", "pattern", "oracle", "gate")


@dataclass(frozen=True)
class ProviderSpec:
    """What to build a provider from.

    kind: "dense" (None provider), "pattern" (`name` of the zoo with `params`), "oracle" (the
    true attention through `policy`, ranked by `target`; extra `params` go to the zoo's
    `oracle` pattern) or "gate" (trained gates at `gates`, any folder `resolve_gates_dir`
    accepts, through `policy`). block_size: of pattern and oracle masks (a gate's comes from
    its checkpoint)."""

    kind: str
    name: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    policy: Any = None
    target: str = "sum"
    gates: str | os.PathLike | None = None
    block_size: int = 64

    def __post_init__(self):
        if self.kind not in SPEC_KINDS:
            raise ValueError(f"kind: expected one of {SPEC_KINDS}, got {self.kind!r}")
        if not isinstance(self.params, Mapping):
            raise TypeError(f"params: expected a mapping, got {type(self.params).__name__}")
        _check_block_size(self.block_size)
        if self.kind == "pattern" and not isinstance(self.name, str):
            raise ValueError(f"name: expected a pattern name for kind 'pattern', got "
                             f"{self.name!r}")
        if self.kind in ("oracle", "gate") and self.policy is None:
            raise ValueError(f"policy: expected a policy (a kind or a mapping) for kind "
                             f"{self.kind!r}, got None")
        if self.kind == "gate" and self.gates is None:
            raise ValueError("gates: expected a gate folder (gates, a training version_N or a "
                             "run folder such as runs/gates/<name>) for kind 'gate', got None")
        if self.kind == "oracle" and self.target not in ("sum", "max"):
            raise ValueError(f"target: expected 'sum' or 'max', got {self.target!r}")

    @classmethod
    def from_setting(cls, setting: Mapping[str, Any], *, block_size: int = 64) -> "ProviderSpec":
        """From the flat mapping of CLI settings, sweep trials and policy files:
        {"pattern": dense | oracle | gate | <pattern name>, "policy", "target", "gates",
        "name" (a label, ignored), <pattern parameters>}. A "method" key is read as "pattern"
        (the policy files of sweeps/frontier.py: {"method", "params"})."""
        if not isinstance(setting, Mapping):
            raise TypeError(f"setting: expected a mapping, got {type(setting).__name__}")
        s = dict(setting)
        if "method" in s and "pattern" not in s:
            params = s.pop("params", {}) or {}
            if not isinstance(params, Mapping):
                raise TypeError(f"params: expected a mapping, got {type(params).__name__}")
            s = {"pattern": s.pop("method"), **s, **params}
        method = s.pop("pattern", None)
        s.pop("name", None)
        if not isinstance(method, str):
            raise ValueError(f"pattern: expected a pattern name, 'dense', 'oracle' or 'gate', "
                             f"got {method!r}")
        policy, gates = s.pop("policy", None), s.pop("gates", None)
        if method in ("dense", "gate"):
            if s and method == "dense":
                raise ValueError(f"dense: takes no parameters, got {sorted(s)}")
            if method == "gate" and s:
                raise ValueError(f"gate: takes only policy and gates, got {sorted(s)}")
            return cls(method, policy=policy, gates=gates, block_size=block_size)
        if method == "oracle":
            return cls("oracle", policy=policy, target=s.pop("target", "sum"), params=s,
                       block_size=block_size)
        return cls("pattern", name=method, params=s, block_size=block_size)


def build_provider(spec: ProviderSpec, model=None, *, num_layers: int | None = None,
                   gate_fast: bool | None = None, gate_sets: dict | None = None):
    """The provider of `spec` (None for dense). Oracle budgets follow `num_layers`, else the
    model's layer count when `model` is given. A gate provider is attached to `model` (its pre-rotary capture
    hooks; call `detach()` when done); its gates are loaded onto the model's device, and kept
    in `gate_sets` ({resolved folder: GateSet}) when given, so repeated settings load once."""
    if not isinstance(spec, ProviderSpec):
        raise TypeError(f"spec: expected a ProviderSpec, got {type(spec).__name__}")
    if spec.kind == "dense":
        return None
    if spec.kind == "pattern":
        return PatternProvider(spec.name, block_size=spec.block_size, **dict(spec.params))
    if spec.kind == "oracle":
        if spec.params:
            return PatternProvider("oracle", block_size=spec.block_size, policy=spec.policy,
                                   target=spec.target, **dict(spec.params))
        if num_layers is None and model is not None:
            from adaptive_sparse.models.config import text_config

            num_layers = int(text_config(model).num_hidden_layers)
        return OracleProvider(spec.policy, target=spec.target, block_size=spec.block_size,
                              num_layers=num_layers)
    if model is None:
        raise ValueError("model: a gate setting needs the model its gates attach to")
    from adaptive_sparse.gates import GateProvider, load_gates, resolve_gates_dir

    where = str(resolve_gates_dir(spec.gates))
    cache = {} if gate_sets is None else gate_sets
    if where not in cache:
        device = next(model.parameters()).device
        cache[where] = load_gates(where, model, map_location=device)
    return GateProvider(cache[where], spec.policy, model, fast=gate_fast)
