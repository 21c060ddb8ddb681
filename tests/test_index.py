"""FAISS index: automatic factory, IVF recall against exact search, save/load."""

from __future__ import annotations

import numpy as np
import pytest

from retrolm.db.index import (
    build_index,
    choose_factory,
    default_nprobe,
    load_index,
    save_index,
    set_nprobe,
)
from retrolm.errors import RetrolmError


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 300 overlapping clusters: true neighbours often sit in other IVF lists."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((300, dim))
    x = centres[rng.integers(0, 300, n)] + 1.0 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def test_choose_factory_by_size():
    assert choose_factory(1_000, 384) == "Flat"
    assert choose_factory(49_999, 384) == "Flat"
    assert choose_factory(200_000, 384).startswith("IVF") and choose_factory(200_000, 384).endswith(",Flat")
    big = choose_factory(50_000_000, 384)
    assert "IVF" in big and "PQ" in big and "HNSW" in big


def test_ivf_recall_at_2(tmp_path):
    db, queries = clustered(20_000, 32, 0), clustered(300, 32, 1)
    factory = "IVF512,Flat"
    index = build_index(db, factory, seed=0)
    save_index(index, tmp_path / "i.faiss")
    index = load_index(tmp_path / "i.faiss", factory=factory)  # default nprobe
    exact = np.argsort(-(queries @ db.T), axis=1)[:, :2]

    def recall() -> float:
        _, got = index.search(queries, 2)
        return float(np.mean([len(set(g) & set(e)) / 2 for g, e in zip(got, exact, strict=True)]))

    assert default_nprobe(factory) < 512  # an approximate search ...
    assert recall() >= 0.95  # ... that still finds the true top 2 at the default nprobe
    set_nprobe(index, 1)
    assert recall() < 0.9  # while one list is not enough: the data is not trivially separable


def test_flat_round_trip_and_errors(tmp_path):
    db = clustered(500, 16, 2)
    index = build_index(db, "Flat")
    save_index(index, tmp_path / "f.faiss")
    loaded = load_index(tmp_path / "f.faiss")
    assert np.array_equal(index.search(db[:5], 3)[1], loaded.search(db[:5], 3)[1])
    assert (loaded.search(db[:5], 1)[1][:, 0] == np.arange(5)).all()
    with pytest.raises(RetrolmError, match="missing"):
        load_index(tmp_path / "none.faiss")
    (tmp_path / "bad.faiss").write_bytes(b"not an index")
    with pytest.raises(RetrolmError, match="unreadable"):
        load_index(tmp_path / "bad.faiss")
    with pytest.raises(RetrolmError, match="needs at least"):
        build_index(db[:10], "IVF64,Flat")
