"""Generation: greedy == argmax of the full forward (GPT and RETRO with online retrieval),
retrieval at every chunk boundary, length past max_seq_len, stop strings, seeds, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from retrolm.checkpoints import save_model
from retrolm.errors import RetrolmError
from retrolm.generation.decode import MAX_NEW_TOKENS, TextStream, generate, load_for_generation
from retrolm.generation.retrieval import OnlineRetriever
from retrolm.generation.sampling import SamplingParams, apply_repetition_penalty
from retrolm.model.config import RetroConfig
from retrolm.model.retro import Retro

PROMPTS = [
    "The grey otter number 3 lives near the river.",
    "It hunts fish at dawn by the marsh. It gathers berries in spring by the",
    "Scientists counted",
    "The golden heron lives near the harbour. It steals seeds after rain by the forest. It",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(vocab: int, retro: bool, seed: int = 0, max_seq_len: int = 32) -> Retro:
    torch.manual_seed(seed)
    cfg = RetroConfig.from_name("tiny", vocab_size=vocab, chunk_size=16, max_seq_len=max_seq_len)
    return Retro(cfg if retro else cfg.as_gpt()).eval()


def assert_greedy_choices(logits: torch.Tensor, chosen: list[int], tol: float = 1e-4) -> None:
    """Each chosen token is the argmax of its row (up to float noise between step and forward)."""
    picked = logits[torch.arange(len(chosen)), torch.tensor(chosen)]
    best = logits.max(-1).values
    assert torch.all(picked >= best - tol), (picked - best).min()


def full_neighbours(db, res, n_tokens: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours (1, l, k, r) for a full forward, rebuilt from what generation retrieved."""
    m = db.chunk_size
    n_chunks = -(-n_tokens // m)
    ids = np.full((n_chunks, k), -1, dtype=np.int64)
    for rec in res.retrieval:
        ids[rec.chunk_index, : len(rec.chunk_ids)] = rec.chunk_ids[:k]
    tokens, mask = db.chunks.gather(ids)  # (l, k, r)
    return torch.from_numpy(tokens)[None], torch.from_numpy(mask)[None]


def test_gpt_greedy_equals_full_forward_argmax(tiny_db):
    model = tiny_model(tiny_db.vocab_size, retro=False)
    results = generate(model, tiny_db.tokenizer, PROMPTS, max_new_tokens=30, greedy=True)
    assert len(results) == len(PROMPTS)
    for res in results:
        assert res.token_ids and res.stats["model_steps"] == len(res.token_ids)
        seq = torch.tensor([res.prompt_ids + res.token_ids])
        logits, _ = model(seq[:, :-1])
        p = len(res.prompt_ids)
        assert_greedy_choices(logits[0, p - 1 :], res.token_ids)
        assert res.text == tiny_db.tokenizer.decode(res.token_ids)


def test_retro_greedy_equals_full_forward_with_online_retrieval(tiny_db):
    model = tiny_model(tiny_db.vocab_size, retro=True, max_seq_len=32)
    results = generate(model, tiny_db.tokenizer, PROMPTS, db=tiny_db, max_new_tokens=40, greedy=True,
                       return_retrieval=True)
    m, k = tiny_db.chunk_size, model.config.n_neighbors
    for res in results:
        fed = len(res.prompt_ids) + len(res.token_ids) - 1  # the last token is never fed
        assert fed > model.config.max_seq_len  # also covers generation past the training length
        assert res.finish_reason == "length" and len(res.token_ids) == 40
        # one retrieval per completed chunk, in order, each with k real neighbours
        assert [r.chunk_index for r in res.retrieval] == list(range(fed // m))
        assert all(len(r.chunk_ids) == k and len(r.neighbours) == k for r in res.retrieval)
        seq = res.prompt_ids + res.token_ids
        for r in res.retrieval:
            assert r.query == tiny_db.tokenizer.decode(seq[r.chunk_index * m : (r.chunk_index + 1) * m])
        nb, mask = full_neighbours(tiny_db, res, fed, k)
        logits, _ = model(torch.tensor([seq[:fed]]), nb, mask)
        p = len(res.prompt_ids)
        assert_greedy_choices(logits[0, p - 1 :], res.token_ids)
        # and retrieval matters: without neighbours the same forward prefers other tokens somewhere
        plain, _ = model(torch.tensor([seq[:fed]]))
        assert not torch.allclose(plain, logits, atol=1e-4)


def test_retrieve_called_exactly_at_chunk_boundaries(tiny_db):
    model = tiny_model(tiny_db.vocab_size, retro=True)
    m = tiny_db.chunk_size
    retriever = OnlineRetriever(tiny_db, k=2, batch_size=1)
    calls = []

    def counting(u, chunk_tokens):
        calls.append((u, len(cache) if cache is not None else 0, chunk_tokens[0].tolist()))
        return retriever(u, chunk_tokens)

    tokens = tiny_db.tokenizer.encode(" ".join(PROMPTS))[: 3 * m + 5]
    cache = None
    _, cache = model.step(torch.tensor([tokens[:5]]), cache, counting)  # no chunk complete yet
    assert calls == []
    for t in tokens[5:]:
        _, cache = model.step(torch.tensor([[t]]), cache, counting)
    assert [(u, pos) for u, pos, _ in calls] == [(u, (u + 1) * m - 1) for u in range(3)]
    assert all(chunk == tokens[u * m : (u + 1) * m] for u, _, chunk in calls)
    assert retriever.calls == 3 and sorted(retriever.records[0]) == [0, 1, 2]


def test_generation_far_past_max_seq_len_gpt(tiny_db):
    model = tiny_model(tiny_db.vocab_size, retro=False, max_seq_len=16)
    res = generate(model, tiny_db.tokenizer, PROMPTS[0], max_new_tokens=120, greedy=True)[0]
    assert len(res.token_ids) == 120 and res.finish_reason == "length"
    seq = torch.tensor([res.prompt_ids + res.token_ids[:-1]])
    logits, _ = model(seq)
    assert_greedy_choices(logits[0, len(res.prompt_ids) - 1 :], res.token_ids)


def test_stop_strings_cut_the_text(tiny_db):
    model = tiny_model(tiny_db.vocab_size, retro=False, seed=3)
    tok = tiny_db.tokenizer
    # sampling gives varied text; pick a stop string that first appears in the middle of it
    full = generate(model, tok, PROMPTS[1], max_new_tokens=40, seed=5)[0]
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    res = generate(model, tok, PROMPTS[1], max_new_tokens=40, seed=5, stop=[stop, "\x00never"])[0]
    assert res.finish_reason == "stop"
    assert res.text == text[: text.find(stop)]
    assert len(res.token_ids) < len(full.token_ids)
    assert res.token_ids == full.token_ids[: len(res.token_ids)]
    assert stop in tok.decode(res.token_ids) and stop not in tok.decode(res.token_ids[:-1])


def test_seeds_are_reproducible_and_independent_of_batching(tiny_db):
    model = tiny_model(tiny_db.vocab_size, retro=True)
    tok = tiny_db.tokenizer
    kw = dict(db=tiny_db, max_new_tokens=20, temperature=1.0, top_p=0.95)
    a = generate(model, tok, PROMPTS[:2], seed=7, **kw)
    b = generate(model, tok, PROMPTS[:2], seed=7, **kw)
    c = generate(model, tok, PROMPTS[:2], seed=8, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    # prompt i samples with seed + i whatever else is in the call
    alone = generate(model, tok, PROMPTS[1], seed=8, **kw)[0]
    assert alone.token_ids == a[1].token_ids


def test_equal_length_prompts_decode_as_one_batch(tiny_db):
    model = tiny_model(tiny_db.vocab_size, retro=True)
    tok = tiny_db.tokenizer
    ids = tok.encode(" ".join(PROMPTS))
    prompts = [tok.decode(ids[:20]), tok.decode(ids[5:25]), tok.decode(ids[:12])]
    pids = [ids[:20], ids[5:25], ids[:12]]
    batched = generate(model, tok, prompts, prompt_ids=pids, db=tiny_db, max_new_tokens=25, greedy=True)
    assert [r.stats["batch_size"] for r in batched] == [2, 2, 1]
    for i, r in enumerate(batched):
        alone = generate(model, tok, prompts[i], prompt_ids=[pids[i]], db=tiny_db, max_new_tokens=25,
                         greedy=True)[0]
        assert alone.token_ids == r.token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_db):
    model = tiny_model(tiny_db.vocab_size, retro=False, seed=1)
    tok = tiny_db.tokenizer
    greedy = generate(model, tok, PROMPTS, max_new_tokens=15, greedy=True)
    top1 = generate(model, tok, PROMPTS, max_new_tokens=15, top_k=1, seed=3)
    nucleus = generate(model, tok, PROMPTS, max_new_tokens=15, top_p=1e-6, seed=4)
    assert [r.token_ids for r in greedy] == [r.token_ids for r in top1] == [r.token_ids for r in nucleus]


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]


def test_bad_arguments(tiny_db):
    model = tiny_model(tiny_db.vocab_size, retro=True)
    tok = tiny_db.tokenizer
    with pytest.raises(RetrolmError, match="--db"):
        generate(model, tok, "hi", greedy=True)
    with pytest.raises(RetrolmError, match="temperature"):
        generate(model, tok, "hi", db=tiny_db, temperature=-0.5)
    with pytest.raises(RetrolmError, match="max_new_tokens"):
        generate(model, tok, "hi", db=tiny_db, max_new_tokens=MAX_NEW_TOKENS + 1)
    other = tiny_model(tiny_db.vocab_size + 8, retro=True)
    with pytest.raises(RetrolmError, match="vocab"):
        generate(other, tok, "hi", db=tiny_db, greedy=True)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_db):
    root = tmp_path_factory.mktemp("gen_ckpt")
    retro = save_model(tiny_model(tiny_db.vocab_size, retro=True), root / "retro")
    gpt = save_model(tiny_model(tiny_db.vocab_size, retro=False), root / "gpt")
    shutil.copy(tiny_db.path / "tokenizer.json", gpt / "tokenizer.json")
    wrong = save_model(tiny_model(tiny_db.vocab_size + 8, retro=True), root / "wrong_vocab")
    return {"retro": retro, "gpt": gpt, "wrong": wrong, "root": root}


def run_cli(argv, capsys):
    from retrolm.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generate_retro_json_and_show_retrieval(checkpoints, tiny_db_path, capsys, tmp_path,
                                                    monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n")
    code, out, err = run_cli(["generate", "--checkpoint", str(checkpoints["retro"]), "--db", str(tiny_db_path),
                              "--prompt-file", str(prompt_file), "--max-new-tokens", "12", "--greedy",
                              "--json"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [d["prompt"] for d in lines] == PROMPTS[:2]
    assert all(len(d["token_ids"]) <= 12 and "retrieval" not in d for d in lines)
    code, out, err = run_cli(["generate", "--checkpoint", str(checkpoints["retro"]), "--db", str(tiny_db_path),
                              "--prompt", PROMPTS[3], "--max-new-tokens", "8", "--greedy",
                              "--speculative", "--show-retrieval"], capsys)
    assert code == 0, err
    assert out.startswith(PROMPTS[3]) and "[chunk 0] query:" in out and "score" in out
    assert "mean accepted draft" in err
    # readable: one line per field, whitespace collapsed, no Python reprs, cut to the width
    report = out[out.index("[chunk 0]") :].splitlines()
    assert all(len(line) <= 80 for line in report)
    assert not any("\\n" in line or "  " in line.strip() for line in report)
    assert any(line.startswith("  1. doc ") and ", score " in line for line in report)
    assert sum(line.startswith("     text: ") for line in report) == sum(
        line.startswith("     next: ") for line in report) > 0
    # opening the dense database loads the MiniLM encoder without a progress bar
    assert "Loading weights" not in err and "it/s" not in err


def test_cli_generate_gpt_without_db(checkpoints, capsys):
    code, out, err = run_cli(["generate", "--checkpoint", str(checkpoints["gpt"]), "--prompt", "The otter",
                              "--max-new-tokens", "5", "--seed", "1", "--top-k", "20"], capsys)
    assert code == 0, err
    assert out.startswith("The otter")


@pytest.mark.parametrize(
    "case, match",
    [
        ("retro_no_db", "RETRO checkpoint"),
        ("vocab", "vocab"),
        ("missing_ckpt", "does not exist"),
        ("missing_db", "does not exist"),
        ("missing_prompt_file", "not found"),
        ("greedy_and_sampling", "--greedy takes no"),
        ("too_many_tokens", "--max-new-tokens 100000000 must be in [0, 16384]"),
        ("negative_temperature", "temperature -1.0 must be >= 0"),
    ],
)
def test_cli_generate_errors_one_line_exit_2(case, match, checkpoints, tiny_db_path, capsys, tmp_path):
    base = ["generate", "--prompt", "x", "--max-new-tokens", "2"]
    args = {
        "retro_no_db": ["--checkpoint", str(checkpoints["retro"])],
        "vocab": ["--checkpoint", str(checkpoints["wrong"]), "--db", str(tiny_db_path)],
        "missing_ckpt": ["--checkpoint", str(tmp_path / "nope"), "--db", str(tiny_db_path)],
        "missing_db": ["--checkpoint", str(checkpoints["retro"]), "--db", str(tmp_path / "nodb")],
        "missing_prompt_file": ["generate", "--checkpoint", str(checkpoints["gpt"]),
                                "--prompt-file", str(tmp_path / "p.txt")],
        "greedy_and_sampling": ["--checkpoint", str(checkpoints["gpt"]), "--greedy", "--top-k", "5"],
        "too_many_tokens": ["generate", "--checkpoint", str(checkpoints["gpt"]), "--prompt", "x",
                            "--max-new-tokens", "100000000"],
        "negative_temperature": ["--checkpoint", str(checkpoints["gpt"]), "--temperature", "-1"],
    }[case]
    argv = args if args[0] == "generate" else base + args
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and match in err and err.count("\n") == 1


def test_load_for_generation_refuses_other_tokenizer(checkpoints, tiny_db, tmp_path):
    """A checkpoint whose training database had another tokenizer is refused with --db."""
    fake_db = tmp_path / "other_db"
    fake_db.mkdir()
    (fake_db / "manifest.json").write_text(json.dumps({"files": {"tokenizer.json": {"sha256": "0" * 64}}}))
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["retro"], ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"database": str(fake_db)}))
    with pytest.raises(RetrolmError, match="tokenizer mismatch"):
        load_for_generation(ckpt, tiny_db.path)


def test_temperature_zero_is_greedy(tiny_db):
    model = tiny_model(tiny_db.vocab_size, retro=False, seed=1)
    tok = tiny_db.tokenizer
    assert SamplingParams(temperature=0.0).is_greedy and not SamplingParams(temperature=0.1).is_greedy
    greedy = generate(model, tok, PROMPTS, max_new_tokens=15, greedy=True)
    zero = generate(model, tok, PROMPTS, max_new_tokens=15, temperature=0.0, top_p=0.5, seed=9)
    sampled = generate(model, tok, PROMPTS, max_new_tokens=15, temperature=1.0, seed=9)
    assert [r.token_ids for r in zero] == [r.token_ids for r in greedy]
    assert [r.token_ids for r in sampled] != [r.token_ids for r in greedy]


def test_cli_temperature_zero_equals_greedy(checkpoints, capsys):
    base = ["generate", "--checkpoint", str(checkpoints["gpt"]), "--prompt", PROMPTS[1],
            "--max-new-tokens", "10", "--json"]
    code, greedy, err = run_cli([*base, "--greedy"], capsys)
    assert code == 0, err
    code, zero, err = run_cli([*base, "--temperature", "0", "--seed", "4"], capsys)
    assert code == 0, err
    assert json.loads(zero)["token_ids"] == json.loads(greedy)["token_ids"]


def test_short_prompt_says_when_nothing_was_retrieved(tiny_db):
    model = tiny_model(tiny_db.vocab_size, retro=True)
    tok, m = tiny_db.tokenizer, tiny_db.chunk_size
    p = len(tok.encode(PROMPTS[2]))
    assert p < m
    kw = dict(db=tiny_db, greedy=True, return_retrieval=True)
    # the last new token is never fed, so m - p new tokens leave chunk 0 incomplete
    none = generate(model, tok, PROMPTS[2], max_new_tokens=m - p, **kw)[0]
    assert none.finish_reason == "length" and none.retrieval == []
    assert none.retrieval_note.startswith("nothing retrieved") and f"{m}-token chunk" in none.retrieval_note
    late = generate(model, tok, PROMPTS[2], max_new_tokens=m - p + 4, **kw)[0]
    assert [r.chunk_index for r in late.retrieval] == [0]
    assert f"the first {m - p} new tokens were generated without neighbours" in late.retrieval_note
    long = generate(model, tok, PROMPTS[3], max_new_tokens=4, **kw)[0]
    assert long.retrieval and long.retrieval_note == ""
    gpt = tiny_model(tiny_db.vocab_size, retro=False)
    assert generate(gpt, tok, PROMPTS[2], max_new_tokens=3, greedy=True)[0].retrieval_note == ""


def test_cli_short_prompt_note(checkpoints, tiny_db_path, capsys):
    code, out, err = run_cli(["generate", "--checkpoint", str(checkpoints["retro"]), "--db", str(tiny_db_path),
                              "--prompt", PROMPTS[2], "--max-new-tokens", "2", "--greedy",
                              "--show-retrieval"], capsys)
    assert code == 0, err
    assert "[retrieval] nothing retrieved" in out
    assert "note: nothing retrieved" in err


def test_text_stream_never_splits_a_character_or_leaks_a_stop_string(tiny_db):
    tok = tiny_db.tokenizer
    text = " The café sells naïve otters 🦦 at dawn. STOP here 🦦 again"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # byte-level: multibyte characters span several tokens
    for stop in (None, ["STOP"], ["🦦 a"]):
        stream = TextStream(tok, stop)
        pieces = [stream.piece(ids[: n + 1]) for n in range(len(ids))]
        final = text if stop is None else text[: text.find(stop[0])]
        pieces.append(stream.finish(final))
        assert "".join(pieces) == final
        assert not any("\ufffd" in piece for piece in pieces)
        if stop:  # nothing printed past where the stop string starts, even transiently
            assert "".join(pieces[:-1]) == final[: len("".join(pieces[:-1]))]


def test_cli_streams_and_ctrl_c_keeps_what_was_printed(checkpoints, tmp_path):
    """A huge generation prints as it goes; SIGINT stops it with exit 130, output kept."""
    import os
    import select
    import signal
    import subprocess
    import sys
    import time

    from conftest import default_sigint

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "retrolm", "generate", "--checkpoint", str(checkpoints["gpt"]),
         "--prompt", "The otter", "--max-new-tokens", str(MAX_NEW_TOKENS), "--seed", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=default_sigint,
    )  # fmt: skip
    out = b""
    deadline = time.monotonic() + 120
    try:
        while len(out) < len(b"The otter") + 20 and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                out += os.read(proc.stdout.fileno(), 4096)
        assert proc.poll() is None, "generation ended before it was interrupted"
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out += rest
    assert proc.returncode == 130, err.decode()
    assert out.startswith(b"The otter") and len(out) >= len(b"The otter") + 20
    assert out.endswith(b"\n")  # the interrupted line is ended
    assert b"interrupted" in err


def test_bench_generate_reports_step_time_growth(checkpoints, tiny_db_path, capsys):
    """bench_generate's decode_step_growth record: ms/token at two lengths and their ratio."""
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    setup = {"db": str(tiny_db_path), "retro": str(checkpoints["retro"]), "gpt": str(checkpoints["gpt"])}
    bench.bench_step_growth(setup, argparse.Namespace(prompt_tokens=16, device="cpu"), lengths=(8, 40),
                            window=4)  # fmt: skip
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["model"] for r in records] == ["retro", "gpt"]
    for r in records:
        assert r["bench"] == "decode_step_growth" and r["ms_per_token_at_8"] > 0
        assert r["ratio_40_over_8"] == pytest.approx(r["ms_per_token_at_40"] / r["ms_per_token_at_8"], rel=0.01)
    assert records[0]["retrieval_seconds"] > 0 and records[1]["retrieval_seconds"] == 0
