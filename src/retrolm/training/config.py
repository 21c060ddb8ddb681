"""`TrainConfig`: every training setting in one validated dataclass.

The help text of each field is its command-line help: `retrolm train` (and `retrolm
retrofit`) generate their options from these fields. Kept free of torch so that building
the CLI stays fast; the trainer itself is `retrolm.training.trainer`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from retrolm.errors import RetrolmError
from retrolm.validation import check_field_types

# Allowed ranges of the numeric TrainConfig fields: closed [low, high] unless listed below.
_LIMITS: dict[str, tuple[float, float]] = {
    "seq_len": (1, math.inf), "batch_size": (1, math.inf), "grad_accum": (1, math.inf),
    "lr": (0, math.inf), "retrieval_lr_scale": (0, math.inf), "min_lr_ratio": (0, 1),
    "warmup_steps": (0, math.inf), "weight_decay": (0, math.inf), "beta1": (0, 1), "beta2": (0, 1),
    "grad_clip": (0, math.inf), "k": (1, math.inf), "tokens": (1, math.inf), "minutes": (0, math.inf),
    "seed": (0, 2**32 - 1), "checkpoint_every": (0, math.inf), "keep_checkpoints": (1, math.inf),
    "num_workers": (0, math.inf), "replay_share": (0, 1), "wrong_neighbour_share": (0, 1),
}  # fmt: skip
_OPEN_BELOW = {"lr", "retrieval_lr_scale", "minutes"}  # must be > low
_OPEN_ABOVE = {"beta1", "beta2", "replay_share", "wrong_neighbour_share"}  # must be < high


def _range_text(name: str, low: float, high: float) -> str:
    """'>= 1', '> 0', 'in [0, 1)' for an error message."""
    if high == math.inf:
        return f"{'>' if name in _OPEN_BELOW else '>='} {low}"
    return f"in {'(' if name in _OPEN_BELOW else '['}{low}, {high}{')' if name in _OPEN_ABOVE else ']'}"


def _setting(default: Any, help: str, **meta: Any) -> Any:
    """A TrainConfig field with its help text (the CLI options are generated from these)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """How to train. `batch_size` is the GLOBAL batch (sequences per optimizer step),
    whatever the number of processes and accumulation steps. Checked on construction."""

    seq_len: int | None = _setting(
        None, "Sequence length n, a multiple of the chunk size (default: the model's max_seq_len; "
        "retrofit: at most 512).")
    batch_size: int = _setting(8, "Global batch: sequences per optimizer step, whatever the process count.")
    grad_accum: int = _setting(1, "Micro-batches per optimizer step (gradient accumulation).")
    lr: float = _setting(1e-3, "Peak learning rate.")
    retrieval_lr_scale: float = _setting(1.0, "LR multiplier for the neighbour encoder and CCA parameters.")
    min_lr_ratio: float = _setting(0.1, "Cosine floor as a fraction of the peak LR.")
    warmup_steps: int | None = _setting(None, "Linear warm-up steps (default: 5% of the steps, at most 200).")
    weight_decay: float = _setting(0.1, "AdamW weight decay (none on norms, biases and embeddings).")
    beta1: float = _setting(0.9, "AdamW beta1.")
    beta2: float = _setting(0.95, "AdamW beta2.")
    grad_clip: float = _setting(1.0, "Clip the global gradient norm to this (0: no clipping).")
    k: int | None = _setting(
        None, "Neighbours per chunk, at most the database's K (default: the model's own).")
    retrieval: bool = _setting(
        True, "Train RETRO with neighbours; --no-retrieval trains the GPT baseline on the same sequences.")
    exclude_sample_docs: bool = _setting(
        True, "Drop neighbours from any document of the training sample (leakage control).")
    tokens: int | None = _setting(
        None, "Budget in training tokens (default without --minutes: one pass over the train split).")
    minutes: float | None = _setting(
        None, "Budget in minutes, converted to a step count after a short timing probe.")
    bf16: bool = _setting(False, "bfloat16 autocast (for GPUs).")
    compile: bool = _setting(False, "torch.compile the model (for GPUs).")
    seed: int = _setting(0, "Seed for the initial weights, the data order and dropout.")
    checkpoint_every: int = _setting(200, "Save a checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = _setting(3, "Number of newest step checkpoints kept.")
    num_workers: int = _setting(0, "DataLoader worker processes.")
    resume: bool = _setting(False, "Continue from the newest checkpoint in --out (fresh if there is none).")
    init_from: str | None = _setting(
        None, "Continued training: start from this checkpoint directory and re-warm the LR.")
    # re-warm from the floor even without init_from (a retro-fitted module)
    rewarm: bool = _setting(False, "Re-warm the LR from its floor.", cli=False)
    replay_share: float = _setting(
        0.0, "Share of sequences replayed without neighbours, so the decoder keeps working as a GPT.")
    wrong_neighbour_share: float = _setting(
        0.0, "Share of sequences trained with another sequence's neighbours (teaches ignoring them).")
    replay_db: str | None = _setting(
        None, "Database to replay from (default: this database's training data).")
    device: str | None = _setting(None, "cpu, cuda or cuda:N (default: cuda if available, else cpu).")
    progress: bool = _setting(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        for name in ("init_from", "replay_db"):  # paths are stored as strings (JSON state)
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, str(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """One-line RetrolmError naming the first setting of the wrong type or out of range."""
        check_field_types(self, "invalid training setting")
        for name, (low, high) in _LIMITS.items():
            value = getattr(self, name)
            if value is None:
                continue
            low_ok = value > low if name in _OPEN_BELOW else value >= low
            high_ok = value < high if name in _OPEN_ABOVE else value <= high
            if not (low_ok and high_ok):
                raise RetrolmError(
                    f"--{name.replace('_', '-')} must be {_range_text(name, low, high)}, got {value!r} "
                    f"(training setting {name})"
                )
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise RetrolmError(
                f"--device must be cpu, cuda or cuda:N, got {self.device!r} (training setting device)"
            )
        if self.batch_size % self.grad_accum:
            raise RetrolmError(
                f"invalid training setting: batch_size {self.batch_size} must be divisible by "
                f"grad_accum {self.grad_accum} (--batch-size is the global batch)"
            )
        if self.tokens is not None and self.minutes is not None:
            raise RetrolmError("pass either --tokens or --minutes, not both")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
