"""Sparse-aware adaptation (issue 13): the LoRA (adaptive_sparse.adapters), its training under
the gate's masks (gating.adapt), its verified artifact, loading with the gate, and
benchmarks/adapt.py."""

from __future__ import annotations

import json

import pytest
import torch

from adaptive_sparse.adapters import (
    adapters_disabled, attach_lora, get_lora, load_adapter, read_adapter, save_adapter)
from adaptive_sparse.gates import GateConfig, GateSet
from benchmarks import adapt as bench
from gating.adapt import AdaptModule
from test_gates import tiny_llama  # tests/ is on sys.path (rootdir-relative test modules)


def _gates(model, seed=0):
    torch.manual_seed(seed)
    return GateSet(GateConfig.from_model(model, block_size=16, init="random"))


def _ids(n=128, seed=0):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _train(model, gates, steps, *, density=0.3, lr=1e-2):
    """(module, KL before, KL after) of `steps` Adam steps on one sequence under the masks."""
    mod = AdaptModule(model, gates, rank=4, alpha=8, densities=(density,), block_size=16,
                      backend="reference", chunk=48)
    ids = _ids()
    opt = torch.optim.Adam(mod.lora.parameters(), lr=lr)
    mod.start()
    try:
        with torch.no_grad():
            t, c = mod.student_loss(ids)
        before = float(t / c)
        for _ in range(steps):
            t, c = mod.student_loss(ids)
            opt.zero_grad()
            (t / c).backward()
            opt.step()
        with torch.no_grad():
            t, c = mod.student_loss(ids)
        after = float(t / c)
    finally:
        mod.stop()
    return mod, before, after


def test_lora_starts_equal_to_the_base_model_and_switches_off():
    model = tiny_llama()
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
        lora = attach_lora(model, rank=4, alpha=8)
        assert torch.equal(model(ids).logits, base)  # B = 0
        for layer in lora.layers.values():
            layer.B.normal_()
        moved = model(ids).logits
        assert not torch.allclose(moved, base)
        with adapters_disabled(model):
            assert torch.equal(model(ids).logits, base)
        assert torch.equal(model(ids).logits, moved)
    assert len(lora.names) == 4 * 2  # q, k, v, o of 2 layers
    with pytest.raises(ValueError, match="^model: "):
        attach_lora(model)
    with pytest.raises(ValueError, match="^targets: "):
        attach_lora(tiny_llama(), targets=["nope_proj"])


def test_gradients_reach_only_the_adapter_under_sparse_masks():
    model = tiny_llama()
    mod = AdaptModule(model, _gates(model), rank=4, alpha=8, densities=(0.3,), block_size=16,
                      backend="reference", chunk=48)
    mod.start()
    try:
        t, c = mod.student_loss(_ids())
        (t / c).backward()
    finally:
        mod.stop()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in mod.provider.gate_set.parameters())
    grads = {n: p.grad for n, p in mod.lora.named_parameters()}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # B starts at zero, so only B gets a gradient on the first step
    assert all(float(g.abs().sum()) > 0 for n, g in grads.items() if n.endswith(".B"))
    assert [n for n, _ in mod.state_dict().items()] == [n for n, _ in
                                                        mod.lora.state_dict(prefix="lora.").items()]


def test_training_lowers_the_kl_under_the_gate_masks():
    model = tiny_llama()
    _, before, after = _train(model, _gates(model), 15)
    assert before > 0 and after < 0.6 * before


def test_train_adapter_checkpoints_and_resumes(tmp_path):
    from adaptive_sparse.adapters import detach_lora
    from gating.adapt import train_adapter

    model = tiny_llama()
    gates = _gates(model)
    seqs = torch.cat([_ids(64, seed=s) for s in range(2)])
    kw = dict(rank=4, alpha=8, densities=(0.3,), block_size=16, chunk=32, checkpoint_every=1,
              log_every=0)
    first = train_adapter(model, gates, seqs, tmp_path, steps=2, **kw)
    assert first["steps"] == 2 and first["tokens"] == 128 and first["resumed_from"] is None
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    trained = {n: p.detach().clone() for n, p in get_lora(model).named_parameters()}
    detach_lora(model)
    again = train_adapter(model, gates, seqs, tmp_path, steps=3, **kw)
    assert again["steps"] == 3 and again["resumed_from"].endswith("last.ckpt")
    assert again["seconds"] > first["seconds"]
    lora = get_lora(model)  # the resumed adapter starts from the trained one, not from B = 0
    assert any(float(p.abs().sum()) > 0 for n, p in lora.named_parameters() if n.endswith(".B"))
    assert set(trained) == {n for n, _ in lora.named_parameters()}


def test_save_load_roundtrip_and_loading_with_the_gate(tmp_path):
    from adaptive_sparse.adapters import gate_weights_sha256
    from adaptive_sparse.export import load_sparsifier, save_gate_artifact
    from adaptive_sparse.gates import GateProvider
    from adaptive_sparse.models import sparse_attention
    from adaptive_sparse.policies import Policy

    model = tiny_llama()
    gates = _gates(model)
    policy = Policy("density", density=0.3)
    gate_dir = save_gate_artifact(tmp_path / "gate", gates, policy, model=model)
    mod, _, _ = _train(model, gates, 3)
    where = save_adapter(gate_dir / "adapter", model, {"steps": 3},
                         gates_sha256=gate_weights_sha256(gate_dir))
    manifest, tensors = read_adapter(where)
    assert manifest["rank"] == 4 and manifest["model"]["weights_sha256"]
    assert set(tensors) == {f"{n}.{p}" for n in mod.lora.names for p in "AB"}
    ids = _ids(96, seed=1)
    with torch.no_grad():
        want = model(ids).logits
        with GateProvider(gates, policy, model) as provider, sparse_attention(
                model, provider, block_size=16):
            want_sparse = model(ids).logits

    other = tiny_llama()  # the same base model (same seed)
    load_adapter(where, other)
    with torch.no_grad():
        assert torch.equal(other(ids).logits, want)
    fresh = tiny_llama()
    with load_sparsifier(fresh, gate_dir) as handle:  # picks up gate_dir/adapter
        assert handle.adapter is not None
        with torch.no_grad():
            torch.testing.assert_close(fresh(ids).logits, want_sparse)
    assert get_lora(fresh) is None
    with load_sparsifier(fresh, gate_dir, adapter=None) as handle:
        assert handle.adapter is None


def test_tampered_adapter_and_wrong_model_are_refused(tmp_path):
    model = tiny_llama()
    attach_lora(model, rank=4, alpha=8)
    where = save_adapter(tmp_path / "a", model, {"steps": 1}, gates_sha256="1" * 64)
    data = bytearray((where / "adapter.safetensors").read_bytes())
    data[-1] ^= 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter.safetensors").write_bytes(bytes(data))
    (bad / "manifest.json").write_bytes((where / "manifest.json").read_bytes())
    with pytest.raises(ValueError, match=r"^adapter\.files\.adapter\.safetensors: .*sha256"):
        load_adapter(bad, tiny_llama())
    with pytest.raises(ValueError, match=r"^model: .*weights_sha256"):
        load_adapter(where, tiny_llama(seed=1))
    with pytest.raises(ValueError, match=r"^gates: "):
        load_adapter(where, tiny_llama(), gates_sha256="0" * 64)
    edited = json.loads((where / "manifest.json").read_text())
    edited["rank"] = 8
    (bad / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"^adapter\.manifest_sha256: "):
        read_adapter(bad)


def _smollm2_gates(model, path):
    from adaptive_sparse.gates import save_gates

    torch.manual_seed(0)
    return save_gates(GateSet(GateConfig.from_model(model, block_size=64)), path, model=model)


def _args(out, gates, *more):
    return ["--model", "smollm2-135m", "--gates", str(gates), "--out", str(out), "--device",
            "cpu", "--seq-len", "256", "--train-docs", "1", "--steps", "2", "--eval-seq-len",
            "256", "--eval-docs", "1", "--densities", "0.5", "--chunk", "128",
            "--backend", "gather", "--log-every", "1", *more]


def test_bad_flags_exit_2(tmp_path, capsys):
    for flags, name in ((["--gates", str(tmp_path / "none")], "--gates"),
                        (["--gates", str(tmp_path), "--steps", "0"], "--steps"),
                        (["--gates", str(tmp_path), "--train-densities", "0"],
                         "--train-densities"),
                        (["--gates", str(tmp_path), "--rows-from", str(tmp_path / "q.json")],
                         "--rows-from")):
        with pytest.raises(SystemExit) as e:
            bench.main(["--out", str(tmp_path / "o"), *flags])
        assert e.value.code == 2
        assert f"error: {name}: expected" in capsys.readouterr().err


def test_command_refuses_a_tampered_adapter_or_another_base_model(smollm2, tmp_path, capsys):
    """An adapter in OUT/adapter that does not verify stops the command with exit 2 (before
    any training)."""
    gates = _smollm2_gates(smollm2[0], tmp_path / "g")
    tiny = tiny_llama()
    attach_lora(tiny, rank=4, alpha=8)
    save_adapter(tmp_path / "o" / "adapter", tiny, {"steps": 2})  # another base model
    with pytest.raises(SystemExit) as e:
        bench.main(_args(tmp_path / "o", gates))
    assert e.value.code == 2
    assert "error: model: expected the base model" in capsys.readouterr().err
    f = tmp_path / "o" / "adapter" / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + b"!")
    with pytest.raises(SystemExit) as e:
        bench.main(_args(tmp_path / "o", gates))
    assert e.value.code == 2
    assert "error: adapter.files.adapter.safetensors: expected" in capsys.readouterr().err


@pytest.mark.slow  # a few CPU-minutes: SmolLM2, 2 training steps and 4 evaluations at 256 tokens
def test_main_trains_evaluates_writes_its_table_and_resumes(smollm2, tmp_path, capsys):
    gates = _smollm2_gates(smollm2[0], tmp_path / "g")
    args = _args(tmp_path / "o", gates)
    assert bench.main(args) == 0
    out = tmp_path / "o"
    data = json.loads((out / "adapt.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "dense+LoRA", "gate", "gate+LoRA"}
    assert rows["dense"]["ppl_change"] == 0.0
    assert 0 < rows["gate+LoRA"]["density"] <= 1
    assert data["meta"]["training"]["tokens"] == 2 * 256
    manifest = read_adapter(out / "adapter")[0]
    assert manifest["meta"]["steps"] == 2 and manifest["gates_sha256"]
    md = (out / "adapt.md").read_text()
    assert "| 256 | gate+LoRA | 0.5 |" in md and "512 tokens" in md
    capsys.readouterr()
    assert bench.main(args) == 0  # resumes: training skipped, nothing measured again
    log = capsys.readouterr().out
    assert "training skipped" in log and "[256]" not in log


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adapter_stays_on_the_gpu_after_training(tmp_path):
    """Lightning's teardown moves the trained module to the CPU; the H200 run then failed in
    its first LoRA evaluation (adapter on the CPU, activations on the GPU)."""
    from gating.adapt import train_adapter

    model = tiny_llama().cuda()
    gates = _gates(model)
    seqs = torch.cat([_ids(64, seed=s) for s in range(2)])
    train_adapter(model, gates, seqs, tmp_path, steps=2, rank=4, alpha=8, densities=(0.3,),
                  block_size=16, chunk=32, checkpoint_every=1, log_every=0,
                  backend="reference", device="cuda")
    lora = get_lora(model)
    assert all(p.is_cuda for p in lora.parameters())
    assert all(p.is_cuda for p in model.parameters())
    ids = _ids(64).cuda()
    with torch.no_grad():
        on = model(ids).logits
        with adapters_disabled(model):
            off = model(ids).logits
    assert torch.isfinite(on).all() and not torch.equal(on, off)


def test_lora_follows_the_input_device_and_dtype():
    """An adapter left on another device or dtype than its input still applies (moved per call)."""
    from adaptive_sparse.adapters import LoRALinear

    layer = LoRALinear(8, 6, 2, 1.0)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(3, 8, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, (x @ layer.A.double().T) @ layer.B.double().T)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_backward_through_block_64_masks_matches_fp64():
    """The sparse-aware training path on CUDA: compiled Flex's backward through a mask of
    64-token blocks at head_dim 64 in bf16 (Inductor's default Hopper backward tile is 128 keys
    wide, which failed to compile on the H200), gradients against an fp64 reference."""
    from adaptive_sparse.attention.flex import flex_attention_forward
    from adaptive_sparse.attention.reference import reference_attention
    from adaptive_sparse.masks import BlockSparseMask, block_causal

    torch.manual_seed(0)
    n, bs = 512, 64
    causal = block_causal(n, n, bs).to_dense().cuda()  # [1, 1, Qb, Kb]
    keep = causal & (torch.rand(1, 2, n // bs, n // bs, device="cuda") < 0.5)
    keep |= torch.eye(n // bs, dtype=torch.bool, device="cuda")  # every row keeps its diagonal
    mask = BlockSparseMask.from_dense(keep, block_size=bs, q_len=n, kv_len=n)
    q = torch.randn(1, 4, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, 4, n, 64, device="cuda", dtype=torch.bfloat16)
    out = flex_attention_forward(q, k, v, mask, 0.125)
    out.backward(g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, mask, 0.125)
    ref.backward(g.double())
    for got, want in ((out, ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert torch.isfinite(got).all()
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 3e-2, float(err)
