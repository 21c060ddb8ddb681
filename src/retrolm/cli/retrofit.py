"""`retrolm retrofit`: add retrieval (encoder + CCA) to a trained GPT and train it."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("retrofit")(retrofit_command)


def _layers(text: str | None) -> list[int] | None:
    from retrolm.errors import RetrolmError

    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RetrolmError(f"--cca-layers {text!r}: give 1-based layer numbers like 6,9,12") from None


def retrofit_command(
    source: Path = typer.Option(
        ..., "--source", help="retrolm GPT checkpoint dir (or run dir) or a local HF GPT-2 dir."
    ),
    db: Path = typer.Option(..., "--db", help="Retrieval database (same tokenizer as the source)."),
    out: Path = typer.Option(..., "--out", help="Run directory: init/, checkpoints, final/, retrofit.json."),
    freeze_decoder: bool = typer.Option(
        False, "--freeze-decoder", help="Train only encoder + CCA (DeepMind); default: all (InstructRetro)."
    ),
    tokens: int | None = typer.Option(None, "--tokens", help="Budget in training tokens."),
    minutes: float | None = typer.Option(None, "--minutes", help="Budget in minutes."),
    lr: float | None = typer.Option(
        None, "--lr", help="Peak LR (default 1e-3 with --freeze-decoder, 1e-4 for full training)."
    ),
    min_lr_ratio: float = typer.Option(0.1, "--min-lr-ratio", help="Cosine floor / peak LR."),
    warmup_steps: int | None = typer.Option(None, "--warmup-steps", help="Re-warm steps."),
    replay_share: float = typer.Option(
        0.0, "--replay-share", help="Share of sequences replayed without neighbours (full training)."
    ),
    replay_db: Path | None = typer.Option(
        None, "--replay-db", help="Database to replay from (default: --db's LM training data)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Global batch, sequences per step."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Sequence length (multiple of m)."),
    cca_layers: str | None = typer.Option(None, "--cca-layers", help="1-based CCA layers, e.g. 6,9,12."),
    enc_layers: int = typer.Option(2, "--enc-layers", help="Neighbour encoder layers."),
    enc_d_model: int | None = typer.Option(None, "--enc-d-model", help="Encoder width."),
    k: int = typer.Option(2, "--k", help="Neighbours per chunk."),
    seed: int = typer.Option(0, "--seed", help="Seed for the new weights and data order."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda if any)."),
    eval_sequences: int = typer.Option(64, "--eval-sequences", help="Valid sequences for perplexity."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Retro-fit a GPT: copy its decoder, add a random encoder + CCA, train, report perplexity."""
    import dataclasses
    import json

    from retrolm.retrofit.pipeline import retrofit
    from retrolm.training.trainer import TrainConfig

    cfg = TrainConfig(
        seq_len=seq_len, batch_size=batch_size, tokens=tokens, minutes=minutes,
        lr=lr if lr is not None else (1e-3 if freeze_decoder else 1e-4),
        min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps, k=k, seed=seed, bf16=bf16,
        device=device,
    )  # fmt: skip
    extra = {"replay_share": replay_share, "replay_db": str(replay_db) if replay_db else None}
    names = {f.name for f in dataclasses.fields(cfg)}
    if replay_share and "replay_share" not in names:
        from retrolm.errors import RetrolmError

        raise RetrolmError("this trainer has no replay support; drop --replay-share")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in extra.items() if k in names})
    report = retrofit(
        source, db, out, cfg, freeze=freeze_decoder, cca_layers=_layers(cca_layers),
        enc_layers=enc_layers, enc_d_model=enc_d_model, n_neighbors=k,
        eval_sequences=eval_sequences,
    )  # fmt: skip
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    p, ppl = report["parameters"], report["valid_perplexity"]
    typer.echo(
        f"retro-fitted ({report['mode']}): {p['decoder']:,} decoder + {p['retrieval']:,} new params "
        f"(+{100 * p['retrieval_share_of_decoder']:.1f}%), {p['trainable']:,} trained"
    )
    b, a = ppl["before"], ppl["after"]
    typer.echo(f"valid ppl before: source {b['source']:.3f}, retrieval on {b['retrieval_on']:.3f}")
    typer.echo(f"valid ppl after:  retrieval on {a['retrieval_on']:.3f}, off {a['retrieval_off']:.3f}")
    typer.echo(report["final"])
