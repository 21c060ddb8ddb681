"""`retrolm generate`: continue prompts with a RETRO (online retrieval) or GPT checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from retrolm.errors import RetrolmError


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)


def _read_prompts(prompt: str | None, prompt_file: Path | None) -> list[str]:
    if (prompt is None) == (prompt_file is None):
        raise RetrolmError("give exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt is not None:
        return [prompt]
    assert prompt_file is not None
    if not prompt_file.is_file():
        raise RetrolmError(f"prompt file {str(prompt_file)!r} not found")
    try:
        lines = prompt_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RetrolmError(f"cannot read prompt file {str(prompt_file)!r}: {err}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise RetrolmError(f"prompt file {str(prompt_file)!r} has no non-empty line")
    return prompts


def generate_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Model directory (e.g. <run>/final)."),
    db: Path | None = typer.Option(
        None, "--db", help="Retrieval database (required for RETRO; gives the tokenizer)."
    ),
    prompt: str | None = typer.Option(None, "--prompt", help="Prompt text."),
    prompt_file: Path | None = typer.Option(
        None, "--prompt-file", help="Text file, one prompt per non-empty line."
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="New tokens per prompt."),
    greedy: bool = typer.Option(False, "--greedy", help="Argmax decoding (no sampling)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (> 0)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    repetition_penalty: float = typer.Option(
        1.0, "--repetition-penalty", help="CTRL-style penalty on seen tokens (1 = off)."
    ),
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (prompt i uses seed + i)."),
    speculative: bool = typer.Option(
        False, "--speculative", help="Retrieval-draft speculative decoding (greedy only; exact)."
    ),
    k: int | None = typer.Option(None, "--k", help="Neighbours per chunk (default: the model's)."),
    show_retrieval: bool = typer.Option(
        False, "--show-retrieval", help="Print what was retrieved for each chunk."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per prompt."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Generate text from prompts; RETRO retrieves from --db every chunk_size tokens."""
    import json

    from retrolm.generation.decode import generate, load_for_generation

    prompts = _read_prompts(prompt, prompt_file)
    if greedy and (temperature != 1.0 or top_k != 0 or top_p != 1.0):
        raise RetrolmError("--greedy takes no --temperature/--top-k/--top-p; drop one or the other")
    if speculative and not greedy:
        raise RetrolmError("--speculative works with --greedy only (it is exact for greedy decoding)")
    model, tokenizer, database = load_for_generation(checkpoint, db, device=device)
    results = generate(
        model, tokenizer, prompts, db=database, max_new_tokens=max_new_tokens, greedy=greedy,
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        stop=stop or None, seed=seed, speculative=speculative, k=k, return_retrieval=show_retrieval,
    )  # fmt: skip
    for i, res in enumerate(results):
        if as_json:
            out = res.to_dict()
            if not show_retrieval:
                out.pop("retrieval")
            typer.echo(json.dumps(out, ensure_ascii=False))
            continue
        if i:
            typer.echo("-" * 40)
        typer.echo(res.prompt + res.text)
        if show_retrieval:
            for rec in res.retrieval:
                typer.echo(f"[chunk {rec.chunk_index}] query: {rec.query!r}")
                for j, nb in enumerate(rec.neighbours):
                    typer.echo(
                        f"  {j + 1}. chunk {nb['chunk_id']} ({nb['doc_id']}, score {nb['score']:.3f}): "
                        f"{nb['text']!r} -> {nb['continuation']!r}"
                    )
                if not rec.neighbours:
                    typer.echo("  (no neighbours)")
        stats = res.stats
        line = (
            f"[{stats['new_tokens']} tokens, {stats['tokens_per_s']:.1f} tok/s, "
            f"finish: {res.finish_reason}"
        )
        if speculative:
            line += f", mean accepted draft {stats['mean_accepted']:.2f}"
        typer.echo(line + "]", err=True)
