"""Build artifacts from a live model: record each layer's masks (and attention maps) while the
model runs, then write mask, static and gate artifacts. Uses `adaptive_sparse.models` and
`adaptive_sparse.gates`, imported lazily."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch

from adaptive_sparse.export.masks import aggregate_static, mask_stats, save_masks, save_static
from adaptive_sparse.masks import BlockSparseMask


def record(model, sequences: torch.Tensor, provider, *, block_size: int, maps: bool = False):
    """Run `model` on each row of `sequences` (LongTensor [S, N]) under `provider`; returns the
    `RecordingProvider` holding each layer's masks (and block-sum maps with `maps`)."""
    from adaptive_sparse.models import RecordingProvider, sparse_attention

    rec = RecordingProvider(provider, block_size=block_size, maps=maps)
    device = next(model.parameters()).device
    with torch.no_grad(), sparse_attention(model, rec, block_size=block_size):
        for row in sequences:
            model(row[None].to(device))
    return rec


def _batched(masks: Sequence[BlockSparseMask], heads: int) -> BlockSparseMask:
    """Concatenate per-sequence masks along the batch, heads expanded to `heads` when 1."""
    ms = [m.expand_heads(heads) if m.heads != heads else m for m in masks]
    return BlockSparseMask(torch.cat([m.kv_num_blocks for m in ms]),
                           torch.cat([m.kv_indices for m in ms]), ms[0].block_size,
                           ms[0].q_len, ms[0].kv_len, ms[0].causal)


def _num_heads(model) -> int:
    from adaptive_sparse.models.config import text_config

    return int(text_config(model).num_attention_heads)


def export_masks(model, sequences: torch.Tensor, provider, out, *, block_size: int,
                 method: str, params: Mapping | None = None, inputs: Mapping | None = None,
                 overwrite: bool = False) -> Path:
    """Mask artifact of `provider`'s masks on `sequences` [S, N]: per layer [S, Hq, Qb, Kb]."""
    rec = record(model, sequences, provider, block_size=block_size)
    heads = _num_heads(model)
    masks = {layer: _batched(ms, heads) for layer, ms in sorted(rec.masks.items())}
    return save_masks(out, masks, model=model, method=method, params=params,
                      inputs={"num_seqs": int(sequences.shape[0]),
                              "seq_len": int(sequences.shape[1]), **dict(inputs or {})},
                      overwrite=overwrite)


def _recall(rec) -> dict:
    from adaptive_sparse.attention.block_maps import attention_recall

    per_layer = []
    for layer in sorted(rec.masks):
        vals = [float(attention_recall(bs, m.to_dense()).mean())
                for m, bs in zip(rec.masks[layer], rec.block_sums[layer])]
        per_layer.append(sum(vals) / len(vals))
    return {"mean": sum(per_layer) / max(len(per_layer), 1), "per_layer": per_layer,
            "docs": len(next(iter(rec.masks.values()), []))}


class _StaticProvider:
    def __init__(self, masks: Mapping[int, BlockSparseMask]):
        self.masks = masks

    def __call__(self, layer_idx, q, k):
        m = self.masks.get(layer_idx)
        return None if m is None else m.to(q.device)


def export_static(model, calibration: Mapping[int, torch.Tensor],
                  heldout: Mapping[int, torch.Tensor], provider, out, *, block_size: int,
                  method: str, params: Mapping | None = None, min_fraction: float = 0.5,
                  max_blocks_per_row: int | None = None, overwrite: bool = False) -> Path:
    """Static artifact: for each bucket (sequence length), aggregate `provider`'s masks over the
    calibration sequences [S, bucket], then measure the attention recall of the static masks
    and of the live provider on the held-out sequences. The live recall is recorded in
    `method.params.source_heldout_recall` for comparison."""
    buckets, recall, live = {}, {}, {}
    heads = _num_heads(model)
    docs = 0
    for bucket, seqs in sorted(calibration.items()):
        rec = record(model, seqs, provider, block_size=block_size)
        docs += int(seqs.shape[0])
        buckets[bucket] = {layer: aggregate_static([_batched(ms, heads)],
                                                   min_fraction=min_fraction,
                                                   max_blocks_per_row=max_blocks_per_row)
                           for layer, ms in sorted(rec.masks.items())}
        held = heldout.get(bucket)
        if held is None or held.shape[0] == 0:
            recall[bucket] = None
            continue
        recall[bucket] = _recall(record(model, held, _StaticProvider(buckets[bucket]),
                                        block_size=block_size, maps=True))
        live[str(bucket)] = _recall(record(model, held, provider, block_size=block_size,
                                           maps=True))
    params = dict(params or {}, source_heldout_recall=live)
    return save_static(out, buckets, model=model, method=method, params=params,
                       min_fraction=min_fraction, max_blocks_per_row=max_blocks_per_row,
                       calibration_docs=docs, recall=recall, overwrite=overwrite)


def gate_stats(model, sequences: torch.Tensor, provider, *, block_size: int) -> dict:
    """{"density", "layers"} of a gate provider's masks on calibration sequences."""
    rec = record(model, sequences, provider, block_size=block_size)
    return mask_stats([(layer, None, m) for layer, ms in rec.masks.items() for m in ms])


def read_policy_file(path) -> dict:
    """{"method": pattern name | "gate" | "oracle", "params": {...}}; a bare Policy dict is
    read as {"method": "gate", "params": {"policy": <it>}}."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"policy_file: cannot read {path} ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"policy_file: expected a JSON object, got {type(obj).__name__}")
    if "method" not in obj:
        return {"method": "gate", "params": {"policy": obj}}
    if not isinstance(obj.get("params", {}), dict):
        raise ValueError("policy_file: expected params to be an object")
    return {"method": str(obj["method"]), "params": dict(obj.get("params", {}))}


def make_source(model, *, pattern: str | None = None, pattern_params: Mapping | None = None,
                policy_file=None, gates=None, block_size: int = 64):
    """(provider, method name, params) from a pattern or a policy file (+ gates), through
    `adaptive_sparse.models.build_provider`."""
    from adaptive_sparse.models import ProviderSpec, build_provider

    if (pattern is None) == (policy_file is None):
        raise ValueError("source: give exactly one of --pattern or --policy-file")
    if pattern is not None:
        params = dict(pattern_params or {})
        setting = {"pattern": pattern, **params}
    else:
        spec = read_policy_file(policy_file)
        params = dict(spec["params"])
        if spec["method"] == "gate" and gates is not None:
            params["gates"] = str(gates)
        if spec["method"] == "gate" and params.get("gates") is None:
            raise ValueError("gates: the policy file names no gate directory; pass --gates")
        setting = {"pattern": spec["method"], **params}
    spec = ProviderSpec.from_setting(setting, block_size=block_size)
    method = {"pattern": f"pattern:{spec.name}"}.get(spec.kind, spec.kind)
    return build_provider(spec, model), method, params


def export_and_verify(model, sequence: torch.Tensor, gate_set, policy, out_dir, *,
                      overwrite: bool = True) -> dict:
    """The end of `make demo`: write a gate artifact and a mask artifact (the gate's masks on
    `sequence` LongTensor [1, N]), reload both onto `model`, and compare the logits with the
    live gates'. Returns {"gate": summary, "masks": summary, "gate_logits_equal",
    "masks_logits_equal", "max_abs_diff"}."""
    from adaptive_sparse.export import summary
    from adaptive_sparse.export.attach import load_sparsifier
    from adaptive_sparse.export.gates import save_gate_artifact
    from adaptive_sparse.models import sparse_attention
    from adaptive_sparse.gates import GateProvider

    if sequence.dim() != 2 or sequence.shape[0] != 1:
        raise ValueError(f"sequence: expected a LongTensor [1, N], got {tuple(sequence.shape)}")
    out_dir = Path(out_dir)
    bs = gate_set.config.block_size
    device = next(model.parameters()).device
    ids = sequence.to(device)
    with torch.no_grad(), GateProvider(gate_set, policy, model) as live:
        with sparse_attention(model, live, block_size=bs):
            want = model(ids).logits
        gate_path = save_gate_artifact(out_dir / "gate", gate_set, policy, model=model,
                                       stats=gate_stats(model, sequence, live, block_size=bs),
                                       overwrite=overwrite)
        mask_path = export_masks(model, sequence, live, out_dir / "masks", block_size=bs,
                                 method="gate", params={"policy": live.policy.to_dict()},
                                 overwrite=overwrite)
    with torch.no_grad():
        with load_sparsifier(model, gate_path):
            got_gate = model(ids).logits
        with load_sparsifier(model, mask_path):
            got_masks = model(ids).logits
    return {"gate": summary(gate_path), "masks": summary(mask_path),
            "gate_logits_equal": bool(torch.equal(got_gate, want)),
            "masks_logits_equal": bool(torch.equal(got_masks, want)),
            "max_abs_diff": max(float((got_gate - want).abs().max()),
                                float((got_masks - want).abs().max()))}
