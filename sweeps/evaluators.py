"""Evaluators: what measures a configuration (see ``sweeps.objectives.Evaluator``).

- ``ModelEvaluator``: a pretrained model on packed validation documents, through
  ``adaptive_sparse.evaluate.evaluate`` with a ``PatternProvider``, ``OracleProvider`` or
  ``GateProvider``. Imports of the model stack happen on first use.
- ``SyntheticEvaluator``: closed-form metrics with the same keys and no model, for tests of the
  sweep machinery and dry runs (``evaluator: {factory: sweeps.evaluators:SyntheticEvaluator}``).

``build_evaluator({"factory": "module:callable", "args": {...}})`` builds either, or any other.
"""

from __future__ import annotations

import importlib
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from adaptive_sparse.errors import fail

POLICY_FIELDS = {"kind": str, "tau": float, "k": int, "p": float, "density": float,
                 "keep_sink": bool, "keep_diagonal": bool, "local_blocks": int,
                 "layer_schedule": str, "layer_scale_end": float, "head_budgets": list}


TRUSTED_MODULES = ("adaptive_sparse", "gating", "sweeps")
DTYPES = ("float32", "bfloat16", "float16")  # ModelEvaluator(dtype=...)


def check_callable(spec: Any, name: str, allow_modules: tuple[str, ...] = ()) -> str:
    """``spec`` is ``"module:callable"`` with the module under ``TRUSTED_MODULES`` or one of
    ``allow_modules`` (a sweep config is code: ``os:system`` must not run); returns the module."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"{name}: expected 'module:callable', got {spec!r}")
    module, attr = spec.split(":")
    if not module or not attr.isidentifier():
        raise ValueError(f"{name}: expected 'module:callable', got {spec!r}")
    roots = (*TRUSTED_MODULES, *allow_modules)
    if not any(module == r or module.startswith(r + ".") for r in roots):
        raise ValueError(f"{name}: expected a callable from {', '.join(TRUSTED_MODULES)} or a "
                         f"module named with --allow-module (a sweep config is trusted code), "
                         f"got {spec!r}")
    return module


RENAMED_ARGS = {"num_sequences": "num_seqs"}  # old spelling -> the CLI's (--num-seqs)


def renamed_args(args: Mapping[str, Any], who: str, prefix: str = "") -> dict[str, Any]:
    """``args`` with old spellings (``RENAMED_ARGS``) replaced by the new ones, each with a
    deprecation warning on stderr as the CLI gives for its old flags ("<who>: warning:
    <prefix>num_sequences is deprecated; use <prefix>num_seqs"); both spellings at once are
    refused (ValueError naming the old one)."""
    import sys

    out = dict(args)
    for old, new in RENAMED_ARGS.items():
        if old not in out:
            continue
        if new in out:
            raise ValueError(f"{prefix}{old}: expected only {prefix}{new} (its new name), got "
                             "both")
        print(f"{who}: warning: {prefix}{old} is deprecated; use {prefix}{new}", file=sys.stderr)
        out[new] = out.pop(old)
    return out


def import_callable(spec: Any, name: str, allow_modules: tuple[str, ...] = ()):
    """The callable named by ``spec`` (checked by ``check_callable``)."""
    module = check_callable(spec, name, allow_modules)
    try:
        return getattr(importlib.import_module(module), spec.split(":")[1])
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{name}: cannot import {spec!r}: {e}") from None


def build_evaluator(spec: Mapping[str, Any] | None, *, allow_modules: tuple[str, ...] = ()):
    """``spec = {"factory": "pkg.module:name", "args": {...}}``; default ModelEvaluator."""
    spec = dict(spec or {})
    factory = spec.pop("factory", "sweeps.evaluators:ModelEvaluator")
    args = spec.pop("args", {}) or {}
    if spec:
        raise ValueError(f"evaluator: unknown keys {sorted(spec)}, expected factory and args")
    if not isinstance(args, Mapping):
        raise ValueError(f"evaluator.args: expected a mapping, got {args!r}")
    fn = import_callable(factory, "evaluator.factory", allow_modules)
    try:
        return fn(**args)
    except TypeError as e:
        raise ValueError(f"evaluator.args: {e}") from None


def _policy_density(policy: Mapping[str, Any], num_blocks: int) -> float:
    kind = policy["kind"]
    if kind == "density":
        d = policy["density"]
    elif kind == "top_k":
        d = policy["k"] / num_blocks
    elif kind == "top_p":
        d = policy["p"] ** 6
    else:
        d = 1.0 - policy["tau"]
    return d


class SyntheticEvaluator:
    """Closed-form stand-in for a model: density from the parameters, quality loss
    ``ppl_change = quality[family] * 0.05 * (1 - d)^2 / d`` (smaller quality factor = better
    method), recall ``1 - (1 - d)^2 * quality``. ``families`` maps each pattern name to its
    parameters ``{name: type}``; gate and oracle always exist.

    ``sleep`` (seconds per evaluate) and ``marker_dir`` (writes ``<pid>.running`` during an
    evaluation) let tests kill a worker mid-trial."""

    def __init__(self, families: Mapping[str, Mapping[str, str]] | None = None, *,
                 num_blocks: int = 64, num_layers: int = 4, sleep: float = 0.0,
                 marker_dir: str | None = None, quality: Mapping[str, float] | None = None,
                 screen: bool = False):
        self.families = {k: dict(v) for k, v in (families or {
            "sliding_window": {"window": "int"}, "strided": {"stride": "int"}}).items()}
        self.num_blocks, self.num_layers = num_blocks, num_layers
        self.sleep, self.marker_dir = sleep, marker_dir
        self.quality = {"oracle": 0.3, "gate": 0.5, **(quality or {})}
        self.evaluations = 0
        if screen:
            self.screen = self._screen

    def parameters(self, family: str) -> Mapping[str, Any]:
        if family in ("gate", "oracle"):
            return {"policy": dict, "target": str, "gates": str}
        if family not in self.families:
            raise ValueError(f"method: unknown method {family!r}, expected one of "
                             f"{sorted(self.families) + ['gate', 'oracle']}")
        return self.families[family]

    def _density(self, family: str, params: Mapping[str, Any]) -> float:
        self.parameters(family)
        if "policy" in params:
            d = _policy_density(params["policy"], self.num_blocks)
        else:
            unknown = sorted(set(params) - set(self.families[family]))
            if unknown:
                raise ValueError(f"params: unknown parameters {unknown} for {family!r}")
            numbers = [float(v) for v in params.values()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)]
            d = (sum(numbers) + 1.0) / self.num_blocks
        return min(1.0, max(1.0 / self.num_blocks, d))

    def _screen(self, family: str, params: Mapping[str, Any]) -> dict[str, float]:
        d = self._density(family, params)
        q = self.quality.get(family, 1.0)
        return {"density": d, "recall": 1.0 - (1.0 - d) ** 2 * q}

    def evaluate(self, family: str, params: Mapping[str, Any]) -> dict[str, Any]:
        marker = None
        if self.marker_dir is not None:
            marker = os.path.join(self.marker_dir, f"{os.getpid()}.running")
            with open(marker, "w") as f:
                f.write(family)
        try:
            if self.sleep:
                time.sleep(self.sleep)
            d = self._density(family, params)
            q = self.quality.get(family, 1.0)
            ramp = params.get("policy", {}).get("layer_scale_end", 1.0)
            per_layer = [min(1.0, d * (1 + (ramp - 1) * i / max(1, self.num_layers - 1)))
                         for i in range(self.num_layers)]
            self.evaluations += 1
            return {"density": d, "ppl_change": q * 0.05 * (1.0 - d) ** 2 / d,
                    "recall": 1.0 - (1.0 - d) ** 2 * q, "per_layer_density": per_layer,
                    "perplexity_dense": 10.0,
                    "perplexity": 10.0 * (1 + q * 0.05 * (1.0 - d) ** 2 / d)}
        finally:
            if marker is not None and os.path.exists(marker):
                os.remove(marker)


class ModelEvaluator:
    """A pretrained model on validation sequences (LongTensor [S, seq_len]).

    model: preset or path for ``adaptive_sparse.models.load_model`` (or pass ``model_obj``,
    ``sequences``); validation data: ``num_seqs`` sequences (default 4; the CLI's
    ``--num-seqs``, ``num_sequences`` its deprecated spelling) packed from
    ``load_corpus(corpus)``'s validation split. gates: the trained gates for gate/* methods, as
    ``adaptive_sparse.gates.resolve_gates_dir`` reads them (a gates folder, a training version
    folder, or a run folder such as ``runs/gates/<name>``: its newest version); resolved, and a
    missing one refused, when the evaluator is built. A policy file may name its own.
    Perplexity runs every attention layer through ``sparse_attention`` with the method's
    provider; the dense baseline runs the same path with no mask and is cached.

    ``screen`` (the cheap stage): the first ``screen_sequences`` sequences' post-rotary q, k
    and true block sums are recorded once per layer; a pattern or the oracle is then screened by
    building its masks from them and measuring density and attention recall, with no model
    forward. The gate scores pre-rotary features captured by hooks during a forward, so it is
    screened by one forward over those sequences (still ``num_seqs / screen_sequences``
    times cheaper than its perplexity). ``gate_fast`` is GateProvider's ``fast`` (None: the
    fast path on CUDA; False: the reference path everywhere).

    ``dtype``: the weights' dtype when the evaluator loads the model ("float32", "bfloat16" or
    "float16"). The NLL applies the LM head in chunks (``adaptive_sparse.evaluate.sequence_nll``),
    so the [N, vocab] logits of a long sequence never exist at once.
    ``latency_reps`` (0: off): ``evaluate`` also keeps every layer's masks of every sequence (on
    the model's device) and times the provider rebuilding the last sequence's masks (median of
    that many repetitions after one warm-up, summed over layers), and returns them as
    ``result["latency_inputs"]`` (``sweeps.latency.LatencyInputs``) for the latency callable
    ``sweeps.latency:kernel_latency``."""

    def __init__(self, model: str = "smollm2-135m", *, seq_len: int = 4096,
                 num_seqs: int | None = None, block_size: int = 64, corpus: str = "default",
                 split_seed: int = 0, gates: str | None = None, device: str = "cpu",
                 backend: str = "auto", screen_sequences: int = 1, model_obj=None,
                 sequences=None, gate_fast: bool | None = None, dtype: str = "float32",
                 latency_reps: int = 0, **old):
        if old:
            unknown = sorted(set(old) - set(RENAMED_ARGS))
            if unknown:
                raise TypeError(f"ModelEvaluator() got an unexpected keyword argument "
                                f"{unknown[0]!r}")
            if num_seqs is not None:
                old["num_seqs"] = num_seqs
            num_seqs = renamed_args(old, "ModelEvaluator")["num_seqs"]
        num_seqs = 4 if num_seqs is None else num_seqs
        self.model_name, self.seq_len, self.num_seqs = model, seq_len, num_seqs
        self.block_size, self.corpus, self.split_seed = block_size, corpus, split_seed
        if gates is not None:
            from adaptive_sparse.gates import resolve_gates_dir
            gates = str(resolve_gates_dir(gates))  # refused now, not at the first gate trial
        self.gates, self.device, self.backend = gates, device, backend
        self.screen_sequences = screen_sequences
        self.gate_fast = gate_fast
        if dtype not in DTYPES:
            raise fail("dtype", f"one of {list(DTYPES)}", dtype)
        if isinstance(latency_reps, bool) or not isinstance(latency_reps, int) \
                or latency_reps < 0:
            raise fail("latency_reps", "an int >= 0 (0: no latency inputs)", latency_reps)
        self.dtype, self.latency_reps = dtype, latency_reps
        self._model, self._sequences = model_obj, sequences
        self._gate_sets: dict[str, Any] = {}
        self._dense_nll: float | None = None
        self._qk: dict | None = None

    def _load(self):
        if self._model is None:
            import torch
            from adaptive_sparse.models import load_model
            self._model, tokenizer = load_model(self.model_name,
                                                dtype=getattr(torch, self.dtype))
            self._model.to(self.device).eval()
            if self._sequences is None:
                from adaptive_sparse.data import load_corpus, pack, split_documents
                docs = split_documents(load_corpus(self.corpus), seed=self.split_seed,
                                       fractions=(0.8, 0.1, 0.1))["validation"]
                self._sequences = pack(tokenizer, docs, self.seq_len, self.num_seqs)
        if self._sequences is None:
            raise ValueError("sequences: expected validation token ids [S, N] with model_obj")
        return self._model, self._sequences

    @property
    def num_layers(self) -> int:
        return int(self._load()[0].config.num_hidden_layers)

    def parameters(self, family: str) -> Mapping[str, Any]:
        if family == "gate":
            return {"policy": dict, "gates": str}
        if family == "oracle":
            return {"policy": dict, "target": str}
        from adaptive_sparse.patterns import PATTERN_PARAMS
        if family not in PATTERN_PARAMS:
            raise ValueError(f"method: unknown method {family!r}, expected one of "
                             f"{sorted(PATTERN_PARAMS)}")
        return PATTERN_PARAMS[family]

    def provider(self, family: str, params: Mapping[str, Any]):
        from adaptive_sparse.models import ProviderSpec, build_provider
        self.parameters(family)
        setting = {"pattern": family, **dict(params)}
        if family == "gate":
            setting.setdefault("gates", self.gates)
        return build_provider(ProviderSpec.from_setting(setting, block_size=self.block_size),
                              self._load()[0], num_layers=self.num_layers,
                              gate_fast=self.gate_fast, gate_sets=self._gate_sets)

    def budget_calibrators(self, sequences, families, *, log=print) -> dict:
        """Per-(layer, head) budgets (issue 13): family ("gate/threshold", "oracle/density",
        ...) -> a `policies.BudgetCalibrator` fed with every layer of one dense forward per
        calibration sequence (LongTensor [S, N], never evaluation data): the gate's scores (its
        provider's own path, `keep_scores`) or the true block sums (the oracle's ranking),
        against the true block sums, at this evaluator's block size."""
        import torch
        from adaptive_sparse.attention.block_maps import block_attention_maps
        from adaptive_sparse.evaluate import final_hidden
        from adaptive_sparse.models import observe_attention
        from adaptive_sparse.policies import BudgetCalibrator, Policy

        model = self._load()[0]
        layers = self.num_layers
        block_size = self.block_size
        bases = {"threshold": Policy("threshold", tau=0.01),
                 "density": Policy("density", density=0.1)}
        cals = {f: BudgetCalibrator(bases[f.split("/")[1]], layers) for f in families}
        gate = None
        if any(f.startswith("gate") for f in cals):
            gate = self.provider("gate", {"policy": bases["threshold"].to_dict()})
            gate.keep_scores = True
        t0 = time.perf_counter()

        def observer(call):
            n, m = call.q.shape[2], call.k.shape[2]
            _, bsum = block_attention_maps(call.q, call.k, block_size=block_size)
            where = dict(q_len=n, kv_len=m, block_size=block_size)
            if gate is not None:
                gate(call.layer_idx, call.q, call.k)
                scores = gate.last_scores.pop(call.layer_idx).float()
            for f, cal in cals.items():
                if f.startswith("gate"):
                    cal.update(call.layer_idx, scores, bsum, **where)
                else:
                    cal.update(call.layer_idx, bsum, bsum, scores_are_probs=True, **where)

        try:
            with torch.no_grad(), observe_attention(model, observer):
                for seq in sequences:
                    final_hidden(model, seq[None].to(self.device))  # no [N, vocab] logits
        finally:
            if gate is not None:
                gate.detach()
        log(f"  budget curves of {', '.join(cals)} on {len(sequences)} calibration sequences in "
            f"{time.perf_counter() - t0:.1f} s")
        return cals

    def _nll(self, provider) -> float:
        """Mean next-token NLL over every predicted token of the sequences."""
        import torch
        from adaptive_sparse.evaluate import sequence_nll
        from adaptive_sparse.models import sparse_attention
        model, sequences = self._load()
        total, count = 0.0, 0
        with torch.no_grad(), sparse_attention(model, provider, block_size=self.block_size,
                                               backend=self.backend):
            for seq in sequences:
                nll, n = sequence_nll(model, seq[None].to(self.device))
                total, count = total + nll, count + n
        return total / count

    def _detached(self, provider):
        """Run with ``provider``; remove its hooks from the model afterwards (gate capture)."""
        import contextlib

        @contextlib.contextmanager
        def scope():
            try:
                yield provider
            finally:
                if hasattr(provider, "detach"):
                    provider.detach()
        return scope()

    def evaluate(self, family: str, params: Mapping[str, Any]) -> dict[str, Any]:
        from adaptive_sparse.models import CaptureProvider, RecordingProvider
        if self._dense_nll is None:
            self._dense_nll = self._nll(None)
        timing = None
        with self._detached(self.provider(family, params)) as provider:
            inner = provider
            if self.latency_reps:
                last = RecordingProvider(provider, block_size=self.block_size, qk=True,
                                         last_only=True, device=None)
                inner = every = RecordingProvider(last, block_size=self.block_size, device=None)
            capture = CaptureProvider(inner, recall=True, block_size=self.block_size)
            nll = self._nll(capture)
            if self.latency_reps:
                timing = self._latency_inputs(provider, last.qk, every.masks)
        if not math.isfinite(nll):
            raise ValueError(f"perplexity: non-finite for {family} {dict(params)}")
        summary, per_layer = capture.summary(), capture.per_layer()
        out = {"perplexity_dense": math.exp(self._dense_nll), "perplexity": math.exp(nll),
               "density": summary["density"], "recall": summary["recall"],
               "per_layer_density": [row["density"] for row in per_layer]}
        if timing is not None:
            out["latency_inputs"] = timing
        return out

    def _latency_inputs(self, provider, qk: dict, masks: dict):
        """``sweeps.latency.LatencyInputs`` of one evaluation: the masks per sequence and the
        provider's time to build the last sequence's masks again from its q/k (every layer)."""
        import torch
        from sweeps.latency import LatencyInputs, provider_ms

        with torch.no_grad():
            mask_ms = 0.0 if provider is None else provider_ms(provider, {
                layer: kept[0] for layer, kept in qk.items()}, reps=self.latency_reps)
        q, k = qk[min(qk)][0]
        calls = len(masks[min(masks)])
        return LatencyInputs(
            masks=[{layer: kept[i] for layer, kept in sorted(masks.items())}
                   for i in range(calls)],
            q_shape=tuple(q.shape), kv_shape=tuple(k.shape), dtype=q.dtype, device=q.device,
            backend=self.backend, reps=self.latency_reps, mask_ms=mask_ms)

    def screen(self, family: str, params: Mapping[str, Any]) -> dict[str, float]:
        import torch
        from adaptive_sparse.attention.block_maps import screen_masks
        from adaptive_sparse.models import CaptureProvider, RecordingProvider, sparse_attention
        model, sequences = self._load()
        if family == "gate":
            with self._detached(self.provider(family, params)) as provider, torch.no_grad():
                capture = CaptureProvider(provider, recall=True, block_size=self.block_size)
                with sparse_attention(model, capture, block_size=self.block_size,
                                      backend=self.backend):
                    model(input_ids=sequences[: self.screen_sequences].to(self.device))
            summary = capture.summary()
            return {"density": summary["density"], "recall": summary["recall"]}
        if self._qk is None:
            rec = RecordingProvider(block_size=self.block_size, qk=True, maps=True,
                                    last_only=True, device=None)
            with torch.no_grad(), sparse_attention(model, rec, block_size=self.block_size,
                                                   backend=self.backend):
                model(input_ids=sequences[: self.screen_sequences].to(self.device))
            self._qk = {layer: (*rec.qk[layer][0], rec.block_sums[layer][0])
                        for layer in rec.qk}
        provider = self.provider(family, params)
        with torch.no_grad():
            return screen_masks([(provider(layer, q, k), bsum)
                                 for layer, (q, k, bsum) in sorted(self._qk.items())])
