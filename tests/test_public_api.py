"""The public Python API: stable top-level names, and the README's example run verbatim."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import retrolm

README = Path(__file__).resolve().parents[1] / "README.md"
EXPECTED = {
    "RetrievalDB": "class", "RetroConfig": "class", "Retro": "class", "TrainConfig": "class",
    "RetrolmError": "class", "load_checkpoint": "function", "train": "function",
    "evaluate": "function", "generate": "function", "retrofit": "function",
}


def test_top_level_names_keep_their_meaning_after_importing_every_submodule():
    for info in pkgutil.walk_packages(retrolm.__path__, "retrolm."):
        importlib.import_module(info.name)
    for name, kind in EXPECTED.items():
        value = getattr(retrolm, name)
        assert (isinstance(value, type) if kind == "class" else callable(value) and not isinstance(value, type)), name
        assert not hasattr(value, "__path__") and type(value).__name__ != "module", name
    assert set(EXPECTED) <= set(dir(retrolm)) and set(EXPECTED) <= set(retrolm.__all__)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        retrolm.nope  # noqa: B018


def _readme_python_api() -> str:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


def test_readme_python_api_runs_verbatim(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_python_api(), str(README), "exec"), {"__name__": "readme"})  # noqa: S102
    out = capsys.readouterr().out.strip().splitlines()
    assert "Fubra" in out[0]  # the search found the fact
    scores = eval(out[-1])  # noqa: S307 - our own printed dict
    assert set(scores) == {"RETRO", "RETRO-off", "RETRO-shuffled"}
    assert all(value > 1 for value in scores.values())
    assert (tmp_path / "runs" / "api-retro" / "final" / "model.safetensors").is_file()
