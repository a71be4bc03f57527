"""Gate artifacts: trained gate weights, and the policy that turns their scores into masks.

One format for every gate folder: what `adaptive-sparse train` writes in
`runs/gates/<name>/version_N/gates` (through `adaptive_sparse.gates.save_gates`) and what
`adaptive-sparse export gate` writes are both artifacts of kind "gate" (format.py: manifest v1,
one sha256 per file, written by `adaptive_sparse.io.atomic_write_dir`, verified on every load).

Files: `gates.safetensors` (the GateSet's state_dict, names `<layer>.<param>`).
`content`: {"gate_config": GateConfig.to_dict(), "policy": Policy.to_dict() or null}; null in a
training folder (the policy is chosen later: eval / sweep settings, `export gate --policy-file`,
or `load_sparsifier(..., policy=)`).
`model`: the base model's fingerprint, or null when the writer did not know it (training fills it
from its target cache); a null one is checked against a model's attention shapes only.
`method`: {"name": "gates", "params": the training metadata (global_step, source checkpoint) or
the export's parameters}.
`stats`: densities measured on calibration text when given, else {"density": null, "layers": []}.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from adaptive_sparse.export.format import (
    MANIFEST, ArtifactError, ManifestFields, RawArtifact, build_manifest, read_artifact,
    req_dict, write_artifact)

GATES_FILE = "gates.safetensors"


@dataclass(frozen=True)
class GateArtifact(ManifestFields):
    """A verified gate artifact: the rebuilt GateSet (eval mode, CPU) and its Policy."""
    path: Path
    manifest: dict
    gate_set: Any  # adaptive_sparse.gates.GateSet
    policy: Any  # adaptive_sparse.policies.Policy, or None (a training folder)


def save_gate_artifact(out, gate_set, policy=None, *, model=None, method: str = "gates",
                       params: Mapping | None = None, stats: Mapping | None = None,
                       overwrite: bool = False, replaces: str = MANIFEST) -> Path:
    """Write a gate artifact (the one writer of gate folders; `save_gates` calls it).

    gate_set: adaptive_sparse.gates.GateSet; policy: Policy, its dict, or None (a training
    folder); model: the base transformers model, its fingerprint dict, or None when unknown;
    params: e.g. the sweep trial and its measured ppl change / density, or training metadata;
    stats: {"density", "layers"} measured on calibration text. `replaces`: the file an existing
    `out` must hold to be overwritten (see `adaptive_sparse.io.atomic_write_dir`)."""
    from adaptive_sparse.errors import fail
    from adaptive_sparse.gates import GateSet
    from adaptive_sparse.models.fingerprint import model_fingerprint
    from adaptive_sparse.policies import Policy

    if not isinstance(gate_set, GateSet):
        raise fail("gate_set", "an adaptive_sparse.gates.GateSet", type(gate_set).__name__,
                   cls=TypeError)
    policy = None if policy is None else Policy.coerce(policy)
    fp = model if model is None or isinstance(model, dict) else model_fingerprint(model)
    cfg = gate_set.config
    if fp is not None:
        _check_config_against(cfg, fp, lambda field, msg: ValueError(f"gate_set: {field} {msg}"))
    state = {k: v.detach().cpu() for k, v in gate_set.state_dict().items()}
    manifest = build_manifest(
        kind="gate", model=fp, block_size=cfg.block_size,
        method={"name": method, "params": dict(params or {})},
        stats=dict(stats or {"density": None, "layers": []}),
        content={"gate_config": cfg.to_dict(),
                 "policy": None if policy is None else policy.to_dict()})
    return write_artifact(out, manifest, {GATES_FILE: state}, overwrite=overwrite,
                          marker=replaces)


def _check_config_against(cfg, fp: dict, err) -> None:
    for field, fp_field in (("num_layers", "num_layers"), ("num_heads", "num_heads"),
                            ("num_kv_heads", "num_kv_heads"), ("head_dim", "head_dim")):
        if getattr(cfg, field) != fp[fp_field]:
            raise err(field, f"is {getattr(cfg, field)} but the model has {fp[fp_field]}")


def gate_content(m: Mapping[str, Any], config_key: str, config_cls, *,
                 policy_required: bool):
    """(config, policy or None) of a gate-like manifest `m`: content.<config_key> rebuilt with
    `config_cls.from_dict`, content.policy with `Policy.from_dict` (null allowed unless
    `policy_required`), the config's block size equal to the manifest's. Raises ArtifactError
    naming the field."""
    from adaptive_sparse.policies import Policy

    content = req_dict(m["content"], "content", (config_key, "policy"))
    req_dict(content[config_key], f"content.{config_key}")
    if policy_required or content["policy"] is not None:
        req_dict(content["policy"], "content.policy")
    try:
        cfg = config_cls.from_dict(content[config_key])
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"manifest.content.{config_key}: {e}") from None
    try:
        policy = None if content["policy"] is None else Policy.from_dict(content["policy"])
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"manifest.content.policy: {e}") from None
    if cfg.block_size != m["block_size"]:
        raise ArtifactError(f"manifest.content.{config_key}.block_size: expected "
                            f"{m['block_size']} (manifest.block_size), got {cfg.block_size}")
    return cfg, policy


def gate_from_raw(raw: RawArtifact) -> GateArtifact:
    """Rebuild the GateSet and Policy of a verified gate artifact (raises ArtifactError)."""
    from adaptive_sparse.gates.checkpoint import gate_set_from_state
    from adaptive_sparse.gates.network import GateConfig

    m = raw.manifest
    if m["kind"] != "gate":
        raise ArtifactError(f"{raw.path}: expected a gate artifact, got kind {m['kind']!r}")
    cfg, policy = gate_content(m, "gate_config", GateConfig, policy_required=False)

    def err(field, msg):
        return ArtifactError(f"manifest.content.gate_config.{field}: {msg}")

    if m["model"] is not None:
        _check_config_against(cfg, m["model"], err)
    if set(raw.tensors) != {GATES_FILE}:
        raise ArtifactError(f"manifest.files: expected exactly {GATES_FILE!r}, got "
                            f"{sorted(raw.tensors)}")
    try:
        gate_set = gate_set_from_state(cfg, raw.tensors[GATES_FILE], GATES_FILE)
    except ValueError as e:
        raise ArtifactError(str(e)) from None
    return GateArtifact(raw.path, m, gate_set, policy)


def load_gate_artifact(path) -> GateArtifact:
    """Read and verify a gate artifact (raises ArtifactError)."""
    return gate_from_raw(read_artifact(path))
