"""One gate folder format: what `adaptive-sparse train` writes is a gate artifact (the same
manifest, format and version as `export gate`), read by `load_gates` and `load_sparsifier` alike
and verified on every load; old two-file folders still load."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptive_sparse.export import ArtifactError, load_sparsifier, read_artifact
from adaptive_sparse.gates import (
    GateConfig, GateProvider, GateSet, load_gates, read_gates_info, save_gates)
from adaptive_sparse.models import model_fingerprint, sparse_attention
from adaptive_sparse.policies import Policy
from test_gates import save_legacy_gates
from test_training import BS, N, cache_dir, cli_args, tiny_llama  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
POLICY = Policy(kind="top_k", k=2)


@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory):  # noqa: F811
    """The gates folder of a real `adaptive-sparse train` run on the tiny model's cache."""
    root = tmp_path_factory.mktemp("train")
    exe = Path(sys.executable).with_name("adaptive-sparse")
    res = subprocess.run([str(exe), "train", *cli_args(cache_dir)], cwd=root,
                         env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "runs/gates/smollm2-135m/version_0/gates"


def logits(model, provider, ids):
    with torch.no_grad(), sparse_attention(model, provider, block_size=BS):
        return model(ids).logits


def test_trained_gates_are_an_artifact_that_load_sparsifier_attaches(trained):
    model = tiny_llama()
    assert sorted(p.name for p in trained.iterdir()) == ["gates.safetensors", "manifest.json"]
    raw = read_artifact(trained)
    assert raw.kind == "gate" and raw.block_size == BS
    assert raw.manifest["content"]["policy"] is None
    assert raw.manifest["method"]["params"]["global_step"] == 4
    assert raw.fingerprint == model_fingerprint(model)  # from the target cache
    info = read_gates_info(trained.parent)
    assert info["layout"] == "artifact" and info["policy"] is None
    assert info["metadata"]["global_step"] == 4 and info["config"].block_size == BS
    gates = load_gates(trained, model)
    ids = torch.randint(0, 128, (1, N), generator=torch.Generator().manual_seed(0))
    with GateProvider(gates, POLICY, model) as live:
        want = logits(model, live, ids)
    for where in (trained, trained.parent.parent):  # the folder, or its run folder
        with load_sparsifier(model, where, policy=POLICY) as handle, torch.no_grad():
            assert handle.provider.policy == POLICY
            assert torch.equal(model(ids).logits, want)
    with pytest.raises(ValueError, match="^policy: the gate folder .* stores no policy"):
        load_sparsifier(model, trained)
    with pytest.raises(ArtifactError, match="weights_sha256"):
        load_sparsifier(tiny_llama(seed=3), trained, policy=POLICY)
    exe = Path(sys.executable).with_name("adaptive-sparse")
    res = subprocess.run([str(exe), "export", "verify", str(trained)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and json.loads(res.stdout)["kind"] == "gate", res.stderr


def test_exported_gate_artifact_loads_as_gates_and_through_settings(tmp_path):
    from adaptive_sparse.export import save_gate_artifact
    from adaptive_sparse.models import ProviderSpec, build_provider

    model = tiny_llama()
    gs = GateSet(GateConfig.from_model(model, block_size=BS, init="random"))
    path = save_gate_artifact(tmp_path / "art", gs, POLICY, model=model)
    back = load_gates(path, model)
    for a, b in zip(back.state_dict().values(), gs.state_dict().values()):
        assert torch.equal(a, b)
    ids = torch.randint(0, 128, (1, N), generator=torch.Generator().manual_seed(1))
    spec = ProviderSpec.from_setting({"pattern": "gate", "gates": str(path),
                                      "policy": POLICY.to_dict()}, block_size=BS)
    provider = build_provider(spec, model)
    try:
        got = logits(model, provider, ids)
    finally:
        provider.detach()
    with load_sparsifier(model, path), torch.no_grad():  # its own policy
        assert torch.equal(model(ids).logits, got)


def test_a_tampered_gate_folder_is_refused_on_load(trained, tmp_path):
    import shutil

    model = tiny_llama()
    for name, edit, needle in [
            ("gates.safetensors", lambda b: b[:-1] + bytes([b[-1] ^ 1]),
             "files.gates.safetensors: sha256 does not match"),
            ("manifest.json", lambda b: b.replace(b'"global_step": 4', b'"global_step": 5'),
             "manifest_sha256")]:
        copy = shutil.copytree(trained, tmp_path / name)
        data = (copy / name).read_bytes()
        (copy / name).write_bytes(edit(data))
        assert (copy / name).read_bytes() != data
        with pytest.raises(ArtifactError, match=needle):
            load_gates(copy)
        with pytest.raises(ArtifactError, match=needle):
            load_sparsifier(model, copy, policy=POLICY)


def test_old_two_file_folders_still_load_and_save_gates_converts_them(tmp_path):
    model = tiny_llama()
    gs = GateSet(GateConfig.from_model(model, block_size=BS, init="random"))
    old = save_legacy_gates(gs, tmp_path / "runs/gates/m/version_0/gates", {"global_step": 7})
    back = load_gates(tmp_path / "runs/gates/m", model)
    info = read_gates_info(tmp_path / "runs/gates/m")
    assert info["layout"] == "legacy" and info["metadata"] == {"global_step": 7}
    assert torch.equal(back[0].wq, gs[0].wq)
    with pytest.raises(ArtifactError, match="old two-file gate folder.*export gate --gates"):
        load_sparsifier(model, old, policy=POLICY)
    save_gates(load_gates(old), old)  # converts in place
    assert sorted(p.name for p in old.iterdir()) == ["gates.safetensors", "manifest.json"]
    with load_sparsifier(model, old, policy=POLICY, check="architecture"):
        pass
    assert torch.equal(load_gates(old)[1].wk, gs[1].wk)
