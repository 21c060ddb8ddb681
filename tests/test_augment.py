"""Wrong-neighbour augmentation: seeded, repeatable, a share of the rows get another row's neighbours."""

from __future__ import annotations

import torch

from retrolm.training.augment import wrong_neighbours


def batch(b: int = 64):
    nb = torch.arange(b)[:, None, None, None].expand(b, 2, 1, 8).clone()  # row i holds value i
    return nb, torch.ones_like(nb, dtype=torch.bool)


def test_share_of_rows_take_the_next_rows_neighbours() -> None:
    nb, mask = batch()
    out, out_mask = wrong_neighbours(nb, mask, 0.25, (0, 5, 0, 0))
    rows = out[:, 0, 0, 0]
    moved = rows != torch.arange(64)
    assert torch.equal(rows[moved], (torch.arange(64)[moved] + 1) % 64)
    assert 4 <= int(moved.sum()) <= 28  # about a quarter of 64
    assert out_mask.shape == mask.shape


def test_draw_repeats_for_the_same_key_and_changes_with_it() -> None:
    nb, mask = batch()
    a, _ = wrong_neighbours(nb, mask, 0.5, (0, 7, 0, 0))
    b, _ = wrong_neighbours(nb, mask, 0.5, (0, 7, 0, 0))
    c, _ = wrong_neighbours(nb, mask, 0.5, (0, 8, 0, 0))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_zero_share_and_single_rows_are_untouched() -> None:
    nb, mask = batch()
    assert wrong_neighbours(nb, mask, 0.0, (0,))[0] is nb
    one, one_mask = batch(1)
    assert wrong_neighbours(one, one_mask, 0.9, (0,))[0] is one
