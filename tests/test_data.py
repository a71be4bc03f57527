"""Corpora, deterministic splits, packing, and the needle task (no model forward)."""

from __future__ import annotations

import json

import pytest
import torch

from adaptive_sparse.data import (
    Document,
    extract_number,
    load_corpus,
    make_needle_samples,
    needle_accuracy,
    pack,
    score_answer,
    split_documents,
    split_essays,
)


class CharTokenizer:
    """One token per character (ids 3..), EOS = 2: lengths are exact and easy to reason about."""

    eos_token_id = 2
    chat_template = None

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [3 + (ord(c) % 200) for c in text]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids])}
        return {"input_ids": ids}


def test_stdlib_corpus_is_long_sorted_code():
    docs = load_corpus("stdlib")
    assert len(docs) >= 50
    assert all(len(d.text) >= 20_000 and d.id.startswith("stdlib/") for d in docs)
    assert [d.id for d in docs] == sorted(d.id for d in docs)
    assert not any("/test/" in d.id or "/encodings/" in d.id for d in docs)
    assert "def " in docs[0].text


def test_essays_corpus_splits_at_dates():
    docs = load_corpus("essays")
    assert len(docs) >= 150
    assert all(d.source == "essays" for d in docs)
    assert all(len(d.text) >= 2_000 for d in docs)
    # each essay starts with its own date line, and none swallows the next one's glued start
    assert sum(d.text[:30].split(" ")[0] in ("January", "February", "March", "April", "May",
                                             "June", "July", "August", "September", "October",
                                             "November", "December") for d in docs) == len(docs)


def test_split_essays_on_synthetic_text():
    text = "May 2001Start one. Ends here.June 2002(Two) text, in March 2003 we.\nJuly 2004\nThree."
    parts = split_essays(text)
    assert parts == ["May 2001Start one. Ends here.", "June 2002(Two) text, in March 2003 we.",
                     "July 2004\nThree."]


def test_default_corpus_mixes_prose_and_code():
    docs = load_corpus("default")
    sources = [d.source for d in docs[:10]]
    assert "essays" in sources and "stdlib" in sources
    assert len({d.id for d in docs}) == len(docs)


def test_split_deterministic_disjoint_and_stable():
    docs = [Document(f"doc{i}", f"text {i}", "t") for i in range(500)]
    a = split_documents(docs, seed=3)
    b = split_documents(list(reversed(docs)), seed=3)
    ids = {k: {d.id for d in v} for k, v in a.items()}
    assert ids == {k: {d.id for d in v} for k, v in b.items()}
    assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"]) \
        and not (ids["validation"] & ids["test"])
    assert sum(len(v) for v in ids.values()) == 500
    assert 30 <= len(ids["validation"]) <= 70 and 30 <= len(ids["test"]) <= 70
    # a document's split does not depend on the rest of the corpus
    sub = split_documents(docs[:50], seed=3)
    assert {d.id for d in sub["validation"]} == ids["validation"] & {f"doc{i}" for i in range(50)}
    # another seed gives another split
    assert {d.id for d in split_documents(docs, seed=4)["validation"]} != ids["validation"]


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.9, 0.2, 0.1), (1.2, -0.1, -0.1)])
def test_split_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        split_documents([Document("a", "x", "t")], fractions=fractions)


def test_split_duplicate_ids():
    with pytest.raises(ValueError, match="docs: document ids must be unique"):
        split_documents([Document("a", "x", "t"), Document("a", "y", "t")])


def test_user_corpora(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "b.txt").write_text("bravo")
    (tmp_path / "f" / "a.md").write_text("alpha")
    (tmp_path / "f" / "skip.bin").write_bytes(b"\x00")
    docs = load_corpus(str(tmp_path / "f"))
    assert [(d.id, d.text) for d in docs] == [("a.md", "alpha"), ("b.txt", "bravo")]
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "one", "id": "x1"}) + "\n\n" + json.dumps({"text": "two"}))
    docs = load_corpus(str(jl))
    assert [(d.id, d.text) for d in docs] == [("x1", "one"), ("c.jsonl:3", "two")]
    (tmp_path / "bad.jsonl").write_text('{"body": "no text"}\n')
    with pytest.raises(ValueError, match="corpus: .*line 1: expected an object with a string 'text'"):
        load_corpus(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="corpus: expected one of"):
        load_corpus(str(tmp_path / "missing"))


def test_pack_one_document_per_sequence_and_concatenation():
    tok = CharTokenizer()
    docs = [Document("long", "L" * 50, "t"), Document("s1", "a" * 7, "t"),
            Document("s2", "b" * 7, "t"), Document("s3", "c" * 30, "t"),
            Document("long2", "d" * 20, "t")]
    seqs = pack(tok, docs, 16)
    assert seqs.shape == (3, 16) and seqs.dtype == torch.long
    assert seqs[0].tolist() == [3 + ord("L")] * 16  # first 16 tokens of the long doc
    # short documents joined by EOS and cut at 16 tokens (the rest of s3 is dropped, so the
    # next sequence starts at a document start)
    assert seqs[1].tolist() == [3 + ord("a")] * 7 + [2] + [3 + ord("b")] * 7 + [2]
    assert seqs[2].tolist() == [3 + ord("d")] * 16
    assert pack(tok, docs, 16, max_sequences=2).shape == (2, 16)


def test_pack_errors():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="seq_len: expected an int >= 2"):
        pack(tok, [Document("a", "abc", "t")], 1)
    with pytest.raises(ValueError, match="seq_len: the documents hold .* not enough"):
        pack(tok, [Document("a", "abc", "t")], 16)
    with pytest.raises(ValueError, match="max_sequences"):
        pack(tok, [Document("a", "abc", "t")], 2, max_sequences=0)


def test_needle_samples_structure():
    tok = CharTokenizer()
    filler = ["Alpha beta gamma. Delta epsilon zeta! Eta theta iota? Kappa lambda mu. " * 40]
    samples = make_needle_samples(tok, length=1500, depths=(0.0, 0.5, 1.0), samples_per_depth=2,
                                  seed=7, filler=filler)
    assert len(samples) == 6
    for s in samples:
        assert s.input_ids.dim() == 1 and 1300 <= s.input_ids.shape[0] <= 1500
        assert len(s.answer) == 7 and s.answer.isdigit()
        needle = f"One of the special magic numbers for {s.key} is: {s.answer}."
        assert needle in s.prompt
        body = s.prompt.split("afterwards.\n", 1)[1].split("\nWhat is", 1)[0]
        where = body.index(needle) / max(1, len(body) - len(needle))
        assert abs(where - s.depth) < 0.1
        assert s.prompt.rstrip().endswith("mentioned in the provided text is")
    again = make_needle_samples(tok, length=1500, depths=(0.0, 0.5, 1.0), samples_per_depth=2,
                                seed=7, filler=filler)
    assert [s.prompt for s in again] == [s.prompt for s in samples]
    other = make_needle_samples(tok, length=1500, depths=(0.5,), seed=8, filler=filler)
    assert other[0].answer != samples[2].answer or other[0].key != samples[2].key


def test_needle_bad_args():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="length: expected an int >= 64"):
        make_needle_samples(tok, length=10, filler=["a. b."])
    with pytest.raises(ValueError, match="depths: expected numbers in"):
        make_needle_samples(tok, length=500, depths=(1.5,), filler=["a. b."])
    with pytest.raises(ValueError, match="length: 100 tokens is too short"):
        make_needle_samples(tok, length=100, filler=["a. b."])


def test_needle_scoring():
    assert extract_number("The number is 1,234,567.") == "1234567"
    assert extract_number("no digits") is None
    assert score_answer(" 8056020. It was hidden", "8056020")
    assert not score_answer(" 80560", "8056020")
    assert not score_answer("is 1234 and 8056020", "8056020")  # the first number counts
    assert needle_accuracy(["7654321", "x 1111111", "none"], ["7654321", "1111111", "2"]) \
        == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="answers: expected 2 answers"):
        needle_accuracy(["1"], ["1", "2"])


def test_needle_with_real_tokenizer_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    samples = make_needle_samples(tok, length=1024, depths=(0.5,))
    s = samples[0]
    assert 900 <= s.input_ids.shape[0] <= 1024
    assert s.prompt.startswith("<|im_start|>") and "<|im_start|>assistant" in s.prompt
    assert s.answer in tok.decode(s.input_ids)


def test_pack_whole_cuts_a_long_document_into_consecutive_sequences():
    tok = CharTokenizer()
    doc = Document("one", "".join(chr(65 + i % 26) for i in range(50)), "t")
    assert pack(tok, [doc], 16).shape == (1, 16)
    seqs = pack(tok, [doc], 16, whole=True)
    assert seqs.shape == (3, 16)
    flat = [3 + (ord(c) % 200) for c in doc.text]
    assert seqs.flatten().tolist() == flat[:48]
    assert pack(tok, [doc], 16, 2, whole=True).shape == (2, 16)
