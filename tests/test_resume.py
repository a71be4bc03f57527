"""Training resumes where it stopped, through the real entry point: a run killed with SIGKILL
mid-training and resumed with --ckpt_path continues in the same run folder, keeps its best
checkpoint and score, and exports the same gate files, byte for byte, as an uninterrupted run
with the same seed. Bad --ckpt_path / --trainer.max_steps values are refused with exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from test_training import BS, N, cache_dir  # noqa: F401 (the tiny featurized cache)

REPO = Path(__file__).resolve().parents[1]
RUN = Path("runs/gates/smollm2-135m")


def _args(cache: Path, steps: int = 90) -> list[str]:
    return ["train", "--config", str(REPO / "gating/configs/smollm2-135m.yaml"),
            "--data.cache_dir", str(cache), "--data.model", "null", "--data.corpus", "random",
            "--data.seq_len", str(N), "--data.block_size", str(BS), "--data.num_train", "4",
            "--data.num_val", "2", "--data.progress", "false", "--data.num_threads", "1",
            "--trainer.accelerator", "cpu", "--trainer.max_steps", str(steps),
            "--trainer.check_val_every_n_epoch", "2", "--trainer.enable_progress_bar", "false",
            "--model.warmup_steps", "4", "--checkpoint_every_n_steps", "3"]


def _train(args: list[str], cwd: Path, **kw):
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "adaptive_sparse.cli", *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kw)


def _run(args: list[str], cwd: Path, timeout: float = 240) -> tuple[int, str]:
    p = _train(args, cwd)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    return p.returncode, out


def _step(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # not written yet
        return -1


def _best(run: Path) -> tuple[str, float]:
    state = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    cb = next(v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint"))
    return Path(cb["best_model_path"]).name, float(cb["best_model_score"])


def test_kill_9_then_resume_matches_uninterrupted_run(cache_dir, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir(), cut.mkdir()
    rc, out = _run(_args(cache_dir), full)
    assert rc == 0, out[-3000:]

    proc = _train(_args(cache_dir), cut)
    last = cut / RUN / "version_0/checkpoints/last.ckpt"
    deadline, killed_at = time.time() + 180, None
    try:
        while time.time() < deadline and proc.poll() is None:
            step = _step(last) if last.exists() else -1
            if step >= 21:  # past the first best checkpoint (validation every 8 steps)
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = step
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.communicate(timeout=60)
    assert killed_at is not None, "training ended before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / RUN / "version_0/gates").exists()
    assert _step(last) < 90

    rc, out = _run([*_args(cache_dir), "--ckpt_path", str(last)], cut)
    assert rc == 0, out[-3000:]
    assert sorted(p.name for p in (cut / RUN).iterdir()) == ["tensorboard", "version_0"]
    assert [p.name for p in (cut / RUN / "tensorboard").iterdir()] == ["version_0"]
    run_full, run_cut = full / RUN / "version_0", cut / RUN / "version_0"
    assert _best(run_cut) == _best(run_full)
    assert _step(run_cut / "checkpoints/last.ckpt") == _step(run_full / "checkpoints/last.ckpt")
    for name in ("manifest.json", "gates.safetensors"):
        assert (run_cut / "gates" / name).read_bytes() == (run_full / "gates" / name).read_bytes()


def test_bad_resume_and_step_values_exit_2(cache_dir, tmp_path):
    foreign = tmp_path / "foreign.ckpt"  # a torch zip outside any run folder
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("archive/data.pkl", b"not what it seems")
    cases = [
        (["--ckpt_path", "https://example.com/last.ckpt"], "--ckpt_path", "URL"),
        (["--ckpt_path", str(foreign)], "--ckpt_path", "inside a run folder"),
        (["--trainer.max_steps", "-5"], "trainer.max_steps", "expected a positive int"),
    ]
    for extra, name, why in cases:
        rc, out = _run([*_args(cache_dir), *extra], tmp_path, timeout=120)
        assert rc == 2, (extra, out[-2000:])
        assert name in out and why in out and "Traceback" not in out, (extra, out[-2000:])
    assert not (tmp_path / "runs").exists()


def test_check_resume_refuses_what_the_run_did_not_write(tmp_path):
    from gating.cli import check_resume

    run = tmp_path / "runs/gates/x/version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text('{"loggers": []}')
    garbage = run / "checkpoints/garbage.ckpt"
    garbage.write_bytes(os.urandom(4096))
    pickled = run / "checkpoints/pickled.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "loops": {}, "x": Path("p")}, pickled)
    plain = run / "checkpoints/plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    for path, why in ((tmp_path / "missing.ckpt", "no such file"),
                      (run / "checkpoints", "a folder"),
                      ("s3://bucket/last.ckpt", "URL"),
                      (garbage, "not a checkpoint written by training"),
                      (pickled, "not a checkpoint written by training"),
                      (plain, "not a Lightning training checkpoint")):
        with pytest.raises(ValueError, match=f"--ckpt_path: .*{why}"):
            check_resume(str(path))
