"""retrolm: retrieval-enhanced language models (RETRO) that run on a laptop and scale out.

The public names are imported lazily so that `import retrolm` stays cheap
(the CLI imports torch, FAISS and the encoder only for the commands that need them).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "RetrievalDB": "retrolm.db.database",
    "RetroConfig": "retrolm.model.config",
    "Retro": "retrolm.model.retro",
    "train": "retrolm.train",
    "evaluate": "retrolm.evaluate",
    "generate": "retrolm.generate",
    "RetrolmError": "retrolm.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'retrolm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
