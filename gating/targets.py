"""Featurize once: pooled pre-rotary Q/K features and block attention targets, cached on disk.

One pass of the frozen model over packed sequences `[S, N]` collects, per layer, every pooling
of `gates.POOLINGS` (so one cache serves any gate pooling set) and the targets of
`adaptive_sparse.attention.block_maps.block_attention_maps` (computed by the Triton kernel on
CUDA, by the equivalent `causal_block_maps` on CPU) on the post-rotary q/k the attention
really sees (captured through a registered transformers attention function that then runs SDPA):
`block_max` (row-normalized, the distillation target) and `block_sum` (attention mass, for
recall). No N x N tensor exists beyond one chunk of the block-map computation.

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

from gating.gates import POOLINGS, model_shapes, pool_blocks
from gating.provider import QKCapture, atomic_save_tensors, atomic_write_json, sha256_file

CACHE_FORMAT = "adaptive-sparse-gate-cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
KEY_FIELDS = ("model", "fingerprint", "corpus", "split", "seq_len", "block_size", "poolings")
_ATTN_NAME = "adaptive_sparse_gate_capture"


def _fail(name: str, expected: str, got) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got!r}")


def model_fingerprint(model) -> dict:
    from adaptive_sparse.models import model_fingerprint as fingerprint

    return fingerprint(model)


def cache_key(*, model: str | None, fingerprint: dict | None, corpus: str, split: str, seq_len: int,
              block_size: int, poolings=POOLINGS) -> dict:
    """The identity of a cache. A None model or fingerprint is not checked by `check_key`."""
    return {"model": None if model is None else str(model), "fingerprint": fingerprint, "corpus": str(corpus),
            "split": str(split), "seq_len": int(seq_len), "block_size": int(block_size),
            "poolings": list(poolings)}


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
        raise _fail("format", repr(CACHE_FORMAT), manifest.get("format"))
    if manifest.get("version") != CACHE_VERSION:
        raise _fail("version", str(CACHE_VERSION), manifest.get("version"))
    return manifest


def _tokens_sha(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


class _Collector:
    """Per forward: pooled pre-rotary q/k and block maps of every layer."""

    def __init__(self, block_size: int, maps_fn):
        self.block_size = block_size
        self.maps_fn = maps_fn
        self.out: dict[str, torch.Tensor] = {}

    def on_capture(self, layer_idx: int, which: str, x: torch.Tensor) -> None:
        for pool, t in pool_blocks(x.float(), self.block_size, POOLINGS).items():
            self.out[f"L{layer_idx}.{which}.{pool}"] = t[0].cpu()  # batch of one

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        bmax, bsum = self.maps_fn(query, key, block_size=self.block_size,
                                  scale=kwargs.get("scaling"))
        layer = module.layer_idx
        self.out[f"L{layer}.block_max"] = bmax[0].to(torch.float16).cpu()
        self.out[f"L{layer}.block_sum"] = bsum[0].to(torch.float16).cpu()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def causal_block_maps(q: torch.Tensor, k: torch.Tensor, *, block_size: int,
                      scale: float | None = None, rows: int = 512):
    """The outputs of `block_maps.block_attention_maps(q, k, causal=True)`, computed faster on
    CPU: query chunks of `rows` rows read only the keys they can see (about half the work of a
    full N x M pass), and each chunk is exponentiated once, in place.

    q [B, Hq, N, D], k [B, Hkv, M, D] -> (block_max, block_sum) float32 [B, Hq, Qb, Kb]."""
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise _fail("k", f"a KV head count dividing Hq={Hq}", Hkv)
    G, bs = Hq // Hkv, block_size
    Qb, Kb = -(-N // bs), -(-M // bs)
    scale = D ** -0.5 if scale is None else scale
    off = M - N
    bmax = torch.zeros(B, Hkv, G, Qb, Kb, dtype=torch.float32, device=q.device)
    bsum = torch.zeros_like(bmax)
    qg = q.float().view(B, Hkv, G, N, D) * scale
    kt = k.float().transpose(-1, -2)
    rows = max(bs, rows // bs * bs)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        R, kv_end = r1 - r0, min(M, r1 + off)
        kbe = -(-kv_end // bs)
        s = torch.matmul(qg[:, :, :, r0:r1].reshape(B, Hkv, G * R, D), kt[..., :kv_end])
        s = s.view(B, Hkv, G, R, kv_end)  # [B, Hkv, G, R, kv_end]
        d0 = r0 + off + 1
        if d0 < kv_end:
            hidden = torch.arange(d0, kv_end, device=q.device)[None, :] > \
                (torch.arange(r0, r1, device=q.device)[:, None] + off)
            s[..., d0:kv_end].masked_fill_(hidden, float("-inf"))
        s.sub_(s.amax(-1, keepdim=True)).exp_()
        s.div_(s.sum(-1, keepdim=True))
        pad_k, pad_r = kbe * bs - kv_end, -(-R // bs) * bs - R
        if pad_k or pad_r:
            s = torch.nn.functional.pad(s, (0, pad_k, 0, pad_r))
        s = s.view(B, Hkv, G, -1, bs, kbe, bs)
        qb0 = r0 // bs
        qb1 = qb0 + s.shape[3]
        bmax[..., qb0:qb1, :kbe] = s.amax(-1).amax(4)
        bsum[..., qb0:qb1, :kbe] = s.sum(-1).sum(4)
    rows_in_block = torch.clamp(N - torch.arange(Qb, device=q.device) * bs, max=bs).float()
    bsum /= rows_in_block[:, None]
    bmax /= bmax.sum(-1, keepdim=True).clamp_min(1e-30)
    return bmax.view(B, Hq, Qb, Kb), bsum.view(B, Hq, Qb, Kb)


def _maps_fn(device: torch.device):
    """The fused Triton kernel on CUDA when available, else `causal_block_maps`."""
    if device.type == "cuda":
        try:
            from adaptive_sparse.attention.triton import block_attention_maps_triton

            return lambda q, k, *, block_size, scale: block_attention_maps_triton(
                q, k, block_size=block_size, scale=scale, causal=True)
        except ImportError:
            pass
    return causal_block_maps


def featurize(model, sequences: torch.Tensor, out_dir, *, model_name: str, corpus: str,
              split: str, block_size: int = 64, progress: bool = True) -> dict:
    """Run the frozen `model` over `sequences` (LongTensor [S, N]) and write the cache.

    Resumes: shards listed in an existing manifest with the same key, the same tokens and a
    matching sha256 are kept. Returns the manifest."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 \
            or sequences.dtype not in (torch.int64, torch.int32):
        raise _fail("sequences", "an integer LongTensor [S, N]",
                    getattr(sequences, "shape", type(sequences).__name__))
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
    collector = _Collector(block_size, _maps_fn(device))
    AttentionInterface.register(_ATTN_NAME, collector.attention)
    AttentionMaskInterface.register(_ATTN_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "shapes": shapes,
                "feature_dtype": "float32", "target_dtype": "float16", "num_sequences": S,
                "complete": False, "shards": []}
    base = model.base_model if hasattr(model, "base_model") else model
    from tqdm.auto import tqdm

    started = time.perf_counter()
    model.set_attn_implementation(_ATTN_NAME)
    try:
        with QKCapture(model, on_capture=collector.on_capture), torch.no_grad():
            for i in tqdm(range(S), desc=f"featurize {split}", disable=not progress):
                tokens = sequences[i].to(torch.int64).cpu()
                tsha = _tokens_sha(tokens)
                prev = shards.get(i)
                path = out_dir / f"seq_{i:05d}.safetensors"
                if prev and prev["tokens_sha256"] == tsha and path.is_file() \
                        and sha256_file(path) == prev["sha256"]:
                    manifest["shards"].append(prev)
                    continue
                collector.out = {"tokens": tokens}
                base(input_ids=tokens[None].to(device), use_cache=False)
                missing = [n for n in range(shapes["num_layers"])
                           if f"L{n}.block_max" not in collector.out]
                if missing:
                    raise RuntimeError(f"featurize: layers {missing} did not run the captured "
                                       "attention (is the model an AttentionInterface model?)")
                digest = atomic_save_tensors(path, collector.out)
                manifest["shards"].append({"index": i, "file": path.name, "sha256": digest,
                                           "tokens_sha256": tsha})
                atomic_write_json(out_dir / MANIFEST, manifest)
    finally:
        model.set_attn_implementation(previous)
        collector.out = {}
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
            raise _fail("directory", f"a gate cache holding {MANIFEST}", str(directory))
        if not manifest.get("complete"):
            raise _fail("directory", "a complete cache (featurize was interrupted; run it again "
                        "to resume)", str(directory))
        if expected_key is not None:
            check_key(manifest["key"], expected_key, self.directory)
        self.manifest = manifest
        self.shards = sorted(manifest["shards"], key=lambda s: s["index"])
        if verify:
            for s in self.shards:
                if sha256_file(self.directory / s["file"]) != s["sha256"]:
                    raise _fail(s["file"], f"sha256 {s['sha256']}", "a different file")

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
