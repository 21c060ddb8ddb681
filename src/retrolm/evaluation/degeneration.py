"""Degeneration evaluation (docs/reference.md §2): Repetition %, distinct-1/2 and mean length.

Prompts are the first `prompt_tokens` tokens (default: one chunk, m) of documents from
the held-out splits (test + valid) of the database (never in the retrieval database), chosen with a seeded
shuffle. Every checkpoint continues the SAME prompts with nucleus sampling (p = 0.9,
200 new tokens by default, same seeds); RETRO retrieves every m tokens with the model's
k (2 by default). Prompts of equal length decode as one batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrolm.errors import RetrolmError
from retrolm.evaluation.metrics import distinct_n, mean_length, repetition_rate

if TYPE_CHECKING:
    from retrolm.db.database import RetrievalDB


def held_out_prompts(
    db: RetrievalDB, n_prompts: int, prompt_tokens: int, seed: int = 0, split: str | None = None
) -> list[list[int]]:
    """Token ids of `n_prompts` prompts of `prompt_tokens` tokens from held-out documents.

    Held-out = the test and valid splits pooled (or only `split`). Every document starts
    contribute first (seeded order); if more prompts are needed, later windows of the same
    documents follow (offsets 2p, 4p, ... so prompts never overlap each other's text).
    """
    splits = [split] if split else ["test", "valid"]
    pool: list[tuple[int, str, int]] = []  # (window rank j, split, stream start)
    p = prompt_tokens
    for name in splits:
        if name not in db.streams:
            raise RetrolmError(f"the database has no {name!r} split")
        for start, length in db.streams[name].docs:
            for j, offset in enumerate(range(0, int(length) - p - 1, 2 * p)):
                pool.append((j, name, int(start) + offset))
    if n_prompts > len(pool):
        raise RetrolmError(
            f"--prompts {n_prompts}: the held-out split(s) {'/'.join(splits)} hold only {len(pool)} "
            f"prompts of {p} tokens; ask for fewer prompts"
        )
    perm = np.random.default_rng(seed).permutation(len(pool))
    order = sorted(range(len(pool)), key=lambda i: (pool[i][0], perm[i]))
    out = []
    for i in order[:n_prompts]:
        _, name, start = pool[i]
        out.append([int(t) for t in db.streams[name].read(start, start + p)])
    return out


def evaluate_degeneration(
    db: str | Path | RetrievalDB,
    checkpoint_dirs: list[Path],
    n_prompts: int,
    max_new_tokens: int = 200,
    top_p: float = 0.9,
    seed: int = 0,
    prompt_tokens: int | None = None,
    k: int | None = None,
    split: str | None = None,
    return_generations: bool = False,
) -> dict[str, Any]:
    """Generate from held-out prompts with each checkpoint; return metrics per checkpoint.

    `db`: an opened `RetrievalDB` or its path. Returns {"settings": {...}, "checkpoints":
    [{"checkpoint", "kind" ("retro"|"gpt"), "repetition_pct", "distinct_1", "distinct_2",
    "mean_length", "eos_share", "tokens_per_s", "examples"} (+ "generations": new token
    ids per prompt with `return_generations`)]}.
    """
    from retrolm.checkpoints import check_fits, load_checkpoint
    from retrolm.db.database import RetrievalDB
    from retrolm.generation.decode import generate

    if n_prompts < 1:
        raise RetrolmError(f"--prompts {n_prompts} must be >= 1")
    if not checkpoint_dirs:
        raise RetrolmError("give at least one --checkpoint")
    if not isinstance(db, RetrievalDB):
        db = RetrievalDB.open(db, verify=False)
    prompt_tokens = int(prompt_tokens or db.chunk_size)
    prompts = held_out_prompts(db, n_prompts, prompt_tokens, seed, split)
    texts = [db.tokenizer.decode(p) for p in prompts]
    rows = []
    for ckpt in checkpoint_dirs:
        check_fits(ckpt, db)
        model = load_checkpoint(ckpt).eval()
        t0 = time.perf_counter()
        results = generate(
            model, db.tokenizer, texts, db=db, prompt_ids=prompts, max_new_tokens=max_new_tokens,
            top_p=top_p, seed=seed, k=k,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        gens = [r.token_ids for r in results]
        row = {
            "checkpoint": str(ckpt),
            "kind": "retro" if model.config.cca_layers else "gpt",
            "repetition_pct": repetition_rate(gens),
            "distinct_1": distinct_n(gens, 1),
            "distinct_2": distinct_n(gens, 2),
            "mean_length": mean_length(gens),
            "eos_share": sum(r.finish_reason == "eos" for r in results) / len(results),
            "tokens_per_s": sum(len(g) for g in gens) / seconds if seconds > 0 else 0.0,
            "examples": [{"prompt": r.prompt, "text": r.text} for r in results[:3]],
        }
        if return_generations:
            row["generations"] = gens
        rows.append(row)
    return {
        "settings": {
            "database": str(db.path), "n_prompts": n_prompts, "prompt_tokens": prompt_tokens,
            "max_new_tokens": max_new_tokens, "top_p": top_p, "seed": seed,
            "k": k, "chunk_size": db.chunk_size,
        },
        "checkpoints": rows,
    }
