"""The artifact format: a directory with `manifest.json` and `*.safetensors` files.

manifest.json (format_version 1), every key required, no others:
  format            "adaptive-sparse-artifact"
  format_version    1 (an int; newer versions are refused with a message to upgrade)
  kind              "gate" | "masks" | "static" | "decode_gate" (export/decode.py)
  created_by        "adaptive-sparse <version>"
  model             base-model fingerprint (see fingerprint.py) or null
  block_size        16 | 32 | 64 | 128
  method            {"name": str, "params": {...}}
  stats             {"density": float | null, "layers": [{"layer", "density", "per_head"}]}
  content           kind-specific (masks.py, gates.py)
  files             {"<name>.safetensors": {"sha256": hex, "size": int}}
  manifest_sha256   sha256 of the canonical JSON of every other key: any edit is caught

Writes are atomic (`adaptive_sparse.io.atomic_write_dir`): everything goes to a hidden directory
beside the target, is fsynced, and is renamed into place, or swapped with the old artifact in one
step on --overwrite; a crash leaves only that hidden directory, which the next write to the same
target removes once its writer process is gone. Loading reads each tensor file once, checks its
size and sha256, and parses those same bytes with safetensors; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from adaptive_sparse.errors import fail
from adaptive_sparse.io import atomic_write_dir, open_in, read_dir_consistent
from adaptive_sparse.masks import SUPPORTED_BLOCK_SIZES
from adaptive_sparse.models.fingerprint import FINGERPRINT_FIELDS, canonical_json, sha256_hex

FORMAT_NAME = "adaptive-sparse-artifact"
FORMAT_VERSION = 1
KINDS = ("gate", "masks", "static", "decode_gate")
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
MAX_FILE_BYTES = 1 << 36  # 64 GiB: a tensor file is read whole, and only up to its real size
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,120}\.safetensors")
_TOP_KEYS = ("format", "format_version", "kind", "created_by", "model", "block_size", "method",
             "stats", "content", "files", "manifest_sha256")


class ArtifactError(ValueError):
    """An artifact that cannot be read or trusted; the message names the file and field."""


class ManifestFields:
    """What every verified artifact reads from its `manifest` the same way."""
    manifest: dict

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def block_size(self) -> int:
        return self.manifest["block_size"]

    @property
    def fingerprint(self) -> dict | None:
        """The base model's fingerprint (None for a masks/static artifact made without one)."""
        return self.manifest["model"]


@dataclass(frozen=True)
class RawArtifact(ManifestFields):
    """A verified artifact: its manifest and the tensors of every file (CPU)."""
    path: Path
    manifest: dict
    tensors: dict[str, dict[str, torch.Tensor]]  # file name -> tensor name -> tensor


def _manifest_error(field: str, expected: str, got: Any) -> ArtifactError:
    return fail(f"manifest.{field}", expected, got, cls=ArtifactError)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def req_dict(obj, field: str, keys: tuple[str, ...] | None = None) -> dict:
    """`obj` must be a dict (with exactly `keys`, when given)."""
    if not isinstance(obj, dict):
        raise _manifest_error(field, "an object", type(obj).__name__)
    if keys is not None:
        missing = [k for k in keys if k not in obj]
        if missing:
            raise _manifest_error(f"{field}.{missing[0]}", "a value (key missing)", "nothing")
        extra = sorted(k for k in obj if k not in keys)
        if extra:
            raise _manifest_error(f"{field}.{extra[0]}", f"no such key (allowed: {', '.join(keys)})",
                        extra[0])
    return obj


def req_int(v, field: str, lo: int | None = None, hi: int | None = None) -> int:
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise _manifest_error(field, "an int" + rng, v)
    return v


def req_num(v, field: str, lo: float | None = None, hi: float | None = None) -> float:
    if not _is_num(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _manifest_error(field, f"a finite number in [{lo}, {hi}]", v)
    return float(v)


def req_str(v, field: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(v, str) or (choices is not None and v not in choices):
        raise _manifest_error(field, f"one of {choices}" if choices else "a string", v)
    return v


def req_list(v, field: str, max_len: int | None = None) -> list:
    if not isinstance(v, list) or (max_len is not None and len(v) > max_len):
        raise _manifest_error(field, "a list" + (f" of at most {max_len} items" if max_len else ""),
                    type(v).__name__ if not isinstance(v, list) else f"{len(v)} items")
    return v


def req_bool(v, field: str) -> bool:
    if not isinstance(v, bool):
        raise _manifest_error(field, "true or false", v)
    return v


def check_fingerprint_field(fp) -> None:
    """Validate a manifest's `model` value: null or a `model_fingerprint` dict (ArtifactError
    naming the field)."""
    if fp is None:
        return
    req_dict(fp, "model", FINGERPRINT_FIELDS + ("config",))
    req_str(fp["architecture"], "model.architecture")
    req_str(fp["model_type"], "model.model_type")
    for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size"):
        req_int(fp[key], f"model.{key}", 1, 1 << 20)
    if fp["num_heads"] % fp["num_kv_heads"]:
        raise _manifest_error("model.num_kv_heads", f"a divisor of num_heads ({fp['num_heads']})",
                    fp["num_kv_heads"])
    req_dict(fp["rotary"], "model.rotary")
    if not isinstance(fp["config_sha256"], str) or not _HEX64.fullmatch(fp["config_sha256"]):
        raise _manifest_error("model.config_sha256", "64 lowercase hex digits", fp["config_sha256"])
    w = fp["weights_sha256"]
    if w is not None and (not isinstance(w, str) or not _HEX64.fullmatch(w)):
        raise _manifest_error("model.weights_sha256", "null or 64 lowercase hex digits", w)
    req_dict(fp["config"], "model.config")
    if sha256_hex(canonical_json(fp["config"]).encode()) != fp["config_sha256"]:
        raise _manifest_error("model.config_sha256", "the sha256 of model.config", fp["config_sha256"])


def _check_stats(stats) -> None:
    req_dict(stats, "stats", ("density", "layers"))
    if stats["density"] is not None:
        req_num(stats["density"], "stats.density", 0.0, 1.0)
    for i, layer in enumerate(req_list(stats["layers"], "stats.layers", 1 << 16)):
        f = f"stats.layers[{i}]"
        req_dict(layer, f, ("layer", "density", "per_head"))
        req_int(layer["layer"], f + ".layer", 0, 1 << 16)
        req_num(layer["density"], f + ".density", 0.0, 1.0)
        for j, d in enumerate(req_list(layer["per_head"], f + ".per_head", 1 << 16)):
            req_num(d, f"{f}.per_head[{j}]", 0.0, 1.0)


def check_manifest(m) -> dict:
    """Validate a parsed manifest; raise ArtifactError naming the first bad field.

    Order: format name, version (a future one is refused before anything else is read),
    integrity hash, then the schema."""
    if not isinstance(m, dict):
        raise ArtifactError(f"manifest: expected a JSON object, got {type(m).__name__}")
    if m.get("format") != FORMAT_NAME:
        raise _manifest_error("format", repr(FORMAT_NAME), m.get("format"))
    version = m.get("format_version")
    if not _is_int(version) or version < 1:
        raise _manifest_error("format_version", "a positive int", version)
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"manifest.format_version: this artifact has format version {version}, but this "
            f"adaptive-sparse reads versions up to {FORMAT_VERSION}; upgrade adaptive-sparse")
    digest = m.get("manifest_sha256")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise _manifest_error("manifest_sha256", "64 lowercase hex digits", digest)
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    if manifest_digest(body) != digest:
        raise ArtifactError("manifest.manifest_sha256: the manifest was edited after it was "
                            "written (its content no longer matches manifest_sha256)")
    req_dict(m, "manifest", _TOP_KEYS)
    req_str(m["kind"], "kind", KINDS)
    req_str(m["created_by"], "created_by")
    check_fingerprint_field(m["model"])
    if m["block_size"] not in SUPPORTED_BLOCK_SIZES or not _is_int(m["block_size"]):
        raise _manifest_error("block_size", f"one of {SUPPORTED_BLOCK_SIZES}", m["block_size"])
    req_dict(m["method"], "method", ("name", "params"))
    req_str(m["method"]["name"], "method.name")
    req_dict(m["method"]["params"], "method.params")
    _check_stats(m["stats"])
    req_dict(m["content"], "content")
    files = req_dict(m["files"], "files")
    if not files:
        raise _manifest_error("files", "at least one tensor file", {})
    for name, entry in files.items():
        if not _FILE_NAME.fullmatch(name) or ".." in name:
            raise _manifest_error("files", "plain file names ending in .safetensors", name)
        req_dict(entry, f"files.{name}", ("sha256", "size"))
        if not isinstance(entry["sha256"], str) or not _HEX64.fullmatch(entry["sha256"]):
            raise _manifest_error(f"files.{name}.sha256", "64 lowercase hex digits", entry["sha256"])
        req_int(entry["size"], f"files.{name}.size", 8, MAX_FILE_BYTES)
    return m


def manifest_digest(body: Mapping) -> str:
    return sha256_hex(canonical_json(body).encode())


def parse_manifest(data: bytes) -> dict:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity; then `check_manifest`."""
    def no_dupes(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise ArtifactError(f"manifest: duplicate key {k!r}")
            out[k] = v
        return out

    def no_constants(name):
        raise ArtifactError(f"manifest: {name} is not allowed in JSON")

    try:
        text = data.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=no_dupes, parse_constant=no_constants)
    except ArtifactError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"manifest: not valid UTF-8 JSON ({type(e).__name__}: "
                            f"{str(e)[:120]})") from None
    return check_manifest(obj)


def build_manifest(*, kind: str, model: dict | None, block_size: int, method: Mapping,
                   stats: Mapping, content: Mapping) -> dict:
    from adaptive_sparse import __version__

    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": kind,
        "created_by": f"adaptive-sparse {__version__}", "model": model,
        "block_size": block_size,
        "method": {"name": str(method.get("name", "")), "params": dict(method.get("params", {}))},
        "stats": dict(stats), "content": dict(content),
    }


def write_artifact(out, manifest: Mapping, tensors: Mapping[str, Mapping[str, torch.Tensor]],
                   *, overwrite: bool = False, marker: str = MANIFEST) -> Path:
    """Write `tensors` ({file name: {tensor name: tensor}}) and the manifest atomically.

    `manifest` is `build_manifest(...)`'s dict; `files` and `manifest_sha256` are filled in
    here and the result is checked with `check_manifest` before anything is renamed into place.
    An existing `out` is refused unless `overwrite` (and then only if it holds `marker`, a
    manifest.json unless told otherwise, so a directory that is not an artifact is never
    removed)."""
    from safetensors.torch import save

    blobs, files = {}, {}
    for name, group in tensors.items():
        if not _FILE_NAME.fullmatch(name):
            raise ValueError(f"tensors: file names must end in .safetensors, got {name!r}")
        data = save({k: v.detach().cpu().clone().contiguous() for k, v in group.items()})
        blobs[name] = data
        files[name] = {"sha256": sha256_hex(data), "size": len(data)}
    body = dict(manifest)
    body["files"] = files
    body.pop("manifest_sha256", None)
    full = dict(body, manifest_sha256=manifest_digest(body))
    check_manifest(json.loads(canonical_json(full)))
    blobs[MANIFEST] = (json.dumps(full, indent=1, sort_keys=True, allow_nan=False)
                       + "\n").encode()
    return atomic_write_dir(out, blobs, overwrite=overwrite, marker=marker)


def read_artifact(path) -> RawArtifact:
    """Read and verify an artifact directory: manifest schema and integrity, every file's size
    and sha256, and the safetensors parse of exactly the bytes that were hashed.

    Files are opened through one descriptor of the directory without following symbolic links:
    a file that is a symlink (wherever it points) or not a plain file is refused, and nothing
    about what it points to is read or reported. Each file's size is checked against the
    manifest before it is read. An artifact replaced while it is read (`--overwrite`) is read
    again, so a reader gets the old or the new artifact, never a mix."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected an artifact directory path, got {type(path).__name__}")
    path = Path(os.path.realpath(path))
    try:
        return read_dir_consistent(path, lambda fd: _read_raw(fd, path))
    except (FileNotFoundError, NotADirectoryError):
        raise ArtifactError(f"{path}: not an artifact directory (no {MANIFEST})") from None


def _open(dir_fd: int, name: str, field: str, max_bytes: int, missing: str) -> bytes:
    try:
        return open_in(dir_fd, name, max_bytes=max_bytes)
    except FileNotFoundError:
        raise ArtifactError(f"{field}: {missing}") from None
    except PermissionError as e:
        raise ArtifactError(f"{field}: {str(e).split(': ', 1)[-1]}; refused") from None
    except ValueError:
        raise ArtifactError(f"{field}: size exceeds {max_bytes} bytes") from None


def _read_raw(dir_fd: int, path: Path) -> RawArtifact:
    from safetensors.torch import load

    data = _open(dir_fd, MANIFEST, MANIFEST, MAX_MANIFEST_BYTES,
                 f"missing: {path} is not an artifact directory (no {MANIFEST})")
    manifest = parse_manifest(data)
    tensors = {}
    for name, entry in manifest["files"].items():
        data = _open(dir_fd, name, f"files.{name}", entry["size"],
                     "listed in the manifest but missing")
        if len(data) != entry["size"]:
            raise ArtifactError(f"files.{name}: size is {len(data)} bytes, the manifest says "
                                f"{entry['size']}")
        if sha256_hex(data) != entry["sha256"]:
            raise ArtifactError(f"files.{name}: sha256 does not match the manifest "
                                "(the file is corrupted or was modified)")
        try:
            tensors[name] = load(data)
        except Exception as e:  # safetensors raises its own error types on malformed input
            raise ArtifactError(f"files.{name}: not a valid safetensors file "
                                f"({type(e).__name__}: {str(e)[:120]})") from None
    return RawArtifact(path, manifest, tensors)
