"""`retrolm serve`: the HTTP server (FastAPI + uvicorn) over one checkpoint (+ database)."""

from __future__ import annotations

from pathlib import Path

import typer

from retrolm.cli.device import device_option, resolve_device
from retrolm.errors import RetrolmError


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)


def serve_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Model directory (e.g. <run>/final)."),
    db: Path | None = typer.Option(None, "--db", help="Retrieval database (required for RETRO)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    max_prompt_tokens: int = typer.Option(1024, "--max-prompt-tokens", help="Longest prompt accepted."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Largest max_tokens a request may ask for."),
    max_pending: int = typer.Option(64, "--max-pending", help="Requests queued or running; more get 429."),
    model_name: str | None = typer.Option(
        None, "--model-name", help="Name in /v1/models and answers (default: the checkpoint directory's)."
    ),
    speculative: bool = typer.Option(
        False, "--speculative", help="Use retrieval-draft speculative decoding for temperature 0."
    ),
    device: str | None = device_option(),
) -> None:
    """Serve an OpenAI-compatible /v1/completions, /v1/models, /v1/retrieve, /health (docs/serving.md)."""
    import sys

    import uvicorn

    from retrolm.serve import ServeLimits, create_app

    if not 0 < port < 65536:
        raise RetrolmError(f"--port {port} must be in 1..65535")
    if min(max_prompt_tokens, max_tokens, max_pending) < 1:
        raise RetrolmError("--max-prompt-tokens, --max-tokens and --max-pending must be >= 1")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {host}: the server has no authentication", file=sys.stderr)
    limits = ServeLimits(max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, max_pending=max_pending)
    app = create_app(checkpoint, db, limits, device=resolve_device(device), speculative=speculative, model_name=model_name)
    uvicorn.run(app, host=host, port=port, log_level="info")
