"""The one model fingerprint: what an artifact, a gate cache or an eval JSON must agree on with
the model it is used with.

The fingerprint names the architecture (the model class) and the shapes attention depends on
(layers, heads, KV heads, head_dim, rotary settings), holds the canonical model config with its
sha256, and a sha256 of the weights: every value of every state_dict tensor, rounded to bfloat16
(so the fp32 and bf16 loads of one checkpoint agree), with the tensor names and shapes. Nothing
depends on where the model came from: the same weights loaded from a GGUF file or from a Hugging
Face folder give the same fingerprint. Runtime keys that do not change the computation (dtype,
cache and output flags, token ids, label maps, transformers version, private `_` keys, the
source path) are left out of the canonical config.

Cost of the weights hash: see `weights_digest`. It is computed once per model and cached on it
while no parameter changes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FINGERPRINT_FIELDS = ("architecture", "model_type", "num_layers", "num_heads", "num_kv_heads",
                      "head_dim", "hidden_size", "rotary", "config_sha256", "weights_sha256")

_VOLATILE_KEYS = frozenset({
    "transformers_version", "architectures", "output_hidden_states", "output_attentions",
    "return_dict", "dtype", "torch_dtype", "use_cache", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "pad_token_id", "bos_token_id", "eos_token_id",
    "sep_token_id", "decoder_start_token_id", "tokenizer_class", "name_or_path",
    "attn_implementation", "use_return_dict", "tf_legacy_loss", "torchscript",
    "quantization_config",  # where the weights came from (a GGUF); the weights digest covers them
})

_ROTARY_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
                "rope_local_base_freq", "max_position_embeddings", "sliding_window",
                "layer_types")


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, ASCII only, no NaN: the same bytes on every machine."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _plain(value: Any) -> Any:
    """A JSON-safe copy: dicts with str keys, lists, scalars; anything else as its str."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    return str(value)


def canonical_config(config) -> dict:
    """The model config as a plain dict without runtime-only keys (recursively)."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items()
                    if k not in _VOLATILE_KEYS and not str(k).startswith("_")}
        if isinstance(d, list):
            return [strip(v) for v in d]
        return d

    return _plain(strip(raw))


def config_fingerprint(config, *, architecture: str | None = None) -> dict:
    """Fingerprint of a transformers `PretrainedConfig` (see the module docstring).

    `architecture` defaults to `config.architectures[0]`, else the model type."""
    from adaptive_sparse.models.config import text_config

    text = text_config(config)
    heads = int(text.num_attention_heads)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    hidden = int(text.hidden_size)
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    if architecture is None:
        archs = getattr(config, "architectures", None) or []
        architecture = archs[0] if archs else str(getattr(config, "model_type", "unknown"))
    canon = canonical_config(config)
    text_dict = text.to_dict() if hasattr(text, "to_dict") else {}
    rotary = _plain({k: text_dict[k] for k in _ROTARY_KEYS if k in text_dict})
    return {
        "architecture": str(architecture),
        "model_type": str(getattr(config, "model_type", "") or ""),
        "num_layers": int(text.num_hidden_layers),
        "num_heads": heads,
        "num_kv_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "hidden_size": hidden,
        "rotary": rotary,
        "config_sha256": sha256_hex(canonical_json(canon).encode()),
        "weights_sha256": None,
        "config": canon,
    }


def model_fingerprint(model) -> dict:
    """Fingerprint of a Hugging Face model: its config, with the model class as architecture,
    and `weights_digest(model)`."""
    if not hasattr(model, "config"):
        raise TypeError(f"model: expected a transformers model with a .config, "
                        f"got {type(model).__name__}")
    fp = config_fingerprint(model.config, architecture=type(model).__name__)
    fp["weights_sha256"] = weights_digest(model)
    return fp


_DIGEST_CHUNK = 1 << 24  # elements converted at a time: bounds the extra memory to 32 MB


def _tensor_key(t) -> tuple:
    return (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t._version)


def _state_key(state) -> tuple:
    return tuple((name, _tensor_key(t)) for name, t in sorted(state.items()))


def remember_weights_digest(model, digest: str) -> None:
    """Record `digest` as `weights_digest(model)` for the model's current tensors: for a loader
    that has just verified the weights' files against a digest computed earlier from the same
    tensors (the weights cache of `adaptive_sparse.models.loading`)."""
    model.__dict__["_adaptive_sparse_digest"] = (_state_key(model.state_dict()), digest)


def weights_digest(model) -> str:
    """sha256 over (name, shape, every value in bfloat16) of every state_dict tensor; a tensor
    that shares storage with an earlier one (tied embeddings) is recorded by reference. Cached
    on the model, keyed by every tensor's storage and version counter (an in-place update or a
    load changes it). Cost of hashing whole tensors on 2 CPU cores (fp32 models): SmolLM2-135M
    1.7 s, Qwen2.5-Coder-0.5B 2.8 s (2.3 s and 4.9-5.6 s with the cores shared); a load from the
    weights cache reuses the digest recorded when the cache was written
    (`remember_weights_digest`): ~0.002 s."""
    import torch

    state = model.state_dict()
    key = _state_key(state)
    cached = model.__dict__.get("_adaptive_sparse_digest")
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256()
    seen: dict[tuple, str] = {}
    with torch.no_grad():
        for name, t in sorted(state.items()):
            h.update(f"{name}{tuple(t.shape)};".encode())
            ident = _tensor_key(t)[:4]
            if ident in seen:
                h.update(f"={seen[ident]};".encode())
                continue
            seen[ident] = name
            flat = t.detach().reshape(-1)
            for i in range(0, flat.numel(), _DIGEST_CHUNK):
                part = flat[i:i + _DIGEST_CHUNK].cpu()
                if part.is_floating_point():
                    part = part.to(torch.bfloat16).view(torch.int16)
                h.update(part.contiguous().numpy().data)
    digest = h.hexdigest()
    model.__dict__["_adaptive_sparse_digest"] = (key, digest)
    return digest


def _short(value: Any) -> str:
    text = canonical_json(_plain(value))
    return text if len(text) <= 80 else text[:77] + "..."


def fingerprint_differences(stored: dict, actual: dict) -> list[str]:
    """Human-readable differences, named by field ("num_kv_heads: artifact 2, model 4").

    When only the config hash differs, the differing config keys are named."""
    diffs = []
    for field in FINGERPRINT_FIELDS:
        if field == "config_sha256":
            continue
        if field == "weights_sha256" and (stored.get(field) is None or actual.get(field) is None):
            continue
        if stored.get(field) != actual.get(field):
            diffs.append(f"{field}: artifact {_short(stored.get(field))}, "
                         f"model {_short(actual.get(field))}")
    if stored.get("config_sha256") != actual.get("config_sha256"):
        a, b = stored.get("config") or {}, actual.get("config") or {}
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if keys:
            diffs.extend(f"config.{k}: artifact {_short(a.get(k, '<absent>'))}, "
                         f"model {_short(b.get(k, '<absent>'))}" for k in keys[:8])
        else:
            diffs.append(f"config_sha256: artifact {stored.get('config_sha256')}, "
                         f"model {actual.get('config_sha256')}")
    return diffs
