"""SeerAttention-style gates: block-pooled pre-rotary Q/K -> per-head block scores.

A `Gate` serves one attention layer. It pools the layer's queries and keys *before* rotary
embedding per block of `block_size` tokens (average / max / min, configurable), concatenates the
poolings, projects them with small per-head linear maps, re-applies rotary embedding at block
positions and scores `q_blk . k_blk / sqrt(gate_dim)` under the block-causal mask.

Block positions (one rule, used in training and inference): a block sits at the absolute position
of its first token. Key block `j` is at `j * block_size`; query block `i` is at
`i * block_size + (kv_len - q_len)`, the position of its first query row under the end-aligned
causal rule of `adaptive_sparse.masks`. Rotary uses the half-split convention of Llama
(`x * cos + rotate_half(x) * sin`, `cos = cat(freqs, freqs)`), with the base model's inverse
frequencies when `gate_dim == head_dim` (and `rope_inv_freq` is given), else
`rope_theta ** (-2i / gate_dim)`.

GQA: with `share_kv_group=False` the gate scores every query head (H = num_heads; key
projections are per query head, applied to the head's KV features). With `share_kv_group=True`
it scores every KV group once (H = num_kv_heads): the group's query features are concatenated
and projected together, giving one mask per group, which is what GQA kernels exploit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from adaptive_sparse.errors import fail as _fail
from adaptive_sparse.masks import SUPPORTED_BLOCK_SIZES, block_causal, num_blocks
from adaptive_sparse.models.config import text_config

POOLINGS = ("avg", "max", "min")
INITS = ("identity", "random")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(name, "a positive int", value)


def _poolings(name: str, value) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not value:
        raise _fail(name, f"a non-empty sequence of poolings from {POOLINGS}", value)
    for p in value:
        if p not in POOLINGS:
            raise _fail(name, f"poolings from {POOLINGS}", p)
    if len(set(value)) != len(value):
        raise _fail(name, "no repeated pooling", list(value))
    return tuple(value)


@dataclass
class GateShape:
    """The fields a prefill gate set (`GateConfig`) and a decode one (`DecodeGateConfig`) share:
    the model's attention shapes, the block size and the gate's width (None -> head_dim)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 64
    gate_dim: int | None = None

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        """The fields as JSON values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "GateShape":
        """The config `to_dict` wrote: unknown keys refused, pooling lists back to tuples."""
        if not isinstance(d, dict):
            raise _fail("config", "a dict", type(d).__name__)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise _fail("config", f"keys from {sorted(names)}", unknown)
        d = dict(d)
        for key in ("q_pooling", "k_pooling", "rope_inv_freq"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass
class GateConfig(GateShape):
    """Shapes and options of a gate set (JSON-serializable through `to_dict`).

    block_size: one of adaptive_sparse.masks.SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128); the
    GPU kernels use 64 and 128, 16 and 32 exist for small tests.
    gate_dim: width of the gate's query/key space (None -> head_dim); even when rotary is used.
    init: "identity" starts from the average-pooled inputs (scores = avg(q) . avg(k) / sqrt(d),
    needs gate_dim == head_dim); "random" draws N(0, 1/in_features) weights.
    """

    q_pooling: tuple[str, ...] = ("avg",)
    k_pooling: tuple[str, ...] = ("max", "min", "avg")
    share_kv_group: bool = False
    use_rotary: bool = True
    rope_theta: float = 10000.0
    rope_inv_freq: tuple[float, ...] | None = None
    init: str = "identity"

    def __post_init__(self):
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            _positive_int(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise _fail("num_kv_heads", f"a divisor of num_heads={self.num_heads}",
                        self.num_kv_heads)
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs not in SUPPORTED_BLOCK_SIZES:
            raise _fail("block_size", f"one of {SUPPORTED_BLOCK_SIZES} (kernels support 64 and "
                        "128; 16 and 32 are for tests)", bs)
        if self.gate_dim is None:
            self.gate_dim = self.head_dim
        gd = self.gate_dim
        if isinstance(gd, bool) or not isinstance(gd, int) or gd <= 0:
            raise _fail("gate_dim", "a positive int (or None for head_dim)", gd)
        if self.use_rotary and gd % 2:
            raise _fail("gate_dim", "an even int when use_rotary is set", gd)
        self.q_pooling = _poolings("q_pooling", self.q_pooling)
        self.k_pooling = _poolings("k_pooling", self.k_pooling)
        for name in ("share_kv_group", "use_rotary"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, "a bool", getattr(self, name))
        if not isinstance(self.rope_theta, (int, float)) or isinstance(self.rope_theta, bool) \
                or self.rope_theta <= 0:
            raise _fail("rope_theta", "a positive number", self.rope_theta)
        self.rope_theta = float(self.rope_theta)
        if self.rope_inv_freq is not None:
            freqs = tuple(float(f) for f in self.rope_inv_freq)
            if len(freqs) != self.head_dim // 2 or any(not f > 0 for f in freqs):
                raise _fail("rope_inv_freq", f"{self.head_dim // 2} positive floats "
                            "(head_dim / 2)", f"{len(freqs)} values")
            self.rope_inv_freq = freqs
        if self.init not in INITS:
            raise _fail("init", f"one of {INITS}", self.init)
        if self.init == "identity" and gd != self.head_dim:
            raise _fail("init", f"'random' when gate_dim ({gd}) != head_dim ({self.head_dim})",
                        self.init)

    @property
    def gate_heads(self) -> int:
        """Heads of the score map: num_kv_heads when shared within a KV group, else num_heads."""
        return self.num_kv_heads if self.share_kv_group else self.num_heads

    def inv_freq(self) -> torch.Tensor:
        """float64 [gate_dim / 2]: rotary inverse frequencies of the gate space."""
        gd = self.gate_dim
        if self.rope_inv_freq is not None and gd == self.head_dim:
            return torch.tensor(self.rope_inv_freq, dtype=torch.float64)
        return self.rope_theta ** (-torch.arange(0, gd, 2, dtype=torch.float64) / gd)


    @classmethod
    def from_model(cls, model, **options) -> "GateConfig":
        """Shapes (and rotary frequencies) read from a transformers causal LM."""
        return cls(**model_shapes(model), **options)


def model_shapes(model) -> dict:
    """num_layers, num_heads, num_kv_heads, head_dim, rope_theta, rope_inv_freq of a HF model."""
    if getattr(model, "config", None) is None:
        raise _fail("model", "a transformers model with a .config", type(model).__name__)
    cfg = text_config(model)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        params = getattr(cfg, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 10000.0) if isinstance(params, dict) else 10000.0
    inv_freq = None
    for mod in model.modules():
        buf = getattr(mod, "inv_freq", None)
        if isinstance(buf, torch.Tensor) and buf.numel() == head_dim // 2:
            inv_freq = tuple(float(f) for f in buf.double().cpu())
            break
    return dict(num_layers=cfg.num_hidden_layers, num_heads=heads,
                num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                head_dim=head_dim, rope_theta=float(theta), rope_inv_freq=inv_freq)


def check_model_shapes(config: "GateConfig", model) -> None:
    """Refuse gates built for other attention shapes than `model`'s, naming the field."""
    shapes = model_shapes(model)
    for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
        if shapes[name] != getattr(config, name):
            raise _fail(name, f"{getattr(config, name)} (the gates' model)",
                        f"{shapes[name]} in the given model")


def gate_state_shapes(config: "GateConfig") -> dict[str, tuple[int, ...]]:
    """{state_dict name: shape} of `GateSet(config)`, computed without allocating it."""
    c = config
    q_groups = c.group_size if c.share_kv_group else 1
    wq = (c.gate_heads, q_groups * len(c.q_pooling) * c.head_dim, c.gate_dim)
    wk = (c.gate_heads, len(c.k_pooling) * c.head_dim, c.gate_dim)
    out = {}
    for layer in range(c.num_layers):
        out[f"{layer}.wq"], out[f"{layer}.wk"] = wq, wk
    return out


def pool_blocks(x: torch.Tensor, block_size: int, kinds) -> dict[str, torch.Tensor]:
    """Pool a [B, H, N, D] tensor per block of `block_size` tokens along N.

    Returns {kind: [B, H, ceil(N / block_size), D]}; a partial last block pools its real tokens
    only."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise _fail("x", "a tensor [B, H, N, D]", getattr(x, "shape", type(x).__name__))
    B, H, N, D = x.shape
    nb = num_blocks(N, block_size)
    pad = nb * block_size - N
    out = {}
    for kind in kinds:
        if kind == "avg":
            s = nn.functional.pad(x, (0, 0, 0, pad)).view(B, H, nb, block_size, D).sum(3)
            count = torch.clamp(N - torch.arange(nb, device=x.device) * block_size,
                                max=block_size).to(s.dtype)
            out[kind] = s / count[:, None]
        elif kind in ("max", "min"):
            fill = float("-inf") if kind == "max" else float("inf")
            xp = nn.functional.pad(x, (0, 0, 0, pad), value=fill).view(B, H, nb, block_size, D)
            out[kind] = xp.amax(3) if kind == "max" else xp.amin(3)
        else:
            raise _fail("kinds", f"poolings from {POOLINGS}", kind)
    return out


def block_positions(q_len: int, kv_len: int, block_size: int, *, device=None):
    """(query block positions [Qb], key block positions [Kb]), int64: first-token positions."""
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    q_pos = torch.arange(qb, device=device) * block_size + (kv_len - q_len)
    k_pos = torch.arange(kb, device=device) * block_size
    return q_pos, k_pos


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype) -> torch.Tensor:
    """(cos, sin) of half-split rotary at positions [L] with inv_freq [d / 2], computed in
    float64 and cast to `dtype`: [2, L, d]."""
    ang = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64, copy=False)[None, :]
    ang = torch.cat([ang, ang], dim=-1)  # [L, d]
    return torch.stack([ang.cos(), ang.sin()]).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d]: (-x2, x1) for the halves x1, x2 of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                 tables: torch.Tensor | None = None) -> torch.Tensor:
    """Half-split rotary: x [..., L, d] at positions [L] with inv_freq [d / 2]; `tables`
    [2, L, d] (from `rotary_tables`, in x's dtype) skips computing cos/sin."""
    cos, sin = rotary_tables(positions, inv_freq, x.dtype) if tables is None else tables
    return x * cos + rotate_half(x) * sin


class Gate(nn.Module):
    """The gate of one attention layer.

    Weights: wq [H, Fq, gate_dim], wk [H, Fk, gate_dim] with H = config.gate_heads,
    Fq = len(q_pooling) * head_dim (* group_size when shared), Fk = len(k_pooling) * head_dim.
    """

    def __init__(self, config: GateConfig):
        super().__init__()
        if not isinstance(config, GateConfig):
            raise _fail("config", "a GateConfig", type(config).__name__)
        self.config = config
        c = config
        H, D, gd = c.gate_heads, c.head_dim, c.gate_dim
        q_groups = c.group_size if c.share_kv_group else 1
        self.wq = nn.Parameter(torch.empty(H, q_groups * len(c.q_pooling) * D, gd))
        self.wk = nn.Parameter(torch.empty(H, len(c.k_pooling) * D, gd))
        self.register_buffer("inv_freq", c.inv_freq().float(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.config
        with torch.no_grad():
            if c.init == "random":
                for w in (self.wq, self.wk):
                    w.normal_(0.0, 1.0 / math.sqrt(w.shape[1]))
                return
            q_groups = c.group_size if c.share_kv_group else 1
            self.wq.copy_(_identity_init(self.wq.shape[0], c.q_pooling, c.head_dim, q_groups))
            self.wk.copy_(_identity_init(self.wk.shape[0], c.k_pooling, c.head_dim, 1))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, N, D], k [B, Hkv, M, D] pre-rotary -> scores [B, H, Qb, Kb] in the
        parameters' dtype (float32 unless the gate was cast)."""
        c = self.config
        if q.dim() != 4 or q.shape[1] != c.num_heads or q.shape[3] != c.head_dim:
            raise _fail("q", f"[B, {c.num_heads}, N, {c.head_dim}]", tuple(q.shape))
        if k.dim() != 4 or k.shape[1] != c.num_kv_heads or k.shape[3] != c.head_dim \
                or k.shape[0] != q.shape[0]:
            raise _fail("k", f"[{q.shape[0]}, {c.num_kv_heads}, M, {c.head_dim}]", tuple(k.shape))
        dtype = self.wq.dtype
        qf = pool_blocks(q.to(dtype), c.block_size, c.q_pooling)
        kf = pool_blocks(k.to(dtype), c.block_size, c.k_pooling)
        return self.score_pooled(qf, kf, q_len=q.shape[2], kv_len=k.shape[2])

    def score_pooled(self, qf: dict, kf: dict, *, q_len: int, kv_len: int) -> torch.Tensor:
        """Scores from pooled features.

        qf: {pooling: [B, Hq, Qb, D]}, kf: {pooling: [B, Hkv, Kb, D]} (extra poolings ignored).
        Returns [B, H, Qb, Kb] (parameters' dtype), -inf outside the block-causal region."""
        c = self.config
        for name, feats, pools in (("qf", qf, c.q_pooling), ("kf", kf, c.k_pooling)):
            missing = [p for p in pools if p not in feats]
            if missing:
                raise _fail(name, f"pooled features for {list(pools)}", f"missing {missing}")
        dtype = self.wq.dtype
        qcat = torch.cat([qf[p].to(dtype) for p in c.q_pooling], dim=-1)  # [B, Hq, Qb, Pq*D]
        kcat = torch.cat([kf[p].to(dtype) for p in c.k_pooling], dim=-1)  # [B, Hkv, Kb, Pk*D]
        B, _, Qb, F = qcat.shape
        Kb = kcat.shape[2]
        if Qb != num_blocks(q_len, c.block_size) or Kb != num_blocks(kv_len, c.block_size):
            raise _fail("qf/kf", f"Qb={num_blocks(q_len, c.block_size)}, "
                        f"Kb={num_blocks(kv_len, c.block_size)} blocks", (Qb, Kb))
        if c.share_kv_group:
            G = c.group_size
            qcat = qcat.view(B, c.num_kv_heads, G, Qb, F).permute(0, 1, 3, 2, 4)
            qcat = qcat.reshape(B, c.num_kv_heads, Qb, G * F)
        elif c.group_size > 1:
            kcat = kcat.repeat_interleave(c.group_size, dim=1)
        qg = torch.einsum("bhqi,hio->bhqo", qcat, self.wq)  # [B, H, Qb, gd]
        kg = torch.einsum("bhki,hio->bhko", kcat, self.wk)  # [B, H, Kb, gd]
        if c.use_rotary:
            q_pos, k_pos = block_positions(q_len, kv_len, c.block_size, device=qg.device)
            qg = apply_rotary(qg, q_pos, self.inv_freq)
            kg = apply_rotary(kg, k_pos, self.inv_freq)
        scores = torch.matmul(qg, kg.transpose(-1, -2)) / math.sqrt(c.gate_dim)
        allowed = block_causal(q_len, kv_len, c.block_size, device=scores.device)
        return scores.masked_fill(~allowed, float("-inf"))

    def fast_scores(self, q: torch.Tensor, k: torch.Tensor, tables: "GateTables",
                    *, causal_fill: bool = True, triton_pooling: bool | None = None
                    ) -> torch.Tensor:
        """`forward` for inference with few kernel launches: q [B, Hq, N, D], k [B, Hkv, M, D]
        pre-rotary (any float dtype and strides) -> scores [B, H, Qb, Kb] in the parameters'
        dtype, equal to `forward` up to rounding. `tables` (from `gate_tables`) holds what
        depends on the lengths only; with causal_fill=False the blocks outside the causal
        region are left unmasked (for consumers that ignore them, such as
        `scores_to_kv_indices`). triton_pooling: pool with one Triton launch per tensor
        (`pool_blocks_triton`; None = on CUDA). No host-device sync: capturable in a CUDA
        graph. `pool` + `scores_from_pooled`."""
        if tables.q_len != q.shape[2] or tables.kv_len != k.shape[2]:
            raise _fail("tables", f"gate tables for q_len={q.shape[2]}, kv_len={k.shape[2]}",
                        (tables.q_len, tables.kv_len))
        qcat, kcat = self.pool(q, k, triton_pooling=triton_pooling)
        return self.scores_from_pooled(qcat, kcat, tables, causal_fill=causal_fill)

    def pool(self, q: torch.Tensor, k: torch.Tensor, *, triton_pooling: bool | None = None,
             out: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first stage of `fast_scores`: (qcat [B, Hq, Qb, Pq * D], kcat [B, Hkv, Kb,
        Pk * D]) in the parameters' dtype, the configured poolings of q and k concatenated.
        out: contiguous float32 tensors of those shapes to pool into (Triton pooling and float32
        parameters only; a CUDA graph's static inputs)."""
        c = self.config
        dtype = self.wq.dtype
        fused = q.is_cuda if triton_pooling is None else triton_pooling
        if out is not None:
            if not fused or dtype != torch.float32:
                raise _fail("out", "None unless pooling with Triton into float32 gates",
                            f"triton_pooling={fused}, gate dtype {dtype}")
            from adaptive_sparse.attention.triton.gate import pool_blocks_triton

            return (pool_blocks_triton(q, c.block_size, c.q_pooling, out=out[0]),
                    pool_blocks_triton(k, c.block_size, c.k_pooling, out=out[1]))
        return (_pool_cat(q, c.block_size, c.q_pooling, dtype, fused),  # [B, Hq, Qb, Pq*D]
                _pool_cat(k, c.block_size, c.k_pooling, dtype, fused))  # [B, Hkv, Kb, Pk*D]

    def scores_from_pooled(self, qcat: torch.Tensor, kcat: torch.Tensor, tables: "GateTables",
                           *, causal_fill: bool = True, out: torch.Tensor | None = None
                           ) -> torch.Tensor:
        """The second stage of `fast_scores`: pooled features (from `pool`) -> scores
        [B, H, Qb, Kb] in the parameters' dtype (written into `out`, a contiguous tensor of
        that shape and dtype, when given). Projections, rotary at block positions (`tables`)
        and the block dot products: a few small launches, no host sync."""
        c = self.config
        wq, wk = self._fused_weights()
        B, dtype = qcat.shape[0], wq.dtype
        Qb, Kb = qcat.shape[2], kcat.shape[2]
        if Qb != num_blocks(tables.q_len, c.block_size) \
                or Kb != num_blocks(tables.kv_len, c.block_size):
            raise _fail("qcat/kcat", f"Qb={num_blocks(tables.q_len, c.block_size)}, "
                        f"Kb={num_blocks(tables.kv_len, c.block_size)} blocks (the tables')",
                        (Qb, Kb))
        gd, G = c.gate_dim, c.group_size
        if c.share_kv_group:
            qcat = qcat.view(B, c.num_kv_heads, G, Qb, -1).permute(0, 1, 3, 2, 4)
            qcat = qcat.reshape(B, c.num_kv_heads, Qb, -1)
        qg = torch.matmul(qcat, wq)  # [B, H, Qb, R * gd]
        kg = torch.matmul(kcat, wk)  # [B, Hkv, Kb, Gk * R * gd]
        Gk = 1 if c.share_kv_group else G
        if c.use_rotary:
            qg = (qg.view(B, -1, Qb, 2, gd) * tables.q_rot).sum(3)  # [B, H, Qb, gd]
            kg = kg.view(B, c.num_kv_heads, Kb, Gk, 2, gd) * tables.k_rot
            kr = torch.empty(B, c.num_kv_heads, Gk, Kb, gd, dtype=dtype, device=kg.device)
            torch.sum(kg, 4, out=kr.permute(0, 1, 3, 2, 4))
        else:
            kr = kg.view(B, c.num_kv_heads, Kb, Gk, gd).permute(0, 1, 3, 2, 4)
        qg = qg.reshape(B * c.num_kv_heads * Gk, Qb, gd)
        kt = kr.reshape(B * c.num_kv_heads * Gk, Kb, gd).transpose(1, 2)
        shape = (B, c.gate_heads, Qb, Kb)
        if out is None:
            scores = torch.bmm(qg, kt).view(shape)  # [B, H, Qb, Kb]
        else:
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape \
                    or out.dtype != dtype or not out.is_contiguous() or out.device != qg.device:
                raise _fail("out", f"a contiguous {dtype} tensor {list(shape)} on {qg.device}",
                            getattr(out, "shape", type(out).__name__))
            torch.bmm(qg, kt, out=out.view(-1, Qb, Kb))
            scores = out
        if causal_fill:
            scores = scores.masked_fill(~tables.allowed, float("-inf"))
        return scores

    def _fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(wq [H, Fq, R * gd], wk [Hkv, Fk, Gk * R * gd]): the projections with rotate_half
        folded in (R = 2 with rotary: [W | W @ rotate_half]), the 1/sqrt(gate_dim) score scale
        folded into wq, and the key heads of a KV group side by side. Cached while the
        parameters are unchanged (in-place updates bump their version)."""
        key = (self.wq._version, self.wk._version, self.wq.data_ptr(), self.wk.data_ptr(),
               self.wq.dtype, self.wq.device)
        if getattr(self, "_fused_key", None) != key:
            c = self.config
            with torch.no_grad():
                wq = self.wq.detach() / math.sqrt(c.gate_dim)
                wk = self.wk.detach()
                if c.use_rotary:
                    wq = torch.cat([wq, rotate_half(wq)], dim=-1)
                    wk = torch.cat([wk, rotate_half(wk)], dim=-1)
                Gk = 1 if c.share_kv_group else c.group_size
                wk = wk.view(c.num_kv_heads, Gk, wk.shape[1], wk.shape[2]).permute(0, 2, 1, 3)
                wk = wk.reshape(c.num_kv_heads, wk.shape[1], -1)
            self._fused = (wq.contiguous(), wk.contiguous())
            self._fused_key = key
        return self._fused


@dataclass(frozen=True)
class GateTables:
    """What a gate call needs that depends only on the lengths and the device.

    q_rot [Qb, 2, gd] and k_rot [Kb, 1, 2, gd]: (cos, sin) at the block positions (None without
    rotary); allowed: bool [Qb, Kb] block-causal region."""

    q_len: int
    kv_len: int
    q_rot: torch.Tensor | None
    k_rot: torch.Tensor | None
    allowed: torch.Tensor


def gate_tables(config: GateConfig, q_len: int, kv_len: int, *, device=None,
                dtype=torch.float32) -> GateTables:
    """`GateTables` for `Gate.fast_scores` at these lengths (cos/sin computed in float64 and
    cast to `dtype`, the gate parameters' dtype)."""
    c = config
    allowed = block_causal(q_len, kv_len, c.block_size, device=device)
    if not c.use_rotary:
        return GateTables(q_len, kv_len, None, None, allowed)
    q_pos, k_pos = block_positions(q_len, kv_len, c.block_size)
    inv = c.inv_freq()
    q_rot = rotary_tables(q_pos, inv, dtype).transpose(0, 1).contiguous()  # [Qb, 2, gd]
    k_rot = rotary_tables(k_pos, inv, dtype).transpose(0, 1)[:, None].contiguous()
    return GateTables(q_len, kv_len, q_rot.to(device, non_blocking=True),  # no device sync
                      k_rot.to(device, non_blocking=True), allowed)


def _pool_cat(x: torch.Tensor, block_size: int, kinds, dtype, fused: bool) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, ceil(N / block_size), len(kinds) * D] in `dtype`: the poolings of
    `pool_blocks` concatenated in `kinds` order, reading x in its own dtype. fused: one Triton
    launch (`pool_blocks_triton`); else torch (one reduction for avg, one for max and min
    together when N is a multiple of the block size)."""
    if fused:
        from adaptive_sparse.attention.triton.gate import pool_blocks_triton

        return pool_blocks_triton(x, block_size, kinds).to(dtype)
    B, H, N, D = x.shape
    if N % block_size:
        pooled = pool_blocks(x.to(dtype), block_size, kinds)
        return torch.cat([pooled[p] for p in kinds], dim=-1)
    xv = x.view(B, H, N // block_size, block_size, D)
    parts = {}
    if "avg" in kinds:
        parts["avg"] = xv.mean(3, dtype=dtype)
    if "max" in kinds and "min" in kinds:
        parts["min"], parts["max"] = torch.aminmax(xv, dim=3)
    elif "max" in kinds or "min" in kinds:
        one = "max" if "max" in kinds else "min"
        parts[one] = xv.amax(3) if one == "max" else xv.amin(3)
    if len(kinds) == 1:
        return parts[kinds[0]].to(dtype)
    return torch.cat([parts[p] for p in kinds], dim=-1).to(dtype)  # cat promotes bf16 -> fp32


def _identity_init(heads: int, pools, head_dim: int, groups: int) -> torch.Tensor:
    """[heads, groups * len(pools) * head_dim, head_dim]: average of the groups' 'avg' slots
    (or of all slots when 'avg' is not pooled)."""
    slots = [i for i, p in enumerate(pools) if p == "avg"] or list(range(len(pools)))
    w = torch.zeros(groups, len(pools), head_dim, head_dim)
    eye = torch.eye(head_dim) / (groups * len(slots))
    for s in slots:
        w[:, s] = eye
    return w.reshape(1, -1, head_dim).repeat(heads, 1, 1)


class GateSet(nn.ModuleList):
    """One `Gate` per layer, all built from one `GateConfig`."""

    def __init__(self, config: GateConfig):
        if not isinstance(config, GateConfig):
            raise _fail("config", "a GateConfig", type(config).__name__)
        super().__init__([Gate(config) for _ in range(config.num_layers)])
        self.config = config

    def scores(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Pre-rotary q [B, Hq, N, D], k [B, Hkv, M, D] of layer `layer_idx` -> [B, H, Qb, Kb]."""
        if not 0 <= layer_idx < len(self):
            raise _fail("layer_idx", f"an int in [0, {len(self)})", layer_idx)
        return self[layer_idx](q, k)


@dataclass(frozen=True)
class ModelShapes:
    """Enough of a decoder's shapes to count its parameters."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied_embeddings: bool
    rope_theta: float = 10000.0

    def parameter_count(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attn + mlp + 2 * self.hidden
        emb = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return emb + self.layers * per_layer + self.hidden

    def gate_config(self, **options) -> GateConfig:
        return GateConfig(num_layers=self.layers, num_heads=self.heads,
                          num_kv_heads=self.kv_heads, head_dim=self.head_dim,
                          rope_theta=self.rope_theta, **options)


MODEL_SHAPES = {
    "smollm2-135m": ModelShapes(vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3,
                                head_dim=64, intermediate=1536, tied_embeddings=True,
                                rope_theta=100000.0),
    "llama3-8b-shapes": ModelShapes(vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8,
                                    head_dim=128, intermediate=14336, tied_embeddings=False,
                                    rope_theta=500000.0),
}


def gate_parameter_count(config: GateConfig) -> int:
    """Trainable parameters of a GateSet (computed from shapes, nothing allocated)."""
    return sum(math.prod(shape) for shape in gate_state_shapes(config).values())


def parameter_report(**options) -> list[dict]:
    """Gate parameters vs base model for every entry of `MODEL_SHAPES`, per-head and
    shared-group gates."""
    rows = []
    for name, shapes in MODEL_SHAPES.items():
        base = shapes.parameter_count()
        for shared in (False, True):
            gates = gate_parameter_count(shapes.gate_config(share_kv_group=shared, **options))
            rows.append(dict(model=name, share_kv_group=shared, base_params=base,
                             gate_params=gates, ratio=gates / base))
    return rows
