"""QA and passage files for `evaluate`: JSON Lines read row by row, each bad row a one-line error.

QA rows: {"id", "question", "answers": [str, ...], optional "passage_id"}; passage rows:
{"id", "text"}. Errors name the file and the 1-based line, the reason and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Question:
    """One QA row: the question, its reference answers and (optionally) its gold passage."""

    id: str
    question: str
    answers: tuple[str, ...]
    passage_id: str | None = None
    line: int = field(default=0, compare=False)  # where it came from, for error messages


@dataclass(frozen=True)
class Passage:
    id: str
    text: str


def _rows(path: Path):
    """(line number, JSON object) for every non-blank line of a JSON Lines file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    with open(path, encoding="utf-8") as fh:
        try:
            lines = list(enumerate(fh, start=1))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason}); write JSON Lines in UTF-8") from None
    for number, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: invalid JSON ({e.msg}); one JSON object per line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, found {type(row).__name__}")
        yield number, row


def _text(row: dict, key: str, where: str, *, optional: bool = False) -> str | None:
    value = row.get(key)
    if value is None and optional:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key.endswith("id"):
        return str(value)  # numeric ids are common; compare them as text
    if not isinstance(value, str) or not value.strip():
        found = "missing" if key not in row else f"{type(value).__name__} {value!r}"[:60]
        raise ValueError(f"{where}: {key!r} must be a non-empty string ({found})")
    return value


def _answers(row: dict, where: str) -> tuple[str, ...]:
    value = row.get("answers")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a.strip() for a in value):
        raise ValueError(f"{where}: 'answers' must be a non-empty list of non-empty strings")
    return tuple(value)


def _unique(items, path: Path, numbers: list[int]):
    seen: dict[str, int] = {}
    for item, number in zip(items, numbers):
        if item.id in seen:
            raise ValueError(f"{path}:{number}: duplicate id {item.id!r} (first on line {seen[item.id]})")
        seen[item.id] = number
    return items


def load_questions(path: str | os.PathLike) -> list[Question]:
    """The rows of a QA JSON Lines file, checked (ValueError naming file:line on a bad row)."""
    path = Path(path)
    items, numbers = [], []
    for number, row in _rows(path):
        where = f"{path}:{number}"
        items.append(Question(_text(row, "id", where), _text(row, "question", where), _answers(row, where),
                              _text(row, "passage_id", where, optional=True), number))
        numbers.append(number)
    if not items:
        raise ValueError(f"{path}: no questions (expected JSON Lines rows with id, question, answers)")
    return _unique(items, path, numbers)


def load_passages(path: str | os.PathLike) -> list[Passage]:
    """The rows of a passage JSON Lines file ({"id", "text"}), checked like `load_questions`."""
    path = Path(path)
    items, numbers = [], []
    for number, row in _rows(path):
        where = f"{path}:{number}"
        items.append(Passage(_text(row, "id", where), _text(row, "text", where)))
        numbers.append(number)
    if not items:
        raise ValueError(f"{path}: no passages (expected JSON Lines rows with id, text)")
    return _unique(items, path, numbers)


def check_gold(questions: list[Question], passages: list[Passage], qa_path, *, required: bool) -> None:
    """Every passage_id must name a passage; with `required` (oracle retrieval) every row needs one."""
    ids = {p.id for p in passages}
    for q in questions:
        if q.passage_id is None and required:
            raise ValueError(f"{qa_path}:{q.line}: no 'passage_id' (oracle retrieval needs one on every row)")
        if q.passage_id is not None and q.passage_id not in ids:
            raise ValueError(f"{qa_path}:{q.line}: passage_id {q.passage_id!r} is not in the passages file")


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a data file's bytes (data files are small next to a model)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()
