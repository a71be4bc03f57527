"""`adaptive-sparse <command>`: eval, compare, show, demo; train / sweep / frontier / export are
handed to their packages (imported only when called).

    adaptive-sparse eval --model smollm2-135m --pattern sliding_window --window 512 \\
        --seq-len 4096 --docs 8 --json out.json
    adaptive-sparse eval --pattern oracle --policy top_p --p 0.95
    adaptive-sparse compare --settings settings.yaml --seq-len 2048 --docs 4 --json out.json
    adaptive-sparse show --layer 6 --head 0 --seq-len 2048 --pattern oracle --policy top_k \\
        --k 8 --out mask.png
    adaptive-sparse demo --out runs/demo

A pattern's parameters (`PATTERN_PARAMS`) are given as `--name value`; the oracle takes a policy
(`--policy KIND` plus the `Policy` fields `--tau --k --p --density --keep-sink ...`) and
`--target sum|max`. `compare` reads a YAML or JSON list of settings, each a mapping like
`{name: sw512, pattern: sliding_window, window: 512}` or
`{name: oracle-p95, pattern: oracle, policy: {kind: top_p, p: 0.95}}`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

PASSTHROUGH = {
    "train": ("gating.cli", "train_main"),
    "sweep": ("sweeps.cli", "sweep_main"),
    "frontier": ("sweeps.cli", "frontier_main"),
    "export": ("adaptive_sparse.export", "export_main"),
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_bool(name: str, text: str) -> bool:
    low = str(text).lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{name}: expected true or false, got {text!r}")


def _convert(name: str, typ, text):
    if not isinstance(text, str):
        return text
    if typ is bool:
        return _parse_bool(name, text)
    if typ in (int, float, str):
        try:
            return typ(text)
        except ValueError:
            raise ValueError(f"{name}: expected {typ.__name__}, got {text!r}") from None
    return text


def _policy_fields() -> dict:
    import dataclasses
    import typing

    from adaptive_sparse.policies import Policy

    hints = typing.get_type_hints(Policy)
    out = {}
    for f in dataclasses.fields(Policy):
        if f.name in ("kind", "head_budgets"):
            continue
        hint = hints.get(f.name)
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        out[f.name] = args[0] if args[0] in (int, float, bool, str) else str
    return out


def _param_names() -> dict[str, type]:
    """Every pattern parameter and policy field that can be given on the command line."""
    from adaptive_sparse.patterns import PATTERN_PARAMS

    names: dict[str, type] = {}
    for params in PATTERN_PARAMS.values():
        for key, typ in params.items():
            if key not in ("policy", "layer_idx", "num_layers"):
                names.setdefault(key, typ if typ in (int, float, bool, str) else str)
    for key, typ in _policy_fields().items():
        names.setdefault(key, typ)
    return names


def _add_common(p: argparse.ArgumentParser, *, seq_len: int = 4096, docs: int = 8) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="smollm2-135m",
                   help="preset (smollm2-135m, gemma3-270m), .gguf file or HF folder")
    g.add_argument("--corpus", default="default",
                   help="default | stdlib | essays | a text file, folder of text files or JSONL")
    g.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    g.add_argument("--split-seed", type=int, default=0)
    g.add_argument("--seq-len", type=int, default=seq_len)
    g.add_argument("--docs", type=int, default=docs, help="number of packed sequences")
    g.add_argument("--block-size", type=int, default=64)
    g.add_argument("--backend", default="auto",
                   help="block_sparse_attention backend (auto, reference, gather, triton, flex)")
    g.add_argument("--no-recall", action="store_true", help="skip attention recall (faster)")
    g.add_argument("--no-progress", action="store_true")


def _add_pattern(p: argparse.ArgumentParser, names: dict[str, type], *,
                 default: str | None = "dense") -> None:
    g = p.add_argument_group("pattern (any of PATTERN_PARAMS as --name value)")
    g.add_argument("--pattern", default=default, help="a pattern name, or oracle")
    g.add_argument("--gates", default=None,
                   help="a trained gate directory (or training run): evaluate the learned gate "
                        "with --policy (implies --pattern gate)")
    g.add_argument("--policy", default=None,
                   help="oracle / gate policy kind: threshold | top_k | top_p | density")
    for key in sorted(names):
        flags = [f"--{key}"] + ([f"--{key.replace('_', '-')}"] if "_" in key else [])
        g.add_argument(*flags, dest=f"param__{key}", default=None, metavar="VALUE")


def build_parser() -> argparse.ArgumentParser:
    names = _param_names()
    parser = argparse.ArgumentParser(prog="adaptive-sparse",
                                     description="Learned, adaptive block-sparse attention")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="perplexity dense vs sparse, density, recall (+ needle)")
    _add_common(p)
    _add_pattern(p, names)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--dense-cache", default=None, help="JSON file caching dense NLLs")
    p.add_argument("--needle", action="store_true", help="also measure needle retrieval")
    p.add_argument("--needle-length", type=int, default=None,
                   help="needle prompt tokens (default: min(seq-len, 2048))")
    p.add_argument("--needle-depths", default="0.1,0.5,0.9")
    p.add_argument("--needle-samples", type=int, default=1, help="samples per depth")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="several settings on the same sequences (dense once)")
    _add_common(p)
    p.add_argument("--settings", required=True, help="YAML/JSON list of settings (or inline JSON)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG of perplexity change against density")
    p.add_argument("--dense-cache", default=None, help="JSON file caching dense NLLs")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("show", help="PNG: true block attention beside a method's mask")
    _add_common(p, seq_len=2048, docs=1)
    _add_pattern(p, names)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--head", type=int, default=0)
    p.add_argument("--doc", type=int, default=0, help="which packed sequence")
    p.add_argument("--out", default="mask.png")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("demo", help="train gates -> evaluate vs oracle and patterns -> sweep -> "
                       "export, on SmolLM2-135M at a short context (--patterns-only: the zoo)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default 1024; 2048 with --patterns-only)")
    p.add_argument("--docs", type=int, default=2, help="held-out sequences evaluated")
    p.add_argument("--train-docs", type=int, default=6)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--trials", type=int, default=9)
    p.add_argument("--density", type=float, default=0.35)
    p.add_argument("--patterns-only", action="store_true",
                   help="only dense vs patterns vs oracle (no gate training, sweep or export)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    for name, (module, fn) in PASSTHROUGH.items():
        sub.add_parser(name, add_help=False, help=f"handed to {module}.{fn}")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        return _passthrough(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"adaptive-sparse {args.command}: error: {e}", file=sys.stderr)
        return 2


def _passthrough(command: str, argv: list[str]) -> int:
    module, fn = PASSTHROUGH[command]
    try:
        target = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        print(f"adaptive-sparse {command}: not available ({module}.{fn} could not be loaded: "
              f"{e}); install the full package with `pip install -e .`", file=sys.stderr)
        return 2
    return int(target(argv) or 0)


def setting_from_args(args) -> dict:
    """{"name", "pattern", params...} from parsed pattern options (strings converted)."""
    params = {k[len("param__"):]: v for k, v in vars(args).items()
              if k.startswith("param__") and v is not None}
    if getattr(args, "gates", None):
        if args.pattern not in ("dense", "gate"):
            raise ValueError(f"gates: --gates evaluates the learned gate; drop --pattern "
                             f"{args.pattern!r}")
        return make_setting("gate", args.policy, {**params, "gates": args.gates})
    return make_setting(args.pattern, args.policy, params)


def make_setting(pattern: str, policy, params: dict) -> dict:
    """Validate and convert one setting: pattern name, optional policy (kind or dict) and
    parameters (strings from the command line, or typed values from YAML/JSON)."""
    from adaptive_sparse.patterns import PATTERN_PARAMS

    if pattern not in PATTERN_PARAMS and pattern != "gate":
        raise ValueError(f"pattern: expected one of {sorted(PATTERN_PARAMS)}, got {pattern!r}")
    params = dict(params)
    if pattern == "gate":
        gates = params.pop("gates", None)
        if not gates:
            raise ValueError("gates: the gate setting needs a trained gate directory (--gates DIR)")
        oracle = make_setting("oracle", policy, params)
        if set(oracle) - {"pattern", "policy"}:
            raise ValueError(f"gate: unexpected parameters "
                             f"{sorted(set(oracle) - {'pattern', 'policy'})}")
        return {"pattern": "gate", "gates": str(gates), "policy": oracle["policy"]}
    if pattern == "oracle":
        fields = _policy_fields()
        pol = dict(policy) if isinstance(policy, dict) else {}
        if isinstance(policy, str):
            pol["kind"] = policy
        extra = {"target": str, "scale": float, "shared_kv_group": bool}
        out = {}
        for key, val in params.items():
            if key in fields:
                pol[key] = _convert(key, fields[key], val)
            elif key in extra:
                out[key] = _convert(key, extra[key], val)
            else:
                raise ValueError(f"{key}: not a parameter of the oracle or its policy "
                                 f"(expected one of {sorted(set(fields) | set(extra))})")
        if "kind" not in pol:
            raise ValueError("policy: --pattern oracle needs --policy KIND "
                             "(threshold, top_k, top_p or density)")
        return {"pattern": "oracle", "policy": pol, **out}
    if policy is not None:
        raise ValueError(f"policy: only the oracle takes a policy, not pattern {pattern!r}")
    known = PATTERN_PARAMS[pattern]
    out = {"pattern": pattern}
    for key, val in params.items():
        if key not in known:
            raise ValueError(f"{key}: not a parameter of pattern {pattern!r} "
                             f"(expected one of {sorted(known)})")
        out[key] = _convert(key, known[key], val)
    return out


def setting_name(setting: dict) -> str:
    if "name" in setting:
        return str(setting["name"])
    parts = [setting["pattern"]]
    if setting["pattern"] == "oracle":
        pol = setting["policy"]
        parts += [pol["kind"]] + [f"{k}={v}" for k, v in pol.items() if k != "kind"]
    parts += [f"{k}={v}" for k, v in setting.items() if k not in ("pattern", "policy", "name")]
    return " ".join(str(p) for p in parts)


def make_provider(setting: dict, *, block_size: int, num_layers: int, model=None):
    """The provider of a setting (None for dense): `adaptive_sparse.models.build_provider`. A
    gate provider is attached to `model` (its pre-rotary capture hooks); call its `detach()`."""
    from adaptive_sparse.models import ProviderSpec, build_provider

    spec = ProviderSpec.from_setting(setting, block_size=block_size)
    return build_provider(spec, model, num_layers=num_layers)


def _load_sequences(args, tokenizer):
    from adaptive_sparse.data import load_corpus, pack, split_documents

    docs = split_documents(load_corpus(args.corpus), seed=args.split_seed)[args.split]
    if not docs:
        raise ValueError(f"split: corpus {args.corpus!r} has no {args.split} documents")
    return pack(tokenizer, docs, args.seq_len, args.docs)


def _check_run_args(args) -> None:
    for name in ("seq_len", "docs"):
        val = getattr(args, name)
        if val < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive int, got {val}")


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[dict]) -> str:
    """Results as an aligned text table."""
    head = ("setting", "ppl dense", "ppl", "change", "density", "recall", "needle", "seconds")
    body = []
    for r in rows:
        needle = r.get("needle_accuracy")
        body.append((r["name"], _fmt(r["perplexity_dense"], ".3f"), _fmt(r["perplexity"], ".3f"),
                     _fmt(100 * r["ppl_change"], "+.2f") + "%", _fmt(r["density"], ".3f"),
                     _fmt(r["recall"], ".3f"), _fmt(needle, ".2f"),
                     _fmt(r.get("seconds"), ".1f")))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def _run_settings(args, settings: list[dict], *, needle: bool = False) -> dict:
    from adaptive_sparse.models import load_model, model_fingerprint

    _check_run_args(args)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - t0
    seqs = _load_sequences(args, tokenizer)
    num_layers = model.config.get_text_config().num_hidden_layers
    cache = {}
    if getattr(args, "dense_cache", None):
        from adaptive_sparse.evaluate import _open_cache

        cache, _ = _open_cache(args.dense_cache)
    samples = None
    if needle:
        from adaptive_sparse.data import make_needle_samples

        depths = [float(x) for x in str(args.needle_depths).split(",") if x.strip()]
        samples = make_needle_samples(tokenizer, length=args.needle_length or min(args.seq_len,
                                                                                  2048),
                                      depths=depths, samples_per_depth=args.needle_samples)
    results = []
    dense_needle = None
    for setting in settings:
        provider = make_provider(setting, block_size=args.block_size, num_layers=num_layers,
                                 model=model)
        name = setting_name(setting)
        try:
            r = _run_one(args, model, tokenizer, seqs, provider, cache, samples, name,
                         dense_needle, setting)
        finally:
            if hasattr(provider, "detach"):
                provider.detach()
        dense_needle = r.pop("_dense_needle")
        results.append(r)
    if getattr(args, "dense_cache", None):
        from adaptive_sparse.evaluate import write_json

        write_json(args.dense_cache, cache)
    return {"model": args.model, "fingerprint": model_fingerprint(model), "corpus": args.corpus,
            "split": args.split, "seq_len": args.seq_len, "num_sequences": int(seqs.shape[0]),
            "block_size": args.block_size, "backend": args.backend,
            "seconds_load": load_s, "results": results}


def _run_one(args, model, tokenizer, seqs, provider, cache, samples, name, dense_needle,
             setting) -> dict:
    from adaptive_sparse.evaluate import evaluate, evaluate_needle

    r = evaluate(model, seqs, provider, dense_cache=cache, progress=not args.no_progress,
                 recall=not args.no_recall, block_size=args.block_size,
                 backend=args.backend, desc=name)
    r = {"name": name, "setting": setting, **r}
    if samples is not None:
        if dense_needle is None:
            dense_needle = evaluate_needle(model, tokenizer, samples, sparse=False,
                                           progress=not args.no_progress)
        sparse = evaluate_needle(model, tokenizer, samples, provider,
                                 block_size=args.block_size, backend=args.backend,
                                 progress=not args.no_progress)
        r.update(needle_accuracy=sparse["needle_accuracy"],
                 needle_accuracy_dense=dense_needle["needle_accuracy"],
                 needle_answers=sparse["answers"], needle_length=samples[0].length)
    r["_dense_needle"] = dense_needle
    return r


def cmd_eval(args) -> int:
    from adaptive_sparse.evaluate import write_json

    setting = setting_from_args(args)
    run = _run_settings(args, [setting], needle=args.needle)
    r = run["results"][0]
    print(format_table([r]))
    if args.json:
        out = {k: v for k, v in r.items()}
        out.update({k: v for k, v in run.items() if k != "results"})
        write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


def read_settings(spec: str) -> list[dict]:
    """Settings from a YAML/JSON file or an inline JSON list; each validated by make_setting."""
    text = spec.strip()
    if text.startswith("["):
        raw = json.loads(text)
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"settings: expected a YAML/JSON file or an inline JSON list, got "
                             f"{spec!r}")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(path.read_text())
        else:
            raw = json.loads(path.read_text())
    if isinstance(raw, dict) and "settings" in raw:
        raw = raw["settings"]
    if not isinstance(raw, list) or not raw or not all(isinstance(s, dict) for s in raw):
        raise ValueError("settings: expected a non-empty list of mappings")
    out = []
    for s in raw:
        s = dict(s)
        if "pattern" not in s:
            raise ValueError(f"settings: every entry needs a 'pattern' key, got {s}")
        name = s.pop("name", None)
        setting = make_setting(s.pop("pattern"), s.pop("policy", None), s)
        if name is not None:
            setting["name"] = str(name)
        out.append(setting)
    return out


def cmd_compare(args) -> int:
    from adaptive_sparse.evaluate import write_json
    from adaptive_sparse.plots import plot_tradeoff

    settings = read_settings(args.settings)
    run = _run_settings(args, settings)
    print(format_table(run["results"]))
    if args.json:
        write_json(args.json, run)
        print(f"wrote {args.json}")
    if args.plot:
        plot_tradeoff(run["results"], args.plot,
                      title=f"{args.model}, {args.seq_len} tokens x {run['num_sequences']}")
        print(f"wrote {args.plot}")
    return 0


def cmd_show(args) -> int:
    import torch

    from adaptive_sparse.models import CaptureProvider, load_model, sparse_attention
    from adaptive_sparse.plots import plot_block_attention

    _check_run_args(args)
    setting = setting_from_args(args)
    model, tokenizer = load_model(args.model)
    cfg = model.config.get_text_config()
    if not 0 <= args.layer < cfg.num_hidden_layers:
        raise ValueError(f"--layer: expected an int in [0, {cfg.num_hidden_layers}), "
                         f"got {args.layer}")
    if not 0 <= args.head < cfg.num_attention_heads:
        raise ValueError(f"--head: expected an int in [0, {cfg.num_attention_heads}), "
                         f"got {args.head}")
    args.docs = max(args.docs, args.doc + 1)
    seqs = _load_sequences(args, tokenizer)
    inner = make_provider(setting, block_size=args.block_size,
                          num_layers=cfg.num_hidden_layers)
    capture = CaptureProvider(inner, keep_maps=True, block_size=args.block_size)

    def provider(layer_idx, q, k):
        if layer_idx == args.layer:
            return capture(layer_idx, q, k)
        return inner(layer_idx, q, k) if inner is not None else None

    with torch.no_grad(), sparse_attention(model, provider, block_size=args.block_size,
                                           backend=args.backend):
        model(seqs[args.doc][None], use_cache=False)
    if args.layer not in capture.maps:
        raise ValueError(f"--layer: layer {args.layer} is a sliding-window layer of this model "
                         "(exact local attention, no mask to show)")
    bmax, bsum = capture.maps[args.layer]
    dense = capture.masks[args.layer]  # [B|1, H, Qb, Kb]
    H = dense.shape[1]
    mh = args.head * H // cfg.num_attention_heads
    name = setting_name(setting)
    path = plot_block_attention(bsum[0, args.head], dense[0, mh], args.out,
                                title=f"{args.model} layer {args.layer} head {args.head}, "
                                      f"{args.seq_len} tokens", mask_title=name)
    print(f"wrote {path}")
    return 0


DEMO_SETTINGS = [
    {"name": "sliding_window", "pattern": "sliding_window", "window": 192},
    {"name": "longformer", "pattern": "longformer", "window": 128, "global_blocks": 1},
    {"name": "bigbird", "pattern": "bigbird", "window": 64, "global_blocks": 1,
     "random_blocks": 1},
    {"name": "strided", "pattern": "strided", "local_blocks": 1, "stride": 16},
    {"name": "oracle density 0.25", "pattern": "oracle",
     "policy": {"kind": "density", "density": 0.25}},
    {"name": "oracle top_p 0.95", "pattern": "oracle", "policy": {"kind": "top_p", "p": 0.95}},
]


def cmd_demo(args) -> int:
    if not args.patterns_only:
        # the front door may reach every layer lazily (sweeps -> gating -> adaptive_sparse)
        from sweeps.demo import run_demo

        run_demo(args.out, model=args.model, seq_len=args.seq_len or 1024,
                 train_docs=args.train_docs, val_docs=2, steps=args.steps, eval_docs=args.docs,
                 density=args.density, trials=args.trials, progress=not args.no_progress)
        return 0
    args.seq_len = args.seq_len or 2048
    from adaptive_sparse.evaluate import write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = read_settings(json.dumps(DEMO_SETTINGS))
    t0 = time.perf_counter()
    common = argparse.Namespace(model=args.model, corpus="default", split="validation",
                                split_seed=0, seq_len=args.seq_len, docs=args.docs,
                                block_size=64, backend="auto", no_recall=False,
                                no_progress=args.no_progress, dense_cache=None)
    run = _run_settings(common, settings)
    table = format_table(run["results"])
    print(table)
    write_json(out / "results.json", run)
    (out / "results.md").write_text(
        f"# adaptive-sparse demo\n\n{args.model}, {run['num_sequences']} validation sequences of "
        f"{args.seq_len} tokens, block 64\n\n```\n{table}\n```\n")
    from adaptive_sparse.plots import plot_tradeoff

    plot_tradeoff(run["results"], out / "tradeoff.png", title=f"{args.model}, {args.seq_len} "
                  f"tokens")
    show = argparse.Namespace(**{**vars(common), "docs": 1, "doc": 0, "layer": 6, "head": 0,
                                 "out": str(out / "mask_oracle_layer6_head0.png"),
                                 "pattern": "oracle", "policy": "density",
                                 "param__density": "0.25"})
    cmd_show(show)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
