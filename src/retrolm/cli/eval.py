"""`retrolm eval`: held-out perplexity / bpb of GPT, RETRO, RETRO-off, RETRO-shuffled and RAG_GPT,
overlap buckets."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from retrolm.cli.device import device_option, resolve_device


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)


def eval_command(
    db: Path = typer.Option(..., "--db", help="Retrieval database directory (retrolm db build)."),
    checkpoint: list[Path] = typer.Option(
        ..., "--checkpoint", metavar="<path>",
        help="Run dir of `retrolm train` (or its final/); repeat for several.",
    ),
    split: str = typer.Option("valid", "--split", help="Held-out split: valid or test."),
    k: int | None = typer.Option(None, "--k", help="Neighbours per chunk (default: the RETRO model's)."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Sequence length (default: as trained)."),
    max_sequences: int | None = typer.Option(None, "--max-sequences", help="Evaluate only the first N."),
    no_rag: bool = typer.Option(False, "--no-rag", help="Skip RAG_GPT for GPT checkpoints."),
    no_shuffled: bool = typer.Option(
        False, "--no-shuffled", help="Skip RETRO-shuffled (RETRO fed another sequence's neighbours)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of Markdown tables."),
    degeneration: bool = typer.Option(
        False, "--degeneration", help="Also measure repetition % of sampled generations."
    ),
    prompts: int = typer.Option(100, "--prompts", help="Prompts for --degeneration."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", help="Tokens per --degeneration sample."),
    device: str | None = device_option(),
) -> None:
    """Evaluate checkpoints on a held-out split of their database."""
    from retrolm.checkpoints import resolve_checkpoint_dir
    from retrolm.db.database import RetrievalDB
    from retrolm.errors import RetrolmError
    from retrolm.evaluation.perplexity import content_gain, evaluate, to_markdown

    if split not in ("valid", "test"):
        raise RetrolmError(f"--split {split!r}: choose valid or test (held-out documents only)")
    device = resolve_device(device)
    database = RetrievalDB.open(db)
    result = evaluate(database, list(checkpoint), split=split, k=k, max_sequences=max_sequences,
                      seq_len=seq_len, device=device, rag=not no_rag,
                      shuffled=not no_shuffled)  # fmt: skip
    if degeneration:
        from retrolm.evaluation.degeneration import evaluate_degeneration

        dirs = [resolve_checkpoint_dir(c) for c in checkpoint]
        result["degeneration"] = evaluate_degeneration(database, dirs, prompts, max_new_tokens=max_new_tokens,
                                                       k=result["k"])  # fmt: skip
    if as_json:
        labels = dict.fromkeys(r.get("label") for r in result["rows"] if r["model"] == "RETRO")
        result["content_gain"] = {str(label): content_gain(result, label) for label in labels}
        typer.echo(json.dumps(result, indent=2, default=float))
        return
    typer.echo(to_markdown(result))
    if degeneration:
        typer.echo(_degeneration_markdown(result["degeneration"], prompts, max_new_tokens))


def _degeneration_markdown(deg: dict, prompts: int, max_new_tokens: int) -> str:
    lines = [f"Degeneration (docs/reference.md §2): {prompts} held-out prompts, {max_new_tokens} new tokens, top-p 0.9.", "",
             "| checkpoint | kind | repetition % | distinct-1 | distinct-2 | mean length |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in deg["checkpoints"]:
        lines.append(f"| {row['checkpoint']} | {row['kind']} | {row['repetition_pct']:.2f} | "
                     f"{row['distinct_1']:.3f} | {row['distinct_2']:.3f} | {row['mean_length']:.1f} |")
    return "\n".join(lines) + "\n"
