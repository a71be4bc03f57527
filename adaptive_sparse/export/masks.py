"""Mask artifacts (concrete per-layer masks for given inputs) and static pattern artifacts
(per-head masks aggregated over calibration documents, one set per length bucket).

Both store one file, `masks.safetensors`, with for each entry
  `<key>.kv_num_blocks`  int32 [B, H, Qb]
  `<key>.kv_indices`     int32 [B, H, Qb, Kb]
where `<key>` is `layers.<i>` (masks) or `buckets.<seq_len>.layers.<i>` (static), and the
manifest's `content.entries` gives each entry's geometry:
  {"key", "layer", "bucket" (int | null), "batch", "heads", "q_len", "kv_len", "causal"}.
Static artifacts add `content.static`: {"buckets", "min_fraction", "max_blocks_per_row",
"keep_diagonal", "keep_sink", "calibration_docs", "recall"}, where `recall` maps each bucket
(as a string) to the held-out attention recall {"mean", "per_layer", "docs"} or null.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from adaptive_sparse.export.format import (
    ArtifactError, ManifestFields, RawArtifact, build_manifest, read_artifact, req_bool,
    req_dict, req_int, req_list, req_num, write_artifact)
from adaptive_sparse.masks import BlockSparseMask, block_causal, diagonal_blocks

MASKS_FILE = "masks.safetensors"
_ENTRY_KEYS = ("key", "layer", "bucket", "batch", "heads", "q_len", "kv_len", "causal")
_STATIC_KEYS = ("buckets", "min_fraction", "max_blocks_per_row", "keep_diagonal", "keep_sink",
                "calibration_docs", "recall")
_MAX_LEN = 1 << 24


def _key(layer: int, bucket: int | None) -> str:
    return f"layers.{layer}" if bucket is None else f"buckets.{bucket}.layers.{layer}"


def mask_stats(entries: Sequence[tuple[int, int | None, BlockSparseMask]]) -> dict:
    """Density over all entries and per layer/head (averaged over buckets for static)."""
    by_layer: dict[int, list[BlockSparseMask]] = {}
    for layer, _, m in entries:
        by_layer.setdefault(layer, []).append(m)
    layers, sel, tot = [], 0, 0
    for layer in sorted(by_layer):
        ms = by_layer[layer]
        heads = {m.heads for m in ms}
        per_head = (torch.stack([m.density_per_head() for m in ms]).mean(0).tolist()
                    if len(heads) == 1 else [])
        s = sum(int(m.kv_num_blocks.sum(dtype=torch.int64)) for m in ms)
        t = sum(int(m.allowed().sum()) * m.batch * m.heads for m in ms)
        layers.append({"layer": layer, "density": s / max(t, 1),
                       "per_head": [float(x) for x in per_head]})
        sel, tot = sel + s, tot + t
    return {"density": sel / max(tot, 1) if entries else None, "layers": layers}


def _entries_of(masks) -> list[tuple[int, int | None, BlockSparseMask]]:
    if isinstance(masks, Mapping):
        items = list(masks.items())
    elif isinstance(masks, Sequence):
        items = list(enumerate(masks))
    else:
        raise TypeError(f"masks: expected a dict {{layer: BlockSparseMask}} or a list, "
                        f"got {type(masks).__name__}")
    out = []
    for layer, m in items:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"masks: expected non-negative int layer indices, got {layer!r}")
        if not isinstance(m, BlockSparseMask):
            raise TypeError(f"masks[{layer}]: expected a BlockSparseMask, got {type(m).__name__}")
        out.append((layer, None, m))
    return out


def _write(out, kind, entries, *, model, method, params, extra_content, overwrite) -> Path:
    if not entries:
        raise ValueError("masks: expected at least one mask")
    block = {m.block_size for _, _, m in entries}
    if len(block) != 1:
        raise ValueError(f"masks: expected one block_size for all masks, got {sorted(block)}")
    fingerprint = _fingerprint_of(model)
    if fingerprint is not None:
        for layer, _, m in entries:
            if layer >= fingerprint["num_layers"]:
                raise ValueError(f"masks: layer {layer} >= the model's num_layers "
                                 f"{fingerprint['num_layers']}")
    tensors, rows = {}, []
    for layer, bucket, m in entries:
        key = _key(layer, bucket)
        tensors[f"{key}.kv_num_blocks"] = m.kv_num_blocks
        tensors[f"{key}.kv_indices"] = m.kv_indices
        rows.append({"key": key, "layer": layer, "bucket": bucket, "batch": m.batch,
                     "heads": m.heads, "q_len": m.q_len, "kv_len": m.kv_len,
                     "causal": m.causal})
    manifest = build_manifest(kind=kind, model=fingerprint, block_size=block.pop(),
                              method={"name": method, "params": params or {}},
                              stats=mask_stats(entries),
                              content={"entries": rows, **extra_content})
    return write_artifact(out, manifest, {MASKS_FILE: tensors}, overwrite=overwrite)


def _fingerprint_of(model) -> dict | None:
    if model is None or isinstance(model, dict):
        return model
    from adaptive_sparse.models.fingerprint import model_fingerprint
    return model_fingerprint(model)


def save_masks(out, masks, *, model=None, method: str = "custom", params: Mapping | None = None,
               inputs: Mapping | None = None, overwrite: bool = False) -> Path:
    """Write a mask artifact. masks: {layer: BlockSparseMask} (or a list indexed by layer).

    model: a transformers model, a fingerprint dict, or None (artifact not tied to a model).
    method/params: how the masks were made (e.g. "pattern:sliding_window", {"window": 4}).
    inputs: JSON description of the inputs (e.g. {"text_sha256": ..., "seq_len": 2048})."""
    return _write(out, "masks", _entries_of(masks), model=model, method=method, params=params,
                  extra_content={"inputs": dict(inputs or {})}, overwrite=overwrite)


def save_static(out, buckets: Mapping[int, Mapping[int, BlockSparseMask]], *, model=None,
                method: str = "static", params: Mapping | None = None,
                min_fraction: float, max_blocks_per_row: int | None,
                keep_diagonal: bool = True, keep_sink: bool = True, calibration_docs: int,
                recall: Mapping[int, Mapping | None] | None = None,
                overwrite: bool = False) -> Path:
    """Write a static pattern artifact: {seq_len bucket: {layer: mask with q_len = kv_len =
    bucket}}, with the aggregation settings and each bucket's held-out recall
    ({"mean": float, "per_layer": [float], "docs": int} or None)."""
    entries = []
    for bucket, layer_masks in sorted(buckets.items()):
        for layer, _, m in _entries_of(layer_masks):
            if (m.q_len, m.kv_len) != (bucket, bucket):
                raise ValueError(f"buckets[{bucket}][{layer}]: expected q_len = kv_len = "
                                 f"{bucket}, got {m.q_len}, {m.kv_len}")
            entries.append((layer, int(bucket), m))
    recall = recall or {}
    static = {"buckets": sorted(int(b) for b in buckets), "min_fraction": float(min_fraction),
              "max_blocks_per_row": max_blocks_per_row, "keep_diagonal": keep_diagonal,
              "keep_sink": keep_sink, "calibration_docs": int(calibration_docs),
              "recall": {str(b): _plain_recall(recall.get(b)) for b in sorted(buckets)}}
    return _write(out, "static", entries, model=model, method=method, params=params,
                  extra_content={"static": static}, overwrite=overwrite)


def _plain_recall(r):
    if r is None:
        return None
    return {"mean": float(r["mean"]), "per_layer": [float(x) for x in r["per_layer"]],
            "docs": int(r["docs"])}


@dataclass(frozen=True)
class MaskArtifact(ManifestFields):
    """A verified mask or static artifact. `masks[(layer, bucket)]` (bucket None for kind
    "masks") are validated `BlockSparseMask`s on CPU."""
    path: Path
    manifest: dict
    masks: dict[tuple[int, int | None], BlockSparseMask]

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.masks})

    @property
    def buckets(self) -> list[int]:
        return sorted({b for _, b in self.masks if b is not None})

    def layer_masks(self, bucket: int | None = None) -> dict[int, BlockSparseMask]:
        """{layer: mask} of one bucket (static) or of the artifact (masks)."""
        if self.kind == "static" and bucket not in self.buckets:
            raise ValueError(f"bucket: expected one of {self.buckets}, got {bucket!r}")
        if self.kind == "masks" and bucket is not None:
            raise ValueError(f"bucket: a mask artifact has no buckets, got {bucket!r}")
        return {layer: m for (layer, b), m in sorted(self.masks.items()) if b == bucket}

    def mask_for(self, layer: int, seq_len: int) -> BlockSparseMask | None:
        """Static: the mask of the smallest bucket >= seq_len cropped to seq_len (prefill,
        q_len = kv_len = seq_len); None when no bucket is long enough or the layer has none.
        Masks: the stored mask when its q_len = kv_len = seq_len, else None."""
        if self.kind == "masks":
            m = self.masks.get((layer, None))
            return m if m is not None and m.q_len == m.kv_len == seq_len else None
        fitting = [b for b in self.buckets if b >= seq_len]
        if not fitting or (layer, fitting[0]) not in self.masks:
            return None
        return crop(self.masks[(layer, fitting[0])], seq_len)


def crop(mask: BlockSparseMask, seq_len: int) -> BlockSparseMask:
    """The top-left seq_len x seq_len part of a causal square mask (q_len = kv_len)."""
    if mask.q_len != mask.kv_len:
        raise ValueError(f"mask: expected q_len = kv_len to crop, got {mask.q_len}, {mask.kv_len}")
    if not 1 <= seq_len <= mask.q_len:
        raise ValueError(f"seq_len: expected an int in [1, {mask.q_len}], got {seq_len!r}")
    if seq_len == mask.q_len:
        return mask
    nb = (seq_len + mask.block_size - 1) // mask.block_size
    dense = mask.to_dense()[:, :, :nb, :nb].contiguous()
    return BlockSparseMask.from_dense(dense, block_size=mask.block_size, q_len=seq_len,
                                      kv_len=seq_len, causal=mask.causal)


def _check_content(m: dict) -> list[dict]:
    kind = m["kind"]
    allowed = ("entries", "inputs") if kind == "masks" else ("entries", "static")
    content = req_dict(m["content"], "content", allowed)
    if kind == "masks":
        req_dict(content["inputs"], "content.inputs")
    else:
        st = req_dict(content["static"], "content.static", _STATIC_KEYS)
        buckets = req_list(st["buckets"], "content.static.buckets", 1024)
        for i, b in enumerate(buckets):
            req_int(b, f"content.static.buckets[{i}]", 1, _MAX_LEN)
        if buckets != sorted(set(buckets)) or not buckets:
            raise ArtifactError("manifest.content.static.buckets: expected distinct ascending "
                                f"ints, got {buckets[:8]!r}")
        req_num(st["min_fraction"], "content.static.min_fraction", 0.0, 1.0)
        if st["max_blocks_per_row"] is not None:
            req_int(st["max_blocks_per_row"], "content.static.max_blocks_per_row", 1, _MAX_LEN)
        req_bool(st["keep_diagonal"], "content.static.keep_diagonal")
        req_bool(st["keep_sink"], "content.static.keep_sink")
        req_int(st["calibration_docs"], "content.static.calibration_docs", 0, 1 << 40)
        rec = req_dict(st["recall"], "content.static.recall", tuple(str(b) for b in buckets))
        for b, r in rec.items():
            if r is None:
                continue
            f = f"content.static.recall.{b}"
            req_dict(r, f, ("mean", "per_layer", "docs"))
            req_num(r["mean"], f + ".mean", 0.0, 1.0 + 1e-6)
            for j, x in enumerate(req_list(r["per_layer"], f + ".per_layer", 1 << 16)):
                req_num(x, f"{f}.per_layer[{j}]", 0.0, 1.0 + 1e-6)
            req_int(r["docs"], f + ".docs", 0, 1 << 40)
    entries = req_list(content["entries"], "content.entries", 1 << 20)
    if not entries:
        raise ArtifactError("manifest.content.entries: expected at least one mask entry")
    seen = set()
    for i, e in enumerate(entries):
        f = f"content.entries[{i}]"
        req_dict(e, f, _ENTRY_KEYS)
        layer = req_int(e["layer"], f + ".layer", 0, 1 << 16)
        if kind == "masks":
            if e["bucket"] is not None:
                raise ArtifactError(f"manifest.{f}.bucket: expected null in a mask artifact, "
                                    f"got {e['bucket']!r}")
        elif e["bucket"] not in content["static"]["buckets"] or not isinstance(e["bucket"], int):
            raise ArtifactError(f"manifest.{f}.bucket: expected one of "
                                f"content.static.buckets, got {e['bucket']!r}")
        if e["key"] != _key(layer, e["bucket"]):
            raise ArtifactError(f"manifest.{f}.key: expected {_key(layer, e['bucket'])!r}, "
                                f"got {e['key']!r}")
        if e["key"] in seen:
            raise ArtifactError(f"manifest.{f}.key: duplicate entry {e['key']!r}")
        seen.add(e["key"])
        for k in ("batch", "heads"):
            req_int(e[k], f"{f}.{k}", 1, 1 << 16)
        for k in ("q_len", "kv_len"):
            req_int(e[k], f"{f}.{k}", 1, _MAX_LEN)
        req_bool(e["causal"], f + ".causal")
        if kind == "static" and not (e["q_len"] == e["kv_len"] == e["bucket"]):
            raise ArtifactError(f"manifest.{f}: expected q_len = kv_len = bucket in a static "
                                "artifact")
    fp = m["model"]
    if fp is not None:
        for i, e in enumerate(entries):
            if e["layer"] >= fp["num_layers"]:
                raise ArtifactError(f"manifest.content.entries[{i}].layer: expected < "
                                    f"model.num_layers ({fp['num_layers']}), got {e['layer']}")
    return entries


def masks_from_raw(raw: RawArtifact) -> MaskArtifact:
    """Validate the content of a verified mask/static artifact and build its masks."""
    m = raw.manifest
    if m["kind"] not in ("masks", "static"):
        raise ArtifactError(f"{raw.path}: expected a mask or static artifact, got kind "
                            f"{m['kind']!r}")
    entries = _check_content(m)
    if set(raw.tensors) != {MASKS_FILE}:
        raise ArtifactError(f"manifest.files: expected exactly {MASKS_FILE!r}, got "
                            f"{sorted(raw.tensors)}")
    tensors = raw.tensors[MASKS_FILE]
    expected = {f"{e['key']}.{t}" for e in entries for t in ("kv_num_blocks", "kv_indices")}
    if set(tensors) != expected:
        extra = sorted(set(tensors) - expected)[:3]
        missing = sorted(expected - set(tensors))[:3]
        raise ArtifactError(f"{MASKS_FILE}: tensor names do not match content.entries "
                            f"(missing {missing}, unexpected {extra})")
    bs = m["block_size"]
    masks = {}
    for e in entries:
        num, idx = tensors[f"{e['key']}.kv_num_blocks"], tensors[f"{e['key']}.kv_indices"]
        qb = (e["q_len"] + bs - 1) // bs
        kb = (e["kv_len"] + bs - 1) // bs
        want = ((e["batch"], e["heads"], qb), (e["batch"], e["heads"], qb, kb))
        if tuple(num.shape) != want[0] or tuple(idx.shape) != want[1]:
            raise ArtifactError(f"{MASKS_FILE}: {e['key']}: expected shapes {want[0]} and "
                                f"{want[1]}, got {tuple(num.shape)} and {tuple(idx.shape)}")
        try:
            masks[(e["layer"], e["bucket"])] = BlockSparseMask(
                num, idx, bs, e["q_len"], e["kv_len"], e["causal"])
        except (ValueError, TypeError) as err:
            raise ArtifactError(f"{MASKS_FILE}: {e['key']}: invalid mask ({err})") from None
    stats = mask_stats([(layer, b, mk) for (layer, b), mk in masks.items()])
    stored = m["stats"]
    if stored["density"] is None or abs(stored["density"] - stats["density"]) > 1e-9:
        raise ArtifactError(f"manifest.stats.density: expected {stats['density']} (the "
                            f"density of the stored masks), got {stored['density']}")
    return MaskArtifact(raw.path, m, masks)


def load_masks(path) -> MaskArtifact:
    """Read and verify a mask or static artifact (raises ArtifactError)."""
    return masks_from_raw(read_artifact(path))


def aggregate_static(masks: Sequence[BlockSparseMask], *, min_fraction: float = 0.5,
                     max_blocks_per_row: int | None = None, keep_diagonal: bool = True,
                     keep_sink: bool = True) -> BlockSparseMask:
    """One static mask per head from per-document masks of the same geometry.

    masks: BlockSparseMask [B_i, H, Qb, Kb] each (all documents are pooled: frequency of a
    block = fraction of documents that select it). A block is kept when its frequency is
    >= min_fraction (and > 0); the diagonal and key block 0 are always kept when asked; a row
    keeps at most max_blocks_per_row blocks, forced ones first, then by frequency, then the
    nearest to the diagonal. Returns a mask [1, H, Qb, Kb]."""
    if not masks:
        raise ValueError("masks: expected at least one per-document mask")
    first = masks[0]
    geom = (first.block_size, first.q_len, first.kv_len, first.causal, first.heads)
    for i, m in enumerate(masks):
        if not isinstance(m, BlockSparseMask):
            raise TypeError(f"masks[{i}]: expected a BlockSparseMask, got {type(m).__name__}")
        if (m.block_size, m.q_len, m.kv_len, m.causal, m.heads) != geom:
            raise ValueError(f"masks[{i}]: expected the geometry of masks[0] {first!r}, "
                             f"got {m!r}")
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction: expected a float in [0, 1], got {min_fraction!r}")
    if max_blocks_per_row is not None and (isinstance(max_blocks_per_row, bool) or
                                           not isinstance(max_blocks_per_row, int)
                                           or max_blocks_per_row < 1):
        raise ValueError(f"max_blocks_per_row: expected a positive int or None, "
                         f"got {max_blocks_per_row!r}")
    dense = torch.cat([m.to_dense().cpu() for m in masks], 0)  # [docs, H, Qb, Kb]
    freq = dense.double().mean(0)  # [H, Qb, Kb]
    bs, q_len, kv_len = first.block_size, first.q_len, first.kv_len
    allowed = block_causal(q_len, kv_len, bs, causal=first.causal)  # [Qb, Kb]
    forced = torch.zeros_like(allowed)
    if keep_diagonal and first.causal:
        forced |= diagonal_blocks(q_len, kv_len, bs)
    if keep_sink:
        forced[:, 0] = True
    forced &= allowed
    keep = ((freq >= min_fraction) & (freq > 0)) | forced
    keep &= allowed
    if max_blocks_per_row is not None:
        qb, kb = allowed.shape
        offset = kv_len - q_len
        row_pos = (torch.arange(qb) * bs + offset) // bs
        near = -(row_pos[:, None] - torch.arange(kb)[None, :]).abs().double()  # [Qb, Kb]
        score = freq + 2.0 * forced.double() + 1e-6 * (near - near.min()) / max(kb, 1)
        score = torch.where(keep, score, torch.full_like(score, -1.0))
        k = min(max_blocks_per_row, kb)
        top = score.topk(k, dim=-1).indices
        limited = torch.zeros_like(keep)
        limited.scatter_(-1, top, True)
        keep &= limited
    return BlockSparseMask.from_dense(keep[None].contiguous(), block_size=bs, q_len=q_len,
                                      kv_len=kv_len, causal=first.causal)


def static_recall(mask: BlockSparseMask, block_sum: torch.Tensor) -> torch.Tensor:
    """Held-out recall of a static mask: float [Hq] from block_sum float [B, Hq, Qb, Kb]
    (`block_attention_maps`) of documents of the mask's length."""
    from adaptive_sparse.attention.block_maps import attention_recall

    return attention_recall(block_sum.float().cpu(), mask.to_dense().cpu())
