"""Gate distillation with Lightning on tiny random-model caches: KL goes down, resume is exact,
the CLI (single process and 2-process DDP on CPU) trains and exports gates, bad configs fail."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from gating.module import GateDataModule, GateDistillModule, distill_loss, group_targets
from adaptive_sparse.gates import load_gates
from gating.targets import featurize

BS, N = 16, 128
REPO = Path(__file__).resolve().parents[1]


def tiny_llama(seed=0, qk_scale=6.0):
    """A random 2-layer GQA Llama; q/k projections scaled up so attention is peaked."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                      max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(qk_scale)
            layer.self_attn.k_proj.weight.mul_(qk_scale)
    return model


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("validation", 2)):
        featurize(model, torch.randint(0, 128, (n, N), generator=g), root / split,
                  model_name="tiny", corpus="random", split=split, block_size=BS, progress=False)
    return root


def datamodule(cache_dir, **kw):
    args = dict(cache_dir=str(cache_dir), model=None, corpus="random", seq_len=N, block_size=BS,
                num_train=4, num_val=2, progress=False) | kw
    return GateDataModule(**args)


def trainer(**kw):
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**(args | kw))


def test_distill_loss_is_kl_and_zero_at_target():
    allowed = torch.ones(3, 3, dtype=torch.bool).tril()
    t = torch.rand(2, 4, 3, 3).masked_fill(~allowed, 0)
    t = t / t.sum(-1, keepdim=True)
    s = t.log().masked_fill(~allowed, float("-inf"))
    assert distill_loss(s, t, allowed).abs() < 1e-6
    assert distill_loss(s, t, allowed, "mse").abs() < 1e-10
    s2 = torch.randn(2, 4, 3, 3).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s2.double(), -1)
    want = (t.double() * (t.double().clamp_min(1e-300).log() - p.clamp_min(1e-300).log())
            ).masked_fill(~allowed, 0).sum(-1).mean()
    torch.testing.assert_close(distill_loss(s2, t, allowed).double(), want, rtol=1e-5, atol=1e-6)
    g = group_targets(t, 2)
    assert g.shape == (2, 2, 3, 3)
    torch.testing.assert_close(g.sum(-1), torch.ones(2, 2, 3))


@pytest.mark.parametrize("shared,init", [(False, "identity"), (True, "random")])
def test_tiny_training_lowers_kl(cache_dir, shared, init):
    L.seed_everything(0)
    dm = datamodule(cache_dir)
    module = GateDistillModule(dm.model_shapes, block_size=BS, share_kv_group=shared, init=init,
                               lr=2e-2, warmup_steps=2)
    dm.setup("fit")
    train_kl = lambda: trainer().validate(module, dm.train_dataloader(), verbose=False)[0]
    before = train_kl()
    trainer(max_steps=40, check_val_every_n_epoch=100).fit(module, dm)
    assert train_kl()["val/kl"] < 0.8 * before["val/kl"]
    after = trainer().validate(module, dm, verbose=False)[0]
    for key in ("val/recall@0.1", "val/recall@0.25", "val/recall@0.5", "val/density@0.01",
                "val/oracle_recall@0.5"):
        assert 0 < after[key] <= 1 + 1e-6, key
    assert after["val/recall@0.1"] <= after["val/recall@0.5"] + 1e-6
    assert after["val/recall@0.5"] <= after["val/oracle_recall@0.5"] + 1e-6


def test_resume_continues_at_same_step_with_same_state(cache_dir, tmp_path):
    """A run of 8 steps (2 epochs of 4) == 4 steps, checkpoint, resume to 8: same step count,
    same weights, optimizer and scheduler state."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt=None):
        L.seed_everything(0)
        module = GateDistillModule(block_size=BS, init="random", lr=1e-2, warmup_steps=3)
        save = ModelCheckpoint(dirpath=tmp_path / ("resumed" if ckpt else "full"),
                               every_n_epochs=1, save_top_k=-1, save_last=True)
        t = trainer(max_steps=8, limit_val_batches=0, enable_checkpointing=True,
                    callbacks=[save])
        t.fit(module, datamodule(cache_dir), ckpt_path=ckpt)
        return module, t

    full, t_full = run()
    mid = tmp_path / "full" / "epoch=0-step=4.ckpt"
    saved = torch.load(mid, weights_only=True)
    assert saved["global_step"] == 4 and saved["hyper_parameters"]["model_shapes"]["num_heads"] == 4
    resumed, t_res = run(ckpt=str(mid))
    assert t_res.global_step == t_full.global_step == 8
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    opt_full, opt_res = t_full.optimizers[0].state_dict(), t_res.optimizers[0].state_dict()
    for i, st in opt_full["state"].items():
        for name, value in st.items():
            torch.testing.assert_close(value, opt_res["state"][i][name], rtol=0, atol=0)
    assert t_full.lr_scheduler_configs[0].scheduler.state_dict() == \
        t_res.lr_scheduler_configs[0].scheduler.state_dict()
    loaded = GateDistillModule.load_from_checkpoint(tmp_path / "full" / "last.ckpt")
    torch.testing.assert_close(loaded.gates[0].wq, full.gates[0].wq, rtol=0, atol=0)


def test_datamodule_featurizes_missing_cache(tmp_path, monkeypatch):
    import adaptive_sparse.models

    model = tiny_llama()
    monkeypatch.setattr(adaptive_sparse.models, "load_model", lambda name: (model, None))
    dm = datamodule(tmp_path / "c", model="tiny", seq_len=64, num_train=2, num_val=1)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 2 and len(dm.val_dataloader()) == 1
    assert dm.model_shapes["num_kv_heads"] == 2
    monkeypatch.setattr(adaptive_sparse.models, "load_model", lambda name: pytest.fail("reload"))
    dm.prepare_data()
    with pytest.raises(ValueError, match="^model: the cache at"):
        datamodule(tmp_path / "c", model="another-model", seq_len=64).prepare_data()
    with pytest.raises(ValueError, match="^seq_len: the cache at"):
        datamodule(tmp_path / "c", model="tiny", seq_len=128).prepare_data()


def test_bad_configs_raise(cache_dir, tmp_path):
    shapes = dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="^q_pooling: expected"):
        GateDistillModule(model_shapes=shapes, block_size=BS, q_pooling=("median",))
    with pytest.raises(ValueError, match="^gate_dim: expected"):
        GateDistillModule(model_shapes=shapes, block_size=BS, gate_dim=0)
    with pytest.raises(ValueError, match="^block_size: expected"):
        GateDistillModule(model_shapes=shapes, block_size=48)
    with pytest.raises(ValueError, match="^loss: expected"):
        GateDistillModule(loss="l1")
    with pytest.raises(ValueError, match="^k_pooling: expected"):
        GateDistillModule(block_size=BS, k_pooling=("max", "median"))
    with pytest.raises(ValueError, match="^gate_dim: expected"):
        GateDistillModule(block_size=BS, gate_dim=-8, init="random")
    with pytest.raises(ValueError, match="^block_size: expected"):
        datamodule(cache_dir, block_size=48)
    with pytest.raises(ValueError, match="^block_size: the cache at"):
        datamodule(cache_dir, block_size=32).prepare_data()
    with pytest.raises(ValueError, match="^model: expected a model to featurize"):
        datamodule(tmp_path / "empty").prepare_data()


def cli(args, cwd, timeout=300):
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gating.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def cli_args(cache_dir):
    return ["--data.cache_dir", str(cache_dir), "--data.model", "null", "--data.corpus",
            "random", "--data.seq_len", str(N), "--data.block_size", str(BS),
            "--data.num_train", "4", "--data.num_val", "2", "--data.progress", "false",
            "--trainer.accelerator", "cpu", "--trainer.max_steps", "4",
            "--trainer.enable_progress_bar", "false"]


def test_cli_print_config_uses_shipped_yaml(tmp_path):
    r = cli(["--config", str(REPO / "gating/configs/smollm2-135m.yaml"), "--print_config",
             "--model.lr", "0.005"], tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lr: 0.005" in r.stdout and "block_size: 64" in r.stdout
    assert "monitor: val/kl" in r.stdout


def check_run(root: Path):
    run = root / "runs/gates/smollm2-135m/version_0"
    assert (run / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts), ckpts
    state = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert state["global_step"] == 4
    assert any(k.startswith("gates.0.wq") for k in state["state_dict"])
    gates = load_gates(run / "gates")
    assert gates.config.block_size == BS and len(gates) == 2
    assert (run / "metrics.csv").is_file()
    assert list((root / "runs/gates/smollm2-135m/tensorboard").glob("version_0/events.*"))
    return state


def test_cli_single_process_trains_and_exports(cache_dir, tmp_path):
    r = cli(cli_args(cache_dir), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    check_run(tmp_path)


@pytest.mark.slow
def test_cli_ddp_two_processes_on_cpu(cache_dir, tmp_path):
    """2 gloo processes on CPU (95 s on the shared 2-core machine, hence `slow`)."""
    r = cli([*cli_args(cache_dir), "--trainer.strategy", "ddp", "--trainer.devices", "2"],
            tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    state = check_run(tmp_path)
    assert not (tmp_path / "runs/gates/smollm2-135m/version_1").exists()
    single = tmp_path / "single"
    single.mkdir()
    r = cli(cli_args(cache_dir), single)
    assert r.returncode == 0, r.stderr[-3000:]
    other = torch.load(single / "runs/gates/smollm2-135m/version_0/checkpoints/last.ckpt",
                       weights_only=True)
    assert set(other["state_dict"]) == set(state["state_dict"])
    assert other["hyper_parameters"]["model_shapes"] == state["hyper_parameters"]["model_shapes"]


@pytest.mark.parametrize("target", ["max", "sum"])
def test_distillation_target_is_the_named_block_map(cache_dir, target):
    """`target` picks the cached map the gate is distilled to: the step's KL equals
    distill_loss against that map, each row normalized."""
    from adaptive_sparse.masks import block_causal

    L.seed_everything(0)
    dm = datamodule(cache_dir)
    module = GateDistillModule(dm.model_shapes, block_size=BS, target=target)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module.log = lambda *a, **k: None  # outside a trainer
    got = module._step(batch, "train")
    n = batch["tokens"].shape[-1]
    allowed = block_causal(n, n, BS, device=batch["tokens"].device)
    c = module.gate_config
    want = []
    for layer, gate in enumerate(module.gates):
        scores = gate.score_pooled({p: batch[f"L{layer}.q.{p}"] for p in c.q_pooling},
                                   {p: batch[f"L{layer}.k.{p}"] for p in c.k_pooling},
                                   q_len=n, kv_len=n)
        t = batch[f"L{layer}.block_{target}"].float()
        want.append(distill_loss(scores, t / t.sum(-1, keepdim=True).clamp_min(1e-30), allowed))
    torch.testing.assert_close(got, torch.stack(want).mean())
    with pytest.raises(ValueError, match="^target: expected one of"):
        GateDistillModule(target="mean")
