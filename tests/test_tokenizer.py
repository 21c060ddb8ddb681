"""Byte-level BPE training, save/load and EOS/PAD handling."""

from __future__ import annotations

import pytest

from retrolm.errors import RetrolmError
from retrolm.tokenizer import EOS, PAD, Tokenizer


def test_train_round_trip_save_load(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog"] * 20 + ["café ünïcode 🚀 tabs\tand\nnewlines"]
    tok = Tokenizer.train_bpe(texts, 300)
    assert tok.vocab_size <= 300
    assert tok.inner.token_to_id(EOS) == tok.eos_id and tok.inner.token_to_id(PAD) == tok.pad_id
    for t in texts[-2:]:
        assert tok.decode(tok.encode(t)) == t
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges learned
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path)
    assert again.encode(texts[-1]) == tok.encode(texts[-1])
    assert (again.eos_id, again.pad_id) == (tok.eos_id, tok.pad_id)
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


def test_load_adds_missing_specials(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    hf = HF(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "t.json"))
    tok = Tokenizer.load(tmp_path / "t.json")
    assert tok.eos_id == 3 and tok.pad_id == 4 and tok.vocab_size == 5


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(RetrolmError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RetrolmError, match="cannot read"):
        Tokenizer.load(tmp_path / "bad.json")
    with pytest.raises(RetrolmError, match="too small"):
        Tokenizer.train_bpe(["x"], 100)
