"""Every setting of the demo in one place: `FULL`, `TINY`, and how a caller's changes apply."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# -- settings: everything the demo decides, in one place ---------------------------------------


@dataclass(frozen=True)
class SampleSettings:
    """How the report's sample continuations are decoded (nucleus sampling, fixed seed)."""

    prompt_tokens: int  # opening tokens of a held-out document
    new_tokens: int
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.2  # CTRL-style; with top_p this keeps small models from looping
    seed: int = 0


@dataclass(frozen=True)
class DemoSettings:
    """One demo configuration: corpus, retriever, database, model, training, budget, report."""

    corpus: str
    retriever: str  # "dense" (MiniLM + FAISS) or "bm25"
    db: dict[str, Any]  # RetrievalDB.build keyword arguments (besides corpus and retriever)
    model: str  # RetroConfig preset
    overrides: dict[str, Any]  # RetroConfig field overrides
    train: dict[str, Any]  # TrainConfig fields (the seed is set per run)
    tokens: int  # training tokens per run: GPT and RETRO alike, every seed
    sample: SampleSettings
    eval_splits: tuple[str, ...] = ("test", "valid")  # the first is the headline
    corpus_docs: int | None = None  # use every k-th document, at most this many (--tiny)
    eval_reserve_minutes: float = 1.0  # --minutes only: time kept for evaluation


# The full demo: a cpu-small RETRO with the neighbour copy head on builtin:pkgdocs (the
# installed packages' docstrings: ~6.6M train tokens, all in the database), BM25 neighbours
# (seconds to build; dense MiniLM would take ~14 min for 115k chunks here), 300 steps of
# 4 x 256 tokens per run: each model sees ~5% of the train split, so the database holds
# text the models never trained on. A quarter of RETRO's training sequences get another
# sequence's neighbours, so it learns to ignore neighbours that do not match (docs/results.md
# has the copy-head settings measured one by one). fp32: on CPUs without AVX-512 BF16 (this project's
# AMD EPYC), bf16 autocast is 10-30x slower than fp32 (docs/results.md).
FULL = DemoSettings(
    corpus="builtin:pkgdocs",
    retriever="bm25",
    db={"chunk_size": 64, "vocab_size": 8192, "neighbors": 8, "split": (300, 1, 1), "seed": 0,
        "embed_dtype": "fp32"},
    model="cpu-small",
    overrides={"enc_layers": 1, "n_neighbors": 1, "copy_head": True, "copy_match": 4},
    train={"seq_len": 256, "batch_size": 4, "lr": 1e-3, "warmup_steps": 20, "min_lr_ratio": 0.1,
           "bf16": False, "k": 1, "checkpoint_every": 50, "wrong_neighbour_share": 0.25},
    tokens=300 * 4 * 256,
    sample=SampleSettings(prompt_tokens=96, new_tokens=128),
)  # fmt: skip
# Train/valid/test ratios of the full demo for a corpus other than FULL's own (documents
# are split by a hash of their id). FULL's 300/1/1 holds out ~23k tokens per split of
# pkgdocs (enough to read a 3% effect, quick to score); smaller corpora keep 2% each
# (pydocs: ~9k tokens).
OTHER_CORPUS_SPLIT = (96, 2, 2)
# --tiny: a test-sized run: tiny model, 80-document corpus slice, 12 steps per run.
TINY = DemoSettings(
    corpus="builtin:pydocs",
    retriever="dense",
    db={"chunk_size": 32, "vocab_size": 512, "neighbors": 4, "split": (80, 10, 10), "seed": 0,
        "embed_dtype": "fp32"},
    model="tiny",
    overrides={"max_seq_len": 128, "copy_head": True},
    train={"seq_len": 128, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "min_lr_ratio": 0.1,
           "bf16": False, "k": 2, "checkpoint_every": 10},
    tokens=128 * 4 * 12,
    sample=SampleSettings(prompt_tokens=48, new_tokens=48),
    corpus_docs=80,
)  # fmt: skip

# --minutes only: RETRO / GPT training time for the full settings, measured on an idle
# 2-core machine: 264.3 s / 223.1 s = 1.18 (copy head, k = 1, fp32; docs/results.md).
RETRO_TIME_RATIO = 1.2
# A perplexity ratio within this of 1 is read as "no difference": two training runs of
# the same model differ by a few percent, so a 1-3% gap is not a result.
MIN_EFFECT = 0.03
MODELS = ("GPT", "RAG_GPT", "RETRO", "RETRO-off", "RETRO-shuffled")
RATIOS = (("RETRO", "GPT"), ("RETRO", "RETRO-off"), ("RETRO-shuffled", "RETRO"))
HIGH_OVERLAP = 0.5  # a held-out chunk shares more than half a chunk verbatim with a neighbour


def resolve_settings(tiny: bool, corpus: str | None = None, retriever: str | None = None,
                     tokens: int | None = None, train_overrides: dict[str, Any] | None = None,
                     model_overrides: dict[str, Any] | None = None) -> DemoSettings:  # fmt: skip
    """`FULL` or `TINY` with the caller's changes."""
    base = TINY if tiny else FULL
    chosen = corpus or base.corpus
    db = dict(base.db)
    if not tiny and chosen != base.corpus:
        db["split"] = OTHER_CORPUS_SPLIT
    return replace(
        base,
        corpus=chosen,
        db=db,
        retriever=retriever or base.retriever,
        tokens=int(tokens) if tokens is not None else base.tokens,
        train={**base.train, **(train_overrides or {})},
        overrides={**base.overrides, **(model_overrides or {})},
    )
