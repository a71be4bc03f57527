"""Evaluate a mask provider on a model: perplexity dense vs sparse, density, recall; needle
accuracy.

The dense pass uses the model's own attention (e.g. SDPA) and is cached per (model, sequence):
`dense_cache` is a dict or a JSON file path, so several settings on the same sequences pay for it
once. The sparse pass routes every layer through `block_sparse_attention` with the provider's
masks and records density and (optionally) attention recall per layer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adaptive_sparse.io import atomic_write_json
from adaptive_sparse.metrics import NeedleAccuracy, Perplexity
from adaptive_sparse.models.config import text_config

_LOGIT_CHUNK = 1024


@torch.no_grad()
def final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states [B, L, d] (after the final norm, before the LM head)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    return base(input_ids=input_ids, use_cache=False).last_hidden_state


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of the LM head on hidden states [..., d] (the config's final logit
    soft-capping applied when it has one). Differentiable: sparse-aware training uses it."""
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(text_config(model), "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


@torch.no_grad()
def sequence_nll(model, input_ids: torch.Tensor) -> tuple[float, int]:
    """(summed next-token NLL in nats, number of predicted tokens) of input_ids LongTensor [B, L].

    Runs the decoder once and applies the LM head in chunks of positions, so the [L, vocab]
    logits never exist at once (final logit soft-capping is applied when the config has it)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
            or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids: expected a LongTensor [B, L], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids: expected at least 2 tokens, got {input_ids.shape[1]}")
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    hidden = final_hidden(model, ids)  # [B, L, d]
    total = 0.0
    L = ids.shape[1]
    for i in range(0, L - 1, _LOGIT_CHUNK):
        j = min(L - 1, i + _LOGIT_CHUNK)
        logits = lm_logits(model, hidden[:, i:j])  # [B, R, V]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       ids[:, i + 1:j + 1].reshape(-1), reduction="sum"))
    return total, int(ids.shape[0] * (L - 1))


def _cache_key(fingerprint: dict, ids: torch.Tensor) -> str:
    from adaptive_sparse.data.corpora import sequence_id

    return f"{fingerprint['config_sha256'][:16]}:{fingerprint['weights_sha256'][:16]}:" \
           f"{sequence_id(ids)}"


def _open_cache(dense_cache):
    if dense_cache is None:
        return {}, None
    if isinstance(dense_cache, dict):
        return dense_cache, None
    if isinstance(dense_cache, (str, Path)):
        path = Path(dense_cache)
        data = json.loads(path.read_text()) if path.is_file() else {}
        return data, path
    raise TypeError(f"dense_cache: expected None, a dict or a JSON path, got "
                    f"{type(dense_cache).__name__}")


def _describe(provider):
    if provider is None:
        return {"pattern": "dense"}
    if hasattr(provider, "describe"):
        return provider.describe()
    return {"provider": type(provider).__name__}


@torch.no_grad()
def evaluate(model, sequences: torch.Tensor, provider, *, dense_cache=None,
             progress: bool = True, recall: bool = True, block_size: int = 64,
             backend: str = "auto", desc: str | None = None) -> dict:
    """Perplexity of `sequences` (LongTensor [S, L]) with dense attention and with `provider`.

    provider: (layer_idx, q, k) -> BlockSparseMask | None, or None (dense through our attention).
    recall: also measure attention recall (one extra block-map pass per layer).
    Returns perplexity_dense, perplexity, ppl_change (perplexity / perplexity_dense - 1),
    density, recall (None when off), per_layer [{layer, density, recall, recall_per_head}],
    num_seqs, seq_len, tokens, seconds_dense (0 when cached), seconds, provider."""
    from tqdm.auto import tqdm

    from adaptive_sparse.models.attention import sparse_attention
    from adaptive_sparse.models.fingerprint import model_fingerprint
    from adaptive_sparse.models.providers import CaptureProvider

    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 \
            or sequences.dtype != torch.long or sequences.shape[0] < 1:
        raise ValueError(f"sequences: expected a non-empty LongTensor [S, L], got "
                         f"{getattr(sequences, 'dtype', type(sequences).__name__)} "
                         f"{tuple(getattr(sequences, 'shape', ()))}")
    cache, cache_path = _open_cache(dense_cache)
    fp = model_fingerprint(model)
    ppl_dense, ppl_sparse = Perplexity(), Perplexity()
    capture = CaptureProvider(provider, recall=recall, block_size=block_size)
    seconds_dense = seconds = 0.0
    bar = tqdm(total=2 * sequences.shape[0], desc=desc or "evaluate", disable=not progress,
               unit="pass", leave=False)
    for row in sequences:
        ids = row[None]
        key = _cache_key(fp, row)
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = list(sequence_nll(model, ids))
            seconds_dense += time.perf_counter() - t0
        ppl_dense.update(*cache[key])
        bar.update(1)
        t0 = time.perf_counter()
        with sparse_attention(model, capture, block_size=block_size, backend=backend):
            ppl_sparse.update(*sequence_nll(model, ids))
        seconds += time.perf_counter() - t0
        bar.update(1)
    bar.close()
    if cache_path is not None:
        atomic_write_json(cache_path, cache)
    dense_v, sparse_v = float(ppl_dense.compute()), float(ppl_sparse.compute())
    summary = capture.summary()
    return {
        "perplexity_dense": dense_v,
        "perplexity": sparse_v,
        "ppl_change": sparse_v / dense_v - 1.0,
        "density": summary["density"],
        "recall": summary["recall"],
        "per_layer": capture.per_layer(),
        "num_seqs": int(sequences.shape[0]),
        "seq_len": int(sequences.shape[1]),
        "tokens": int(sequences.shape[0] * (sequences.shape[1] - 1)),
        "seconds_dense": seconds_dense,
        "seconds": seconds,
        "provider": _describe(provider),
    }


@torch.no_grad()
def generate_answer(model, tokenizer, input_ids: torch.Tensor, *,
                    max_new_tokens: int = 12) -> str:
    """Greedy continuation of input_ids LongTensor [L], decoded without special tokens."""
    device = next(model.parameters()).device
    ids = input_ids[None].to(device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def evaluate_needle(model, tokenizer, samples, provider=None, *, sparse: bool = True,
                    max_new_tokens: int = 12, block_size: int = 64, backend: str = "auto",
                    progress: bool = True) -> dict:
    """Needle accuracy of greedy answers, with `provider` (sparse=True; prefill and every
    decoding step use the provider's masks) or with the model's own attention (sparse=False).

    Returns {"needle_accuracy", "answers": [{answer, expected, depth, correct}], "seconds"}."""
    from tqdm.auto import tqdm

    from adaptive_sparse.data.needle import score_answer
    from adaptive_sparse.models.attention import sparse_attention

    if not samples:
        raise ValueError("samples: expected at least one needle sample")
    metric = NeedleAccuracy()
    rows = []
    t0 = time.perf_counter()
    for s in tqdm(samples, desc="needle", disable=not progress, leave=False):
        if sparse:
            with sparse_attention(model, provider, block_size=block_size, backend=backend):
                text = generate_answer(model, tokenizer, s.input_ids,
                                       max_new_tokens=max_new_tokens)
        else:
            text = generate_answer(model, tokenizer, s.input_ids, max_new_tokens=max_new_tokens)
        metric.update([text], [s])
        rows.append({"answer": text, "expected": s.answer, "depth": s.depth,
                     "correct": score_answer(text, s.answer)})
    return {"needle_accuracy": float(metric.compute()), "answers": rows,
            "seconds": time.perf_counter() - t0}

