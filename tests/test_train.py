"""Trainer pieces: LR schedule, parameter groups, RNG state, checkpoints; end-to-end runs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from retrolm.errors import RetrolmError
from retrolm.training import checkpointing as ckpt
from retrolm.training.optimizer import build_optimizer, param_groups, set_lr
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


def test_retrieval_lr_scale_gives_encoder_and_cca_their_own_lr():
    from retrolm.model.config import RetroConfig
    from retrolm.model.retro import Retro

    model = Retro(RetroConfig.from_name("tiny"))
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), retrieval_lr_scale=4.0)
    set_lr(optimizer, 2e-3)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(lr_of) == len(named)  # every parameter once (the tied head counted once)
    for name, p in named.items():
        retrieval = name.startswith("encoder.") or "cca." in name  # encoder, CCA and its norm
        assert lr_of[id(p)] == pytest.approx(8e-3 if retrieval else 2e-3), name
    assert sum(g["lr_scale"] == 4.0 for g in optimizer.param_groups) == 2
    assert wd_of[id(named["blocks.1.cca.q.weight"])] == 0.1
    assert wd_of[id(named["blocks.1.norm_cca.weight"])] == 0.0
    # without a scale: the two usual groups
    assert len(param_groups(model, 0.1)) == 2


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


# -- end to end on the tiny database -------------------------------------------------------


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from retrolm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _train_args(db, out, *extra: str) -> list[str]:
    return ["train", "--db", str(db), "--out", str(out), "--device", "cpu", *extra]


def test_cli_refuses_bad_input_with_one_line(tiny_db_path, tmp_path, capsys):
    from retrolm.model.config import RetroConfig

    err = _cli_error(_train_args(tmp_path / "nope", tmp_path / "o1", "--model", "tiny"), capsys)
    assert "does not exist" in err
    err = _cli_error(_train_args(tiny_db_path, tmp_path / "o2", "--model", "no-such-preset"), capsys)
    assert "unknown model preset" in err
    config = tmp_path / "m32.json"
    RetroConfig.from_name("tiny", chunk_size=32).save_json(config)
    err = _cli_error(_train_args(tiny_db_path, tmp_path / "o3", "--model", str(config)), capsys)
    assert "chunk_size 32" in err and "database chunk size" in err
    err = _cli_error(
        _train_args(tiny_db_path, tmp_path / "o4", "--model", "tiny", "--tokens", "99", "--minutes", "1"),
        capsys,
    )
    assert "--tokens or --minutes" in err
    err = _cli_error(
        _train_args(tiny_db_path, tmp_path / "o5", "--model", "tiny", "--retrieval-lr-scale", "0"), capsys
    )
    assert "--retrieval-lr-scale must be > 0" in err
    for out in ("o1", "o2", "o3", "o4", "o5"):  # nothing that looks like a run was left behind
        assert not (tmp_path / out / "final").exists()


def test_gpt_baseline_then_continued_training_rewarms(tiny_db_path, tmp_path):
    from retrolm.checkpoints import load_checkpoint
    from retrolm.training.trainer import TrainConfig, train

    cfg = TrainConfig(
        tokens=3 * 4 * 32, batch_size=4, seq_len=32, retrieval=False, checkpoint_every=0,
        device="cpu", progress=False, warmup_steps=1,
    )  # fmt: skip
    first = train(tiny_db_path, "tiny", tmp_path / "gpt", cfg)
    gpt = load_checkpoint(first)
    assert gpt.config.cca_layers == []
    state = ckpt.read_trainer_state(first)
    assert state["step"] == 3 and state["tokens_seen"] == 3 * 4 * 32
    assert (tmp_path / "gpt" / "loss.png").stat().st_size > 0
    # the checkpoint carries the database's tokenizer, so it can generate on its own
    tokenizer_json = (first / "tokenizer.json").read_bytes()
    assert tokenizer_json == (Path(tiny_db_path) / "tokenizer.json").read_bytes()

    # the same --out again without --resume is refused; with --resume it is already done
    with pytest.raises(RetrolmError, match="--resume"):
        train(tiny_db_path, "tiny", tmp_path / "gpt", cfg)
    cfg.resume = True
    assert train(tiny_db_path, "tiny", tmp_path / "gpt", cfg) == first

    # continued training re-warms from the first run's final LR
    more = TrainConfig(
        tokens=2 * 4 * 32, batch_size=4, seq_len=32, retrieval=False, checkpoint_every=0,
        device="cpu", progress=False, warmup_steps=2, lr=5e-4, init_from=str(first),
    )  # fmt: skip
    second = train(tiny_db_path, "tiny", tmp_path / "more", more)
    schedule = LRSchedule.from_dict(ckpt.read_trainer_state(second)["schedule"])
    previous = LRSchedule.from_dict(state["schedule"])
    assert schedule.start_lr == pytest.approx(previous.lr(previous.total_steps))
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "more" / "metrics.jsonl").open()]
    assert lrs[0] == pytest.approx(previous.min_lr + 0.5 * (5e-4 - previous.min_lr))


def test_minutes_budget_fixes_a_step_count_and_keeps_to_the_time(tiny_db_path, tmp_path):
    from retrolm.training.trainer import TrainConfig, train

    cfg = TrainConfig(
        minutes=0.05, batch_size=2, seq_len=32, checkpoint_every=0, device="cpu", progress=False,
    )  # fmt: skip
    final = train(tiny_db_path, "tiny", tmp_path / "timed", cfg)
    state = ckpt.read_trainer_state(final)
    schedule = LRSchedule.from_dict(state["schedule"])
    # the step count was fixed from the measured speed (not the stand-in length) and reached
    assert schedule.total_steps == state["step"] >= 4
    assert state["finished"]
    records = [json.loads(line) for line in (tmp_path / "timed" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == list(range(1, state["step"] + 1))
    assert records[-1]["elapsed_s"] < 1.25 * 60 * cfg.minutes + 5


def test_frozen_parameters_stay_frozen_across_a_resume(tiny_db, tiny_db_path, tmp_path):
    """A module passed in with part of it frozen (retro-fitting) trains only the rest,
    also after resuming from a checkpoint (here: the run died after step 1's checkpoint)."""
    import shutil

    from retrolm.model.config import RetroConfig
    from retrolm.model.retro import Retro
    from retrolm.training.trainer import TrainConfig, train

    torch.manual_seed(0)
    config = RetroConfig.from_name("tiny", vocab_size=tiny_db.vocab_size, chunk_size=16)
    model = Retro(config)
    for param in model.blocks.parameters():
        param.requires_grad_(False)  # only embeddings, encoder, final norm train
    before = {n: p.detach().clone() for n, p in model.blocks.named_parameters()}
    encoder_before = model.encoder.proj_in.weight.detach().clone()
    cfg = TrainConfig(
        tokens=2 * 2 * 32, batch_size=2, seq_len=32, checkpoint_every=1, device="cpu",
        progress=False, rewarm=True, warmup_steps=1,
    )  # fmt: skip
    out = tmp_path / "retrofit"
    train(tiny_db_path, model, out, cfg)
    shutil.rmtree(out / "final")
    shutil.rmtree(ckpt.step_dir(out, 2))
    cfg.resume = True
    final = train(tiny_db_path, "tiny", out, cfg)

    from retrolm.checkpoints import load_checkpoint

    trained = load_checkpoint(final)
    for name, param in trained.blocks.named_parameters():
        assert torch.equal(param, before[name]), name
    assert not torch.equal(trained.encoder.proj_in.weight, encoder_before)  # the rest trained
    state = ckpt.read_trainer_state(final)
    assert state["step"] == 2 and state["frozen_parameters"]
    assert LRSchedule.from_dict(state["schedule"]).start_lr == pytest.approx(cfg.lr * cfg.min_lr_ratio)
