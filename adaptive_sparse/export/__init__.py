"""Portable, versioned artifacts: masks, static patterns and gates (see format.py).

    from adaptive_sparse.export import save_masks, load_masks, load_sparsifier
    save_masks("out/masks", {0: mask0, 1: mask1}, model=model, method="pattern:sliding_window")
    art = load_masks("out/masks")          # verified: version, schema, every sha256
    handle = load_sparsifier(model, "out/gate")   # model now runs sparse attention
    handle.detach()
"""

import time
from pathlib import Path

from adaptive_sparse.export.convert import LAYOUTS, convert_artifact, to_bsr, to_dense, to_flex
from adaptive_sparse.models.fingerprint import (
    config_fingerprint, fingerprint_differences, model_fingerprint)
from adaptive_sparse.export.format import (
    FORMAT_NAME, FORMAT_VERSION, ArtifactError, RawArtifact, check_manifest, read_artifact,
    write_artifact)
from adaptive_sparse.export.gates import GateArtifact, load_gate_artifact, save_gate_artifact
from adaptive_sparse.export.masks import (
    MaskArtifact, aggregate_static, crop, load_masks, save_masks, save_static, static_recall)

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "LAYOUTS", "ArtifactError", "GateArtifact", "MaskArtifact",
    "RawArtifact", "load_gate_artifact", "save_gate_artifact",
    "aggregate_static", "check_manifest", "config_fingerprint", "convert_artifact", "crop",
    "export_main", "fingerprint_differences", "load_artifact", "load_masks", "load_sparsifier",
    "model_fingerprint", "read_artifact", "save_masks", "save_static", "static_recall", "summary",
    "to_bsr", "to_dense", "to_flex", "write_artifact",
]


def export_main(argv=None) -> int:
    """`adaptive-sparse export ...` (see adaptive_sparse/export/cli.py)."""
    from adaptive_sparse.export.cli import export_main as main
    return main(argv)


def load_sparsifier(model, path, *, backend: str = "auto", check: str = "full", policy=None,
                    adapter="auto"):
    """Attach a gate, masks or static artifact (or a training gate folder, with `policy`) to
    `model` (see adaptive_sparse/export/attach.py; check="architecture" accepts other weights
    of the same architecture); a gate's LoRA adapter (its folder's `adapter/`, or `adapter=`
    a path; None: none) is verified and attached with it."""
    from adaptive_sparse.export.attach import load_sparsifier as load
    return load(model, path, backend=backend, check=check, policy=policy, adapter=adapter)


def load_artifact(path):
    """Any artifact, verified: a MaskArtifact (masks/static), a GateArtifact (gate) or a
    DecodeGateArtifact (decode_gate)."""
    raw = read_artifact(path)
    if raw.kind == "decode_gate":
        from adaptive_sparse.export.decode import decode_gate_from_raw
        return decode_gate_from_raw(raw)
    if raw.kind == "gate":
        from adaptive_sparse.export.gates import gate_from_raw
        return gate_from_raw(raw)
    from adaptive_sparse.export.masks import masks_from_raw
    return masks_from_raw(raw)


def summary(path) -> dict:
    """Kind, base model, block size, method, density, files and their sizes of an artifact."""
    t0 = time.perf_counter()
    art = load_artifact(path)
    seconds = time.perf_counter() - t0
    m = art.manifest
    fp = m["model"] or {}
    out = {"path": str(path), "kind": m["kind"], "format_version": m["format_version"],
           "model": fp.get("architecture"), "block_size": m["block_size"],
           "method": m["method"]["name"], "density": m["stats"]["density"],
           "files": {k: v["size"] for k, v in m["files"].items()},
           "bytes": sum(v["size"] for v in m["files"].values())
           + (Path(path) / "manifest.json").stat().st_size,
           "load_seconds": round(seconds, 4)}
    if m["kind"] == "static":
        def means(rec):
            return {b: r and round(r["mean"], 4) for b, r in (rec or {}).items()}
        out["heldout_recall"] = means(m["content"]["static"]["recall"])
        out["source_heldout_recall"] = means(m["method"]["params"].get("source_heldout_recall"))
    return out
