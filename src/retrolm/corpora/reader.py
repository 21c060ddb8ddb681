"""Corpus readers, de-duplication and the deterministic train/valid/test split.

A corpus spec is a directory of .txt/.md files, a .jsonl(.gz) file, a .parquet file or
`builtin:NAME`. Every document gets a stable id so the split (a hash of the id) never
moves between runs or machines. A built-in corpus module exposes `documents()` and, when
its content depends on what is installed, `sources() -> {name: version}`, which the
database build records in manifest.json.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from retrolm.errors import RetrolmError

SPLITS: tuple[str, ...] = ("train", "valid", "test")
TEXT_SUFFIXES = (".txt", ".md")
BUILTINS_HINT = "try builtin:pydocs, builtin:pkgdocs or builtin:facts"


@dataclass(frozen=True)
class Document:
    """One corpus document; `db_only` documents feed the database but never LM training."""

    doc_id: str
    text: str
    title: str | None = None
    db_only: bool = False


@dataclass
class ReadStats:
    """What reading and de-duplication did, for the build summary."""

    read: int = 0
    skipped_binary: int = 0
    replaced_bytes_files: int = 0
    exact_dups: int = 0
    near_dups: int = 0
    skipped_files: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # what a built-in corpus was read from


def _decode(raw: bytes, name: str, stats: ReadStats) -> str | None:
    if b"\x00" in raw:
        stats.skipped_binary += 1
        stats.skipped_files.append(name)
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.replaced_bytes_files += 1
        return raw.decode("utf-8", errors="replace")


def read_text_dir(root: Path, stats: ReadStats) -> list[Document]:
    """Every .txt/.md file under `root` (sorted), id = path relative to `root`."""
    docs = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix.lower() not in TEXT_SUFFIXES:
            continue
        rel = path.relative_to(root).as_posix()
        text = _decode(path.read_bytes(), rel, stats)
        if text is not None and text.strip():
            docs.append(Document(rel, text, title=path.stem))
    return docs


def read_jsonl(path: Path, text_field: str, stats: ReadStats) -> list[Document]:
    """One JSON object per line with `text_field`; optional `id`, `title`, `db_only`."""
    opener = gzip.open if path.name.endswith(".gz") else open
    docs = []
    with opener(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            line = _decode(raw, f"{path}:{lineno}", stats)
            if line is None:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise RetrolmError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or remove that line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise RetrolmError(
                    f"{path}:{lineno}: no string field {text_field!r}; pass --text-field to name the text field"
                )
            if obj[text_field].strip():
                doc_id = str(obj.get("id", f"{path.name}:{lineno}"))
                docs.append(Document(doc_id, obj[text_field], obj.get("title"), bool(obj.get("db_only", False))))
    return docs


def read_parquet(path: Path, text_field: str) -> list[Document]:
    """Rows of a parquet file; text from column `text_field`, optional `id`/`title`."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise RetrolmError(f"{path}: no column {text_field!r} (columns: {table.column_names}); pass --text-field")
    texts = table.column(text_field).to_pylist()
    ids = table.column("id").to_pylist() if "id" in table.column_names else None
    titles = table.column("title").to_pylist() if "title" in table.column_names else None
    docs = []
    for i, text in enumerate(texts):
        if isinstance(text, str) and text.strip():
            doc_id = str(ids[i]) if ids else f"{path.name}:{i}"
            docs.append(Document(doc_id, text, titles[i] if titles else None))
    return docs


def read_corpus(spec: str, text_field: str = "text") -> tuple[list[Document], ReadStats]:
    """Read the documents named by `spec` (path or builtin:NAME), before de-duplication."""
    stats = ReadStats()
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise RetrolmError(f"unknown built-in corpus {spec!r}; {BUILTINS_HINT}")
        try:
            module = importlib.import_module(f"retrolm.corpora.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"retrolm.corpora.{name}":  # a real bug inside that module: show it
                raise
            raise RetrolmError(f"unknown built-in corpus {spec!r}; {BUILTINS_HINT}") from None
        docs = list(module.documents())
        if hasattr(module, "sources"):
            stats.sources = {str(k): str(v) for k, v in module.sources().items()}
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise RetrolmError(f"corpus path {str(path)!r} does not exist; pass a directory, .jsonl(.gz) or .parquet")
        if path.is_dir():
            docs = read_text_dir(path, stats)
        elif path.name.endswith((".jsonl", ".jsonl.gz")):
            docs = read_jsonl(path, text_field, stats)
        elif path.suffix == ".parquet":
            docs = read_parquet(path, text_field)
        elif path.suffix.lower() in TEXT_SUFFIXES:
            text = _decode(path.read_bytes(), path.name, stats)
            docs = [Document(path.name, text, path.stem)] if text and text.strip() else []
        else:
            raise RetrolmError(f"{str(path)!r}: unsupported corpus file; use a directory, .jsonl(.gz) or .parquet")
    if stats.skipped_binary:
        warnings.warn(f"skipped {stats.skipped_binary} binary file(s): {stats.skipped_files[:5]}", stacklevel=2)
    if stats.replaced_bytes_files:
        warnings.warn(
            f"{stats.replaced_bytes_files} file(s) had undecodable bytes, replaced with U+FFFD", stacklevel=2
        )
    if not docs:
        raise RetrolmError(f"corpus {spec!r} has no readable document; point --corpus at non-empty text files")
    stats.read = len(docs)
    return docs, stats


def normalise(text: str) -> str:
    """Text used to detect exact duplicates: case-folded, whitespace collapsed."""
    return " ".join(text.split()).casefold()


def dedup_exact(docs: list[Document], stats: ReadStats) -> list[Document]:
    """Keep the first document of every normalised text; duplicate ids are made unique."""
    seen: set[str] = set()
    ids: set[str] = set()
    kept = []
    for doc in docs:
        key = hashlib.sha1(normalise(doc.text).encode("utf-8")).hexdigest()
        if key in seen:
            stats.exact_dups += 1
            continue
        seen.add(key)
        doc_id = doc.doc_id
        n = 1
        while doc_id in ids:
            n += 1
            doc_id = f"{doc.doc_id}#{n}"
        ids.add(doc_id)
        kept.append(doc if doc_id == doc.doc_id else Document(doc_id, doc.text, doc.title, doc.db_only))
    return kept


def dedup_near(docs: list[Document], stats: ReadStats, threshold: float = 0.8, ngram: int = 13) -> list[Document]:
    """Drop documents whose word 13-gram MinHash Jaccard with an earlier one is >= threshold."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    kept = []
    for i, doc in enumerate(docs):
        words = normalise(doc.text).split()
        grams = {" ".join(words[j : j + ngram]) for j in range(max(1, len(words) - ngram + 1))}
        mh = MinHash(num_perm=128, seed=1)
        for g in grams:
            mh.update(g.encode("utf-8"))
        if lsh.query(mh):
            stats.near_dups += 1
            continue
        lsh.insert(str(i), mh)
        kept.append(doc)
    return kept


def split_of(doc_id: str, seed: int = 0, ratios: tuple[int, ...] = (98, 1, 1)) -> str:
    """Deterministic split of a document by a sha256 of (seed, id)."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0 or ratios[0] <= 0:
        raise RetrolmError(f"bad split ratios {ratios}; give three non-negative numbers like 98,1,1")
    h = int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big")
    point = (h / 2**64) * sum(ratios)
    if point < ratios[0]:
        return "train"
    if point < ratios[0] + ratios[1]:
        return "valid"
    return "test"
