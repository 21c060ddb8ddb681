"""Building a retrieval database: the settings, the directory rules, and one function per step.

Steps, in order (each a stage recorded in `build_state.json` with the size and sha256 of
every file it wrote):

    corpus      read + de-duplicate the corpus once, assign splits -> documents.jsonl
    tokenizer   train a BPE on the train split (or load --tokenizer) -> tokenizer.json
    streams     one token stream per split -> {split}/tokens.bin, docs.npy, doc_index.npy
    chunks      m-token chunks of the train stream -> train/chunks.npy
    retriever   dense: embeddings.f16 + index.faiss; bm25: bm25/
    neighbors   neighbours of every query window, one stage per split -> neighbors/{split}.npy
    manifest    written last, from the recorded files -> manifest.json

A re-run with the same settings reuses a stage only when its files still match their
record; a stage whose files fail the check is redone, and so is every later stage unless
the redone files come out identical. The directory is recognised as a database only by
retrolm's own marker (`"format": "retrolm-database"` in build_state.json or
manifest.json), and only files retrolm recorded or names it writes are ever deleted.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from retrolm.atomic import atomic_path, read_json_object, sha256_file, write_json
from retrolm.corpora.reader import SPLITS, Document, dedup_exact, dedup_near, read_corpus, split_of
from retrolm.db.chunks import ChunkStore, TokenStream, make_chunks, token_dtype
from retrolm.errors import RetrolmError

FORMAT = "retrolm-database"
FORMAT_VERSION = 1
STATE = "build_state.json"
MANIFEST = "manifest.json"
# Scratch files a build writes besides the stage outputs (deleted with the build).
SCRATCH = ("embeddings.progress.json", ".bm25.tmp")
# A train document owning more than this share of the chunks gets a warning.
BIG_DOCUMENT_SHARE = 0.2


def parse_split(text: str) -> tuple[int, int, int]:
    """'98,1,1' -> (98, 1, 1): train/valid/test ratios from the command line."""
    try:
        parts = tuple(int(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(p < 0 for p in parts) or parts[0] <= 0:
        raise RetrolmError(f"--split {text!r}: give three non-negative integers like 98,1,1 (train > 0)")
    return parts  # type: ignore[return-value]


def _opt(default: Any, help: str, **more: Any) -> Any:  # noqa: A002 - mirrors typer's name
    return field(default=default, metadata={"help": help, **more})


@dataclass(frozen=True)
class BuildSettings:
    """Every `retrolm db build` setting, declared once: the CLI options and the manifest's
    `settings` come from these fields. Changing any of them makes a different database."""

    corpus: str = field(metadata={"help": "directory of .txt/.md, .jsonl(.gz), .parquet or builtin:NAME"})
    retriever: str = _opt("dense", "dense (MiniLM + FAISS) or bm25")
    chunk_size: int = _opt(64, "tokens per chunk and per query window (m)")
    vocab_size: int = _opt(8192, "BPE vocabulary size when the tokenizer is trained")
    tokenizer: str | None = _opt(None, "tokenizer.json or HF directory to use instead of training one")
    neighbors: int = _opt(8, "neighbours stored per query window (K)", option="neighbours", aliases=("neighbors",))
    index: str | None = _opt(None, "FAISS factory string (default: chosen by size)")
    nprobe: int | None = _opt(None, "IVF lists searched (default: chosen for recall@2 >= 0.95)")
    split: tuple[int, int, int] = _opt(
        (98, 1, 1), "train,valid,test ratios of the document split", parse=parse_split)
    seed: int = _opt(0, "seed of the document split and index training")
    near_dedup: bool = _opt(False, "also drop MinHash near-duplicates (Jaccard >= 0.8)")
    embed_batch_size: int = _opt(64, "texts per encoder batch")
    embed_dtype: str = _opt("fp32", "encoder precision: fp32 or bf16")
    text_field: str = _opt("text", "text field of .jsonl/.parquet corpora")
    embedder: str | None = _opt(None, "local HF encoder directory (default all-MiniLM-L6-v2)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "split", tuple(int(x) for x in self.split))
        if self.retriever not in ("dense", "bm25"):
            raise RetrolmError(f"--retriever {self.retriever!r}: choose dense or bm25")
        if self.chunk_size < 2 or self.neighbors < 1:
            raise RetrolmError("--chunk-size must be >= 2 and --neighbours >= 1")
        if len(self.split) != 3 or min(self.split) < 0 or self.split[0] <= 0:
            raise RetrolmError(f"--split {self.split}: give three non-negative integers like 98,1,1 (train > 0)")
        if self.embed_dtype not in ("fp32", "bf16"):
            raise RetrolmError(f"--embed-dtype {self.embed_dtype!r}: choose fp32 or bf16")
        if self.embed_batch_size < 1:
            raise RetrolmError("--embed-batch-size must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `settings` (JSON types: the split is a list)."""
        out = asdict(self)
        out["split"] = list(self.split)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# -------------------------------------------------------------------------- the directory


def _legacy(record: dict[str, Any] | None, *keys: str) -> bool:
    """A state/manifest written before the marker existed (retrolm's own shape)."""
    if not record or not isinstance(record.get("settings"), dict):
        return False
    return {"corpus", "chunk_size"} <= record["settings"].keys() and all(isinstance(record.get(k), dict) for k in keys)


def is_retrolm_database(state: dict[str, Any] | None, manifest: dict[str, Any] | None) -> bool:
    """Did retrolm write this directory? Only its own marker (or its legacy shape) says so."""
    if any(r is not None and r.get("format") == FORMAT for r in (state, manifest)):
        return True
    legacy_manifest = _legacy(manifest, "files", "counts") and manifest.get("format_version") == FORMAT_VERSION  # type: ignore[union-attr]
    return _legacy(state, "done") or legacy_manifest


STAGES = ("corpus", "tokenizer", "streams", "chunks", "retriever", *(f"neighbors:{s}" for s in SPLITS))


def stage_outputs(stage: str, retriever: str) -> list[str]:
    """Paths (relative to the database) that `stage` writes; a directory stands for its files."""
    if stage == "corpus":
        return ["documents.jsonl"]
    if stage == "tokenizer":
        return ["tokenizer.json"]
    if stage == "streams":
        return [f"{s}/{name}" for s in SPLITS for name in ("tokens.bin", "docs.npy", "doc_index.npy")]
    if stage == "chunks":
        return ["train/chunks.npy"]
    if stage == "retriever":
        return ["embeddings.f16", "index.faiss"] if retriever == "dense" else ["bm25"]
    if stage.startswith("neighbors:"):
        return [f"neighbors/{stage.split(':', 1)[1]}.npy"]
    raise ValueError(stage)


def own_names() -> set[str]:
    """Every path a build of either retriever may write: the only names deleted unrecorded."""
    return {rel for kind in ("dense", "bm25") for stage in STAGES for rel in stage_outputs(stage, kind)} | set(SCRATCH)


def _files_under(out: Path, rel: str) -> list[str]:
    path = out / rel
    if path.is_dir():
        return sorted(p.relative_to(out).as_posix() for p in path.rglob("*") if p.is_file())
    return [rel] if path.is_file() else []


def record_files(out: Path, rels: list[str]) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file under `rels`."""
    files = {}
    for rel in rels:
        for f in _files_under(out, rel):
            files[f] = {"size": (out / f).stat().st_size, "sha256": sha256_file(out / f)}
    return files


def first_mismatch(out: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """The first recorded file that is missing or differs in size or sha256 (None: all match)."""
    for rel, info in files.items():
        f = out / rel
        if not f.is_file() or f.stat().st_size != info["size"] or sha256_file(f) != info["sha256"]:
            return rel
    return None


def _remove(out: Path, rel: str) -> None:
    """Delete `rel` inside `out` (never outside it, whatever a record says) and its temp files."""
    path = out / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    # crash leftovers of atomic_path: ".<name>.<random>.tmp" beside the file
    for tmp in path.parent.glob(f".{path.name}.*.tmp") if path.parent.is_dir() else ():
        tmp.unlink()


def remove_build(out: Path, state: dict[str, Any] | None, manifest: dict[str, Any] | None) -> None:
    """Delete what retrolm wrote in `out` (recorded files and its own names), nothing else."""
    rels = own_names()
    for record in (state or {}).get("done", {}).values():
        if isinstance(record, dict):
            rels |= set(record.get("outputs", {}))
    rels |= set((manifest or {}).get("files", {}))
    for rel in sorted(rels, key=len, reverse=True):
        _remove(out, rel)
    for name in (MANIFEST, STATE):
        _remove(out, name)
    for sub in ("neighbors", *SPLITS):  # directories retrolm made, if now empty
        if (out / sub).is_dir() and not any((out / sub).iterdir()):
            (out / sub).rmdir()


def _settings_diff(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    if not old:
        return "unknown settings"
    keys = [k for k in new if old.get(k) != new[k]]
    return ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in keys[:3]) or "another format version"


def _new_state(out: Path, settings: BuildSettings) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, "settings": settings.to_dict(), "done": {}}
    write_json(out / STATE, state)
    return state


def prepare_directory(out: Path, settings: BuildSettings, overwrite: bool) -> dict[str, Any] | None:
    """The build state to continue from, or None when `out` already holds this database intact.

    Refuses a file, a non-empty directory retrolm did not write, and (without `overwrite`)
    a complete database built with other settings.
    """
    if out.exists() and not out.is_dir():
        raise RetrolmError(f"--out {str(out)!r} is a file; give a directory for the database")
    if not out.exists() or not any(out.iterdir()):
        return _new_state(out, settings)
    state, manifest = read_json_object(out / STATE), read_json_object(out / MANIFEST)
    if not is_retrolm_database(state, manifest):
        raise RetrolmError(f"{str(out)!r} is not empty and is not a retrolm database; choose an empty or new --out")
    wanted = settings.to_dict()
    same_format = (manifest or state or {}).get("format_version", FORMAT_VERSION) == FORMAT_VERSION
    old = (manifest or state or {}).get("settings")
    if old == wanted and same_format:
        if manifest is not None:
            from retrolm.db.database import RetrievalDB

            try:
                RetrievalDB.open(out, verify=True)
                return None
            except RetrolmError as err:
                warnings.warn(f"repairing the database: {err}".split(";")[0], stacklevel=3)
        (out / MANIFEST).unlink(missing_ok=True)  # incomplete until every stage checks out
        if state is not None and state.get("settings") == wanted and isinstance(state.get("done"), dict):
            state.update(format=FORMAT, format_version=FORMAT_VERSION)
            return state
        return _new_state(out, settings)
    complete = (out / MANIFEST).exists()
    if complete and not overwrite:
        raise RetrolmError(f"{str(out)!r} holds a database built with other settings ({_settings_diff(old, wanted)}); "
                           "pass --overwrite to replace it, or choose another --out")
    if not complete:
        warnings.warn(f"discarding the unfinished build in {out} ({_settings_diff(old, wanted)})", stacklevel=3)
    remove_build(out, state, manifest)
    return _new_state(out, settings)


# ------------------------------------------------------------------------------ the steps


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def read_documents(settings: BuildSettings) -> tuple[list[Document], dict[str, Any]]:
    """Read and de-duplicate the corpus (exact, then optionally near), with the counts."""
    raw, stats = read_corpus(settings.corpus, settings.text_field)
    docs = dedup_exact(raw, stats)
    if settings.near_dedup:
        docs = dedup_near(docs, stats)
    info = {"read": stats.read, "exact_dups": stats.exact_dups, "near_dups": stats.near_dups,
            "skipped_binary": stats.skipped_binary, "kept": len(docs), "sources": stats.sources}
    return docs, info


def assign_splits(docs: list[Document], settings: BuildSettings) -> list[str]:
    """Split of each document by its id; db_only documents always join the train split."""
    splits = ["train" if d.db_only else split_of(d.doc_id, settings.seed, settings.split) for d in docs]
    if "train" not in splits:
        raise RetrolmError("no document landed in the train split; add documents or change --split")
    return splits


class Build:
    """One run of the build: where it writes, its settings and state, and what earlier
    steps left in memory (each loaded at most once)."""

    def __init__(self, out: Path, settings: BuildSettings, state: dict[str, Any], progress: bool) -> None:
        self.out = out
        self.settings = settings
        self.state = state
        self.progress = progress
        self.retriever: Any = None  # the dense retriever step hands its loaded encoder on

    @property
    def done(self) -> dict[str, Any]:
        return self.state["done"]

    @cached_property
    def documents(self) -> list[Document]:
        """The de-duplicated corpus, read once per run (checked against the corpus record)."""
        docs, info = read_documents(self.settings)
        self._corpus_info = info
        recorded = self.done.get("corpus")
        if recorded and (recorded["kept"] != info["kept"] or recorded.get("sources", {}) != info["sources"]):
            raise RetrolmError(f"corpus {self.settings.corpus!r} changed during the build; re-run with a fresh --out")
        return docs

    @cached_property
    def meta(self) -> list[dict[str, Any]]:
        with open(self.out / "documents.jsonl", encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]

    @cached_property
    def tokenizer(self) -> Any:
        from retrolm.tokenizer import Tokenizer

        return Tokenizer.load(self.out / "tokenizer.json")

    @cached_property
    def streams(self) -> dict[str, TokenStream]:
        dtype = token_dtype(self.tokenizer.vocab_size)
        return {s: TokenStream(self.out / s, dtype, self.settings.chunk_size, self.tokenizer) for s in SPLITS}

    @cached_property
    def store(self) -> ChunkStore:
        table = np.load(self.out / "train" / "chunks.npy", allow_pickle=False)
        return ChunkStore(self.streams["train"], table, self.tokenizer.pad_id)

    def forget(self, stage: str) -> None:
        """Drop what memory holds from `stage`'s files once they have been rewritten."""
        names = {"corpus": ("meta",), "tokenizer": ("tokenizer", "streams", "store"), "streams": ("streams", "store"),
                 "chunks": ("store",)}.get(stage, ())
        for name in names:
            self.__dict__.pop(name, None)


def step_corpus(b: Build) -> dict[str, Any]:
    docs = b.documents
    splits = assign_splits(docs, b.settings)
    with atomic_path(b.out / "documents.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for i, (d, s) in enumerate(zip(docs, splits, strict=True)):
            handle.write(json.dumps({"index": i, "id": d.doc_id, "title": d.title, "split": s,
                                     "db_only": d.db_only}) + "\n")
    return {**b._corpus_info, "split_docs": {s: splits.count(s) for s in SPLITS}}


def step_tokenizer(b: Build) -> dict[str, Any]:
    from retrolm.tokenizer import Tokenizer

    if b.settings.tokenizer:
        tok = Tokenizer.load(b.settings.tokenizer)
    else:
        texts = [d.text for d, row in zip(b.documents, b.meta, strict=True) if row["split"] == "train"]
        tok = Tokenizer.train_bpe(texts, b.settings.vocab_size)
    tok.save(b.out / "tokenizer.json")
    return {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "pad_id": tok.pad_id}


def step_streams(b: Build) -> dict[str, Any]:
    """Token stream per split: LM-trainable documents first, db_only documents after."""
    tok, texts = b.tokenizer, b.documents
    dtype = token_dtype(tok.vocab_size)
    info = {}
    for s in SPLITS:
        rows = [r["index"] for r in b.meta if r["split"] == s and not r["db_only"]]
        lm_rows = len(rows)
        rows += [r["index"] for r in b.meta if r["split"] == s and r["db_only"]]
        encoded = tok.encode_batch([texts[i].text for i in rows]) if rows else []
        lengths = np.array([len(e) + 1 for e in encoded], dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        flat = np.fromiter((t for e in encoded for t in (*e, tok.eos_id)), dtype=dtype, count=int(lengths.sum()))
        (b.out / s).mkdir(exist_ok=True)
        with atomic_path(b.out / s / "tokens.bin") as tmp:
            flat.tofile(tmp)
        _save_npy(b.out / s / "docs.npy", np.stack([starts, lengths], axis=1).reshape(-1, 2))
        _save_npy(b.out / s / "doc_index.npy", np.array(rows, dtype=np.int64))
        info[s] = {"docs": len(rows), "tokens": int(lengths.sum()), "lm_tokens": int(lengths[:lm_rows].sum())}
    if info["train"]["tokens"] == 0:
        raise RetrolmError("the train split has no tokens; add documents to the corpus")
    return info


def step_chunks(b: Build) -> dict[str, Any]:
    table = make_chunks(b.streams["train"].docs, b.settings.chunk_size)
    _save_npy(b.out / "train" / "chunks.npy", table)
    return {"chunks": len(table)}


def step_retriever(b: Build) -> dict[str, Any]:
    """Dense: embed every chunk (resumable block by block) and index them; or BM25."""
    st, store = b.settings, b.store
    n = len(store)
    if st.retriever == "bm25":
        from retrolm.db.bm25 import BM25Retriever

        bm = BM25Retriever.build(store.texts(0, n))
        tmp_dir = b.out / ".bm25.tmp"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        bm.save(tmp_dir)
        shutil.rmtree(b.out / "bm25", ignore_errors=True)
        tmp_dir.rename(b.out / "bm25")
        b.retriever = bm
        return {"kind": "bm25", "embedder": None, "dim": None, "index_factory": None, "nprobe": None}
    from retrolm.db.embed import Embedder, embed_to_file
    from retrolm.db.index import build_index, choose_factory, default_nprobe, save_index, set_nprobe
    from retrolm.db.retriever import DenseRetriever

    emb = Embedder(st.embedder, batch_size=st.embed_batch_size, dtype=st.embed_dtype)
    vectors = embed_to_file(emb, store.texts, n, b.out / "embeddings.f16", progress=b.progress)
    factory = st.index or choose_factory(n, emb.dim)
    idx = build_index(np.asarray(vectors, dtype=np.float32), factory, seed=st.seed)
    save_index(idx, b.out / "index.faiss")
    set_nprobe(idx, st.nprobe or default_nprobe(factory))
    b.retriever = DenseRetriever(emb, idx)  # the neighbour steps reuse the loaded encoder
    return {"kind": "dense", "embedder": emb.name if st.embedder is None else st.embedder,
            "dim": emb.dim, "index_factory": factory, "nprobe": st.nprobe}


def step_neighbors(b: Build, split: str) -> dict[str, Any]:
    """Neighbours of every query window of `split`; train windows skip their own documents."""
    from retrolm.db.neighbors import compute_neighbors
    from retrolm.db.retriever import open_retriever

    if b.retriever is None:
        b.retriever = open_retriever(b.out, {"retriever": b.done["retriever"], "settings": b.settings.to_dict()})
    stream = b.streams[split]
    qdocs = (lambda lo, hi: [stream.window_docs(w) for w in range(lo, hi)]) if split == "train" else None
    (b.out / "neighbors").mkdir(exist_ok=True)
    compute_neighbors(b.retriever, stream.windows_text, stream.num_windows, qdocs, b.store.table[:, 2],
                      b.settings.neighbors, b.out / "neighbors" / f"{split}.npy", progress=b.progress)
    return {"windows": stream.num_windows}


def steps() -> list[tuple[str, Callable[[Build], dict[str, Any]]]]:
    """The stages in build order, each with its step function."""
    out: list[tuple[str, Callable[[Build], dict[str, Any]]]] = [
        ("corpus", step_corpus), ("tokenizer", step_tokenizer), ("streams", step_streams),
        ("chunks", step_chunks), ("retriever", step_retriever)]
    out += [(f"neighbors:{s}", lambda b, s=s: step_neighbors(b, s)) for s in SPLITS]
    return out


def run_stage(b: Build, stage: str, step: Callable[[Build], dict[str, Any]], upstream_changed: bool) -> bool:
    """Reuse `stage` if its files check out and nothing before it changed, else (re)do it.

    Returns whether this stage's files differ from what later stages were built on.
    """
    record = b.done.get(stage)
    if record is not None and not upstream_changed and "outputs" in record:
        bad = first_mismatch(b.out, record["outputs"])
        if bad is None:
            return False
        warnings.warn(f"{bad} is missing or differs from what the build wrote; redoing the {stage} stage",
                      stacklevel=3)
    rels = stage_outputs(stage, b.settings.retriever)
    if record is not None or upstream_changed:
        # Damaged or built on other inputs: never resume from it (the embedding sidecar too).
        b.done.pop(stage, None)
        write_json(b.out / STATE, b.state)
        for rel in (*rels, *(SCRATCH if stage == "retriever" else ())):
            _remove(b.out, rel)
    info = step(b)
    b.forget(stage)
    info["outputs"] = record_files(b.out, rels)
    b.done[stage] = info
    write_json(b.out / STATE, b.state)
    return upstream_changed or record is None or record.get("outputs") != info["outputs"]


def warn_about(b: Build) -> None:
    """Say what will surprise later: nothing to evaluate, one document owning the database."""
    counts = b.done["corpus"].get("split_docs")
    if counts and not counts["valid"] and not counts["test"]:
        warnings.warn(f"--split {','.join(map(str, b.settings.split))} left no document in valid or test: "
                      "`retrolm eval` will have nothing to evaluate", stacklevel=3)
    chunk_doc = b.store.table[:, 2]
    owned = np.bincount(chunk_doc)
    if len(owned) >= 10:  # among a handful of documents, a big share is no anomaly
        big = int(owned.argmax())
        if owned[big] > BIG_DOCUMENT_SHARE * len(chunk_doc):
            doc_id = b.meta[int(b.streams["train"].doc_index[big])]["id"]
            warnings.warn(f"document {doc_id!r} holds {owned[big] / len(chunk_doc):.0%} of the database chunks: "
                          "its windows may not retrieve from it (same-document exclusion), so their neighbours "
                          "come from the rest only; split it into several documents if its parts are independent",
                          stacklevel=3)


def versions() -> dict[str, str]:
    import contextlib
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("retrolm", "numpy", "tokenizers", "faiss-cpu", "torch", "transformers", "bm25s"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def write_manifest(b: Build, seconds: float) -> None:
    """manifest.json, last: settings, counts, the recorded size + sha256 of every file."""
    done = b.done
    files = {}
    for stage in STAGES:
        files.update(done[stage]["outputs"])
    counts = {s: {"docs": done["streams"][s]["docs"], "tokens": done["streams"][s]["tokens"],
                  "windows": b.streams[s].num_windows} for s in SPLITS}
    counts["train"]["chunks"] = done["chunks"]["chunks"]
    tok = done["tokenizer"]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": b.settings.to_dict(),
        "splits": list(SPLITS),
        "counts": counts,
        "dedup": {k: done["corpus"][k] for k in ("read", "exact_dups", "near_dups", "skipped_binary", "kept")},
        "sources": done["corpus"].get("sources", {}),  # e.g. {package: version} of builtin:pkgdocs
        "vocab_size": tok["vocab_size"],
        "eos_id": tok["eos_id"],
        "pad_id": tok["pad_id"],
        "token_dtype": token_dtype(tok["vocab_size"]).name,
        "lm_train_tokens": done["streams"]["train"]["lm_tokens"],
        "retriever": {k: v for k, v in done["retriever"].items() if k != "outputs"},
        "files": dict(sorted(files.items())),
        "versions": versions(),
        "build_seconds": round(seconds, 2),
    }
    write_json(b.out / MANIFEST, manifest)


def build_database(settings: BuildSettings, out: str | Path, *, overwrite: bool = False,
                   progress: bool = True) -> bool:
    """Build, resume or repair the database for `settings` in `out`.

    Returns False when `out` already held this database intact (nothing was done).
    """
    out = Path(out)
    t0 = time.time()
    state = prepare_directory(out, settings, overwrite)
    if state is None:
        return False
    b = Build(out, settings, state, progress)
    changed = before_neighbors = False
    for stage, step in steps():
        if stage.startswith("neighbors:"):  # each split's neighbours depend on the stages before, not on each other
            run_stage(b, stage, step, before_neighbors)
        else:
            changed = before_neighbors = run_stage(b, stage, step, changed)
    warn_about(b)
    write_manifest(b, time.time() - t0)
    return True
