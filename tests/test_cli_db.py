"""`retrolm db` through the real CLI entry point: errors are one line with exit code 2."""

from __future__ import annotations

import json

import pytest

from retrolm.cli import main


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "split"])
def test_bad_inputs_give_one_line_and_exit_2(case, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    if case == "empty":
        corpus.mkdir()
    elif case in ("binary", "split"):
        corpus.mkdir()
        (corpus / "x.txt").write_bytes(b"\x00\x01\x02" if case == "binary" else b"hello world")
    args = ["db", "build", "--corpus", str(corpus), "--out", str(tmp_path / "db")]
    if case == "split":
        args += ["--split", "98,1"]
    code, _, err = _run(args, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.strip().count("\n") == 0
    expected = {"missing": str(corpus), "empty": "no readable", "binary": "no readable", "split": "--split"}[case]
    assert expected in err
    assert not (tmp_path / "db" / "manifest.json").exists()


def test_info_and_search(tiny_db_path, capsys):
    main(["db", "info", str(tiny_db_path), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["settings"]["chunk_size"] == 16 and info["counts"]["train"]["chunks"] > 100
    main(["db", "search", str(tiny_db_path), "otter eats fish at dawn", "-k", "2", "--json"])
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and {"chunk_id", "doc_id", "score", "text", "continuation"} <= hits[0].keys()
    main(["db", "search", str(tiny_db_path), "otter eats fish", "-k", "1"])
    assert "score" in capsys.readouterr().out
    code, _, err = _run(["db", "info", str(tiny_db_path.parent / "nope")], capsys)
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["db", "build", "builtin:pydocs", "/tmp/x"], "Missing option '--corpus'"),
        (["train", "--db", "x"], "Missing option '--model'"),
        (["db", "build", "--corpus", "c", "--out", "o", "--no-such-flag"], "No such option"),
    ],
)
def test_usage_errors_are_messages_not_tracebacks(argv, expected, capsys):
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert expected in err and "Traceback" not in err


def test_a_database_with_other_settings_needs_overwrite(tiny_bm25_db, tiny_corpus, tmp_path, capsys):
    import shutil

    out = tmp_path / "db"
    shutil.copytree(tiny_bm25_db.path, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, _, err = _run(["db", "build", "--corpus", str(tiny_corpus), "--out", str(out), "--retriever", "bm25"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "chunk_size 16 -> 64" in err and "--overwrite" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
