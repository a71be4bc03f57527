"""The command line: tiny end-to-end runs on SmolLM2, and every command's exit status through
the installed `adaptive-sparse` entry point (a subprocess, nothing faked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptive_sparse import cli

REPO = Path(__file__).resolve().parents[1]
ENTRY = Path(sys.executable).parent / "adaptive-sparse"
TEXT = ("The quick brown fox jumps over the lazy dog while the river keeps flowing past the old "
        "mill, and every evening the miller counts the sacks of flour he ground that day. ") * 40


def run(args, cwd, timeout=300):
    """`adaptive-sparse ARGS` as a user runs it; returns the CompletedProcess."""
    env = os.environ | {"PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    return subprocess.run([str(ENTRY), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc.stdout


def refused(proc, *names) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    for name in names:
        assert name in proc.stderr, proc.stderr[-2000:]
    return proc.stderr


def test_eval_tiny_run_writes_json(smollm2, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["eval", "--seq-len", "128", "--num-seqs", "1", "--pattern", "sliding_window",
                   "--param", "window=64", "--param", "sink_blocks=1", "--json", str(out),
                   "--no-progress"])
    assert rc == 0
    data = json.loads(out.read_text())
    for key in ("perplexity_dense", "perplexity", "density", "recall", "ppl_change",
                "per_layer", "fingerprint", "setting", "num_seqs"):
        assert key in data
    assert data["setting"] == {"pattern": "sliding_window", "window": 64, "sink_blocks": 1}
    assert data["perplexity"] > 1 and data["perplexity_dense"] > 1
    assert 0 < data["density"] <= 1 and 0 < data["recall"] <= 1
    assert len(data["per_layer"]) == 30
    table = capsys.readouterr().out
    assert "ppl dense" in table and "sliding_window" in table


def test_deprecated_flags_still_work_and_warn(smollm2, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["eval", "--seq-len", "128", "--docs", "1", "--pattern", "sliding_window",
                   "--window", "64", "--json", str(out), "--no-progress", "--no-recall"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "--docs is deprecated; use --num-seqs" in err
    assert "--window is deprecated; use --param window=VALUE" in err
    assert json.loads(out.read_text())["setting"] == {"pattern": "sliding_window", "window": 64}


def test_compare_computes_dense_once(smollm2, tmp_path):
    out = tmp_path / "c.json"
    settings = json.dumps([{"name": "dense", "pattern": "dense"},
                           {"name": "oracle", "pattern": "oracle",
                            "policy": {"kind": "top_k", "k": 2}}])
    rc = cli.main(["compare", "--settings", settings, "--seq-len", "128", "--num-seqs", "1",
                   "--block-size", "32",
                   "--json", str(out), "--plot", str(tmp_path / "t.png"), "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    assert [r["name"] for r in res] == ["dense", "oracle"]
    assert res[0]["perplexity"] == pytest.approx(res[0]["perplexity_dense"], rel=1e-4)
    assert res[0]["density"] == 1.0 and res[0]["recall"] == 1.0
    assert res[1]["seconds_dense"] == 0.0  # served from the dense cache
    assert res[1]["density"] == pytest.approx(7 / 10)  # sink + diagonal of 4 blocks
    assert res[1]["perplexity"] != res[0]["perplexity"]
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_user_text_file_evaluates_with_defaults(smollm2, tmp_path, capsys):
    """One file of the user's: evaluated whole by default; --split validation takes the
    validation part of the document, cut by position, and says so."""
    f = tmp_path / "my.txt"
    f.write_text(TEXT)
    assert cli.main(["eval", "--corpus", str(f), "--seq-len", "128", "--num-seqs", "2",
                     "--pattern", "sliding_window", "--param", "window=64", "--no-progress",
                     "--no-recall"]) == 0
    err = capsys.readouterr().err
    assert f"corpus {f}: all 1 document(s); 2 sequence(s) of 128 tokens" in err
    assert cli.main(["eval", "--corpus", str(f), "--split", "validation", "--seq-len", "128",
                     "--num-seqs", "1", "--no-progress", "--no-recall"]) == 0
    assert "cut by position" in capsys.readouterr().err
    jl = tmp_path / "small.jsonl"
    jl.write_text("\n".join(json.dumps({"text": TEXT[i::3]}) for i in range(3)))
    assert cli.main(["eval", "--corpus", str(jl), "--seq-len", "128", "--num-seqs", "1",
                     "--no-progress", "--no-recall"]) == 0
    short = tmp_path / "short.txt"
    short.write_text("Only a few words.")
    assert cli.main(["eval", "--corpus", str(short), "--seq-len", "128", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "seq_len: the documents hold" in err and "--seq-len" in err


def test_show_writes_png(smollm2, tmp_path):
    png = tmp_path / "m.png"
    rc = cli.main(["show", "--seq-len", "256", "--layer", "2", "--head", "4", "--pattern",
                   "oracle", "--policy", "top_p", "--param", "p=0.9", "--out", str(png)])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seq_len_beyond_the_model_is_refused(smollm2, capsys):
    limit = smollm2[0].config.max_position_embeddings
    assert cli.main(["eval", "--seq-len", str(limit + 1), "--num-seqs", "1",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--seq-len: expected at most {limit}" in err and "max_position_embeddings" in err


@pytest.mark.parametrize("argv,message", [
    (["eval", "--pattern", "oracle", "--param", "p=0.9"], "policy: --pattern oracle needs"),
    (["eval", "--pattern", "sliding_window", "--param", "p=0.9"],
     "p: not a parameter of pattern 'sliding_window'"),
    (["eval", "--pattern", "nope"], "pattern: expected one of"),
    (["eval", "--pattern", "sliding_window", "--param", "window=wide"], "window: expected int"),
    (["eval", "--pattern", "lsh", "--param", "keep_sink=maybe"],
     "keep_sink: expected true or false"),
    (["eval", "--pattern", "sliding_window", "--policy", "top_p"],
     "policy: only the oracle takes a policy"),
])
def test_bad_arguments_exit_2_with_message(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_make_setting_converts_types():
    s = cli.make_setting("oracle", "top_p", {"p": "0.95", "keep_sink": "false",
                                             "target": "max"})
    assert s == {"pattern": "oracle", "policy": {"kind": "top_p", "p": 0.95, "keep_sink": False},
                 "target": "max"}
    s = cli.make_setting("bigbird", None, {"window": "128", "random_blocks": 2})
    assert s == {"pattern": "bigbird", "window": 128, "random_blocks": 2}
    assert cli.setting_name(s) == "bigbird window=128 random_blocks=2"


def test_read_settings_yaml(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("- {name: w, pattern: sliding_window, window: 256}\n"
                 "- {pattern: oracle, policy: {kind: density, density: 0.25}}\n")
    s = cli.read_settings(str(f))
    assert s[0] == {"pattern": "sliding_window", "window": 256, "name": "w"}
    assert s[1]["policy"] == {"kind": "density", "density": 0.25}
    with pytest.raises(ValueError, match="entry 0: every entry needs a 'pattern' key"):
        cli.read_settings('[{"window": 3}]')
    with pytest.raises(ValueError, match="--settings: expected a YAML/JSON file"):
        cli.read_settings(str(tmp_path / "missing.yaml"))


def test_format_table():
    t = cli.format_table([{"name": "a", "perplexity_dense": 10.0, "perplexity": 11.0,
                           "ppl_change": 0.1, "density": 0.25, "recall": None, "seconds": 3.0}])
    lines = t.splitlines()
    assert lines[0].startswith("setting") and "+10.00%" in lines[2] and "0.250" in lines[2]


# ---- every command through the real entry point -------------------------------------------

@pytest.fixture(scope="module")
def gate_cache(tmp_path_factory):
    """A featurized cache of a tiny random Llama: `adaptive-sparse train` on it takes seconds."""
    from gating.targets import featurize
    from test_gates import tiny_llama  # tests/ is on sys.path (rootdir-relative test modules)

    root = tmp_path_factory.mktemp("gate_cache")
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 2), ("validation", 1)):
        featurize(model, torch.randint(0, 128, (n, 128), generator=g), root / split,
                  model_name="tiny", corpus="random", split=split, block_size=32,
                  progress=False)
    return root


def test_train_exits_0_after_training_and_writes_gates(gate_cache, tmp_path):
    """Issue 11: train used to exit 1 after success (its LightningCLI object cast to int)."""
    out = ok(run(["train", "--data.cache_dir", gate_cache, "--data.model", "null",
                  "--data.corpus", "random", "--data.seq_len", "128", "--data.block_size", "32",
                  "--data.num_train", "2", "--data.num_val", "1", "--data.progress", "false",
                  "--trainer.accelerator", "cpu", "--trainer.max_steps", "2",
                  "--trainer.enable_progress_bar", "false"], tmp_path))
    gates = tmp_path / "runs/gates/smollm2-135m/version_0/gates"
    assert (gates / "manifest.json").is_file(), out
    refused(run(["train", "--trainer.max_steps", "-3", "--data.cache_dir", gate_cache,
                 "--data.model", "null", "--data.corpus", "random", "--data.seq_len", "128",
                 "--data.block_size", "32", "--data.num_train", "2", "--data.num_val", "1"],
                tmp_path), "max_steps")


def test_help_names_the_program(tmp_path):
    for command in ("train", "sweep", "export"):
        out = ok(run([command, "--help"], tmp_path))
        assert f"adaptive-sparse {command}" in out, out[:500]
    top = ok(run(["--help"], tmp_path))
    assert "handed to" not in top and "gating.cli" not in top
    for command in ("eval", "compare", "show", "demo"):
        out = ok(run([command, "--help"], tmp_path))
        assert out.startswith(f"usage: adaptive-sparse {command}")
        assert "--window" not in out  # one way to give parameters: --param NAME=VALUE


def test_every_flag_has_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.choices and "eval" in a.choices)
    for name in ("eval", "compare", "show", "demo"):
        for action in sub.choices[name]._actions:
            if action.option_strings and action.help != "==SUPPRESS==":
                assert action.help, (name, action.option_strings)


def test_model_commands_exit_0(smollm2, tmp_path):
    """eval, compare, show, demo --patterns-only and export: tiny settings, status 0."""
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    ok(run(["eval", "--corpus", text, "--seq-len", 128, "--num-seqs", 1, "--pattern",
            "sliding_window", "--param", "window=64", "--no-progress", "--json", "e.json"],
           tmp_path))
    assert json.loads((tmp_path / "e.json").read_text())["num_seqs"] == 1
    ok(run(["compare", "--corpus", text, "--seq-len", 128, "--num-seqs", 1, "--settings",
            '[{"pattern": "dense"}, {"pattern": "strided", "local_blocks": 1, "stride": 2}]',
            "--block-size", 32, "--no-progress"], tmp_path))
    ok(run(["show", "--corpus", text, "--seq-len", 128, "--block-size", 32, "--out", "m.png"],
           tmp_path))
    ok(run(["demo", "--patterns-only", "--seq-len", 128, "--num-seqs", 1, "--out", "d",
            "--no-progress"], tmp_path))
    assert (tmp_path / "d/results.json").is_file() and (tmp_path / "d/tradeoff.png").is_file()
    ok(run(["export", "masks", "--corpus", text, "--seq-len", 128, "--pattern",
            "sliding_window", "--param", "window=64", "--out", "art"], tmp_path))
    ok(run(["export", "verify", "art"], tmp_path))


def test_sweep_and_frontier_exit_0(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: t\nrun_dir: run\nn_trials: 3\nseed: 0\nn_startup_trials: 2\n"
                   "evaluator: {factory: 'sweeps.evaluators:SyntheticEvaluator'}\n"
                   "methods:\n  oracle/density: {density: {low: 0.1, high: 0.9}, target: sum}\n")
    ok(run(["sweep", "--config", cfg, "--no-progress"], tmp_path))
    ok(run(["frontier", "run"], tmp_path))


@pytest.mark.parametrize("args,names", [
    (["eval", "--num-seqs", "0"], ["--num-seqs"]),
    (["show", "--doc", "-1"], ["--doc"]),
    (["compare", "--settings", "nope.yaml"], ["--settings", "nope.yaml"]),
    (["demo", "--density", "1.5"], ["--density"]),
    (["train", "--config", "missing.yaml"], ["--config", "missing.yaml"]),
    (["train", "--ckpt_path", "https://example.com/x.ckpt"], ["--ckpt_path"]),
    (["sweep", "--config", "missing.yaml"], ["--config"]),
    (["frontier", "no_such_run"], ["no_such_run"]),
    (["export", "verify", "no_such_artifact"], ["no_such_artifact"]),
])
def test_every_command_refuses_with_status_2(args, names, tmp_path):
    refused(run(args, tmp_path, timeout=120), *names)
