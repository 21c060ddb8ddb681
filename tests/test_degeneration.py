"""Degeneration evaluation on tiny checkpoints: metrics per checkpoint, held-out prompts."""

from __future__ import annotations

import numpy as np
import pytest

from retrolm.checkpoints import save_model
from retrolm.errors import RetrolmError
from retrolm.evaluation.degeneration import evaluate_degeneration, held_out_prompts
from retrolm.evaluation.metrics import distinct_n, has_repetition, mean_length, repetition_rate
from test_generate import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prompts_come_from_held_out_documents(tiny_db):
    m = tiny_db.chunk_size
    prompts = held_out_prompts(tiny_db, 5, m, seed=0)
    assert prompts == held_out_prompts(tiny_db, 5, m, seed=0)
    assert prompts != held_out_prompts(tiny_db, 5, m, seed=1)
    starts = {
        tuple(int(t) for t in tiny_db.streams[split].read(s, s + m))
        for split in ("test", "valid") for s, _ in tiny_db.streams[split].docs
    }
    assert all(len(p) == m and tuple(p) in starts for p in prompts)
    train = tiny_db.streams["train"]
    assert not any(tuple(int(t) for t in train.read(s, s + m)) in starts for s, _ in train.docs)
    with pytest.raises(RetrolmError, match="--prompts"):
        held_out_prompts(tiny_db, 10_000, m)
    # more prompts than documents: later windows of the same documents, still held-out text
    n_docs = sum(int((tiny_db.streams[s].docs[:, 1] > m + 1).sum()) for s in ("test", "valid"))
    many = held_out_prompts(tiny_db, n_docs + 3, m // 2)
    assert len(many) == n_docs + 3
    held = np.concatenate([np.asarray(tiny_db.streams[s].tokens) for s in ("test", "valid")])
    text = " ".join(map(str, held.tolist()))
    assert all(" ".join(map(str, p)) in text for p in many)


def test_evaluate_degeneration_gpt_and_retro(tiny_db, tmp_path):
    vocab = tiny_db.vocab_size
    gpt = save_model(tiny_model(vocab, retro=False, seed=0), tmp_path / "gpt")
    retro = save_model(tiny_model(vocab, retro=True, seed=0), tmp_path / "retro")
    out = evaluate_degeneration(tiny_db, [gpt, retro], n_prompts=4, max_new_tokens=30, seed=0)
    assert out["settings"]["n_prompts"] == 4 and out["settings"]["top_p"] == 0.9
    rows = out["checkpoints"]
    assert [r["kind"] for r in rows] == ["gpt", "retro"]
    for r in rows:
        assert 0.0 <= r["repetition_pct"] <= 100.0 and r["repetition_pct"] % 25 == 0  # 4 prompts
        assert 0.0 < r["distinct_1"] <= 1.0 and 0.0 < r["distinct_2"] <= 1.0
        assert 0 < r["mean_length"] <= 30 and len(r["examples"]) == 3
    # the same prompts and seeds: a rerun is identical
    again = evaluate_degeneration(tiny_db.path, [gpt], n_prompts=4, max_new_tokens=30, seed=0)
    assert again["checkpoints"][0]["distinct_2"] == rows[0]["distinct_2"]


def test_metrics_are_those_of_the_generations(tiny_db, tmp_path):
    """Near-greedy decoding of an untrained model loops: Repetition % sees it, per docs/reference.md §2."""
    ckpt = save_model(tiny_model(tiny_db.vocab_size, retro=True, seed=1), tmp_path / "retro")
    out = evaluate_degeneration(tiny_db, [ckpt], n_prompts=3, max_new_tokens=40, top_p=1e-6,
                                return_generations=True)
    row = out["checkpoints"][0]
    gens = row["generations"]
    assert len(gens) == 3
    assert row["repetition_pct"] == repetition_rate(gens) > 0
    assert row["distinct_1"] == distinct_n(gens, 1) and row["distinct_2"] == distinct_n(gens, 2)
    assert row["mean_length"] == mean_length(gens)
    assert any(has_repetition(g) for g in gens)


def test_refuses_mismatched_checkpoint(tiny_db, tmp_path):
    other = save_model(tiny_model(tiny_db.vocab_size + 8, retro=True), tmp_path / "other")
    with pytest.raises(RetrolmError, match="vocab"):
        evaluate_degeneration(tiny_db, [other], n_prompts=2, max_new_tokens=4)
    with pytest.raises(RetrolmError):
        evaluate_degeneration(tiny_db, [], n_prompts=2)
