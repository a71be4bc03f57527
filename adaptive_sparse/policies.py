"""Block scores -> BlockSparseMask: threshold, top-k, top-p (cumulative mass), density budgets.

Scores are `[B, H, Qb, Kb]`. By default they are logits: each query-block row is turned into a
probability distribution by a softmax over its causal blocks. With `scores_are_probs=True` they
are non-negative maps (e.g. `block_attention_maps`) and each row is divided by its sum.

Some blocks can be forced: the sink (key block 0), the diagonal (key blocks crossed by the causal
diagonal, `masks.diagonal_blocks`) and `local_blocks` more key blocks right before the diagonal.
Forced blocks count inside a budget: a top-k of 4 with sink and diagonal forced keeps those two
plus the two best others (a row keeps all its forced blocks even when they exceed the budget).
For top-p their probability mass counts toward p.

Budgets can vary per layer (`layer_schedule="linear"` multiplies the budget by a factor that
ramps from 1 at layer 0 to `layer_scale_end` at the last layer) and per head (`head_budgets`).
A budget multiplier f > 1 always means "keep more": top-k keeps ceil(k * f) blocks, density keeps
ceil(min(1, density * f) * allowed) blocks, top-p uses min(1, p * f), threshold uses tau / f.

Every result is causal and computed with vectorized torch ops (no Python loop over rows).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from adaptive_sparse.masks import BlockSparseMask, block_causal, diagonal_blocks, num_blocks

KINDS = ("threshold", "top_k", "top_p", "density")
LAYER_SCHEDULES = ("constant", "linear")

# slack for ceil() of float budgets and for the cumulative sums of top-p
_CEIL_EPS = 1e-9
_MASS_EPS = 1e-5


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Policy:
    """How block scores become a mask.

    kind: "threshold" (keep blocks whose row probability >= tau), "top_k" (k blocks per row),
        "top_p" (smallest set of blocks whose cumulative row probability reaches p), or
        "density" (per-row budget ceil(density * causal blocks in the row)).
    tau, k, p, density: the parameter of `kind` (the others stay None).
    keep_sink: force key block 0.  keep_diagonal: force the diagonal key blocks.
    local_blocks: force this many more key blocks right before the first diagonal block.
    layer_schedule: "constant" or "linear" (budget factor 1 at layer 0 -> layer_scale_end at the
        last layer).
    head_budgets: None, or one entry per head of the scores: floats are multipliers of the
        budget; ints are absolute blocks-per-row budgets (kinds "top_k" and "density" only;
        the layer factor still multiplies them).
    """

    kind: str
    tau: float | None = None
    k: int | None = None
    p: float | None = None
    density: float | None = None
    keep_sink: bool = True
    keep_diagonal: bool = True
    local_blocks: int = 0
    layer_schedule: str = "constant"
    layer_scale_end: float = 1.0
    head_budgets: list | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        param = {"threshold": "tau", "top_k": "k", "top_p": "p", "density": "density"}[self.kind]
        for name in ("tau", "k", "p", "density"):
            if name != param and getattr(self, name) is not None:
                raise ValueError(f"{name}: not a parameter of kind {self.kind!r} "
                                 f"(which takes {param}), got {getattr(self, name)!r}")
        val = getattr(self, param)
        if val is None:
            raise ValueError(f"{param}: required by kind {self.kind!r}")
        if self.kind == "threshold" and not (_is_real(val) and 0.0 <= val <= 1.0):
            raise ValueError(f"tau: expected a float in [0, 1], got {val!r}")
        if self.kind == "top_k" and not (_is_int(val) and val >= 1):
            raise ValueError(f"k: expected a positive int, got {val!r}")
        if self.kind in ("top_p", "density") and not (_is_real(val) and 0.0 < val <= 1.0):
            raise ValueError(f"{param}: expected a float in (0, 1], got {val!r}")
        for name in ("keep_sink", "keep_diagonal"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if not (_is_int(self.local_blocks) and self.local_blocks >= 0):
            raise ValueError(f"local_blocks: expected a non-negative int, "
                             f"got {self.local_blocks!r}")
        if self.layer_schedule not in LAYER_SCHEDULES:
            raise ValueError(f"layer_schedule: expected one of {LAYER_SCHEDULES}, "
                             f"got {self.layer_schedule!r}")
        if not (_is_real(self.layer_scale_end) and self.layer_scale_end > 0):
            raise ValueError(f"layer_scale_end: expected a positive float, "
                             f"got {self.layer_scale_end!r}")
        if self.head_budgets is not None:
            hb = self.head_budgets
            if isinstance(hb, torch.Tensor):
                hb = hb.tolist()
            if not isinstance(hb, (list, tuple)) or not hb \
                    or not all(_is_real(x) and x > 0 for x in hb):
                raise ValueError(f"head_budgets: expected a non-empty list of positive numbers, "
                                 f"got {self.head_budgets!r}")
            if len({_is_int(x) for x in hb}) > 1:
                raise ValueError("head_budgets: expected all ints (absolute budgets) or all "
                                 f"floats (multipliers), got {self.head_budgets!r}")
            if _is_int(hb[0]) and self.kind not in ("top_k", "density"):
                raise ValueError("head_budgets: int entries are blocks-per-row budgets, "
                                 f"valid for kinds 'top_k' and 'density', not {self.kind!r}")
            self.head_budgets = list(hb)

    def to_dict(self) -> dict:
        """A JSON-ready dict; `Policy.from_dict(p.to_dict()) == p`."""
        d = asdict(self)
        if d["head_budgets"] is not None:
            d["head_budgets"] = list(d["head_budgets"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        if not isinstance(d, dict):
            raise TypeError(f"policy: expected a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"policy: unknown keys {unknown}; "
                             f"expected a subset of {sorted(names)}")
        if "kind" not in d:
            raise ValueError("policy: expected a 'kind' key")
        return cls(**d)

    @classmethod
    def coerce(cls, policy) -> "Policy":
        """A Policy from a Policy or a dict (as read from JSON / YAML)."""
        if isinstance(policy, Policy):
            return policy
        if isinstance(policy, dict):
            return cls.from_dict(policy)
        raise TypeError(f"policy: expected a Policy or a dict, got {type(policy).__name__}")

    def layer_factor(self, layer_idx: int = 0, num_layers: int = 1) -> float:
        """Budget multiplier of layer `layer_idx` under the layer schedule."""
        if not (_is_int(num_layers) and num_layers >= 1):
            raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
        if not (_is_int(layer_idx) and 0 <= layer_idx < num_layers):
            raise ValueError(f"layer_idx: expected an int in [0, {num_layers}), got {layer_idx!r}")
        if self.layer_schedule == "constant" or num_layers == 1:
            return 1.0
        return 1.0 + (self.layer_scale_end - 1.0) * layer_idx / (num_layers - 1)

    def select(self, scores: torch.Tensor, *, q_len: int, kv_len: int, block_size: int,
               layer_idx: int = 0, num_layers: int = 1, scores_are_probs: bool = False,
               validate: bool = True) -> torch.Tensor:
        """The selected tiles, bool [B, H, Qb, Kb] (inside the causal region). See `to_mask`.

        No host-device sync happens here except the value checks of `validate`."""
        self.layer_factor(layer_idx, num_layers)  # checks layer_idx, num_layers first
        _check_scores(scores, q_len, kv_len, block_size, scores_are_probs, validate)
        H = scores.shape[1]
        dev = scores.device
        allowed = block_causal(q_len, kv_len, block_size, device=dev)  # [Qb, Kb]
        forced = forced_blocks(q_len, kv_len, block_size, keep_sink=self.keep_sink,
                               keep_diagonal=self.keep_diagonal,
                               local_blocks=self.local_blocks, device=dev)
        probs = row_probs(scores, allowed, scores_are_probs)  # [B, H, Qb, Kb]
        mult_host, absolute = self._multipliers(H, layer_idx, num_layers)
        # pageable host -> device copy with non_blocking: staged at once, no device sync
        mult = torch.tensor(mult_host, dtype=torch.float64).to(dev, non_blocking=True)  # [H]
        if self.kind == "threshold":
            tau = (self.tau / mult).to(probs.dtype)
            keep = probs >= tau[None, :, None, None]
        elif self.kind == "top_p":
            keep = _top_p(probs, allowed, forced, torch.clamp(mult * self.p, max=1.0))
        else:
            k_rows = self._k_rows(mult, allowed, absolute)  # [H, Qb]
            kmax = self._max_count(mult_host, absolute, allowed.shape[-1])
            keep = _top_count(probs, allowed, forced, k_rows[None], kmax)
        return (keep | forced) & allowed

    def _multipliers(self, heads: int, layer_idx: int, num_layers: int) -> tuple[list, bool]:
        """(per-head budget multipliers with the layer factor, whether the budgets are
        absolute), computed on the host."""
        factor = self.layer_factor(layer_idx, num_layers)
        hb = self.head_budgets
        if hb is not None and len(hb) != heads:
            raise ValueError(f"head_budgets: expected {heads} entries (one per head of scores), "
                             f"got {len(hb)}")
        absolute = hb is not None and _is_int(hb[0])
        return [float(x) * factor for x in (hb if hb is not None else [1.0] * heads)], absolute

    def _k_rows(self, mult: torch.Tensor, allowed: torch.Tensor, absolute: bool) -> torch.Tensor:
        """int64 [H, Qb] blocks-per-row budgets ("top_k" / "density") from float64 multipliers
        mult [H] and the causal region allowed [Qb, Kb] (on mult's device)."""
        H, qb = mult.shape[0], allowed.shape[0]
        if absolute:
            k_rows = torch.ceil(mult - _CEIL_EPS)[:, None].expand(H, qb)
        elif self.kind == "top_k":
            k_rows = torch.ceil(mult * self.k - _CEIL_EPS)[:, None].expand(H, qb)
        else:
            dens = torch.clamp(mult * self.density, max=1.0)  # [H]
            per_row = allowed.sum(-1).to(torch.float64)  # [Qb]
            k_rows = torch.ceil(dens[:, None] * per_row[None, :] - _CEIL_EPS)
        return k_rows.clamp_min(1).long()

    def row_budgets(self, *, q_len: int, kv_len: int, block_size: int, heads: int,
                    layer_idx: int = 0, num_layers: int = 1) -> torch.Tensor:
        """int64 [heads, Qb] on the CPU: the blocks each (head, query-block) row keeps under a
        "top_k" / "density" policy (forced blocks included, at least 1; a row keeps all its
        forced blocks even beyond it), exactly the budgets `select` uses. For callers that
        select on the device themselves (`scores_to_kv_indices(row_budgets=...)`)."""
        if self.kind not in ("top_k", "density"):
            raise ValueError(f"kind: expected 'top_k' or 'density' for row budgets, "
                             f"got {self.kind!r}")
        mult_host, absolute = self._multipliers(heads, layer_idx, num_layers)
        mult = torch.tensor(mult_host, dtype=torch.float64)
        return self._k_rows(mult, block_causal(q_len, kv_len, block_size), absolute)

    def prob_thresholds(self, *, heads: int, layer_idx: int = 0,
                        num_layers: int = 1) -> torch.Tensor:
        """float32 [heads] on the CPU: the row-probability threshold of each head under a
        "threshold" policy, exactly the values `select` compares the row probabilities with."""
        if self.kind != "threshold":
            raise ValueError(f"kind: expected 'threshold' for probability thresholds, "
                             f"got {self.kind!r}")
        mult_host, _ = self._multipliers(heads, layer_idx, num_layers)
        return (self.tau / torch.tensor(mult_host, dtype=torch.float64)).to(torch.float32)

    def _host_budget(self, m: float, absolute: bool, allowed: int) -> int:
        """Blocks a "top_k" / "density" row keeps under budget multiplier `m`, before clamping
        (`absolute`: `m` is itself the block count); `allowed` = the row's causal blocks."""
        if absolute:
            return math.ceil(m - _CEIL_EPS)
        if self.kind == "top_k":
            return math.ceil(m * self.k - _CEIL_EPS)
        return math.ceil(min(1.0, m * self.density) * allowed - _CEIL_EPS)

    def _max_count(self, mult_host: list, absolute: bool, kb: int) -> int:
        """Host-side upper bound of the per-row budgets of "top_k" / "density" (no sync): the
        largest multiplier applied to the largest row (a row holds at most Kb causal blocks)."""
        return max(1, min(self._host_budget(max(mult_host), absolute, kb), kb))

    def expected_blocks_per_row(self, *, q_len: int, kv_len: int, block_size: int,
                                layer_idx: int = 0, num_layers: int = 1,
                                heads: int | None = None) -> float | None:
        """Mean kept blocks per (head, query block) row that a "top_k" / "density" policy
        gives, computed on the host: exact for scores with no -inf among the causal blocks;
        None for "threshold" / "top_p", whose count depends on the scores. An autotuning hint
        (`BlockSparseMask.with_blocks_per_row`), not a bound."""
        if self.kind not in ("top_k", "density"):
            return None
        factor = self.layer_factor(layer_idx, num_layers)
        hb = self.head_budgets
        if hb is None:
            hb = [1.0] * (heads or 1)
        absolute = _is_int(hb[0])
        qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
        offset = kv_len - q_len
        rows = []  # (causal blocks, forced blocks) of each query-block row
        for r in range(qb):
            first = (r * block_size + offset) // block_size
            last = (min((r + 1) * block_size, q_len) - 1 + offset) // block_size
            forced = set(range(first, last + 1)) if self.keep_diagonal else set()
            forced |= set(range(max(0, first - self.local_blocks), first))
            forced |= {0} if self.keep_sink else set()
            rows.append((min(kb, last + 1), len({c for c in forced if c <= last})))
        total = 0.0
        for x in hb:
            m = float(x) * factor
            for allowed, n_forced in rows:
                k = self._host_budget(m, absolute, allowed)
                total += min(allowed, max(1, k, n_forced))
        return total / (len(hb) * qb)

    def to_mask(self, scores: torch.Tensor, *, q_len: int, kv_len: int, block_size: int,
                layer_idx: int = 0, num_layers: int = 1, scores_are_probs: bool = False,
                validate: bool = True) -> BlockSparseMask:
        """scores float [B, H, Qb, Kb] (logits, or non-negative maps with `scores_are_probs`)
        -> causal BlockSparseMask with the same B and H.

        layer_idx, num_layers: where this layer sits, for `layer_schedule="linear"`.
        validate=False skips the checks that read values (NaN / inf / negative scores; the
        mask's range checks, true by construction here), so the call never syncs with the
        device: for hot paths such as `GateProvider`. NaN scores then give an unspecified (but
        causal, valid) mask."""
        dense = self.select(scores, q_len=q_len, kv_len=kv_len, block_size=block_size,
                            layer_idx=layer_idx, num_layers=num_layers,
                            scores_are_probs=scores_are_probs, validate=validate)
        return BlockSparseMask.from_dense(dense, block_size=block_size, q_len=q_len,
                                          kv_len=kv_len, causal=True, validate=validate)


def _check_scores(scores, q_len, kv_len, block_size, scores_are_probs,
                  values: bool = True) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores: expected a torch.Tensor [B, H, Qb, Kb], "
                        f"got {type(scores).__name__}")
    if scores.dim() != 4:
        raise ValueError(f"scores: expected rank 4 [B, H, Qb, Kb], got shape {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        raise ValueError(f"scores: expected a floating dtype, got {scores.dtype}")
    for name, val in (("q_len", q_len), ("kv_len", kv_len), ("block_size", block_size)):
        if not (_is_int(val) and val >= 1):
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    if q_len > kv_len:
        raise ValueError(f"q_len: expected <= kv_len ({kv_len}) for a causal mask, got {q_len}")
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    if tuple(scores.shape[2:]) != (qb, kb):
        raise ValueError(f"scores: expected [B, H, {qb}, {kb}] (ceil(q_len / block_size), "
                         f"ceil(kv_len / block_size)), got shape {tuple(scores.shape)}")
    if scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ValueError(f"scores: expected B >= 1 and H >= 1, got shape {tuple(scores.shape)}")
    if not values:
        return
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores: expected no NaN values")
    if scores_are_probs:
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("scores: expected finite values with scores_are_probs=True, "
                             "found inf")
        if bool((scores < 0).any()):
            raise ValueError("scores: expected non-negative values with scores_are_probs=True")
    elif bool(torch.isposinf(scores).any()):
        raise ValueError("scores: expected finite logits or -inf, found +inf")


def row_probs(scores: torch.Tensor, allowed: torch.Tensor, scores_are_probs: bool = False):
    """Row distributions over the causal blocks: float [B, H, Qb, Kb], 0 outside `allowed`.

    Logits: softmax over allowed blocks (a row of all -inf gives zeros). Probabilities: divided
    by the row sum over allowed blocks (a zero row stays zero)."""
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.to(dtype)
    if scores_are_probs:
        p = torch.where(allowed, s, torch.zeros((), dtype=dtype, device=s.device))
        return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    return e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def forced_blocks(q_len: int, kv_len: int, block_size: int, *, keep_sink: bool = True,
                  keep_diagonal: bool = True, local_blocks: int = 0, device=None) -> torch.Tensor:
    """bool [Qb, Kb]: sink (key block 0), diagonal blocks, and `local_blocks` key blocks just
    before the first diagonal block of each row; all within the causal region."""
    allowed = block_causal(q_len, kv_len, block_size, device=device)
    out = torch.zeros_like(allowed)
    if keep_sink:
        out[:, 0] = True
    if keep_diagonal:
        out |= diagonal_blocks(q_len, kv_len, block_size, device=device)
    if local_blocks:
        qb, kb = allowed.shape
        first = (torch.arange(qb, device=device) * block_size + kv_len - q_len) // block_size
        cols = torch.arange(kb, device=device)
        out |= (cols[None, :] < first[:, None]) & (cols[None, :] >= first[:, None] - local_blocks)
    return out & allowed


def _top_count(probs, allowed, forced, k_rows, kmax: int):
    """Keep the k_rows[b|1, h, r] best blocks of each row, forced blocks ranked first.

    kmax: a host-side bound >= every k_rows entry (in [1, Kb]), so no sync reads k_rows."""
    key = torch.where(allowed, probs, torch.full_like(probs, -1.0))
    key = torch.where(forced, torch.full_like(probs, 2.0), key)
    idx = key.topk(kmax, dim=-1).indices  # [B, H, Qb, kmax]
    slot = torch.arange(kmax, device=probs.device) < k_rows[..., None]
    keep = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    keep.scatter_(-1, idx, slot.expand(idx.shape))
    return keep


def _top_p(probs, allowed, forced, p_head):
    """Smallest prefix (forced blocks first, then by descending probability) whose mass reaches
    p_head[h]; a row whose total mass is below p keeps every allowed block."""
    key = torch.where(allowed, probs, torch.full_like(probs, -1.0))
    key = torch.where(forced, probs + 2.0, key)
    order = key.argsort(dim=-1, descending=True)
    sp = torch.gather(probs, -1, order).to(torch.float64)
    before = torch.cumsum(sp, -1) - sp  # mass of the blocks ranked ahead
    slot = before < (p_head.to(torch.float64) - _MASS_EPS)[None, :, None, None]
    keep = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    keep.scatter_(-1, order, slot)
    return keep


def _plain(kind, name, value, scores, q_len, kv_len, block_size, keep_sink, keep_diagonal,
           local_blocks, scores_are_probs):
    pol = Policy(kind, **{name: value}, keep_sink=keep_sink, keep_diagonal=keep_diagonal,
                 local_blocks=local_blocks)
    return pol.to_mask(scores, q_len=q_len, kv_len=kv_len, block_size=block_size,
                       scores_are_probs=scores_are_probs)


def threshold_mask(scores: torch.Tensor, tau: float, *, q_len: int, kv_len: int,
                   block_size: int, keep_sink: bool = True, keep_diagonal: bool = True,
                   local_blocks: int = 0, scores_are_probs: bool = False) -> BlockSparseMask:
    """scores float [B, H, Qb, Kb] -> blocks with row probability >= tau (plus forced ones)."""
    return _plain("threshold", "tau", tau, scores, q_len, kv_len, block_size, keep_sink,
                  keep_diagonal, local_blocks, scores_are_probs)


def top_k_mask(scores: torch.Tensor, k: int, *, q_len: int, kv_len: int, block_size: int,
               keep_sink: bool = True, keep_diagonal: bool = True, local_blocks: int = 0,
               scores_are_probs: bool = False) -> BlockSparseMask:
    """scores float [B, H, Qb, Kb] -> k blocks per row, forced blocks counted inside k."""
    return _plain("top_k", "k", k, scores, q_len, kv_len, block_size, keep_sink,
                  keep_diagonal, local_blocks, scores_are_probs)


def top_p_mask(scores: torch.Tensor, p: float, *, q_len: int, kv_len: int, block_size: int,
               keep_sink: bool = True, keep_diagonal: bool = True, local_blocks: int = 0,
               scores_are_probs: bool = False) -> BlockSparseMask:
    """scores float [B, H, Qb, Kb] -> per row, the smallest set (forced blocks first) whose
    cumulative probability reaches p."""
    return _plain("top_p", "p", p, scores, q_len, kv_len, block_size, keep_sink,
                  keep_diagonal, local_blocks, scores_are_probs)


def density_mask(scores: torch.Tensor, density: float, *, q_len: int, kv_len: int,
                 block_size: int, keep_sink: bool = True, keep_diagonal: bool = True,
                 local_blocks: int = 0, scores_are_probs: bool = False) -> BlockSparseMask:
    """scores float [B, H, Qb, Kb] -> per row the ceil(density * causal blocks) best blocks."""
    return _plain("density", "density", density, scores, q_len, kv_len, block_size, keep_sink,
                  keep_diagonal, local_blocks, scores_are_probs)


def calibrate_to_density(screen, make, lo: float, hi: float, target: float, *,
                         integer: bool = False, log: bool = False, iters: int = 8):
    """(make(x), density) for the knob x in [lo, hi] whose density `screen(make(x))` is closest
    to `target` (ties: the sparser), by bisection on a knob whose growth raises the density.

    A threshold's density falls as tau grows: bisect on 1 / tau, e.g.
    `calibrate_to_density(screen, lambda x: Policy(kind="threshold", tau=1 / x), 1, 1e7, 0.1,
    log=True, iters=16)`. `log` halves geometrically (lo > 0), `integer` on integers (it stops
    once hi - lo <= 1). Each knob value is screened once; every screened value is a candidate.
    """
    if not (_is_real(lo) and _is_real(hi)) or not lo < hi or (log and lo <= 0):
        raise ValueError(f"lo, hi: expected finite numbers lo < hi (lo > 0 with log), "
                         f"got {lo!r}, {hi!r}")
    if not _is_real(target) or target <= 0:
        raise ValueError(f"target: expected a positive density, got {target!r}")
    if not _is_int(iters) or iters < 1:
        raise ValueError(f"iters: expected an int >= 1, got {iters!r}")
    seen: dict = {}

    def density(x):
        if x not in seen:
            seen[x] = float(screen(make(x)))
        return seen[x]

    a, b = lo, hi
    for _ in range(iters):
        if integer and b - a <= 1:
            break
        mid = (a + b) // 2 if integer else (math.sqrt(a * b) if log else (a + b) / 2)
        if density(mid) < target:
            a = mid
        else:
            b = mid
    density(a), density(b)
    best = min(seen, key=lambda x: (abs(seen[x] - target), seen[x]))
    return make(best), seen[best]


def nearest_to_densities(screen, candidates, targets) -> dict:
    """target -> (candidate, its screen result) of the candidate whose `screen(candidate)
    ["density"]` is closest to each target (ties: the sparser). Each candidate is screened once;
    for settings on a grid rather than a monotone knob (see `calibrate_to_density`)."""
    candidates = list(candidates)
    if not candidates:
        raise ValueError("candidates: expected at least one, got none")
    screened = [(float(s["density"]), c, s) for c in candidates for s in (screen(c),)]
    out = {}
    for t in targets:
        _, c, s = min(screened, key=lambda x: (abs(x[0] - t), x[0]))
        out[t] = (c, s)
    return out
