"""One vocabulary: the sweep evaluator's `num_seqs` is the CLI's `--num-seqs`; the old
`num_sequences` still works with a deprecation warning, like the CLI's old flags."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sweeps.cli import SweepConfig
from sweeps.evaluators import ModelEvaluator, build_evaluator

REPO = Path(__file__).resolve().parents[1]
WARNING = "warning: num_sequences is deprecated; use num_seqs"


def test_model_evaluator_takes_num_seqs_and_the_old_keyword(capsys):
    assert ModelEvaluator(num_seqs=3).num_seqs == 3
    assert ModelEvaluator().num_seqs == 4
    assert capsys.readouterr().err == ""
    assert ModelEvaluator(num_sequences=2).num_seqs == 2  # benchmarks/quality.py's spelling
    assert capsys.readouterr().err.strip() == f"ModelEvaluator: {WARNING}"
    with pytest.raises(ValueError, match="^num_sequences: expected only num_seqs"):
        ModelEvaluator(num_seqs=2, num_sequences=2)
    with pytest.raises(ValueError, match="evaluator.args: .*unexpected keyword argument 'num_seq'"):
        build_evaluator({"args": {"num_seq": 2}})


def test_shipped_sweep_config_uses_num_seqs():
    args = yaml.safe_load(SHIPPED.read_text())["evaluator"]["args"]
    assert args["num_seqs"] == 4 and "num_sequences" not in args


SHIPPED = REPO / "sweeps/configs/smollm2-frontier.yaml"


def test_old_config_key_warns_once_and_is_stored_new(tmp_path):
    """Through `adaptive-sparse sweep`: the config check renames the key (one warning) and the
    run's sweep.json holds the new name; no trial runs, so no model is loaded."""
    cfg = {"name": "vocab", "n_trials": 0, "methods": {"sliding_window": {"window": 64}},
           "evaluator": {"args": {"seq_len": 128, "num_sequences": 2}}}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(cfg))
    exe = Path(sys.executable).with_name("adaptive-sparse")
    res = subprocess.run([str(exe), "sweep", "--config", str(path), "--run-dir",
                          str(tmp_path / "run"), "--no-progress"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("deprecated") == 1
    assert f"config {str(path)!r}: warning: evaluator.args.num_sequences is deprecated; use " \
           "evaluator.args.num_seqs" in res.stderr
    stored = json.loads((tmp_path / "run" / "sweep.json").read_text())["config"]
    assert stored["evaluator"]["args"] == {"seq_len": 128, "num_seqs": 2}
    both = dict(cfg, evaluator={"args": {"num_sequences": 2, "num_seqs": 2}})
    with pytest.raises(ValueError, match="evaluator.args.num_sequences: expected only "
                                         "evaluator.args.num_seqs"):
        SweepConfig.from_dict(both)
    other = dict(cfg, evaluator={"factory": "sweeps.evaluators:SyntheticEvaluator", "args": {}})
    assert SweepConfig.from_dict(other).evaluator["args"] == {}


def test_mask_artifact_records_num_seqs(tmp_path):
    from adaptive_sparse.export import load_masks
    from adaptive_sparse.export.build import export_masks
    from adaptive_sparse.models import PatternProvider
    from test_gates import tiny_llama

    seqs = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    path = export_masks(tiny_llama(), seqs, PatternProvider("sliding_window", block_size=16,
                                                            window=32),
                        tmp_path / "m", block_size=16, method="pattern:sliding_window")
    assert load_masks(path).manifest["content"]["inputs"] == {"num_seqs": 2, "seq_len": 64}
