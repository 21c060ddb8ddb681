"""Save and load a model as a directory a person can read: config.json + model.safetensors.

Loading checks every tensor name and shape against the model the config describes, so a
config.json that does not belong to the weights is refused instead of half-loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from retrolm.atomic import atomic_path
from retrolm.errors import RetrolmError
from retrolm.model.config import RetroConfig
from retrolm.model.retro import Retro

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TIED = "lm_head.weight"  # stored once, as tok_emb.weight, when embeddings are tied


def _unwrap(model: torch.nn.Module) -> Retro:
    """The plain Retro under torch.compile / DDP wrappers."""
    while not isinstance(model, Retro):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise RetrolmError(f"save_model expects a Retro model, got {type(model).__name__}")
        model = inner
    return model


def save_model(model: torch.nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write config.json and model.safetensors into `directory` (each file atomically)."""
    retro = _unwrap(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in retro.state_dict().items()
        if not (retro.config.tie_embeddings and name == TIED)
    }
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "retrolm": "1"})
    retro.config.save_json(out / CONFIG)
    return out


def load_model(directory: str | os.PathLike[str], map_location: str = "cpu") -> Retro:
    """Build the model from config.json and load model.safetensors; refuse any mismatch."""
    src = Path(directory)
    if not (src / CONFIG).is_file() or not (src / WEIGHTS).is_file():
        raise RetrolmError(f"{src} is not a model directory (needs {CONFIG} and {WEIGHTS})")
    config = RetroConfig.load_json(src / CONFIG)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Retro(config).state_dict().items()}
    if config.tie_embeddings:
        shapes.pop(TIED, None)
    try:
        state = load_file(str(src / WEIGHTS), device=str(map_location))
    except (SafetensorError, OSError) as err:
        raise RetrolmError(f"cannot read {src / WEIGHTS}: {err}") from err
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    wrong = sorted(k for k in set(shapes) & set(state) if tuple(state[k].shape) != shapes[k])
    if missing or unexpected or wrong:
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
    model = Retro(config)
    model.load_state_dict(state, strict=False)  # keys checked above; tied head follows tok_emb
    return model.to(map_location)
