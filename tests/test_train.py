"""Trainer pieces: LR schedule, parameter groups, RNG state, checkpoints; end-to-end runs."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from retrolm.errors import RetrolmError
from retrolm.training import checkpointing as ckpt
from retrolm.training.optimizer import param_groups
from retrolm.training.schedule import LRSchedule, rewarm

# -- schedule ---------------------------------------------------------------------------------


def test_warmup_is_linear_and_reaches_peak():
    s = LRSchedule(max_lr=1e-3, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [s.lr(t) for t in range(10)]
    assert lrs[0] == pytest.approx(1e-4)  # one step in, never a zero-LR step
    assert np.allclose(np.diff(lrs), 1e-4)
    assert s.lr(9) == pytest.approx(1e-3)
    assert s.lr(10) == pytest.approx(1e-3)  # cosine starts at the peak


def test_cosine_decays_monotonically_to_the_floor():
    s = LRSchedule(max_lr=1.0, total_steps=50, warmup_steps=5, min_lr_ratio=0.2)
    decay = [s.lr(t) for t in range(5, 50)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert s.lr(5 + 45 // 2) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 22 / 45)))
    assert decay[-1] > 0.2
    assert s.lr(50) == pytest.approx(0.2)
    assert s.lr(10_000) == pytest.approx(0.2)


def test_rewarm_starts_from_the_previous_floor_and_redecays():
    first = LRSchedule(max_lr=1e-3, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    second = rewarm(first, max_lr=5e-4, total_steps=40, warmup_steps=4, min_lr_ratio=0.1)
    floor = first.lr(first.total_steps)
    assert second.start_lr == pytest.approx(floor)
    assert second.lr(0) == pytest.approx(floor + 0.25 * (5e-4 - floor))
    assert second.lr(3) == pytest.approx(5e-4)
    assert second.lr(40) == pytest.approx(5e-5)
    # without a previous schedule the re-warm starts at the new floor
    assert rewarm(None, 1e-3, 10, 2, 0.1).start_lr == pytest.approx(1e-4)


def test_schedule_round_trips_and_rejects_bad_values():
    s = LRSchedule(2e-3, 77, 7, 0.05, 1e-5)
    assert LRSchedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(RetrolmError):
        LRSchedule(1e-3, 0)
    with pytest.raises(RetrolmError):
        LRSchedule(0.0, 10)


# -- optimizer groups -------------------------------------------------------------------------


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_no_weight_decay_on_norms_biases_embeddings():
    model = _Toy()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert ids(decay) == {id(model.proj.weight)}
    assert ids(no_decay) == {
        id(model.emb.weight), id(model.proj.bias), id(model.norm.weight), id(model.norm.bias)
    }  # fmt: skip
    assert len(no_decay["params"]) == 4  # the tied head weight is not listed twice
    # frozen parameters are in neither group
    assert id(model.frozen.weight) not in ids(decay) | ids(no_decay)


# -- RNG state --------------------------------------------------------------------------------


def test_rng_state_round_trips_through_json():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = json.loads(json.dumps(ckpt.rng_state()))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()  # move every generator on
    ckpt.set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_checkpoint_listing_ignores_partial_dirs_and_prunes(tmp_path):
    for step in (2, 4, 6):
        d = ckpt.step_dir(tmp_path, step)
        d.mkdir(parents=True)
        (d / ckpt.TRAINER_STATE).write_text("{}")
    partial = tmp_path / "checkpoints" / ".step_000008.abc.tmp"
    partial.mkdir()
    no_state = ckpt.step_dir(tmp_path, 10)
    no_state.mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 6)
    ckpt.prune(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]
    ckpt.remove_partial(tmp_path)
    assert not partial.exists()
