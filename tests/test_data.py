"""Dataset over a database split, and the resumable, shardable sample order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from retrolm.data import ResumableBatchSampler, first_k_valid
from retrolm.errors import RetrolmError

# -- sampler ----------------------------------------------------------------------------------


def _steps(sampler: ResumableBatchSampler, n_steps: int) -> list[list[list[int]]]:
    """Micro-batches grouped per optimizer step."""
    it = iter(sampler)
    return [[next(it) for _ in range(sampler.accum)] for _ in range(n_steps)]


def test_sampler_covers_each_epoch_once_and_is_seeded():
    s = ResumableBatchSampler(num_samples=10, global_batch=5, micro_batch=5, seed=3)
    first_epoch = sum((b for step in _steps(s, 2) for b in step), [])
    assert sorted(first_epoch) == list(range(10))
    assert first_epoch != list(range(10))  # shuffled
    again = ResumableBatchSampler(10, 5, 5, seed=3)
    assert sum((b for step in _steps(again, 2) for b in step), []) == first_epoch
    other = ResumableBatchSampler(10, 5, 5, seed=4)
    assert sum((b for step in _steps(other, 2) for b in step), []) != first_epoch


def test_sampler_crosses_epochs_and_resumes_from_a_position():
    full = ResumableBatchSampler(num_samples=7, global_batch=4, micro_batch=2, seed=0)
    steps = _steps(full, 6)
    # 24 samples = 3 full epochs + 3: every epoch is a permutation
    flat = sum((b for step in steps for b in step), [])
    for e in range(3):
        assert sorted(flat[e * 7 : (e + 1) * 7]) == list(range(7))
    assert flat[7:14] != flat[:7]  # a new permutation per epoch
    resumed = ResumableBatchSampler(7, 4, 2, seed=0, start=3 * 4)
    assert _steps(resumed, 3) == steps[3:]
    assert full.position(12) == {"samples_seen": 12, "epoch": 1, "index": 5}


@pytest.mark.parametrize(("world", "micro"), [(2, 2), (2, 1), (4, 1)])
def test_sharded_ranks_together_see_the_single_process_global_batch(world, micro):
    single = _steps(ResumableBatchSampler(9, 4, 4, seed=5), 5)
    ranks = [_steps(ResumableBatchSampler(9, 4, micro, r, world, seed=5), 5) for r in range(world)]
    for t in range(5):
        pieces = [ranks[r][t][j] for j in range(len(ranks[0][0])) for r in range(world)]
        assert list(itertools.chain(*pieces)) == single[t][0]


def test_sampler_rejects_a_batch_that_does_not_split():
    with pytest.raises(RetrolmError):
        ResumableBatchSampler(10, global_batch=6, micro_batch=4)
    with pytest.raises(RetrolmError):
        ResumableBatchSampler(10, global_batch=6, micro_batch=2, world_size=2)


def test_first_k_valid_moves_surviving_neighbours_up():
    ids = np.array([[5, -1, 7, 8], [-1, -1, -1, 2], [-1, -1, -1, -1]])
    assert first_k_valid(ids, 2).tolist() == [[5, 7], [2, -1], [-1, -1]]
