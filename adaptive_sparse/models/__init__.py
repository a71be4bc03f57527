"""Pretrained models: loading (presets, GGUF, HF folders) and sparse attention through
transformers' AttentionInterface, driven by per-layer mask providers."""

from adaptive_sparse.models.attention import (
    ATTN_NAME,
    AttentionCall,
    dense_attention,
    disable_sparse_attention,
    enable_sparse_attention,
    local_window_attention,
    observe_attention,
    register,
    sparse_attention,
)
from adaptive_sparse.models.loading import (
    PRESETS,
    Preset,
    is_chat_model,
    load_model,
    resolve_model_path,
)
from adaptive_sparse.models.fingerprint import model_fingerprint
from adaptive_sparse.models.config import text_config
from adaptive_sparse.models.providers import (
    CaptureProvider,
    OracleProvider,
    PatternProvider,
    ProviderSpec,
    RecordingProvider,
    build_provider,
)

__all__ = [
    "ATTN_NAME", "AttentionCall", "CaptureProvider", "OracleProvider", "PRESETS",
    "PatternProvider", "Preset", "ProviderSpec", "RecordingProvider", "build_provider",
    "dense_attention", "disable_sparse_attention", "enable_sparse_attention", "is_chat_model",
    "load_model", "local_window_attention", "model_fingerprint", "observe_attention", "register",
    "resolve_model_path", "sparse_attention", "text_config",
]
