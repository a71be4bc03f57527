"""Decode-gate artifacts: decode gates (adaptive_sparse.gates.decode) plus their decode policy.

Same directory format as every artifact (format.py: manifest v1, sha256 per file, atomic
writes), kind "decode_gate":
  files     `decode_gates.safetensors` (the DecodeGateSet's state_dict, names `<layer>.<param>`)
  content   {"decode_gate_config": DecodeGateConfig.to_dict(), "policy": Policy.to_dict()}
  stats     decode densities measured on calibration text when given, else
            {"density": null, "layers": []}
The base model's fingerprint is required; `load_decode_gate_artifact(path, model)` refuses a
model that differs from it (`check="architecture"` accepts other weights of the same
architecture), and `decode_provider(...)` turns the artifact into a `DecodeProvider` for
`sparse_attention` / `model.generate`.

    adaptive-sparse export decode-gate --out DIR [--decode-gates FILE|DIR | --train-steps N
        --corpus SPEC] (--tokens N | --policy top_k --param k=8) [--stats-corpus SPEC]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from adaptive_sparse.export.format import (
    ArtifactError, ManifestFields, RawArtifact, build_manifest, read_artifact,
    write_artifact)

DECODE_KIND = "decode_gate"
DECODE_GATES_FILE = "decode_gates.safetensors"


@dataclass(frozen=True)
class DecodeGateArtifact(ManifestFields):
    """A verified decode-gate artifact: the rebuilt DecodeGateSet (eval mode, CPU) and its
    Policy."""
    path: Path
    manifest: dict
    gates: Any  # adaptive_sparse.gates.decode.DecodeGateSet
    policy: Any  # adaptive_sparse.policies.Policy


def _shape_differences(cfg, fp: dict) -> list[str]:
    return [f"{f}: gates {getattr(cfg, f)}, model {fp[f]}"
            for f in ("num_layers", "num_heads", "num_kv_heads", "head_dim")
            if getattr(cfg, f) != fp[f]]


def save_decode_gate_artifact(out, gates, policy, *, model, method: str = "decode_gates",
                              params: Mapping | None = None, stats: Mapping | None = None,
                              overwrite: bool = False) -> Path:
    """Write a decode-gate artifact.

    gates: DecodeGateSet; policy: Policy or its dict (the decode budget); model: the base
    transformers model (or its fingerprint dict); params: how the gates were made (training
    steps, corpus, loss); stats: {"density", "layers"} of decode selections on calibration text.
    """
    from adaptive_sparse.errors import fail
    from adaptive_sparse.gates.decode import DecodeGateSet
    from adaptive_sparse.models.fingerprint import model_fingerprint
    from adaptive_sparse.policies import Policy

    if not isinstance(gates, DecodeGateSet):
        raise fail("gates", "an adaptive_sparse.gates.decode.DecodeGateSet",
                   type(gates).__name__, cls=TypeError)
    policy = Policy.coerce(policy)
    if model is None:
        raise fail("model", "the base model (or its fingerprint)", None)
    fp = model if isinstance(model, dict) else model_fingerprint(model)
    diffs = _shape_differences(gates.config, fp)
    if diffs:
        raise fail("gates", "the shapes of the model", "; ".join(diffs))
    state = {k: v.detach().cpu() for k, v in gates.state_dict().items()}
    manifest = build_manifest(
        kind=DECODE_KIND, model=fp, block_size=gates.config.block_size,
        method={"name": method, "params": dict(params or {})},
        stats=dict(stats or {"density": None, "layers": []}),
        content={"decode_gate_config": gates.config.to_dict(), "policy": policy.to_dict()})
    return write_artifact(out, manifest, {DECODE_GATES_FILE: state}, overwrite=overwrite)


def decode_gate_from_raw(raw: RawArtifact) -> DecodeGateArtifact:
    """Rebuild the DecodeGateSet and Policy of a verified artifact (raises ArtifactError)."""
    import torch

    from adaptive_sparse.export.gates import gate_content
    from adaptive_sparse.gates.decode import DecodeGateConfig, DecodeGateSet

    m = raw.manifest
    if m["kind"] != DECODE_KIND:
        raise ArtifactError(f"{raw.path}: expected a {DECODE_KIND} artifact, got kind "
                            f"{m['kind']!r}")
    if m["model"] is None:
        raise ArtifactError("manifest.model: a decode-gate artifact needs the base-model "
                            "fingerprint, got null")
    cfg, policy = gate_content(m, "decode_gate_config", DecodeGateConfig, policy_required=True)
    diffs = _shape_differences(cfg, m["model"])
    if diffs:
        raise ArtifactError("manifest.content.decode_gate_config: differs from manifest.model: "
                            + "; ".join(diffs))
    if set(raw.tensors) != {DECODE_GATES_FILE}:
        raise ArtifactError(f"manifest.files: expected exactly {DECODE_GATES_FILE!r}, got "
                            f"{sorted(raw.tensors)}")
    state = raw.tensors[DECODE_GATES_FILE]
    gates = DecodeGateSet(cfg)
    want = {n: tuple(t.shape) for n, t in gates.state_dict().items()}
    got = {n: tuple(t.shape) for n, t in state.items()}
    if want != got:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        bad = sorted(n for n in set(want) & set(got) if want[n] != got[n])
        raise ArtifactError(f"files.{DECODE_GATES_FILE}: tensors do not match the config "
                            f"(missing {missing[:3]}, unexpected {extra[:3]}, shapes differ "
                            f"{[(n, want[n], got[n]) for n in bad[:3]]})")
    if any(not t.is_floating_point() or not bool(torch.isfinite(t).all())
           for t in state.values()):
        raise ArtifactError(f"files.{DECODE_GATES_FILE}: expected finite floating-point "
                            "weights")
    gates.load_state_dict(state)
    return DecodeGateArtifact(raw.path, m, gates.eval(), policy)


def load_decode_gate_artifact(path, model=None, *, check: str = "full") -> DecodeGateArtifact:
    """Read and verify a decode-gate artifact (raises ArtifactError). With `model`, refuse a
    base model that differs from the artifact's (check "full": architecture, config and
    weights; "architecture": not the weights)."""
    art = decode_gate_from_raw(read_artifact(path))
    if model is not None:
        from adaptive_sparse.export.attach import check_fingerprint
        check_fingerprint(art.fingerprint, model, check=check)
    return art


def decode_provider(artifact: DecodeGateArtifact, *, policy=None, prefill=None, device=None):
    """A `DecodeProvider` serving the artifact's gates under its policy (or `policy`), with
    `prefill` (a provider, None: dense) for prompt calls; gates moved to `device`."""
    from adaptive_sparse.gates.decode import DecodeProvider

    gates = artifact.gates.to(device) if device is not None else artifact.gates
    return DecodeProvider(artifact.policy if policy is None else policy, gates=gates,
                          prefill=prefill, decode="gate", block_size=artifact.block_size,
                          num_layers=len(gates))


def add_decode_parser(sub) -> None:
    """The `export decode-gate` subcommand's arguments (see the module docstring)."""
    from adaptive_sparse.models.generate import _param, _positive

    d = sub.add_parser(DECODE_KIND.replace("_", "-"),
                       help="decode gates + their decode budget (adaptive_sparse.gates.decode)")
    d.add_argument("--model", default="smollm2-135m",
                   help="preset, .gguf file or HF folder of the base model")
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--block-size", type=int, choices=(16, 32, 64, 128), default=64)
    d.add_argument("--decode-gates", default=None,
                   help="a decode-gates file (save_decode_gates) or decode-gate artifact; "
                        "default: untrained gates (identity init), or --train-steps")
    d.add_argument("--train-steps", type=int, default=0,
                   help="distill the gates this many steps on the training split of --corpus")
    d.add_argument("--corpus", default="default", help="training text for --train-steps")
    d.add_argument("--train-seqs", type=_positive, default=8)
    d.add_argument("--train-seq-len", type=_positive, default=512)
    d.add_argument("--policy", choices=("top_k", "threshold", "top_p", "density"),
                   default="top_k")
    d.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                   help="policy fields, e.g. k=4, p=0.9 (default k=4 for top_k)")
    d.add_argument("--tokens", type=_positive, default=None,
                   help="token budget per decode step (a top_k policy; overrides --policy)")
    d.add_argument("--stats-corpus", default=None,
                   help="measure the decode density per layer on this corpus's held-out text")
    d.add_argument("--stats-seq-len", type=_positive, default=512)
    d.add_argument("--stats-steps", type=_positive, default=16,
                   help="decode steps measured after a prompt of --stats-seq-len tokens")


def load_decode_gates_any(path, model=None, *, check: str = "full"):
    """A DecodeGateSet from a decode-gate artifact directory (verified, fingerprint checked
    against `model` when given) or a `save_decode_gates` file."""
    from adaptive_sparse.gates.decode import load_decode_gates

    if Path(path).is_dir():
        return load_decode_gate_artifact(path, model, check=check).gates
    return load_decode_gates(path)


def decode_stats(model, ids, provider, *, steps: int) -> dict:
    """{"density", "layers"} of `provider`'s decode selections (share of the cache blocks read,
    per layer and KV head): ids [B, N] are prefilled densely but for their last `steps` tokens,
    which are fed one at a time through `provider`."""
    import torch

    from adaptive_sparse.gates.decode import model_step
    from adaptive_sparse.models import sparse_attention

    per_layer: dict[int, list[torch.Tensor]] = {}

    def record(layer_idx, q, k):
        mask = provider(layer_idx, q, k)
        if q.shape[2] == 1 and mask is not None:
            kb = -(-k.shape[2] // mask.block_size)
            share = mask.kv_num_blocks[:, :, 0].float().mean(0) / kb  # [H]
            per_layer.setdefault(layer_idx, []).append(share.cpu())
        return mask

    n = ids.shape[1] - steps
    with torch.no_grad():
        _, cache = model_step(model, ids[:, :n])
        with sparse_attention(model, record, block_size=provider.block_size):
            for t in range(n, ids.shape[1]):
                model_step(model, ids[:, t:t + 1], cache)
    layers = [{"layer": layer, "density": float(torch.stack(rows).mean()),
               "per_head": torch.stack(rows).mean(0).tolist()}
              for layer, rows in sorted(per_layer.items())]
    density = sum(x["density"] for x in layers) / len(layers) if layers else None
    return {"density": density, "layers": layers}


def run_decode_export(args: argparse.Namespace) -> Path:
    """`adaptive-sparse export decode-gate`: load or train the decode gates, measure their
    decode density when asked, write the artifact; returns its path."""
    from adaptive_sparse.data import pack, select_documents
    from adaptive_sparse.gates.decode import DecodeProvider
    from adaptive_sparse.models import load_model
    from adaptive_sparse.models.generate import make_decode_provider

    from adaptive_sparse.errors import fail

    if args.train_steps < 0 or (args.train_steps and args.decode_gates):
        raise fail("--train-steps", "a count >= 0 (0 with --decode-gates)", args.train_steps)
    model, tok = load_model(args.model)
    # the policy (and, with --train-steps, gates trained from the identity init)
    ns = argparse.Namespace(**{**vars(args), "decode_gates": None}, decode="gate",
                            bounds_combine="max", prefill="dense", prefill_gates=None,
                            save_decode_gates=None, device="cpu")
    provider, policy = make_decode_provider(ns, model, tok)
    gates = provider.gates
    if args.decode_gates:  # an artifact's gates pass the fingerprint check against the model
        gates = load_decode_gates_any(args.decode_gates, model)
        if gates.config.block_size != args.block_size:
            raise fail("--block-size", f"{gates.config.block_size} (that of the gates)",
                       args.block_size)
    stats = None
    if args.stats_corpus:
        if args.stats_steps >= args.stats_seq_len:
            raise fail("--stats-steps", f"fewer than --stats-seq-len ({args.stats_seq_len})",
                       args.stats_steps)
        docs, _ = select_documents(args.stats_corpus)
        ids = pack(tok, docs, args.stats_seq_len, 1)
        live = DecodeProvider(policy, gates=gates, decode="gate", block_size=args.block_size,
                              num_layers=len(gates))
        stats = decode_stats(model, ids, live, steps=args.stats_steps)
    params = {"source": str(args.decode_gates) if args.decode_gates
              else "trained" if args.train_steps else "identity init",
              "train_steps": args.train_steps,
              "corpus": args.corpus if args.train_steps else None}
    return save_decode_gate_artifact(args.out, gates.cpu(), policy, model=model, params=params,
                                     stats=stats, overwrite=args.overwrite)
