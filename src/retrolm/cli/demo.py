"""`retrolm demo`: build a database, train GPT and RETRO on it, evaluate both, write a report."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)


def demo_command(
    corpus: str | None = typer.Option(
        None,
        "--corpus",
        help="builtin:NAME or a path (default: builtin:pkgdocs; with --tiny, builtin:pydocs).",
    ),
    out: Path = typer.Option(
        Path("runs/demo"), "--out", help="Run directory (database, runs, report)."
    ),
    tokens: int | None = typer.Option(
        None, "--tokens", help="Training tokens per run (default: the demo's fixed budget)."
    ),
    minutes: float | None = typer.Option(
        None,
        "--minutes",
        help="Plan training time from a budget for the whole run instead of tokens.",
    ),
    seeds: int = typer.Option(
        1, "--seeds", help="Repeat the GPT/RETRO pair with seeds 0..N-1; report mean and range."
    ),
    tiny: bool = typer.Option(
        False, "--tiny", help="Test-sized run: tiny model, 80-document slice."
    ),
    retriever: str | None = typer.Option(
        None, "--retriever", help="dense (MiniLM + FAISS) or bm25 (default: bm25; with --tiny, dense)."
    ),
) -> None:
    """The main job: GPT vs RETRO on the same data, evaluated on held-out documents."""
    from retrolm.demo import comparison_markdown, run_demo

    summary = run_demo(
        corpus=corpus,
        out=out,
        minutes=minutes,
        tiny=tiny,
        retriever=retriever,
        tokens=tokens,
        seeds=seeds,
    )
    typer.echo(summary["verdict"] + "\n")
    typer.echo(comparison_markdown(summary))
    typer.echo(f"report: {out / 'report.md'}")
