"""`retrolm db build|info|search`: thin wrappers over `retrolm.db.database.RetrievalDB`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from retrolm.errors import RetrolmError


def _parse_split(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(p < 0 for p in parts) or parts[0] <= 0:
        raise RetrolmError(f"--split {text!r}: give three non-negative integers like 98,1,1 (train > 0)")
    return parts  # type: ignore[return-value]


def register(app: typer.Typer) -> None:
    db_app = typer.Typer(help="Build, inspect and query a retrieval database.", no_args_is_help=True)
    app.add_typer(db_app, name="db")

    @db_app.command("build")
    def build(
        corpus: str = typer.Option(..., "--corpus", help="directory of .txt/.md, .jsonl(.gz), .parquet or builtin:NAME"),
        out: Path = typer.Option(..., "--out", help="database directory to create (or resume)"),
        retriever: str = typer.Option("dense", "--retriever", help="dense | bm25"),
        chunk_size: int = typer.Option(64, "--chunk-size"),
        vocab_size: int = typer.Option(8192, "--vocab-size"),
        tokenizer: str | None = typer.Option(None, "--tokenizer", help="tokenizer.json or HF dir instead of training"),
        neighbors: int = typer.Option(8, "--neighbors"),
        index: str | None = typer.Option(None, "--index", help="FAISS factory string (default: chosen by size)"),
        nprobe: int | None = typer.Option(None, "--nprobe"),
        split: str = typer.Option("98,1,1", "--split"),
        seed: int = typer.Option(0, "--seed"),
        near_dedup: bool = typer.Option(False, "--near-dedup", help="also drop MinHash near-duplicates"),
        text_field: str = typer.Option("text", "--text-field"),
        embedder: str | None = typer.Option(None, "--embedder", help="local HF encoder dir (default MiniLM)"),
        embed_batch_size: int = typer.Option(64, "--embed-batch-size"),
        bf16: bool = typer.Option(False, "--bf16", help="embed in bfloat16"),
    ) -> None:
        """Build the retrieval database (resumes an interrupted build with the same settings)."""
        import time
        import warnings

        from retrolm.db.database import RetrievalDB

        warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"

        t0 = time.time()
        db = RetrievalDB.build(
            corpus, out, retriever=retriever, chunk_size=chunk_size, vocab_size=vocab_size, tokenizer=tokenizer,
            neighbors=neighbors, index=index, nprobe=nprobe, split=_parse_split(split), seed=seed,
            near_dedup=near_dedup, text_field=text_field, embedder=embedder, embed_batch_size=embed_batch_size,
            embed_dtype="bf16" if bf16 else "fp32",
        )
        _print_info(db.info(), time.time() - t0)

    @db_app.command("info")
    def info(path: Path = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
        """Counts per split, settings and sizes on disk."""
        from retrolm.db.database import RetrievalDB

        data = RetrievalDB.open(path, verify=False).info()
        if as_json:
            typer.echo(json.dumps(data, indent=2, sort_keys=True))
        else:
            _print_info(data, None)

    @db_app.command("search")
    def search(
        path: Path = typer.Argument(...),
        text: str = typer.Argument(...),
        k: int = typer.Option(5, "-k", "--k"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Nearest database chunks (with continuation) for a query text."""
        from retrolm.db.database import RetrievalDB

        hits = RetrievalDB.open(path, verify=False).search(text, k)
        if as_json:
            typer.echo(json.dumps(hits, indent=2))
            return
        for rank, hit in enumerate(hits, 1):
            typer.echo(f"#{rank}  score {hit['score']:.4f}  chunk {hit['chunk_id']}  doc {hit['doc_id']}")
            typer.echo(f"    {hit['text']!r}")
            typer.echo(f"    + {hit['continuation']!r}")


def _print_info(data: dict, seconds: float | None) -> None:
    c, d, r = data["counts"], data["dedup"], data["retriever"]
    typer.echo(f"database {data['path']}")
    typer.echo(f"  documents read {d['read']}, exact duplicates removed {d['exact_dups']}, "
               f"near duplicates removed {d['near_dups']}, binary skipped {d['skipped_binary']}")
    if data.get("sources"):
        typer.echo("  sources " + ", ".join(f"{k} {v}" for k, v in data["sources"].items()))
    for s, v in c.items():
        extra = f", chunks {v['chunks']}" if "chunks" in v else ""
        typer.echo(f"  {s:5s}: docs {v['docs']}, tokens {v['tokens']}, query windows {v['windows']}{extra}")
    typer.echo(f"  retriever {r['kind']}" + (f" ({r['embedder']}, dim {r['dim']}, index {r['index_factory']})"
                                              if r["kind"] == "dense" else ""))
    typer.echo(f"  chunk size {data['settings']['chunk_size']}, neighbours {data['settings']['neighbors']}, "
               f"{data['bytes_on_disk'] / 1e6:.1f} MB on disk")
    if seconds is not None:
        typer.echo(f"  wall time {seconds:.1f} s")
