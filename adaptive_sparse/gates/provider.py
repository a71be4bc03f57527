"""Gates on a live model: pre-rotary Q/K capture, gate checkpoints, and the mask provider.

`QKCapture` installs forward hooks on every attention module's `q_proj` / `k_proj` (or
`q_norm` / `k_norm` where the model normalizes heads) and keeps the latest pre-rotary
`q [B, Hq, N, D]` and `k [B, Hkv, N, D]` per layer; nothing of the modeling code is copied.
`GateProvider` is a provider for `adaptive_sparse.models.sparse_attention`: called with
`(layer_idx, q, k)` (post-rotary) it scores the captured pre-rotary tensors with the layer's gate
and turns the scores into a `BlockSparseMask` through `Policy.to_mask` (the reference path, used
on CPU) or, on CUDA, through `Gate.fast_scores` and the one-launch Triton selection
`scores_to_kv_indices` (same masks; see `GateProvider`), optionally replayed from a CUDA graph.

Gate checkpoints (save_gates / load_gates): `adaptive_sparse/gates/checkpoint.py`.
"""

from __future__ import annotations

import logging
import os

import torch

from adaptive_sparse.errors import fail as _fail
from adaptive_sparse.gates.checkpoint import load_gates
from adaptive_sparse.gates.network import GateSet, check_model_shapes, gate_tables, model_shapes
from adaptive_sparse.masks import BlockSparseMask, num_blocks

log = logging.getLogger(__name__)


def attention_modules(model) -> list:
    """The model's attention modules (those with q_proj and k_proj), ordered by layer index."""
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    if not mods:
        raise _fail("model", "attention modules with q_proj and k_proj", type(model).__name__)
    if all(isinstance(getattr(m, "layer_idx", None), int) for m in mods):
        mods.sort(key=lambda m: m.layer_idx)
    return mods


class QKCapture:
    """Forward hooks that keep each layer's latest pre-rotary q [B, Hq, N, D], k [B, Hkv, N, D].

    Use as a context manager or call `remove()`. `on_capture(layer_idx, which, tensor)`, if
    given, is called for every captured tensor ("q" or "k") and may store a reduced form; the
    raw tensor is then not kept."""

    def __init__(self, model, on_capture=None):
        shapes = model_shapes(model)
        self.head_dim = shapes["head_dim"]
        self.heads = {"q": shapes["num_heads"], "k": shapes["num_kv_heads"]}
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.on_capture = on_capture
        self._handles = []
        for idx, attn in enumerate(attention_modules(model)):
            for which in ("q", "k"):
                src = getattr(attn, f"{which}_norm", None)
                if not isinstance(src, torch.nn.Module):
                    src = getattr(attn, f"{which}_proj")
                self._handles.append(src.register_forward_hook(self._hook(idx, which)))

    def _heads_first(self, x: torch.Tensor, inp, which: str) -> bool:
        """Whether a 4-D q/k norm output is [B, H, N, D] (norm after the transpose, e.g.
        Gemma-3) rather than [B, N, H, D] (norm before it, e.g. Qwen3). By the head count where
        it tells; when N equals it, by the norm input's strides (a transposed view has
        stride(1) < stride(2))."""
        h = self.heads[which]
        if x.shape[1] == h and x.shape[2] != h:
            return True
        if x.shape[2] == h and x.shape[1] != h:
            return False
        if isinstance(inp, torch.Tensor) and inp.dim() == 4 and inp.shape == x.shape:
            return inp.stride(1) < inp.stride(2)
        return False

    def _hook(self, layer_idx: int, which: str):
        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            B, N = x.shape[0], x.shape[1]
            if x.dim() == 4 and self._heads_first(x, args[0] if args else None, which):
                x = x.detach()  # already [B, H, N, D]
            else:
                x = x.detach().reshape(B, N, -1, self.head_dim).transpose(1, 2)  # [B, H, N, D]
            if self.on_capture is not None:
                self.on_capture(layer_idx, which, x)
            else:
                getattr(self, which)[layer_idx] = x
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _as_policy(policy):
    from adaptive_sparse.policies import Policy

    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, dict):
        return Policy.from_dict(policy)
    raise _fail("policy", "an adaptive_sparse.policies.Policy or its dict", type(policy).__name__)


_CACHE_LIMIT = 4096


class _Hint:
    """A (layer, lengths, heads) key's measured mean kept blocks per row: `value` (None until
    the first measurement landed), the pinned int64 total of kv_num_blocks in flight, its
    CUDA event and element count."""

    __slots__ = ("value", "total", "event", "count", "pending")

    def __init__(self):
        self.value = None
        self.total = torch.empty((), dtype=torch.int64, pin_memory=True)
        self.event = torch.cuda.Event()
        self.count = 1
        self.pending = False


class GateProvider:
    """Mask provider backed by a gate set: `provider(layer_idx, q, k) -> BlockSparseMask`.

    gate_set: GateSet (or a directory saved by `save_gates`); policy: Policy or its dict;
    model: the base model, on which the pre-rotary capture hooks are installed (`attach`).
    q [B, Hq, N, D] and k [B, Hkv, M, D] are the post-rotary tensors the attention sees; only
    their lengths are used. With a KV cache (M > N), the pre-rotary keys of earlier calls are
    kept per layer, so decoding steps are scored against the whole cache.

    fast: None (default) takes the fast path when the gates are on CUDA, True always (on CPU
    tensors it needs TRITON_INTERPRET=1; for tests), False never. The fast path caches per
    length everything that does not depend on the inputs (rotary tables at block positions,
    block-causal region, per-row budgets), scores with `Gate.fast_scores` and, for "top_k",
    "density" and "threshold" policies, selects with `scores_to_kv_indices` in one launch: the
    same kept blocks as `Policy.to_mask`, except in rows whose boundary scores tie (to float32
    rounding, where a top-k keeps every tied block). "top_p", and a threshold with a row floor
    or tail rows (`Policy.kernel_form` None), go through `Policy.to_mask`.
    cuda_graphs: per (layer, batch, length) of a prefill (N == M), pool q and k in one launch
    each straight from the captured tensors into small static float32 buffers, then replay a
    CUDA graph (captured on the layer's second call) of the projections, rotary and block
    scores into a static score buffer, and select eagerly in one launch into fresh outputs (a
    length seen once stays eager; eager when capture fails, when `keep_scores` is set, inside
    an outer capture, without a `kernel_form`, or for gates not in float32). The graph's
    inputs are the pooled features, so no q/k copy is paid at any length; static buffers are
    shared by the layers of one shape (replays run one after another on one stream). None
    (default) = on whenever the fast path runs on CUDA.
    Autotune hint without a sync: a threshold (or top-p) mask's mean kept blocks per row is
    not known on the host; the provider hands the attention kernel the mean of the same
    (layer, lengths)'s previous call (read from pinned memory once its 8-byte copy has landed;
    it picks a kernel config, never a result), so only a key's first call waits for the
    device (`hint_syncs` counts those waits).
    The policy and the gate weights are read when a length is first seen: assign
    `provider.policy` to change the policy (caches are dropped); changing gate weights in place
    is detected."""

    def __init__(self, gate_set, policy, model=None, *, fast: bool | None = None,
                 cuda_graphs: bool | None = None):
        if isinstance(gate_set, (str, os.PathLike)):
            gate_set = load_gates(gate_set, model)
        if not isinstance(gate_set, GateSet):
            raise _fail("gate_set", "a GateSet or a gate directory", type(gate_set).__name__)
        for name, val in (("fast", fast), ("cuda_graphs", cuda_graphs)):
            if val is not None and not isinstance(val, bool):
                raise _fail(name, "None or a bool", val)
        self.gate_set = gate_set.eval()
        self.fast = fast
        self.cuda_graphs = cuda_graphs
        self.capture = None
        self._k_hist: dict[int, torch.Tensor] = {}
        self.last_scores: dict[int, torch.Tensor] = {}
        self.keep_scores = False
        self._graph_pool = None
        self.hint_syncs = 0
        self.policy = policy
        if model is not None:
            self.attach(model)

    @property
    def policy(self):
        return self._policy

    @policy.setter
    def policy(self, policy) -> None:
        self._policy = _as_policy(policy)
        self.clear_caches()

    def clear_caches(self) -> None:
        """Drop every per-length table and captured CUDA graph."""
        self._bpr: dict[tuple, float | None] = {}
        self._gate_tables: dict[tuple, object] = {}
        self._select_args: dict[tuple, dict] = {}
        self._graphs: dict[tuple, tuple | None] = {}
        self._seen: set[tuple] = set()
        self._static: dict[tuple, tuple] = {}
        self._hints: dict[tuple, _Hint] = {}

    def attach(self, model) -> "GateProvider":
        self.detach()
        check_model_shapes(self.gate_set.config, model)
        self.capture = QKCapture(model)
        return self

    def detach(self) -> None:
        if self.capture is not None:
            self.capture.remove()
            self.capture = None
        self._k_hist.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    def _keys(self, layer_idx: int, kv_len: int) -> torch.Tensor:
        new = self.capture.k[layer_idx]
        prev = self._k_hist.get(layer_idx)
        if new.shape[2] == kv_len:
            full = new
        elif prev is not None and prev.shape[2] + new.shape[2] == kv_len:
            full = torch.cat([prev, new], dim=2)
        else:
            raise _fail("k", f"kv_len {kv_len} matching the captured keys "
                        f"({0 if prev is None else prev.shape[2]} cached + {new.shape[2]} new)",
                        kv_len)
        self._k_hist[layer_idx] = full
        return full

    def _inputs(self, layer_idx: int, q_len: int, kv_len: int):
        """The captured pre-rotary (q [B, Hq, N, D], k [B, Hkv, M, D]) of `layer_idx`, on the
        gates' device."""
        if self.capture is None:
            raise _fail("model", "attach(model) before calling the provider", None)
        if layer_idx not in self.capture.q:
            raise _fail("layer_idx", "a layer whose q/k were captured in this forward", layer_idx)
        q_pre = self.capture.q[layer_idx]
        if q_pre.shape[2] != q_len:
            raise _fail("q", f"q_len {q_pre.shape[2]} (captured pre-rotary queries)", q_len)
        k_pre = self._keys(layer_idx, kv_len)
        dev = self.gate_set[layer_idx].wq.device
        return q_pre.to(dev), k_pre.to(dev)

    @torch.no_grad()
    def scores(self, layer_idx: int, q_len: int, kv_len: int) -> torch.Tensor:
        """Gate scores float32 [B, H, Qb, Kb] for the captured tensors of `layer_idx` (the
        reference path: `Gate.forward`)."""
        q_pre, k_pre = self._inputs(layer_idx, q_len, kv_len)
        return self.gate_set[layer_idx](q_pre, k_pre)

    def _blocks_per_row(self, layer_idx: int, q_len: int, kv_len: int, heads: int):
        """The policy's host-side mean blocks per row (None when it depends on the scores),
        cached per (layer, lengths, heads)."""
        c = self.gate_set.config
        key = (layer_idx, q_len, kv_len, heads)
        if key not in self._bpr:
            if len(self._bpr) > _CACHE_LIMIT:
                self._bpr.clear()
            self._bpr[key] = self.policy.expected_blocks_per_row(
                q_len=q_len, kv_len=kv_len, block_size=c.block_size, layer_idx=layer_idx,
                num_layers=c.num_layers, heads=heads)
        return self._bpr[key]

    def _use_fast(self) -> bool:
        if self.fast is not None:
            return self.fast
        return self.gate_set[0].wq.is_cuda

    @torch.no_grad()
    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor):
        """The layer's mask, built without any host-device sync: the policy's value checks
        are skipped (the scores come from the gate, the mask is valid by construction), and
        the mean blocks per row is handed to the triton backend from the host
        (`BlockSparseMask.with_blocks_per_row`), not read back: computed from the policy for
        top-k / density, the previous call's measurement for threshold / top-p (see the
        class; only a key's first call waits).
        Reference path (`Gate.forward` + `Policy.to_mask`) or fast path: see the class."""
        q_len, kv_len = q.shape[2], k.shape[2]
        c = self.gate_set.config
        if self._use_fast():
            mask = self._fast_mask(layer_idx, q_len, kv_len)
            if mask.kv_num_blocks.device != q.device:
                mask = BlockSparseMask._trusted(
                    mask.kv_num_blocks.to(q.device), mask.kv_indices.to(q.device),
                    c.block_size, q_len, kv_len, True)
        else:
            scores = self.scores(layer_idx, q_len, kv_len).to(q.device)
            if self.keep_scores:
                self.last_scores[layer_idx] = scores
            mask = self.policy.to_mask(scores, q_len=q_len, kv_len=kv_len,
                                       block_size=c.block_size, layer_idx=layer_idx,
                                       num_layers=c.num_layers, validate=False)
        if mask.kv_num_blocks.is_cuda and mask.blocks_per_row is None:
            bpr = self._blocks_per_row(layer_idx, q_len, kv_len, mask.heads)
            if bpr is None and q_len > 1:  # decode steps (N == 1) take no hint
                bpr = self._measured_hint((layer_idx, q_len, kv_len, mask.heads),
                                          mask.kv_num_blocks)
            if bpr is not None:
                mask = mask.with_blocks_per_row(bpr)
        return mask

    def _measured_hint(self, key: tuple, num: torch.Tensor) -> float | None:
        """The autotune hint of a mask whose kept count the host does not know: the mean of
        `num` (int32 [B, H, Qb]) measured on this key's previous call. A new measurement (one
        sum, an 8-byte copy to pinned memory, an event) is queued whenever the last one has
        landed; the first call of a key waits for its own (one sync, as the kernel's
        `mean_blocks_per_row` would). None inside a CUDA-graph capture."""
        if torch.cuda.is_current_stream_capturing():
            return None
        entry = self._hints.get(key)
        if entry is None:
            if len(self._hints) > _CACHE_LIMIT:
                self._hints.clear()
            entry = self._hints[key] = _Hint()
        if entry.pending and entry.event.query():
            entry.value, entry.pending = int(entry.total) / entry.count, False
        if not entry.pending:
            entry.total.copy_(num.sum(dtype=torch.int64), non_blocking=True)
            entry.event.record(torch.cuda.current_stream(num.device))
            entry.count, entry.pending = max(1, num.numel()), True
        if entry.value is None:
            entry.event.synchronize()
            self.hint_syncs += 1
            entry.value, entry.pending = int(entry.total) / entry.count, False
        return entry.value

    def _fast_mask(self, layer_idx: int, q_len: int, kv_len: int) -> BlockSparseMask:
        q_pre, k_pre = self._inputs(layer_idx, q_len, kv_len)
        bs = self.gate_set.config.block_size
        graphs = self.cuda_graphs is not False
        if graphs and q_pre.is_cuda and q_len == kv_len and not self.keep_scores \
                and self.policy.kernel_form is not None \
                and self.gate_set[layer_idx].wq.dtype == torch.float32 \
                and not torch.cuda.is_current_stream_capturing():
            num, idx = self._graphed(layer_idx, q_pre, k_pre)
            return BlockSparseMask._trusted(num, idx, bs, q_len, kv_len, True)
        if self.policy.kernel_form is None:  # top-p, or a threshold with a floor / tail rows
            scores = self._fast_scores(layer_idx, q_pre, k_pre, causal_fill=True)
            c = self.gate_set.config
            return self.policy.to_mask(scores, q_len=q_len, kv_len=kv_len, block_size=bs,
                                       layer_idx=layer_idx, num_layers=c.num_layers,
                                       validate=False)
        num, idx = self._select(layer_idx, q_pre, k_pre)
        return BlockSparseMask._trusted(num, idx, bs, q_len, kv_len, True)

    def _tables(self, layer_idx: int, q_len: int, kv_len: int):
        """`gate_tables` of these lengths on the layer gate's device and dtype (cached)."""
        gate = self.gate_set[layer_idx]
        key = (q_len, kv_len, gate.wq.device, gate.wq.dtype)
        tables = self._gate_tables.get(key)
        if tables is None:
            if len(self._gate_tables) > _CACHE_LIMIT:
                self._gate_tables.clear()
            tables = self._gate_tables[key] = gate_tables(
                self.gate_set.config, q_len, kv_len, device=key[2], dtype=key[3])
        return tables

    def _fast_scores(self, layer_idx: int, q_pre, k_pre, *, causal_fill: bool):
        tables = self._tables(layer_idx, q_pre.shape[2], k_pre.shape[2])
        scores = self.gate_set[layer_idx].fast_scores(q_pre, k_pre, tables,
                                                      causal_fill=causal_fill)
        if self.keep_scores:
            if not causal_fill:
                scores = scores.masked_fill(~tables.allowed, float("-inf"))
            self.last_scores[layer_idx] = scores
        return scores

    def _select(self, layer_idx: int, q_pre, k_pre):
        """(kv_num_blocks int32 [B, H, Qb], kv_indices int32 [B, H, Qb, Kb]) of a "top_k",
        "density" or "threshold" policy: fast scores + one `scores_to_kv_indices` launch."""
        scores = self._fast_scores(layer_idx, q_pre, k_pre, causal_fill=False)
        return self._select_scores(layer_idx, scores, q_pre.shape[2], k_pre.shape[2])

    def _select_scores(self, layer_idx: int, scores, q_len: int, kv_len: int):
        from adaptive_sparse.attention.triton.gate import scores_to_kv_indices

        key = (layer_idx, q_len, kv_len, scores.shape[1], scores.device)
        args = self._select_args.get(key)
        if args is None:
            if len(self._select_args) > _CACHE_LIMIT:
                self._select_args.clear()
            args = self._select_args[key] = self.selection_args(*key)
        return scores_to_kv_indices(scores, **args)

    def selection_args(self, layer_idx: int, q_len: int, kv_len: int, heads: int,
                       device) -> dict:
        """Keyword arguments of `scores_to_kv_indices` that reproduce `Policy.to_mask` for this
        layer and these lengths (a policy with a `kernel_form`)."""
        p, c = self.policy, self.gate_set.config
        where = dict(heads=heads, layer_idx=layer_idx, num_layers=c.num_layers)
        args = dict(q_len=q_len, kv_len=kv_len, block_size=c.block_size, causal=True,
                    keep_sink=p.keep_sink, keep_diagonal=p.keep_diagonal,
                    local_blocks=p.local_blocks)
        if p.kind == "threshold":
            args["prob_threshold"] = p.prob_thresholds(**where).to(device, non_blocking=True)
        else:
            budgets = p.row_budgets(q_len=q_len, kv_len=kv_len, block_size=c.block_size, **where)
            kb = (kv_len + c.block_size - 1) // c.block_size
            args["row_budgets"] = budgets.clamp(max=kb).to(torch.int32).to(
                device, non_blocking=True)
        return args

    @staticmethod
    def _weights_key(gate) -> tuple:
        return (gate.wq._version, gate.wk._version, gate.wq.data_ptr(), gate.wk.data_ptr())

    def _graphed(self, layer_idx: int, q_pre, k_pre):
        """`_select` with the scores from a CUDA graph keyed by (layer, shapes, device): q and
        k pooled eagerly into the static inputs (two launches), the graph replayed (scores
        into the static score buffer), then the selection launched eagerly (fresh outputs:
        nothing to clone)."""
        gate = self.gate_set[layer_idx]
        key = (layer_idx, tuple(q_pre.shape), tuple(k_pre.shape), q_pre.device)
        entry = self._graphs.get(key)
        if entry is not None and entry[0] != self._weights_key(gate):
            del self._graphs[key]  # gate weights changed in place: capture again
            entry = None
        if entry is None:
            if key in self._graphs:  # capture failed before: eager
                return self._select(layer_idx, q_pre, k_pre)
            if len(self._graphs) > 512 or len(self._seen) > _CACHE_LIMIT:
                self._graphs.clear()
                self._seen.clear()
                self._static.clear()
            if key not in self._seen:  # a length seen once (variable lengths) stays eager
                self._seen.add(key)
                return self._select(layer_idx, q_pre, k_pre)
            entry = self._graphs[key] = self._capture(layer_idx, q_pre, k_pre)
            if entry is None:
                return self._select(layer_idx, q_pre, k_pre)
        _, graph, (sq, sk, scores), _ = entry
        gate.pool(q_pre, k_pre, out=(sq, sk))
        graph.replay()
        return self._select_scores(layer_idx, scores, q_pre.shape[2], k_pre.shape[2])

    def _capture(self, layer_idx: int, q_pre, k_pre):
        """(weights key, graph, static (qcat, kcat, scores), the tables it reads) or None when
        capture fails. The static buffers are shared by every layer of the same shapes."""
        c, gate = self.gate_set.config, self.gate_set[layer_idx]
        B, q_len, kv_len = q_pre.shape[0], q_pre.shape[2], k_pre.shape[2]
        qb, kb = num_blocks(q_len, c.block_size), num_blocks(kv_len, c.block_size)
        shapes = ((B, c.num_heads, qb, len(c.q_pooling) * c.head_dim),
                  (B, c.num_kv_heads, kb, len(c.k_pooling) * c.head_dim),
                  (B, c.gate_heads, qb, kb))
        skey = (shapes, q_pre.device)
        if skey not in self._static:
            self._static[skey] = tuple(torch.empty(s, dtype=torch.float32, device=q_pre.device)
                                       for s in shapes)
        sq, sk, scores = self._static[skey]
        tables = self._tables(layer_idx, q_len, kv_len)
        current = torch.cuda.current_stream(q_pre.device)
        side = torch.cuda.Stream(device=q_pre.device)
        try:
            gate.pool(q_pre, k_pre, out=(sq, sk))
            gate.scores_from_pooled(sq, sk, tables, causal_fill=False, out=scores)  # warm-up
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            side.wait_stream(current)
            with torch.cuda.stream(side):  # torch.cuda.graph without its gc / empty_cache
                graph.capture_begin(pool=self._graph_pool)
                try:
                    gate.scores_from_pooled(sq, sk, tables, causal_fill=False, out=scores)
                finally:
                    graph.capture_end()
            current.wait_stream(side)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager
            log.warning("GateProvider: CUDA graph capture failed for layer %d (%s); "
                        "running eagerly", layer_idx, exc)
            return None
        return self._weights_key(gate), graph, (sq, sk, scores), tables
