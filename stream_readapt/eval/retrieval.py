"""Which passage a question is asked with: none (closed book), BM25 top-1, or the gold one (oracle).

BM25 is bm25s's (Lù 2024, Okapi BM25 on sparse matrices), English stop words removed;
recall@1 is the share of questions with a gold `passage_id` whose top-1 passage is that one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .data import Passage, Question

logger = logging.getLogger(__name__)
METHODS = ("none", "bm25", "oracle")


@dataclass(frozen=True)
class Retrieved:
    """The passage chosen for each question id (None: closed book) and, when known, recall@1."""

    method: str
    passages: dict[str, Passage | None]
    recall_at_1: float | None = None
    n_gold: int = 0

    def record(self) -> dict:
        return {"method": self.method, "recall_at_1": self.recall_at_1, "n_with_gold": self.n_gold}


def bm25_top1(questions: list[Question], passages: list[Passage], *, stopwords: str | None = "en") -> list[Passage]:
    """The best BM25 passage for each question (ties: the earlier passage)."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([p.text for p in passages], stopwords=stopwords, show_progress=False),
                    show_progress=False)
    queries = bm25s.tokenize([q.question for q in questions], stopwords=stopwords, show_progress=False)
    docs, _ = retriever.retrieve(queries, k=1, show_progress=False)
    return [passages[int(i)] for i in docs[:, 0]]


def recall_at_1(questions: list[Question], chosen: list[Passage]) -> tuple[float | None, int]:
    """(share of gold-labelled questions whose chosen passage is the gold one, how many had gold)."""
    gold = [(q, p) for q, p in zip(questions, chosen) if q.passage_id is not None]
    if not gold:
        return None, 0
    return sum(q.passage_id == p.id for q, p in gold) / len(gold), len(gold)


def retrieve(questions: list[Question], passages: list[Passage] | None, method: str) -> Retrieved:
    """Pick a passage per question with `method` (one of METHODS)."""
    if method not in METHODS:
        raise ValueError(f"retrieval {method!r}: expected one of {', '.join(METHODS)}")
    if method == "none":
        return Retrieved("none", {q.id: None for q in questions})
    if not passages:
        raise ValueError(f"retrieval {method!r} needs a passages file (--passages P.jsonl)")
    if method == "oracle":
        by_id = {p.id: p for p in passages}
        return Retrieved("oracle", {q.id: by_id[q.passage_id] for q in questions}, 1.0, len(questions))
    chosen = bm25_top1(questions, passages)
    recall, n_gold = recall_at_1(questions, chosen)
    logger.info("BM25 recall@1 = %s over %d questions with a gold passage", recall, n_gold)
    return Retrieved("bm25", {q.id: p for q, p in zip(questions, chosen)}, recall, n_gold)
