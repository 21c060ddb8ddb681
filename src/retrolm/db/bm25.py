"""Sparse retrieval with BM25 (the `bm25s` library), same `search()` contract as dense.

Tokenisation: lowercase, words of >= 2 word characters (`\\b\\w\\w+\\b`), English
stopwords removed (bm25s's list): IDF would give them ~0 weight anyway and dropping them
keeps the posting lists short, so neighbour search over every chunk stays fast.
A query sharing no word with the database gets no neighbours (ids -1), not arbitrary ones.
Stored with bm25s's own save(), which writes .npy (loaded with allow_pickle=False) and JSON.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from retrolm.errors import RetrolmError

_WORD = re.compile(r"(?u)\b\w\w+\b")
_SETTINGS = "retrolm_bm25.json"


def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def tokenize(text: str, stop: frozenset[str]) -> list[str]:
    """Lowercased words minus stopwords."""
    return [w for w in _WORD.findall(text.lower()) if w not in stop]


class BM25Retriever:
    """BM25 over database chunks; `search` returns (scores float32 [q,k], ids int64 [q,k])."""

    def __init__(self, model, stop: frozenset[str]) -> None:
        self._bm25 = model
        self._stop = stop
        self.num_docs = int(model.scores["num_docs"])

    @classmethod
    def build(cls, texts: list[str], k1: float = 1.5, b: float = 0.75) -> BM25Retriever:
        """Index `texts` (chunk i = id i)."""
        import bm25s

        if len(texts) == 0:
            raise RetrolmError("cannot build BM25 over zero chunks; the database has no chunks")
        stop = _stopwords()
        model = bm25s.BM25(k1=k1, b=b)
        model.index([tokenize(t, stop) for t in texts], show_progress=False)
        return cls(model, stop)

    def save(self, directory: Path) -> None:
        """Write the index to `directory` (.npy + JSON, no pickle)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._bm25.save(str(directory), show_progress=False)
        (directory / _SETTINGS).write_text(
            json.dumps({"tokenizer": _WORD.pattern, "stopwords": "en", "lower": True}) + "\n"
        )

    @classmethod
    def load(cls, directory: Path) -> BM25Retriever:
        """Read an index written by `save` (arrays loaded with allow_pickle=False)."""
        import bm25s

        directory = Path(directory)
        if not (directory / _SETTINGS).is_file():
            raise RetrolmError(f"BM25 index {directory} is missing or incomplete; rebuild the database")
        try:
            model = bm25s.BM25.load(str(directory), allow_pickle=False, show_progress=False)
        except (OSError, ValueError, KeyError) as exc:
            raise RetrolmError(f"BM25 index {directory} is unreadable ({exc}); rebuild the database") from exc
        return cls(model, _stopwords())

    def search(self, texts: list[str], k: int, exclude: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k chunks per query, best first; -1 / -inf where fewer than k match a word.

        `exclude=(lo, hi)` leaves chunk ids lo..hi-1 out of every query's results, exactly
        as if they were dropped from the full ranking (the neighbour stage's
        same-document rule, without searching deeper).
        """
        scores = np.full((len(texts), k), -np.inf, dtype=np.float32)  # (Q, k)
        ids = np.full((len(texts), k), -1, dtype=np.int64)  # (Q, k)
        for q, text in enumerate(texts):
            token_ids = self._bm25.get_tokens_ids(tokenize(text, self._stop))
            if not token_ids:
                continue
            s = self._bm25.get_scores_from_ids(token_ids)  # (N,)
            if exclude is not None:
                s = s.copy()
                s[exclude[0] : exclude[1]] = 0  # zero scores never enter the results
            kk = min(k, len(s))
            if kk < len(s):  # every chunk tied with the k-th best competes: ties go to lower ids
                cut = s[np.argpartition(-s, kk - 1)[:kk]].min()
                top = np.flatnonzero(s >= cut) if cut > 0 else np.flatnonzero(s > 0)
            else:
                top = np.arange(len(s))
            top = top[np.lexsort((top, -s[top]))][:kk]  # best first, ties by lower id
            top = top[s[top] > 0]
            scores[q, : len(top)] = s[top]
            ids[q, : len(top)] = top
        return scores, ids

    can_exclude = True
