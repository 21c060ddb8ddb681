"""`retrolm train`: pretrain RETRO (or the GPT baseline with --no-retrieval) on a database.

Runs as one process, or as DDP under `torchrun --nproc_per_node=N -m retrolm train ...`.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)


def train_command(
    db: Path = typer.Option(..., "--db", help="Retrieval database directory (retrolm db build)."),
    model: str = typer.Option(
        ..., "--model", help="Model preset name (tiny, cpu-small, ...) or a config.json path."
    ),
    out: Path = typer.Option(..., "--out", help="Run directory: checkpoints, final/, metrics."),
    no_retrieval: bool = typer.Option(
        False, "--no-retrieval", help="Train the GPT baseline (no CCA) on the same sequences."
    ),
    tokens: int | None = typer.Option(None, "--tokens", help="Budget in training tokens."),
    minutes: float | None = typer.Option(
        None, "--minutes", help="Budget in minutes (converted to a step count after a short probe)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Global batch, sequences per step."),
    seq_len: int | None = typer.Option(
        None, "--seq-len", help="Sequence length n (a multiple of the chunk size); default: model's."
    ),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate."),
    min_lr_ratio: float = typer.Option(0.1, "--min-lr-ratio", help="Cosine floor / peak LR."),
    retrieval_lr_scale: float = typer.Option(
        1.0, "--retrieval-lr-scale", help="LR multiplier for the encoder and CCA parameters."
    ),
    wrong_neighbour_share: float = typer.Option(
        0.0,
        "--wrong-neighbour-share",
        help="Share of sequences trained with another sequence's neighbours (teaches ignoring them).",
    ),
    warmup_steps: int | None = typer.Option(
        None, "--warmup-steps", help="Linear warm-up steps (default: 5% of steps, <= 200)."
    ),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    k: int | None = typer.Option(
        None, "--k", help="Neighbours per chunk (<= the database's K; default: the model's)."
    ),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    seed: int = typer.Option(0, "--seed", help="Seed for weights and data order."),
    checkpoint_every: int = typer.Option(
        200, "--checkpoint-every", help="Checkpoint every N steps (0: only at the end)."
    ),
    keep_checkpoints: int = typer.Option(3, "--keep-checkpoints", help="Step checkpoints kept."),
    num_workers: int = typer.Option(0, "--num-workers", help="DataLoader worker processes."),
    init_from: Path | None = typer.Option(
        None, "--init-from", help="Continue training from this checkpoint dir (LR re-warm)."
    ),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda if any)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint."),
) -> None:
    """Train a RETRO model (or a GPT with --no-retrieval) on a retrieval database."""
    from retrolm.training.trainer import TrainConfig, train

    cfg = TrainConfig(
        seq_len=seq_len,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        retrieval_lr_scale=retrieval_lr_scale,
        wrong_neighbour_share=wrong_neighbour_share,
        min_lr_ratio=min_lr_ratio,
        warmup_steps=warmup_steps,
        k=k,
        retrieval=not no_retrieval,
        tokens=tokens,
        minutes=minutes,
        bf16=bf16,
        compile=compile_model,
        seed=seed,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        num_workers=num_workers,
        resume=resume,
        init_from=str(init_from) if init_from is not None else None,
        device=device,
    )
    final = train(db, model, out, cfg)
    typer.echo(str(final))
