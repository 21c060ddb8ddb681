"""Dense embedding: real MiniLM, mean pooling over real tokens, resumable block writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrolm.db.embed import Embedder, embed_to_file, embeddings_complete
from retrolm.db.index import build_index
from retrolm.db.neighbors import compute_neighbors
from retrolm.db.retriever import DenseRetriever
from retrolm.errors import RetrolmError

TEXTS = [
    "The otter hunts fish at dawn by the river.",
    "An otter catches fish in the early morning near the stream.",
    "Interest rates rose and the stock market fell sharply.",
    "Python lists are mutable sequences of arbitrary objects.",
    "Dictionaries map hashable keys to values in Python.",
    "The heron waits in the marsh for frogs after rain.",
    "Central banks raised rates to fight inflation.",
    "A badger digs for worms in the meadow at night.",
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(batch_size=4)


def test_similar_closer_than_unrelated_and_unit_norm(embedder):
    v = embedder.encode(TEXTS[:3])
    assert v.shape == (3, embedder.dim) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3


def test_mean_pooling_ignores_padding(embedder):
    short = "A gecko."
    alone = embedder.encode([short])[0]
    long = "A very long sentence about the walrus " * 12
    batched = embedder.encode([long, short])[1]  # same batch → short one is padded
    assert np.abs(alone - batched).max() < 1e-5


def test_bf16_path_runs_and_agrees(embedder):
    bf = Embedder(batch_size=4, dtype="bf16")
    a, b = embedder.encode(TEXTS[:2]), bf.encode(TEXTS[:2])
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-4)
    assert (a * b).sum(axis=1).min() > 0.98


def test_missing_model_dir_names_the_path(tmp_path):
    with pytest.raises(RetrolmError, match=str(tmp_path / "nope")):
        Embedder(str(tmp_path / "nope"))


def test_embed_to_file_resumes_after_interruption(embedder, tmp_path):
    texts = TEXTS * 2  # 16 texts, block 4 → 4 blocks
    full = embed_to_file(embedder, lambda lo, hi: texts[lo:hi], len(texts), tmp_path / "a.f16",
                         block_size=4, progress=False)
    assert embeddings_complete(tmp_path / "a.f16")

    calls: list[int] = []

    def crashing(lo: int, hi: int) -> list[str]:
        if lo >= 8:
            raise KeyboardInterrupt  # killed while embedding block 2
        calls.append(lo)
        return texts[lo:hi]

    with pytest.raises(KeyboardInterrupt):
        embed_to_file(embedder, crashing, len(texts), tmp_path / "b.f16", block_size=4, progress=False)
    side = json.loads((tmp_path / "b.progress.json").read_text())
    assert side["blocks_done"] == 2 and not side["complete"]
    assert not embeddings_complete(tmp_path / "b.f16")

    resumed_from: list[int] = []

    def recording(lo: int, hi: int) -> list[str]:
        resumed_from.append(lo)
        return texts[lo:hi]

    out = embed_to_file(embedder, recording, len(texts), tmp_path / "b.f16", block_size=4, progress=False)
    assert resumed_from == [8, 12]  # finished blocks are not redone
    assert out.dtype == np.float16 and out.shape == (16, embedder.dim)
    assert np.array_equal(np.asarray(out), np.asarray(full))
    assert embeddings_complete(tmp_path / "b.f16")


def test_dense_flat_neighbours_equal_bruteforce(embedder, tmp_path):
    db = [f"{t} Note {i}." for i, t in enumerate(TEXTS * 3)]  # 24 chunks
    vecs = embed_to_file(embedder, lambda lo, hi: db[lo:hi], len(db), tmp_path / "e.f16",
                         block_size=8, progress=False)
    stored = np.asarray(vecs, dtype=np.float32)
    retriever = DenseRetriever(embedder, build_index(stored, "Flat"))
    queries = ["fish eaten by otters", "python dictionary keys", "inflation and banks"]
    k = 4
    got = compute_neighbors(retriever, lambda lo, hi: queries[lo:hi], len(queries), None,
                            np.arange(len(db)), k, tmp_path / "n.npy", progress=False)
    sims = embedder.encode(queries) @ stored.T  # (Q, N)
    expect = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    # Compare as score sets (ties between equal vectors may order differently).
    assert np.allclose(np.take_along_axis(sims, got.astype(np.int64), 1),
                       np.take_along_axis(sims, expect, 1), atol=1e-5)
    assert np.array_equal(np.load(tmp_path / "n.npy", allow_pickle=False), got)
