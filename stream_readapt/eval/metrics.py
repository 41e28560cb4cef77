"""Scores of one generated answer against its references, as the paper reports them.

ROUGE-L recall is rouge-score's (Google's reimplementation of ROUGE-1.5.5, no stemming),
best over the references; exact match asks whether a SQuAD-normalized reference occurs in
the normalized output as a whole-token span ("the answer is contained in the output").
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalization: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, answers) -> float:
    """1.0 when some normalized answer is a whole-token span of the normalized prediction."""
    pred = f" {normalize_answer(prediction)} "
    for answer in answers:
        norm = normalize_answer(answer)
        if (norm and f" {norm} " in pred) or (not norm and not pred.strip()):
            return 1.0
    return 0.0


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l_recall(prediction: str, answers) -> float:
    """max over answers of rouge-score's ROUGE-L recall (LCS length / reference length)."""
    return max(_scorer().score(answer, prediction)["rougeL"].recall for answer in answers)
