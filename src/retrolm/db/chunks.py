"""Token streams per split and the train chunk store, with vectorised neighbour gathering.

Training gathers neighbour tokens on the fly, so `ChunkStore.gather` is pure numpy
fancy indexing over memmaps: no Python loop per chunk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def make_chunks(docs: np.ndarray, m: int) -> np.ndarray:
    """int64 [N, 3] (start, length, doc): m-token chunks of each document, never crossing one.

    `docs` is int64 [D, 2] (start, length incl. EOS).
    """
    counts = -(-docs[:, 1] // m)  # (D,) ceil
    doc = np.repeat(np.arange(len(docs), dtype=np.int64), counts)  # (N,)
    first = np.cumsum(counts) - counts  # (D,)
    k = np.arange(len(doc), dtype=np.int64) - first[doc]  # chunk number inside its doc
    start = docs[doc, 0] + k * m
    length = np.minimum(m, docs[doc, 0] + docs[doc, 1] - start)
    return np.stack([start, length, doc], axis=1).astype(np.int64)


class TokenStream:
    """One split: flat tokens (EOS after each document) + per-document (start, length)."""

    def __init__(self, directory: Path, dtype: np.dtype, chunk_size: int, tokenizer=None) -> None:
        self.directory = Path(directory)
        path = self.directory / "tokens.bin"
        self.tokens = (
            np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)
        )
        self.docs = np.load(self.directory / "docs.npy", allow_pickle=False)  # (D, 2)
        self.doc_index = np.load(self.directory / "doc_index.npy", allow_pickle=False)  # (D,)
        self.chunk_size = chunk_size
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_windows(self) -> int:
        return -(-len(self.tokens) // self.chunk_size)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.tokens[start:stop]

    def doc_of(self, positions: np.ndarray) -> np.ndarray:
        """Row of docs.npy holding each stream position."""
        return np.searchsorted(self.docs[:, 0], np.asarray(positions), side="right") - 1

    def window_docs(self, w: int) -> set[int]:
        """Rows of docs.npy that overlap query window w."""
        m = self.chunk_size
        lo, hi = self.doc_of(np.array([w * m, min((w + 1) * m, len(self.tokens)) - 1]))
        return set(range(int(lo), int(hi) + 1))

    def window_text(self, w: int) -> str:
        m = self.chunk_size
        return self.tokenizer.decode(self.tokens[w * m : (w + 1) * m])

    def windows_text(self, lo: int, hi: int) -> list[str]:
        return [self.window_text(w) for w in range(lo, hi)]


class ChunkStore:
    """The database chunks: rows (start, length, doc) into the train stream."""

    def __init__(self, stream: TokenStream, chunks: np.ndarray, pad_id: int) -> None:
        self.stream = stream
        self.table = chunks  # (N, 3)
        self.m = stream.chunk_size
        self.pad_id = int(pad_id)
        self._docs = chunks[:, 2]
        # continuation of chunk c is c+1 when it is in the same document, else none
        nxt = np.zeros(len(chunks), dtype=bool)
        if len(chunks) > 1:
            nxt[:-1] = self._docs[1:] == self._docs[:-1]
        self._has_next = nxt

    def __len__(self) -> int:
        return len(self.table)

    def chunk_docs(self, ids: np.ndarray) -> np.ndarray:
        """docs.npy row of each chunk id (ids must be >= 0)."""
        return self._docs[np.asarray(ids)]

    def chunk_tokens(self, c: int) -> np.ndarray:
        start, length, _ = self.table[c]
        return np.asarray(self.stream.tokens[start : start + length])

    def chunk_text(self, ids) -> list[str]:
        return [self.stream.tokenizer.decode(self.chunk_tokens(int(c))) for c in np.atleast_1d(ids)]

    def texts(self, lo: int, hi: int) -> list[str]:
        """Decoded text of chunks [lo, hi), for embedding and BM25 indexing."""
        return self.chunk_text(np.arange(lo, hi))

    def _one(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [..., m] and mask of chunks `ids` (-1 → all pad)."""
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        start = self.table[safe, 0]  # (...)
        length = np.where(valid, self.table[safe, 1], 0)
        offs = np.arange(self.m)  # (m,)
        mask = offs < length[..., None]  # (..., m)
        pos = np.where(mask, start[..., None] + offs, 0)
        tokens = np.asarray(self.stream.tokens[pos.reshape(-1)]).reshape(pos.shape) if len(self.stream) else (
            np.zeros(pos.shape, dtype=np.int64))
        return tokens, mask

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Neighbour tokens int64 [..., 2m] (chunk then continuation) and mask bool [..., 2m]."""
        ids = np.asarray(ids, dtype=np.int64)
        nxt = np.where((ids >= 0) & self._has_next[np.maximum(ids, 0)], ids + 1, -1)
        t1, m1 = self._one(ids)
        t2, m2 = self._one(nxt)
        tokens = np.concatenate([t1, t2], axis=-1).astype(np.int64)
        mask = np.concatenate([m1, m2], axis=-1)
        tokens[~mask] = self.pad_id
        return tokens, mask
