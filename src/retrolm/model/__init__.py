"""The RETRO model in pure PyTorch: config, layers, decoder + encoder + CCA, checkpoints, FLOPs.

Nothing in this package touches the database, the CLI or distributed code.
"""

from retrolm.model.config import PRESETS, RetroConfig, default_cca_layers
from retrolm.model.retro import Retro, RetroCache

__all__ = ["PRESETS", "Retro", "RetroCache", "RetroConfig", "default_cca_layers"]
