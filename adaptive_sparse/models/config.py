"""The text part of a model's config (multimodal models nest it; text models are their own)."""

from __future__ import annotations


def text_config(model_or_config):
    """The config of the language model: `config.get_text_config()` where transformers offers
    it (multimodal models such as Gemma 3), else the config itself. Accepts a model (anything
    with `.config`) or a config."""
    cfg = getattr(model_or_config, "config", model_or_config)
    if cfg is None:
        raise TypeError(f"model: expected a transformers model or config, got "
                        f"{type(model_or_config).__name__}")
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
