"""One CLI: --version, help text for every option, flags shown as flags, one --device rule."""

from __future__ import annotations

import dataclasses
import re

import pytest
import typer

from retrolm.cli import app, main
from retrolm.cli.device import DEVICE_HELP

COMMANDS = [
    ("train",), ("retrofit",), ("eval",), ("qa",), ("qa", "finetune"), ("demo",), ("generate",), ("serve",),
    ("db", "build"), ("db", "info"), ("db", "search"),
]
WITH_DEVICE = [("train",), ("retrofit",), ("eval",), ("qa",), ("qa", "finetune"), ("generate",), ("serve",)]


def _command(path):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def _options(path):
    return [p for p in _command(path).params if p.param_type_name == "option"]


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_option_has_help_and_flags_are_flags(path, capsys):
    for option in _options(path):
        assert option.help and option.help.strip(), f"{' '.join(path)} {option.opts[0]} has no help"
    main([*path, "--help"])
    text = capsys.readouterr().out
    assert "<bool>" not in text and "Usage: retrolm " + " ".join(path) in text
    listed = text.split("Options:", 1)[1]
    for option in _options(path):
        if option.required:  # its entry: from its name to the next option's
            entry = re.search(rf"^  {re.escape(option.opts[0])}\b(.*?)(?=^  -|\Z)", listed, re.M | re.S)
            assert entry and "[required]" in entry.group(1), option.opts[0]


@pytest.mark.parametrize("path", WITH_DEVICE, ids=" ".join)
def test_one_device_rule(path):
    (device,) = [o for o in _options(path) if "--device" in o.opts]
    assert device.help == DEVICE_HELP and device.default is None


def test_train_config_device_help_is_the_cli_rule():
    from retrolm.training.config import TrainConfig

    (field,) = [f for f in dataclasses.fields(TrainConfig) if f.name == "device"]
    assert field.metadata["help"] == DEVICE_HELP


def test_resolve_device():
    import torch

    from retrolm.cli.device import resolve_device
    from retrolm.errors import RetrolmError

    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(RetrolmError, match="choose cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RetrolmError, match="no CUDA device"):
            resolve_device("cuda")


def test_version(capsys):
    from retrolm import __version__

    main(["--version"])
    assert capsys.readouterr().out.strip() == f"retrolm {__version__}"


def test_retrofit_options_come_from_the_dataclasses_once():
    from retrolm.retrofitting.config import RetrofitConfig

    names = [o.opts[0] for o in _options(("retrofit",))]
    assert len(names) == len(set(names))  # k and lr once: from RetrofitConfig
    for field in dataclasses.fields(RetrofitConfig):
        assert "--" + field.name.replace("_", "-") in names
    assert "--resume" not in names and "--init-from" not in names and "--retrieval" not in names
    assert RetrofitConfig().peak_lr() == 1e-4 and RetrofitConfig(freeze_decoder=True).peak_lr() == 1e-3
