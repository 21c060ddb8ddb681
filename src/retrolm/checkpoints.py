"""Checkpoints: the one module that knows a model directory's files, writes and loads every
model kind, finds the model in a run directory and checks that a checkpoint fits a database.

A model directory holds

    config.json          the RetroConfig; `n_neighbors` is the k the model was trained with
    model.safetensors    the weights (metadata sorted, so equal models give equal bytes)
    tokenizer.json       the training database's tokenizer (trainer checkpoints)
    trainer_state.json   step, data position, schedule, RNG (trainer checkpoints)
    optimizer.pt         optimizer state (step checkpoints only)
    checksums.json       sha256 of every other file, written last, verified on load

Two model kinds share the format: plain `Retro` models and retro-fitted Hugging Face
GPT-2 models (`config.extra["decoder"] == "hf-gpt2"`, rebuilt by `retrolm.retrofitting.hf_gpt2`).
`load_checkpoint` picks the class from the config, so every stage loads both. A run
directory (the --out of `retrolm train`) resolves to its `final/` model, else its newest
step checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from retrolm.atomic import atomic_path, read_json_object, sha256_file, write_json
from retrolm.errors import RetrolmError
from retrolm.model.config import RetroConfig
from retrolm.model.retro import Retro

if TYPE_CHECKING:
    from retrolm.db.database import RetrievalDB

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
CHECKSUMS = "checksums.json"
FINAL = "final"
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step_(\d+)$")
TIED = "lm_head.weight"  # stored once, as tok_emb.weight, when embeddings are tied
_METADATA = {"format": "pt", "retrolm": "1"}


# -- checksums ---------------------------------------------------------------------------------


def write_checksums(directory: Path) -> None:
    """Record the sha256 of every file in `directory` (call after the last file is written)."""
    sums = {
        item.name: sha256_file(item)
        for item in sorted(directory.iterdir())
        if item.is_file() and item.name != CHECKSUMS and not item.name.startswith(".")
    }
    write_json(directory / CHECKSUMS, sums)


def damage(directory: Path) -> str | None:
    """Why `directory` fails its checksums (a missing or changed file), or None if it passes.

    A directory without checksums.json (written before checksums existed) passes.
    """
    file = directory / CHECKSUMS
    if not file.is_file():
        return None
    try:
        sums = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        return f"{CHECKSUMS} is unreadable ({err})"
    for name, want in sorted(sums.items()):
        item = directory / name
        if not item.is_file():
            return f"{name} is missing"
        if sha256_file(item) != want:
            return f"{name} fails its sha256 check"
    return None


def verify(directory: Path) -> None:
    """Refuse a damaged model directory in one line."""
    problem = damage(directory)
    if problem is not None:
        raise RetrolmError(
            f"checkpoint {directory} is damaged: {problem}; use another checkpoint or retrain"
        )


# -- saving ---------------------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> Retro:
    """The plain Retro under torch.compile / DDP wrappers."""
    while not isinstance(model, Retro):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise RetrolmError(f"save_model expects a Retro model, got {type(model).__name__}")
        model = inner
    return model


def _sort_header_metadata(file: Path) -> None:
    """Rewrite the safetensors header with its metadata keys sorted, in place.

    safetensors writes `__metadata__` from a hash map, so its key order (and the file's
    bytes) change from process to process; sorted, equal weights give equal files. The
    header keeps its length, so the tensor data does not move.
    """
    with open(file, "rb+") as handle:
        n = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(n))
        meta = header.pop("__metadata__", None)
        ordered = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
        ordered.update(header)
        text = json.dumps(ordered, separators=(",", ":")).encode("utf-8")
        if len(text) > n:  # cannot happen: same keys and values, reordered
            raise RetrolmError(f"cannot rewrite the header of {file}")
        handle.seek(8)
        handle.write(text + b" " * (n - len(text)))


def save_model(model: torch.nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write config.json, model.safetensors and checksums.json into `directory`."""
    retro = _unwrap(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in retro.state_dict().items()
        if not (retro.config.tie_embeddings and name == TIED)
    }
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata=_METADATA)
        _sort_header_metadata(tmp)
    retro.config.save_json(out / CONFIG)
    write_checksums(out)
    return out


# -- finding the model -----------------------------------------------------------------------------


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints of a run directory, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """The model directory of `path`: itself, its final/, else its newest step checkpoint."""
    p = Path(path)
    if not p.exists():
        raise RetrolmError(f"checkpoint {str(p)!r} does not exist; pass a run dir or its final/ dir")
    if (p / CONFIG).is_file():
        return p
    if (p / FINAL / CONFIG).is_file():
        return p / FINAL
    steps = step_checkpoints(p)
    if steps:
        return steps[-1][1]
    raise RetrolmError(
        f"{str(p)!r} is not a model directory (no {CONFIG}, {FINAL}/ or {CHECKPOINTS}/step_*); "
        "pass the --out dir of `retrolm train` or its final/ dir"
    )


def trainer_state(directory: Path) -> dict[str, Any] | None:
    """The checkpoint's trainer_state.json, or None when it has none (or it is unreadable)."""
    return read_json_object(directory / TRAINER_STATE)


# -- loading ----------------------------------------------------------------------------------------


def _model_class(config: RetroConfig) -> type[Retro]:
    """Retro, or GPT2Retro for a retro-fitted Hugging Face GPT-2 (imported only then)."""
    from retrolm.retrofitting.hf_gpt2 import is_gpt2_retro_config

    if is_gpt2_retro_config(config):
        from retrolm.retrofitting.hf_gpt2 import GPT2Retro

        return GPT2Retro
    return Retro


def _check_keys(src: Path, state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse weights whose names or shapes differ from the model the config describes."""
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    wrong = sorted(k for k in set(shapes) & set(state) if tuple(state[k].shape) != shapes[k])
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
    if wrong:
        k = wrong[0]
        parts.append(f"shape of {k} is {tuple(state[k].shape)}, config says {shapes[k]}")
    raise RetrolmError(
        f"{src / CONFIG} does not match {src / WEIGHTS} ({'; '.join(parts)}); "
        "use the config.json saved with these weights"
    )


def trained_k(directory: Path, config: RetroConfig) -> int:
    """The k the model was trained with: config.json's n_neighbors, unless a trainer state
    written before the trainer recorded k there says otherwise."""
    state = trainer_state(directory) or {}
    k = (state.get("train_config") or {}).get("k")
    return int(k) if k else int(config.n_neighbors)


def load_checkpoint(path: str | os.PathLike[str] | Retro, map_location: str = "cpu") -> Retro:
    """Load any retrolm model (plain or retro-fitted GPT-2) from a model or run directory.

    Checks the files against checksums.json and every tensor name and shape against the
    model the config describes, so a damaged file or a config.json that does not belong
    to the weights is refused instead of half-loaded.
    """
    if isinstance(path, Retro):
        return path
    src = resolve_checkpoint_dir(path)
    if not (src / WEIGHTS).is_file():
        raise RetrolmError(f"{src} is not a model directory (needs {CONFIG} and {WEIGHTS})")
    verify(src)
    config = RetroConfig.load_json(src / CONFIG)
    config.n_neighbors = trained_k(src, config)
    cls = _model_class(config)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    if config.tie_embeddings:
        shapes.pop(TIED, None)
    try:
        state = load_file(str(src / WEIGHTS), device=str(map_location))
    except (SafetensorError, OSError) as err:
        raise RetrolmError(f"cannot read {src / WEIGHTS}: {err}") from err
    _check_keys(src, state, shapes)
    model = cls(config)
    model.load_state_dict(state, strict=False)  # keys checked above; a tied head follows tok_emb
    return model.to(map_location)


# -- does it fit the database? ------------------------------------------------------------------------


def _trained_on(directory: Path) -> Path | None:
    """The database recorded in the checkpoint's trainer state, if any."""
    trained_on = (trainer_state(directory) or {}).get("database")
    return Path(trained_on) if trained_on else None


def tokenizer_file(directory: Path) -> Path | None:
    """The tokenizer.json a checkpoint was trained with: its own copy, else its database's."""
    trained_on = _trained_on(directory)
    for candidate in (directory, trained_on):
        if candidate is not None and (candidate / TOKENIZER).is_file():
            return candidate / TOKENIZER
    return None


def tokenizer_sha(directory: Path) -> str | None:
    """sha256 of the tokenizer a checkpoint was trained with: its own tokenizer.json, else
    the one its training database's manifest records (None when neither is known)."""
    if (directory / TOKENIZER).is_file():
        return sha256_file(directory / TOKENIZER)
    trained_on = _trained_on(directory)
    if trained_on is None:
        return None
    from retrolm.db.build import MANIFEST

    manifest = read_json_object(trained_on / MANIFEST) or {}
    try:
        return manifest["files"][TOKENIZER]["sha256"]
    except (KeyError, TypeError):
        return None


def _db_tokenizer_sha(db: RetrievalDB) -> str | None:
    return db.manifest.get("files", {}).get(TOKENIZER, {}).get("sha256")


def check_fits(
    checkpoint: str | os.PathLike[str] | Retro,
    db: RetrievalDB,
    k: int | None = None,
    *,
    stored_neighbours: bool = False,
) -> int:
    """Refuse, in one line, a database the checkpoint cannot be used with; return the k to use.

    Compares the tokenizer (sha256; only for a checkpoint directory), the vocabulary size,
    the chunk size (RETRO models) and k: `k`, else the k the model was trained with, must
    be >= 1 and, where the stage reads the database's precomputed neighbours
    (`stored_neighbours`: training, evaluation), at most the number stored per chunk.
    """
    if isinstance(checkpoint, Retro):
        name, config, theirs = "the model", checkpoint.config, None
    else:
        directory = resolve_checkpoint_dir(checkpoint)
        name, theirs = f"checkpoint {directory}", tokenizer_sha(directory)
        config = RetroConfig.load_json(directory / CONFIG)
        config.n_neighbors = trained_k(directory, config)
    ours = _db_tokenizer_sha(db)
    if theirs and ours and theirs != ours:
        raise RetrolmError(
            f"tokenizer mismatch: {name} was trained with another tokenizer than database {db.path}'s; "
            "use the database it was trained on (or one built with --tokenizer from it)"
        )
    if config.vocab_size != db.vocab_size:
        raise RetrolmError(
            f"vocabulary mismatch: {name} has {config.vocab_size} tokens, database {db.path} {db.vocab_size}; "
            "use the database it was trained on"
        )
    if config.cca_layers and config.chunk_size != db.chunk_size:
        raise RetrolmError(
            f"chunk size mismatch: {name} uses m={config.chunk_size}, database {db.path} m={db.chunk_size}; "
            "use the database it was trained on"
        )
    k = int(k) if k is not None else int(config.n_neighbors)
    if k < 1:
        raise RetrolmError(f"--k {k}: need at least one neighbour per chunk")
    if stored_neighbours and config.cca_layers:
        stored = min(int(a.shape[1]) for a in db.neighbors.values())
        if k > stored:
            raise RetrolmError(
                f"k={k} neighbours per chunk, but database {db.path} stores {stored}; "
                f"pass --k {stored} or less, or rebuild the database with --neighbours {k}"
            )
    return k
