"""QA: passages, the five modes' inputs, greedy answers == full-forward argmax, answer-only
fine-tuning, EM/F1 per kind, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from retrolm.errors import RetrolmError

M = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _env():
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}
N_ENTITIES = 40


@pytest.fixture(scope="module")
def facts_db(tmp_path_factory):
    """A BM25 database over a 40-entity builtin:facts world (m = 16)."""
    from retrolm.corpora import facts
    from retrolm.db.database import RetrievalDB

    root = tmp_path_factory.mktemp("facts")
    corpus = root / "facts.jsonl"
    rows = facts.raw_documents(0, n_entities=N_ENTITIES)
    corpus.write_text("\n".join(
        json.dumps({"id": d, "text": text, "title": title, "db_only": flag})
        for d, text, title, flag, _ in rows
    ) + "\n", encoding="utf-8")  # fmt: skip
    return RetrievalDB.build(str(corpus), root / "db", retriever="bm25", chunk_size=M, vocab_size=400,
                             neighbors=2, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    from retrolm.corpora.facts import write_qa_jsonl

    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    write_qa_jsonl(path, n_entities=N_ENTITIES)
    return path


@pytest.fixture(scope="module")
def items(qa_file):
    from retrolm.qa.data import load_qa_jsonl

    return load_qa_jsonl(qa_file)


def _model(db, cca=True, seed=0, n_layers=2):
    from retrolm.model.config import RetroConfig
    from retrolm.model.retro import Retro

    torch.manual_seed(seed)
    config = RetroConfig.from_name("tiny", vocab_size=db.vocab_size, chunk_size=M, n_layers=n_layers,
                                   cca_layers=[2] if cca else [], max_seq_len=256)  # fmt: skip
    return Retro(config).eval()


def _source(db, model, k=3):
    from retrolm.qa.pipeline import PassageSource

    return PassageSource(db, db.tokenizer, k, model.config.neighbor_len, db.tokenizer.pad_id)


def test_retrieved_passages_come_from_the_entity(facts_db, items):
    source = _source(facts_db, _model(facts_db), k=3)
    hits = [bool({p.doc_id for p in source.for_item(it)} & set(it.extra["doc_ids"])) for it in items[:60]]
    assert np.mean(hits) > 0.8
    ev = source.for_item(items[0])[0]
    assert ev.tokens.shape == (2 * M,) and ev.mask.any() and ev.title


def test_mode_inputs(facts_db, items):
    from retrolm.qa.pipeline import Evidence, build_example

    tok = facts_db.tokenizer
    r = 2 * M
    ps = [Evidence(f"T{i}", f"passage number {i}.", np.full(r, i, dtype=np.int64),
                   np.arange(r) < 5 + i) for i in range(1, 5)]  # fmt: skip
    q = items[0].question
    closed = build_example("closed-book", q, ps, tok, M)
    assert tok.decode(closed.prompt_ids) == f"question: {q}\n answer:" and closed.neighbours is None
    rag = tok.decode(build_example("rag", q, ps, tok, M, reorder=True).prompt_ids)
    order = [rag.index(f"title: T{i}") for i in (1, 3, 4, 2)]  # strongest first and last
    assert order == sorted(order) and rag.endswith(f"question: {q}\n answer:")
    retro = build_example("retro", q, ps, tok, M)
    assert len(retro.prompt_ids) % M == 0
    pad = len(retro.prompt_ids) - len(closed.prompt_ids)
    assert retro.prompt_ids[:pad] == [tok.eos_id] * pad and retro.prompt_ids[pad:] == closed.prompt_ids
    assert retro.neighbours.tolist() == [p.tokens.tolist() for p in ps]
    pp = build_example("retro++", q, ps, tok, M)
    text = tok.decode(pp.prompt_ids)
    assert text.startswith("title: T1, source: passage number 1.\n question: ")
    assert text.endswith(" answer:") and len(pp.prompt_ids) % M == 0
    assert pp.neighbours.tolist() == [p.tokens.tolist() for p in ps[1:]]
    with pytest.raises(RetrolmError, match="mode"):
        build_example("bogus", q, ps, tok, M)


def _layout(ex, length):
    """Neighbours (1, l, k, r) for `length` tokens: the passages on every chunk from the
    last prompt chunk on (what generation's retrieve callback and training both do)."""
    n_chunks = -(-length // M)
    k = ex.neighbours.shape[0]
    nb = torch.zeros(1, n_chunks, k, 2 * M, dtype=torch.int64)
    mask = torch.zeros(1, n_chunks, k, 2 * M, dtype=torch.bool)
    first = len(ex.prompt_ids) // M - 1
    nb[0, first:] = torch.from_numpy(ex.neighbours)
    mask[0, first:] = torch.from_numpy(ex.neighbour_mask)
    return nb, mask


def _full_forward_greedy(model, ex, n):
    """Greedy decoding by re-running the whole forward pass each token."""
    ids = list(ex.prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), *_layout(ex, len(ids)))[0]
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(ex.prompt_ids) :]


def test_retro_answers_equal_full_forward_argmax(facts_db, items):
    from retrolm.qa.pipeline import answer_examples, build_example

    model = _model(facts_db, seed=4)
    for block in model.blocks:
        if block.cca is not None:
            torch.nn.init.normal_(block.cca.out.weight, std=0.5)  # make the passages matter
    source = _source(facts_db, model, k=2)
    tok = facts_db.tokenizer
    exs = [build_example(mode, it.question, source.for_item(it), tok, M)
           for mode in ("retro", "retro++") for it in items[:3]]  # fmt: skip
    got = answer_examples(model, tok, exs, max_new_tokens=6)
    for ex, answer in zip(exs, got, strict=True):
        ids = _full_forward_greedy(model, ex, 6)
        text = tok.decode(ids)
        assert answer == text.split("\n")[0].strip()
    # the passages reach exactly the positions from the last prompt token on
    ex = exs[0]
    with torch.no_grad():
        tokens = torch.tensor([ex.prompt_ids])
        with_p = model(tokens, *_layout(ex, len(ex.prompt_ids)))[0]
        without = model(tokens)[0]
    assert torch.equal(with_p[0, :-1], without[0, :-1])
    assert not torch.allclose(with_p[0, -1], without[0, -1])


def test_answer_only_loss(facts_db, items):
    from retrolm.qa.pipeline import build_example, training_batch

    tok = facts_db.tokenizer
    model = _model(facts_db, seed=1)
    source = _source(facts_db, model, k=2)
    exs = [build_example("retro++", it.question, source.for_item(it), tok, M) for it in items[:3]]
    answers = [it.answers[0] for it in items[:3]]
    batch = training_batch(exs, answers, tok, M, 2 * M, True)
    for b, (ex, ans) in enumerate(zip(exs, answers, strict=True)):
        want = tok.encode(f" {ans}\n")
        start = len(ex.prompt_ids) - 1
        row = batch["targets"][b]
        assert row[start : start + len(want)].tolist() == want
        assert (row[:start] == -100).all() and (row[start + len(want) :] == -100).all()
    logits, loss = model(batch["tokens"], batch["neighbours"], batch["neighbour_mask"], batch["targets"])
    keep = batch["targets"] != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], batch["targets"][keep])
    torch.testing.assert_close(loss, manual)
    assert int(keep.sum()) == sum(len(tok.encode(f" {a}\n")) for a in answers)
    # neighbours sit where generation puts them
    T = batch["tokens"].shape[1]
    nb, mask = _layout(exs[0], T)
    assert torch.equal(batch["neighbours"][:1], nb) and torch.equal(batch["neighbour_mask"][:1], mask)


def test_finetune_teaches_closed_book_answers(facts_db, items):
    from retrolm.qa.pipeline import answer_items, finetune, score

    model = _model(facts_db, cca=False, seed=2)
    few = items[:4]
    losses = finetune(model, facts_db.tokenizer, few, "closed-book", None, steps=50, batch_size=4,
                      lr=5e-3, progress=False)  # fmt: skip
    assert losses[-1] < 0.2 * losses[0]
    result = score(answer_items(model, facts_db.tokenizer, few, "closed-book", None, max_new_tokens=8))
    assert result["em"] == 100.0 and result["f1"] == 100.0
    assert set(result["by_kind"]) <= {"db_only", "seen"} and sum(v["n"] for v in result["by_kind"].values()) == 4


def test_iter_retgen_requeries_with_the_first_answer(facts_db, items):
    from retrolm.qa.pipeline import answer_items

    model = _model(facts_db, cca=False, seed=3)
    source = _source(facts_db, model, k=2)
    recs = answer_items(model, facts_db.tokenizer, items[:4], "iter-retgen", source, max_new_tokens=4)
    for it, rec in zip(items[:4], recs, strict=True):
        second = source.search(f"{it.question} {rec['first_answer']}".strip())
        assert rec["passages"] == [p.doc_id for p in second]
    with pytest.raises(RetrolmError, match="RETRO"):
        answer_items(model, facts_db.tokenizer, items[:1], "retro", source)


def test_score_and_selection(items):
    from retrolm.qa.pipeline import load_items, score, select_items

    recs = [
        {"prediction": "The Peteth", "answers": ["peteth"], "kind": "seen"},
        {"prediction": "35200", "answers": ["35,200"], "kind": "db_only"},
        {"prediction": "river Peteth", "answers": ["Peteth"], "kind": "db_only"},
    ]
    out = score(recs)
    assert out["em"] == pytest.approx(200 / 3) and out["by_kind"]["seen"]["em"] == 100.0
    assert out["by_kind"]["db_only"]["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    ft = select_items(items, subset="finetune")
    ev = select_items(items, subset="eval")
    assert len(ft) + len(ev) == len(items) and not {i.question for i in ft} & {i.question for i in ev}
    facts = load_items("builtin:facts")  # the shortcut: the default facts world's QA pairs
    assert len(facts) == 3600 and {i.extra["kind"] for i in facts} == {"db_only", "seen"}
    with pytest.raises(RetrolmError):
        load_items("builtin:nope")
    few = select_items(items, limit=10, seed=1)
    kinds = [i.extra["kind"] for i in few]
    assert len(few) == 10 and kinds.count("seen") == kinds.count("db_only") == 5


def test_cli(facts_db, qa_file, tmp_path):
    from retrolm.checkpoints import save_model

    retro_dir, gpt_dir = tmp_path / "retro", tmp_path / "gpt"
    save_model(_model(facts_db), retro_dir)
    save_model(_model(facts_db, cca=False), gpt_dir)
    base = [sys.executable, "-m", "retrolm", "qa"]
    run = subprocess.run(
        base + ["--db", str(facts_db.path), "--checkpoint", str(retro_dir), "--data", str(qa_file),
                "--mode", "retro++", "--limit", "6", "--max-new-tokens", "3", "--json"],
        capture_output=True, text=True, env=_env(), timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["n"] == 6 and set(result["by_kind"]) == {"db_only", "seen"}
    ft = subprocess.run(
        base + ["finetune", "--db", str(facts_db.path), "--checkpoint", str(gpt_dir), "--data",
                str(qa_file), "--mode", "rag", "--steps", "2", "--batch-size", "2",
                "--out", str(tmp_path / "ft")],
        capture_output=True, text=True, env=_env(), timeout=120,
    )  # fmt: skip
    assert ft.returncode == 0, ft.stderr
    assert (tmp_path / "ft" / "model.safetensors").is_file()
    bad = subprocess.run(
        base + ["--db", str(facts_db.path), "--checkpoint", str(gpt_dir), "--data", str(qa_file),
                "--mode", "retro", "--limit", "2"],
        capture_output=True, text=True, env=_env(), timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "RETRO" in bad.stderr
