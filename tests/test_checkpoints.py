"""Model directories (retrolm.checkpoints): round trip for both model kinds, run directories,
checksums, byte-reproducible weights, and `check_fits` against a database."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from retrolm.checkpoints import check_fits, load_checkpoint, resolve_checkpoint_dir, save_model
from retrolm.errors import RetrolmError
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
        "checksums.json",
        "config.json",
        "model.safetensors",
    ]
    loaded = load_checkpoint(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    assert torch.equal(loaded(tokens, neighbours)[0], model(tokens, neighbours)[0])
    if model.config.tie_embeddings:  # tying survives the round trip
        assert loaded.lm_head.weight.data_ptr() == loaded.tok_emb.weight.data_ptr()
    again = Retro.from_pretrained(str(tmp_path / "ckpt"))
    assert torch.equal(again(tokens)[0], model(tokens)[0])


def test_config_that_does_not_match_the_weights_is_refused(tmp_path) -> None:
    Retro(RetroConfig.from_name("tiny")).save_pretrained(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "checksums.json").unlink()  # else the edit fails the checksums first
    config_file = tmp_path / "ckpt" / "config.json"
    original = json.loads(config_file.read_text())
    for change, words in [({"d_model": 96}, "shape of"), ({"n_layers": 6}, "missing"),
                          ({"cca_layers": [5]}, "unexpected")]:  # fmt: skip
        config_file.write_text(json.dumps({**original, **change}))
        with pytest.raises(RetrolmError, match=f"does not match .*{words}"):
            load_checkpoint(tmp_path / "ckpt")


def test_incomplete_or_corrupt_directory_is_refused(tmp_path) -> None:
    with pytest.raises(RetrolmError, match="not a model directory"):
        load_checkpoint(tmp_path)
    Retro(RetroConfig.from_name("tiny")).save_pretrained(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RetrolmError, match="damaged: model.safetensors fails its sha256 check"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "checksums.json").unlink()  # a directory from before checksums
    with pytest.raises(RetrolmError, match="cannot read"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_flipped_bit_in_the_weights_is_refused_in_one_line(tmp_path) -> None:
    Retro(RetroConfig.from_name("tiny")).save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x40  # a float's exponent bit: loads fine, predicts nonsense
    weights.write_bytes(bytes(data))
    with pytest.raises(RetrolmError, match="is damaged") as err:
        Retro.from_pretrained(tmp_path / "ckpt")
    assert "\n" not in str(err.value)


_SAVE = """
import sys, torch
from retrolm.model.config import RetroConfig
from retrolm.model.retro import Retro
torch.manual_seed(0)
Retro(RetroConfig.from_name("tiny", copy_head=True)).save_pretrained(sys.argv[1])
"""


def test_two_identical_saves_are_byte_identical(tmp_path) -> None:
    # separate processes: safetensors' metadata order depends on the process's hash seed
    for name, seed in (("a", "1"), ("b", "2")):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", _SAVE, str(tmp_path / name)], check=True, env=env)
    for file in ("model.safetensors", "config.json", "checksums.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    header = (tmp_path / "a" / "model.safetensors").read_bytes()[8:200].decode("utf-8", "replace")
    assert header.startswith('{"__metadata__":{"format":"pt","retrolm":"1"}')


def test_a_run_directory_resolves_to_final_else_the_newest_step(tmp_path) -> None:
    model = Retro(RetroConfig.from_name("tiny")).eval()
    for step in (2, 4):
        save_model(model, tmp_path / "run" / "checkpoints" / f"step_{step:06d}")
        (tmp_path / "run" / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").write_text("{}")
    assert resolve_checkpoint_dir(tmp_path / "run").name == "step_000004"
    save_model(model, tmp_path / "run" / "final")
    assert resolve_checkpoint_dir(tmp_path / "run") == tmp_path / "run" / "final"
    loaded = Retro.from_pretrained(tmp_path / "run")  # a run dir, as the CLI accepts
    tokens = torch.randint(0, 512, (1, 20))
    assert torch.equal(loaded(tokens)[0], model(tokens)[0])
    with pytest.raises(RetrolmError, match="not a model directory"):
        resolve_checkpoint_dir(tmp_path)


def test_from_pretrained_loads_a_retro_fitted_gpt2(tmp_path) -> None:
    pytest.importorskip("transformers")
    from retrolm.retrofitting.hf_gpt2 import GPT2Retro, gpt2_retro_config

    hf = {"model_type": "gpt2", "vocab_size": 100, "n_embd": 32, "n_layer": 2, "n_head": 2,
          "n_positions": 64, "activation_function": "gelu_new"}  # fmt: skip
    torch.manual_seed(0)
    model = GPT2Retro(gpt2_retro_config(hf, 100, 8, enc_d_model=16, enc_heads=2)).eval()
    model.save_pretrained(tmp_path / "gpt2")
    loaded = Retro.from_pretrained(tmp_path / "gpt2")
    assert isinstance(loaded, GPT2Retro)
    tokens = torch.randint(0, 100, (1, 24))
    neighbours = torch.randint(0, 100, (1, 3, 2, 16))
    assert torch.equal(loaded(tokens, neighbours)[0], model(tokens, neighbours)[0])


def test_the_model_package_does_not_import_the_checkpoint_module() -> None:
    code = "import sys, retrolm.model.retro; print('retrolm.checkpoints' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"


# -- check_fits ------------------------------------------------------------------------------------


def test_check_fits_compares_tokenizer_vocabulary_chunk_size_and_k(tiny_db, tmp_path) -> None:
    config = RetroConfig.from_name("tiny", vocab_size=tiny_db.vocab_size, chunk_size=16, n_neighbors=1)
    directory = save_model(Retro(config), tmp_path / "ok")
    shutil.copy2(tiny_db.path / "tokenizer.json", directory / "tokenizer.json")
    assert check_fits(directory, tiny_db) == 1  # the k the model was trained with
    assert check_fits(directory, tiny_db, 3) == 3
    stored = int(tiny_db.neighbors["train"].shape[1])
    with pytest.raises(RetrolmError, match=f"stores {stored}"):
        check_fits(directory, tiny_db, stored + 1, stored_neighbours=True)
    (directory / "tokenizer.json").write_text('{"another": "tokenizer"}')
    with pytest.raises(RetrolmError, match="another tokenizer"):
        check_fits(directory, tiny_db)
    for change, words in ((dict(vocab_size=600), "has 600 tokens"), (dict(chunk_size=8), "m=8")):
        other = RetroConfig.from_name("tiny", **{"vocab_size": tiny_db.vocab_size, **change})
        with pytest.raises(RetrolmError, match=words):
            check_fits(Retro(other), tiny_db)
    gpt = Retro(RetroConfig.from_name("tiny", vocab_size=tiny_db.vocab_size, chunk_size=8).as_gpt())
    check_fits(gpt, tiny_db)  # a GPT does not care about the chunk size


def test_sorting_the_safetensors_header_keeps_the_tensors(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from retrolm.checkpoints import _sort_header_metadata

    tensors = {"b": torch.arange(5.0), "a": torch.ones(2, 3)}
    meta = {f"key{i}": str(i) for i in range(8)}  # hash-map order: sorted by chance 1 in 40320
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata=meta)
    size = (tmp_path / "w.safetensors").stat().st_size
    _sort_header_metadata(tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert list(header["__metadata__"]) == sorted(meta) and len(data) == size
    loaded = load_file(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as handle:
        assert handle.metadata() == meta
