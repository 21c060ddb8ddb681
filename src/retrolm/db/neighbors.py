"""Neighbours for every query window: search, drop same-document chunks, keep top k.

Searching k + margin candidates is usually enough; a query whose own document fills the
candidate list is searched again with twice as many, until k survive or the whole
database has been seen. A query whose documents own more chunks than the margin (one long
document can own most of the database) is searched instead with those chunks left out
of the search itself, when the retriever can (BM25, Flat and IVF indexes: `can_exclude`):
a document's chunks are one contiguous id range, so one range per query is enough. The
result is the same; only the cost differs. The result is an int32 [n_queries, k] array,
best first, -1 padded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from retrolm.atomic import atomic_path
from retrolm.db.retriever import Retriever


def _search(retriever: Retriever, texts: list[str], vecs: np.ndarray | None, k: int,
            exclude: tuple[int, int] | None = None):
    more = {} if exclude is None else {"exclude": exclude}
    if vecs is not None:
        return retriever.search_vectors(vecs, k, **more)  # type: ignore[attr-defined]
    return retriever.search(texts, k, **more)  # type: ignore[call-arg]


def _excluded_range(docs: set[int], chunk_doc: np.ndarray) -> tuple[int, int] | None:
    """Chunk ids [lo, hi) of `docs` when they are consecutive rows (chunk_doc is sorted)."""
    if not docs or max(docs) - min(docs) + 1 != len(docs):
        return None
    lo = int(np.searchsorted(chunk_doc, min(docs), side="left"))
    return lo, int(np.searchsorted(chunk_doc, max(docs), side="right"))


def _search_heavy(retriever, texts, vecs, excl, chunk_doc, k, heavy, out, lo) -> np.ndarray:
    """Search queries whose documents own > `heavy` chunks with those chunks left out;
    return the rows (of this batch) still to do the usual way."""
    ranges = [_excluded_range(e, chunk_doc) if e else None for e in excl]
    groups: dict[tuple[int, int], list[int]] = {}
    rest = []
    for row, r in enumerate(ranges):
        if r is not None and r[1] - r[0] > heavy:
            groups.setdefault(r, []).append(row)
        else:
            rest.append(row)
    for r, rows in groups.items():
        _, ids = _search(retriever, [texts[i] for i in rows], None if vecs is None else vecs[rows],
                         min(k, len(chunk_doc)), exclude=r)
        for row, cand in zip(rows, ids, strict=True):
            take = cand[cand >= 0][:k]
            out[lo + row, : len(take)] = take
    return np.asarray(rest, dtype=np.int64)


def compute_neighbors(
    retriever: Retriever,
    get_query_texts: Callable[[int, int], list[str]],
    n_queries: int,
    query_docs: Callable[[int, int], list[set[int]]] | None,
    chunk_doc: np.ndarray,
    k: int,
    out_path: Path,
    batch_size: int = 256,
    progress: bool = True,
    exclude_from: int | None = None,
) -> np.ndarray:
    """Top-k database chunk ids per query, excluding chunks of the query's documents.

    `query_docs(lo, hi)` gives, per query, the set of database document rows to exclude
    (None: no exclusion, for valid/test whose documents are not in the database).
    `chunk_doc[c]` is the document row of database chunk c. Written to `out_path` (.npy)
    atomically; returns the array. Queries whose documents own more than `exclude_from`
    chunks (default: the margin for BM25, whose cost is per query anyway; 8k for dense
    indexes, which search a batch at once) are searched with those chunks left out.
    """
    from tqdm import tqdm

    chunk_doc = np.asarray(chunk_doc)
    n_db = len(chunk_doc)
    out = np.full((n_queries, k), -1, dtype=np.int32)  # (Q, k)
    margin = k if query_docs is not None else 0
    dense = hasattr(retriever, "search_vectors") and hasattr(retriever, "embedder")
    sorted_docs = bool(np.all(chunk_doc[1:] >= chunk_doc[:-1]))
    exclude_in_search = query_docs is not None and sorted_docs and getattr(retriever, "can_exclude", False)
    if exclude_from is None:
        exclude_from = 8 * k if dense else margin
    bar = tqdm(total=n_queries, unit="query", desc="neighbours", disable=not progress,
               dynamic_ncols=True)
    for lo in range(0, n_queries, batch_size):
        hi = min(n_queries, lo + batch_size)
        texts = get_query_texts(lo, hi)
        vecs = retriever.embedder.encode(texts) if dense else None  # type: ignore[attr-defined]
        excl = query_docs(lo, hi) if query_docs is not None else None
        pending = np.arange(hi - lo)
        if exclude_in_search:
            pending = _search_heavy(retriever, texts, vecs, excl, chunk_doc, k, exclude_from, out, lo)
        kk = min(n_db, k + margin)
        while len(pending) and kk > 0:
            sub_texts = [texts[i] for i in pending]
            _, ids = _search(retriever, sub_texts, None if vecs is None else vecs[pending], kk)
            retry = []
            for row, cand in zip(pending, ids, strict=True):
                cand = cand[cand >= 0]
                if excl is not None and excl[row]:
                    bad = np.isin(chunk_doc[cand], np.fromiter(excl[row], dtype=np.int64))
                    kept = cand[~bad]
                else:
                    kept = cand
                take = kept[:k]
                out[lo + row, : len(take)] = take
                # Ask again only if exclusion (not a lack of results) left us short.
                if len(take) < k and len(cand) == kk and kk < n_db:
                    retry.append(row)
            pending = np.asarray(retry, dtype=np.int64)
            kk = min(n_db, kk * 2)
        bar.update(hi - lo)
    bar.close()
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, out, allow_pickle=False)
    return out
