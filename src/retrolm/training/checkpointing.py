"""Trainer checkpoints: atomic directories, JSON-safe RNG state, resume lookup.

Layout under a run directory `<out>`:

    checkpoints/step_000123/   config.json, model.safetensors   (retrolm.checkpoints)
                               tokenizer.json                   (the database's)
                               optimizer.pt                     (torch.save, read weights_only)
                               trainer_state.json               (step, data position, schedule, RNG)
                               checksums.json                   (sha256 of the others, written last)
    final/                     the same without optimizer.pt

Each directory is written under a temporary name and renamed (`retrolm.atomic.atomic_dir`),
so a directory that exists under its final name is complete; a run killed mid-write
leaves only a hidden `.step_*.tmp` directory that the next run removes. A directory
damaged later (a flipped bit, a truncated file) fails its checksums; `--resume` then
falls back to the newest good checkpoint and says so. Nothing here uses pickle: RNG
states are stored as lists of integers. File names live in `retrolm.checkpoints`.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retrolm.atomic import atomic_dir, write_json
from retrolm.checkpoints import (
    CHECKPOINTS,
    FINAL,
    OPTIMIZER,
    TOKENIZER,
    TRAINER_STATE,
    damage,
    save_model,
    step_checkpoints,
    write_checksums,
)
from retrolm.errors import RetrolmError

__all__ = ["CHECKPOINTS", "FINAL", "OPTIMIZER", "TRAINER_STATE"]  # re-exported for the trainer


def rng_state() -> dict[str, Any]:
    """The state of every RNG the training step may draw from, as plain JSON values."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state()`."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def step_dir(out_dir: Path, step: int) -> Path:
    return out_dir / CHECKPOINTS / f"step_{step:06d}"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints of a run, oldest first."""
    return step_checkpoints(out_dir)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete step checkpoint, or None for a fresh run."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _problem(path: Path) -> str | None:
    """Why step checkpoint `path` cannot be resumed from, or None."""
    problem = damage(path)
    if problem is not None:
        return problem
    try:
        json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        return f"{TRAINER_STATE} is unreadable ({err})"
    return None


def latest_good_checkpoint(out_dir: Path) -> Path | None:
    """The newest step checkpoint that passes its checksums, or None for a fresh run.

    A damaged newer one is skipped with one line on stderr; when every checkpoint is
    damaged, resuming is refused rather than silently starting over.
    """
    found = list_checkpoints(out_dir)
    skipped: list[str] = []
    for _, path in reversed(found):
        problem = _problem(path)
        if problem is None:
            if skipped:
                print(f"retrolm: checkpoint {'; '.join(skipped)}; resuming from {path.name}",
                      file=sys.stderr)  # fmt: skip
            return path
        skipped.append(f"{path.name} is damaged ({problem})")
    if found:
        raise RetrolmError(
            f"every checkpoint in {out_dir / CHECKPOINTS} is damaged ({'; '.join(skipped)}); "
            "delete them to start over, or train into a new --out"
        )
    return None


def remove_partial(out_dir: Path) -> None:
    """Delete temporary directories left by a run killed while writing a checkpoint."""
    for root in (out_dir / CHECKPOINTS, out_dir):
        if root.is_dir():
            for child in root.iterdir():
                if child.name.startswith(".") and child.name.endswith((".tmp", ".old")):
                    shutil.rmtree(child, ignore_errors=True)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    tokenizer_file: Path | None = None,
) -> Path:
    """Write model (+ optimizer) + trainer state into directory `path`, atomically.

    `tokenizer_file` (the database's tokenizer.json) is copied in so that a checkpoint can
    be used for generation and serving on its own, without the database it was trained on.
    """
    with atomic_dir(path) as tmp:
        save_model(model, tmp)
        if tokenizer_file is not None:
            shutil.copy2(tokenizer_file, tmp / TOKENIZER)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        write_json(tmp / TRAINER_STATE, state)
        write_checksums(tmp)
    return path


def copy_as_final(step_checkpoint: Path, final_dir: Path) -> Path:
    """Atomically copy a step checkpoint, without its optimizer state, to `final_dir`."""
    with atomic_dir(final_dir) as tmp:
        for item in step_checkpoint.iterdir():
            if item.is_file() and item.name != OPTIMIZER:
                shutil.copy2(item, tmp / item.name)
        write_checksums(tmp)
    return final_dir


def prune(out_dir: Path, keep: int) -> None:
    """Keep only the newest `keep` step checkpoints (at least one)."""
    found = list_checkpoints(out_dir)
    for _, path in found[: max(0, len(found) - max(1, keep))]:
        shutil.rmtree(path, ignore_errors=True)


def read_trainer_state(path: Path) -> dict[str, Any]:
    file = path / TRAINER_STATE
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RetrolmError(
            f"cannot read {file}: {err}; the checkpoint is damaged, delete it to resume from an older one"
        ) from err


def load_optimizer_state(path: Path, optimizer: torch.optim.Optimizer) -> None:
    """Load `optimizer.pt` without unpickling arbitrary objects (weights_only=True)."""
    file = path / OPTIMIZER
    if not file.is_file():
        raise RetrolmError(f"{file} is missing; resume needs a step checkpoint, not final/")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state)
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RetrolmError(
            f"cannot read {file} ({first}); the checkpoint is damaged, delete it to resume "
            "from an older one"
        ) from None
