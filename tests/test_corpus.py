"""Corpus readers, de-duplication, split and built-in pydocs."""

from __future__ import annotations

import gzip
import json

import pytest

from retrolm.corpora.reader import ReadStats, dedup_exact, dedup_near, read_corpus, split_of
from retrolm.errors import RetrolmError


def test_text_dir_recursive_with_relative_ids(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "x" / "y" / "a.md").write_text("alpha text")
    (tmp_path / "b.txt").write_text("beta text")
    (tmp_path / "ignored.csv").write_text("gamma")
    docs, _ = read_corpus(str(tmp_path))
    assert [d.doc_id for d in docs] == ["b.txt", "x/y/a.md"]
    assert docs[1].text == "alpha text"


def test_jsonl_gz_custom_field_and_db_only(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    rows = [{"id": "d1", "body": "first", "title": "T"}, {"body": "second", "db_only": True}]
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(json.dumps(r) for r in rows) + "\n")
    docs, _ = read_corpus(str(path), text_field="body")
    assert [(d.doc_id, d.text, d.title, d.db_only) for d in docs] == [
        ("d1", "first", "T", False), ("c.jsonl.gz:2", "second", None, True)
    ]
    with pytest.raises(RetrolmError, match="--text-field"):
        read_corpus(str(path))


def test_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["p", "q"], "content": ["one doc", "two doc"]}), tmp_path / "c.parquet")
    docs, _ = read_corpus(str(tmp_path / "c.parquet"), text_field="content")
    assert [(d.doc_id, d.text) for d in docs] == [("p", "one doc"), ("q", "two doc")]


def test_bad_inputs(tmp_path):
    with pytest.raises(RetrolmError, match="no-such"):
        read_corpus(str(tmp_path / "no-such"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetrolmError, match="no readable document"):
        read_corpus(str(tmp_path / "empty"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.txt").write_bytes(b"abc\x00\x01def")
    with pytest.warns(UserWarning, match="binary"), pytest.raises(RetrolmError, match="no readable"):
        read_corpus(str(tmp_path / "bin"))
    with pytest.raises(RetrolmError, match="unknown built-in"):
        read_corpus("builtin:nope")


def test_a_builtin_corpus_that_fails_to_import_is_not_called_unknown(monkeypatch):
    import importlib

    def broken(name):  # the module exists but imports something missing
        raise ModuleNotFoundError("No module named 'missing_dep'", name="missing_dep")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="missing_dep"):
        read_corpus("builtin:pydocs")


def test_undecodable_bytes_replaced_and_warned(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.warns(UserWarning, match="undecodable"):
        docs, stats = read_corpus(str(tmp_path))
    assert docs[0].text == "caf\ufffd au lait" and stats.replaced_bytes_files == 1


def test_exact_and_near_dedup(tmp_path):
    from retrolm.corpora.reader import Document

    base = " ".join(f"word{i}" for i in range(200))
    docs = [Document("a", base), Document("b", "  " + base.upper() + "\n"), Document("c", base + " extra"),
            Document("d", "something else entirely " * 20)]
    stats = ReadStats()
    kept = dedup_exact(docs, stats)
    assert [d.doc_id for d in kept] == ["a", "c", "d"] and stats.exact_dups == 1
    kept = dedup_near(kept, stats)
    assert [d.doc_id for d in kept] == ["a", "d"] and stats.near_dups == 1


def test_split_is_deterministic_and_proportional():
    ids = [f"doc{i}" for i in range(20000)]
    first = [split_of(i, seed=3) for i in ids]
    assert first == [split_of(i, seed=3) for i in ids]
    assert first != [split_of(i, seed=4) for i in ids]
    frac = {s: first.count(s) / len(ids) for s in ("train", "valid", "test")}
    assert abs(frac["train"] - 0.98) < 0.005 and abs(frac["valid"] - 0.01) < 0.003
    assert {split_of(i, 0, (1, 1, 1)) for i in ids[:300]} == {"train", "valid", "test"}


def test_builtin_pydocs_documents_and_dedup():
    from retrolm.corpora import pydocs

    docs, stats = read_corpus("builtin:pydocs")
    assert len(docs) > 1000
    assert len({d.doc_id for d in docs}) == len(docs)
    assert any(d.doc_id == "pydocs:json" for d in docs)
    assert any(d.doc_id.startswith("pydocs-topic:") for d in docs)
    assert not any(d.doc_id.split(":")[1].startswith(("tkinter", "idlelib", "this", "antigravity")) for d in docs)
    kept = dedup_exact(docs, stats)
    assert stats.exact_dups > 0 and len(kept) == len(docs) - stats.exact_dups
    assert 0.8e6 < sum(len(d.text) for d in kept) < 3e6
    assert [d.doc_id for d in pydocs.documents()[:50]] == [d.doc_id for d in docs[:50]]
