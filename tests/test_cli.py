"""The command line: tiny end-to-end runs on SmolLM2 and argument handling."""

from __future__ import annotations

import json

import pytest

from adaptive_sparse import cli


def test_eval_tiny_run_writes_json(smollm2, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["eval", "--seq-len", "128", "--docs", "1", "--pattern", "sliding_window",
                   "--window", "64", "--sink-blocks", "1", "--json", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads(out.read_text())
    for key in ("perplexity_dense", "perplexity", "density", "recall", "ppl_change",
                "per_layer", "fingerprint", "setting"):
        assert key in data
    assert data["setting"] == {"pattern": "sliding_window", "window": 64, "sink_blocks": 1}
    assert data["perplexity"] > 1 and data["perplexity_dense"] > 1
    assert 0 < data["density"] <= 1 and 0 < data["recall"] <= 1
    assert len(data["per_layer"]) == 30
    table = capsys.readouterr().out
    assert "ppl dense" in table and "sliding_window" in table


def test_compare_computes_dense_once(smollm2, tmp_path):
    out = tmp_path / "c.json"
    settings = json.dumps([{"name": "dense", "pattern": "dense"},
                           {"name": "oracle", "pattern": "oracle",
                            "policy": {"kind": "top_k", "k": 2}}])
    rc = cli.main(["compare", "--settings", settings, "--seq-len", "128", "--docs", "1",
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


def test_show_writes_png(smollm2, tmp_path):
    png = tmp_path / "m.png"
    rc = cli.main(["show", "--seq-len", "256", "--layer", "2", "--head", "4", "--pattern",
                   "oracle", "--policy", "top_p", "--p", "0.9", "--out", str(png)])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,message", [
    (["eval", "--pattern", "oracle", "--p", "0.9"], "policy: --pattern oracle needs --policy"),
    (["eval", "--pattern", "sliding_window", "--p", "0.9"],
     "p: not a parameter of pattern 'sliding_window'"),
    (["eval", "--pattern", "nope"], "pattern: expected one of"),
    (["eval", "--pattern", "sliding_window", "--window", "wide"], "window: expected int"),
    (["eval", "--pattern", "lsh", "--keep-sink", "maybe"], "keep_sink: expected true or false"),
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
    with pytest.raises(ValueError, match="settings: every entry needs a 'pattern' key"):
        cli.read_settings('[{"window": 3}]')
    with pytest.raises(ValueError, match="settings: expected a YAML/JSON file"):
        cli.read_settings(str(tmp_path / "missing.yaml"))


def test_passthrough_missing_module(monkeypatch, capsys):
    monkeypatch.setitem(cli.PASSTHROUGH, "train", ("no_such_pkg.cli", "train_main"))
    assert cli.main(["train", "--anything"]) == 2
    assert "not available (no_such_pkg.cli.train_main" in capsys.readouterr().err


def test_passthrough_forwards_argv(monkeypatch):
    import types
    import sys

    seen = []
    mod = types.ModuleType("fake_train_cli")
    mod.train_main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fake_train_cli", mod)
    monkeypatch.setitem(cli.PASSTHROUGH, "train", ("fake_train_cli", "train_main"))
    assert cli.main(["train", "--config", "x.yaml", "--help"]) == 0
    assert seen == [["--config", "x.yaml", "--help"]]


def test_format_table():
    t = cli.format_table([{"name": "a", "perplexity_dense": 10.0, "perplexity": 11.0,
                           "ppl_change": 0.1, "density": 0.25, "recall": None, "seconds": 3.0}])
    lines = t.splitlines()
    assert lines[0].startswith("setting") and "+10.00%" in lines[2] and "0.250" in lines[2]
