"""Converters from mask/static artifacts to the layouts other stacks take.

In memory (one layer, one bucket):
  to_flex(art, layer)   FlexAttention `BlockMask`
  to_bsr(art, layer)    [B][H] scipy `bsr_array`s (indptr/indices, blocks bs x bs)
  to_dense(art, layer)  bool [B, H, Qb, Kb]

On disk (`convert_artifact(src, to, out)`): a directory with `layout.json` (which layout, block
size, lengths and how to read it) and `<layout>.safetensors`:
  dense  `<key>.mask` bool [B, H, Qb, Kb]
  bsr    `<key>.indptr` int32 [B, H, Qb + 1], `<key>.indices` int32 [B, H, nnz_max] (row
         (b, h) uses the first indptr[b, h, -1] entries; the rest is -1)
  flex   `<key>.kv_num_blocks` int32 [B, H, Qb], `<key>.kv_indices` int32 [B, H, Qb, Kb],
         `<key>.q_num_blocks` int32 [B, H, Kb], `<key>.q_indices` int32 [B, H, Kb, Qb]
         (partial blocks: tiles cut by the causal diagonal or a ragged edge), and the same four
         with prefix `full_` (wholly visible tiles; Flex skips their mask_mod).
         BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks,
         full_kv_indices, BLOCK_SIZE, mask_mod, seq_lengths) with a causal mask_mod rebuilds it
`<key>` is the artifact's entry key (`layers.<i>` or `buckets.<n>.layers.<i>`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adaptive_sparse.models.fingerprint import sha256_hex
from adaptive_sparse.io import atomic_write_dir
from adaptive_sparse.export.masks import MaskArtifact, load_masks
from adaptive_sparse.masks import BlockSparseMask

LAYOUTS = ("flex", "bsr", "dense")
LAYOUT_FILE = "layout.json"


def _art(artifact) -> MaskArtifact:
    return artifact if isinstance(artifact, MaskArtifact) else load_masks(artifact)


def _mask(artifact, layer: int, bucket: int | None) -> BlockSparseMask:
    art = _art(artifact)
    if art.kind == "static" and bucket is None:
        raise ValueError(f"bucket: a static artifact needs one of {art.buckets}")
    masks = art.layer_masks(bucket)
    if layer not in masks:
        raise ValueError(f"layer: expected one of {sorted(masks)}, got {layer!r}")
    return masks[layer]


def to_flex(artifact, layer: int, bucket: int | None = None):
    """FlexAttention BlockMask of one layer (artifact: a path or a loaded MaskArtifact)."""
    return _mask(artifact, layer, bucket).to_flex()


def to_bsr(artifact, layer: int, bucket: int | None = None) -> list[list]:
    """[B][H] scipy bsr_array of shape [Qb*bs, Kb*bs] with (bs, bs) blocks of True."""
    m = _mask(artifact, layer, bucket)
    return [[m.to_bsr(b, h) for h in range(m.heads)] for b in range(m.batch)]


def to_dense(artifact, layer: int, bucket: int | None = None) -> torch.Tensor:
    """bool [B, H, Qb, Kb]."""
    return _mask(artifact, layer, bucket).to_dense()


def _bsr_tensors(m: BlockSparseMask) -> tuple[torch.Tensor, torch.Tensor]:
    num = m.kv_num_blocks.long()  # [B, H, Qb]
    indptr = torch.zeros(*num.shape[:2], num.shape[2] + 1, dtype=torch.int64)
    indptr[..., 1:] = num.cumsum(-1)
    nnz_max = max(int(indptr[..., -1].max()), 1)
    valid = m._valid_slots()  # [B, H, Qb, Kb]
    indices = torch.full((*num.shape[:2], nnz_max), -1, dtype=torch.int32)
    for b in range(m.batch):
        for h in range(m.heads):
            row = m.kv_indices[b, h][valid[b, h]]
            indices[b, h, :row.numel()] = row
    return indptr.to(torch.int32), indices


def _flex_tensors(m: BlockSparseMask) -> dict[str, torch.Tensor]:
    bm = m.to_flex()
    names = ("kv_num_blocks", "kv_indices", "q_num_blocks", "q_indices")
    return {prefix + n: getattr(bm, prefix + n) for prefix in ("", "full_") for n in names}


def convert_artifact(src, to: str, out, *, overwrite: bool = False) -> Path:
    """Write every mask of the artifact at `src` in layout `to` ("flex" | "bsr" | "dense")."""
    from safetensors.torch import save

    if to not in LAYOUTS:
        raise ValueError(f"to: expected one of {LAYOUTS}, got {to!r}")
    art = _art(src)
    tensors, entries = {}, []
    for (layer, bucket), m in sorted(art.masks.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0])):
        key = f"layers.{layer}" if bucket is None else f"buckets.{bucket}.layers.{layer}"
        if to == "dense":
            tensors[f"{key}.mask"] = m.to_dense()
        elif to == "bsr":
            tensors[f"{key}.indptr"], tensors[f"{key}.indices"] = _bsr_tensors(m)
        else:
            for name, t in _flex_tensors(m).items():
                tensors[f"{key}.{name}"] = t.to(torch.int32)
        entries.append({"key": key, "layer": layer, "bucket": bucket, "batch": m.batch,
                        "heads": m.heads, "q_len": m.q_len, "kv_len": m.kv_len,
                        "causal": m.causal})
    data = save({k: v.contiguous() for k, v in tensors.items()})
    name = f"{to}.safetensors"
    layout = {"layout": to, "block_size": art.block_size, "block_shape": [art.block_size] * 2,
              "source_manifest_sha256": art.manifest["manifest_sha256"],
              "file": name, "sha256": sha256_hex(data), "size": len(data), "entries": entries,
              "causal_rule": "query i sees key j <= i + (kv_len - q_len)"}
    return atomic_write_dir(out, {name: data, LAYOUT_FILE: (json.dumps(layout, indent=1)
                                                            + "\n").encode()},
                            overwrite=overwrite, marker=LAYOUT_FILE)
