"""Load any retrolm model directory, whichever decoder it was built with.

A checkpoint is `config.json` + `model.safetensors`. Most are plain `Retro` models
(`retrolm.model.checkpoint.load_model`); retro-fitted Hugging Face GPT-2 models record
`config.extra["decoder"] == "hf-gpt2"` and are rebuilt by `retrolm.retrofit.hf_gpt2`. Every stage
that reads a checkpoint (train --resume/--init-from, eval, generate, serve, qa) goes
through `load_checkpoint` so both kinds work everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from retrolm.errors import RetrolmError
from retrolm.model.config import RetroConfig
from retrolm.model.retro import Retro


def resolve_checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """A model directory: `path` itself, or `path/final` for a training run directory."""
    p = Path(path)
    if not p.exists():
        raise RetrolmError(f"checkpoint {str(p)!r} does not exist; pass a run dir or its final/ dir")
    if (p / "config.json").is_file():
        return p
    if (p / "final" / "config.json").is_file():
        return p / "final"
    raise RetrolmError(
        f"{str(p)!r} is not a model directory (no config.json, nor final/config.json); "
        "pass the --out dir of `retrolm train` or its final/ dir"
    )


def load_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> Retro:
    """Load a retrolm model dir, including retro-fitted Hugging Face GPT-2 models."""
    from retrolm.model.checkpoint import load_model
    from retrolm.retrofit.hf_gpt2 import is_gpt2_retro_config, load_gpt2_retro

    directory = resolve_checkpoint_dir(path)
    config = RetroConfig.load_json(directory / "config.json")
    if is_gpt2_retro_config(config):
        return load_gpt2_retro(directory, map_location)
    return load_model(directory, map_location)
