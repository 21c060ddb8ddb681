"""`retrolm db build|info|search`: thin wrappers over `retrolm.db.database.RetrievalDB`.

The build options are generated from the fields of `BuildSettings` (retrolm.db.build).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from retrolm.cli.options import with_dataclass_options
from retrolm.db.build import BuildSettings


def register(app: typer.Typer) -> None:
    db_app = typer.Typer(help="Build, inspect and query a retrieval database.", no_args_is_help=True)
    app.add_typer(db_app, name="db")

    @db_app.command("build")
    @with_dataclass_options(BuildSettings, into="settings")
    def build(
        settings: BuildSettings,
        out: Path = typer.Option(..., "--out", help="database directory to create, resume or repair"),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="replace a complete database built with other settings"
        ),
    ) -> None:
        """Build the retrieval database (resumes an interrupted build, repairs a damaged one)."""
        import time
        import warnings

        from retrolm.db.database import RetrievalDB

        warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"

        t0 = time.time()
        db = RetrievalDB.build(settings, out, overwrite=overwrite)
        _print_info(db.info(), time.time() - t0)

    @db_app.command("info")
    def info(
        path: Path = typer.Argument(..., help="database directory"),
        as_json: bool = typer.Option(False, "--json", help="print the manifest summary as JSON"),
    ) -> None:
        """Counts per split, settings and sizes on disk."""
        from retrolm.db.database import RetrievalDB

        data = RetrievalDB.open(path, verify=False).info()
        if as_json:
            typer.echo(json.dumps(data, indent=2, sort_keys=True))
        else:
            _print_info(data, None)

    @db_app.command("search")
    def search(
        path: Path = typer.Argument(..., help="database directory"),
        text: str = typer.Argument(..., help="the query text"),
        k: int = typer.Option(5, "-k", "--k", help="how many chunks to return"),
        as_json: bool = typer.Option(False, "--json", help="print the hits as JSON"),
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
