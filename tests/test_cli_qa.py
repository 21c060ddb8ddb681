"""`retrolm qa` warns (one line on stderr) when the QA data's documents are not in --db."""

from __future__ import annotations

import json

import pytest

from retrolm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_db, tmp_path_factory):
    import torch

    from retrolm.checkpoints import save_model
    from retrolm.model.config import RetroConfig
    from retrolm.model.retro import Retro

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qa_ckpt") / "model"
    save_model(Retro(RetroConfig.from_name("tiny", vocab_size=tiny_db.vocab_size)), path)
    return path


def _qa(db, checkpoint, data, capsys):
    main(["qa", "--db", str(db), "--checkpoint", str(checkpoint), "--data", str(data), "--mode", "closed-book",
          "--limit", "2", "--max-new-tokens", "1", "--device", "cpu", "--json"])  # fmt: skip
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 2
    return captured.err


def test_warns_when_the_data_cites_documents_the_database_lacks(tiny_db_path, tiny_checkpoint, capsys):
    err = _qa(tiny_db_path, tiny_checkpoint, "builtin:facts", capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ")
    assert "builtin:facts cites are not in the database" in lines[0] and str(tiny_db_path) in lines[0]


def test_no_warning_when_the_documents_are_there(tiny_db_path, tiny_checkpoint, tmp_path, capsys):
    ids = [json.loads(line)["id"] for line in (tiny_db_path / "documents.jsonl").read_text().splitlines()]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(
        json.dumps({"question": f"Where does number {i} live?", "answers": ["river"], "doc_ids": [ids[i]]}) + "\n"
        for i in range(2)
    ))  # fmt: skip
    assert _qa(tiny_db_path, tiny_checkpoint, data, capsys).strip() == ""
