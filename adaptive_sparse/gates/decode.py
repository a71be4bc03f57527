"""Decode gates: which KV-cache blocks each new token reads.

The decode gate of a layer works on what the KV cache holds: keys *after* rotary embedding.
K side: each cache block of `block_size` tokens is pooled (max / min / avg, configurable) and
projected once per KV head, `kg = cat(poolings) @ wk[h]` [gate_dim]; `DecodeKeyCache` does this
incrementally as the cache grows (a block is pooled and projected once, when it fills; only the
partial last block is redone per token, at most `block_size` tokens). Q side: the new token's
query heads of one GQA group are concatenated and projected, `qg = cat(q[h*G:(h+1)*G]) @ wq[h]`.
The score of block j is `qg . kg_j / sqrt(gate_dim)`: one selection per KV head, shared by its
query group, which is what the split-KV decode kernel reads. The "identity" init makes the score
the mean attention logit of the block over the group (q . mean(k) = mean(q . k)).

On CUDA a decode step's gate work for a layer (the last block's key features, the query
projection, the scores and a top-k) is one Triton launch, `DecodeGate.fused_select`
(`adaptive_sparse.attention.triton.decode_gate`), with no host sync; the eager path above is its
reference and serves the other policies.

Budgets are `adaptive_sparse.policies.Policy` on a one-row score map (q_len 1): "top_k" blocks,
a token budget (`token_budget_policy`), "threshold" and "top_p" on the row's softmax, "density";
`keep_sink` forces block 0 and `keep_diagonal` the block of the new token (`local_blocks` more
recent ones).

Training-free selection after Quest (Tang et al. 2024): `block_key_bounds` keeps per cache block
the elementwise min and max of its keys (`DecodeBoundsCache`, incrementally like the key
features: a block's bounds are computed once, when it fills), and `bounds_scores` scores block j
for a query q by sum_d max(q_d * kmax_j[d], q_d * kmin_j[d]), an upper bound of q . k over the
block's keys that reads 2 vectors per block instead of its keys; the group's query heads are
combined by their max (logits) or their mean softmax over the blocks (probabilities).
`DecodeProvider(decode="bounds")` selects with it under the same policies, no gates needed.

Training distills the dense attention of decode-position queries: for a query at position p the
target is the mass of its group's attention (mean over the group's heads) on each complete block
before p's block, renormalized; the loss is KL(target || softmax(scores)) over those blocks (p's
own block is forced at inference). `train_decode_gates` runs it on a live model with plain
PyTorch (the model frozen, gates of all layers trained together).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch
from torch import nn

from adaptive_sparse.errors import fail
from adaptive_sparse.gates.network import (
    GateConfig,
    GateShape,
    _identity_init,
    _positive_int,
    model_shapes,
    pool_blocks,
)
from adaptive_sparse.masks import SUPPORTED_BLOCK_SIZES, BlockSparseMask, num_blocks
from adaptive_sparse.policies import Policy

DECODE_GATES_FORMAT = "adaptive-sparse-decode-gates"
DECODE_GATES_VERSION = 1


@dataclass
class DecodeGateConfig(GateShape):
    """Shapes and options of a decode gate set (JSON-serializable through `to_dict`)."""

    k_pooling: tuple[str, ...] = ("max", "min", "avg")
    init: str = "identity"

    def __post_init__(self):
        # the fields shared with the prefill gates' config, validated by it
        shared = GateConfig(**dataclasses.asdict(self), use_rotary=False)
        self.gate_dim, self.k_pooling = shared.gate_dim, shared.k_pooling

    @classmethod
    def from_model(cls, model, **options) -> "DecodeGateConfig":
        s = model_shapes(model)
        return cls(num_layers=s["num_layers"], num_heads=s["num_heads"],
                   num_kv_heads=s["num_kv_heads"], head_dim=s["head_dim"], **options)


class DecodeGate(nn.Module):
    """The decode gate of one layer: wq [Hkv, G * D, gate_dim], wk [Hkv, Pk * D, gate_dim]."""

    def __init__(self, config: DecodeGateConfig):
        super().__init__()
        c = config
        self.config = c
        self.wq = nn.Parameter(torch.empty(c.num_kv_heads, c.group_size * c.head_dim, c.gate_dim))
        self.wk = nn.Parameter(torch.empty(c.num_kv_heads, len(c.k_pooling) * c.head_dim,
                                           c.gate_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.config
        with torch.no_grad():
            if c.init == "identity":  # score = the group's mean attention logit of the block
                self.wq.copy_(_identity_init(c.num_kv_heads, ("avg",), c.head_dim, c.group_size))
                self.wk.copy_(_identity_init(c.num_kv_heads, c.k_pooling, c.head_dim, 1))
            else:  # N(0, 1 / fan_in)
                self.wq.normal_(0.0, self.wq.shape[1] ** -0.5)
                self.wk.normal_(0.0, self.wk.shape[1] ** -0.5)

    def pooled_keys(self, k: torch.Tensor) -> torch.Tensor:
        """k [B, Hkv, L, D] -> pooled features [B, Hkv, ceil(L / bs), Pk * D] (parameters' dtype;
        a partial last block pools its tokens only)."""
        c = self.config
        pooled = pool_blocks(k.to(self.wk.dtype), c.block_size, c.k_pooling)
        return torch.cat([pooled[p] for p in c.k_pooling], dim=-1)

    def project_keys(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, Kb, Pk * D] -> kg [B, Hkv, Kb, gate_dim]."""
        return torch.einsum("bhkf,hfo->bhko", feats, self.wk)

    def project_queries(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, N, D] (post-rotary) -> qg [B, Hkv, N, gate_dim], 1/sqrt(gate_dim) folded in."""
        c = self.config
        B, _, N, D = q.shape
        qc = q.to(self.wq.dtype).view(B, c.num_kv_heads, c.group_size, N, D)
        qc = qc.permute(0, 1, 3, 2, 4).reshape(B, c.num_kv_heads, N, c.group_size * D)
        return torch.einsum("bhnf,hfo->bhno", qc, self.wq) / math.sqrt(c.gate_dim)

    def scores(self, q: torch.Tensor, kg: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, N, D], kg [B, Hkv, Kb, gate_dim] -> logits [B, Hkv, N, Kb]."""
        return torch.matmul(self.project_queries(q), kg.transpose(-1, -2))

    @torch.no_grad()
    def fused_select(self, q: torch.Tensor, k: torch.Tensor, kg: torch.Tensor, *, top_k: int,
                     keep_sink: bool = True, keep_diagonal: bool = True, local_blocks: int = 0,
                     cache_seqlens: torch.Tensor | None = None, out=None):
        """The whole per-token step in one Triton launch (`attention.triton.decode_gate`):
        q [B, Hq, (1,) D] the new token's queries, k [B, Hkv, M, D] the cache (new key
        included), kg fp32 [B, Hkv, cap >= ceil(M / bs), gate_dim] the projected features of
        the earlier blocks (the last block's row is rewritten). Equal to `scores` on
        `DecodeKeyCache.update(k)` then `select_decode_blocks` under a "top_k" policy of
        `top_k` blocks (ties to the lower block). Returns (kv_num_blocks int32 [B, Hkv],
        kv_indices int32 [B, Hkv, min(top_k, blocks)] ascending). No host sync."""
        from adaptive_sparse.attention.triton.decode_gate import decode_gate_select

        c = self.config
        return decode_gate_select(q, k, self.wq, self.wk, kg, top_k=top_k,
                                  block_size=c.block_size, poolings=c.k_pooling,
                                  q_scale=1.0 / math.sqrt(c.gate_dim),
                                  cache_seqlens=cache_seqlens, keep_sink=keep_sink,
                                  keep_diagonal=keep_diagonal, local_blocks=local_blocks,
                                  out=out)


class DecodeGateSet(nn.ModuleList):
    """One `DecodeGate` per layer."""

    def __init__(self, config: DecodeGateConfig):
        if not isinstance(config, DecodeGateConfig):
            raise fail("config", "a DecodeGateConfig", type(config).__name__, cls=TypeError)
        super().__init__([DecodeGate(config) for _ in range(config.num_layers)])
        self.config = config


class _BlockCache:
    """Per-block features [B, Hkv, ceil(M / bs), F] of one layer's KV cache, kept in step with
    the cache (the incremental contract of `DecodeKeyCache` and `DecodeBoundsCache`).

    `update(k)` with the whole cache k [B, Hkv, M, D]: a call whose cache is the previous one
    plus one token computes only the block that filled (if any) and the partial last block;
    anything else (a new prompt, a different batch, a changed `_key`) recomputes from the given
    cache once and counts `recomputes`. The buffer grows by powers of two. Subclasses give
    `_key(k)`, `_layout(k)` (feature width, dtype) and `_features(part)`."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.recomputes = 0  # full recomputations (one per prompt)
        self.reset()

    def reset(self) -> None:
        self.buf = None  # [B, Hkv, capacity, F]
        self.length = 0
        self.full = 0  # blocks computed from complete blocks
        self.key = None

    def _key(self, k: torch.Tensor) -> tuple:
        return (k.shape[0], k.shape[1], k.device)

    def _continues(self, k: torch.Tensor) -> bool:
        return self._key(k) == self.key and k.shape[2] == self.length + 1

    def _ensure(self, k: torch.Tensor, blocks: int) -> None:
        if self.buf is None or self.buf.shape[2] < blocks:
            width, dtype = self._layout(k)
            cap = max(16, 1 << (blocks - 1).bit_length())
            new = torch.empty(k.shape[0], k.shape[1], cap, width, dtype=dtype, device=k.device)
            if self.buf is not None:
                new[:, :, :self.full] = self.buf[:, :, :self.full]
            self.buf = new

    @torch.no_grad()
    def update(self, k: torch.Tensor) -> torch.Tensor:
        bs, M = self.block_size, k.shape[2]
        if not self._continues(k):
            self.reset()
            self.key = self._key(k)
            self.recomputes += 1
        nb, full = num_blocks(M, bs), M // bs
        self._ensure(k, nb)
        if full > self.full:  # blocks that filled since the last call: computed once
            self.buf[:, :, self.full:full] = self._features(k[:, :, self.full * bs:full * bs])
            self.full = full
        if nb > full:  # the partial last block (at most bs tokens)
            self.buf[:, :, full:nb] = self._features(k[:, :, full * bs:])
        self.length = M
        return self.buf[:, :, :nb]

    def advance(self, k: torch.Tensor) -> torch.Tensor:
        """For a fused step that writes the last block's features itself
        (`DecodeGate.fused_select`, `decode_bounds_select`): the whole buffer
        [B, Hkv, capacity, F] with every block before the last one of k [B, Hkv, M, D] current.
        A call that continues the cache by one token only grows the buffer (no launch);
        anything else recomputes through `update`."""
        M = k.shape[2]
        if not self._continues(k):
            self.update(k)
        else:
            self._ensure(k, num_blocks(M, self.block_size))
            self.full, self.length = M // self.block_size, M
        return self.buf


class DecodeKeyCache(_BlockCache):
    """Projected key-block features of one layer's KV cache, kept in step with the cache.

    `update(k)` with the whole cache k [B, Hkv, M, D] returns kg [B, Hkv, ceil(M / bs), gd]. A
    call whose cache is the previous one plus one token pools and projects only the block that
    filled (if any) and the partial last block; anything else (a new prompt, a different batch)
    recomputes from the given cache once. Gate weights changed in place are noticed (their
    version) and trigger a recompute."""

    def __init__(self, gate: DecodeGate):
        self.gate = gate
        super().__init__(gate.config.block_size)

    def _key(self, k):
        return (*super()._key(k), self.gate.wk._version, self.gate.wk.data_ptr())

    def _layout(self, k):
        return self.gate.wk.shape[-1], self.gate.wk.dtype

    def _features(self, part):
        return self.gate.project_keys(self.gate.pooled_keys(part))


def block_key_bounds(k: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k [B, Hkv, M, D] (post-rotary keys) -> (kmin, kmax) [B, Hkv, ceil(M / bs), D] in k's
    dtype: the elementwise min and max of each block's stored keys (a partial last block
    bounds its real tokens only)."""
    if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.shape[2] < 1:
        raise fail("k", "a tensor [B, Hkv, M >= 1, D]", getattr(k, "shape", type(k).__name__))
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise fail("block_size", f"one of {SUPPORTED_BLOCK_SIZES}", block_size)
    pooled = pool_blocks(k, block_size, ("min", "max"))
    return pooled["min"], pooled["max"]


class DecodeBoundsCache(_BlockCache):
    """`block_key_bounds` of one layer's KV cache, kept in step with it (`DecodeKeyCache`'s
    incremental contract: one token more redoes the block that filled and the partial last
    block; anything else recomputes once). `update(k)` with the whole cache k [B, Hkv, M, D]
    returns (kmin, kmax) [B, Hkv, ceil(M / bs), D] in k's dtype, views of one buffer
    [B, Hkv, capacity, 2 * D]."""

    def _key(self, k):
        return (*super()._key(k), k.shape[3], k.dtype)

    def _layout(self, k):
        return 2 * k.shape[3], k.dtype

    def _features(self, part):
        return torch.cat(block_key_bounds(part, self.block_size), dim=-1)

    def update(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        D = k.shape[3]
        b = super().update(k)
        return b[..., :D], b[..., D:]

    def advance(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`_BlockCache.advance` as (kmin, kmax) [B, Hkv, capacity, D] views (for
        `decode_bounds_select`, which writes the last block's rows)."""
        D = k.shape[3]
        b = super().advance(k)
        return b[..., :D], b[..., D:]


BOUNDS_COMBINES = ("max", "mean_prob")


def bounds_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, *,
                  scale: float | None = None, combine: str = "max") -> torch.Tensor:
    """Quest scores of the cache blocks: q [B, Hq, N, D] (post-rotary), kmin / kmax
    [B, Hkv, Kb, D] (`block_key_bounds`) -> fp32 [B, Hkv, N, Kb].

    For query head h * G + g of KV head h, u[g, j] = scale * sum_d max(q_d * kmax_j[d],
    q_d * kmin_j[d]) (= scale * (relu(q) . kmax_j - relu(-q) . kmin_j)), computed in fp32: an
    upper bound of scale * q . k over block j's keys, equal to it for a one-token block. scale:
    D ** -0.5 by default. combine "max": score_j = max_g u[g, j] (logits); "mean_prob": score_j
    = mean_g softmax_j(u[g, :]) (probabilities over the row's blocks: a policy must then be
    told `scores_are_probs`)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise fail("q", "a tensor [B, Hq, N, D]", getattr(q, "shape", type(q).__name__))
    for name, t in (("kmin", kmin), ("kmax", kmax)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != q.shape[0] \
                or t.shape[3] != q.shape[3] or q.shape[1] % max(1, t.shape[1]) \
                or t.shape != kmin.shape:
            raise fail(name, f"a tensor [B={q.shape[0]}, Hkv dividing {q.shape[1]}, Kb, "
                       f"D={q.shape[3]}] (kmin and kmax alike)",
                       getattr(t, "shape", type(t).__name__))
    if combine not in BOUNDS_COMBINES:
        raise fail("combine", f"one of {BOUNDS_COMBINES}", combine)
    B, Hq, N, D = q.shape
    Hkv = kmin.shape[1]
    if scale is None:
        scale = D ** -0.5
    elif not isinstance(scale, (int, float)) or not scale > 0:
        raise fail("scale", "a positive float or None", scale)
    qf = q.float().view(B, Hkv, Hq // Hkv, N, D)
    u = torch.einsum("bhgnd,bhkd->bhgnk", qf.clamp_min(0), kmax.float()) \
        + torch.einsum("bhgnd,bhkd->bhgnk", qf.clamp_max(0), kmin.float())
    u = u * scale  # [B, Hkv, G, N, Kb]
    if combine == "max":
        return u.amax(2)
    return torch.softmax(u, dim=-1).mean(2)


def token_budget_policy(tokens: int, block_size: int, **options) -> Policy:
    """A "top_k" Policy keeping ceil(tokens / block_size) blocks per row (forced ones
    included)."""
    _positive_int("tokens", tokens)
    return Policy(kind="top_k", k=-(-tokens // block_size), **options)


def select_decode_blocks(scores: torch.Tensor, policy: Policy, *, kv_len: int, block_size: int,
                         layer_idx: int = 0, num_layers: int = 1,
                         scores_are_probs: bool = False) -> BlockSparseMask:
    """scores [B, Hkv, Kb] (logits of one new token per sequence; probabilities with
    `scores_are_probs`) -> BlockSparseMask with q_len 1, kv_len `kv_len` and heads Hkv (what the
    decode kernel reads). No device sync.

    A "top_k" / "density" policy whose budget is the same for every head takes a direct path
    (one top-k and one sort of each row on the device, no host tensor and no sync, meant for
    CUDA-graph capture); other policies go through `Policy.to_mask`. Both give the same
    mask."""
    B, H, kb = scores.shape
    if policy.kind in ("top_k", "density"):
        budgets = policy.row_budgets(q_len=1, kv_len=kv_len, block_size=block_size, heads=H,
                                     layer_idx=layer_idx, num_layers=num_layers)[:, 0]
        if bool((budgets == budgets[0]).all()):
            return _top_k_mask(scores, int(budgets[0]), policy, kv_len, block_size)
    return policy.to_mask(scores[:, :, None], q_len=1, kv_len=kv_len, block_size=block_size,
                          layer_idx=layer_idx, num_layers=num_layers,
                          scores_are_probs=scores_are_probs, validate=False)


def uniform_top_k(policy: Policy, *, kv_len: int, block_size: int, layer_idx: int = 0,
                  num_layers: int = 1) -> int | None:
    """Blocks per row of a decode step under `policy` when every KV head keeps the same
    number ("top_k" / "density" without head budgets: `Policy.row_budgets`, forced blocks
    included, at most the cache's blocks), computed on the host; None for the other
    policies."""
    if policy.kind not in ("top_k", "density") or policy.head_budgets is not None:
        return None
    k = int(policy.row_budgets(q_len=1, kv_len=kv_len, block_size=block_size, heads=1,
                               layer_idx=layer_idx, num_layers=num_layers)[0, 0])
    return _budget(k, policy, num_blocks(kv_len, block_size))


def _budget(k: int, policy: Policy, kb: int) -> int:
    """A row's kept-block count: budget k, never fewer than the forced blocks, at most kb."""
    lo = max(0, kb - 1 - policy.local_blocks)
    n_forced = len(set(range(lo, kb - 1)) | ({0} if policy.keep_sink else set())
                   | ({kb - 1} if policy.keep_diagonal else set()))
    return min(kb, max(k, n_forced, 1))


def _top_k_mask(scores, k: int, policy: Policy, kv_len: int, block_size: int):
    """The k best blocks of each row, sink / recent blocks forced (kept even beyond k)."""
    B, H, kb = scores.shape
    lo = max(0, kb - 1 - policy.local_blocks)
    k = _budget(k, policy, kb)
    cols = torch.arange(kb, device=scores.device)
    forced = (cols >= lo) & (cols < kb - 1)  # built on the device: no host copy
    if policy.keep_sink:
        forced |= cols == 0
    if policy.keep_diagonal:
        forced |= cols == kb - 1
    s = scores.float().masked_fill(forced, float("inf"))
    top = s.topk(k, dim=-1).indices  # [B, H, k]
    picked = torch.zeros(B, H, kb, dtype=torch.bool, device=s.device).scatter_(-1, top, True)
    order = torch.sort(cols + kb * (~picked).long(), dim=-1).values % kb  # picked first, ascending
    num = torch.full((B, H, 1), k, dtype=torch.int32, device=s.device)
    return BlockSparseMask._trusted(num, order.to(torch.int32)[:, :, None], block_size, 1,
                                    kv_len, True, float(k))


def decode_block_mass(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, *,
                      block_size: int, scale: float | None = None) -> torch.Tensor:
    """The distillation target. q [B, Hq, N, D] queries at absolute positions [N] (post-rotary),
    k [B, Hkv, M, D] the keys; each query sees keys <= its position. Returns float32
    [B, Hkv, N, Kb]: the attention mass on each key block, averaged over the group's heads
    (rows sum to 1)."""
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    s = torch.einsum("bhgnd,bhmd->bhgnm", q.float().view(B, Hkv, G, N, D), k.float()) * scale
    visible = torch.arange(M, device=q.device)[None, :] <= positions[:, None]  # [N, M]
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1).mean(2)  # [B, Hkv, N, M]
    kb = num_blocks(M, block_size)
    p = nn.functional.pad(p, (0, kb * block_size - M))
    return p.view(B, Hkv, N, kb, block_size).sum(-1)


def decode_distill_loss(gate: DecodeGate, q: torch.Tensor, k: torch.Tensor,
                        positions: torch.Tensor, target: torch.Tensor | None = None):
    """KL(target || softmax(gate scores)) over the complete blocks before each query's block.

    q [B, Hq, N, D] at positions [N] (each >= block_size), k [B, Hkv, M, D]; target as from
    `decode_block_mass` (computed when None). Returns a scalar (mean over rows)."""
    bs = gate.config.block_size
    if target is None:
        target = decode_block_mass(q, k, positions, block_size=bs)
    kb = target.shape[-1]
    cand = torch.arange(kb, device=q.device)[None, :] < (positions // bs)[:, None]  # [N, Kb]
    kg = gate.project_keys(gate.pooled_keys(k[:, :, :kb * bs]))[:, :, :kb]
    logits = gate.scores(q, kg).masked_fill(~cand, float("-inf"))  # [B, Hkv, N, Kb]
    t = target * cand
    t = t / t.sum(-1, keepdim=True).clamp_min(1e-12)
    logp = torch.log_softmax(logits.float(), -1)
    kl = torch.where(t > 0, t * (torch.log(t.clamp_min(1e-30)) - logp), 0.0).sum(-1)
    return kl.mean()


def record_qk(model, ids: torch.Tensor, *, block_size: int = 64) -> dict:
    """{layer: (q [B, Hq, N, D], k [B, Hkv, N, D])} post-rotary, from one dense forward pass."""
    from adaptive_sparse.models.attention import sparse_attention
    from adaptive_sparse.models.providers import RecordingProvider

    rec = RecordingProvider(block_size=block_size, qk=True, last_only=True, device=None)
    with torch.no_grad(), sparse_attention(model, rec, block_size=block_size):
        model(ids)
    return {layer: kept[0] for layer, kept in rec.qk.items()}


def model_step(model, ids: torch.Tensor, cache=None, *, logits_to_keep: int = 1):
    """One forward of ids [B, N] after the KV cache `cache` (None: a new one) ->
    (logits [B, logits_to_keep, V], the cache). The cache argument is `cache` in transformers
    5.x and `past_key_values` before; the one the model's forward takes is used."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"
    out = model(input_ids=ids, use_cache=True, logits_to_keep=logits_to_keep,
                **({} if cache is None else {name: cache}))
    return out.logits, out["cache"] if "cache" in out else out.past_key_values


def train_decode_gates(model, sequences: torch.Tensor, gates: DecodeGateSet | None = None, *,
                       steps: int = 50, lr: float = 1e-3, queries: int = 16,
                       block_size: int = 64, batch_size: int = 1, seed: int = 0,
                       log_every: int = 0) -> tuple[DecodeGateSet, list[float]]:
    """Distill decode gates for every layer of `model` (frozen) from its dense attention.

    sequences: LongTensor [S, N] token ids (N > block_size). Each step takes `batch_size`
    sequences, records the layers' q/k in one dense pass and scores `queries` random decode
    positions in [block_size, N). Returns (gates, per-step mean loss over layers)."""
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
        raise fail("sequences", "a LongTensor [S, N]", getattr(sequences, "shape", sequences))
    S, N = sequences.shape
    if N <= block_size:
        raise fail("sequences", f"length > block_size={block_size}", N)
    for name in ("steps", "queries", "batch_size"):
        _positive_int(name, locals()[name])
    if gates is None:
        gates = DecodeGateSet(DecodeGateConfig.from_model(model, block_size=block_size))
    if gates.config.block_size != block_size:
        raise fail("block_size", f"{gates.config.block_size} (that of the gates)", block_size)
    device = next(model.parameters()).device
    gates.to(device).train()
    opt = torch.optim.Adam(gates.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for step in range(steps):
        rows = torch.randint(0, S, (batch_size,), generator=gen)
        qk = record_qk(model, sequences[rows].to(device), block_size=block_size)
        pos = torch.randint(block_size, N, (queries,), generator=gen).sort().values.to(device)
        opt.zero_grad()
        losses = []
        for layer, (q, k) in sorted(qk.items()):
            loss = decode_distill_loss(gates[layer], q[:, :, pos], k, pos)
            loss.backward()
            losses.append(float(loss.detach()))
        opt.step()
        history.append(sum(losses) / len(losses))
        if log_every and step % log_every == 0:
            print(f"step {step}: decode-gate KL {history[-1]:.4f}", flush=True)
    return gates.eval(), history


def save_decode_gates(gates: DecodeGateSet, path) -> str:
    """One safetensors file (config in its metadata), written atomically; returns its sha256."""
    from adaptive_sparse.io import atomic_save_tensors

    meta = {"format": DECODE_GATES_FORMAT, "version": str(DECODE_GATES_VERSION),
            "config": json.dumps(gates.config.to_dict())}
    return atomic_save_tensors(path, gates.state_dict(), metadata=meta)


def load_decode_gates(path, *, map_location="cpu") -> DecodeGateSet:
    """The gates written by `save_decode_gates` (format, version and tensor shapes checked)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(map_location)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != DECODE_GATES_FORMAT \
                or meta.get("version") != str(DECODE_GATES_VERSION):
            raise fail("path", f"a {DECODE_GATES_FORMAT} v{DECODE_GATES_VERSION} file",
                       f"format {meta.get('format')!r} v{meta.get('version')!r} in {path}")
        state = {name: f.get_tensor(name) for name in f.keys()}
    gates = DecodeGateSet(DecodeGateConfig.from_dict(json.loads(meta["config"])))
    want = {n: tuple(t.shape) for n, t in gates.state_dict().items()}
    got = {n: tuple(t.shape) for n, t in state.items()}
    if want != got:
        raise fail("path", f"tensors {want}", f"{got} in {path}")
    gates.load_state_dict(state)
    return gates.eval()


DECODE_MODES = ("dense", "gate", "oracle", "bounds")


class DecodeProvider:
    """A provider for `adaptive_sparse.models.sparse_attention` that serves prefill and decode.

    prefill: a provider for calls with more than one query (None: dense prefill).
    decode: for one-query calls, "dense" (None), "gate" (the decode gates' selection under
        `policy`, key features kept by a `DecodeKeyCache` per layer), "bounds" (training-free:
        `bounds_scores` of the keys' per-block min / max, kept by a `DecodeBoundsCache` per
        layer, under `policy`) or "oracle" (the true attention mass of the new token's group
        per block under `policy`: a quality bound that reads the whole cache).
    bounds_combine: with decode="bounds", how a KV head's group of query heads is combined
        (`bounds_scores`' combine): "max" (logits) or "mean_prob" (probabilities).
    policy: a `Policy` (or its dict); `token_budget_policy` gives a token budget.
    block_size: the cache block size of the decode selection (default: the gates', else 64);
        pass the same to `sparse_attention`.
    num_layers: the model's layer count, for a policy with a "linear" layer schedule (the gates'
        count when given).
    fast: with decode="gate" (fp32 gates) or "bounds" (combine "max"), run each decode step's
        last-block features, scoring and a uniform top-k (`uniform_top_k`) as one Triton launch
        per layer (`DecodeGate.fused_select`, `decode_bounds_select`); None: on CUDA tensors.
        Other policies take the eager path.
    `selected_blocks` / `total_blocks` (device tensors, no sync) count the decode selections."""

    def __init__(self, policy=None, *, gates: DecodeGateSet | None = None, prefill=None,
                 decode: str = "gate", block_size: int | None = None,
                 num_layers: int | None = None, fast: bool | None = None,
                 bounds_combine: str = "max"):
        if decode not in DECODE_MODES:
            raise fail("decode", f"one of {DECODE_MODES}", decode)
        if bounds_combine not in BOUNDS_COMBINES:
            raise fail("bounds_combine", f"one of {BOUNDS_COMBINES}", bounds_combine)
        if decode != "dense":
            policy = Policy.coerce(policy) if policy is not None else None
            if policy is None:
                raise fail("policy", f"a Policy for decode={decode!r}", policy)
        if decode == "gate" and not isinstance(gates, DecodeGateSet):
            raise fail("gates", "a DecodeGateSet for decode='gate'", type(gates).__name__,
                       cls=TypeError)
        if prefill is not None and not callable(prefill):
            raise fail("prefill", "a provider callable or None", type(prefill).__name__,
                       cls=TypeError)
        self.policy, self.gates, self.prefill, self.decode = policy, gates, prefill, decode
        if block_size is None:
            block_size = gates.config.block_size if gates is not None else 64
        if block_size not in SUPPORTED_BLOCK_SIZES or (gates is not None
                                                       and block_size != gates.config.block_size):
            raise fail("block_size", f"one of {SUPPORTED_BLOCK_SIZES} (that of the gates when "
                       "given)", block_size)
        self.block_size = block_size
        self.bounds_combine = bounds_combine
        # per layer: the gates' key features, or the key bounds (made on a layer's first call)
        self.caches = {} if gates is None else {i: DecodeKeyCache(g) for i, g in enumerate(gates)}
        self.num_layers = len(gates) if gates is not None else num_layers
        self.fast = fast
        self.selected_blocks = self.total_blocks = 0

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor):
        if self.decode == "bounds" and layer_idx not in self.caches:
            self.caches[layer_idx] = DecodeBoundsCache(self.block_size)
        if q.shape[2] > 1:
            if self.decode in ("gate", "bounds"):
                self.caches[layer_idx].update(k)  # the prompt's blocks, pooled once
            return self.prefill(layer_idx, q, k) if self.prefill is not None else None
        if self.decode == "dense":
            return None
        M, bs = k.shape[2], self.block_size
        num_layers = self.num_layers or layer_idx + 1  # only a "linear" layer schedule needs it
        with torch.no_grad():
            top_k = None
            if (q.is_cuda if self.fast is None else self.fast) and self._fusable(layer_idx):
                top_k = uniform_top_k(self.policy, kv_len=M, block_size=bs,
                                      layer_idx=layer_idx, num_layers=num_layers)
            # one launch: the last block's features, the scores, the selection
            mask = self._fused(layer_idx, q, k, top_k) if top_k is not None else None
            if mask is None and self.decode == "gate":
                kg = self.caches[layer_idx].update(k)
                scores = self.gates[layer_idx].scores(q, kg)[:, :, 0]  # [B, Hkv, Kb]
                mask = select_decode_blocks(scores, self.policy, kv_len=M, block_size=bs,
                                            layer_idx=layer_idx, num_layers=num_layers)
            elif mask is None and self.decode == "bounds":
                kmin, kmax = self.caches[layer_idx].update(k)
                scores = bounds_scores(q, kmin, kmax, combine=self.bounds_combine)[:, :, 0]
                mask = select_decode_blocks(scores, self.policy, kv_len=M, block_size=bs,
                                            layer_idx=layer_idx, num_layers=num_layers,
                                            scores_are_probs=self.bounds_combine == "mean_prob")
            elif mask is None:
                pos = torch.full((1,), M - 1, device=q.device)
                mass = decode_block_mass(q, k, pos, block_size=bs)  # [B, Hkv, 1, Kb]
                mask = self.policy.to_mask(mass, q_len=1, kv_len=M, block_size=bs,
                                           layer_idx=layer_idx, num_layers=num_layers,
                                           scores_are_probs=True, validate=False)
        self.selected_blocks = self.selected_blocks + mask.kv_num_blocks.sum()
        self.total_blocks += mask.kv_num_blocks.numel() * num_blocks(M, bs)
        return mask

    def _fusable(self, layer_idx: int) -> bool:
        """Whether this layer's selection has a one-launch step: the decode gates with fp32
        weights, or the bounds combined by max."""
        if self.decode == "gate":
            return self.gates[layer_idx].wk.dtype == torch.float32
        return self.decode == "bounds" and self.bounds_combine == "max"

    def _fused(self, layer_idx: int, q, k, top_k: int) -> BlockSparseMask | None:
        """The fused step's mask (`DecodeGate.fused_select` or `decode_bounds_select`); None
        when the automatic fast path (fast=None) could not launch (said once in a warning; the
        eager path serves from then on)."""
        p, M = self.policy, k.shape[2]
        forced = dict(top_k=top_k, keep_sink=p.keep_sink, keep_diagonal=p.keep_diagonal,
                      local_blocks=p.local_blocks)
        try:
            if self.decode == "gate":
                num, idx = self.gates[layer_idx].fused_select(
                    q, k, self.caches[layer_idx].advance(k), **forced)
            else:
                from adaptive_sparse.attention.triton.decode_bounds import decode_bounds_select

                kmin, kmax = self.caches[layer_idx].advance(k)
                num, idx = decode_bounds_select(q, k, kmin, kmax, block_size=self.block_size,
                                                **forced)
        except Exception as e:  # noqa: BLE001 - only the automatic choice falls back
            if self.fast is not None:
                raise
            import warnings
            warnings.warn(f"DecodeProvider: the fused decode-{self.decode} step failed "
                          f"({type(e).__name__}: {e}); using the eager path", RuntimeWarning,
                          stacklevel=3)
            self.fast = False
            for cache in self.caches.values():  # recomputed from the cache by the eager path
                cache.reset()
            return None
        return BlockSparseMask._trusted(num[:, :, None], idx[:, :, None], self.block_size, 1, M,
                                        True, float(top_k))

    def decode_density(self) -> float | None:
        """Mean share of the cache blocks the decode steps read (None before any)."""
        if not self.total_blocks:
            return None
        return float(self.selected_blocks) / self.total_blocks


class SplitBatchProvider:
    """Several decode providers over one batch: rows p * B .. p * B + B - 1 are served by
    `providers[p]` (a batch of B sequences repeated once per provider, e.g. by
    `cache.reorder_cache(torch.arange(B).repeat(P))`), so one decode step measures P budgets.

    Each provider sees only its rows (its own key cache and counters); the masks are stacked,
    kv_indices padded to the widest (entries past kv_num_blocks are never read), a provider's
    None (dense) becoming every block. Prefill calls (more than one query) must be dense
    (every provider returns None)."""

    def __init__(self, providers, *, block_size: int = 64):
        providers = list(providers)
        if not providers or not all(callable(p) for p in providers):
            raise fail("providers", "a non-empty list of provider callables", providers,
                       cls=TypeError)
        if block_size not in SUPPORTED_BLOCK_SIZES:
            raise fail("block_size", f"one of {SUPPORTED_BLOCK_SIZES}", block_size)
        self.providers, self.block_size = providers, block_size

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor):
        P = len(self.providers)
        B, Hkv, M = q.shape[0] // P, k.shape[1], k.shape[2]
        if B * P != q.shape[0]:
            raise fail("q", f"a batch divisible by the {P} providers", q.shape[0])
        masks = [p(layer_idx, q[i * B:(i + 1) * B], k[i * B:(i + 1) * B])
                 for i, p in enumerate(self.providers)]
        if all(m is None for m in masks):
            return None
        if q.shape[2] != 1:
            raise fail("q", "one query per sequence (a decode step) for sparse providers",
                       f"{q.shape[2]} queries")
        kb = num_blocks(M, self.block_size)
        width = max(kb if m is None else m.kv_indices.shape[-1] for m in masks)
        nums, idxs = [], []
        for m in masks:
            if m is None:
                num = torch.full((B, Hkv, 1), kb, dtype=torch.int32, device=q.device)
                idx = torch.arange(kb, dtype=torch.int32, device=q.device).expand(B, Hkv, 1, kb)
            else:
                if m.block_size != self.block_size:
                    raise fail("providers", f"masks of block_size {self.block_size}",
                               m.block_size)
                num = m.kv_num_blocks.expand(B, Hkv, 1)
                idx = m.kv_indices.expand(B, Hkv, 1, m.kv_indices.shape[-1])
            nums.append(num)
            idxs.append(nn.functional.pad(idx, (0, width - idx.shape[-1])))
        return BlockSparseMask._trusted(torch.cat(nums).contiguous(), torch.cat(idxs).contiguous(),
                                        self.block_size, 1, M, True, None)
