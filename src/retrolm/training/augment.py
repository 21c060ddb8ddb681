"""Training-time neighbour augmentation: teach a RETRO to ignore neighbours that do not match.

Every training neighbour is retrieved for its own chunk, so a model never sees neighbours
unrelated to its text and learns to trust whatever it is given; fed another sequence's
neighbours (the RETRO-shuffled control) it then copies wrong tokens with confidence. Giving
a share of the training sequences the neighbours of another sequence teaches the copy head's
sentinel and the CCA to fall back on the decoder when nothing matches.
"""

from __future__ import annotations

import hashlib

import torch


def wrong_neighbours(
    neighbours: torch.Tensor,  # (b, l, k, r) int64
    mask: torch.Tensor,  # (b, l, k, r) bool
    share: float,
    key: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each sequence, with probability `share`, the neighbours of the next one in the batch.

    The draw is a function of `key` (seed, step, rank, micro-batch), so a resumed run
    repeats it exactly. A batch of one sequence is returned unchanged.
    """
    b = neighbours.shape[0]
    if b < 2 or share <= 0:
        return neighbours, mask
    digest = hashlib.sha256(repr(key).encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") % 2**62)
    wrong = torch.rand(b, generator=g) < share  # (b,)
    if not wrong.any():
        return neighbours, mask
    index = torch.arange(b)
    pick = torch.where(wrong, (index + 1) % b, index).to(neighbours.device)
    return neighbours[pick], mask[pick]
