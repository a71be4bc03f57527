"""Decode-gate artifacts (adaptive_sparse/export/decode.py): round trip, the same selections after
loading, refusal of tampered files and of another base model, and `adaptive-sparse export
decode-gate` / `export verify` as commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptive_sparse.export import ArtifactError, load_artifact
from adaptive_sparse.export.decode import (
    DecodeGateArtifact, decode_provider, load_decode_gate_artifact, save_decode_gate_artifact)
from adaptive_sparse.gates.decode import (
    DecodeGateConfig, DecodeGateSet, DecodeProvider, token_budget_policy)
from adaptive_sparse.models.fingerprint import model_fingerprint

REPO = Path(__file__).resolve().parents[1]


def _cli(*args):
    exe = Path(sys.executable).with_name("adaptive-sparse")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)


@pytest.fixture(scope="module")
def saved(smollm2, tmp_path_factory):
    """(model, gates with random weights, policy, artifact path)."""
    model, _ = smollm2
    torch.manual_seed(0)
    gates = DecodeGateSet(DecodeGateConfig.from_model(model, block_size=64, init="random"))
    policy = token_budget_policy(192, 64, local_blocks=1)
    path = save_decode_gate_artifact(tmp_path_factory.mktemp("dg") / "art", gates, policy,
                                     model=model, params={"note": "test"})
    return model, gates, policy, path


def test_round_trip_gives_the_same_gates_policy_and_selections(saved):
    model, gates, policy, path = saved
    art = load_decode_gate_artifact(path, model)
    assert isinstance(art, DecodeGateArtifact) and isinstance(load_artifact(path),
                                                              DecodeGateArtifact)
    assert art.kind == "decode_gate" and art.block_size == 64 and art.policy == policy
    assert art.gates.config.to_dict() == gates.config.to_dict()
    for (name, a), (_, b) in zip(sorted(art.gates.state_dict().items()),
                                 sorted(gates.state_dict().items())):
        assert torch.equal(a, b), name
    c = gates.config
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, c.num_heads, 1, c.head_dim, generator=g)
    k = torch.randn(2, c.num_kv_heads, 700, c.head_dim, generator=g)
    live = decode_provider(art)
    ref = DecodeProvider(policy, gates=gates, block_size=64, num_layers=len(gates))
    for layer in (0, c.num_layers - 1):
        a, b = live(layer, q, k), ref(layer, q, k)
        assert torch.equal(a.kv_num_blocks, b.kv_num_blocks)
        assert torch.equal(a.kv_indices, b.kv_indices)


def test_tampered_files_and_another_model_are_refused(saved, tmp_path):
    import shutil

    model, gates, policy, path = saved
    bad = tmp_path / "weights"
    shutil.copytree(path, bad)
    data = bytearray((bad / "decode_gates.safetensors").read_bytes())
    data[-3] ^= 0x01  # one bit of a weight
    (bad / "decode_gates.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        load_decode_gate_artifact(bad)
    edited = tmp_path / "manifest"
    shutil.copytree(path, edited)
    m = json.loads((edited / "manifest.json").read_text())
    m["content"]["policy"]["k"] = 1  # a smaller budget, hash left alone
    (edited / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="manifest_sha256"):
        load_decode_gate_artifact(edited)
    fp = dict(model_fingerprint(model), weights_sha256="0" * 64)
    other = save_decode_gate_artifact(tmp_path / "other", gates, policy, model=fp)
    with pytest.raises(ArtifactError, match="weights_sha256"):
        load_decode_gate_artifact(other, model)
    assert load_decode_gate_artifact(other, model, check="architecture").kind == "decode_gate"
    with pytest.raises(ValueError, match="gates: expected the shapes of the model"):
        save_decode_gate_artifact(tmp_path / "x", gates, policy,
                                  model=dict(fp, num_kv_heads=1))


def test_export_decode_gate_command_writes_a_verified_artifact(saved, tmp_path):
    _, _, _, path = saved
    out = tmp_path / "cli"
    res = _cli("export", "decode-gate", "--decode-gates", str(path), "--tokens", "128",
               "--stats-corpus", "essays", "--stats-seq-len", "320", "--stats-steps", "3",
               "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["kind"] == "decode_gate" and 0 < summary["density"] <= 1
    art = load_decode_gate_artifact(out)
    assert art.policy.k == 2 and len(art.manifest["stats"]["layers"]) == len(art.gates)
    res = _cli("export", "verify", str(out))
    assert res.returncode == 0 and json.loads(res.stdout)["kind"] == "decode_gate"
    (out / "decode_gates.safetensors").write_bytes(b"\0" * 64)
    res = _cli("export", "verify", str(out))
    assert res.returncode == 2 and "decode_gates.safetensors" in res.stderr


def test_generate_reads_a_decode_gate_artifact_folder(saved, tmp_path):
    """`adaptive-sparse generate --decode-gates DIR` takes the exported artifact (verified on
    load); a tampered one is refused with exit 2."""
    import shutil

    _, _, _, path = saved
    res = _cli("generate", "--decode-gates", str(path), "--block-size", "64",
               "--max-new-tokens", "2", "--tokens", "128")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "sparse:" in res.stdout and "greedy agreement with dense" in res.stdout
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "decode_gates.safetensors").write_bytes(b"\0" * 64)
    res = _cli("generate", "--decode-gates", str(bad), "--block-size", "64",
               "--max-new-tokens", "2", "--tokens", "128")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "decode_gates.safetensors" in res.stderr
