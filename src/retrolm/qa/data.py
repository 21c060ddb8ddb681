"""QA dataset I/O and passage formatting, shared by `retrolm qa` and the facts corpus.

Format: JSONL, one object per line with `question` (str), `answers` (non-empty list of
str) and optional `passages` (list of {"title", "text"}). Templates follow docs/reference.md §2
(RETRO++) and Jin et al. (strongest passages first and last).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from retrolm.errors import RetrolmError

T = TypeVar("T")


@dataclass(frozen=True)
class Passage:
    title: str
    text: str


@dataclass(frozen=True)
class QAItem:
    question: str
    answers: list[str]
    passages: list[Passage] | None = None
    extra: dict = field(default_factory=dict)  # other keys (entity, kind, attribute, ...)


def _parse_item(obj: object, where: str) -> QAItem:
    if not isinstance(obj, dict):
        raise RetrolmError(f"{where}: expected a JSON object; fix the line")
    q = obj.get("question")
    if not isinstance(q, str) or not q.strip():
        raise RetrolmError(f"{where}: 'question' must be a non-empty string")
    answers = obj.get("answers")
    if (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(a, str) for a in answers)
    ):
        raise RetrolmError(f"{where}: 'answers' must be a non-empty list of strings")
    passages = None
    if obj.get("passages") is not None:
        raw = obj["passages"]
        if not isinstance(raw, list):
            raise RetrolmError(f"{where}: 'passages' must be a list of {{title, text}}")
        passages = []
        for j, p in enumerate(raw):
            if not isinstance(p, dict) or not isinstance(p.get("text"), str):
                raise RetrolmError(f"{where}: passage {j} needs a string 'text'")
            title = p.get("title") or ""
            if not isinstance(title, str):
                raise RetrolmError(f"{where}: passage {j} 'title' must be a string")
            passages.append(Passage(title=title, text=p["text"]))
    extra = {k: v for k, v in obj.items() if k not in ("question", "answers", "passages")}
    return QAItem(question=q, answers=list(answers), passages=passages, extra=extra)


def load_qa_jsonl(path: str | Path) -> list[QAItem]:
    """Read a QA JSONL file; blank lines are skipped, malformed lines raise with line number."""
    path = Path(path)
    if not path.is_file():
        raise RetrolmError(f"QA file not found: {path}; pass an existing JSONL file")
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RetrolmError(f"{where}: invalid JSON ({e.msg}); fix the line") from None
            items.append(_parse_item(obj, where))
    if not items:
        raise RetrolmError(f"QA file {path} has no items; add JSONL lines with question/answers")
    return items


def reorder_passages(passages_best_first: Sequence[T]) -> list[T]:
    """Strongest at both ends ("lost in the middle"): 1st, 3rd, 5th, ..., 6th, 4th, 2nd."""
    items = list(passages_best_first)
    return items[0::2] + items[1::2][::-1]


def retro_plus_plus_template(title: str, source: str, question: str, answer: str = "") -> str:
    """The RETRO++ decoder context of docs/reference.md §2, verbatim."""
    return f"title: {title}, source: {source}\n question: {question}\n answer: {answer}"


def rag_prompt(passages: Sequence[Passage], question: str) -> str:
    """RAG_GPT prompt: passages in the given order, then the question; the answer follows."""
    blocks = [f"title: {p.title}\n{p.text}" for p in passages]
    blocks.append(f"question: {question}\n answer:")
    return "\n\n".join(blocks)
