"""Gate checkpoints: what training writes and what `eval --gates`, sweeps, export and
`load_sparsifier` read.

One format: a gate folder is a gate artifact (`adaptive_sparse.export.gates`: `manifest.json`
+ `gates.safetensors`, written all at once by `adaptive_sparse.io.atomic_write_dir`, the
manifest and every file's sha256 verified on each load; never a pickle). `save_gates` writes one
with no policy (chosen later) and the base model's fingerprint when the caller knows it;
`export gate` writes the same format with a policy. Loading is strict: a tampered manifest or
weights file, tensor names or shapes other than the config declares (checked against the tensors
present before anything is allocated), non-finite values or a symlinked file are refused with a
ValueError (`ArtifactError`) naming the file and the field.

Old folders (written before the formats were merged: `gates.json` {"format":
"adaptive-sparse-gates", "version": 1, "config", "weights_sha256", "metadata"} +
`gates.safetensors`) still load, read-only and as strictly (their own sha256 and shape checks).
Nothing writes them any more: `save_gates` over an old folder replaces it with the new layout,
and `adaptive-sparse export gate --gates OLD ...` converts one into an artifact with a policy.

`resolve_gates_dir` turns what a user names into a gate folder: the folder itself, a training
version folder (`.../version_N`, holding `gates/`), or a run folder (`runs/gates/<name>`: the
latest `version_N` that holds gates).
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
from adaptive_sparse.io import open_in, read_dir_consistent

MANIFEST = "manifest.json"
WEIGHTS_FILE = "gates.safetensors"
LEGACY_FORMAT = "adaptive-sparse-gates"
LEGACY_VERSION = 1
LEGACY_FILE = "gates.json"
MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 1 << 32
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEYS = ("format", "version", "config", "weights_sha256", "metadata")


def save_gates(gate_set: GateSet, directory, *, metadata: dict | None = None, model=None,
               policy=None) -> Path:
    """Write `gate_set` as a gate artifact at `directory` (atomically, replacing an earlier gate
    folder, new or old layout, or an empty directory there); returns it.

    metadata: stored as the artifact's `method.params` (training: global_step, source);
    model: the base model or its fingerprint dict, when known; policy: usually None."""
    from adaptive_sparse.export.gates import save_gate_artifact

    if metadata is not None and not isinstance(metadata, dict):
        raise fail("metadata", "a dict or None", type(metadata).__name__, cls=TypeError)
    directory = Path(directory)
    if directory.is_dir() and not directory.is_symlink() and not any(directory.iterdir()):
        directory.rmdir()
    old = (directory / LEGACY_FILE).is_file() and not (directory / MANIFEST).exists()
    return save_gate_artifact(directory, gate_set, policy, model=model, method="gates",
                              params=metadata, overwrite=True,
                              replaces=LEGACY_FILE if old else MANIFEST)


def is_legacy(directory) -> bool:
    """Whether `directory` holds an old two-file gate folder (gates.json, no manifest.json)."""
    directory = Path(directory)
    return (directory / LEGACY_FILE).is_file() and not (directory / MANIFEST).exists()


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _parse_legacy(data: bytes, where: str) -> dict:
    """The checked gates.json of an old folder, with "config" as a GateConfig."""
    try:
        info = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{where}: expected UTF-8 JSON, got {type(e).__name__}: "
                         f"{str(e)[:120]}") from None
    if not isinstance(info, dict):
        raise fail(where, "a JSON object", type(info).__name__)
    if info.get("format") != LEGACY_FORMAT:
        raise fail(f"{where}: format", repr(LEGACY_FORMAT), info.get("format"))
    if info.get("version") != LEGACY_VERSION:
        raise fail(f"{where}: version", str(LEGACY_VERSION), info.get("version"))
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
    """What a gate folder declares, without reading its weights: {"config": GateConfig,
    "metadata": dict, "policy": dict | None, "model": fingerprint | None, "layout":
    "artifact" | "legacy"}. `directory` goes through `resolve_gates_dir`."""
    from adaptive_sparse.export.format import parse_manifest

    directory = resolve_gates_dir(directory)
    if is_legacy(directory):
        data = read_dir_consistent(directory,
                                   lambda fd: _read(fd, LEGACY_FILE, MAX_CONFIG_BYTES))
        info = _parse_legacy(data, str(directory / LEGACY_FILE))
        return {"config": info["config"], "metadata": info["metadata"], "policy": None,
                "model": None, "layout": "legacy"}
    from adaptive_sparse.export.format import MAX_MANIFEST_BYTES

    m = parse_manifest(read_dir_consistent(
        directory, lambda fd: _read(fd, MANIFEST, MAX_MANIFEST_BYTES)))
    if m["kind"] != "gate":
        raise fail("gates", "a gate folder (an artifact of kind 'gate')",
                   f"kind {m['kind']!r} at {directory}")
    try:
        config = GateConfig.from_dict(m["content"].get("gate_config"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"manifest.content.gate_config: {e}") from None
    return {"config": config, "metadata": m["method"]["params"],
            "policy": m["content"].get("policy"), "model": m["model"], "layout": "artifact"}


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
    """Load the gate set of a gate folder (`save_gates`, `export gate`, or an old two-file
    folder), verified. With `model`, refuse gates built for other shapes (the message names the
    differing field). `directory` goes through `resolve_gates_dir`."""
    directory = resolve_gates_dir(directory)
    if is_legacy(directory):
        gate_set = read_dir_consistent(directory, lambda fd: _load_legacy(fd, directory))
    else:
        from adaptive_sparse.export.gates import load_gate_artifact

        gate_set = load_gate_artifact(directory).gate_set
    if model is not None:
        check_model_shapes(gate_set.config, model)
    return gate_set.to(map_location)


def _load_legacy(dir_fd: int, directory: Path) -> GateSet:
    from safetensors.torch import load

    info = _parse_legacy(_read(dir_fd, LEGACY_FILE, MAX_CONFIG_BYTES),
                         str(directory / LEGACY_FILE))
    config = info["config"]
    where = str(directory / WEIGHTS_FILE)
    want = sum(math.prod(s) for s in gate_state_shapes(config).values()) * 4
    data = _read(dir_fd, WEIGHTS_FILE, min(MAX_WEIGHTS_BYTES, want + (1 << 20)))
    digest = hashlib.sha256(data).hexdigest()
    if digest != info["weights_sha256"]:
        raise fail(where, f"sha256 {info['weights_sha256']} (from {LEGACY_FILE})", digest)
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


def _holds_gates(p: Path) -> bool:
    return (p / MANIFEST).is_file() or (p / LEGACY_FILE).is_file()


def resolve_gates_dir(path) -> Path:
    """The gate folder a user means by `path`:
    - a gate folder (holds manifest.json, or an old folder's gates.json): itself;
    - a training version folder holding `gates/`: that;
    - a run folder (`runs/gates/<name>`): the highest `version_N` holding `gates/`.
    ValueError naming `gates` and what was looked for when none is found."""
    p = _checkpoint_dir(path)
    if _holds_gates(p):
        return p
    if _holds_gates(p / "gates"):
        return p / "gates"
    for version in reversed(_versions(p)):
        if _holds_gates(version / "gates"):
            return version / "gates"
    what = "does not exist" if not p.exists() else (
        "is not a directory" if not p.is_dir() else
        f"holds no {MANIFEST}, gates/{MANIFEST} or version_N/gates/{MANIFEST}")
    raise ValueError(f"gates: expected a gate checkpoint (a folder with {MANIFEST}), a "
                     f"training version folder or a run folder such as runs/gates/<name>; "
                     f"{str(path)!r} {what} (train gates with `adaptive-sparse train`)")
