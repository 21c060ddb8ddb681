"""`RetrievalDB`: build the database directory stage by stage, open it, search it.

Each build stage records completion in `build_state.json`; `manifest.json` is written
last, so a directory without it is never mistaken for a complete database. A re-run
with the same settings reuses finished stages (and resumes embedding block by block);
with different settings it wipes the old build and starts over.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from retrolm.atomic import atomic_path, sha256_file, write_json
from retrolm.corpora.reader import SPLITS, dedup_exact, dedup_near, read_corpus, split_of
from retrolm.db.chunks import ChunkStore, TokenStream, make_chunks, token_dtype
from retrolm.errors import RetrolmError
from retrolm.tokenizer import Tokenizer

FORMAT_VERSION = 1
STATE = "build_state.json"
MANIFEST = "manifest.json"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("retrolm", "numpy", "tokenizers", "faiss-cpu", "torch", "transformers", "bm25s"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def _prepare_dir(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Return the build state to continue from; wipe a stale build, refuse foreign dirs."""
    state_file = out / STATE
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if state.get("settings") == settings and not (out / MANIFEST).exists():
            return state
    elif out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise RetrolmError(f"{str(out)!r} is not empty and is not a retrolm database; choose another --out")
    if out.exists():
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    state = {"settings": settings, "done": {}}
    write_json(state_file, state)
    return state


class RetrievalDB:
    """An opened (complete, checksummed) database directory."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.tokenizer = Tokenizer.load(self.path / "tokenizer.json")
        self.chunk_size = int(manifest["settings"]["chunk_size"])
        self.vocab_size = int(manifest["vocab_size"])
        self.lm_train_tokens = int(manifest["lm_train_tokens"])
        self.splits = tuple(manifest["splits"])
        dtype = np.dtype(manifest["token_dtype"])
        self.streams = {s: TokenStream(self.path / s, dtype, self.chunk_size, self.tokenizer) for s in self.splits}
        table = np.load(self.path / "train" / "chunks.npy", allow_pickle=False)
        self.chunks = ChunkStore(self.streams["train"], table, self.tokenizer.pad_id)
        self.neighbors = {
            s: np.load(self.path / "neighbors" / f"{s}.npy", mmap_mode="r", allow_pickle=False) for s in self.splits
        }
        self._retriever = None

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> RetrievalDB:
        """Open a complete database; refuse missing manifests and size/sha256 mismatches."""
        path = Path(path)
        if not path.is_dir():
            raise RetrolmError(f"database {str(path)!r} does not exist; build it with `retrolm db build`")
        mf = path / MANIFEST
        if not mf.is_file():
            raise RetrolmError(
                f"{str(path)!r} has no manifest.json: the build is incomplete; re-run `retrolm db build` with --out {path}"
            )
        manifest = json.loads(mf.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise RetrolmError(f"{str(path)!r} has database format {manifest.get('format_version')}, "
                               f"this retrolm reads {FORMAT_VERSION}; rebuild it")
        for rel, info in manifest["files"].items():
            f = path / rel
            if not f.is_file() or f.stat().st_size != info["size"]:
                raise RetrolmError(f"{str(path)!r}: {rel} is missing or has the wrong size (truncated?); "
                                   "rebuild with `retrolm db build`")
            if verify and sha256_file(f) != info["sha256"]:
                raise RetrolmError(f"{str(path)!r}: {rel} fails its sha256 check; rebuild with `retrolm db build`")
        return cls(path, manifest)

    # ---------------------------------------------------------------------------- search
    @property
    def retriever(self):
        if self._retriever is None:
            from retrolm.db.retriever import open_retriever

            self._retriever = open_retriever(self.path, self.manifest)
        return self._retriever

    def search(self, text: str, k: int = 5) -> list[dict[str, Any]]:
        """Top-k database chunks for `text`, each with its continuation and document id."""
        if k < 1:
            raise RetrolmError(f"-k {k} must be at least 1")
        scores, ids = self.retriever.search([text], k)
        docs = self._doc_ids()
        hits = []
        tokens, mask = self.chunks.gather(ids[0])
        m = self.chunk_size
        for j, c in enumerate(ids[0]):
            if c < 0:
                continue
            row = int(self.chunks.chunk_docs(np.array([c]))[0])
            global_index = int(self.streams["train"].doc_index[row])
            hits.append({
                "chunk_id": int(c),
                "doc_id": docs[global_index],
                "score": float(scores[0, j]),
                "text": self.tokenizer.decode(tokens[j, :m][mask[j, :m]]),
                "continuation": self.tokenizer.decode(tokens[j, m:][mask[j, m:]]),
            })
        return hits

    def _doc_ids(self) -> list[str]:
        if not hasattr(self, "_ids"):
            with open(self.path / "documents.jsonl", encoding="utf-8") as handle:
                self._ids = [json.loads(line)["id"] for line in handle]
        return self._ids

    def info(self) -> dict[str, Any]:
        sizes = {rel: v["size"] for rel, v in self.manifest["files"].items()}
        return {"path": str(self.path), "settings": self.manifest["settings"], "counts": self.manifest["counts"],
                "dedup": self.manifest["dedup"], "retriever": self.manifest["retriever"],
                "sources": self.manifest.get("sources", {}),
                "bytes_on_disk": sum(sizes.values()), "files": sizes}

    # ----------------------------------------------------------------------------- build
    @classmethod
    def build(
        cls,
        corpus: str,
        out: str | Path,
        *,
        retriever: str = "dense",
        chunk_size: int = 64,
        vocab_size: int = 8192,
        tokenizer: str | None = None,
        neighbors: int = 8,
        index: str | None = None,
        nprobe: int | None = None,
        split: tuple[int, int, int] = (98, 1, 1),
        seed: int = 0,
        near_dedup: bool = False,
        embed_batch_size: int = 64,
        embed_dtype: str = "fp32",
        text_field: str = "text",
        embedder: str | None = None,
        progress: bool = True,
    ) -> RetrievalDB:
        """Build (or resume building) the database for `corpus` in `out`, then open it."""
        if retriever not in ("dense", "bm25"):
            raise RetrolmError(f"--retriever {retriever!r}: choose dense or bm25")
        if chunk_size < 2 or neighbors < 1:
            raise RetrolmError("--chunk-size must be >= 2 and --neighbors >= 1")
        out = Path(out)
        settings = {
            "corpus": corpus, "retriever": retriever, "chunk_size": chunk_size, "vocab_size": vocab_size,
            "tokenizer": tokenizer, "neighbors": neighbors, "index": index, "nprobe": nprobe,
            "split": list(split), "seed": seed, "near_dedup": near_dedup, "embed_batch_size": embed_batch_size,
            "embed_dtype": embed_dtype, "text_field": text_field, "embedder": embedder,
        }
        t0 = time.time()
        if (out / MANIFEST).is_file() and (out / STATE).is_file() \
                and json.loads((out / STATE).read_text()).get("settings") == settings:
            return cls.open(out)
        state = _prepare_dir(out, settings)
        done = state["done"]

        def mark(stage: str, info: dict[str, Any]) -> None:
            done[stage] = info
            write_json(out / STATE, state)

        # 1. corpus → documents.jsonl (kept docs, split assignment)
        docs = None
        if "corpus" not in done:
            raw, stats = read_corpus(corpus, text_field)
            docs = dedup_exact(raw, stats)
            if near_dedup:
                docs = dedup_near(docs, stats)
            # db_only documents (facts only the database knows) always join the train stream
            splits = ["train" if d.db_only else split_of(d.doc_id, seed, tuple(split)) for d in docs]
            if "train" not in splits:
                raise RetrolmError("no document landed in the train split; add documents or change --split")
            with atomic_path(out / "documents.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as handle:
                for i, (d, s) in enumerate(zip(docs, splits, strict=False)):
                    handle.write(json.dumps({"index": i, "id": d.doc_id, "title": d.title, "split": s,
                                             "db_only": d.db_only}) + "\n")
            mark("corpus", {"read": stats.read, "exact_dups": stats.exact_dups, "near_dups": stats.near_dups,
                            "skipped_binary": stats.skipped_binary, "kept": len(docs), "sources": stats.sources})

        def load_docs():
            nonlocal docs
            if docs is None:
                raw, stats = read_corpus(corpus, text_field)
                docs = dedup_exact(raw, stats)
                if near_dedup:
                    docs = dedup_near(docs, stats)
                if len(docs) != done["corpus"]["kept"] or stats.sources != done["corpus"].get("sources", stats.sources):
                    raise RetrolmError(f"corpus {corpus!r} changed during the build; re-run with a fresh --out")
            return docs

        with open(out / "documents.jsonl", encoding="utf-8") as handle:
            meta = [json.loads(line) for line in handle]

        # 2. tokenizer
        if "tokenizer" not in done:
            if tokenizer:
                tok = Tokenizer.load(tokenizer)
            else:
                texts = [d.text for d, row in zip(load_docs(), meta, strict=False) if row["split"] == "train"]
                tok = Tokenizer.train_bpe(texts, vocab_size)
            tok.save(out / "tokenizer.json")
            mark("tokenizer", {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "pad_id": tok.pad_id})
        tok = Tokenizer.load(out / "tokenizer.json")
        dtype = token_dtype(tok.vocab_size)

        # 3. token streams per split (train: LM-trainable docs first, db_only docs after)
        if "streams" not in done:
            texts = load_docs()
            info = {}
            for s in SPLITS:
                rows = [r["index"] for r in meta if r["split"] == s and not r["db_only"]]
                lm_rows = len(rows)
                rows += [r["index"] for r in meta if r["split"] == s and r["db_only"]]
                encoded = tok.encode_batch([texts[i].text for i in rows]) if rows else []
                lengths = np.array([len(e) + 1 for e in encoded], dtype=np.int64)
                starts = np.cumsum(lengths) - lengths
                flat = np.fromiter(
                    (t for e in encoded for t in (*e, tok.eos_id)), dtype=dtype, count=int(lengths.sum())
                )
                (out / s).mkdir(exist_ok=True)
                with atomic_path(out / s / "tokens.bin") as tmp:
                    flat.tofile(tmp)
                _save_npy(out / s / "docs.npy", np.stack([starts, lengths], axis=1).reshape(-1, 2))
                _save_npy(out / s / "doc_index.npy", np.array(rows, dtype=np.int64))
                info[s] = {"docs": len(rows), "tokens": int(lengths.sum()),
                           "lm_tokens": int(lengths[:lm_rows].sum())}
            if info["train"]["tokens"] == 0:
                raise RetrolmError("the train split has no tokens; add documents to the corpus")
            mark("streams", info)
        streams = {s: TokenStream(out / s, dtype, chunk_size, tok) for s in SPLITS}

        # 4. chunk table
        if "chunks" not in done:
            table = make_chunks(streams["train"].docs, chunk_size)
            _save_npy(out / "train" / "chunks.npy", table)
            mark("chunks", {"chunks": len(table)})
        store = ChunkStore(streams["train"], np.load(out / "train" / "chunks.npy"), tok.pad_id)
        n = len(store)

        # 5. retriever
        ret = None
        if "retriever" not in done:
            if retriever == "dense":
                from retrolm.db.embed import Embedder, embed_to_file
                from retrolm.db.index import (
                    build_index,
                    choose_factory,
                    default_nprobe,
                    save_index,
                    set_nprobe,
                )
                from retrolm.db.retriever import DenseRetriever

                emb = Embedder(embedder, batch_size=embed_batch_size, dtype=embed_dtype)
                vectors = embed_to_file(emb, store.texts, n, out / "embeddings.f16", progress=progress)
                factory = index or choose_factory(n, emb.dim)
                idx = build_index(np.asarray(vectors, dtype=np.float32), factory, seed=seed)
                save_index(idx, out / "index.faiss")
                set_nprobe(idx, nprobe or default_nprobe(factory))
                ret = DenseRetriever(emb, idx)  # reuse the loaded encoder for the neighbour stage
                section = {"kind": "dense", "embedder": emb.name if embedder is None else embedder,
                           "dim": emb.dim, "index_factory": factory, "nprobe": nprobe}
            else:
                from retrolm.db.bm25 import BM25Retriever

                bm = BM25Retriever.build(store.texts(0, n))
                tmp_dir = out / ".bm25.tmp"
                shutil.rmtree(tmp_dir, ignore_errors=True)
                bm.save(tmp_dir)
                shutil.rmtree(out / "bm25", ignore_errors=True)
                tmp_dir.rename(out / "bm25")
                section = {"kind": "bm25", "embedder": None, "dim": None, "index_factory": None, "nprobe": None}
            mark("retriever", section)
        section = done["retriever"]

        # 6. neighbours for every query window of every split
        from retrolm.db.neighbors import compute_neighbors
        from retrolm.db.retriever import open_retriever

        for s in SPLITS:
            if f"neighbors:{s}" in done:
                continue
            if ret is None:
                ret = open_retriever(out, {"retriever": section, "settings": settings})
            stream = streams[s]
            qdocs = (lambda lo, hi, st=stream: [st.window_docs(w) for w in range(lo, hi)]) if s == "train" else None
            (out / "neighbors").mkdir(exist_ok=True)
            compute_neighbors(ret, stream.windows_text, stream.num_windows, qdocs, store.table[:, 2],
                              neighbors, out / "neighbors" / f"{s}.npy", progress=progress)
            mark(f"neighbors:{s}", {"windows": stream.num_windows})

        # 7. manifest, last
        files = {}
        for f in sorted(out.rglob("*")):
            rel = f.relative_to(out).as_posix()
            if f.is_file() and rel not in (STATE, MANIFEST) and not f.name.startswith(".") \
                    and not rel.endswith(".progress.json"):
                files[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
        counts = {s: {"docs": done["streams"][s]["docs"], "tokens": done["streams"][s]["tokens"],
                      "windows": streams[s].num_windows} for s in SPLITS}
        counts["train"]["chunks"] = n
        manifest = {
            "format_version": FORMAT_VERSION,
            "settings": settings,
            "splits": list(SPLITS),
            "counts": counts,
            "dedup": {k: done["corpus"][k] for k in ("read", "exact_dups", "near_dups", "skipped_binary", "kept")},
            "sources": done["corpus"].get("sources", {}),  # e.g. {package: version} of builtin:pkgdocs
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "token_dtype": dtype.name,
            "lm_train_tokens": done["streams"]["train"]["lm_tokens"],
            "retriever": section,
            "files": files,
            "versions": _versions(),
            "build_seconds": round(time.time() - t0, 2),
        }
        write_json(out / MANIFEST, manifest)
        return cls.open(out, verify=False)
