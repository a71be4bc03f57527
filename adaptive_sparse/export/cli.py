"""`adaptive-sparse export <kind>`: write, convert and verify artifacts.

    adaptive-sparse export gate   --gates RUN_DIR --policy-file P.json --out DIR
    adaptive-sparse export masks  --text FILE | --corpus SPEC --seq-len N
                                  (--pattern NAME [--param k=v ...] | --policy-file P.json
                                  [--gates DIR]) --out DIR
    adaptive-sparse export static --corpus SPEC --buckets 1024,2048 --calib-seqs 8
                                  --heldout-seqs 4 --min-fraction 0.5 [--max-blocks-per-row K]
                                  (--pattern ... | --policy-file ... [--gates DIR]) --out DIR
    adaptive-sparse export convert DIR --to flex|bsr|dense --out OUT
    adaptive-sparse export decode-gate --out DIR (see export/decode.py)
    adaptive-sparse export verify DIR
Exit status 0 on success, 2 on a refused input or artifact (the message names the field).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adaptive_sparse.export import summary
from adaptive_sparse.export.format import ArtifactError


def _param(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param: expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _buckets(text: str) -> list[int]:
    try:
        vals = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--buckets: expected ints like 1024,2048, got "
                                         f"{text!r}") from None
    if not vals or vals[0] < 2:
        raise argparse.ArgumentTypeError(f"--buckets: expected lengths >= 2, got {text!r}")
    return vals


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaptive-sparse export",
                                description="Portable mask, static-pattern and gate artifacts.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, source: bool = True):
        sp.add_argument("--model", default="smollm2-135m",
                        help="preset, .gguf file or HF folder of the base model")
        sp.add_argument("--out", required=True, type=Path)
        sp.add_argument("--overwrite", action="store_true")
        sp.add_argument("--block-size", type=int, default=64)
        if source:
            sp.add_argument("--pattern", help="a pattern of the zoo (adaptive_sparse.patterns)")
            sp.add_argument("--param", type=_param, action="append", default=[],
                            help="pattern parameter key=value (JSON values)")
            sp.add_argument("--policy-file", type=Path,
                            help="policy file (sweeps' policy_within_*.json or a Policy dict)")
            sp.add_argument("--gates", help="gate directory or training run directory")

    def text_args(sp):
        src = sp.add_mutually_exclusive_group(required=True)
        src.add_argument("--text", type=Path, help=argparse.SUPPRESS)  # deprecated: --corpus
        src.add_argument("--corpus", help="default | stdlib | essays | your UTF-8 text file, "
                                          "folder of text files or JSONL with a 'text' key")

    g = sub.add_parser("gate", help="gate weights + policy (from training and a sweep)")
    common(g, source=False)
    g.add_argument("--gates", required=True, help="gate directory or training run directory")
    g.add_argument("--policy-file", required=True, type=Path)
    g.add_argument("--stats-corpus", help="corpus to measure per-layer densities on")
    g.add_argument("--stats-seq-len", type=int, default=1024)
    g.add_argument("--stats-seqs", type=int, default=2)

    m = sub.add_parser("masks", help="concrete per-layer masks for given inputs")
    common(m)
    text_args(m)
    m.add_argument("--seq-len", type=int, required=True)
    m.add_argument("--num-seqs", type=int, default=1)

    s = sub.add_parser("static", help="static per-head masks aggregated over documents")
    common(s)
    text_args(s)
    s.add_argument("--buckets", type=_buckets, required=True, help="sequence lengths, 1024,2048")
    s.add_argument("--calib-seqs", type=int, default=8)
    s.add_argument("--heldout-seqs", type=int, default=4)
    s.add_argument("--min-fraction", type=float, default=0.5)
    s.add_argument("--max-blocks-per-row", type=int)
    s.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("convert", help="mask/static artifact -> flex | bsr | dense files")
    c.add_argument("artifact", type=Path)
    c.add_argument("--to", required=True, choices=("flex", "bsr", "dense"))
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--overwrite", action="store_true")

    from adaptive_sparse.export.decode import add_decode_parser
    add_decode_parser(sub)  # decode-gate
    v = sub.add_parser("verify", help="check an artifact and print its summary")
    v.add_argument("artifact", type=Path)
    return p


def _docs(args):
    from adaptive_sparse.data import load_corpus

    if args.text is not None:
        print("adaptive-sparse export: warning: --text is deprecated; use --corpus",
              file=sys.stderr)
    return load_corpus(str(args.text) if args.text is not None else args.corpus)


def _run(args) -> dict:
    if args.command == "convert":
        from adaptive_sparse.export.convert import convert_artifact
        out = convert_artifact(args.artifact, args.to, args.out, overwrite=args.overwrite)
        return {"out": str(out), "layout": args.to}
    if args.command == "verify":
        return summary(args.artifact)
    if args.command == "decode-gate":
        from adaptive_sparse.export.decode import run_decode_export
        return summary(run_decode_export(args))

    from adaptive_sparse.export import build
    from adaptive_sparse.models import load_model

    if args.command == "gate":
        from adaptive_sparse.export.gates import save_gate_artifact
        from adaptive_sparse.gates import GateProvider, load_gates
        from adaptive_sparse.gates.network import check_model_shapes
        from adaptive_sparse.policies import Policy

        spec = build.read_policy_file(args.policy_file)
        if spec["method"] != "gate":
            raise ValueError(f"policy_file: expected a gate policy (method 'gate'), got "
                             f"{spec['method']!r}; use `export masks/static` for patterns")
        policy = Policy.coerce(spec["params"].get("policy"))
        gate_set = load_gates(args.gates)  # checked before the model loads
        model, tok = load_model(args.model)
        check_model_shapes(gate_set.config, model)
        stats = None
        if args.stats_corpus:
            from adaptive_sparse.data import load_corpus, pack
            seqs = pack(tok, load_corpus(args.stats_corpus), args.stats_seq_len, args.stats_seqs)
            with GateProvider(gate_set, policy, model) as live:
                stats = build.gate_stats(model, seqs, live,
                                         block_size=gate_set.config.block_size)
        out = save_gate_artifact(args.out, gate_set, policy, model=model,
                                 params={"gates": str(args.gates),
                                         "policy_file": str(args.policy_file)},
                                 stats=stats, overwrite=args.overwrite)
        return summary(out)

    model, tok = load_model(args.model)
    from adaptive_sparse.data import pack, split_documents

    provider, method, params = build.make_source(
        model, pattern=args.pattern, pattern_params=dict(args.param),
        policy_file=args.policy_file, gates=args.gates, block_size=args.block_size)
    try:
        docs = _docs(args)
        if args.command == "masks":
            seqs = pack(tok, docs, args.seq_len, args.num_seqs)
            out = build.export_masks(model, seqs, provider, args.out,
                                     block_size=args.block_size, method=method, params=params,
                                     inputs={"source": str(args.text or args.corpus)},
                                     overwrite=args.overwrite)
        else:
            split = split_documents(docs, seed=args.seed)
            held_docs = split["test"] + split["validation"]
            calib = {b: pack(tok, split["train"], b, args.calib_seqs) for b in args.buckets}
            held = {b: pack(tok, held_docs, b, args.heldout_seqs) for b in args.buckets} \
                if args.heldout_seqs > 0 and held_docs else {}
            out = build.export_static(model, calib, held, provider, args.out,
                                      block_size=args.block_size, method=method,
                                      params=params, min_fraction=args.min_fraction,
                                      max_blocks_per_row=args.max_blocks_per_row,
                                      overwrite=args.overwrite)
    finally:
        if callable(getattr(provider, "detach", None)):
            provider.detach()
    return summary(out)


def export_main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = _run(args)
    except (ArtifactError, ValueError, TypeError, OSError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)  # refused input, missing model package, full disk
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
