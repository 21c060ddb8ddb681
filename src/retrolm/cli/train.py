"""`retrolm train`: pretrain RETRO (or the GPT baseline with --no-retrieval) on a database.

Runs as one process, or as DDP under `torchrun --nproc_per_node=N -m retrolm train ...`.
The training options are generated from `TrainConfig` (help text in its field metadata).
"""

from __future__ import annotations

from pathlib import Path

import typer

from retrolm.cli.options import with_dataclass_options
from retrolm.training.config import TrainConfig


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)


@with_dataclass_options(TrainConfig, into="cfg", exclude=("progress",))
def train_command(
    db: Path = typer.Option(..., "--db", help="Retrieval database directory (retrolm db build)."),
    model: str = typer.Option(
        ..., "--model", help="Model preset name (tiny, cpu-small, ...) or a config.json path."
    ),
    out: Path = typer.Option(..., "--out", help="Run directory: checkpoints, final/, metrics."),
    cfg: TrainConfig = None,  # type: ignore[assignment]  # built from the generated options
) -> None:
    """Train a RETRO model (or a GPT with --no-retrieval) on a retrieval database."""
    import dataclasses

    from retrolm.cli.device import resolve_device
    from retrolm.training.trainer import train

    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
    final = train(db, model, out, cfg)
    typer.echo(str(final))
