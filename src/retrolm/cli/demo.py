"""`retrolm demo`: build a database, train GPT and RETRO on it, evaluate both, write a report."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)


def demo_command(
    corpus: str = typer.Option("builtin:pydocs", "--corpus", help="builtin:pydocs, builtin:facts or a path."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory (database, runs, report)."),
    minutes: float = typer.Option(15.0, "--minutes", help="Budget for the whole run (database included)."),
    tiny: bool = typer.Option(False, "--tiny", help="Test-sized run: tiny model, 80-document slice."),
    retriever: str = typer.Option("dense", "--retriever", help="dense (MiniLM + FAISS) or bm25."),
    tokens: int | None = typer.Option(
        None, "--tokens", help="Training tokens per run instead of a time budget (load-independent)."
    ),
) -> None:
    """The main job: GPT vs RETRO on the same data, evaluated on held-out documents."""
    from retrolm.demo import comparison_markdown, run_demo

    summary = run_demo(corpus=corpus, out=out, minutes=minutes, tiny=tiny, retriever=retriever, tokens=tokens)
    typer.echo(comparison_markdown(summary))
    typer.echo(f"report: {out / 'report.md'}")
