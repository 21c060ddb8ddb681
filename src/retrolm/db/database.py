"""`RetrievalDB`: open a database directory, check it, search it; building is in `build.py`.

`manifest.json` is written last, so a directory without it is never mistaken for a
complete database; every file it lists must have its recorded size (and sha256 unless
`verify=False`) before anything reads it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from retrolm.atomic import sha256_file
from retrolm.db.build import FORMAT_VERSION, MANIFEST, STATE, BuildSettings, build_database
from retrolm.db.chunks import ChunkStore, TokenStream
from retrolm.errors import RetrolmError
from retrolm.tokenizer import Tokenizer

__all__ = ["FORMAT_VERSION", "MANIFEST", "STATE", "BuildSettings", "RetrievalDB", "read_manifest"]
MANIFEST_KEYS = ("format_version", "settings", "files", "counts", "splits", "token_dtype", "vocab_size",
                 "lm_train_tokens", "retriever")


def _rebuild_hint(path: Path) -> str:
    return f"rebuild it with the same `retrolm db build` command (--out {path}): it redoes only what is damaged"


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of database `path`; a missing, unreadable or malformed one is a one-line error."""
    path = Path(path)
    if not path.is_dir():
        raise RetrolmError(f"database {str(path)!r} does not exist; build it with `retrolm db build`")
    mf = path / MANIFEST
    if not mf.is_file():
        raise RetrolmError(
            f"{str(path)!r} has no manifest.json: the build is incomplete; re-run `retrolm db build` with --out {path}"
        )
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RetrolmError(f"{mf} is not valid JSON ({type(err).__name__}); {_rebuild_hint(path)}") from None
    missing = [k for k in MANIFEST_KEYS if k not in manifest] if isinstance(manifest, dict) else list(MANIFEST_KEYS)
    if missing:
        raise RetrolmError(f"{mf} is not a retrolm manifest (no {missing[0]!r}); {_rebuild_hint(path)}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RetrolmError(f"{str(path)!r} has database format {manifest.get('format_version')}, "
                           f"this retrolm reads {FORMAT_VERSION}; rebuild it")
    return manifest


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
        """Open a complete database; refuse missing or malformed manifests and size/sha256 mismatches."""
        path = Path(path)
        manifest = read_manifest(path)
        for rel, info in manifest["files"].items():
            f = path / rel
            if not f.is_file() or f.stat().st_size != info["size"]:
                raise RetrolmError(f"{str(path)!r}: {rel} is missing or has the wrong size (truncated?); "
                                   f"{_rebuild_hint(path)}")
            if verify and sha256_file(f) != info["sha256"]:
                raise RetrolmError(f"{str(path)!r}: {rel} fails its sha256 check; {_rebuild_hint(path)}")
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
        settings: BuildSettings | str,
        out: str | Path,
        *,
        overwrite: bool = False,
        progress: bool = True,
        **options: Any,
    ) -> RetrievalDB:
        """Build, resume or repair the database in `out`, then open it.

        `settings` is a `BuildSettings`, or the corpus spec with the other settings as
        keyword arguments (`RetrievalDB.build("builtin:pydocs", out, chunk_size=32)`).
        A complete database built with other settings is replaced only with `overwrite`.
        """
        if not isinstance(settings, BuildSettings):
            settings = BuildSettings(corpus=settings, **options)
        elif options:
            settings = replace(settings, **options)
        build_database(settings, out, overwrite=overwrite, progress=progress)
        return cls.open(out, verify=False)  # the build has just checked every sha256
