"""The pattern zoo: static and training-free block masks.

Every pattern is a function `fn(*, q_len, kv_len, num_heads, block_size=64, batch=1,
device=None, **params) -> BlockSparseMask` (input-dependent ones also take q [B, Hq, N, D] and
k [B, Hkv, M, D]); masks are causal with queries aligned to the end of the keys. Static patterns
give H = num_heads; input-dependent ones give H = Hq (Hkv with `shared_kv_group=True`).

`make_pattern(name, ...)` dispatches by name and refuses unknown names and parameters;
`PATTERN_PARAMS[name]` lists each pattern's parameters and their types (for the CLI and sweeps).
"""

from __future__ import annotations

import inspect

from adaptive_sparse.masks import BlockSparseMask
from adaptive_sparse.patterns.antidiagonal import antidiagonal
from adaptive_sparse.patterns.hierarchical import hierarchical
from adaptive_sparse.patterns.lsh import lsh
from adaptive_sparse.patterns.oracle import oracle, oracle_with_maps
from adaptive_sparse.patterns.static import bigbird, dense, longformer, sliding_window, strided
from adaptive_sparse.patterns.vertical_slash import vertical_slash
from adaptive_sparse.policies import Policy

PATTERNS = {
    "dense": dense,
    "sliding_window": sliding_window,
    "longformer": longformer,
    "bigbird": bigbird,
    "strided": strided,
    "lsh": lsh,
    "hierarchical": hierarchical,
    "vertical_slash": vertical_slash,
    "antidiagonal": antidiagonal,
    "oracle": oracle,
}

# patterns that read q and k
INPUT_DEPENDENT = frozenset({"lsh", "hierarchical", "vertical_slash", "antidiagonal", "oracle"})

PATTERN_PARAMS: dict[str, dict[str, type]] = {
    "dense": {},
    "sliding_window": {"window": int, "sink_blocks": int},
    "longformer": {"window": int, "global_blocks": int},
    "bigbird": {"window": int, "global_blocks": int, "random_blocks": int, "seed": int},
    "strided": {"local_blocks": int, "stride": int},
    "lsh": {"n_buckets": int, "n_rounds": int, "seed": int, "keep_sink": bool,
            "shared_kv_group": bool},
    "hierarchical": {"budget": float, "super_block": int, "expand": int, "keep_sink": bool,
                     "scale": float, "shared_kv_group": bool},
    "vertical_slash": {"n_vertical": int, "n_slash": int, "last_q": int, "keep_sink": bool,
                       "scale": float, "shared_kv_group": bool},
    "antidiagonal": {"stride": int, "threshold": float, "keep_sink": bool, "scale": float,
                     "shared_kv_group": bool},
    "oracle": {"policy": Policy, "target": str, "scale": float, "layer_idx": int,
               "num_layers": int, "shared_kv_group": bool},
}


def make_pattern(name: str, *, q_len: int, kv_len: int, num_heads: int, block_size: int = 64,
                 batch: int = 1, q=None, k=None, device=None, **params) -> BlockSparseMask:
    """Build pattern `name` with `params` (see `PATTERN_PARAMS[name]` and the pattern's doc).

    q [B, Hq, N, D], k [B, Hkv, M, D] are required by the input-dependent patterns
    (`INPUT_DEPENDENT`) and ignored by the others; for those, q_len, kv_len, num_heads and batch
    must agree with q and k."""
    if name not in PATTERNS:
        raise ValueError(f"name: unknown pattern {name!r}; expected one of {sorted(PATTERNS)}")
    known = PATTERN_PARAMS[name]
    for key, value in params.items():
        if key not in known:
            raise ValueError(f"{key}: unknown parameter of pattern {name!r}; "
                             f"expected one of {sorted(known)}")
        _check_type(name, key, value, known[key])
    geometry = dict(q_len=q_len, kv_len=kv_len, num_heads=num_heads, block_size=block_size,
                    batch=batch, device=device)
    if name in INPUT_DEPENDENT:
        if q is None or k is None:
            raise ValueError(f"q: pattern {name!r} needs q and k")
        return PATTERNS[name](q=q, k=k, **geometry, **params)
    return PATTERNS[name](**geometry, **params)


def _check_type(name: str, key: str, value, kind: type) -> None:
    """The type of one parameter (its range is checked by the pattern); None only where the
    pattern's default is None."""
    if value is None and inspect.signature(PATTERNS[name]).parameters[key].default is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number,
          Policy: isinstance(value, (Policy, dict))}.get(kind, isinstance(value, kind))
    if not ok:
        what, got = (("a Policy or a dict", type(value).__name__) if kind is Policy
                     else (f"a {kind.__name__}", repr(value)))
        raise TypeError(f"{key}: expected {what}, got {got} (a parameter of pattern {name!r})")


__all__ = ["PATTERNS", "PATTERN_PARAMS", "INPUT_DEPENDENT", "make_pattern", "dense",
           "sliding_window", "longformer", "bigbird", "strided", "lsh", "hierarchical",
           "vertical_slash", "antidiagonal", "oracle", "oracle_with_maps"]
