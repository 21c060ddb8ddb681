"""`retrolm train` through the CLI: options generated from TrainConfig, settings checked up
front (one line, exit 2, no traceback), Ctrl-C exits 130 and says where to resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import default_sigint
from retrolm.cli import main
from retrolm.training import checkpointing as ckpt
from retrolm.training.config import TrainConfig


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def _train_args(db, out, *extra):
    return ["train", "--db", str(db), "--model", "tiny", "--out", str(out), "--device", "cpu", *extra]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0 (training setting batch_size)"),
        (["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
        (["--batch-size", "8", "--grad-accum", "3"], "divisible by grad_accum 3"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--wrong-neighbour-share", "1"], "must be in [0, 1)"),
        (["--tokens", "64", "--minutes", "1"], "either --tokens or --minutes"),
    ],
)
def test_bad_settings_are_one_line_before_any_work(extra, words, tmp_path, capsys):
    code, _, err = _run(_train_args(tmp_path / "no_db", tmp_path / "out", *extra), capsys)
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0
    assert words in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("cca_layers", "abc", "cca_layers must be a list of integers or null, got 'abc'"),
        ("dropout", "0.1", "dropout must be a number, got '0.1'"),
        ("tie_embeddings", "no", "tie_embeddings must be true or false, got 'no'"),
        ("n_layers", 2.5, "n_layers must be an integer"),
        ("norm_eps", -1, "norm_eps must be a number > 0, got -1"),
    ],
)
def test_bad_model_config_json_is_one_line(field, value, words, tiny_db_path, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"chunk_size": 16, field: value}))
    code, _, err = _run(_train_args(tiny_db_path, tmp_path / "out", "--model", str(config)), capsys)
    assert code == 2 and err.startswith("error: invalid model config: ") and err.count("\n") == 1
    assert words in err
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused(tiny_db_path, tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("not a directory")
    code, _, err = _run(_train_args(tiny_db_path, out), capsys)
    assert code == 2 and "is a file; pass a directory" in err


def test_every_train_config_field_is_an_option_with_help(capsys):
    main(["train", "--help"])  # exit status 0: main returns
    text = " ".join(capsys.readouterr().out.split())
    for name in ("--batch-size", "--grad-accum", "--weight-decay", "--wrong-neighbour-share", "--replay-db",
                 "--retrieval / --no-retrieval", "--compile / --no-compile", "--resume / --no-resume"):  # fmt: skip
        assert name in text, name
    assert "<bool>" not in text and "[required]" in text
    assert "--progress" not in text  # excluded: the CLI always shows progress


def test_ctrl_c_exits_130_and_keeps_the_last_checkpoint(tiny_db_path, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "retrolm", *_train_args(tiny_db_path, out, "--tokens", str(10_000 * 64),
            "--batch-size", "2", "--seq-len", "32", "--checkpoint-every", "2")]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not ckpt.list_checkpoints(out):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared in 90 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(r"interrupted at step (\d+) \(last checkpoint: step (\d+)\); resume with --resume", last)
    assert match, last
    step, saved = int(match.group(1)), int(match.group(2))
    assert 2 <= saved <= step and "Traceback" not in err
    assert ckpt.list_checkpoints(out)[-1][0] == saved
    state = json.loads((ckpt.step_dir(out, saved) / ckpt.TRAINER_STATE).read_text())
    assert state["step"] == saved and not (out / ckpt.FINAL).exists()


def test_ctrl_c_in_any_command_exits_130(tiny_db_path, tmp_path, monkeypatch, capsys):
    import retrolm.evaluation.perplexity as perplexity

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(perplexity, "evaluate", interrupted)
    code, _, err = _run(["eval", "--db", str(tiny_db_path), "--checkpoint", str(tmp_path)], capsys)
    assert code == 130 and err.strip() == "interrupted"


def test_train_config_is_checked_on_construction():
    from retrolm.errors import RetrolmError

    with pytest.raises(RetrolmError, match="resume must be true or false"):
        TrainConfig(resume="yes")
    with pytest.raises(RetrolmError, match="batch_size must be an integer"):
        TrainConfig(batch_size=True)
    assert TrainConfig(init_from=Path("runs/a")).init_from == "runs/a"  # a string in trainer_state.json
