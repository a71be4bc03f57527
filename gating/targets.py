"""Featurize once: pooled pre-rotary Q/K features and block attention targets, cached on disk.

One pass of the frozen model over packed sequences `[S, N]` collects, per layer, every pooling
of `gates.POOLINGS` of the pre-rotary q/k (`QKCapture`; one cache serves any gate pooling set)
and the targets of `adaptive_sparse.attention.block_maps.block_attention_maps` (its "auto"
backend: the Triton kernel on CUDA, the chunked PyTorch path elsewhere) on the post-rotary q/k
the attention really sees (`adaptive_sparse.models.observe_attention`: dense SDPA attention,
observed on every layer): `block_max` (row-normalized, the distillation target) and `block_sum`
(attention mass, for recall). No N x N tensor exists beyond one chunk of the block-map
computation.

Sliding-window layers (Gemma 3's local layers) are featurized like global ones: their targets are
the maps of full causal attention over their q/k (the window is not applied), so every layer has
a gate; `sparse_attention` runs those layers as exact windows and never asks their gates.

Cache layout (a directory per split):
  manifest.json          format, version, key, shapes, shard list (file, sha256, tokens_sha256)
  seq_00000.safetensors  one sequence:  tokens int64 [N]
                         L{l}.q.{pool}  float32 [Hq, Qb, D]    L{l}.k.{pool}  float32 [Hkv, Kb, D]
                         L{l}.block_max float16 [Hq, Qb, Kb]   L{l}.block_sum float16 [Hq, Qb, Kb]
The key (model fingerprint, corpus, split, seq_len, block size, pooling set) must match for a
cache to be reused or resumed; a shard already written and verified by sha256 is skipped.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from adaptive_sparse.attention.block_maps import MAP_BACKENDS, block_attention_maps
from adaptive_sparse.errors import fail
from adaptive_sparse.gates.network import POOLINGS, model_shapes, pool_blocks
from adaptive_sparse.gates.provider import QKCapture
from adaptive_sparse.io import atomic_save_tensors, atomic_write_json, sha256_file

CACHE_FORMAT = "adaptive-sparse-gate-cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
KEY_FIELDS = ("model", "fingerprint", "corpus", "split", "seq_len", "block_size", "poolings")


def cache_key(*, model: str | None, fingerprint: dict | None, corpus: str, split: str,
              seq_len: int, block_size: int, poolings=POOLINGS) -> dict:
    """The identity of a cache. A None model or fingerprint is not checked by `check_key`."""
    return {"model": None if model is None else str(model), "fingerprint": fingerprint,
            "corpus": str(corpus), "split": str(split), "seq_len": int(seq_len),
            "block_size": int(block_size), "poolings": list(poolings)}


def check_key(found: dict, expected: dict, where) -> None:
    """Raise ValueError naming the first differing key field (a None expected field is skipped)."""
    for name in KEY_FIELDS:
        want = expected.get(name)
        if want is None:
            continue
        got = found.get(name)
        if name == "fingerprint" and isinstance(got, dict) and isinstance(want, dict):
            for sub in sorted(set(got) | set(want)):
                if got.get(sub) != want.get(sub):
                    raise ValueError(f"{name}: the cache at {where} was built for a different "
                                     f"model ({name}.{sub} {got.get(sub)!r} != {want.get(sub)!r})")
            continue
        if got != want:
            raise ValueError(f"{name}: the cache at {where} has {name}={got!r}, expected "
                             f"{want!r}; use another cache_dir or delete it")


def read_manifest(directory) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != CACHE_FORMAT:
        raise fail("format", repr(CACHE_FORMAT), manifest.get("format"))
    if manifest.get("version") != CACHE_VERSION:
        raise fail("version", str(CACHE_VERSION), manifest.get("version"))
    return manifest


def _tokens_sha(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def featurize(model, sequences: torch.Tensor, out_dir, *, model_name: str, corpus: str,
              split: str, block_size: int = 64, backend: str = "auto",
              progress: bool = True) -> dict:
    """Run the frozen `model` over `sequences` (LongTensor [S, N]) and write the cache.

    backend: `block_attention_maps`'s, for the targets ("auto": triton on CUDA, else reference).
    Resumes: shards listed in an existing manifest with the same key, the same tokens and a
    matching sha256 are kept. Returns the manifest."""
    from adaptive_sparse.models import model_fingerprint, observe_attention

    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 \
            or sequences.dtype not in (torch.int64, torch.int32):
        raise fail("sequences", "an integer LongTensor [S, N]",
                    getattr(sequences, "shape", type(sequences).__name__))
    if backend not in MAP_BACKENDS:
        raise fail("backend", f"one of {MAP_BACKENDS}", backend)
    S, N = sequences.shape
    out_dir = Path(out_dir)
    key = cache_key(model=model_name, fingerprint=model_fingerprint(model), corpus=corpus,
                    split=split, seq_len=N, block_size=block_size)
    shapes = model_shapes(model)
    old = read_manifest(out_dir)
    if old is not None:
        check_key(old["key"], key, out_dir)
    shards = {s["index"]: s for s in (old or {}).get("shards", [])}
    device = next(model.parameters()).device
    out: dict[str, torch.Tensor] = {}  # one sequence's tensors (batch of one)

    def pooled(layer_idx: int, which: str, x: torch.Tensor) -> None:  # x [1, H, N, D] pre-rotary
        for pool, t in pool_blocks(x.float(), block_size, POOLINGS).items():
            out[f"L{layer_idx}.{which}.{pool}"] = t[0].cpu()

    def targets(call) -> None:  # call.q [1, Hq, N, D], call.k [1, Hkv, N, D] post-rotary
        bmax, bsum = block_attention_maps(call.q, call.k, block_size=block_size,
                                          scale=call.scale, backend=backend)
        out[f"L{call.layer_idx}.block_max"] = bmax[0].to(torch.float16).cpu()
        out[f"L{call.layer_idx}.block_sum"] = bsum[0].to(torch.float16).cpu()

    manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "shapes": shapes,
                "feature_dtype": "float32", "target_dtype": "float16", "num_sequences": S,
                "complete": False, "shards": []}
    base = model.base_model if hasattr(model, "base_model") else model
    from tqdm.auto import tqdm

    started = time.perf_counter()
    with QKCapture(model, on_capture=pooled), observe_attention(model, targets), \
            torch.no_grad():
        for i in tqdm(range(S), desc=f"featurize {split}", disable=not progress):
            tokens = sequences[i].to(torch.int64).cpu()
            tsha = _tokens_sha(tokens)
            prev = shards.get(i)
            path = out_dir / f"seq_{i:05d}.safetensors"
            if prev and prev["tokens_sha256"] == tsha and path.is_file() \
                    and sha256_file(path) == prev["sha256"]:
                manifest["shards"].append(prev)
                continue
            out.clear()
            out["tokens"] = tokens
            base(input_ids=tokens[None].to(device), use_cache=False)
            missing = [n for n in range(shapes["num_layers"]) if f"L{n}.block_max" not in out]
            if missing:
                raise RuntimeError(f"featurize: layers {missing} did not run the observed "
                                   "attention (is the model an AttentionInterface model?)")
            digest = atomic_save_tensors(path, out)
            manifest["shards"].append({"index": i, "file": path.name, "sha256": digest,
                                       "tokens_sha256": tsha})
            atomic_write_json(out_dir / MANIFEST, manifest)
    manifest["complete"] = True
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


class GateCache:
    """Read side of a cache directory; `expected_key` (fields None = unchecked) is enforced."""

    def __init__(self, directory, expected_key: dict | None = None, *, verify: bool = False):
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise fail("directory", f"a gate cache holding {MANIFEST}", str(directory))
        if not manifest.get("complete"):
            raise fail("directory", "a complete cache (featurize was interrupted; run it again "
                        "to resume)", str(directory))
        if expected_key is not None:
            check_key(manifest["key"], expected_key, self.directory)
        self.manifest = manifest
        self.shards = sorted(manifest["shards"], key=lambda s: s["index"])
        if verify:
            for s in self.shards:
                if sha256_file(self.directory / s["file"]) != s["sha256"]:
                    raise fail(s["file"], f"sha256 {s['sha256']}", "a different file")

    @property
    def key(self) -> dict:
        return self.manifest["key"]

    @property
    def shapes(self) -> dict:
        return self.manifest["shapes"]

    @property
    def block_size(self) -> int:
        return self.key["block_size"]

    @property
    def seq_len(self) -> int:
        return self.key["seq_len"]

    def __len__(self) -> int:
        return len(self.shards)

    def load(self, i: int) -> dict[str, torch.Tensor]:
        """Tensors of sequence i (see the module docstring for names and shapes)."""
        from safetensors.torch import load_file

        return load_file(str(self.directory / self.shards[i]["file"]))
