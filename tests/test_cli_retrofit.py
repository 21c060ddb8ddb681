"""`retrolm retrofit` settings: checked before any work, one line each; the Python API keeps
its older keyword names."""

from __future__ import annotations

import pytest

from retrolm.cli import main
from retrolm.errors import RetrolmError
from retrolm.retrofitting.config import RetrofitConfig


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--cca-layers", "a,b"], "--cca-layers 'a,b': give 1-based layer numbers"),
        (["--cca-layers", "0,3"], "layer numbers are 1-based"),
        (["--k", "0"], "--k must be >= 1, got 0"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_settings_are_one_line(extra, words, tmp_path, capsys):
    argv = ["retrofit", "--source", str(tmp_path / "gpt"), "--db", str(tmp_path / "db"),
            "--out", str(tmp_path / "out"), "--device", "cpu", *extra]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert words in err
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(SystemExit) as exc:
        main(["retrofit", "--source", str(tmp_path), "--db", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "is a file; pass a directory" in capsys.readouterr().err


def test_retrofit_config_types_and_parsing():
    assert RetrofitConfig(cca_layers=(6, 3)).cca_layers == [6, 3]
    with pytest.raises(RetrolmError, match="freeze_decoder must be true or false"):
        RetrofitConfig(freeze_decoder="yes")
    with pytest.raises(RetrolmError, match="enc_layers must be an integer"):
        RetrofitConfig(enc_layers=1.5)
