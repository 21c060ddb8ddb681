"""Trainer checkpoints against the database and against damage: the trained k is every
stage's default, damaged checkpoints are skipped on --resume, another tokenizer is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from retrolm.errors import RetrolmError
from retrolm.training.trainer import TrainConfig, train
from test_train import _cli_error, _train_args

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BATCH, SEQ, EVERY = 4, 2, 32, 2


def _cfg(**overrides) -> TrainConfig:
    return TrainConfig(
        tokens=STEPS * BATCH * SEQ, batch_size=BATCH, seq_len=SEQ, checkpoint_every=EVERY, k=1,
        seed=3, device="cpu", progress=False, **overrides,
    )  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny_db_path, tmp_path_factory) -> Path:
    """A finished tiny RETRO run trained with k=1 (the preset says n_neighbors=2)."""
    out = tmp_path_factory.mktemp("ckpt_run") / "run"
    train(tiny_db_path, "tiny", out, _cfg())
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _flip_bit(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-64] ^= 0x40
    file.write_bytes(bytes(data))


# -- one k ------------------------------------------------------------------------------------------


def test_every_stage_defaults_to_the_k_the_model_was_trained_with(run, tiny_db, tiny_db_path):
    from retrolm.cli.qa import _k
    from retrolm.evaluation.perplexity import evaluate
    from retrolm.generation.decode import generate
    from retrolm.serve import Engine

    assert json.loads((run / "final" / "config.json").read_text())["n_neighbors"] == 1
    result = evaluate(tiny_db, [run], max_sequences=2, rag=False, shuffled=False)
    assert result["k"] == 1
    engine = Engine.load(run / "final", tiny_db_path)  # generate and serve load the same way
    prompt = "the river flows past the old mill and " * 3
    res = generate(engine.model, engine.tokenizer, prompt, db=engine.db, max_new_tokens=4,
                   greedy=True, return_retrieval=True)[0]  # fmt: skip
    assert res.retrieval and all(len(rec.chunk_ids) == 1 for rec in res.retrieval)
    assert _k(engine.model, None) == 1  # qa's passages for a RETRO model


def test_a_checkpoint_from_before_k_was_recorded_gets_it_from_its_trainer_state(run, tmp_path):
    from retrolm.checkpoints import load_checkpoint, write_checksums

    final = _copy(run, tmp_path) / "final"
    config = json.loads((final / "config.json").read_text())
    (final / "config.json").write_text(json.dumps({**config, "n_neighbors": 2}))
    write_checksums(final)
    assert load_checkpoint(final).config.n_neighbors == 1  # trainer_state: train_config.k = 1


# -- damaged checkpoints ------------------------------------------------------------------------------


def test_resume_skips_a_damaged_checkpoint_and_ends_as_the_intact_run(run, tiny_db_path, tmp_path, capsys):
    out = _copy(run, tmp_path)
    intact = (run / "final" / "model.safetensors").read_bytes()
    _flip_bit(out / "checkpoints" / "step_000004" / "model.safetensors")
    capsys.readouterr()
    train(tiny_db_path, "tiny", out, _cfg(resume=True))
    err = capsys.readouterr().err
    assert "step_000004 is damaged (model.safetensors fails its sha256 check); resuming from step_000002" in err
    assert (out / "final" / "model.safetensors").read_bytes() == intact  # steps 3-4 redone exactly


def test_a_truncated_optimizer_state_falls_back_or_fails_in_one_line(run, tiny_db_path, tmp_path, capsys):
    out = _copy(run, tmp_path)
    optimizer = out / "checkpoints" / "step_000004" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    capsys.readouterr()
    train(tiny_db_path, "tiny", out, _cfg(resume=True))
    assert "(optimizer.pt fails its sha256 check); resuming from step_000002" in capsys.readouterr().err
    # a checkpoint from before checksums: one line, no traceback
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    for step in ("step_000002", "step_000004"):
        (out / "checkpoints" / step / "checksums.json").unlink()
    args = ["--model", "tiny", "--tokens", str(STEPS * BATCH * SEQ), "--batch-size", str(BATCH),
            "--seq-len", str(SEQ), "--checkpoint-every", str(EVERY), "--k", "1", "--seed", "3",
            "--resume"]  # fmt: skip
    err = _cli_error(_train_args(tiny_db_path, out, *args), capsys)
    assert "optimizer.pt" in err and "damaged" in err


def test_resume_refuses_when_every_checkpoint_is_damaged(run, tiny_db_path, tmp_path):
    out = _copy(run, tmp_path)
    for step in ("step_000002", "step_000004"):
        _flip_bit(out / "checkpoints" / step / "model.safetensors")
    with pytest.raises(RetrolmError, match="every checkpoint .* is damaged"):
        train(tiny_db_path, "tiny", out, _cfg(resume=True))


# -- another tokenizer ----------------------------------------------------------------------------------


def test_resume_against_a_database_with_another_tokenizer_is_refused(run, tmp_path):
    from conftest import make_corpus_dir
    from retrolm.db.database import RetrievalDB

    other = RetrievalDB.build(str(make_corpus_dir(tmp_path / "corpus", n=60, seed=5)), tmp_path / "db",
                              retriever="bm25", chunk_size=16, vocab_size=512, neighbors=4,
                              split=(80, 10, 10), seed=0, progress=False)  # fmt: skip
    out = _copy(run, tmp_path)
    tokenizer_before = (out / "final" / "tokenizer.json").read_bytes()
    with pytest.raises(RetrolmError, match="another tokenizer"):
        train(other.path, "tiny", out, _cfg(resume=True))
    assert (out / "final" / "tokenizer.json").read_bytes() == tokenizer_before
