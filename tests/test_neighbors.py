"""Neighbour search: same-document candidates are never returned; short lists pad with -1."""

from __future__ import annotations

import numpy as np

from retrolm.db.bm25 import BM25Retriever
from retrolm.db.neighbors import compute_neighbors


def test_excludes_query_documents_and_pads(tmp_path):
    # 6 documents x 12 chunks; every chunk of a document shares the document's rare words, so
    # the best matches of a query are its own document's chunks and must all be dropped.
    chunks, chunk_doc = [], []
    for d in range(6):
        for c in range(12):
            chunks.append(f"topic{d} keyword{d} word{d} shared common text part{c}")
            chunk_doc.append(d)
    chunk_doc = np.asarray(chunk_doc)
    bm = BM25Retriever.build(chunks)
    queries = [chunks[i] for i in range(0, 72, 12)]  # first chunk of each document
    qdocs = [{d} for d in range(6)]
    k = 8
    out = compute_neighbors(bm, lambda lo, hi: queries[lo:hi], len(queries),
                            lambda lo, hi: qdocs[lo:hi], chunk_doc, k, tmp_path / "n.npy",
                            batch_size=4, progress=False)
    assert out.dtype == np.int32 and out.shape == (6, k)
    for q in range(6):
        got = out[q][out[q] >= 0]
        assert len(got) == k  # 12 own chunks fill the first k + margin = 16: the search grew
        assert not (chunk_doc[got] == q).any()
    # Without exclusion the own chunks come first.
    free = compute_neighbors(bm, lambda lo, hi: queries[lo:hi], len(queries), None, chunk_doc,
                             k, tmp_path / "f.npy", progress=False)
    assert (chunk_doc[free] == np.arange(6)[:, None]).all()


def test_pads_when_too_few_candidates(tmp_path):
    chunks = ["red apple", "red apple pie", "green pear", "blue sky"]
    chunk_doc = np.array([0, 0, 1, 2])
    bm = BM25Retriever.build(chunks)
    out = compute_neighbors(bm, lambda lo, hi: ["red apple"][lo:hi], 1, lambda lo, hi: [{0}],
                            chunk_doc, 3, tmp_path / "n.npy", progress=False)
    assert (out == -1).all()  # only document 0 matches a word, and it is excluded
    assert np.array_equal(np.load(tmp_path / "n.npy", allow_pickle=False), out)
