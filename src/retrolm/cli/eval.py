"""`retrolm eval`: held-out perplexity / bpb of GPT, RETRO, RETRO-off and RAG_GPT, overlap buckets."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)


def eval_command(
    db: Path = typer.Option(..., "--db", help="Retrieval database directory (retrolm db build)."),
    checkpoint: list[Path] = typer.Option(
        ..., "--checkpoint", help="Run dir of `retrolm train` (or its final/); repeat for several."
    ),
    split: str = typer.Option("valid", "--split", help="Held-out split: valid or test."),
    k: int | None = typer.Option(None, "--k", help="Neighbours per chunk (default: the RETRO model's)."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Sequence length (default: as trained)."),
    max_sequences: int | None = typer.Option(None, "--max-sequences", help="Evaluate only the first N."),
    no_rag: bool = typer.Option(False, "--no-rag", help="Skip RAG_GPT for GPT checkpoints."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of Markdown tables."),
    degeneration: bool = typer.Option(
        False, "--degeneration", help="Also measure repetition % of sampled generations (SPEC §2)."
    ),
    prompts: int = typer.Option(100, "--prompts", help="Prompts for --degeneration."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Evaluate checkpoints on a held-out split of their database."""
    from retrolm.db.database import RetrievalDB
    from retrolm.errors import RetrolmError
    from retrolm.evaluate import evaluate, to_markdown

    if split not in ("valid", "test"):
        raise RetrolmError(f"--split {split!r}: choose valid or test (held-out documents only)")
    database = RetrievalDB.open(db)
    result = evaluate(database, list(checkpoint), split=split, k=k, max_sequences=max_sequences,
                      seq_len=seq_len, device=device, rag=not no_rag)  # fmt: skip
    if degeneration:
        try:
            from retrolm.degeneration import evaluate_degeneration
        except ImportError as err:
            raise RetrolmError(
                f"--degeneration needs retrolm.degeneration, which this installation lacks ({err})"
            ) from None
        result["degeneration"] = evaluate_degeneration(database, list(checkpoint), prompts)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=float))
        return
    typer.echo(to_markdown(result))
    if degeneration:
        typer.echo("Degeneration:\n" + json.dumps(result["degeneration"], indent=2, default=float))
