"""The trainer: pretrain a RETRO (or, with no CCA layers, a GPT) on a retrieval database.

One function, `train()`, runs as a single process or under `torchrun` (DDP; the model
knows nothing of it). Its run directory holds everything needed to resume exactly:

    <out>/checkpoints/step_NNNNNN/  model + optimizer + trainer_state.json (last few kept)
    <out>/final/                    the finished model (config.json + model.safetensors)
    <out>/metrics.jsonl, <out>/loss.png

Budget: `tokens` fixes the number of optimizer steps up front. `minutes` times a few
steps, converts the time left into a step count once (`training.budget`), and from then
on behaves like a token budget (the LR schedule needs a known length; until the count is
fixed the LR follows the slowest default warm-up). The step count is stored in the
checkpoint, so a resumed `minutes` run keeps it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from torch import nn

from retrolm.errors import RetrolmError
from retrolm.training import checkpointing as ckpt
from retrolm.training import distributed
from retrolm.training.augment import wrong_neighbours
from retrolm.training.budget import TimeBudget
from retrolm.training.config import TrainConfig
from retrolm.training.monitor import Monitor, plot_loss, truncate_metrics
from retrolm.training.optimizer import build_optimizer, set_lr
from retrolm.training.schedule import LRSchedule, rewarm

if TYPE_CHECKING:
    from retrolm.db.database import RetrievalDB
    from retrolm.db.dataset import RetroDataset
    from retrolm.model.config import RetroConfig
    from retrolm.training.replay import ReplayDataset

# What train() starts from: a preset name, a config.json path or checkpoint dir, a
# RetroConfig, or a model to keep training (e.g. a retro-fitted GPT).
ModelSpec = Union[str, Path, "RetroConfig", nn.Module]

# Stand-in schedule length while a --minutes run is still measuring its speed.
_UNKNOWN_TOTAL = 10**9
# Settings that change the training trajectory: a resumed run must keep them.
_TRAJECTORY_FIELDS = (
    "seq_len", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_steps",
    "weight_decay", "beta1", "beta2", "grad_clip", "k", "retrieval", "exclude_sample_docs",
    "tokens", "minutes", "bf16", "seed", "replay_share", "replay_db", "retrieval_lr_scale",
    "wrong_neighbour_share",
)  # fmt: skip


# -- model config ---------------------------------------------------------------------------


def resolve_model_config(
    model: str | Path | RetroConfig, vocab_size: int, chunk_size: int, retrieval: bool
) -> RetroConfig:
    """RetroConfig for `model` (preset name, config.json path, checkpoint dir or RetroConfig).

    Vocabulary size and chunk size come from the database: a preset takes both; an
    explicit config whose chunk size differs from the database's is refused, because
    its CCA layers would cut sequences into chunks the neighbours were not retrieved for.
    """
    from retrolm.checkpoints import CONFIG
    from retrolm.model.config import RetroConfig

    if isinstance(model, RetroConfig):
        config = model
    else:
        path = Path(str(model))
        if path.is_dir() and (path / CONFIG).is_file():
            path = path / CONFIG
        if path.suffix == ".json" or path.is_file():
            if not path.is_file():
                raise RetrolmError(
                    f"model config {path} does not exist; pass a preset name or a config.json"
                )
            config = RetroConfig.load_json(path)
        else:  # a preset: sizes from the preset, vocabulary and chunk size from the database
            config = RetroConfig.from_name(str(model), vocab_size=vocab_size, chunk_size=chunk_size)
    if config.chunk_size != chunk_size:
        raise RetrolmError(
            f"model chunk_size {config.chunk_size} differs from the database chunk size {chunk_size}; "
            "use a config with the database's chunk size (or a preset, which takes it from the database)"
        )
    if config.vocab_size != vocab_size:
        config = dataclasses.replace(config, vocab_size=vocab_size)
    if not retrieval:
        config = config.as_gpt()
    return config


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers (what checkpoints store)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# -- the run ----------------------------------------------------------------------------------


def _check_resume_compatible(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    defaults = TrainConfig()  # a field added after the checkpoint was written had its default
    diffs = [
        f"{name}={saved.get(name, getattr(defaults, name))!r} (now {getattr(cfg, name)!r})"
        for name in _TRAJECTORY_FIELDS
        if saved.get(name, getattr(defaults, name)) != getattr(cfg, name)
    ]
    if diffs:
        raise RetrolmError(
            f"--resume with settings that differ from the checkpoint in {where}: {', '.join(diffs)}; "
            "rerun with the same settings, or train into a new --out (continued training: init_from)"
        )


def _budget_steps(cfg: TrainConfig, tokens_per_step: int, epoch_sequences: int) -> int:
    if cfg.tokens is not None:
        return max(1, math.ceil(cfg.tokens / tokens_per_step))
    if cfg.minutes is not None:
        return _UNKNOWN_TOTAL
    return max(1, epoch_sequences // cfg.batch_size)


def _default_warmup(total_steps: int) -> int:
    """5% of the steps, between 1 and 200."""
    return min(200, max(1, total_steps // 20))


def train(
    db_path: str | Path | RetrievalDB,
    model: ModelSpec,
    out_dir: str | Path,
    cfg: TrainConfig | None = None,
) -> Path:
    """Train `model` on database `db_path` into `out_dir`; return the final checkpoint dir.

    `db_path`: the database directory, or a `RetrievalDB` the caller already opened (and
    verified), which is then used as it is rather than opened and hashed a second time.
    Under torchrun every process runs train() and so opens (or passes) its own.

    `model`: preset name, config.json path, checkpoint dir, `RetroConfig`, or an
    `nn.Module` to start from (e.g. a retro-fitted GPT; parameters with
    requires_grad=False stay frozen). With `cfg.resume`, continue from the newest
    checkpoint in `out_dir` (or start fresh if there is none; return at once if the run
    already finished).
    """
    cfg = cfg or TrainConfig()
    cfg.validate()  # again: fields may have been set after construction
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RetrolmError(f"--out {out_dir} is a file; pass a directory for the run")
    dist = distributed.setup(cfg.device)
    try:
        return _Run(db_path, model, Path(out_dir), cfg, dist).run()
    finally:
        distributed.teardown(dist)


class _Run:
    """State of one training run; `run()` is the loop."""

    def __init__(
        self, db: str | Path | RetrievalDB, model: ModelSpec, out_dir: Path, cfg: TrainConfig,
        dist: distributed.DistInfo,
    ):
        from retrolm.db.dataset import ResumableBatchSampler, RetroDataset

        self.cfg, self.dist, self.out_dir = cfg, dist, out_dir
        self.db = db if not isinstance(db, (str, Path)) else _open_database(Path(db))
        self.latest = ckpt.latest_checkpoint(out_dir)
        if self.latest is not None and not cfg.resume:
            raise RetrolmError(
                f"{out_dir} already holds checkpoints; pass --resume to continue, or choose a new --out"
            )
        if self.latest is not None:  # skip (and name) damaged checkpoints
            self.latest = ckpt.latest_good_checkpoint(out_dir)
        saved = ckpt.read_trainer_state(self.latest) if self.latest is not None else None
        if saved is not None:
            _check_resume_compatible(saved["train_config"], cfg, self.latest)

        self.module, self.prev_schedule = self._build_model(model, saved)
        self.config = self.module.config
        seq_len = cfg.seq_len or int(self.config.max_seq_len)
        if seq_len > int(self.config.max_seq_len):
            raise RetrolmError(
                f"--seq-len {seq_len} exceeds the model's max_seq_len {self.config.max_seq_len}"
            )
        self.seq_len = seq_len
        self.dataset = RetroDataset(
            self.db, "train", seq_len, k=cfg.k or int(self.config.n_neighbors),
            retrieval=cfg.retrieval,
            exclude_sample_docs=cfg.exclude_sample_docs,
        )  # fmt: skip
        if cfg.replay_share:
            self.dataset = _with_replay(self.dataset, cfg, seq_len)
        if cfg.batch_size % (cfg.grad_accum * dist.world_size):
            raise RetrolmError(
                f"--batch-size {cfg.batch_size} must be divisible by --grad-accum {cfg.grad_accum} x "
                f"{dist.world_size} processes"
            )
        self.micro_batch = cfg.batch_size // (cfg.grad_accum * dist.world_size)
        self.tokens_per_step = cfg.batch_size * seq_len

        self.optimizer = build_optimizer(
            self.module, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.retrieval_lr_scale
        )
        total = _budget_steps(cfg, self.tokens_per_step, len(self.dataset))
        # A --minutes run warms up at the slowest default rate until its length is known.
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else _default_warmup(total)
        if self.prev_schedule is not None or cfg.init_from is not None or cfg.rewarm:
            self.schedule = rewarm(self.prev_schedule, cfg.lr, total, warmup, cfg.min_lr_ratio)
        else:
            self.schedule = LRSchedule(cfg.lr, total, warmup, cfg.min_lr_ratio)

        self.step = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0
        self.finished = False
        if saved is not None:
            self._restore(saved)
        self.sampler = ResumableBatchSampler(
            len(self.dataset), cfg.batch_size, self.micro_batch, dist.rank, dist.world_size,
            seed=cfg.seed, start=self.samples_seen,
        )  # fmt: skip

    # -- setup ------------------------------------------------------------------------------

    def _build_model(
        self, model: ModelSpec, saved: dict[str, Any] | None
    ) -> tuple[nn.Module, LRSchedule | None]:
        from retrolm.checkpoints import check_fits, load_checkpoint, resolve_checkpoint_dir
        from retrolm.model.retro import Retro

        cfg, db = self.cfg, self.db
        prev_schedule = None
        fits: Path | nn.Module  # what check_fits compares with the database
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank and every rerun
        if saved is not None:  # resume: architecture and weights from the checkpoint
            module, fits = load_checkpoint(self.latest), self.latest
            frozen = set(saved.get("frozen_parameters", []))
            for name, param in module.named_parameters():
                param.requires_grad_(name not in frozen)  # e.g. retro-fitting with a frozen GPT
            prev = saved.get("previous_schedule")
            prev_schedule = LRSchedule.from_dict(prev) if prev else None
        elif cfg.init_from is not None:  # continued training from another run
            source = resolve_checkpoint_dir(cfg.init_from)
            module, fits = load_checkpoint(source), source
            state_file = source / ckpt.TRAINER_STATE
            if state_file.is_file():
                prev_schedule = LRSchedule.from_dict(ckpt.read_trainer_state(source)["schedule"])
        elif isinstance(model, nn.Module):
            module = fits = model
        else:
            config = resolve_model_config(model, db.vocab_size, db.chunk_size, cfg.retrieval)
            module = fits = Retro(config)
        config = module.config
        # tokenizer, vocabulary, chunk size and k; the k trained with is the checkpoint's default
        config.n_neighbors = check_fits(fits, db, cfg.k, stored_neighbours=cfg.retrieval)
        if cfg.retrieval and not config.cca_layers:
            raise RetrolmError("this model has no CCA layers (a GPT); train it with --no-retrieval")
        torch.manual_seed(cfg.seed + self.dist.rank)  # ranks draw different dropout masks
        return module.to(self.dist.device), prev_schedule

    def _restore(self, saved: dict[str, Any]) -> None:
        ckpt.load_optimizer_state(self.latest, self.optimizer)
        self.schedule = LRSchedule.from_dict(saved["schedule"])
        self.step = int(saved["step"])
        self.samples_seen = int(saved["samples_seen"])
        self.tokens_seen = int(saved["tokens_seen"])
        self.elapsed_before = float(saved.get("elapsed_s", 0.0))
        self.finished = bool(saved.get("finished", False))
        states = saved["rng"]
        rank_state = states[self.dist.rank] if len(states) == self.dist.world_size else states[0]
        ckpt.set_rng_state(rank_state)

    # -- checkpoints ------------------------------------------------------------------------

    def _state(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format": 1,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "sampler": self.sampler.position(self.samples_seen),
            "schedule": self.schedule.to_dict(),
            "previous_schedule": self.prev_schedule.to_dict() if self.prev_schedule else None,
            "train_config": self.cfg.to_dict(),
            "seq_len": self.seq_len,
            "world_size": self.dist.world_size,
            "database": str(self.db.path),
            "elapsed_s": self.elapsed_before + (time.perf_counter() - self.t_start),
            "finished": self.finished,
            "rng": rng,
            "frozen_parameters": [
                name for name, p in self.module.named_parameters() if not p.requires_grad
            ],
        }

    def _save(self, final: bool = False) -> None:
        rng = distributed.gather_objects(self.dist, ckpt.rng_state())  # every rank takes part
        if self.dist.is_main:
            state = self._state(rng)
            module = _unwrap(self.model)
            tokenizer = self.db.path / "tokenizer.json"
            ckpt.save_checkpoint(
                ckpt.step_dir(self.out_dir, self.step), module, state, self.optimizer, tokenizer
            )
            ckpt.prune(self.out_dir, self.cfg.keep_checkpoints)
            if final:
                ckpt.save_checkpoint(self.out_dir / ckpt.FINAL, module, state, None, tokenizer)
        distributed.barrier(self.dist)

    # -- the loop ---------------------------------------------------------------------------

    def _wrap_model(self) -> nn.Module:
        model: nn.Module = self.module
        if self.dist.enabled:
            device_ids = [self.dist.local_rank] if self.dist.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if self.cfg.compile:
            model = torch.compile(model)
        return model

    def _forward_backward(self, batch: dict[str, torch.Tensor], micro: int, sync: bool) -> torch.Tensor:
        """One micro-batch (index `micro` within the optimizer step): forward, scaled backward."""
        device = self.dist.device
        tokens = batch["tokens"].to(device, non_blocking=True)  # (b, n)
        targets = batch["targets"].to(device, non_blocking=True)  # (b, n)
        neighbours = mask = None
        if self.cfg.retrieval:
            neighbours = batch["neighbours"].to(device, non_blocking=True)  # (b, l, k, r)
            mask = batch["neighbour_mask"].to(device, non_blocking=True)  # (b, l, k, r)
            if self.cfg.wrong_neighbour_share > 0:
                key = (self.cfg.seed, self.step, self.dist.rank, micro)
                neighbours, mask = wrong_neighbours(neighbours, mask, self.cfg.wrong_neighbour_share, key)
        no_sync = (
            self.model.no_sync()
            if self.dist.enabled and not sync and hasattr(self.model, "no_sync")
            else contextlib.nullcontext()
        )
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)
        with no_sync:
            with autocast:
                _, loss = self.model(tokens, neighbours, mask, targets)
            (loss / self.cfg.grad_accum).backward()
        return loss.detach().float()

    def _after_step_budget(self, budget: TimeBudget | None) -> None:
        """For --minutes: fix the step count once the probe is done; stop if far over time."""
        if budget is None:
            return
        if self.schedule.total_steps == _UNKNOWN_TOTAL:
            total = budget.after_step(self.step)
            if total is not None:
                warmup = self.cfg.warmup_steps
                if warmup is None:
                    warmup = _default_warmup(total)
                self.schedule = self.schedule.with_total(total, warmup)
                if self.monitor is not None:
                    self.monitor.set_total(total)
        elif budget.overdue() and self.step < self.schedule.total_steps:
            if self.monitor is not None:
                self.monitor.note(f"time budget exceeded by 25%: stopping at step {self.step}")
            self.schedule = self.schedule.with_total(self.step)

    def run(self) -> Path:
        cfg, dist = self.cfg, self.dist
        final_dir = self.out_dir / ckpt.FINAL
        if self.finished:
            if dist.is_main and not (final_dir / ckpt.TRAINER_STATE).is_file():
                ckpt.copy_as_final(self.latest, final_dir)  # killed between the two writes
            distributed.barrier(dist)
            return final_dir
        from retrolm.db.dataset import make_loader

        if dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(self.out_dir)
            truncate_metrics(self.out_dir, self.step)
        self.model = self._wrap_model()
        self.model.train()
        known = self.schedule.total_steps != _UNKNOWN_TOTAL
        self.monitor = (
            Monitor(self.out_dir, self.schedule.total_steps if known else None, self.step, cfg.progress)
            if dist.is_main
            else None
        )
        loader = iter(make_loader(self.dataset, self.sampler, cfg.num_workers))
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.t_start = time.perf_counter()
        budget = TimeBudget(cfg.minutes, self.elapsed_before, dist) if cfg.minutes else None
        try:
            while self.step < self.schedule.total_steps:
                t0 = time.perf_counter()
                lr = self.schedule.lr(self.step)
                set_lr(self.optimizer, lr)
                loss_sum = torch.zeros((), device=dist.device)
                for j in range(cfg.grad_accum):
                    loss_sum += self._forward_backward(next(loader), j, sync=j == cfg.grad_accum - 1)
                clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.samples_seen += cfg.batch_size
                self.tokens_seen += self.tokens_per_step
                loss = distributed.mean_across(dist, float(loss_sum) / cfg.grad_accum)
                seconds = time.perf_counter() - t0
                if self.monitor is not None:
                    self.monitor.log({
                        "step": self.step, "loss": loss, "lr": lr, "tokens": self.tokens_seen,
                        "tokens_per_s": self.tokens_per_step / max(seconds, 1e-9),
                        "grad_norm": grad_norm,
                        "elapsed_s": self.elapsed_before + time.perf_counter() - self.t_start,
                    })  # fmt: skip
                if not math.isfinite(loss):
                    raise RetrolmError(
                        f"loss became {loss} at step {self.step}; lower --lr or enable gradient clipping"
                    )
                self._after_step_budget(budget)
                if (
                    cfg.checkpoint_every > 0
                    and self.step % cfg.checkpoint_every == 0
                    and self.step < self.schedule.total_steps
                ):
                    self._save()
            self.finished = True
            self._save(final=True)
        except KeyboardInterrupt:  # Ctrl-C: checkpoints are written atomically, the last one stands
            raise KeyboardInterrupt(self._interrupted_message()) from None
        finally:
            if self.monitor is not None:
                self.monitor.close()
        if dist.is_main:
            plot_loss(self.out_dir, title=f"{'RETRO' if cfg.retrieval else 'GPT'} training loss")
        return final_dir


    def _interrupted_message(self) -> str:
        """Where an interrupted run stopped and how to continue it (the CLI prints this)."""
        saved = ckpt.list_checkpoints(self.out_dir)
        where = f"last checkpoint: step {saved[-1][0]}" if saved else "no checkpoint yet"
        return f"interrupted at step {self.step} ({where}); resume with --resume"


def _with_replay(dataset: RetroDataset, cfg: TrainConfig, seq_len: int) -> ReplayDataset:
    """Mix `cfg.replay_share` neighbour-free LM sequences (of `replay_db`, else this database)."""
    from retrolm.db.dataset import RetroDataset
    from retrolm.training.replay import ReplayDataset

    source = _open_database(Path(cfg.replay_db)) if cfg.replay_db else dataset.db
    if source.vocab_size != dataset.db.vocab_size:
        raise RetrolmError(
            f"--replay-db vocabulary {source.vocab_size} differs from the database's "
            f"{dataset.db.vocab_size}; replay from a database built with the same tokenizer"
        )
    replay = RetroDataset(source, "train", seq_len, retrieval=False)
    return ReplayDataset(dataset, replay, cfg.replay_share, cfg.seed)


def _open_database(path: Path) -> RetrievalDB:
    from retrolm.db.database import RetrievalDB

    if not path.exists():
        raise RetrolmError(f"database {path} does not exist; build it with `retrolm db build`")
    return RetrievalDB.open(path)
