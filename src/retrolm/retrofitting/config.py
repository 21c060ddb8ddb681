"""`RetrofitConfig`: what retro-fitting adds to a GPT and how it trains, in one checked dataclass.

The training itself is configured by `TrainConfig`; these are the settings only retro-fitting
has. Each field's help is its `retrolm retrofit` option. Free of torch (the CLI reads it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from retrolm.errors import RetrolmError
from retrolm.validation import check_field_types


def parse_layers(text: str) -> list[int]:
    """'6,9,12' -> [6, 9, 12] (1-based decoder layers)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RetrolmError(f"--cca-layers {text!r}: give 1-based layer numbers like 6,9,12") from None


def _setting(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class RetrofitConfig:
    """The new parts (CCA layers, encoder, neighbours), which parameters train, the peak LR."""

    freeze_decoder: bool = _setting(
        False, "Train only the encoder + CCA (DeepMind); default: every parameter (InstructRetro).")
    cca_layers: list[int] | None = _setting(
        None, "1-based decoder layers that get CCA, e.g. 6,9,12 (default: the paper's placement).",
        parse=parse_layers, format=lambda layers: ",".join(map(str, layers)))
    enc_layers: int = _setting(2, "Neighbour encoder layers.")
    enc_d_model: int | None = _setting(
        None, "Encoder width (default: the source's encoder width; half the width for an HF GPT-2).")
    k: int = _setting(2, "Neighbours per chunk of the retro-fitted model.")
    lr: float | None = _setting(
        None, "Peak LR (default: 1e-3 with --freeze-decoder, 1e-4 for full training).")
    eval_sequences: int = _setting(64, "Valid sequences for the perplexity before and after.")

    def __post_init__(self) -> None:
        check_field_types(self, "invalid retrofit setting")
        if isinstance(self.cca_layers, tuple):
            self.cca_layers = list(self.cca_layers)
        for name in ("enc_layers", "enc_d_model", "k", "eval_sequences"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RetrolmError(f"--{name.replace('_', '-')} must be >= 1, got {value!r}")
        if self.lr is not None and not self.lr > 0:
            raise RetrolmError(f"--lr must be > 0, got {self.lr!r}")
        if self.cca_layers is not None and any(i < 1 for i in self.cca_layers):
            raise RetrolmError(f"--cca-layers {self.cca_layers}: layer numbers are 1-based (>= 1)")

    def peak_lr(self) -> float:
        """`lr`, else the mode's default: new parts alone take 1e-3, the whole model 1e-4."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.freeze_decoder else 1e-4

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
