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
ramps from 1 at layer 0 to `layer_scale_end` at the last layer), per head (`head_budgets`: one
entry per head, or a table of one row per layer, e.g. from `BudgetCalibrator`) and per query row
(`tail_scale` multiplies the budget of the last `tail_blocks` query blocks of every call: the
rows that the next token is generated from, and every decoding step's one row). A budget
multiplier f > 1 always means "keep more": top-k keeps ceil(k * f) blocks, density keeps
ceil(min(1, density * f) * allowed) blocks, top-p uses min(1, p * f), threshold uses tau / f.
`min_blocks` is a floor: every row keeps at least its `min_blocks` best blocks (forced ones
included), whatever the policy. All of these count in a mask's density like any kept block.

`BudgetCalibrator` measures, on calibration text, each (layer, head)'s curve of attention
recall against density under a method's ranking and allocates one global budget by equal
marginal gain (water-filling), as a per-layer, per-head `head_budgets` table.

Every result is causal and computed with vectorized torch ops (no Python loop over rows).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from adaptive_sparse.masks import BlockSparseMask, block_causal, diagonal_blocks, num_blocks

KINDS = ("threshold", "top_k", "top_p", "density")
LAYER_SCHEDULES = ("constant", "linear")
CALIBRATION_KINDS = ("threshold", "density")

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
    head_budgets: None, or one entry per head of the scores, or one such list per layer (a
        [num_layers][heads] table; then `num_layers` must match it): floats are multipliers of
        the budget; ints are absolute blocks-per-row budgets (kinds "top_k" and "density" only;
        the layer factor still multiplies them).
    min_blocks: every row keeps at least this many blocks, its best ones (forced blocks
        included; at most the row's causal blocks).
    tail_blocks, tail_scale: the last `tail_blocks` query blocks of each call (a decoding
        step's single row included) have their budget multiplied by `tail_scale`.
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
    min_blocks: int = 0
    tail_blocks: int = 0
    tail_scale: float = 1.0

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
        for name in ("min_blocks", "tail_blocks"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name}: expected a non-negative int, "
                                 f"got {getattr(self, name)!r}")
        if not (_is_real(self.tail_scale) and self.tail_scale > 0):
            raise ValueError(f"tail_scale: expected a positive float, got {self.tail_scale!r}")
        if self.tail_scale != 1.0 and self.tail_blocks == 0:
            raise ValueError(f"tail_scale: has no effect without tail_blocks >= 1, "
                             f"got tail_scale {self.tail_scale!r} with tail_blocks 0")
        if self.head_budgets is not None:
            self.head_budgets = _check_head_budgets(self.head_budgets, self.kind)

    def to_dict(self) -> dict:
        """A JSON-ready dict; `Policy.from_dict(p.to_dict()) == p`."""
        d = asdict(self)
        hb = d["head_budgets"]
        if hb is not None:
            d["head_budgets"] = [list(r) for r in hb] if self.per_layer_heads else list(hb)
        return d

    @property
    def per_layer_heads(self) -> bool:
        """Whether `head_budgets` is a per-layer table ([num_layers][heads])."""
        return self.head_budgets is not None and isinstance(self.head_budgets[0], list)

    @property
    def kernel_form(self) -> str | None:
        """How a one-launch selection kernel (`scores_to_kv_indices`) reproduces this policy:
        "row_budgets" (`row_budgets`: "top_k", "density"), "prob_thresholds"
        (`prob_thresholds`: a "threshold" policy with one threshold per head, no `min_blocks`
        floor and no tail rows), or None (select with `select` / `to_mask`)."""
        if self.kind in ("top_k", "density"):
            return "row_budgets"
        if self.kind == "threshold" and not self.min_blocks and not self.tail_blocks:
            return "prob_thresholds"
        return None

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
        rs = self.row_scale(allowed.shape[0], device=dev)  # [Qb]
        kb = allowed.shape[-1]
        if self.kind == "threshold":
            tau = (self.tau / (mult[:, None] * rs[None, :])).to(probs.dtype)  # [H, Qb]
            keep = probs >= tau[None, :, :, None]
        elif self.kind == "top_p":
            p_rows = torch.clamp(mult[:, None] * rs[None, :] * self.p, max=1.0)  # [H, Qb]
            keep = _top_p(probs, allowed, forced, p_rows)
        else:
            k_rows = self._k_rows(mult, allowed, absolute)  # [H, Qb]
            kmax = self._max_count(mult_host, absolute, kb)
            keep = _top_count(probs, allowed, forced, k_rows[None], kmax)
        if self.min_blocks and self.kind in ("threshold", "top_p"):
            m = min(self.min_blocks, kb)
            floor = torch.full((1, 1, 1), m, dtype=torch.long, device=dev)
            keep = keep | _top_count(probs, allowed, forced, floor, m)
        return (keep | forced) & allowed

    def _multipliers(self, heads: int, layer_idx: int, num_layers: int) -> tuple[list, bool]:
        """(per-head budget multipliers with the layer factor, whether the budgets are
        absolute), computed on the host."""
        factor = self.layer_factor(layer_idx, num_layers)
        hb = self._head_entries(layer_idx, num_layers)
        if hb is not None and len(hb) != heads:
            raise ValueError(f"head_budgets: expected {heads} entries (one per head of scores), "
                             f"got {len(hb)}")
        absolute = hb is not None and _is_int(hb[0])
        return [float(x) * factor for x in (hb if hb is not None else [1.0] * heads)], absolute

    def _head_entries(self, layer_idx: int, num_layers: int) -> list | None:
        """The head_budgets entries of layer `layer_idx` (None without head budgets)."""
        hb = self.head_budgets
        if hb is None or not self.per_layer_heads:
            return hb
        if len(hb) != num_layers:
            raise ValueError(f"head_budgets: expected {num_layers} rows (one per layer, "
                             f"num_layers {num_layers}), got {len(hb)}")
        return hb[layer_idx]

    def row_scale(self, qb: int, device=None, dtype=torch.float64) -> torch.Tensor:
        """[Qb] budget multipliers of the query-block rows: `tail_scale` on the last
        `tail_blocks` rows, 1 elsewhere."""
        rs = torch.ones(qb, dtype=dtype, device=device)
        if self.tail_blocks:
            rs[max(0, qb - self.tail_blocks):] = self.tail_scale
        return rs

    def _k_rows(self, mult: torch.Tensor, allowed: torch.Tensor, absolute: bool) -> torch.Tensor:
        """int64 [H, Qb] blocks-per-row budgets ("top_k" / "density") from float64 multipliers
        mult [H] and the causal region allowed [Qb, Kb] (on mult's device)."""
        m = mult[:, None] * self.row_scale(allowed.shape[0], device=mult.device)[None, :]
        if absolute:
            k_rows = torch.ceil(m - _CEIL_EPS)
        elif self.kind == "top_k":
            k_rows = torch.ceil(m * self.k - _CEIL_EPS)
        else:
            dens = torch.clamp(m * self.density, max=1.0)  # [H, Qb]
            per_row = allowed.sum(-1).to(torch.float64)  # [Qb]
            k_rows = torch.ceil(dens * per_row[None, :] - _CEIL_EPS)
        return k_rows.clamp_min(max(1, self.min_blocks)).long()

    def row_budgets(self, *, q_len: int, kv_len: int, block_size: int, heads: int,
                    layer_idx: int = 0, num_layers: int = 1) -> torch.Tensor:
        """int64 [heads, Qb] on the CPU: the blocks each (head, query-block) row keeps under a
        "top_k" / "density" policy (forced blocks included, at least max(1, min_blocks), tail
        rows scaled; a row keeps all its
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
        "threshold" policy, exactly the values `select` compares the row probabilities with
        (only when `kernel_form == "prob_thresholds"`: no floor, no tail rows)."""
        if self.kind != "threshold":
            raise ValueError(f"kind: expected 'threshold' for probability thresholds, "
                             f"got {self.kind!r}")
        if self.kernel_form is None:
            raise ValueError(f"min_blocks, tail_blocks: a threshold policy with a row floor or "
                             f"tail rows has no per-head thresholds (select with to_mask), got "
                             f"min_blocks {self.min_blocks}, tail_blocks {self.tail_blocks}")
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
        largest multiplier (tail rows included) applied to the largest row (a row holds at most
        Kb causal blocks), at least the floor."""
        top = max(mult_host) * (max(1.0, self.tail_scale) if self.tail_blocks else 1.0)
        return max(1, min(max(self._host_budget(top, absolute, kb), self.min_blocks), kb))

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
        hb = self._head_entries(layer_idx, num_layers)
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
        scale = self.row_scale(qb).tolist()
        total = 0.0
        for x in hb:
            for (allowed, n_forced), rs in zip(rows, scale):
                k = self._host_budget(float(x) * factor * rs, absolute, allowed)
                total += min(allowed, max(1, k, n_forced, self.min_blocks))
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


def _check_head_budgets(hb, kind: str) -> list:
    """head_budgets as a list (one entry per head) or a list of lists (one row per layer)."""
    given = hb
    if isinstance(hb, torch.Tensor):
        hb = hb.tolist()
    table = isinstance(hb, (list, tuple)) and bool(hb) \
        and all(isinstance(r, (list, tuple)) for r in hb)
    rows = [list(r) for r in hb] if table else [hb]
    if not all(isinstance(r, (list, tuple)) and r and all(_is_real(x) and x > 0 for x in r)
               for r in rows):
        raise ValueError(f"head_budgets: expected a non-empty list of positive numbers (one "
                         f"per head) or a list of such lists (one per layer), got {given!r}")
    if len({len(r) for r in rows}) > 1:
        raise ValueError(f"head_budgets: expected rows of one length (heads), got lengths "
                         f"{sorted({len(r) for r in rows})}")
    flat = [x for r in rows for x in r]
    if len({_is_int(x) for x in flat}) > 1:
        raise ValueError("head_budgets: expected all ints (absolute budgets) or all "
                         f"floats (multipliers), got {given!r}")
    if _is_int(flat[0]) and kind not in ("top_k", "density"):
        raise ValueError("head_budgets: int entries are blocks-per-row budgets, "
                         f"valid for kinds 'top_k' and 'density', not {kind!r}")
    return rows if table else list(rows[0])


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


def _top_p(probs, allowed, forced, p_rows):
    """Smallest prefix (forced blocks first, then by descending probability) whose mass reaches
    p_rows[h, r] (float64 [H, Qb]); a row whose total mass is below p keeps every allowed
    block."""
    key = torch.where(allowed, probs, torch.full_like(probs, -1.0))
    key = torch.where(forced, probs + 2.0, key)
    order = key.argsort(dim=-1, descending=True)
    sp = torch.gather(probs, -1, order).to(torch.float64)
    before = torch.cumsum(sp, -1) - sp  # mass of the blocks ranked ahead
    slot = before < (p_rows.to(torch.float64) - _MASS_EPS)[None, :, :, None]
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


def _default_knobs(kind: str) -> list[float]:
    """The calibration grid of `kind`: 64 geometric row-probability thresholds from 0.5 down to
    1e-6 (sparse to dense), or 64 geometric row shares from 0.002 up to 1."""
    g = 64
    if kind == "threshold":
        return [0.5 * (2e-6) ** (i / (g - 1)) for i in range(g)]
    return [0.002 * 500.0 ** (i / (g - 1)) for i in range(g)]


class BudgetCalibrator:
    """Per-layer, per-head budgets from calibration text, allocated by equal marginal gain.

    base: a Policy of kind "threshold" or "density" with no head budgets and a constant layer
        schedule (those are what the calibration sets); its forced blocks, `min_blocks` and tail
        rows are kept and counted. num_layers: the model's layer count. knobs: the grid of the
        base kind's knob (thresholds decreasing, or row shares increasing: sparse to dense;
        default `_default_knobs`).

    `update(layer_idx, scores, block_sum, ...)` adds one call of one layer on calibration
    documents: for every head and every knob value it counts the blocks the base policy would
    keep under the method's ranking (`scores`: gate logits, or the true maps themselves for the
    oracle) and the true attention mass (`block_sum`, rows summing to 1) they hold. That gives
    each (layer, head) a curve of density (kept share of its causal blocks) against attention
    recall (mean kept mass per row), exactly as `select` would make them.

    `policy(target)` water-fills: for one price `lam` shared by every head, each (layer, head)
    takes the knob maximizing recall - lam * density (where its curve's concave hull has slope
    `lam`: equal marginal gain), and `lam` is bisected until the mean density over layers and
    heads is closest to `target` (ties: the sparser). Under a fixed total number of blocks this
    maximizes the mean recall the curves promise. A head whose recall saturates early gets few
    blocks; one whose mass is spread (a flatter curve) gets more. The result is `base` with a
    [num_layers][heads] `head_budgets` table of multipliers around 1 (threshold: tau is the
    geometric mean of the chosen thresholds; density: the mean of the chosen shares)."""

    def __init__(self, base, num_layers: int, knobs=None):
        base = Policy.coerce(base)
        if base.kind not in CALIBRATION_KINDS:
            raise ValueError(f"base: expected a policy of kind {' or '.join(CALIBRATION_KINDS)}, "
                             f"got kind {base.kind!r}")
        if base.head_budgets is not None or base.layer_schedule != "constant":
            raise ValueError("base: expected no head_budgets and a constant layer_schedule "
                             "(the calibration sets the per-layer, per-head budgets), got "
                             f"head_budgets {base.head_budgets!r}, layer_schedule "
                             f"{base.layer_schedule!r}")
        if not (_is_int(num_layers) and num_layers >= 1):
            raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
        knobs = list(_default_knobs(base.kind) if knobs is None else knobs)
        if len(knobs) < 2 or not all(_is_real(x) and 0 < x <= 1 for x in knobs):
            raise ValueError(f"knobs: expected at least 2 numbers in (0, 1], got {knobs!r}")
        sign = -1 if base.kind == "threshold" else 1
        if not all(sign * (b - a) > 0 for a, b in zip(knobs, knobs[1:])):
            order = "decreasing thresholds" if sign < 0 else "increasing row shares"
            raise ValueError(f"knobs: expected strictly {order} (sparse to dense), "
                             f"got {knobs!r}")
        self.base, self.num_layers, self.knobs = base, num_layers, knobs
        self.kept: dict[int, torch.Tensor] = {}  # layer -> float64 [H, G] kept blocks
        self.mass: dict[int, torch.Tensor] = {}  # layer -> float64 [H, G] kept mass
        self.blocks: dict[int, float] = {}  # layer -> causal blocks per head (over calls)
        self.rows: dict[int, float] = {}  # layer -> query-block rows per head (over calls)

    @torch.no_grad()
    def update(self, layer_idx: int, scores: torch.Tensor, block_sum: torch.Tensor, *,
               q_len: int, kv_len: int, block_size: int,
               scores_are_probs: bool = False) -> None:
        """scores float [B, H, Qb, Kb] (the method's ranking), block_sum float [B, H, Qb, Kb]
        (the true attention mass per tile, `block_attention_maps`' second map)."""
        if not (_is_int(layer_idx) and 0 <= layer_idx < self.num_layers):
            raise ValueError(f"layer_idx: expected an int in [0, {self.num_layers}), "
                             f"got {layer_idx!r}")
        _check_scores(scores, q_len, kv_len, block_size, scores_are_probs)
        if not isinstance(block_sum, torch.Tensor) or block_sum.shape != scores.shape:
            raise ValueError(f"block_sum: expected the scores' shape {tuple(scores.shape)}, "
                             f"got {tuple(getattr(block_sum, 'shape', ()))}")
        b, dev, G = self.base, scores.device, len(self.knobs)
        B, H, qb, kb = scores.shape
        allowed = block_causal(q_len, kv_len, block_size, device=dev)  # [Qb, Kb]
        forced = forced_blocks(q_len, kv_len, block_size, keep_sink=b.keep_sink,
                               keep_diagonal=b.keep_diagonal, local_blocks=b.local_blocks,
                               device=dev)
        probs = row_probs(scores, allowed, scores_are_probs)  # [B, H, Qb, Kb]
        rs = b.row_scale(qb, device=dev)  # [Qb]
        always = forced.expand(B, H, qb, kb)
        knobs = torch.tensor(self.knobs, dtype=torch.float64, device=dev)  # [G]
        if b.min_blocks or b.kind == "density":
            key = torch.where(allowed, probs, torch.full_like(probs, -1.0))
            key = torch.where(forced, torch.full_like(probs, 2.0), key)
            order = key.argsort(dim=-1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(
                -1, order, torch.arange(kb, device=dev).expand_as(order))  # [B, H, Qb, Kb]
        if b.kind == "threshold":
            # a tile is kept from the first knob tau_g <= p * row scale on (knobs decrease)
            p = probs.to(torch.float64) * rs[None, None, :, None]
            first = torch.searchsorted(-knobs, -p.contiguous())  # [B, H, Qb, Kb]
            if b.min_blocks:
                always = always | (rank < b.min_blocks)
        else:
            # row budgets k[r, g] = max(1, min_blocks, ceil(min(1, x_g * rs_r) * allowed_r))
            per_row = allowed.sum(-1).to(torch.float64)  # [Qb]
            share = torch.clamp(knobs[None, :] * rs[:, None], max=1.0)  # [Qb, G]
            k = torch.ceil(share * per_row[:, None] - _CEIL_EPS).clamp_min(
                max(1, b.min_blocks))  # [Qb, G], non-decreasing in g
            # a tile of rank rho is kept from the first knob with k > rho
            flat = rank.permute(2, 0, 1, 3).reshape(qb, -1).to(torch.float64)  # [Qb, B*H*Kb]
            first = torch.searchsorted(k.contiguous(), flat.contiguous(), right=True)
            first = first.reshape(qb, B, H, kb).permute(1, 2, 0, 3)
        first = torch.where(always, torch.zeros_like(first), first)
        first = torch.where(allowed, first, torch.full_like(first, G))  # never kept
        heads = torch.arange(H, device=dev)[None, :, None, None]
        bins = (heads * (G + 1) + first).reshape(-1)
        count = torch.bincount(bins, minlength=H * (G + 1)).view(H, G + 1)[:, :G]
        mass = torch.bincount(bins, weights=block_sum.to(torch.float64).reshape(-1),
                              minlength=H * (G + 1)).view(H, G + 1)[:, :G]
        count, mass = count.cumsum(-1).double().cpu(), mass.cumsum(-1).cpu()
        if layer_idx in self.kept and self.kept[layer_idx].shape[0] != H:
            raise ValueError(f"scores: expected {self.kept[layer_idx].shape[0]} heads in layer "
                             f"{layer_idx} (as before), got {H}")
        self.kept[layer_idx] = self.kept.get(layer_idx, 0) + count
        self.mass[layer_idx] = self.mass.get(layer_idx, 0) + mass
        self.blocks[layer_idx] = self.blocks.get(layer_idx, 0.0) + B * float(allowed.sum())
        self.rows[layer_idx] = self.rows.get(layer_idx, 0.0) + B * qb

    def curves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(density, recall), float64 [num_layers, H, G] each: every (layer, head)'s curve."""
        missing = [i for i in range(self.num_layers) if i not in self.kept]
        if missing:
            raise ValueError(f"layers: expected calibration data for every layer, none for "
                             f"{missing[:8]}{'...' if len(missing) > 8 else ''}")
        dens = torch.stack([self.kept[i] / self.blocks[i] for i in range(self.num_layers)])
        rec = torch.stack([self.mass[i] / self.rows[i] for i in range(self.num_layers)])
        return dens, rec

    def allocate(self, lam: float) -> tuple[torch.Tensor, float, float]:
        """(knob index int64 [num_layers, H], mean density, mean recall) at price `lam`."""
        dens, rec = self.curves()
        choice = (rec - lam * dens).argmax(-1)  # first maximum: the sparser knob
        d = dens.gather(-1, choice[..., None])[..., 0]
        r = rec.gather(-1, choice[..., None])[..., 0]
        return choice, float(d.mean()), float(r.mean())

    def policy(self, target: float, *, iters: int = 60) -> tuple["Policy", dict]:
        """(the base policy with calibrated per-layer, per-head budgets, info) for a mean
        density `target` on the calibration data. info: {"target", "density", "recall",
        "lam", "per_layer_density" [L], "knobs" [L][H]} (calibration-data values)."""
        if not (_is_real(target) and 0 < target <= 1):
            raise ValueError(f"target: expected a density in (0, 1], got {target!r}")
        if not (_is_int(iters) and iters >= 1):
            raise ValueError(f"iters: expected a positive int, got {iters!r}")
        lo, hi = math.log(1e-6), math.log(1e6)  # log price; density falls as lam grows
        seen = {}
        for _ in range(iters):
            mid = (lo + hi) / 2
            seen[mid] = self.allocate(math.exp(mid))
            if seen[mid][1] > target:
                lo = mid
            else:
                hi = mid
        for x in (lo, hi):
            seen.setdefault(x, self.allocate(math.exp(x)))
        best = min(seen, key=lambda x: (abs(seen[x][1] - target), seen[x][1]))
        choice, d, r = seen[best]
        vals = torch.tensor(self.knobs, dtype=torch.float64)[choice]  # [L, H]
        b = self.base.to_dict()
        if self.base.kind == "threshold":
            tau = float(torch.exp(torch.log(vals).mean()))
            table = (tau / vals).tolist()  # tau / (tau / tau_lh) = tau_lh
            b["tau"] = tau
        else:
            dens = float(vals.mean())
            table = (vals / dens).tolist()  # density * (x_lh / density) = x_lh
            b["density"] = dens
        b["head_budgets"] = table
        dens_curves, _ = self.curves()
        per_layer = dens_curves.gather(-1, choice[..., None])[..., 0].mean(-1)
        return Policy.from_dict(b), {"target": target, "density": d, "recall": r,
                                     "lam": math.exp(best),
                                     "per_layer_density": per_layer.tolist(),
                                     "knobs": vals.tolist()}
