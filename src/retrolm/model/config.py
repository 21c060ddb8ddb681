"""`RetroConfig`: every architectural choice of a RETRO model in one validated dataclass.

A config with `cca_layers == []` is a plain GPT; `as_gpt()` gives that baseline for any
preset. CCA layer indices are **1-based** decoder layer numbers, as in the paper
(layer 6 = the sixth block).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from retrolm.errors import RetrolmError
from retrolm.validation import check_field_types


def default_cca_layers(n_layers: int) -> list[int]:
    """1-based CCA layers: every 3rd from 6 (<= 15 layers) or from 9 (deeper), per the paper.

    Shallow models (< 6 layers) would get none, so for them: every 3rd layer counting
    back from the last, never layer 1 unless the model has one layer (the encoder is
    conditioned on hidden states that went through at least one decoder block).
    4 layers -> [4], 5 -> [2, 5], 3 -> [3], 2 -> [2], 1 -> [1].
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if n_layers < 6:
        if n_layers == 1:
            return [1]
        return sorted(range(n_layers, 1, -3))
    start = 6 if n_layers <= 15 else 9
    return list(range(start, n_layers + 1, 3))


@dataclass
class RetroConfig:
    """Architecture of a RETRO decoder + neighbour encoder (a GPT when `cca_layers` is empty)."""

    vocab_size: int = 512
    n_layers: int = 5
    d_model: int = 64
    n_heads: int = 4
    mlp: str = "swiglu"  # "gelu" | "swiglu"
    mlp_ratio: float = 4.0  # hidden width = mlp_ratio * d_model (swiglu: 2/3 of that, x8 rounded)
    d_ff: int | None = None  # explicit MLP hidden width; overrides mlp_ratio
    chunk_size: int = 16  # m
    n_neighbors: int = 2  # k (training); fewer at run time is fine
    neighbor_len: int | None = None  # r; None -> 2m (chunk + continuation)
    continuation: bool = True  # r must be 2m when True, m when False
    cca_layers: list[int] | None = None  # 1-based; None -> default_cca_layers(n_layers)
    enc_layers: int = 2
    enc_d_model: int | None = None  # None -> d_model
    enc_heads: int | None = None  # None -> n_heads
    # Neighbour copy head (beyond the paper; docs/model.md): a pointer-sentinel mixture that
    # moves probability onto the successor tokens of matched neighbour positions.
    copy_head: bool = False
    copy_dim: int = 64  # width of the copy head's query/key space
    copy_match: int = 2  # exact-match features: suffixes of length 1..copy_match (0: none)
    copy_decoder_loss: float = 1.0  # weight of the decoder-alone loss added in training
    dropout: float = 0.0
    tie_embeddings: bool = True
    max_seq_len: int = 256
    rope_base: float = 10000.0
    pad_id: int = 0
    norm_eps: float = 1e-5
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, saved with the config

    def __post_init__(self) -> None:
        check_field_types(self, "invalid model config")
        if self.neighbor_len is None:
            self.neighbor_len = 2 * self.chunk_size if self.continuation else self.chunk_size
        if self.cca_layers is None:
            self.cca_layers = default_cca_layers(self.n_layers) if self.n_layers >= 1 else []
        self.cca_layers = sorted(int(i) for i in self.cca_layers)
        if self.enc_d_model is None:
            self.enc_d_model = self.d_model
        if self.enc_heads is None:
            self.enc_heads = self.n_heads
        if self.d_ff is None:
            hidden = self.mlp_ratio * self.d_model
            if self.mlp == "swiglu":  # same parameter count as a gelu MLP of mlp_ratio
                hidden = 2 * hidden / 3
            self.d_ff = int(-(-int(hidden) // 8) * 8)
        self.validate()

    # -- validation ---------------------------------------------------------------------

    def validate(self) -> None:
        """Raise RetrolmError (a ValueError-like user error) naming the bad field."""

        def bad(msg: str) -> None:
            raise RetrolmError(f"invalid model config: {msg}")

        check_field_types(self, "invalid model config")

        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "chunk_size", "n_neighbors",
                     "enc_layers", "enc_d_model", "enc_heads", "max_seq_len", "d_ff",
                     "copy_dim"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(f"{name} must be a positive integer, got {value!r}")
        if self.mlp not in ("gelu", "swiglu"):
            bad(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.d_model % self.n_heads:
            bad(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            bad(
                f"decoder head width {self.d_model // self.n_heads} must be even (rotary positions)"
            )
        if self.enc_d_model % self.enc_heads:
            bad(f"enc_d_model {self.enc_d_model} is not divisible by enc_heads {self.enc_heads}")
        if (self.enc_d_model // self.enc_heads) % 2:
            bad(f"encoder head width {self.enc_d_model // self.enc_heads} must be even (rotary)")
        want_r = 2 * self.chunk_size if self.continuation else self.chunk_size
        if self.neighbor_len != want_r:
            what = "2m (chunk + continuation)" if self.continuation else "m (continuation=False)"
            bad(f"neighbor_len r={self.neighbor_len} must be {what} = {want_r} for chunk_size "
                f"{self.chunk_size}; set continuation=False for r = m")  # fmt: skip
        for i in self.cca_layers:
            if not 1 <= i <= self.n_layers:
                bad(f"CCA layer {i} is out of range 1..{self.n_layers} (indices are 1-based)")
        if len(set(self.cca_layers)) != len(self.cca_layers):
            bad(f"duplicate CCA layers {self.cca_layers}")
        if not isinstance(self.copy_match, int) or not 0 <= self.copy_match <= 8:
            bad(f"copy_match must be an integer in 0..8, got {self.copy_match!r}")
        if not isinstance(self.copy_decoder_loss, (int, float)) or self.copy_decoder_loss < 0:
            bad(f"copy_decoder_loss must be a number >= 0, got {self.copy_decoder_loss!r}")
        if self.copy_head and not self.cca_layers:
            bad("copy_head needs at least one CCA layer (its keys come from the neighbour encoder)")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("mlp_ratio", "rope_base", "norm_eps"):
            if not getattr(self, name) > 0:
                bad(f"{name} must be a number > 0, got {getattr(self, name)!r}")
        if not 0 <= self.pad_id < self.vocab_size:
            bad(f"pad_id {self.pad_id} is outside the vocabulary (size {self.vocab_size})")
        if self.max_seq_len < self.chunk_size:
            bad(f"max_seq_len {self.max_seq_len} is shorter than one chunk ({self.chunk_size})")

    # -- derived ------------------------------------------------------------------------

    @property
    def enc_d_ff(self) -> int:
        """Encoder MLP width: the decoder's d_ff scaled to the encoder width (multiple of 8)."""
        return max(8, round(self.d_ff * self.enc_d_model / self.d_model / 8) * 8)

    @property
    def is_retro(self) -> bool:
        """True when the decoder has at least one chunked cross-attention layer."""
        return bool(self.cca_layers)

    def as_gpt(self) -> RetroConfig:
        """The same decoder without CCA (and so without an encoder): the GPT baseline."""
        return dataclasses.replace(self, cca_layers=[], copy_head=False, extra=dict(self.extra))

    # -- (de)serialisation ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict with every field resolved (no None defaults left)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetroConfig:
        """Inverse of `to_dict`; unknown keys are refused (they usually mean a typo)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RetrolmError(f"unknown model config field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)

    def save_json(self, path: str | os.PathLike[str]) -> None:
        """Write the config atomically as JSON."""
        from retrolm.atomic import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> RetroConfig:
        """Read a config written by `save_json`."""
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, json.JSONDecodeError) as err:
            raise RetrolmError(f"cannot read model config {path}: {err}") from err
        if not isinstance(data, dict):
            raise RetrolmError(f"model config {path} is not a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> RetroConfig:
        """A named preset (see `PRESETS`), with field overrides."""
        if name not in PRESETS:
            raise RetrolmError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Encoder: 2 layers as in the paper; width 896 (DeepMind) for medium/xl, the decoder's for small
# (keeps small's overhead near the paper's 126M -> 148M).
PRESETS: dict[str, dict[str, Any]] = {
    # tests: ~0.3M params, CCA at [2, 5] (shallow rule), encoder narrower than the decoder
    "tiny": dict(vocab_size=512, n_layers=5, d_model=64, n_heads=4, chunk_size=16,
                 n_neighbors=2, enc_layers=2, enc_d_model=48, enc_heads=4, max_seq_len=256),
    # the CPU demo: ~15M params at vocab 8192, CCA at [6]; a narrow encoder because it sees
    # k*r/m = 4 neighbour tokens per decoder token (train FLOPs +36% over the GPT at T=512)
    "cpu-small": dict(vocab_size=8192, n_layers=6, d_model=384, n_heads=6, chunk_size=64,
                      n_neighbors=2, enc_layers=2, enc_d_model=192, enc_heads=4,
                      max_seq_len=512),
    "small": dict(vocab_size=50304, n_layers=12, d_model=768, n_heads=12, chunk_size=64,
                  n_neighbors=2, enc_layers=2, enc_d_model=768, enc_heads=12, max_seq_len=2048),
    "medium": dict(vocab_size=50304, n_layers=24, d_model=1024, n_heads=16, chunk_size=64,
                   n_neighbors=2, enc_layers=2, enc_d_model=896, enc_heads=14, max_seq_len=2048),
    "xl": dict(vocab_size=50304, n_layers=24, d_model=2048, n_heads=32, chunk_size=64,
               n_neighbors=2, enc_layers=2, enc_d_model=896, enc_heads=14, max_seq_len=2048),
}  # fmt: skip
