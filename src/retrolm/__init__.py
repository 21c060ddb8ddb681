"""retrolm: retrieval-enhanced language models (RETRO) that run on a laptop and scale out.

The public names are imported lazily so that `import retrolm` stays cheap (the CLI
imports torch, FAISS and the encoder only for the commands that need them). No
submodule shares a public name, so `retrolm.train` is always the function, whatever
else has been imported.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "RetrievalDB": "retrolm.db.database",
    "RetroConfig": "retrolm.model.config",
    "Retro": "retrolm.model.retro",
    "load_checkpoint": "retrolm.checkpoints",
    "TrainConfig": "retrolm.training.trainer",
    "train": "retrolm.training.trainer",
    "evaluate": "retrolm.evaluation.perplexity",
    "generate": "retrolm.generation.decode",
    "retrofit": "retrolm.retrofitting.pipeline",
    "RetrolmError": "retrolm.errors",
}

__all__ = sorted([*_PUBLIC, "__version__"])


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'retrolm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
