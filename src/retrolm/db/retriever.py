"""The one search contract every retriever meets, and opening a database's retriever.

`search(texts, k) -> (scores float32 [q, k], ids int64 [q, k])`, best first, ids -1 (and
score -inf) where fewer than k results exist. Higher score = more similar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from retrolm.errors import RetrolmError


class Retriever(Protocol):
    def search(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]: ...


class DenseRetriever:
    """Embed queries with the database's encoder, search its FAISS index (inner product)."""

    def __init__(self, embedder, index) -> None:
        self.embedder = embedder
        self.index = index

    def search(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.search_vectors(self.embedder.encode(texts), k)

    @property
    def can_exclude(self) -> bool:
        """Can `search_vectors` leave an id range out (exact Flat and plain IVF indexes)?"""
        import faiss

        return isinstance(self.index, (faiss.IndexFlat, faiss.IndexIVF))

    def search_vectors(
        self, queries: np.ndarray, k: int, exclude: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search with precomputed unit vectors (float [q, dim]); `exclude=(lo, hi)` leaves
        ids lo..hi-1 out of the results (needs `can_exclude`)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, dim)
        if len(q) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        if exclude is None:
            scores, ids = self.index.search(q, k)  # (Q, k), (Q, k)
        else:
            params, keep = self._excluding(*exclude)
            scores, ids = self.index.search(q, k, params=params)
            del keep
        scores = scores.astype(np.float32)
        scores[ids < 0] = -np.inf
        return scores, ids.astype(np.int64)

    def _excluding(self, lo: int, hi: int):
        """FAISS search parameters leaving ids [lo, hi) out, and the selectors they point
        to (the caller keeps those alive: FAISS does not own them)."""
        import faiss

        inner = faiss.IDSelectorRange(lo, hi)
        selector = faiss.IDSelectorNot(inner)
        if isinstance(self.index, faiss.IndexIVF):  # keep the index's own nprobe
            params = faiss.SearchParametersIVF(sel=selector, nprobe=self.index.nprobe)
        else:
            params = faiss.SearchParameters(sel=selector)
        return params, (inner, selector)


def retriever_manifest_section(
    kind: str,
    embedder: str | None = None,
    dim: int | None = None,
    index_factory: str | None = None,
    nprobe: int | None = None,
) -> dict[str, Any]:
    """The manifest's "retriever" section (what `open_retriever` reads back)."""
    return {"kind": kind, "embedder": embedder, "dim": dim, "index_factory": index_factory,
            "nprobe": nprobe}


def open_retriever(db_dir: Path, manifest: dict[str, Any], device: str = "cpu") -> Retriever:
    """Open the retriever described by `manifest["retriever"]` inside `db_dir`."""
    db_dir = Path(db_dir)
    section = manifest.get("retriever") or {}
    kind = section.get("kind")
    if kind == "bm25":
        from retrolm.db.bm25 import BM25Retriever

        return BM25Retriever.load(db_dir / "bm25")
    if kind == "dense":
        from retrolm.db.embed import Embedder
        from retrolm.db.index import load_index

        name = section.get("embedder")
        model_dir = None if name in (None, "all-MiniLM-L6-v2") else name
        settings = manifest.get("settings") or {}
        emb = Embedder(model_dir, batch_size=int(settings.get("embed_batch_size", 64)),
                       dtype=settings.get("embed_dtype", "fp32"), device=device)
        if section.get("dim") is not None and emb.dim != int(section["dim"]):
            raise RetrolmError(
                f"encoder {name} gives {emb.dim}-d vectors but the database index is "
                f"{section['dim']}-d; use the encoder the database was built with"
            )
        index = load_index(db_dir / "index.faiss", nprobe=section.get("nprobe"),
                           factory=section.get("index_factory"))
        return DenseRetriever(emb, index)
    raise RetrolmError(f"unknown retriever kind {kind!r} in {db_dir}/manifest.json; rebuild the database")
