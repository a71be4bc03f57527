"""`adaptive-sparse <command>`: eval, compare, show, demo, and train / sweep / frontier / export
(whose packages load only when called).

    adaptive-sparse eval --pattern sliding_window --param window=512 --seq-len 4096 \\
        --num-seqs 8 --json out.json
    adaptive-sparse eval --pattern oracle --policy top_p --param p=0.95
    adaptive-sparse eval --corpus my.txt --gates runs/gates/smollm2-135m --policy threshold \\
        --param tau=0.01
    adaptive-sparse compare --settings settings.yaml --seq-len 2048 --num-seqs 4 --json out.json
    adaptive-sparse show --layer 6 --head 0 --seq-len 2048 --pattern oracle --policy top_k \\
        --param k=8 --out mask.png
    adaptive-sparse demo --out runs/demo

A pattern's parameters and the oracle's policy fields are given as `--param name=value`
(repeatable). `compare` reads a YAML or JSON list of settings, each a mapping like
`{name: sw512, pattern: sliding_window, window: 512}` or
`{name: oracle-p95, pattern: oracle, policy: {kind: top_p, p: 0.95}}` (README: "compare").

Every command has one error boundary (`main`): a refused input (ValueError, TypeError, an
unreadable or unwritable file, a malformed config) prints `adaptive-sparse CMD: error: ...`
naming the argument, file or key, and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
import zipfile
from pathlib import Path

PASSTHROUGH = {
    "train": ("gating.cli", "train_main",
              "train gates by distillation (LightningCLI: --config FILE, --trainer.*, --data.*, "
              "--model.*; `adaptive-sparse train --help`)"),
    "sweep": ("sweeps.cli", "sweep_main",
              "Optuna sweep of methods and policies (--config FILE; the config is trusted code: "
              "its evaluator factory is imported and run)"),
    "frontier": ("sweeps.cli", "frontier_main",
                 "Pareto fronts, plots and best policies of a finished sweep"),
    "export": ("adaptive_sparse.export", "export_main",
               "write, convert and verify gate / mask artifacts"),
}
# exceptions whose class name marks a refused input of a library we call
_FOREIGN_USER_ERRORS = ("MisconfigurationException", "YAMLError", "ArtifactError",
                        "UnpicklingError", "ParserError", "ScannerError")
# output flags of the passthrough commands, checked before they start: (flag, is a directory)
_PASSTHROUGH_OUTPUTS = {"--out": True, "--run-dir": True, "--json": False, "--plot": False,
                        "--trainer.default_root_dir": True}
# ckpt_path values Lightning resolves itself
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
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
    """Every pattern parameter and policy field that `--param` accepts."""
    from adaptive_sparse.patterns import PATTERN_PARAMS

    names: dict[str, type] = {}
    for params in PATTERN_PARAMS.values():
        for key, typ in params.items():
            if key not in ("policy", "layer_idx", "num_layers"):
                names.setdefault(key, typ if typ in (int, float, bool, str) else str)
    for key, typ in _policy_fields().items():
        names.setdefault(key, typ)
    return names


def _params_epilog() -> str:
    from adaptive_sparse.patterns import PATTERN_PARAMS

    lines = ["pattern parameters (--param NAME=VALUE):"]
    for name, params in sorted(PATTERN_PARAMS.items()):
        keys = [k for k in params if k not in ("policy", "layer_idx", "num_layers")]
        lines.append(f"  {name}: {', '.join(keys) if keys else '-'}")
    lines.append(f"  oracle / gate policy fields: {', '.join(_policy_fields())}")
    return "\n".join(lines)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if val < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {val}")
        return val
    parse.__name__ = f"int >= {low}"
    return parse


def _fraction(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < val <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return val


def _depths(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated depths in [0, 1] such as "
                                         f"0.1,0.5,0.9, got {text!r}") from None
    if not vals or not all(0.0 <= v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated depths in [0, 1] such as "
                                         f"0.1,0.5,0.9, got {text!r}")
    return vals


def _param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE such as window=512, got {text!r}")
    return key.strip().replace("-", "_"), value


class _Deprecated(argparse.Action):
    """An old spelling: warns once and stores where the new flag does (`--docs` -> `--num-seqs`,
    `--window 512` -> `--param window=512`)."""

    def __init__(self, option_strings, dest, *, new: str, param: str | None = None, **kw):
        self.new, self.param = new, param
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new}",
              file=sys.stderr)
        if self.param is None:
            setattr(namespace, self.dest, values)
        else:
            getattr(namespace, self.dest).append((self.param, values))


def _add_common(p: argparse.ArgumentParser, *, seq_len: int = 4096, num_seqs: int = 8) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="smollm2-135m",
                   help="preset (smollm2-135m, gemma3-270m), .gguf file or HF folder "
                        "(default %(default)s)")
    g.add_argument("--corpus", default="default",
                   help="default | stdlib | essays | your UTF-8 text file, folder of text files "
                        "or JSONL with a 'text' key (default %(default)s)")
    g.add_argument("--split", default=None, choices=("train", "validation", "test", "all"),
                   help="which documents: default validation for the built-in corpora, all for "
                        "your own text; a split that holds no whole document uses that part of "
                        "each document, cut by position")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seed of the split by document (default %(default)s)")
    g.add_argument("--seq-len", type=_int_at_least(2), default=seq_len,
                   help="tokens per sequence, at most the model's max_position_embeddings "
                        "(default %(default)s)")
    g.add_argument("--num-seqs", type=_int_at_least(1), default=num_seqs,
                   help="number of packed sequences (default %(default)s)")
    g.add_argument("--docs", dest="num_seqs", type=_int_at_least(1), action=_Deprecated,
                   new="--num-seqs")
    g.add_argument("--block-size", type=_int_at_least(1), default=64,
                   help="tokens per mask block (default %(default)s)")
    g.add_argument("--backend", default="auto",
                   choices=("auto", "reference", "gather", "triton", "flex"),
                   help="attention kernel: auto (gather on CPU, triton on CUDA), reference, "
                        "gather, triton or flex (default %(default)s)")
    g.add_argument("--no-recall", action="store_true",
                   help="skip attention recall (faster)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_pattern(p: argparse.ArgumentParser, names: dict[str, type], *,
                 default: str | None = "dense") -> None:
    g = p.add_argument_group("method")
    g.add_argument("--pattern", default=default,
                   help="a pattern (dense, sliding_window, longformer, bigbird, strided, lsh, "
                        "hierarchical, vertical_slash, antidiagonal) or oracle "
                        "(default %(default)s)")
    g.add_argument("--gates", default=None,
                   help="trained gates (a gates folder, a training version_N folder or a run "
                        "folder such as runs/gates/smollm2-135m): evaluate the learned gate with "
                        "--policy")
    g.add_argument("--policy", default=None,
                   help="policy of the oracle or the gate: threshold | top_k | top_p | density, "
                        "its value as --param tau= / k= / p= / density=")
    g.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                   help="a parameter of the pattern or a policy field, repeatable "
                        "(--param window=512 --param sink_blocks=1); names below")
    for key in sorted(names):
        flags = [f"--{key}"] + ([f"--{key.replace('_', '-')}"] if "_" in key else [])
        g.add_argument(*flags, dest="param", action=_Deprecated,
                       new=f"--param {key}=VALUE", param=key)


def build_parser() -> argparse.ArgumentParser:
    names = _param_names()
    epilog = _params_epilog()
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="adaptive-sparse",
                                     description="Learned, adaptive block-sparse attention")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("eval", help="perplexity dense vs sparse, density, recall (+ needle)",
                       description="Perplexity of one method against dense attention on the "
                                   "same sequences, with density and attention recall.",
                       epilog=epilog, formatter_class=fmt)
    _add_common(p)
    _add_pattern(p, names)
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--dense-cache", default=None,
                   help="JSON file caching dense NLLs across runs (created if missing)")
    p.add_argument("--needle", action="store_true", help="also measure needle retrieval")
    p.add_argument("--needle-length", type=_int_at_least(64), default=None,
                   help="needle prompt tokens (default: min(seq-len, 2048))")
    p.add_argument("--needle-depths", type=_depths, default=[0.1, 0.5, 0.9],
                   help="needle depths in [0, 1], comma-separated (default 0.1,0.5,0.9)")
    p.add_argument("--needle-samples", type=_int_at_least(1), default=1,
                   help="samples per depth (default %(default)s)")
    p.set_defaults(func=cmd_eval, subparser=p)

    p = sub.add_parser("compare", help="several settings on the same sequences (dense once)",
                       description="Several settings on the same sequences; dense runs once. "
                                   "--settings: a YAML/JSON file or inline JSON list of mappings "
                                   "{name, pattern, policy, <pattern parameters>} (README).",
                       epilog=epilog, formatter_class=fmt)
    _add_common(p)
    p.add_argument("--settings", required=True,
                   help="YAML/JSON file with a list of settings (or a mapping with key "
                        "'settings'), or an inline JSON list")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--plot", default=None, help="PNG of perplexity change against density")
    p.add_argument("--dense-cache", default=None,
                   help="JSON file caching dense NLLs across runs (created if missing)")
    p.set_defaults(func=cmd_compare, subparser=p)

    p = sub.add_parser("show", help="PNG: true block attention beside a method's mask",
                       epilog=epilog, formatter_class=fmt)
    _add_common(p, seq_len=2048, num_seqs=1)
    _add_pattern(p, names)
    p.add_argument("--layer", type=_int_at_least(0), default=0, help="layer index (default 0)")
    p.add_argument("--head", type=_int_at_least(0), default=0,
                   help="query head index (default 0)")
    p.add_argument("--doc", type=_int_at_least(0), default=0,
                   help="which packed sequence, from 0 (default 0)")
    p.add_argument("--out", default="mask.png", help="PNG to write (default %(default)s)")
    p.set_defaults(func=cmd_show, subparser=p)

    p = sub.add_parser("demo", help="train gates, compare with the oracle and every pattern at "
                       "equal density, sweep, export (SmolLM2-135M; about 8 min on 2 cores)")
    p.add_argument("--out", default="runs/demo", help="output folder (default %(default)s)")
    p.add_argument("--model", default="smollm2-135m", help="preset, .gguf file or HF folder")
    p.add_argument("--seq-len", type=_int_at_least(64), default=None,
                   help="tokens per sequence (default 2048)")
    p.add_argument("--block-size", type=_int_at_least(1), default=None,
                   help="tokens per mask block (default 32: 64 key blocks per row at 2048 "
                        "tokens; 64 with --patterns-only)")
    p.add_argument("--num-seqs", type=_int_at_least(1), default=2,
                   help="held-out sequences evaluated (default %(default)s)")
    p.add_argument("--docs", dest="num_seqs", type=_int_at_least(1), action=_Deprecated,
                   new="--num-seqs")
    p.add_argument("--train-seqs", type=_int_at_least(1), default=None,
                   help="training sequences for the gates (default 8)")
    p.add_argument("--steps", type=_int_at_least(1), default=None,
                   help="gate training steps (default 200)")
    p.add_argument("--trials", type=_int_at_least(1), default=9,
                   help="Optuna trials of the short sweep (default %(default)s)")
    p.add_argument("--density", type=_fraction, default=0.25,
                   help="the density every method is brought to (default %(default)s)")
    p.add_argument("--patterns-only", action="store_true",
                   help="only dense vs patterns vs oracle (no gate training, sweep or export)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo, subparser=p)

    from adaptive_sparse.models.generate import add_generate_arguments, cmd_generate

    p = sub.add_parser("generate", help="greedy generation, dense vs sparse decode: tokens/s "
                       "and agreement of the greedy tokens")
    add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)

    for name, (_, _, text) in PASSTHROUGH.items():
        sub.add_parser(name, add_help=False, help=text)
    return parser


def _user_error(e: BaseException) -> bool:
    if isinstance(e, (ValueError, TypeError, OSError, RecursionError, zipfile.BadZipFile)):
        return True
    return any(c.__name__ in _FOREIGN_USER_ERRORS for c in type(e).__mro__)


def _message(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "an input is nested too deeply to read (RecursionError)"
    text = str(e).strip() or type(e).__name__
    return text if isinstance(e, (ValueError, TypeError, OSError)) else \
        f"{text} ({type(e).__name__})"


def main(argv=None) -> int:
    """The entry point of `adaptive-sparse`; returns the exit status (0 ok, 2 refused input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    try:
        if command in PASSTHROUGH:
            return _passthrough(command, argv[1:])
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:  # named by the subcommand's parser: "adaptive-sparse eval: error: ..."
            args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"adaptive-sparse {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the one boundary: refused inputs become exit 2, bugs propagate
        if not _user_error(e):
            raise
        print(f"adaptive-sparse {command}: error: {_message(e)}", file=sys.stderr)
        return 2


def _flag_values(argv: list[str], flag: str) -> list[str]:
    """Values of `flag` in argv, as `--flag VALUE` or `--flag=VALUE`."""
    out = []
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith(flag + "="):
            out.append(a[len(flag) + 1:])
    return out


def check_config_file(flag: str, path) -> dict:
    """The mapping in YAML/JSON config file `path`; a missing, binary, non-UTF-8 or malformed
    file, or one that is not a mapping, is a ValueError naming `flag`, the file and the line."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{flag}: expected a YAML config file, got {str(path)!r} "
                         f"({'a folder' if p.is_dir() else 'no such file'})")
    raw = read_yaml(flag, p)
    if not isinstance(raw, dict):
        raise ValueError(f"{flag}: {p}: expected a mapping of keys at the top level, got "
                         f"{type(raw).__name__}")
    return raw


def read_yaml(flag: str, path: Path):
    """The YAML value of text file `path`; errors name `flag`, the file and the line."""
    import yaml

    from adaptive_sparse.data import read_text

    try:
        return yaml.safe_load(read_text(path, name=flag))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{flag}: {path}{where}: not valid YAML ({problem})") from None
    except RecursionError:
        raise ValueError(f"{flag}: {path} is nested too deeply to be a config") from None


def check_checkpoint(flag: str, value: str) -> None:
    """A local checkpoint file to resume from (Lightning would download and unpickle a URL)."""
    if value in _CKPT_KEYWORDS:
        return
    if "://" in value:
        raise ValueError(f"{flag}: expected a local checkpoint file, got the URL {value!r} "
                         "(remote checkpoints are refused: loading one runs its code); "
                         "download it and check it first")
    p = Path(value)
    if not p.is_file():
        raise ValueError(f"{flag}: expected a checkpoint file such as "
                         f"runs/gates/<name>/version_N/checkpoints/last.ckpt, got {value!r} "
                         f"({'a folder' if p.is_dir() else 'no such file'})")
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{flag}: {value} is not a checkpoint written by training (expected "
                         "a torch zip archive)")


def check_output(flag: str, path, *, directory: bool = False) -> Path:
    """Refuse, before any work, an output path that cannot be written: one under a file, in a
    folder without write permission, a folder where a file is expected or the reverse."""
    p = Path(path)
    if str(path) == "":
        raise ValueError(f"{flag}: expected a path, got ''")
    if p.exists():
        if directory and not p.is_dir():
            raise ValueError(f"{flag}: {p} is a file, expected a folder (or a new path)")
        if not directory and p.is_dir():
            raise ValueError(f"{flag}: {p} is a folder, expected a file path")
        if not os.access(p, os.W_OK):
            raise ValueError(f"{flag}: {p} is not writable")
        return p
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag}: {p} lies under {parent}, which is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot create {p}: folder {parent} is not writable")
    return p


def _check_passthrough(command: str, argv: list[str]) -> None:
    for value in _flag_values(argv, "--config"):
        check_config_file("--config", value)
    if command == "train":
        for value in _flag_values(argv, "--ckpt_path"):
            check_checkpoint("--ckpt_path", value)
    for flag, directory in _PASSTHROUGH_OUTPUTS.items():
        for value in _flag_values(argv, flag):
            check_output(flag, value, directory=directory)


@contextlib.contextmanager
def _program_name(name: str):
    """`--help` of a passthrough command names `adaptive-sparse CMD` (argparse and jsonargparse
    take the program name from sys.argv[0])."""
    old = sys.argv[0] if sys.argv else ""
    if sys.argv:
        sys.argv[0] = name
    else:
        sys.argv.append(name)
    try:
        yield
    finally:
        sys.argv[0] = old


def _passthrough(command: str, argv: list[str]) -> int:
    module, fn, _ = PASSTHROUGH[command]
    if not any(a in ("-h", "--help") for a in argv):
        _check_passthrough(command, argv)
    try:
        target = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        print(f"adaptive-sparse {command}: not available ({e}); install the full package with "
              "`pip install -e .`", file=sys.stderr)
        return 2
    with _program_name(f"adaptive-sparse {command}"):
        rc = target(argv)
    # train returns its LightningCLI object: finishing is success
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0


def setting_from_args(args) -> dict:
    """{"name", "pattern", params...} from parsed pattern options (strings converted)."""
    params = dict(getattr(args, "param", None) or [])
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


def check_settings(settings: list[dict], *, block_size: int, seq_len: int,
                   flag: str | None = None) -> None:
    """Refuse a bad parameter value before the model loads: each pattern and oracle setting is
    run once on random q, k of one head at `seq_len`; a gate setting's folder is resolved and
    its policy checked. `flag`: where the settings came from (named in the message)."""
    import torch

    from adaptive_sparse.policies import Policy

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, seq_len, 8, generator=g)  # [B, H, N, D]
    for i, setting in enumerate(settings):
        where = f"{flag}: entry {i} ({setting_name(setting)}): " if flag else ""
        try:
            if setting["pattern"] == "gate":
                from adaptive_sparse.gates import resolve_gates_dir

                resolve_gates_dir(setting["gates"])
                Policy.from_dict(dict(setting["policy"]))
                continue
            provider = make_provider(setting, block_size=block_size, num_layers=1)
            if provider is not None:
                provider(0, q, q)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{where}{e}") from None


def _select_documents(args):
    """(documents, a line saying which): read before the model loads, so a bad corpus fails
    fast."""
    from adaptive_sparse.data import select_documents

    return select_documents(args.corpus, args.split, seed=args.split_seed)


def _pack(args, tokenizer, selected):
    from adaptive_sparse.data import pack

    from adaptive_sparse.data import BUILTIN

    docs, note = selected
    # a user's own text: a long document gives consecutive sequences, not only its start
    seqs = pack(tokenizer, docs, args.seq_len, args.num_seqs,
                whole=str(args.corpus) not in BUILTIN)
    print(f"{note}; {seqs.shape[0]} sequence(s) of {args.seq_len} tokens"
          + (f" (asked for {args.num_seqs}: no more text)" if seqs.shape[0] < args.num_seqs
             else ""), file=sys.stderr)
    return seqs


def _check_positions(model, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse lengths beyond the positions the model was trained for."""
    from adaptive_sparse.models.config import text_config

    limit = getattr(text_config(model), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"{flag}: expected at most {limit} (the model's "
                         f"max_position_embeddings), got {seq_len}; positions beyond it are "
                         "not extended")


def read_dense_cache(path) -> dict:
    """The dense-NLL cache at `path` ({} when the file does not exist yet): a JSON object
    written by an earlier run; anything else is refused naming --dense-cache."""
    from adaptive_sparse.data import read_text

    p = Path(path)
    if not p.exists():
        return {}
    if not p.is_file():
        raise ValueError(f"--dense-cache: {p} is not a file")
    try:
        data = json.loads(read_text(p, name="--dense-cache"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--dense-cache: {p} is not JSON ({e.msg}, line {e.lineno}); delete it "
                         "or name another file") from None
    except RecursionError:
        raise ValueError(f"--dense-cache: {p} is nested too deeply to be a cache") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"--dense-cache: {p}: expected a JSON object of cached dense results "
                         f"(written by --dense-cache), got {type(data).__name__}; delete it or "
                         "name another file")
    return data


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
    from adaptive_sparse.data import BUILTIN
    from adaptive_sparse.models import load_model, model_fingerprint
    from adaptive_sparse.models.config import text_config

    cache = read_dense_cache(args.dense_cache) \
        if getattr(args, "dense_cache", None) is not None else {}
    check_settings(settings, block_size=args.block_size, seq_len=args.seq_len,
                   flag="--settings" if getattr(args, "settings", None) else None)
    selected = _select_documents(args)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - t0
    _check_positions(model, args.seq_len)
    seqs = _pack(args, tokenizer, selected)
    num_layers = text_config(model).num_hidden_layers
    samples = None
    if needle:
        from adaptive_sparse.data import make_needle_samples

        length = args.needle_length or min(args.seq_len, 2048)
        _check_positions(model, length, "--needle-length")
        samples = make_needle_samples(tokenizer, length=length, depths=args.needle_depths,
                                      samples_per_depth=args.needle_samples)
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
        from adaptive_sparse.io import atomic_write_json

        atomic_write_json(args.dense_cache, cache)
    return {"model": args.model, "fingerprint": model_fingerprint(model), "corpus": args.corpus,
            "split": args.split or ("validation" if args.corpus in BUILTIN else "all"),
            "seq_len": args.seq_len, "num_seqs": int(seqs.shape[0]),
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
    from adaptive_sparse.io import atomic_write_json

    for flag, path in (("--json", args.json), ("--dense-cache", args.dense_cache)):
        if path is not None:
            check_output(flag, path)
    setting = setting_from_args(args)
    run = _run_settings(args, [setting], needle=args.needle)
    r = run["results"][0]
    print(format_table([r]))
    if args.json:
        out = dict(r)
        out.update({k: v for k, v in run.items() if k != "results"})
        atomic_write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


def read_settings(spec: str) -> list[dict]:
    """Settings from a YAML/JSON file or an inline JSON list; each validated by make_setting.

    The file holds a list (or a mapping whose key `settings` holds the list) of mappings:
    `name` (optional label), `pattern` (a pattern name, `oracle` or `gate`), `policy` (the
    oracle's / gate's: a kind or a mapping `{kind, tau|k|p|density, keep_sink, ...}`), `gates`
    (gate folder, for pattern gate) and the pattern's parameters (`window: 512`, ...)."""
    text = spec.strip()
    if text.startswith("["):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--settings: the inline list is not JSON ({e.msg} at column "
                             f"{e.colno})") from None
        except RecursionError:
            raise ValueError("--settings: the inline list is nested too deeply") from None
        where = "the inline list"
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--settings: expected a YAML/JSON file or an inline JSON list, "
                             f"got {spec!r} ({'a folder' if path.is_dir() else 'no such file'})")
        if path.suffix == ".json":
            from adaptive_sparse.data import read_text

            try:
                raw = json.loads(read_text(path, name="--settings"))
            except json.JSONDecodeError as e:
                raise ValueError(f"--settings: {path} line {e.lineno}: not JSON ({e.msg})") \
                    from None
            except RecursionError:
                raise ValueError(f"--settings: {path} is nested too deeply") from None
        else:
            raw = read_yaml("--settings", path)
        where = str(path)
    if isinstance(raw, dict) and "settings" in raw:
        raw = raw["settings"]
    if not isinstance(raw, list) or not raw or not all(isinstance(s, dict) for s in raw):
        raise ValueError(f"--settings: {where}: expected a non-empty list of mappings such as "
                         "[{pattern: sliding_window, window: 512}]")
    out = []
    for i, s in enumerate(raw):
        s = dict(s)
        if "pattern" not in s:
            raise ValueError(f"--settings: {where} entry {i}: every entry needs a 'pattern' "
                             f"key, got keys {sorted(map(str, s))}")
        name = s.pop("name", None)
        try:
            setting = make_setting(s.pop("pattern"), s.pop("policy", None), s)
        except (ValueError, TypeError) as e:
            raise type(e)(f"--settings: {where} entry {i}: {e}") from None
        if name is not None:
            setting["name"] = str(name)
        out.append(setting)
    return out


def cmd_compare(args) -> int:
    from adaptive_sparse.io import atomic_write_json
    from adaptive_sparse.plots import plot_tradeoff

    for flag, path in (("--json", args.json), ("--plot", args.plot),
                       ("--dense-cache", args.dense_cache)):
        if path is not None:
            check_output(flag, path)
    settings = read_settings(args.settings)
    run = _run_settings(args, settings)
    print(format_table(run["results"]))
    if args.json:
        atomic_write_json(args.json, run)
        print(f"wrote {args.json}")
    if args.plot:
        plot_tradeoff(run["results"], args.plot,
                      title=f"{args.model}, {args.seq_len} tokens x {run['num_seqs']}")
        print(f"wrote {args.plot}")
    return 0


def cmd_show(args) -> int:
    import torch

    from adaptive_sparse.models import CaptureProvider, load_model, sparse_attention
    from adaptive_sparse.models.config import text_config
    from adaptive_sparse.plots import plot_block_attention

    check_output("--out", args.out)
    setting = setting_from_args(args)
    check_settings([setting], block_size=args.block_size, seq_len=args.seq_len)
    selected = _select_documents(args)
    model, tokenizer = load_model(args.model)
    _check_positions(model, args.seq_len)
    cfg = text_config(model)
    if not 0 <= args.layer < cfg.num_hidden_layers:
        raise ValueError(f"--layer: expected an int in [0, {cfg.num_hidden_layers}), "
                         f"got {args.layer}")
    if not 0 <= args.head < cfg.num_attention_heads:
        raise ValueError(f"--head: expected an int in [0, {cfg.num_attention_heads}), "
                         f"got {args.head}")
    args.num_seqs = max(args.num_seqs, args.doc + 1)
    seqs = _pack(args, tokenizer, selected)
    if args.doc >= seqs.shape[0]:
        raise ValueError(f"--doc: expected an int in [0, {seqs.shape[0]}) (the corpus gives "
                         f"{seqs.shape[0]} sequence(s) of {args.seq_len} tokens), got {args.doc}")
    inner = make_provider(setting, block_size=args.block_size,
                          num_layers=cfg.num_hidden_layers, model=model)
    capture = CaptureProvider(inner, keep_maps=True, block_size=args.block_size)

    def provider(layer_idx, q, k):
        if layer_idx == args.layer:
            return capture(layer_idx, q, k)
        return inner(layer_idx, q, k) if inner is not None else None

    try:
        with torch.no_grad(), sparse_attention(model, provider, block_size=args.block_size,
                                               backend=args.backend):
            model(seqs[args.doc][None], use_cache=False)
    finally:
        if hasattr(inner, "detach"):
            inner.detach()
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
    check_output("--out", args.out, directory=True)
    if not args.patterns_only:
        # the front door may reach every layer lazily (sweeps -> gating -> adaptive_sparse)
        from sweeps.demo import run_demo

        kw = {k: v for k, v in (("seq_len", args.seq_len), ("block_size", args.block_size),
                                ("train_seqs", args.train_seqs), ("steps", args.steps))
              if v is not None}
        run_demo(args.out, model=args.model, eval_seqs=args.num_seqs, density=args.density,
                 trials=args.trials, progress=not args.no_progress, **kw)
        return 0
    from adaptive_sparse.io import atomic_write_json, atomic_write_text

    seq_len = args.seq_len or 2048
    out = Path(args.out)
    settings = read_settings(json.dumps(DEMO_SETTINGS))
    t0 = time.perf_counter()
    common = argparse.Namespace(model=args.model, corpus="default", split="validation",
                                split_seed=0, seq_len=seq_len, num_seqs=args.num_seqs,
                                block_size=args.block_size or 64, backend="auto",
                                no_recall=False, no_progress=args.no_progress, dense_cache=None)
    run = _run_settings(common, settings)
    table = format_table(run["results"])
    print(table)
    atomic_write_json(out / "results.json", run)
    atomic_write_text(out / "results.md",
                      f"# adaptive-sparse demo\n\n{args.model}, {run['num_seqs']} validation "
                      f"sequences of {seq_len} tokens, block {common.block_size}\n\n```\n"
                      f"{table}\n```\n")
    from adaptive_sparse.plots import plot_tradeoff

    plot_tradeoff(run["results"], out / "tradeoff.png", title=f"{args.model}, {seq_len} tokens")
    show = argparse.Namespace(**{**vars(common), "num_seqs": 1, "doc": 0, "layer": 6, "head": 0,
                                 "out": str(out / "mask_oracle_layer6_head0.png"),
                                 "pattern": "oracle", "policy": "density", "gates": None,
                                 "param": [("density", "0.25")]})
    cmd_show(show)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
