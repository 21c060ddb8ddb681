"""The database build's directory rules: foreign directories, repair, permissions, warnings."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat

import numpy as np
import pytest

from retrolm.cli import main
from retrolm.db.build import BuildSettings
from retrolm.db.database import RetrievalDB
from retrolm.errors import RetrolmError

SMALL = dict(retriever="bm25", chunk_size=16, vocab_size=512, neighbors=4, split=(80, 10, 10), seed=0)


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.err


def _copy(tiny_bm25_db, tmp_path):
    out = tmp_path / "db"
    shutil.copytree(tiny_bm25_db.path, out)
    return out


def test_a_folder_with_someone_elses_manifest_is_refused_and_kept(tiny_corpus, tmp_path, capsys):
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text(json.dumps({"name": "My app", "icons": [], "format_version": 1}))
    (app / "index.html").write_text("<html></html>")
    code, err = _cli(["db", "build", "--corpus", str(tiny_corpus), "--out", str(app)], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "not a retrolm database" in err
    assert sorted(p.name for p in app.iterdir()) == ["index.html", "manifest.json"]
    file = tmp_path / "file.txt"
    file.write_text("x")
    code, err = _cli(["db", "build", "--corpus", str(tiny_corpus), "--out", str(file)], capsys)
    assert code == 2 and "is a file" in err and err.count("\n") == 1 and file.read_text() == "x"


@pytest.mark.parametrize("drop_manifest", [False, True])
def test_truncated_tokens_are_repaired_by_the_suggested_rebuild(tiny_corpus, tiny_bm25_db, tmp_path, drop_manifest):
    out = _copy(tiny_bm25_db, tmp_path)
    tokens = out / "train" / "tokens.bin"
    data = tokens.read_bytes()
    tokens.write_bytes(data[: len(data) // 2])
    with pytest.raises(RetrolmError, match="wrong size.*same `retrolm db build` command"):
        RetrievalDB.open(out)
    if drop_manifest:
        (out / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="train/tokens.bin .* redoing the streams stage"):
        db = RetrievalDB.build(str(tiny_corpus), out, progress=False, **SMALL)
    assert tokens.read_bytes() == data
    assert db.manifest["files"] == tiny_bm25_db.manifest["files"]
    RetrievalDB.open(out, verify=True)
    for split in ("train", "valid", "test"):
        assert np.array_equal(db.neighbors[split], tiny_bm25_db.neighbors[split])


def test_a_damaged_file_is_redone_and_what_depends_on_it_kept_when_identical(
        tiny_corpus, tiny_bm25_db, tmp_path, monkeypatch):
    import retrolm.db.neighbors as nbmod

    out = _copy(tiny_bm25_db, tmp_path)
    (out / "manifest.json").unlink()
    chunks = out / "train" / "chunks.npy"
    raw = bytearray(chunks.read_bytes())
    raw[-1] ^= 0xFF  # same size, wrong content: only the sha256 can tell
    chunks.write_bytes(bytes(raw))
    calls = []
    real = nbmod.compute_neighbors
    monkeypatch.setattr(nbmod, "compute_neighbors", lambda *a, **k: calls.append(1) or real(*a, **k))
    RetrievalDB.build(str(tiny_corpus), out, progress=False, **SMALL)
    assert chunks.read_bytes() == (tiny_bm25_db.path / "train" / "chunks.npy").read_bytes()
    assert not calls  # the redone chunks came out identical: neighbours reused after their check
    RetrievalDB.open(out, verify=True)


def test_invalid_manifest_is_one_line_everywhere_and_repaired(tiny_corpus, tiny_bm25_db, tmp_path, capsys):
    out = _copy(tiny_bm25_db, tmp_path)
    (out / "manifest.json").write_text('{"format_version": 1, "files": ')
    for argv in (["db", "info", str(out)], ["db", "search", str(out), "otter"],
                 ["train", "--db", str(out), "--model", "tiny", "--out", str(tmp_path / "run")]):
        code, err = _cli(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "not valid JSON" in err, argv
    db = RetrievalDB.build(str(tiny_corpus), out, progress=False, **SMALL)
    assert db.manifest["files"] == tiny_bm25_db.manifest["files"]


def test_files_follow_the_umask(tiny_corpus, tmp_path):
    from retrolm.atomic import atomic_dir

    old = os.umask(0o022)
    try:
        db = RetrievalDB.build(str(tiny_corpus), tmp_path / "db", progress=False, **SMALL)
        with atomic_dir(tmp_path / "final") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    paths = [p for p in db.path.rglob("*")] + [tmp_path / "final"]
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert {m for p, m in modes.items() if (tmp_path / p).is_file()} == {0o644}, modes
    assert {m for p, m in modes.items() if (tmp_path / p).is_dir()} == {0o755}, modes


def test_warnings_for_no_held_out_split_and_a_dominant_document(tmp_path):
    from conftest import synthetic_documents

    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(synthetic_documents(60))]
    rows.append({"id": "huge", "text": " ".join(synthetic_documents(200, seed=1))})
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.warns(UserWarning) as record:
        RetrievalDB.build(str(path), tmp_path / "db", progress=False, **{**SMALL, "split": (100, 0, 0)})
    text = " ".join(str(w.message) for w in record)
    assert "nothing to evaluate" in text
    assert "'huge' holds" in text and "of the database chunks" in text


def test_settings_are_declared_once_for_cli_and_manifest(tiny_bm25_db):
    from retrolm.cli.options import options_from_dataclass

    names = [f.name for f in dataclasses.fields(BuildSettings)]
    assert sorted(tiny_bm25_db.manifest["settings"]) == sorted(names)
    params = {p.name: p.default for p in options_from_dataclass(BuildSettings)}
    assert list(params) == names and all(p.help for p in params.values())
    assert params["corpus"].default is ...  # required
    assert params["near_dedup"].param_decls == ("--near-dedup/--no-near-dedup",)
    assert BuildSettings.from_dict(tiny_bm25_db.manifest["settings"]).to_dict() == tiny_bm25_db.manifest["settings"]


def test_options_helper_builds_the_dataclass(capsys):
    import typer

    from retrolm.cli.options import with_dataclass_options

    @dataclasses.dataclass
    class Cfg:
        name: str = dataclasses.field(metadata={"help": "a name"})
        steps: int = dataclasses.field(default=3, metadata={"help": "how many"})
        fast: bool = dataclasses.field(default=True, metadata={"help": "go fast"})
        pair: tuple[int, int] = dataclasses.field(
            default=(1, 2), metadata={"help": "two", "parse": lambda s: tuple(map(int, s.split(",")))})

    seen = {}
    app = typer.Typer()

    @app.command()
    @with_dataclass_options(Cfg, into="cfg")
    def run(cfg: Cfg, verbose: bool = typer.Option(False, "--verbose", help="talk")) -> None:
        seen.update(cfg=cfg, verbose=verbose)

    app(["--name", "x", "--no-fast", "--pair", "5,6", "--verbose"], standalone_mode=False)
    assert seen == {"cfg": Cfg("x", 3, False, (5, 6)), "verbose": True}
    app(["--name", "y"], standalone_mode=False)
    assert seen["cfg"] == Cfg("y", 3, True, (1, 2))
