"""BM25 retriever: exact text ranks first, save/load round trip, no-match padding."""

from __future__ import annotations

import numpy as np
import pytest

from retrolm.db.bm25 import BM25Retriever
from retrolm.errors import RetrolmError


def _chunks() -> list[str]:
    from conftest import synthetic_documents  # tests/ is on sys.path (rootdir conftest)

    return [s for d in synthetic_documents(40, seed=3) for s in d.split(". ")]


def test_exact_chunk_ranks_first():
    chunks = _chunks()
    bm = BM25Retriever.build(chunks)
    picks = [5, 17, 60, len(chunks) - 1]
    scores, ids = bm.search([chunks[i] for i in picks], k=3)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (4, 3)
    for row, i in enumerate(picks):
        # the exact chunk (or an identical twin) is first
        assert chunks[ids[row, 0]] == chunks[i]
        assert scores[row, 0] >= scores[row, 1]


def test_save_load_round_trip(tmp_path):
    chunks = _chunks()
    bm = BM25Retriever.build(chunks)
    bm.save(tmp_path / "bm25")
    assert not list((tmp_path / "bm25").glob("*.pkl"))
    loaded = BM25Retriever.load(tmp_path / "bm25")
    queries = ["otter fish dawn", "glacier seeds winter", chunks[7]]
    a, b = bm.search(queries, 5), loaded.search(queries, 5)
    assert np.array_equal(a[1], b[1]) and np.allclose(a[0], b[0])


def test_no_match_and_small_database_pad_with_minus_one():
    bm = BM25Retriever.build(["alpha beta", "beta gamma", "delta"])
    scores, ids = bm.search(["zzz qqq", "gamma"], k=5)
    assert (ids[0] == -1).all()
    assert ids[1, 0] == 1 and (ids[1, 1:] == -1).all() and np.isinf(scores[1, 1:]).all()


def test_missing_index_is_refused(tmp_path):
    with pytest.raises(RetrolmError, match="BM25 index"):
        BM25Retriever.load(tmp_path / "nothing")
