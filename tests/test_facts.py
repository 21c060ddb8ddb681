import json
import re

import pytest

from retrolm.corpora import facts
from retrolm.evaluation.metrics import normalize_answer
from retrolm.qa.data import load_qa_jsonl

N = 120


def test_reproducible_per_seed_and_different_across_seeds():
    a = facts.raw_documents(seed=3, n_entities=N)
    b = facts.raw_documents(seed=3, n_entities=N)
    c = facts.raw_documents(seed=4, n_entities=N)
    assert a == b
    assert [d[1] for d in a] != [d[1] for d in c]
    assert facts.qa_pairs(seed=3, n_entities=N) == facts.qa_pairs(seed=3, n_entities=N)
    ids = [d[0] for d in a]
    assert len(set(ids)) == len(ids)
    assert len(set(d[1] for d in a)) == len(a)  # documents differ in wording


def test_every_answer_stated_in_two_docs_of_its_entity():
    docs = {d[0]: d for d in facts.raw_documents(seed=0, n_entities=N)}
    qa = facts.qa_pairs(seed=0, n_entities=N)
    assert len(qa) == 3 * N
    for q in qa:
        texts = [docs[i][1] for i in q["doc_ids"]]
        assert all(docs[i][2] == q["entity"] for i in q["doc_ids"])
        hits = sum(normalize_answer(q["answers"][0]) in normalize_answer(t) for t in texts)
        assert hits >= 2, q


def test_db_only_flags_and_split():
    ents = facts.entities(seed=0, n_entities=N)
    kinds = {e.kind for e in ents}
    assert kinds == {"person", "city", "org"}
    n_db = sum(e.db_only for e in ents)
    assert 0 < n_db < N
    by_entity = {e.index: e for e in ents}
    for doc_id, _, _, flag, idx in facts.raw_documents(seed=0, n_entities=N):
        assert flag == by_entity[idx].db_only, doc_id
    qa = facts.qa_pairs(seed=0, n_entities=N)
    assert {q["kind"] for q in qa} == {"db_only", "seen"}
    for q in qa:
        assert all(int(i.split("-")[2]) in by_entity for i in q["doc_ids"])
        idx = int(q["doc_ids"][0].split("-")[2])
        assert q["kind"] == ("db_only" if by_entity[idx].db_only else "seen")


def test_names_are_fictional_and_unique():
    ents = facts.entities(seed=0, n_entities=N)
    names = [e.name for e in ents]
    assert len(set(names)) == len(names)
    real = {"paris", "london", "berlin", "rome", "thames", "seine", "john", "mary", "smith"}
    for n in names:
        assert not (set(re.findall(r"[a-z]+", n.lower())) & real), n


def test_write_qa_jsonl_filters_kind(tmp_path):
    path = tmp_path / "qa.jsonl"
    n = facts.write_qa_jsonl(path, seed=0, n_entities=N, kind="db_only")
    items = load_qa_jsonl(path)
    assert len(items) == n > 0
    assert all(i.extra["kind"] == "db_only" for i in items)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["attribute"] in facts._QUESTIONS


def test_documents_as_corpus_documents():
    pytest.importorskip("retrolm.corpora.reader")
    docs = facts.documents(seed=0, n_entities=N)
    raw = facts.raw_documents(seed=0, n_entities=N)
    assert [d.doc_id for d in docs] == [r[0] for r in raw]
    assert [d.db_only for d in docs] == [r[3] for r in raw]
    assert all(d.title for d in docs)
