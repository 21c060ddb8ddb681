"""Replay for continued training: mix a share of "original data" sequences into a dataset.

Continual pretraining (docs/reference.md §3; Ibrahim et al.) replays a small share of the data the
model was first trained on. For retro-fitting, that data is plain language modelling
without retrieval, so a replayed sequence carries no neighbours (all-False mask): the
CCA branches give a zero update and the step trains the decoder exactly as the source
GPT was trained. Replayed sequences come from the LM-trainable train split of the same
database, or of another database with the same tokenizer (`replay_db`).

The choice of which index is replayed is a seeded function of the index alone, so the
mix is the same in every process and after a resume.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from retrolm.errors import RetrolmError


class ReplayDataset(Dataset):
    """`base` with a seeded `share` of its items replaced by neighbour-free `replay` items."""

    def __init__(self, base: Any, replay: Any, share: float, seed: int = 0):
        if not 0.0 < share < 1.0:
            raise RetrolmError(f"--replay-share {share} must be in (0, 1)")
        if len(replay) < 1:
            raise RetrolmError("the replay data has no sequences; pass a larger --replay-db")
        self.base, self.replay, self.share = base, replay, share
        rng = np.random.default_rng([seed, 7])
        n = len(base)
        self.is_replay = rng.random(n) < share  # (n,) bool
        self.replay_index = rng.integers(0, len(replay), size=n)  # (n,)

    def __len__(self) -> int:
        return len(self.base)

    def reopen(self) -> None:
        for part in (self.base, self.replay):
            if hasattr(part, "reopen"):
                part.reopen()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not self.is_replay[index]:
            return self.base[index]
        item = self.replay[int(self.replay_index[index])]
        if getattr(self.base, "retrieval", True):
            shape = self._neighbour_shape()
            item["neighbours"] = torch.zeros(shape, dtype=torch.int64)
            item["neighbour_mask"] = torch.zeros(shape, dtype=torch.bool)
        return item

    def _neighbour_shape(self) -> tuple[int, ...]:
        """(l, k, r) of the base items' neighbours, read from the first non-replayed item."""
        if not hasattr(self, "_shape"):
            for i in range(len(self.base)):
                if not self.is_replay[i]:
                    self._shape = tuple(self.base[i]["neighbours"].shape)
                    break
            else:
                raise RetrolmError("--replay-share leaves no retrieval sequence; lower it")
        return self._shape
