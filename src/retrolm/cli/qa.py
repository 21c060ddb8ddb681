"""`retrolm qa`: answer questions in one of five modes and score EM/F1; `retrolm qa finetune`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from retrolm.cli.device import device_option, resolve_device
from retrolm.errors import RetrolmError

if TYPE_CHECKING:
    from retrolm.db.database import RetrievalDB
    from retrolm.model.retro import Retro
    from retrolm.tokenizer import Tokenizer


def register(app: typer.Typer) -> None:
    qa_app = typer.Typer(
        help="Question answering: closed-book, rag, retro, retro++, iter-retgen (EM / F1).",
        invoke_without_command=True,
    )
    qa_app.callback(invoke_without_command=True)(qa_command)
    qa_app.command("finetune")(finetune_command)
    app.add_typer(qa_app, name="qa")


def _load(checkpoint: Path, db: Path | None, device: str | None) -> tuple[Retro, Tokenizer, RetrievalDB]:
    from retrolm.checkpoints import check_fits, load_checkpoint
    from retrolm.db.database import RetrievalDB

    if db is None:
        raise RetrolmError("pass --db <database the model was trained on> (tokenizer and retrieval)")
    opened = RetrievalDB.open(db, verify=False)
    check_fits(checkpoint, opened)
    model = load_checkpoint(checkpoint, map_location=resolve_device(device)).eval()
    return model, opened.tokenizer, opened


def _k(model: Retro, k: int | None) -> int:
    """--k, else the k a RETRO model was trained with (checkpoint config), else 3 passages."""
    if k is not None:
        return k
    return int(model.config.n_neighbors) if model.config.cca_layers else 3


def _items(data: str, subset: str, kind: str | None, limit: int | None, seed: int) -> list[Any]:
    from retrolm.qa.pipeline import load_items, select_items

    return select_items(load_items(data), subset=subset, kind=kind, limit=limit, seed=seed)


def _warn_if_documents_missing(items: list[Any], database: Any, data: str) -> None:
    """One line on stderr when the documents the QA items cite (`doc_ids`) are not in the
    database: the questions are then answered from the wrong database, and scores mislead."""
    cited = {d for item in items for d in item.extra.get("doc_ids", ())}
    if not cited:
        return  # the data names no documents: nothing to check
    with open(Path(database.path) / "documents.jsonl", encoding="utf-8") as handle:
        present = {json.loads(line)["id"] for line in handle}
    missing = len(cited - present)
    if missing:
        typer.echo(
            f"warning: {missing} of the {len(cited)} documents that {data} cites are not in the database "
            f"{database.path}; was it built from this data's corpus?",
            err=True,
        )


def qa_command(
    ctx: typer.Context,
    # required, but not declared so: `retrolm qa finetune ...` passes through this callback
    db: Path | None = typer.Option(
        None, "--db", help="Retrieval database (tokenizer + passages).  [required]"
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Model dir (or run dir).  [required]"
    ),
    data: str | None = typer.Option(
        None, "--data", help="QA JSONL file, or builtin:facts.  [required]"
    ),
    mode: str = typer.Option(
        "rag", "--mode", help="closed-book | rag | retro | retro++ | iter-retgen"
    ),
    k: int | None = typer.Option(
        None, "--k", help="Passages per question (retrieved when the item has none); default: "
        "a RETRO model's training k, 3 for a GPT."
    ),
    reorder: bool = typer.Option(False, "--reorder", help="RAG: strongest passages first and last."),
    iter_reader: str | None = typer.Option(
        None, "--iter-reader", help="iter-retgen reader: rag | retro | retro++ (default by model)."
    ),
    subset: str = typer.Option("all", "--subset", help="all | finetune | eval (stable hash split)."),
    kind: str | None = typer.Option(None, "--kind", help="Only items of this kind (db_only, seen)."),
    limit: int | None = typer.Option(None, "--limit", help="At most N items (seeded, kind-balanced)."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Answer length limit."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts decoded together."),
    seed: int = typer.Option(0, "--seed", help="Seed for --limit sampling."),
    predictions: Path | None = typer.Option(None, "--predictions", help="Write per-item JSONL here."),
    device: str | None = device_option(),
    json_out: bool = typer.Option(False, "--json", help="Print the scores as JSON."),
) -> None:
    """Answer the questions of --data with --checkpoint in --mode; print EM and F1."""
    if ctx.invoked_subcommand is not None:
        return
    from retrolm.qa.pipeline import PassageSource, answer_items, score

    if checkpoint is None or data is None:
        raise RetrolmError("retrolm qa needs --db, --checkpoint and --data (see retrolm qa --help)")
    model, tokenizer, opened = _load(checkpoint, db, device)
    items = _items(data, subset, kind, limit, seed)
    _warn_if_documents_missing(items, opened, data)
    source = PassageSource(opened, tokenizer, _k(model, k), model.config.neighbor_len, tokenizer.pad_id)
    records = answer_items(
        model, tokenizer, items, mode, source, reorder=reorder, iter_reader=iter_reader,
        max_new_tokens=max_new_tokens, batch_size=batch_size,
    )  # fmt: skip
    result = {"mode": mode, "checkpoint": str(checkpoint), "data": data, **score(records)}
    if predictions is not None:
        from retrolm.atomic import atomic_path

        with atomic_path(predictions) as tmp, open(tmp, "w", encoding="utf-8") as handle:
            for rec in records:
                handle.write(json.dumps(rec) + "\n")
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{mode}: n={result['n']} EM={result['em']:.1f} F1={result['f1']:.1f}")
    for name, part in result.get("by_kind", {}).items():
        typer.echo(f"  {name}: n={part['n']} EM={part['em']:.1f} F1={part['f1']:.1f}")


def finetune_command(
    db: Path = typer.Option(..., "--db", help="Retrieval database (tokenizer + passages)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Model dir to start from."),
    data: str = typer.Option(..., "--data", help="QA JSONL file, or builtin:facts."),
    out: Path = typer.Option(..., "--out", help="Directory for the fine-tuned model."),
    mode: str = typer.Option("rag", "--mode", help="The mode whose inputs to train on."),
    k: int | None = typer.Option(
        None, "--k", help="Passages per question; default: a RETRO model's training k, 3 for a GPT."
    ),
    reorder: bool = typer.Option(False, "--reorder", help="RAG: strongest passages first and last."),
    subset: str = typer.Option(
        "finetune", "--subset", help="all | finetune | eval (default: the finetune half)."
    ),
    kind: str | None = typer.Option(None, "--kind", help="Only items of this kind."),
    limit: int | None = typer.Option(None, "--limit", help="At most N items."),
    steps: int = typer.Option(200, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(8, "--batch-size", help="Questions per step."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak LR (warm-up, cosine to 0.1x)."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling and order."),
    device: str | None = device_option(),
) -> None:
    """Fine-tune on QA pairs with the loss on answer tokens only; save to --out."""
    import torch

    from retrolm.atomic import write_json
    from retrolm.checkpoints import save_model
    from retrolm.qa.pipeline import PassageSource, finetune

    torch.manual_seed(seed)
    model, tokenizer, opened = _load(checkpoint, db, device)
    items = _items(data, subset, kind, limit, seed)
    _warn_if_documents_missing(items, opened, data)
    source = PassageSource(opened, tokenizer, _k(model, k), model.config.neighbor_len, tokenizer.pad_id)
    losses = finetune(
        model, tokenizer, items, mode, source, steps=steps, batch_size=batch_size, lr=lr,
        reorder=reorder, seed=seed,
    )  # fmt: skip
    save_model(model, out)
    write_json(out / "qa_finetune.json", {
        "checkpoint": str(checkpoint), "data": data, "mode": mode, "items": len(items),
        "steps": steps, "lr": lr, "batch_size": batch_size, "loss_first": losses[0],
        "loss_last": losses[-1],
    })  # fmt: skip
    typer.echo(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; saved {out}")
