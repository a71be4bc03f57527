"""Fuzzing the artifact loaders: malformed manifests and tensor files raise ArtifactError only.

Each malformed input is written with consistent hashes where that lets it reach a deeper check
(the manifest's own digest, the tensor file's sha256 and size), so the schema, safetensors
parsing and mask validation are all exercised, not just the integrity checks."""

from __future__ import annotations

import copy
import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from adaptive_sparse.export import ArtifactError, load_artifact, load_masks, save_masks, save_static
from adaptive_sparse.models.fingerprint import sha256_hex
from adaptive_sparse.export.format import manifest_digest
from adaptive_sparse.masks import BlockSparseMask

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def _base(kind: str) -> tuple[Path, dict, bytes]:
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    mask = BlockSparseMask.full(1, 2, block_size=16, q_len=48, kv_len=48)
    if kind == "masks":
        path = save_masks(root / "a", {0: mask, 1: mask}, method="m", params={"a": 1})
    else:
        path = save_static(root / "a", {48: {0: mask}}, min_fraction=0.5,
                           max_blocks_per_row=2, calibration_docs=3,
                           recall={48: {"mean": 0.5, "per_layer": [0.5], "docs": 1}})
    return path, json.loads((path / "manifest.json").read_text()), \
        (path / "masks.safetensors").read_bytes()


BASES = {kind: _base(kind) for kind in ("masks", "static")}


def _paths(obj, prefix=()):
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _write_manifest(path: Path, m, rehash: bool) -> None:
    if rehash and isinstance(m, dict):
        m = dict(m)
        m["manifest_sha256"] = manifest_digest({k: v for k, v in m.items()
                                                if k != "manifest_sha256"})
    (path / "manifest.json").write_text(json.dumps(m))


def _load_expecting_artifact_error_or_success(path: Path) -> None:
    try:
        load_artifact(path)
    except ArtifactError:
        pass


def _restore(path: Path, manifest: dict, data: bytes) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "masks.safetensors").write_bytes(data)


@FUZZ
@given(kind=st.sampled_from(["masks", "static"]), data=st.data(), rehash=st.booleans(),
       op=st.sampled_from(["replace", "delete", "insert"]))
def test_mutated_manifests_raise_artifact_error_only(kind, data, rehash, op):
    path, manifest, blob = BASES[kind]
    _restore(path, manifest, blob)
    m = copy.deepcopy(manifest)
    target = data.draw(st.sampled_from(_paths(m)))
    value = data.draw(json_values)
    if not target:
        m = value
    else:
        parent = m
        for p in target[:-1]:
            parent = parent[p]
        key = target[-1]
        if op == "replace":
            parent[key] = value
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8))] = value
        else:
            parent.insert(key, value)
    _write_manifest(path, m, rehash)
    if not rehash or m == manifest:
        if m != manifest:
            with pytest.raises(ArtifactError):
                load_artifact(path)
        return
    _load_expecting_artifact_error_or_success(path)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                     st.integers(0, 5000).flatmap(lambda i: st.tuples(st.just(i),
                                                                      st.binary(max_size=4)))))
def test_arbitrary_manifest_bytes_raise_artifact_error(raw):
    path, manifest, blob = BASES["masks"]
    _restore(path, manifest, blob)
    if isinstance(raw, tuple):
        text = json.dumps(manifest).encode()
        i, junk = raw
        raw = text[:i % len(text)] + junk + text[i % len(text) + 1:]
    (path / "manifest.json").write_bytes(raw)
    try:  # a splice that only drops or adds whitespace is the same manifest: it must load
        same = json.loads(raw) == manifest
    except ValueError:
        same = False
    if same:
        load_masks(path)
        return
    with pytest.raises(ArtifactError):
        load_masks(path)


def _safetensors(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + payload


tensor_specs = st.fixed_dictionaries({
    "dtype": st.sampled_from(["I32", "I64", "F32", "BOOL", "U8", "I8", "F16", "XX"]),
    "shape": st.lists(st.integers(-1, 4), max_size=5),
    "start": st.integers(-2, 300), "len": st.integers(-2, 300)})


@FUZZ
@given(kind=st.sampled_from(["masks", "static"]), mode=st.sampled_from(
    ["random", "header", "values", "truncate"]), data=st.data())
def test_malformed_tensor_files_raise_artifact_error_only(kind, mode, data):
    path, manifest, blob = BASES[kind]
    if mode == "random":
        bad = data.draw(st.binary(max_size=400))
    elif mode == "truncate":
        cut = data.draw(st.integers(0, len(blob) - 1))
        bad = blob[:cut] + data.draw(st.binary(max_size=8))
    elif mode == "header":
        names = [f"layers.{i}.{t}" for i in (0, 1) for t in ("kv_num_blocks", "kv_indices")]
        names = data.draw(st.lists(st.sampled_from(names + ["x", "__metadata__"]), max_size=5))
        header = {}
        for n in names:
            spec = data.draw(tensor_specs)
            header[n] = {"dtype": spec["dtype"], "shape": spec["shape"],
                         "data_offsets": [spec["start"], spec["start"] + spec["len"]]}
        bad = _safetensors(header, data.draw(st.binary(max_size=300)))
    else:
        from safetensors.torch import load, save

        tensors = load(blob)
        name = data.draw(st.sampled_from(sorted(tensors)))
        t = tensors[name]
        flat = t.flatten().clone()
        i = data.draw(st.integers(0, flat.numel() - 1))
        flat[i] = data.draw(st.integers(-2**31, 2**31 - 1))
        tensors[name] = flat.view(t.shape)
        if data.draw(st.booleans()):
            tensors[name] = tensors[name].to(data.draw(st.sampled_from(
                [torch.int64, torch.int16, torch.float32])))
        bad = save(tensors)
    m = copy.deepcopy(manifest)
    m["files"]["masks.safetensors"] = {"sha256": sha256_hex(bad), "size": len(bad)}
    _restore(path, manifest, blob)
    (path / "masks.safetensors").write_bytes(bad)
    _write_manifest(path, m, rehash=True)
    if mode != "values":
        with pytest.raises(ArtifactError):
            load_masks(path)
        return
    try:
        art = load_masks(path)
    except ArtifactError:
        return
    # only a change that keeps every mask valid and its density (e.g. in padding) may load
    (path / "masks.safetensors").write_bytes(blob)
    _write_manifest(path, manifest, rehash=False)
    before = load_masks(path)
    assert art.masks.keys() == before.masks.keys()
    for key, mask in art.masks.items():
        assert torch.equal(mask.to_dense(), before.masks[key].to_dense())
