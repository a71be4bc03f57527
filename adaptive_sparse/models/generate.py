"""Generation through transformers with sparse prefill and/or sparse decode.

`model.generate` runs with its standard KV cache; inside `sparse_attention(model, provider)` every
attention call goes through the "adaptive_sparse" AttentionInterface registration: prefill calls
(several queries) take the provider's prefill mask, decode calls (one query over the whole cache)
its decode mask, served by the split-KV decode kernel on CUDA. `DecodeProvider`
(adaptive_sparse.gates.decode) chooses each side: dense, decode gates, the keys' per-block
min / max bound (training-free), or the oracle.

`compare_generation` generates greedily twice, with the model's own dense attention and with the
sparse provider, and reports tokens per second of each and how far the greedy tokens agree.
`generate_main` is the `adaptive-sparse generate` command.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from adaptive_sparse.errors import fail

DEFAULT_PROMPT = ("The history of the printing press begins in the fifteenth century, when "
                  "Johannes Gutenberg combined movable metal type, oil-based ink and a screw "
                  "press. Within fifty years printing shops had spread across Europe, and the "
                  "price of books fell sharply. Write a short summary of why this mattered for "
                  "science, religion and politics, in plain language.")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class _FirstTokenClock:
    """A logits processor that changes nothing and records when it is first called: the end
    of the prefill forward (any batch size)."""

    def __init__(self, device):
        self.device, self.first = device, None

    def __call__(self, input_ids, scores):
        if self.first is None:
            _sync(self.device)
            self.first = time.perf_counter()
        return scores


def greedy_generate(model, ids: torch.Tensor, *, max_new_tokens: int, provider=None,
                    sparse: bool = False, block_size: int = 64, backend: str = "auto"):
    """Greedy `model.generate` from ids [B, N] (no padding). sparse=False: the model's own
    attention; sparse=True: through `sparse_attention(model, provider)` (provider None = dense
    through our kernels). Returns (new tokens LongTensor [B, T], seconds, seconds to the first
    new token's logits: the prefill)."""
    from adaptive_sparse.models.attention import sparse_attention

    from transformers import LogitsProcessorList

    clock = _FirstTokenClock(ids.device)
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0,
                  logits_processor=LogitsProcessorList([clock]))
    with torch.no_grad():
        _sync(ids.device)
        t0 = time.perf_counter()
        if sparse:
            with sparse_attention(model, provider, block_size=block_size, backend=backend):
                out = model.generate(ids, **kwargs)
        else:
            out = model.generate(ids, **kwargs)
        _sync(ids.device)
        end = time.perf_counter()
    first = None if clock.first is None else clock.first - t0
    return out[:, ids.shape[1]:], end - t0, first


def token_agreement(dense: torch.Tensor, sparse: torch.Tensor) -> dict:
    """Greedy agreement of two [B, T] token tensors: the share of equal positions and the mean
    length of the common prefix (tokens before the first difference)."""
    if dense.shape != sparse.shape:
        raise fail("sparse", f"tokens of shape {tuple(dense.shape)}", tuple(sparse.shape))
    same = dense == sparse  # [B, T]
    prefix = torch.cumprod(same.long(), dim=1).sum(1).float()
    return {"agreement": float(same.float().mean()), "matching_prefix": float(prefix.mean())}


def compare_generation(model, ids: torch.Tensor, provider, *, max_new_tokens: int,
                       block_size: int = 64, backend: str = "auto", warmup: int = 2) -> dict:
    """Dense (the model's own attention) vs sparse (`provider` under sparse_attention) greedy
    generation of the same prompt(s) ids [B, N]: tokens per second, agreement, decode density.
    Each side first runs `warmup` tokens untimed (kernel compilation, caches). The prefill
    time (to the first token's logits) is measured too, and the decode-only rate: the tokens
    after the first over the time after the prefill."""
    if warmup:
        greedy_generate(model, ids, max_new_tokens=warmup)
        greedy_generate(model, ids, max_new_tokens=warmup, provider=provider, sparse=True,
                        block_size=block_size, backend=backend)
    if hasattr(provider, "selected_blocks"):
        provider.selected_blocks = provider.total_blocks = 0
    dense, t_dense, f_dense = greedy_generate(model, ids, max_new_tokens=max_new_tokens)
    sparse, t_sparse, f_sparse = greedy_generate(model, ids, max_new_tokens=max_new_tokens,
                                                 provider=provider, sparse=True,
                                                 block_size=block_size, backend=backend)
    n = ids.shape[0] * max_new_tokens
    density = provider.decode_density() if hasattr(provider, "decode_density") else None
    res = {"prompt_tokens": ids.shape[1], "batch": ids.shape[0], "new_tokens": max_new_tokens,
           "dense_tokens_per_s": n / t_dense, "sparse_tokens_per_s": n / t_sparse,
           "dense_seconds": t_dense, "sparse_seconds": t_sparse, "decode_density": density,
           **token_agreement(dense, sparse), "dense_ids": dense.tolist(),
           "sparse_ids": sparse.tolist()}
    for side, total, first in (("dense", t_dense, f_dense), ("sparse", t_sparse, f_sparse)):
        res[f"{side}_prefill_seconds"] = first
        res[f"{side}_decode_tokens_per_s"] = None if first is None or max_new_tokens < 2 \
            else ids.shape[0] * (max_new_tokens - 1) / (total - first)
    return res


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def _param(text: str) -> tuple[str, float]:
    name, eq, value = text.partition("=")
    try:
        return name, (int(value) if value.strip().isdigit() else float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER, got {text!r}") from None


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="preset, .gguf file or HF folder")
    p.add_argument("--prompt", default=None, help="prompt text (default: a built-in paragraph)")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this text file")
    p.add_argument("--max-new-tokens", type=_positive, default=16,
                   help="greedy tokens generated per run (default %(default)s)")
    p.add_argument("--batch", type=_positive, default=1,
                   help="copies of the prompt generated together (default %(default)s)")
    p.add_argument("--decode", choices=("dense", "gate", "bounds", "oracle"), default="gate",
                   help="decode-step selection: dense, the decode gates, the keys' per-block "
                        "min / max bound (training-free, no gates), or the oracle "
                        "(default %(default)s)")
    p.add_argument("--bounds-combine", choices=("max", "mean_prob"), default="max",
                   help="--decode bounds: a KV head's query group combined by the max of its "
                        "bounds or the mean of their softmax over the blocks "
                        "(default %(default)s)")
    p.add_argument("--prefill", choices=("dense", "oracle", "gate"), default="dense",
                   help="prefill attention: dense, the oracle, or trained prefill gates "
                        "(--prefill-gates), under the same policy (default %(default)s)")
    p.add_argument("--prefill-gates", default=None,
                   help="gate directory for --prefill gate (written by `adaptive-sparse train`)")
    p.add_argument("--decode-gates", default=None,
                   help="decode gates: an artifact folder (`adaptive-sparse export decode-gate`, "
                        "verified, base model checked) or a save_decode_gates file; default: "
                        "untrained gates (identity init: the mean attention logit of each block)")
    p.add_argument("--train-steps", type=int, default=0,
                   help="first distill the decode gates this many steps on the training split "
                        "of --corpus (default 0: use --decode-gates or untrained gates)")
    p.add_argument("--corpus", default="default",
                   help="training text for --train-steps: a built-in corpus or a path "
                        "(default %(default)s)")
    p.add_argument("--train-seqs", type=_positive, default=8,
                   help="training sequences (default %(default)s)")
    p.add_argument("--train-seq-len", type=_positive, default=512,
                   help="tokens per training sequence (default %(default)s)")
    p.add_argument("--save-decode-gates", default=None,
                   help="write the (trained) decode gates to this safetensors file")
    p.add_argument("--policy", choices=("top_k", "threshold", "top_p", "density"),
                   default="top_k", help="budget kind (default %(default)s)")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                   help="policy fields, e.g. k=4, tau=0.01, p=0.9, density=0.25, "
                        "local_blocks=1 (default k=4)")
    p.add_argument("--tokens", type=_positive, default=None,
                   help="token budget per decode step (a top_k policy of tokens/block-size "
                        "blocks; overrides --policy)")
    p.add_argument("--block-size", type=int, choices=(16, 32, 64, 128), default=64,
                   help="cache block size (default %(default)s; the GPU kernel takes 64/128)")
    p.add_argument("--backend", choices=("auto", "reference", "gather", "triton"),
                   default="auto", help="attention backend (default: triton on CUDA)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def make_decode_provider(args, model, tokenizer=None):
    from adaptive_sparse.gates.decode import (
        DecodeGateConfig,
        DecodeGateSet,
        DecodeProvider,
        save_decode_gates,
        token_budget_policy,
    )
    from adaptive_sparse.gates.network import model_shapes
    from adaptive_sparse.models.providers import ProviderSpec, build_provider
    from adaptive_sparse.policies import Policy

    params = dict(args.param)
    if args.tokens is not None:
        policy = token_budget_policy(args.tokens, args.block_size, **params)
    else:
        if args.policy == "top_k":
            params.setdefault("k", 4)
        policy = Policy(kind=args.policy, **params)
    gates = None
    if args.decode == "gate":
        if args.decode_gates:
            from adaptive_sparse.export.decode import load_decode_gates_any

            gates = load_decode_gates_any(args.decode_gates, model)
            if gates.config.block_size != args.block_size:
                raise fail("--block-size", f"{gates.config.block_size} (that of the gates)",
                           args.block_size)
        else:
            gates = DecodeGateSet(DecodeGateConfig.from_model(model, block_size=args.block_size))
        gates.to(args.device)
        if args.train_steps:
            gates = _train(args, model, tokenizer, gates)
        if args.save_decode_gates:
            sha = save_decode_gates(gates, args.save_decode_gates)
            print(f"decode gates written to {args.save_decode_gates} (sha256 {sha[:12]})")
    if args.prefill == "gate" and args.prefill_gates is None:
        raise fail("--prefill-gates", "a gate directory with --prefill gate", None)
    prefill = build_provider(ProviderSpec(args.prefill, policy=policy, gates=args.prefill_gates,
                                          block_size=args.block_size), model)
    gate_set = getattr(prefill, "gate_set", None)
    if gate_set is not None and gate_set.config.block_size != args.block_size:
        raise fail("--block-size", f"{gate_set.config.block_size} (that of the prefill gates)",
                   args.block_size)
    provider = DecodeProvider(policy, gates=gates, prefill=prefill, decode=args.decode,
                              block_size=args.block_size, bounds_combine=args.bounds_combine,
                              num_layers=model_shapes(model)["num_layers"])
    return provider, policy


def _train(args, model, tokenizer, gates):
    """Distill `gates` on the training split of --corpus; prints the loss before and after."""
    from adaptive_sparse.data import load_corpus, pack, split_documents
    from adaptive_sparse.gates.decode import train_decode_gates

    docs = split_documents(load_corpus(args.corpus))["train"]
    if not docs:
        raise fail("--corpus", "documents in its training split", args.corpus)
    seqs = pack(tokenizer, docs, args.train_seq_len, args.train_seqs)
    t0 = time.perf_counter()
    gates, history = train_decode_gates(model, seqs, gates, steps=args.train_steps,
                                        block_size=args.block_size, lr=2e-3, queries=32)
    print(f"decode gates: {args.train_steps} steps on {seqs.shape[0]} x {seqs.shape[1]} "
          f"tokens of {args.corpus!r} in {time.perf_counter() - t0:.0f} s, training KL "
          f"{history[0]:.3f} -> {history[-1]:.3f}")
    return gates


def cmd_generate(args) -> int:
    from adaptive_sparse.models import load_model

    if args.prompt is not None and args.prompt_file is not None:
        raise fail("--prompt", "either --prompt or --prompt-file", "both")
    prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    if args.device not in ("cpu", "cuda") or (args.device == "cuda"
                                              and not torch.cuda.is_available()):
        raise fail("--device", "cpu, or cuda on a machine with CUDA", args.device)
    if args.train_steps < 0 or (args.train_steps and args.decode != "gate"):
        raise fail("--train-steps", "a count >= 0, with --decode gate", args.train_steps)
    if args.decode_gates is not None and args.decode != "gate":
        raise fail("--decode-gates", "no decode gates unless --decode gate",
                   f"{args.decode_gates} with --decode {args.decode}")
    model, tokenizer = load_model(args.model)
    model.to(args.device)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(args.device)
    if ids.shape[1] < 2:
        raise fail("--prompt", "a prompt of at least 2 tokens", ids.shape[1])
    ids = ids.expand(args.batch, -1).contiguous()
    provider, policy = make_decode_provider(args, model, tokenizer)
    res = compare_generation(model, ids, provider, max_new_tokens=args.max_new_tokens,
                             block_size=args.block_size, backend=args.backend)
    res.update(model=args.model, decode=args.decode, prefill=args.prefill,
               bounds_combine=args.bounds_combine if args.decode == "bounds" else None,
               policy=policy.to_dict(), block_size=args.block_size, device=args.device,
               torch=torch.__version__)
    dens = res["decode_density"]
    print(f"prompt {res['prompt_tokens']} tokens, batch {res['batch']}, "
          f"{res['new_tokens']} new tokens, block {args.block_size}, decode={args.decode}, "
          f"prefill={args.prefill}, policy {policy.to_dict()['kind']}")
    for side in ("dense", "sparse"):
        line = f"{side:<6}: {res[f'{side}_tokens_per_s']:8.2f} tokens/s"
        if res[f"{side}_decode_tokens_per_s"] is not None:
            line += (f" ({res[f'{side}_decode_tokens_per_s']:.2f} tokens/s after the first; "
                     f"prefill {res[f'{side}_prefill_seconds']:.3f} s)")
        if side == "sparse" and dens is not None:
            line += f"  (decode reads {dens:.3f} of the cache blocks)"
        print(line)
    print(f"greedy agreement with dense: {res['agreement']:.3f} of positions, "
          f"first {res['matching_prefix']:.1f} tokens identical")
    print("sparse text: " + json.dumps(tokenizer.decode(res["sparse_ids"][0])))
    if args.json:
        from adaptive_sparse.io import atomic_write_json
        atomic_write_json(args.json, res)
    return 0

