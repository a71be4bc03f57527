"""`make demo` (sweeps/demo.py): its one-forward screening agrees with the evaluator's screen,
and the whole demo (train, calibrate, perplexity, sweep, export) exits 0 through the installed
`adaptive-sparse demo` at tiny settings, with every step timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY = Path(sys.executable).parent / "adaptive-sparse"


def test_screens_match_the_evaluator(smollm2):
    """One recorded dense forward screens patterns and the oracle as `ModelEvaluator.screen`
    does; static patterns with identical masks are found, others are not merged."""
    from adaptive_sparse.data import load_corpus, pack, split_documents
    from sweeps.demo import Screens, same_masks
    from sweeps.evaluators import ModelEvaluator

    model, tok = smollm2
    docs = split_documents(load_corpus("default"), seed=0)["validation"]
    seqs = pack(tok, docs, 256, max_sequences=1)
    ev = ModelEvaluator(model_obj=model, sequences=seqs, block_size=32)
    screens = Screens(ev, model, seqs[:1], block_size=32, gate_params=None)
    settings = [("sliding_window", {"window": 64, "sink_blocks": 1}),
                ("vertical_slash", {"n_vertical": 2, "n_slash": 2}),
                ("oracle", {"policy": {"kind": "threshold", "tau": 0.02}, "target": "sum"}),
                ("oracle", {"policy": {"kind": "density", "density": 0.3}, "target": "sum"})]
    for family, params in settings:
        got, want = screens.screen(family, params), ev.screen(family, params)
        assert got["density"] == pytest.approx(want["density"], abs=1e-9), family
        assert got["recall"] == pytest.approx(want["recall"], abs=1e-5), family
    methods = {"sliding_window": ("sliding_window", {"window": 64, "sink_blocks": 1}, 0.0),
               "longformer": ("longformer", {"window": 64, "global_blocks": 1}, 0.0),
               "bigbird": ("bigbird", {"window": 64, "global_blocks": 1, "random_blocks": 2,
                                       "seed": 0}, 0.0),
               "strided": ("strided", {"local_blocks": 1, "stride": 3}, 0.0)}
    assert same_masks(screens, methods) == {"longformer": "sliding_window"}


def test_demo_exits_0_and_times_every_step(smollm2, tmp_path):
    """The real entry point at tiny settings: every method in the table, the densities near
    the target, each step's wall and CPU time in results.json and results.md."""
    env = os.environ | {"PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [str(ENTRY), "demo", "--out", "d", "--seq-len", "256", "--block-size", "32",
         "--train-seqs", "1", "--steps", "2", "--trials", "2", "--num-seqs", "1",
         "--density", "0.5", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    res = json.loads((tmp_path / "d/results.json").read_text())
    from sweeps.demo import pattern_knobs

    names = {r["name"] for r in res["rows"]}
    assert set(pattern_knobs(256, 32)) | {"gate (learned), threshold"} <= names
    for r in res["rows"]:
        assert 0 < r["density"] <= 1 and r["perplexity"] > 0, r["name"]
    gate = next(r for r in res["rows"] if r["family"] == "gate")
    assert abs(gate["screen_density"] - 0.5) < 0.15
    assert [s["step"] for s in res["steps"]] == ["train", "calibrate", "perplexity", "sweep",
                                                 "export", "total"]
    assert all(s["wall_s"] > 0 and s["cpu_s"] > 0 for s in res["steps"])
    assert res["threads"] >= 1
    md = (tmp_path / "d/results.md").read_text()
    assert "| calibrate |" in md and "| total |" in md
    assert res["export"]["gate_logits_equal"] and res["export"]["masks_logits_equal"]
    assert (tmp_path / "d/tradeoff.png").is_file() and (tmp_path / "d/sweep").is_dir()


def test_readme_demo_numbers_are_the_runs():
    """Every row of the README's demo table (method, density, perplexity, change) is a row of
    docs/demo/results.md, the output of the run it quotes."""
    import re

    readme = (REPO / "README.md").read_text()
    run = (REPO / "docs/demo/results.md").read_text()
    section = readme[readme.index("`make demo` trains"):readme.index("## Install by hand")]
    quoted = [ln for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln
              and not ln.startswith("| method")]
    assert len(quoted) >= 10

    def cells(line):
        return [re.sub(r"\*\*", "", c).strip() for c in line.strip("|").split("|")][:4]

    run_rows = {tuple(cells(ln)) for ln in run.splitlines() if ln.startswith("| ")}
    for line in quoted:
        assert tuple(cells(line)) in run_rows, line
