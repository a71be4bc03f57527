"""Needle retrieval (RULER-style): a 7-digit value hidden in essay filler at a chosen depth.

The needle sentence "One of the special magic numbers for {key} is: {value}." is inserted
between filler sentences at `depth` (0 = start, 1 = end) of a context sized so the whole prompt
is about `length` tokens; the question asks for the number. Instruction-tuned models (a tokenizer
with a chat template) get the prompt as a user turn, base models as plain text; both are followed
by an answer prefix ("The special magic number for {key} ... is") that the model completes.
A greedy answer is correct when the first number in it equals the value.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

INTRO = ("Some special magic numbers are hidden within the following text. Make sure to "
         "memorize them. I will quiz you about the numbers afterwards.\n")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "\nWhat is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic number for {key} mentioned in the provided text is"
KEYS = ("amber-falcon", "quiet-harbor", "silver-meadow", "copper-lantern", "velvet-canyon",
        "hollow-summit", "crimson-orchard", "frozen-river", "golden-thistle", "misty-quarry",
        "rapid-heron", "lunar-garden", "stone-violin", "ember-valley", "azure-compass",
        "wild-juniper", "scarlet-tundra", "brisk-pelican", "ivory-beacon", "cobalt-prairie")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_NUMBER = re.compile(r"\d[\d,]*")


@dataclass(frozen=True)
class NeedleSample:
    """input_ids: LongTensor [L] (the full prompt, chat template applied when there is one);
    answer: the 7-digit value as a string; key, depth, length (requested), prompt (text)."""

    input_ids: torch.Tensor
    answer: str
    key: str
    depth: float
    length: int
    prompt: str


def _sentences(texts: list[str]) -> list[str]:
    out = []
    for t in texts:
        out.extend(s.strip() for s in _SENTENCE.split(" ".join(t.split())) if s.strip())
    return out


def _wrap(tokenizer, body: str, key: str, chat: bool) -> str:
    question = QUESTION.format(key=key)
    if chat:
        turn = tokenizer.apply_chat_template([{"role": "user", "content": body + question}],
                                             add_generation_prompt=True, tokenize=False)
        return turn + ANSWER_PREFIX.format(key=key).lstrip()
    return body + question + "\n" + ANSWER_PREFIX.format(key=key)


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_needle_samples(tokenizer, *, length: int, depths=(0.1, 0.5, 0.9),
                        samples_per_depth: int = 1, seed: int = 0, filler: list[str] | None = None,
                        chat: bool | None = None) -> list[NeedleSample]:
    """Needle prompts of about `length` tokens (never more), one per (depth, repeat).

    filler: texts to cut sentences from (default: the essays corpus, in a seeded order).
    chat: use the tokenizer's chat template (default: when it has one)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 64:
        raise ValueError(f"length: expected an int >= 64 (tokens), got {length!r}")
    depths = tuple(depths)
    if not depths or any(not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths: expected numbers in [0, 1], got {depths!r}")
    if isinstance(samples_per_depth, bool) or not isinstance(samples_per_depth, int) \
            or samples_per_depth < 1:
        raise ValueError(f"samples_per_depth: expected a positive int, got {samples_per_depth!r}")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if filler is None:
        from adaptive_sparse.data.corpora import load_corpus

        filler = [d.text for d in load_corpus("essays")]
    sentences = _sentences(filler)
    if not sentences:
        raise ValueError("filler: expected text with sentences")
    rng = random.Random(seed)
    samples = []
    for depth in depths:
        for _ in range(samples_per_depth):
            key = rng.choice(KEYS)
            value = str(rng.randint(1_000_000, 9_999_999))
            needle = NEEDLE.format(key=key, value=value)
            overhead = _n_tokens(tokenizer, _wrap(tokenizer, INTRO + needle, key, chat))
            budget = length - overhead - 8
            start = rng.randrange(len(sentences))
            chosen, used, i = [], 0, start
            while used < budget and len(chosen) < len(sentences):
                s = sentences[i % len(sentences)]
                n = _n_tokens(tokenizer, " " + s)
                if used + n > budget:
                    break
                chosen.append(s)
                used += n
                i += 1
            if budget <= 0:
                raise ValueError(f"length: {length} tokens is too short for the prompt "
                                 f"({overhead} tokens with an empty context)")
            while True:
                at = round(depth * len(chosen))
                body = INTRO + " ".join(chosen[:at] + [needle] + chosen[at:])
                prompt = _wrap(tokenizer, body, key, chat)
                ids = tokenizer(prompt, add_special_tokens=not chat,
                                return_tensors="pt")["input_ids"][0]
                if ids.shape[0] <= length or not chosen:
                    break
                chosen.pop()
            samples.append(NeedleSample(ids, value, key, float(depth), length, prompt))
    return samples


def extract_number(text: str) -> str | None:
    """The first number in `text`, digits only ("1,234,567" -> "1234567"), or None."""
    m = _NUMBER.search(text)
    return m.group(0).replace(",", "") if m else None


def score_answer(text: str, answer: str) -> bool:
    """True when the first number in the generated `text` equals `answer`."""
    return extract_number(text) == str(answer)


def needle_accuracy(answers: list[str], samples) -> float:
    """Fraction of generated `answers` that score against their samples (or answer strings)."""
    if len(answers) != len(samples):
        raise ValueError(f"answers: expected {len(samples)} answers (one per sample), "
                         f"got {len(answers)}")
    if not answers:
        raise ValueError("answers: expected at least one answer")
    targets = [s.answer if isinstance(s, NeedleSample) else str(s) for s in samples]
    return sum(score_answer(a, t) for a, t in zip(answers, targets)) / len(answers)
