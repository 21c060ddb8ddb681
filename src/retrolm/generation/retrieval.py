"""Online retrieval for decoding: the model's `retrieve(u, chunk_tokens)` callback.

Each time a chunk of m tokens is complete (prompt or generated), `Retro.step` calls this
object once per chunk. It decodes each row's chunk to text, searches the database's
retriever, keeps the top-k chunk ids, and gathers neighbour + continuation tokens
(`ChunkStore.gather`). The model encodes them once into its KV cache.

Search results are memoised on the chunk's token ids, so a chunk re-completed after a
speculative rollback with the same tokens costs no second search.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from retrolm.errors import RetrolmError

if TYPE_CHECKING:
    from retrolm.db.database import RetrievalDB


@dataclass
class ChunkRetrieval:
    """What was retrieved for chunk `chunk_index` of one sequence."""

    chunk_index: int
    query: str
    chunk_ids: list[int]  # database chunk ids, best first (no -1)
    scores: list[float]
    neighbours: list[dict[str, Any]] = field(default_factory=list)  # filled by describe()


class OnlineRetriever:
    """`retrieve` callback over a `RetrievalDB` for a batch of B sequences."""

    def __init__(self, db: RetrievalDB, k: int, batch_size: int, device: torch.device | str = "cpu",
                 memo_size: int = 4096) -> None:
        if k < 1:
            raise RetrolmError(f"k={k}: need at least one neighbour per chunk")
        self.db = db
        self.k = k
        self.batch_size = batch_size
        self.device = device
        self.calls = 0  # number of retrieve() calls (one per completed chunk per step)
        self.searches = 0  # rows actually searched (memo misses)
        self.seconds = 0.0  # time spent searching and gathering
        self.records: list[dict[int, ChunkRetrieval]] = [{} for _ in range(batch_size)]
        self.keys: list[dict[int, tuple[int, ...]]] = [{} for _ in range(batch_size)]
        self.tokens: list[dict[int, list[np.ndarray]]] = [{} for _ in range(batch_size)]  # real tokens
        self._memo: OrderedDict[tuple[int, ...], tuple[np.ndarray, np.ndarray, str]] = OrderedDict()
        self._memo_size = memo_size

    def __call__(self, u: int, chunk_tokens: Tensor) -> tuple[Tensor, Tensor] | None:
        """chunk_tokens (B, m) -> neighbours (B, k, r) int64 and mask (B, k, r) bool."""
        self.calls += 1
        t0 = time.perf_counter()
        rows = chunk_tokens.detach().cpu().numpy()  # (B, m)
        keys = [tuple(int(t) for t in row) for row in rows]
        missing = [i for i, key in enumerate(keys) if key not in self._memo]
        if missing:
            texts = [self.db.tokenizer.decode(keys[i]) for i in missing]
            scores, ids = self.db.retriever.search(texts, self.k)  # (q, k), (q, k)
            self.searches += len(missing)
            for j, i in enumerate(missing):
                self._memo[keys[i]] = (ids[j], scores[j], texts[j])
                if len(self._memo) > self._memo_size:
                    self._memo.popitem(last=False)
        ids = np.stack([self._memo[key][0] for key in keys])  # (B, k)
        tokens, mask = self.db.chunks.gather(ids)  # (B, k, r), (B, k, r)
        for b, key in enumerate(keys):
            row_ids, row_scores, text = self._memo[key]
            keep = row_ids >= 0
            self.keys[b][u] = key
            self.records[b][u] = ChunkRetrieval(
                u, text, [int(c) for c in row_ids[keep]], [float(s) for s in row_scores[keep]]
            )
            self.tokens[b][u] = [tokens[b, j][mask[b, j]] for j in range(tokens.shape[1]) if mask[b, j].any()]
        self.seconds += time.perf_counter() - t0
        if not mask.any():
            return None  # nothing found for any row: zero CCA update, as a GPT
        return (
            torch.from_numpy(tokens).to(self.device),
            torch.from_numpy(mask).to(self.device),
        )

    def neighbour_tokens(self, row: int, upto_chunk: int, last: int = 2) -> list[np.ndarray]:
        """Real neighbour token runs (chunk + continuation) of the newest `last` chunks <= upto_chunk.

        Newest first; what the speculative drafter searches for continuations.
        """
        out = []
        for u in range(upto_chunk, max(-1, upto_chunk - last), -1):
            got = self.tokens[row].get(u)
            if got is None:
                continue
            out.extend(got)
        return out

    def retrieval_of(self, row: int, tokens: list[int], describe: bool) -> list[ChunkRetrieval]:
        """Records of the chunks retrieved for `tokens` (prompt + generated) of `row`.

        A record made for a rejected speculative draft (its chunk tokens differ from the
        final ones) is left out.
        """
        m = self.db.chunk_size
        out = []
        for u in sorted(self.records[row]):
            if tuple(tokens[u * m : (u + 1) * m]) == self.keys[row][u]:
                out.append(self.records[row][u])
        if describe:
            for rec in out:
                rec.neighbours = describe_chunks(self.db, rec.chunk_ids, rec.scores)
        return out


def describe_chunks(db: RetrievalDB, chunk_ids: list[int], scores: list[float]) -> list[dict[str, Any]]:
    """Readable neighbours: chunk id, document id, score, chunk text and continuation text."""
    if not chunk_ids:
        return []
    ids = np.asarray(chunk_ids, dtype=np.int64)
    tokens, mask = db.chunks.gather(ids)  # (n, r), (n, r)
    m = db.chunk_size
    doc_ids = db._doc_ids()
    rows = db.chunks.chunk_docs(ids)
    out = []
    for j, c in enumerate(chunk_ids):
        global_index = int(db.streams["train"].doc_index[int(rows[j])])
        out.append({
            "chunk_id": int(c),
            "doc_id": doc_ids[global_index],
            "score": float(scores[j]),
            "text": db.tokenizer.decode(tokens[j, :m][mask[j, :m]]),
            "continuation": db.tokenizer.decode(tokens[j, m:][mask[j, m:]]),
        })
    return out
