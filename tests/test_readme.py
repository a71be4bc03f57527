"""The README runs as written: every ```python block executes in a fresh namespace (in a
temporary folder), the settings example parses, and every command line of ours parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from adaptive_sparse import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_has_python_blocks():
    assert len(blocks("python")) >= 3


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs_as_written(index, tmp_path, monkeypatch, smollm2):
    monkeypatch.chdir(tmp_path)
    code = blocks("python")[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_settings_example_parses(tmp_path):
    (yaml_text,) = blocks("yaml")
    path = tmp_path / "settings.yaml"
    path.write_text(yaml_text)
    settings = cli.read_settings(str(path))
    assert [s["pattern"] for s in settings] == ["sliding_window", "bigbird", "oracle", "gate"]
    assert settings[2]["policy"] == {"kind": "top_p", "p": 0.95}


def test_command_lines_parse():
    lines = [ln for b in blocks("") for ln in b.splitlines()
             if ln.startswith("adaptive-sparse ")]
    ours = [ln for ln in lines if ln.split()[1] in ("eval", "compare", "show", "demo")]
    assert len(ours) >= 5
    parser = cli.build_parser()
    for line in ours:
        parser.parse_args(shlex.split(line)[1:])
