"""Evaluation on the session's tiny database with a tiny GPT and a tiny RETRO trained a few steps."""

from __future__ import annotations

import math

import numpy as np
import pytest

SEQ = 64


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_db_path):
    """Final checkpoint dirs of a tiny GPT and a tiny RETRO (same decoder, same sequences)."""
    from retrolm.training.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("eval_runs")
    out = {}
    for name, retrieval in (("gpt", False), ("retro", True)):
        cfg = TrainConfig(seq_len=SEQ, batch_size=4, lr=3e-3, tokens=SEQ * 4 * 6, retrieval=retrieval,
                          checkpoint_every=0, progress=False)  # fmt: skip
        out[name] = train(tiny_db_path, "tiny", root / name, cfg)
    return out


@pytest.fixture(scope="module")
def result(tiny_db, runs):
    from retrolm.evaluation.perplexity import evaluate

    return evaluate(tiny_db, [runs["gpt"].parent, runs["retro"]], split="valid")


def test_all_modes_finite_and_bpb_consistent(result, tiny_db):
    from retrolm.evaluation.perplexity import find_row

    assert [r["model"] for r in result["rows"]] == ["GPT", "RAG_GPT", "RETRO", "RETRO-off", "RETRO-shuffled"]
    stream = np.asarray(tiny_db.streams["valid"].tokens, dtype=np.int64)
    # every token but the first is scored once; bytes are the decoded targets' UTF-8 bytes
    assert result["tokens"] == len(stream) - 1
    assert result["bytes"] == len(tiny_db.tokenizer.decode(stream[1:]).encode("utf-8"))
    for row in result["rows"]:
        assert math.isfinite(row["ppl"]) and 1.0 < row["ppl"] < tiny_db.vocab_size
        assert row["bpb"] == pytest.approx(row["nll_nats"] / (math.log(2) * row["bytes"]), rel=1e-12)
        assert row["ppl"] == pytest.approx(math.exp(row["nll_nats"] / row["tokens"]), rel=1e-12)
    # retrieval changes RETRO's predictions; RAG_GPT's prompt changes the GPT's
    assert find_row(result, "RETRO")["nll_nats"] != pytest.approx(find_row(result, "RETRO-off")["nll_nats"])
    assert find_row(result, "RAG_GPT")["nll_nats"] != pytest.approx(find_row(result, "GPT")["nll_nats"])
    # another sequence's neighbours give another score than the true ones
    assert find_row(result, "RETRO-shuffled")["nll_nats"] != pytest.approx(find_row(result, "RETRO")["nll_nats"])


def test_shuffle_is_a_fixed_derangement_within_equal_lengths():
    from retrolm.evaluation.perplexity import shuffle_sources

    for n_full in (2, 3, 7, 10):
        lengths = [64] * n_full + [20]  # full sequences and the short tail
        src = shuffle_sources(lengths, 16)
        assert all(s != i for i, s in enumerate(src))  # no fixed point
        assert sorted(src[:n_full]) == list(range(n_full))  # a permutation of the full ones
        assert src[-1] < n_full  # the short tail reads a full sequence's first windows
        assert src == shuffle_sources(lengths, 16)  # data-only: the same on every call
    assert shuffle_sources([64] * 4, 16) == [2, 3, 0, 1]  # half the split away
    assert shuffle_sources([30], 16) == [0]  # a single sequence has no other one


def test_shuffled_rows_use_the_same_wrong_neighbours_for_every_model(tiny_db, runs, result):
    from retrolm.checkpoints import load_checkpoint
    from retrolm.evaluation.perplexity import (
        evaluate,
        find_row,
        prepare,
        score_sequences,
        shuffled_neighbour_ids,
    )

    data = prepare(tiny_db, "valid", SEQ, result["k"])
    wrong = shuffled_neighbour_ids(data)
    assert len(data.starts) >= 2 and np.array_equal(wrong, shuffled_neighbour_ids(data))
    m = data.m
    for start, length in zip(data.starts, data.lengths, strict=True):
        n_win = -(-length // m)
        assert not np.array_equal(wrong[start : start + n_win], data.neighbour_ids[start : start + n_win])
    # the row is exactly RETRO scored with those ids, for each of two RETRO checkpoints in one call
    res = evaluate(tiny_db, [runs["retro"], runs["gpt"], runs["retro"]], split="valid", rag=False)
    rows = [r for r in res["rows"] if r["model"] == "RETRO-shuffled"]
    model = load_checkpoint(runs["retro"])
    want = score_sequences(model, tiny_db, data, True, neighbour_ids=wrong).sum()
    assert len(rows) == 2 and all(r["nll_nats"] == pytest.approx(want, rel=1e-9) for r in rows)
    assert find_row(res, "RETRO-shuffled")["nll_nats"] == pytest.approx(
        find_row(result, "RETRO-shuffled")["nll_nats"], rel=1e-9)
    # bucketed by the TRUE neighbours' overlap: the same chunks in every bucket as RETRO
    retro, shuffled = find_row(result, "RETRO"), find_row(result, "RETRO-shuffled")
    assert [b["n_chunks"] for b in retro["buckets"]] == [b["n_chunks"] for b in shuffled["buckets"]]
    skipped = evaluate(tiny_db, [runs["retro"]], split="valid", shuffled=False)
    assert [r["model"] for r in skipped["rows"]] == ["RETRO", "RETRO-off"]


def test_content_gain_and_markdown(result):
    from retrolm.evaluation.perplexity import content_gain, find_row, to_markdown

    gain = content_gain(result)
    ppl = {name: find_row(result, name)["ppl"] for name in ("RETRO", "RETRO-off", "RETRO-shuffled")}
    assert gain["retro_over_off"] == pytest.approx(ppl["RETRO"] / ppl["RETRO-off"])
    assert gain["shuffled_over_retro"] == pytest.approx(ppl["RETRO-shuffled"] / ppl["RETRO"])
    assert content_gain({"rows": []})["retro_over_off"] is None
    text = to_markdown(result)
    assert "| RETRO-shuffled | retro |" in text and "RETRO-shuffled bpb" in text
    assert f"RETRO-shuffled / RETRO = {gain['shuffled_over_retro']:.3f}" in text


def test_overlap_buckets_monotone_and_complete(result):
    assert result["alphas"] == [0.0, 0.125, 0.25, 0.5, 1.0]
    for row in result["rows"]:
        shares = [b["share"] for b in row["buckets"]]
        assert shares == sorted(shares) and shares[-1] == 1.0
        assert row["buckets"][-1]["n_chunks"] == result["chunks"]
        assert row["buckets"][-1]["bpb"] == pytest.approx(row["bpb"], rel=1e-9)  # alpha=1 is everything
    assert result["rows"][0]["buckets"][2]["share"] > 0  # the synthetic corpus shares phrases


def test_retro_off_equals_gpt_with_the_same_weights(tiny_db, runs, tmp_path):
    from retrolm.checkpoints import load_checkpoint, save_model
    from retrolm.evaluation.perplexity import evaluate, find_row
    from retrolm.model.retro import Retro

    retro = load_checkpoint(runs["retro"])
    gpt = Retro(retro.config.as_gpt())
    missing, _ = gpt.load_state_dict(retro.state_dict(), strict=False)
    assert not [k for k in missing if k != "lm_head.weight"]
    save_model(gpt, tmp_path / "gpt_from_retro")
    res = evaluate(tiny_db, [tmp_path / "gpt_from_retro", runs["retro"]], split="valid", rag=False)
    off, plain = find_row(res, "RETRO-off"), find_row(res, "GPT")
    assert plain["nll_nats"] == pytest.approx(off["nll_nats"], rel=1e-9)
    for a, b in zip(plain["buckets"], off["buckets"], strict=True):
        assert a["bpb"] == pytest.approx(b["bpb"], rel=1e-9)


def test_rag_gpt_context_is_neighbour_then_eos_then_own_tokens(tiny_db, runs):
    import torch

    from retrolm.checkpoints import load_checkpoint
    from retrolm.evaluation.perplexity import prepare, rag_inputs, score_rag, score_sequences

    data = prepare(tiny_db, "valid", SEQ, 2)
    m, eos = data.m, tiny_db.tokenizer.eos_id
    pieces = rag_inputs(tiny_db, data, 256)
    assert sorted({w for _, _, w in pieces}) == list(range(data.num_chunks))
    checked, got = 0, {}
    for tokens, targets, w in pieces:  # in stream order
        scored = targets != -100
        assert scored.any() and scored[-1] and scored[scored.argmax():].all()  # only the tail is scored
        got.setdefault(w, []).extend(targets[scored].tolist())
        if w >= 1 and data.neighbour_ids[w - 1, 0] >= 0:
            nb, mask = tiny_db.chunks.gather(data.neighbour_ids[w - 1, :1])  # neighbour of chunk w-1
            prefix = nb[0][mask[0]]
            assert np.array_equal(tokens[: len(prefix)], prefix) and tokens[len(prefix)] == eos
            checked += 1
    assert checked > 0
    for w, scored_tokens in got.items():  # each chunk's tokens are scored exactly once
        assert scored_tokens == data.stream[max(1, w * m) : (w + 1) * m].tolist()
    # a chunk without a neighbour (chunk 0) is scored exactly as the plain GPT scores it
    gpt = load_checkpoint(runs["gpt"])
    with torch.no_grad():
        rag = score_rag(gpt, tiny_db, data)
        plain = score_sequences(gpt, tiny_db, data, retrieval=False)
    assert rag[0] == pytest.approx(plain[0], rel=1e-5)
    assert not np.allclose(rag[1:], plain[1:])


def test_cli_refuses_mismatched_and_missing_checkpoints(tiny_db_path, tmp_path, capsys):
    from retrolm.checkpoints import save_model
    from retrolm.cli import main
    from retrolm.model.config import RetroConfig
    from retrolm.model.retro import Retro

    other = RetroConfig.from_name("tiny", chunk_size=8)  # database chunk size is 16
    save_model(Retro(other), tmp_path / "other")
    for ckpt in (tmp_path / "other", tmp_path / "missing"):
        with pytest.raises(SystemExit) as exc:
            main(["eval", "--db", str(tiny_db_path), "--checkpoint", str(ckpt)])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err


def test_cli_json_output(tiny_db_path, runs, capsys):
    import json

    from retrolm.cli import main

    main(["eval", "--db", str(tiny_db_path), "--checkpoint", str(runs["retro"].parent), "--split", "test",
          "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "test" and [r["model"] for r in out["rows"]] == ["RETRO", "RETRO-off", "RETRO-shuffled"]
    gain = out["content_gain"]["retro"]
    assert gain["shuffled_over_retro"] == pytest.approx(out["rows"][2]["ppl"] / out["rows"][0]["ppl"])


def test_cli_degeneration_flag(tiny_db_path, runs, capsys):
    from retrolm.cli import main

    main(["eval", "--db", str(tiny_db_path), "--checkpoint", str(runs["gpt"].parent), "--checkpoint",
          str(runs["retro"].parent), "--no-rag", "--degeneration", "--prompts", "2", "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert "| checkpoint | kind | repetition % |" in out
    assert "| gpt |" in out.replace(str(runs["gpt"]), "gpt") and "| retro |" in out
