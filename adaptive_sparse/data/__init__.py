"""Long-text corpora (CPython stdlib, essays, user files), deterministic splits, packing, and
the needle-retrieval task."""

from adaptive_sparse.data.corpora import (
    BUILTIN,
    SPLITS,
    Document,
    load_corpus,
    pack,
    read_text,
    select_documents,
    sequence_id,
    split_by_position,
    split_documents,
    split_essays,
)
from adaptive_sparse.data.needle import (
    NeedleSample,
    extract_number,
    make_needle_samples,
    needle_accuracy,
    score_answer,
)

__all__ = [
    "BUILTIN", "Document", "NeedleSample", "SPLITS", "extract_number", "load_corpus",
    "make_needle_samples", "needle_accuracy", "pack", "read_text", "score_answer",
    "select_documents", "sequence_id", "split_by_position", "split_documents", "split_essays",
]
