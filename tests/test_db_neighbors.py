"""Same-document exclusion inside the search gives exactly the neighbours of the retry path."""

from __future__ import annotations

import numpy as np
import pytest

from retrolm.db.neighbors import compute_neighbors


class RetryOnly:
    """A retriever without `can_exclude`: neighbours come from the search-deeper path."""

    def __init__(self, inner) -> None:
        self.inner = inner
        if hasattr(inner, "embedder"):
            self.embedder = inner.embedder
            self.search_vectors = inner.search_vectors

    def search(self, texts, k):
        return self.inner.search(texts, k)


@pytest.mark.parametrize("name", ["tiny_bm25_db", "tiny_db"])
def test_exclusion_in_the_search_matches_searching_deeper(name, request, tmp_path):
    db = request.getfixturevalue(name)
    stream = db.streams["train"]
    n = min(300, stream.num_windows)

    def neighbours(retriever):
        return compute_neighbors(retriever, stream.windows_text, n,
                                 lambda lo, hi: [stream.window_docs(w) for w in range(lo, hi)],
                                 db.chunks.table[:, 2], 4, tmp_path / "nb.npy", progress=False, exclude_from=0)

    assert db.retriever.can_exclude
    fast, slow = neighbours(db.retriever), neighbours(RetryOnly(db.retriever))
    assert (fast >= 0).mean() > 0.9
    assert np.array_equal(fast, slow)
    assert np.array_equal(fast, np.asarray(db.neighbors["train"][:n]))
