"""Gate checkpoints: what training writes and what `eval --gates`, sweeps and export read.

A checkpoint is a directory with two files, written together atomically (`adaptive_sparse.io`):
  gates.safetensors   the GateSet's state_dict (`<layer>.wq`, `<layer>.wk`), never a pickle
  gates.json          {"format": "adaptive-sparse-gates", "version": 1, "config": GateConfig,
                       "weights_sha256": hex, "metadata": {...}}
Loading is as strict as an artifact's (`adaptive_sparse.export`): bad JSON, a missing or wrong
key, a weights file that is a symlink, too large, of another sha256, with other tensor names or
shapes than the config declares, or with non-finite values are refused with a ValueError naming
the file and the field; sizes are checked against the tensors present before anything is
allocated. `load_gates` also reads a gate artifact (`export gate`), which holds the same weights.

`resolve_gates_dir` turns what a user names into a checkpoint directory: the directory itself,
a training version folder (`.../version_N`, holding `gates/`), or a run folder
(`runs/gates/<name>`: the latest `version_N` that holds gates).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import torch

from adaptive_sparse.errors import fail
from adaptive_sparse.gates.network import GateConfig, GateSet, check_model_shapes, gate_state_shapes
from adaptive_sparse.io import atomic_write_dir, open_in, read_dir_consistent

GATES_FORMAT = "adaptive-sparse-gates"
GATES_VERSION = 1
WEIGHTS_FILE = "gates.safetensors"
CONFIG_FILE = "gates.json"
MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 1 << 32
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEYS = ("format", "version", "config", "weights_sha256", "metadata")


def save_gates(gate_set: GateSet, directory, *, metadata: dict | None = None) -> Path:
    """Write `gates.safetensors` + `gates.json` as directory `directory` (atomically, replacing
    an earlier checkpoint or an empty directory there); returns it."""
    from safetensors.torch import save

    if not isinstance(gate_set, GateSet):
        raise fail("gate_set", "a GateSet", type(gate_set).__name__, cls=TypeError)
    if metadata is not None and not isinstance(metadata, dict):
        raise fail("metadata", "a dict or None", type(metadata).__name__, cls=TypeError)
    state = {k: v.detach().contiguous().cpu() for k, v in gate_set.state_dict().items()}
    data = save(state)
    info = {"format": GATES_FORMAT, "version": GATES_VERSION, "config": gate_set.config.to_dict(),
            "weights_sha256": hashlib.sha256(data).hexdigest(), "metadata": metadata or {}}
    text = json.dumps(info, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"
    directory = Path(directory)
    if directory.is_dir() and not directory.is_symlink() and not any(directory.iterdir()):
        directory.rmdir()
    return atomic_write_dir(directory, {WEIGHTS_FILE: data, CONFIG_FILE: text.encode()},
                            overwrite=True, marker=CONFIG_FILE)


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _parse_info(data: bytes, where: str) -> dict:
    try:
        info = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{where}: expected UTF-8 JSON, got {type(e).__name__}: "
                         f"{str(e)[:120]}") from None
    if not isinstance(info, dict):
        raise fail(where, "a JSON object", type(info).__name__)
    if info.get("format") != GATES_FORMAT:
        raise fail(f"{where}: format", repr(GATES_FORMAT), info.get("format"))
    if info.get("version") != GATES_VERSION:
        raise fail(f"{where}: version", str(GATES_VERSION), info.get("version"))
    missing = [k for k in _KEYS if k not in info]
    if missing:
        raise fail(f"{where}: {missing[0]}", "a value (key missing)", None)
    extra = sorted(set(info) - set(_KEYS))
    if extra:
        raise fail(f"{where}: {extra[0]}", f"no such key (allowed: {', '.join(_KEYS)})", extra[0])
    digest = info["weights_sha256"]
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise fail(f"{where}: weights_sha256", "64 lowercase hex digits", digest)
    if not isinstance(info["metadata"], dict):
        raise fail(f"{where}: metadata", "an object", type(info["metadata"]).__name__)
    try:
        info["config"] = GateConfig.from_dict(info["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: config: {e}") from None
    return info


def read_gates_info(directory) -> dict:
    """The checked gates.json of a checkpoint directory, with "config" as a GateConfig."""
    directory = _checkpoint_dir(directory)
    data = read_dir_consistent(directory, lambda fd: _read(fd, CONFIG_FILE, MAX_CONFIG_BYTES))
    return _parse_info(data, str(directory / CONFIG_FILE))


def _read(dir_fd: int, name: str, cap: int) -> bytes:
    try:
        return open_in(dir_fd, name, max_bytes=cap)
    except FileNotFoundError:
        raise fail("directory", f"a gate checkpoint holding {name}", "a folder without it") \
            from None
    except (PermissionError, ValueError) as e:
        raise ValueError(f"{name}: {str(e).split(': ', 1)[-1]}") from None


def check_gate_state(config: GateConfig, state: dict, where: str) -> None:
    """Refuse a state dict whose tensor names, shapes or dtypes differ from what `config`
    declares, or with non-finite values (ValueError naming `where` and the tensor). Runs before
    any GateSet is allocated."""
    expected = gate_state_shapes(config)
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:3]
        extra = sorted(set(state) - set(expected))[:3]
        raise ValueError(f"{where}: tensor names do not match the gate config (missing "
                         f"{missing}, unexpected {extra})")
    for name, t in state.items():
        if tuple(t.shape) != expected[name] or t.dtype != torch.float32:
            raise ValueError(f"{where}: {name}: expected float32 {expected[name]}, got "
                             f"{t.dtype} {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {name}: expected finite values (found NaN or inf)")


def gate_set_from_state(config: GateConfig, state: dict, where: str) -> GateSet:
    """A GateSet (eval mode, CPU) from a checked state dict (see `check_gate_state`)."""
    check_gate_state(config, state, where)
    with torch.device("cpu"):
        gate_set = GateSet(config)
    gate_set.load_state_dict(state, strict=True)
    return gate_set.eval()


def load_gates(directory, model=None, *, map_location="cpu") -> GateSet:
    """Load a gate set saved by `save_gates` (or the gates of a gate artifact). With `model`,
    refuse gates built for other shapes (the message names the differing field). `directory`
    goes through `resolve_gates_dir`."""
    directory = resolve_gates_dir(directory)
    if (directory / "manifest.json").is_file() and not (directory / CONFIG_FILE).exists():
        from adaptive_sparse.export.gates import load_gate_artifact

        gate_set = load_gate_artifact(directory).gate_set
    else:
        gate_set = read_dir_consistent(directory, lambda fd: _load(fd, directory))
    if model is not None:
        check_model_shapes(gate_set.config, model)
    return gate_set.to(map_location)


def _load(dir_fd: int, directory: Path) -> GateSet:
    from safetensors.torch import load

    info = _parse_info(_read(dir_fd, CONFIG_FILE, MAX_CONFIG_BYTES), str(directory / CONFIG_FILE))
    config = info["config"]
    where = str(directory / WEIGHTS_FILE)
    want = sum(math.prod(s) for s in gate_state_shapes(config).values()) * 4
    data = _read(dir_fd, WEIGHTS_FILE, min(MAX_WEIGHTS_BYTES, want + (1 << 20)))
    digest = hashlib.sha256(data).hexdigest()
    if digest != info["weights_sha256"]:
        raise fail(where, f"sha256 {info['weights_sha256']} (from {CONFIG_FILE})", digest)
    try:
        state = load(data)
    except Exception as e:  # safetensors raises its own error types on malformed input
        raise ValueError(f"{where}: expected a safetensors file, got {type(e).__name__}: "
                         f"{str(e)[:120]}") from None
    return gate_set_from_state(config, state, where)


def _checkpoint_dir(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise fail("gates", "a gate directory path", type(path).__name__, cls=TypeError)
    return Path(path)


def _versions(run: Path) -> list[Path]:
    found = []
    for child in run.iterdir() if run.is_dir() else ():
        m = re.fullmatch(r"version_(\d+)", child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def resolve_gates_dir(path) -> Path:
    """The gate checkpoint directory a user means by `path`:
    - a checkpoint (holds gates.json) or a gate artifact (manifest.json): itself;
    - a training version folder holding `gates/`: that;
    - a run folder (`runs/gates/<name>`): the highest `version_N` holding `gates/gates.json`.
    ValueError naming `gates` and what was looked for when none is found."""
    p = _checkpoint_dir(path)
    if (p / CONFIG_FILE).is_file() or (p / "manifest.json").is_file():
        return p
    if (p / "gates" / CONFIG_FILE).is_file():
        return p / "gates"
    for version in reversed(_versions(p)):
        if (version / "gates" / CONFIG_FILE).is_file():
            return version / "gates"
    what = "does not exist" if not p.exists() else (
        "is not a directory" if not p.is_dir() else
        f"holds no {CONFIG_FILE}, gates/{CONFIG_FILE} or version_N/gates/{CONFIG_FILE}")
    raise ValueError(f"gates: expected a gate checkpoint (a folder with {CONFIG_FILE}), a "
                     f"training version folder or a run folder such as runs/gates/<name>; "
                     f"{str(path)!r} {what} (train gates with `adaptive-sparse train`)")
