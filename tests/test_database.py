"""RetrievalDB: leakage rules, manifest checks, resume and start-over behaviour."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from retrolm.db.database import RetrievalDB
from retrolm.errors import RetrolmError

SMALL = dict(retriever="bm25", chunk_size=16, vocab_size=512, neighbors=4, split=(80, 10, 10), seed=0,
             progress=False)


def _splits(db):
    with open(db.path / "documents.jsonl") as handle:
        return [json.loads(line)["split"] for line in handle]


@pytest.mark.parametrize("name", ["tiny_db", "tiny_bm25_db"])
def test_no_neighbour_shares_a_document_with_its_train_window(name, request):
    db = request.getfixturevalue(name)
    stream, m = db.streams["train"], db.chunk_size
    nb = np.asarray(db.neighbors["train"])  # (W, K)
    assert nb.shape == (stream.num_windows, 4) and nb.dtype == np.int32
    assert (nb >= 0).mean() > 0.9  # retrieval actually found neighbours
    for w in range(len(nb)):
        window = set(stream.doc_of(np.arange(w * m, min((w + 1) * m, len(stream)))).tolist())
        found = nb[w][nb[w] >= 0]
        assert not window & set(db.chunks.chunk_docs(found).tolist()), w
    for split in ("valid", "test"):
        assert db.neighbors[split].shape == (db.streams[split].num_windows, 4)


def test_valid_and_test_documents_never_enter_the_store(tiny_db):
    splits = _splits(tiny_db)
    assert {"valid", "test"} <= set(splits)
    store_docs = set(tiny_db.streams["train"].doc_index[np.unique(tiny_db.chunks.table[:, 2])].tolist())
    assert all(splits[i] == "train" for i in store_docs)
    for split in ("valid", "test"):
        held = set(tiny_db.streams[split].doc_index.tolist())
        assert held and not held & store_docs
        assert all(splits[i] == split for i in held)


def test_manifest_and_streams_are_consistent(tiny_db):
    mf = tiny_db.manifest
    assert mf["retriever"]["kind"] == "dense" and mf["retriever"]["index_factory"] == "Flat"
    assert mf["counts"]["train"]["chunks"] == len(tiny_db.chunks)
    assert mf["lm_train_tokens"] == len(tiny_db.streams["train"])  # no db_only documents here
    eos = tiny_db.tokenizer.eos_id
    for split in ("train", "valid", "test"):
        s = tiny_db.streams[split]
        ends = s.docs[:, 0] + s.docs[:, 1] - 1
        assert (np.asarray(s.tokens)[ends] == eos).all() and (np.asarray(s.tokens) == eos).sum() == len(s.docs)
        assert s.docs[:, 1].sum() == len(s) == mf["counts"][split]["tokens"]


def test_search_returns_chunks_with_continuation(tiny_db):
    docs = tiny_db.chunks.table[:, 2]
    target = int(np.flatnonzero(docs[1:] == docs[:-1])[5])  # a chunk with a continuation
    query = tiny_db.chunks.chunk_text([target])[0]
    hits = tiny_db.search(query, k=3)
    assert len(hits) == 3
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert hits[0]["text"] == query or hits[0]["score"] == pytest.approx(hits[1]["score"], abs=1e-4)
    top = next(h for h in hits if h["chunk_id"] == target)
    assert top["continuation"] == tiny_db.chunks.chunk_text([target + 1])[0]
    assert top["doc_id"].endswith(".txt")


def test_damaged_databases_are_refused(tiny_db_path, tmp_path):
    bad = tmp_path / "db"
    shutil.copytree(tiny_db_path, bad)
    RetrievalDB.open(bad)
    arr = bad / "neighbors" / "train.npy"
    data = arr.read_bytes()
    arr.write_bytes(data[:-8])
    with pytest.raises(RetrolmError, match="wrong size"):
        RetrievalDB.open(bad)
    arr.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(RetrolmError, match="sha256"):
        RetrievalDB.open(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(RetrolmError, match="incomplete.*retrolm db build"):
        RetrievalDB.open(bad)


def test_interrupted_build_resumes_to_the_same_database(tiny_corpus, tiny_bm25_db, tmp_path, monkeypatch):
    import retrolm.db.neighbors as nbmod
    import retrolm.tokenizer as tokmod

    real = nbmod.compute_neighbors
    calls = []

    def crash_on_valid(*args, **kwargs):
        calls.append(args[-1] if args else kwargs.get("out_path"))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(nbmod, "compute_neighbors", crash_on_valid)
    out = tmp_path / "db"
    with pytest.raises(KeyboardInterrupt):
        RetrievalDB.build(str(tiny_corpus), out, **SMALL)
    assert not (out / "manifest.json").exists()
    with pytest.raises(RetrolmError, match="incomplete"):
        RetrievalDB.open(out)

    monkeypatch.setattr(nbmod, "compute_neighbors", real)

    def no_retrain(*a, **k):
        raise AssertionError("tokenizer stage should have been reused")

    monkeypatch.setattr(tokmod.Tokenizer, "train_bpe", classmethod(no_retrain))
    db = RetrievalDB.build(str(tiny_corpus), out, **SMALL)
    for split in ("train", "valid", "test"):
        assert np.array_equal(db.neighbors[split], tiny_bm25_db.neighbors[split])
    assert np.array_equal(db.chunks.table, tiny_bm25_db.chunks.table)


def test_other_settings_need_overwrite_and_foreign_dirs_are_kept(tiny_corpus, tmp_path):
    out = tmp_path / "db"
    RetrievalDB.build(str(tiny_corpus), out, **SMALL)
    (out / "notes.txt").write_text("the user's own file")
    with pytest.raises(RetrolmError, match=r"other settings \(chunk_size 16 -> 8\).*--overwrite"):
        RetrievalDB.build(str(tiny_corpus), out, **{**SMALL, "chunk_size": 8})
    assert RetrievalDB.open(out).chunk_size == 16  # untouched
    db = RetrievalDB.build(str(tiny_corpus), out, overwrite=True, **{**SMALL, "chunk_size": 8})
    assert db.chunk_size == 8 and db.chunks.table[:, 1].max() == 8
    assert (out / "notes.txt").read_text() == "the user's own file"  # retrolm did not write it
    assert "notes.txt" not in db.manifest["files"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(RetrolmError, match="not a retrolm database"):
        RetrievalDB.build(str(tiny_corpus), foreign, **SMALL)
    assert (foreign / "precious.txt").exists()


def test_db_only_documents_follow_lm_documents(tmp_path):
    from conftest import synthetic_documents

    rows = [{"id": f"d{i}", "text": t, "db_only": i % 5 == 0} for i, t in enumerate(synthetic_documents(120))]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    db = RetrievalDB.build(str(path), tmp_path / "db", **SMALL)
    train = db.streams["train"]
    with open(db.path / "documents.jsonl") as handle:
        meta = [json.loads(line) for line in handle]
    flags = [meta[i]["db_only"] for i in train.doc_index]
    first_db_only = flags.index(True)
    assert not any(flags[:first_db_only]) and all(flags[first_db_only:])
    assert db.lm_train_tokens == train.docs[first_db_only, 0] < len(train)
    db_only_docs = set(np.flatnonzero(flags).tolist())
    assert db_only_docs <= set(db.chunks.table[:, 2].tolist())  # the database knows them
