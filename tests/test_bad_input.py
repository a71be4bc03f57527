"""Malformed inputs raise ValueError/TypeError (RuntimeError for an unusable backend) whose
message names the argument and what was expected."""

import re

import pytest
import torch

from adaptive_sparse import BlockSparseMask, block_sparse_attention
from adaptive_sparse.patterns import make_pattern
from adaptive_sparse.policies import Policy

I32 = torch.int32


def _mask(q_len=100, kv_len=100, heads=1, bs=64):
    return BlockSparseMask.full(1, heads, block_size=bs, q_len=q_len, kv_len=kv_len)


def _qkv(B=1, Hq=2, Hkv=2, N=100, M=100, D=8, dtype=torch.float32):
    return (torch.randn(B, Hq, N, D, dtype=dtype), torch.randn(B, Hkv, M, D, dtype=dtype),
            torch.randn(B, Hkv, M, D, dtype=dtype))


def _attn(q=None, k=None, v=None, mask=None, **kw):
    dq, dk, dv = _qkv()
    return block_sparse_attention(dq if q is None else q, dk if k is None else k,
                                  dv if v is None else v, _mask() if mask is None else mask, **kw)


def _nan(t, value=float("nan")):
    t = t.clone()
    t.view(-1)[7] = value
    return t


def _scores(B=1, H=3, qb=2, kb=2):
    return torch.randn(B, H, qb, kb)


def _pol(scores, policy=None, **kw):
    policy = policy or Policy("top_k", k=1)
    geo = dict(q_len=100, kv_len=100, block_size=64)
    geo.update(kw)
    return policy.to_mask(scores, **geo)


def _qk_meta():
    return torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8, device="meta")


N2 = torch.tensor([[[1, 2]]], dtype=I32)  # a valid [1, 1, 2] for q_len = kv_len = 100, bs 64
IDX = torch.tensor([[[[0, 1], [0, 1]]]], dtype=I32)

CASES = [
    # ---- BlockSparseMask -------------------------------------------------------------------
    ("mask int64 counts", lambda: BlockSparseMask(N2.long(), IDX, 64, 100, 100),
     ValueError, "kv_num_blocks: expected dtype torch.int32"),
    ("mask float indices", lambda: BlockSparseMask(N2, IDX.float(), 64, 100, 100),
     ValueError, "kv_indices: expected dtype torch.int32"),
    ("mask counts rank 2", lambda: BlockSparseMask(N2[0], IDX, 64, 100, 100),
     ValueError, "kv_num_blocks: expected rank 3"),
    ("mask indices rank 3", lambda: BlockSparseMask(N2, IDX[0], 64, 100, 100),
     ValueError, "kv_indices: expected rank 4"),
    ("mask index out of range",
     lambda: BlockSparseMask(N2, torch.tensor([[[[0, 1], [0, 2]]]], dtype=I32), 64, 100, 100),
     ValueError, "kv_indices: expected values in [0, 2)"),
    ("mask duplicate index",
     lambda: BlockSparseMask(N2, torch.tensor([[[[0, 1], [1, 1]]]], dtype=I32), 64, 100, 100),
     ValueError, "kv_indices: expected strictly ascending indices (no duplicates)"),
    ("mask count above Kb", lambda: BlockSparseMask(torch.tensor([[[1, 3]]], dtype=I32), IDX,
                                                    64, 100, 100),
     ValueError, "kv_num_blocks: expected values in [0, 2]"),
    ("mask above the causal diagonal", lambda: BlockSparseMask(
        torch.tensor([[[2, 2]]], dtype=I32), IDX, 64, 100, 100),
     ValueError, "kv_indices: expected only blocks inside the causal region"),
    ("mask q_len > kv_len", lambda: BlockSparseMask(N2, IDX, 64, 120, 100),
     ValueError, "q_len: expected <= kv_len (100) for a causal mask, got 120"),
    ("mask block size 48", lambda: BlockSparseMask(N2, IDX, 48, 100, 100),
     ValueError, "block_size: expected one of (16, 32, 64, 128), got 48"),
    ("mask lengths disagree with Qb", lambda: BlockSparseMask(N2, IDX, 64, 200, 200),
     ValueError, "kv_num_blocks: expected Qb = ceil(q_len / block_size) = 4 in dim 2"),
    ("mask devices differ", lambda: BlockSparseMask(N2.to("meta"), IDX, 64, 100, 100),
     ValueError, ("kv_indices: expected device meta (that of kv_num_blocks), got ",
                  "got device(type='cpu')")),
    ("from_dense non-bool", lambda: BlockSparseMask.from_dense(
        torch.ones(1, 1, 2, 2), block_size=64, q_len=100, kv_len=100),
     ValueError, "dense: expected dtype torch.bool"),
    ("expand_heads non-multiple", lambda: _mask(heads=2).expand_heads(3),
     ValueError, "num_heads: expected a multiple of the mask's head count 2, got 3"),
    ("group_union non-divisor", lambda: _mask(heads=4).group_union(3),
     ValueError, "group_size: expected a divisor of the mask's head count 4, got 3"),
    # ---- block_sparse_attention ------------------------------------------------------------
    ("q rank 3", lambda: _attn(q=torch.randn(2, 100, 8)),
     ValueError, "q: expected rank 4 [B, Hq, N, D], got shape (2, 100, 8)"),
    ("q int dtype", lambda: _attn(q=torch.ones(1, 2, 100, 8, dtype=torch.int64)),
     ValueError, "q: expected dtype in (float32, float16, bfloat16, float64), got torch.int64"),
    ("q, k dtypes differ", lambda: _attn(q=torch.randn(1, 2, 100, 8, dtype=torch.float16)),
     ValueError, "q, k, v: expected one dtype"),
    ("k on another device", lambda: _attn(k=torch.randn(1, 2, 100, 8, device="meta")),
     ValueError, "q, k, v: expected one device"),
    ("head ratio 3:2", lambda: _attn(*_qkv(Hq=3, Hkv=2)),
     ValueError, "k: expected a KV head count dividing Hq=3, got Hkv=2"),
    ("head_dim differs", lambda: _attn(k=torch.randn(1, 2, 100, 4), v=torch.randn(1, 2, 100, 4)),
     ValueError, "k: expected head_dim 8 (that of q), got 4"),
    ("mask q_len disagrees", lambda: _attn(*_qkv(N=90)),
     ValueError, "mask: expected q_len == q.shape[2] == 90, got q_len=100"),
    ("mask heads 3 for Hq 4", lambda: _attn(*_qkv(Hq=4, Hkv=2), mask=_mask(heads=3)),
     ValueError, "mask: expected heads 1, Hkv=2 or Hq=4, got 3"),
    ("mask not a mask", lambda: _attn(mask=torch.ones(1, 1, 2, 2, dtype=torch.bool)),
     TypeError, "mask: expected a BlockSparseMask, got Tensor"),
    ("unknown backend", lambda: _attn(backend="cuda"),
     ValueError, ("backend: expected one of (", "got 'cuda'")),
    ("NaN in q", lambda: _attn(q=_nan(_qkv()[0]), check_finite=True),
     ValueError, "q: expected finite values, found NaN or inf"),
    ("inf in v", lambda: _attn(v=_nan(_qkv()[2], float("inf")), check_finite=True),
     ValueError, "v: expected finite values, found NaN or inf"),
    ("negative scale", lambda: _attn(scale=-1.0),
     ValueError, "scale: expected a positive finite float, got -1.0"),
    # ---- policies --------------------------------------------------------------------------
    ("policy unknown kind", lambda: Policy("topk", k=2),
     ValueError, "kind: expected one of ('threshold', 'top_k', 'top_p', 'density'), got 'topk'"),
    ("policy missing k", lambda: Policy("top_k"), ValueError, "k: required by kind 'top_k'"),
    ("policy p above 1", lambda: Policy("top_p", p=1.5),
     ValueError, "p: expected a float in (0, 1], got 1.5"),
    ("policy k zero", lambda: Policy("top_k", k=0),
     ValueError, "k: expected a positive int, got 0"),
    ("policy foreign parameter", lambda: Policy("top_k", k=2, tau=0.1),
     ValueError, "tau: not a parameter of kind 'top_k'"),
    ("policy bad schedule", lambda: Policy("top_k", k=2, layer_schedule="cosine"),
     ValueError, "layer_schedule: expected one of ('constant', 'linear'), got 'cosine'"),
    ("policy int head budgets for top_p", lambda: Policy("top_p", p=0.9, head_budgets=[1, 2]),
     ValueError, "head_budgets: int entries are blocks-per-row budgets"),
    ("policy head budgets length", lambda: _pol(_scores(), Policy("top_k", k=1,
                                                                  head_budgets=[1.0, 2.0])),
     ValueError, "head_budgets: expected 3 entries (one per head of scores), got 2"),
    ("scores NaN", lambda: _pol(_nan(_scores())), ValueError, "scores: expected no NaN values"),
    ("scores +inf", lambda: _pol(_nan(_scores(), float("inf"))),
     ValueError, "scores: expected finite logits or -inf, found +inf"),
    ("scores wrong block grid", lambda: _pol(_scores(kb=3)),
     ValueError, "scores: expected [B, H, 2, 2]"),
    ("scores rank 3", lambda: _pol(torch.randn(3, 2, 2)),
     ValueError, "scores: expected rank 4 [B, H, Qb, Kb], got shape (3, 2, 2)"),
    ("scores int dtype", lambda: _pol(torch.ones(1, 1, 2, 2, dtype=torch.int64)),
     ValueError, "scores: expected a floating dtype, got torch.int64"),
    ("negative probabilities", lambda: _pol(-_scores().abs() - 0.1, scores_are_probs=True),
     ValueError, "scores: expected non-negative values with scores_are_probs=True"),
    ("layer_idx out of range", lambda: _pol(_scores(), layer_idx=4, num_layers=4),
     ValueError, "layer_idx: expected an int in [0, 4), got 4"),
    ("policy dict unknown key", lambda: Policy.from_dict({"kind": "top_k", "k": 2, "topk": 1}),
     ValueError, "policy: unknown keys ['topk']"),
    # ---- patterns --------------------------------------------------------------------------
    ("unknown pattern", lambda: make_pattern("window", q_len=100, kv_len=100, num_heads=1),
     ValueError, "name: unknown pattern 'window'; expected one of"),
    ("unknown pattern parameter", lambda: make_pattern(
        "sliding_window", q_len=100, kv_len=100, num_heads=1, windw=64),
     ValueError, "windw: unknown parameter of pattern 'sliding_window'"),
    ("negative window", lambda: make_pattern(
        "sliding_window", q_len=100, kv_len=100, num_heads=1, window=-1),
     ValueError, "window: expected an int >= 0, got -1"),
    ("stride zero", lambda: make_pattern("strided", q_len=100, kv_len=100, num_heads=1, stride=0),
     ValueError, "stride: expected a positive int, got 0"),
    ("pattern bad block size", lambda: make_pattern("dense", q_len=100, kv_len=100, num_heads=1,
                                                    block_size=100),
     ValueError, "block_size: expected one of (16, 32, 64, 128), got 100"),
    ("pattern q_len > kv_len", lambda: make_pattern("dense", q_len=200, kv_len=100, num_heads=1),
     ValueError, "q_len: expected <= kv_len (100) for a causal mask, got 200"),
    ("lsh odd buckets", lambda: make_pattern("lsh", q_len=100, kv_len=100, num_heads=2,
                                             q=_qkv()[0], k=_qkv()[1], n_buckets=3),
     ValueError, "n_buckets: expected an even int >= 2, got 3"),
    ("lsh without q", lambda: make_pattern("lsh", q_len=100, kv_len=100, num_heads=2),
     ValueError, "q: pattern 'lsh' needs q and k"),
    ("pattern q_len disagrees with q", lambda: make_pattern(
        "lsh", q_len=90, kv_len=100, num_heads=2, q=_qkv()[0], k=_qkv()[1]),
     ValueError, "q_len: expected 100 (from q and k), got 90"),
    ("pattern num_heads disagrees", lambda: make_pattern(
        "vertical_slash", q_len=100, kv_len=100, num_heads=4, q=_qkv()[0], k=_qkv()[1]),
     ValueError, "num_heads: expected 2 (from q and k), got 4"),
    ("pattern k on another device", lambda: make_pattern(
        "hierarchical", q_len=100, kv_len=100, num_heads=2, q=_qk_meta()[0], k=_qk_meta()[1]),
     ValueError, "k: expected device cpu (that of q), got meta"),
    ("pattern head ratio", lambda: make_pattern(
        "lsh", q_len=100, kv_len=100, num_heads=3, q=_qkv(Hq=3)[0], k=_qkv()[1]),
     ValueError, "k: expected a KV head count dividing Hq=3, got Hkv=2"),
    ("pattern NaN q", lambda: make_pattern(
        "antidiagonal", q_len=100, kv_len=100, num_heads=2, q=_nan(_qkv()[0]), k=_qkv()[1]),
     ValueError, "q, k: expected finite values, found NaN or inf"),
    ("antidiagonal stride not dividing", lambda: make_pattern(
        "antidiagonal", q_len=100, kv_len=100, num_heads=2, q=_qkv()[0], k=_qkv()[1], stride=5),
     ValueError, "stride: expected a divisor of block_size (64), got 5"),
    ("antidiagonal threshold 0", lambda: make_pattern(
        "antidiagonal", q_len=100, kv_len=100, num_heads=2, q=_qkv()[0], k=_qkv()[1],
        threshold=0.0),
     ValueError, "threshold: expected a float in (0.0, 1.0], got 0.0"),
    ("hierarchical zero budget", lambda: make_pattern(
        "hierarchical", q_len=100, kv_len=100, num_heads=2, q=_qkv()[0], k=_qkv()[1], budget=0),
     ValueError, "budget: expected blocks per row (>= 1) or a density in (0, 1), got 0"),
    ("oracle without policy", lambda: make_pattern(
        "oracle", q_len=100, kv_len=100, num_heads=2, q=_qkv()[0], k=_qkv()[1]),
     ValueError, "policy: required by pattern 'oracle'"),
    ("oracle bad target", lambda: make_pattern(
        "oracle", q_len=100, kv_len=100, num_heads=2, q=_qkv()[0], k=_qkv()[1],
        policy={"kind": "top_k", "k": 2}, target="mean"),
     ValueError, "target: expected one of ('sum', 'max'), got 'mean'"),
    ("oracle policy of wrong type", lambda: make_pattern(
        "oracle", q_len=100, kv_len=100, num_heads=2, q=_qkv()[0], k=_qkv()[1], policy="top_k"),
     TypeError, "policy: expected a Policy or a dict, got str"),
    ("bool flag not a bool", lambda: make_pattern(
        "lsh", q_len=100, kv_len=100, num_heads=2, q=_qkv()[0], k=_qkv()[1], keep_sink="yes"),
     TypeError, "keep_sink: expected a bool, got 'yes'"),
]


@pytest.mark.parametrize("name,fn,exc,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, fn, exc, message):
    """`message` is the expected text, or a tuple of fragments that must all appear."""
    fragments = message if isinstance(message, tuple) else (message,)
    with pytest.raises(exc, match=re.escape(fragments[0])) as info:
        fn()
    assert all(f in str(info.value) for f in fragments)


def test_enough_cases():
    assert len(CASES) >= 25


def test_triton_on_cpu_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=re.escape("backend 'triton': needs CUDA tensors")):
        _attn(backend="triton")
