"""Byte-level BPE tokenizer (HF `tokenizers`) with EOS and PAD always defined."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from retrolm.errors import RetrolmError

EOS = "<|endoftext|>"
PAD = "<|pad|>"


class Tokenizer:
    """Thin wrapper so the rest of retrolm sees `encode/decode/eos_id/pad_id/vocab_size`."""

    def __init__(self, inner, eos_id: int, pad_id: int) -> None:
        self.inner = inner
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE on `texts` with `<|endoftext|>` and `<|pad|>` as specials."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 260:
            raise RetrolmError(f"--vocab-size {vocab_size} is too small; byte-level BPE needs at least 260")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS, PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, tok.token_to_id(EOS), tok.token_to_id(PAD))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json file or an HF tokenizer directory; add EOS/PAD if missing."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise RetrolmError(f"tokenizer {str(path)!r} not found; pass a tokenizer.json or a directory holding one")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise RetrolmError(f"cannot read tokenizer {str(file)!r}: {err}") from None
        eos = _first_id(tok, [EOS, "</s>", "<eos>", "[SEP]"])
        if eos is None:
            tok.add_special_tokens([EOS])
            eos = tok.token_to_id(EOS)
        pad = _first_id(tok, [PAD, "<pad>", "[PAD]"])
        if pad is None:
            tok.add_special_tokens([PAD])
            pad = tok.token_to_id(PAD)
        return cls(tok, eos, pad)

    def save(self, path: str | Path) -> None:
        from retrolm.atomic import atomic_path

        with atomic_path(path) as tmp:
            self.inner.save(str(tmp))

    @property
    def vocab_size(self) -> int:
        return int(self.inner.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.inner.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.inner.decode([int(i) for i in ids], skip_special_tokens=True)


def _first_id(tok, names: list[str]) -> int | None:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return int(i)
    return None
