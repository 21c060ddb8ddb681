"""`retrolm generate`: continue prompts with a RETRO (online retrieval) or GPT checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from retrolm.cli.device import device_option, resolve_device
from retrolm.errors import RetrolmError

if TYPE_CHECKING:
    from retrolm.tokenizer import Tokenizer


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


def one_line(text: str, width: int) -> str:
    """`text` with every whitespace run collapsed to one space, cut to `width` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: max(0, width - 3)] + "..."


def show_retrieval(res: Any, width: int) -> None:
    """Per completed chunk: the query, then each neighbour's doc id, score and text, one line each."""
    if res.retrieval_note and not res.retrieval:
        typer.echo(f"[retrieval] {res.retrieval_note}")
    for rec in res.retrieval:
        typer.echo(one_line(f"[chunk {rec.chunk_index}] query: {rec.query}", width))
        for j, nb in enumerate(rec.neighbours):
            typer.echo(f"  {j + 1}. doc {nb['doc_id']}, chunk {nb['chunk_id']}, score {nb['score']:.3f}")
            typer.echo("     text: " + one_line(nb["text"], width - 11))
            typer.echo("     next: " + one_line(nb["continuation"], width - 11))
        if not rec.neighbours:
            typer.echo("  (no neighbours)")


def _stream_one(
    run: Callable[..., Any], tokenizer: Tokenizer, prompt: str, stop: list[str] | None
) -> Any:
    """Print `prompt`, then the continuation as tokens come; return the GenerationResult."""
    from retrolm.generation.decode import TextStream

    stream = TextStream(tokenizer, stop)
    typer.echo(prompt, nl=False)

    def on_step(_: int, ids: list[int]) -> None:
        piece = stream.piece(ids)
        if piece:
            typer.echo(piece, nl=False)

    try:
        res = run(on_step)
    except KeyboardInterrupt:
        typer.echo("")  # what was printed stays printed; end the line
        raise
    typer.echo(stream.finish(res.text))
    return res


def generate_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Model directory (e.g. <run>/final)."),
    db: Path | None = typer.Option(
        None, "--db", help="Retrieval database (required for RETRO; gives the tokenizer)."
    ),
    prompt: str | None = typer.Option(None, "--prompt", help="Prompt text."),
    prompt_file: Path | None = typer.Option(
        None, "--prompt-file", help="Text file, one prompt per non-empty line."
    ),
    max_new_tokens: int = typer.Option(
        64, "--max-new-tokens", help="New tokens per prompt (at most 16384)."
    ),
    greedy: bool = typer.Option(False, "--greedy", help="Argmax decoding (no sampling)."),
    temperature: float = typer.Option(
        1.0, "--temperature", help="Sampling temperature (0 = greedy)."
    ),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    repetition_penalty: float = typer.Option(
        1.0, "--repetition-penalty", help="CTRL-style penalty on seen tokens (1 = off)."
    ),
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (prompt i uses seed + i)."),
    speculative: bool = typer.Option(
        False, "--speculative",
        help="Retrieval-draft speculative decoding (lossless: same output distribution).",
    ),  # fmt: skip
    k: int | None = typer.Option(None, "--k", help="Neighbours per chunk (default: the model's)."),
    show_retrieval_flag: bool = typer.Option(
        False, "--show-retrieval", help="Print what was retrieved for each chunk."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per prompt."),
    device: str | None = device_option(),
) -> None:
    """Generate text from prompts; RETRO retrieves from --db every chunk_size tokens.

    Text output streams as tokens are produced; --json prints one object per prompt at the end.
    """
    import json
    import shutil

    from retrolm.generation.decode import MAX_NEW_TOKENS, generate, load_for_generation

    prompts = _read_prompts(prompt, prompt_file)
    if greedy and (temperature not in (0.0, 1.0) or top_k != 0 or top_p != 1.0):
        raise RetrolmError("--greedy takes no --temperature/--top-k/--top-p; drop one or the other")
    if not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise RetrolmError(
            f"--max-new-tokens {max_new_tokens} must be in [0, {MAX_NEW_TOKENS}]; "
            "for longer text, continue from the output in another call"
        )
    model, tokenizer, database = load_for_generation(checkpoint, db, device=resolve_device(device))
    kw = dict(
        db=database, max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
        top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, stop=stop or None,
        speculative=speculative, k=k, return_retrieval=show_retrieval_flag,
    )  # fmt: skip
    if as_json:
        for res in generate(model, tokenizer, prompts, seed=seed, **kw):
            out = res.to_dict()
            if not show_retrieval_flag:
                out.pop("retrieval")
            typer.echo(json.dumps(out, ensure_ascii=False))
        return
    width = max(40, shutil.get_terminal_size((100, 24)).columns)
    for i, text in enumerate(prompts):
        if i:
            typer.echo("-" * 40)
        # one prompt at a time, so its text can stream; prompt i still samples with seed + i
        res = _stream_one(
            lambda on_step, text=text, i=i: generate(
                model, tokenizer, text, seed=seed + i, on_step=on_step, **kw
            )[0],
            tokenizer, text, stop,
        )  # fmt: skip
        if show_retrieval_flag:
            show_retrieval(res, width)
        if res.retrieval_note:
            typer.echo(f"note: {res.retrieval_note}", err=True)
        stats = res.stats
        line = (
            f"[{stats['new_tokens']} tokens, {stats['tokens_per_s']:.1f} tok/s, "
            f"finish: {res.finish_reason}"
        )
        if speculative:
            line += f", mean accepted draft {stats['mean_accepted']:.2f}"
        typer.echo(line + "]", err=True)
