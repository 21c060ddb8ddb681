"""Learning-rate schedule: linear warm-up, cosine decay to a floor, and re-warm.

Continued training (retro-fitting, more tokens on a finished model) follows the
continual-pretraining recipe of docs/reference.md §3: re-warm linearly from where the previous run
ended (its floor) up to the new peak, then re-decay with a cosine. A fresh run is the
same shape with the warm-up starting at 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from retrolm.errors import RetrolmError


@dataclass(frozen=True)
class LRSchedule:
    """LR for optimizer step t (0-based): warm-up over `warmup_steps`, cosine to the floor.

    - steps [0, warmup_steps): linear from `start_lr` to `max_lr` (step 0 is one step
      in, not `start_lr` itself, so a fresh run never takes a zero-LR step);
    - steps [warmup_steps, total_steps): cosine from `max_lr` to `max_lr * min_lr_ratio`;
    - steps >= total_steps: the floor.
    """

    max_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    start_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.max_lr <= 0:
            raise RetrolmError(f"learning rate must be > 0, got {self.max_lr}; pass e.g. --lr 1e-3")
        if self.total_steps < 1:
            raise RetrolmError(
                f"training needs at least one step, got {self.total_steps}; raise --tokens/--minutes"
            )
        if self.warmup_steps < 0:
            raise RetrolmError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise RetrolmError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.start_lr < 0:
            raise RetrolmError(f"start_lr must be >= 0, got {self.start_lr}")

    @property
    def min_lr(self) -> float:
        return self.max_lr * self.min_lr_ratio

    def lr(self, step: int) -> float:
        """Learning rate to use for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            frac = (step + 1) / self.warmup_steps
            return self.start_lr + frac * (self.max_lr - self.start_lr)
        decay_steps = self.total_steps - self.warmup_steps
        if step >= self.total_steps or decay_steps <= 0:
            return self.min_lr if decay_steps > 0 else self.max_lr
        progress = (step - self.warmup_steps) / decay_steps  # in [0, 1)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + cosine * (self.max_lr - self.min_lr)

    def with_total(self, total_steps: int, warmup_steps: int | None = None) -> LRSchedule:
        """The same schedule with a new length (used once a --minutes probe ends)."""
        warmup = self.warmup_steps if warmup_steps is None else warmup_steps
        return LRSchedule(self.max_lr, total_steps, warmup, self.min_lr_ratio, self.start_lr)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LRSchedule:
        return cls(**data)


def rewarm(
    previous: LRSchedule | None,
    max_lr: float,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float = 0.1,
) -> LRSchedule:
    """Schedule for continued training: re-warm from the previous run's final LR, re-decay.

    Without a previous schedule (e.g. a checkpoint from elsewhere) the warm-up starts at
    the new floor, which is what the previous run would have ended at had it used the
    same peak.
    """
    start = previous.lr(previous.total_steps) if previous is not None else max_lr * min_lr_ratio
    return LRSchedule(max_lr, total_steps, warmup_steps, min_lr_ratio, start_lr=start)
