"""Checkpoint directories: config.json + model.safetensors round trip, mismatches refused."""

from __future__ import annotations

import json

import pytest
import torch

from retrolm.errors import RetrolmError
from retrolm.model.checkpoint import load_model, save_model
from retrolm.model.config import RetroConfig
from retrolm.model.retro import Retro


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 512, (2, 40), generator=g), torch.randint(
        0, 512, (2, 3, 2, 32), generator=g
    )


@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=False, mlp="gelu")])
def test_round_trip_gives_identical_logits(tmp_path, overrides: dict) -> None:
    torch.manual_seed(0)
    model = Retro(RetroConfig.from_name("tiny", **overrides)).eval()
    tokens, neighbours = inputs()
    save_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = load_model(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    assert torch.equal(loaded(tokens, neighbours)[0], model(tokens, neighbours)[0])
    if model.config.tie_embeddings:  # tying survives the round trip
        assert loaded.lm_head.weight.data_ptr() == loaded.tok_emb.weight.data_ptr()
    again = Retro.from_pretrained(str(tmp_path / "ckpt"))
    assert torch.equal(again(tokens)[0], model(tokens)[0])


def test_config_that_does_not_match_the_weights_is_refused(tmp_path) -> None:
    Retro(RetroConfig.from_name("tiny")).save_pretrained(str(tmp_path / "ckpt"))
    config_file = tmp_path / "ckpt" / "config.json"
    original = json.loads(config_file.read_text())
    for change, words in [({"d_model": 96}, "shape of"), ({"n_layers": 6}, "missing"),
                          ({"cca_layers": [5]}, "unexpected")]:  # fmt: skip
        config_file.write_text(json.dumps({**original, **change}))
        with pytest.raises(RetrolmError, match=f"does not match .*{words}"):
            load_model(tmp_path / "ckpt")


def test_incomplete_or_corrupt_directory_is_refused(tmp_path) -> None:
    with pytest.raises(RetrolmError, match="not a model directory"):
        load_model(tmp_path)
    Retro(RetroConfig.from_name("tiny")).save_pretrained(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RetrolmError, match="cannot read"):
        load_model(tmp_path / "ckpt")
