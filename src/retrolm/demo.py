"""`retrolm demo`: the product's main job, end to end, honestly.

Build the retrieval database, train a GPT and a RETRO with the same decoder on the same
token sequences (for `seeds` seeds), evaluate them on held-out documents (never in the
database) as GPT, RAG_GPT, RETRO, RETRO-off and RETRO-shuffled, and write
`<out>/report.md`: a verdict computed from the numbers, one headline table, the overlap
plot, loss curves, one sampled continuation per model (RETRO's with the neighbours it
read), the checked leakage controls, the settings and the wall time of every stage.

Budget: by default a fixed number of training tokens per run (`DemoSettings.tokens`), so
a busy machine takes longer but prints the same numbers. `minutes` (the old behaviour)
plans the seed-0 GPT's training time from what is left of the budget after the database;
every other run then trains on that GPT's token count. The decided budget goes to
`<out>/plan.json` before training, so a re-run (or a run resumed after a kill) keeps it:
a complete database, finished checkpoints and a cached evaluation are reused.

Every setting of the demo lives in `FULL` / `TINY` below.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrolm.atomic import atomic_path, sha256_file, write_json
from retrolm.errors import RetrolmError

if TYPE_CHECKING:
    from retrolm.db.database import RetrievalDB
    from retrolm.generation.retrieval import ChunkRetrieval
    from retrolm.model.config import RetroConfig

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
# 2-core machine: 322.2 s / 230.7 s = 1.40 (copy head, k = 1, fp32; docs/results.md).
RETRO_TIME_RATIO = 1.4
# A perplexity ratio within this of 1 is read as "no difference": two training runs of
# the same model differ by a few percent, so a 1-3% gap is not a result.
MIN_EFFECT = 0.03
MODELS = ("GPT", "RAG_GPT", "RETRO", "RETRO-off", "RETRO-shuffled")
RATIOS = (("RETRO", "GPT"), ("RETRO", "RETRO-off"), ("RETRO-shuffled", "RETRO"))
HIGH_OVERLAP = 0.5  # a held-out chunk shares more than half a chunk verbatim with a neighbour


def log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def write_slice(corpus: str, path: Path, n_docs: int) -> str:
    """Write every k-th document of `corpus` (at most n_docs) as JSON lines; return its path."""
    from retrolm.corpora.reader import read_corpus

    if path.is_file():
        return str(path)
    docs, _ = read_corpus(corpus)
    if not docs:
        raise RetrolmError(f"corpus {corpus!r} has no documents")
    step = max(1, len(docs) // n_docs)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for d in docs[::step][:n_docs]:
            handle.write(json.dumps({"id": d.doc_id, "title": d.title, "text": d.text}) + "\n")
    return str(path)


# -- stages ----------------------------------------------------------------------------------


def run_dirs(out: Path, seed: int) -> dict[str, Path]:
    """The GPT and RETRO run directories of one seed (seed 0 keeps the plain names)."""
    suffix = "" if seed == 0 else f"-seed{seed}"
    return {"GPT": out / f"gpt{suffix}", "RETRO": out / f"retro{suffix}"}


def _finished(run_dir: Path) -> dict[str, Any] | None:
    from retrolm.checkpoints import FINAL, trainer_state

    data = trainer_state(run_dir / FINAL)
    return data if data is not None and data.get("finished") else None


def _train(db: RetrievalDB, config: RetroConfig, run_dir: Path, settings: dict[str, Any], retrieval: bool,
           budget: dict[str, Any], progress: bool) -> tuple[dict[str, Any], bool]:  # fmt: skip
    """Train (or resume, or reuse) one run; return its final trainer_state and whether it ran."""
    from retrolm.training.trainer import TrainConfig, train

    name = f"{'RETRO' if retrieval else 'GPT'} checkpoint (seed {settings['seed']})"
    done = _finished(run_dir)
    if done is not None:
        log(f"reusing the finished {name} {run_dir / 'final'} (step {done['step']})")
        return done, False
    cfg = TrainConfig(retrieval=retrieval, resume=True, progress=progress, **settings, **budget)
    log(f"training the {name} into {run_dir} ({', '.join(f'{k} {v}' for k, v in budget.items())})")
    train(db, config, run_dir, cfg)  # the opened database: not verified again per run
    state = _finished(run_dir)
    if state is None:
        raise RetrolmError(f"training in {run_dir} did not finish; re-run the demo to resume it")
    return state, True


def _run_stats(run_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    from retrolm.training.monitor import read_metrics

    records = read_metrics(run_dir)
    rates = [r["tokens_per_s"] for r in records[1:]] or [r["tokens_per_s"] for r in records]
    elapsed = float(state.get("elapsed_s", 0.0))
    return {
        "steps": int(state.get("step", 0)),
        "tokens": int(state.get("tokens_seen", 0)),
        "seconds": round(elapsed, 1),
        "tokens_per_s": round(state.get("tokens_seen", 0) / elapsed, 1) if elapsed else None,
        "median_step_tokens_per_s": round(float(np.median(rates)), 1) if rates else None,
        "final_loss": records[-1]["loss"] if records else None,
    }


def leakage_controls(db: RetrievalDB) -> dict[str, Any]:
    """Check (not just state) the leakage controls on the built database."""
    held_out = {s: set(int(i) for i in db.streams[s].doc_index) for s in db.splits if s != "train"}
    train_docs = set(int(i) for i in db.streams["train"].doc_index)
    overlap_docs = sum(len(train_docs & v) for v in held_out.values())
    # every stored train-window neighbour must come from a document the window does not touch
    stream, m = db.streams["train"], db.chunk_size
    n_win = stream.num_windows
    first = stream.doc_of(np.arange(n_win) * m)  # (W,)
    last = stream.doc_of(np.minimum((np.arange(n_win) + 1) * m, len(stream)) - 1)  # (W,)
    ids = np.asarray(db.neighbors["train"], dtype=np.int64)  # (W, K)
    docs = db.chunks.chunk_docs(np.maximum(ids, 0))  # (W, K)
    same = (ids >= 0) & (docs >= first[:, None]) & (docs <= last[:, None])
    dedup = db.manifest["dedup"]
    return {
        "held_out_docs": {s: len(v) for s, v in held_out.items()},
        "held_out_docs_in_database": overlap_docs,
        "exact_duplicates_removed": int(dedup["exact_dups"]),
        "near_dedup": bool(db.manifest["settings"].get("near_dedup")),
        "near_duplicates_removed": int(dedup["near_dups"]),
        "train_windows": int(n_win),
        "same_document_neighbours_stored": int(same.sum()),
        "sample_document_exclusion": True,
    }


def training_signal(db: RetrievalDB, seq_len: int, k: int, max_sequences: int = 300) -> dict[str, Any]:
    """How often training rewards reading the neighbours: overlap of train chunks with theirs.

    The same measure as the held-out overlap buckets (longest common token run with the
    neighbours of the previous chunk, over m), on the first `max_sequences` training
    sequences. RETRO learns to copy only if enough training chunks can be copied.
    """
    from retrolm.evaluation.perplexity import prepare

    data = prepare(db, "train", seq_len, k, max_sequences)
    overlap = data.overlap[data.chunk_tokens > 0]
    return {
        "chunks": int(overlap.size),
        "share_over_half": round(float((overlap > 0.5).mean()), 4) if overlap.size else 0.0,
        "share_at_most_eighth": round(float((overlap <= 0.125).mean()), 4) if overlap.size else 0.0,
    }


# -- samples ----------------------------------------------------------------------------------


def _retro_chunks(
    db: RetrievalDB, prompt: list[int], new: list[int], retrieval: list[ChunkRetrieval]
) -> list[dict[str, Any]]:
    """RETRO's text chunk by chunk, each with the neighbours it read while writing it.

    Chunk u (tokens u*m .. u*m+m-1 of prompt + continuation) is predicted with the
    neighbours retrieved with chunk u-1 (the CCA shift); chunks made of prompt only are
    left out.
    """
    from retrolm.generation.retrieval import describe_chunks

    m, tokens = db.chunk_size, prompt + new
    by_chunk = {rec.chunk_index: rec for rec in retrieval}
    out = []
    for u in range(1, -(-len(tokens) // m)):
        if (u + 1) * m <= len(prompt):
            continue
        piece = tokens[u * m : (u + 1) * m]
        rec = by_chunk.get(u - 1)
        read = describe_chunks(db, rec.chunk_ids, rec.scores) if rec is not None else []
        out.append({
            "chunk": u,
            "prompt_tokens": max(0, min(len(prompt) - u * m, len(piece))),
            "text": db.tokenizer.decode(piece),
            "read": [{"doc_id": nb["doc_id"], "score": round(nb["score"], 4),
                      "text": nb["text"] + nb["continuation"]} for nb in read],
        })  # fmt: skip
    return out


def sample_generations(db: RetrievalDB, runs: dict[str, Path], split: str, sample: SampleSettings,
                       k: int) -> dict[str, Any]:  # fmt: skip
    """One sampled continuation per model of the first long enough held-out document's opening."""
    from retrolm.checkpoints import load_checkpoint
    from retrolm.generation.decode import generate

    n_prompt, n_new = sample.prompt_tokens, sample.new_tokens
    stream = db.streams[split]
    long_enough = [i for i, (_, n) in enumerate(stream.docs) if n > n_prompt + n_new]
    start, length = (int(x) for x in stream.docs[long_enough[0] if long_enough else 0])
    prompt = [int(t) for t in stream.read(start, start + min(n_prompt, length - 1))]
    truth = [
        int(t)
        for t in stream.read(start + len(prompt), min(start + length, start + len(prompt) + n_new))
    ]
    out: dict[str, Any] = {"split": split, "prompt": db.tokenizer.decode(prompt),
                           "reference": db.tokenizer.decode(truth), "samples": {}}  # fmt: skip
    for name, run_dir in runs.items():
        model = load_checkpoint(run_dir).eval()
        res = generate(model, db.tokenizer, out["prompt"], db=db, max_new_tokens=n_new, greedy=False,
                       temperature=sample.temperature, top_p=sample.top_p,
                       repetition_penalty=sample.repetition_penalty, seed=sample.seed, k=k,
                       return_retrieval=False, prompt_ids=[prompt])[0]  # fmt: skip
        entry: dict[str, Any] = {"text": res.text, "finish_reason": res.finish_reason}
        if model.config.cca_layers:
            entry["chunks"] = _retro_chunks(db, prompt, list(res.token_ids), res.retrieval)
        out["samples"][name] = entry
    return out


# -- numbers -------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, min, max and (population) standard deviation of per-seed values."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max()),
            "std": float(arr.std()), "values": [float(v) for v in arr]}  # fmt: skip


def comparison(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per split: each model's ppl and bpb and each ratio, as spreads over the seeds.

    `per_seed[s][split]` is `evaluate`'s result for seed s. A model (RETRO-shuffled with
    an evaluation that does not produce it) missing in any seed is left out.
    """
    from retrolm.evaluation.perplexity import find_row

    table: dict[str, dict[str, Any]] = {}
    for split in per_seed[0]:
        results = [seed[split] for seed in per_seed]
        rows: dict[str, Any] = {}
        for name in MODELS:
            found = [find_row(res, name) for res in results]
            if all(found):
                rows[name] = {
                    "ppl": spread([r["ppl"] for r in found]),
                    "bpb": spread([r["bpb"] for r in found]),
                    "buckets": [
                        {"alpha": b["alpha"], "share": b["share"], "n_chunks": b["n_chunks"],
                         "bpb": float(np.mean([r["buckets"][i]["bpb"] for r in found]))}
                        for i, b in enumerate(found[0]["buckets"])
                    ],
                }  # fmt: skip
        ratios = {f"{a}/{b}": spread([rows[a]["ppl"]["values"][s] / rows[b]["ppl"]["values"][s]
                                      for s in range(len(results))])
                  for a, b in RATIOS if a in rows and b in rows}  # fmt: skip
        table[split] = {"tokens": results[0]["tokens"], "chunks": results[0]["chunks"],
                        "bytes": results[0]["bytes"], "rows": rows, "ratios": ratios}  # fmt: skip
    return table


def overlap_shares(split_table: dict[str, Any]) -> dict[str, float]:
    """Share of held-out chunks whose overlap with their neighbours is > 1/2 and > 1/8."""
    buckets = next(iter(split_table["rows"].values()))["buckets"]
    by_alpha = {round(b["alpha"], 4): b["share"] for b in buckets}
    return {"over_half": 1.0 - by_alpha[HIGH_OVERLAP], "over_eighth": 1.0 - by_alpha[0.125]}


def judge(stat: dict[str, Any] | None) -> str | None:
    """Read a per-seed ratio: "below" / "above" 1 in every seed by more than MIN_EFFECT,
    "same" (every seed within MIN_EFFECT of 1), or "unclear" (the seeds disagree)."""
    if stat is None:
        return None
    if stat["max"] <= 1 - MIN_EFFECT:
        return "below"
    if stat["min"] >= 1 + MIN_EFFECT:
        return "above"
    if stat["min"] > 1 - MIN_EFFECT and stat["max"] < 1 + MIN_EFFECT:
        return "same"
    return "unclear"


def verdict(s: dict[str, Any]) -> str:
    """The plain-language verdict, computed from the headline split's ratios."""
    split, n = s["headline_split"], s["seeds"]
    ratios = s["comparison"][split]["ratios"]
    gpt, off, shuf = (
        ratios["RETRO/GPT"],
        ratios.get("RETRO/RETRO-off"),
        ratios.get("RETRO-shuffled/RETRO"),
    )
    j_gpt, j_off, j_shuf = judge(gpt), judge(off), judge(shuf)
    noise = f"{100 * MIN_EFFECT:.0f}%"

    def rng(stat: dict[str, Any]) -> str:
        return f" (seeds: {stat['min']:.3f}-{stat['max']:.3f})" if n > 1 else ""

    def pct(stat: dict[str, Any], inverse: bool = False) -> str:
        ratio = 1 / stat["mean"] if inverse else stat["mean"]
        return f"{100 * abs(1 - ratio):.1f}%"

    head = f"On `{split}` the RETRO/GPT perplexity ratio is {gpt['mean']:.3f}{rng(gpt)}: "
    head += {
        "below": f"RETRO is {pct(gpt)} better than a GPT trained on the same tokens",
        "above": f"RETRO is {pct(gpt)} worse than a GPT trained on the same tokens",
        "same": f"within {noise} of the GPT, which is no difference (two training runs differ by that much)",
        "unclear": f"{pct(gpt)} {'better' if gpt['mean'] < 1 else 'worse'} on average, but the seeds disagree, "
        "so it is no clear difference",
    }[j_gpt]
    paid = j_gpt == "below" and j_off == "below"
    lines = [
        "**Verdict: retrieval paid off on this corpus.**" if paid else
        "**Verdict: retrieval did not pay off on this corpus.**",
        head + ".",
    ]  # fmt: skip
    if off is not None:
        lines.append({
            "below": f"RETRO beats RETRO-off by {pct(off)}{rng(off)}: the trained model uses its neighbours.",
            "above": f"RETRO is {pct(off)} worse than RETRO-off{rng(off)}: its neighbours hurt it.",
            "same": f"RETRO is within {pct(off)} of RETRO-off{rng(off)}: the model did not learn to use its "
                    "neighbours, so any difference to the GPT comes from training, not retrieval.",
            "unclear": f"RETRO is {pct(off)} {'below' if off['mean'] < 1 else 'above'} RETRO-off on average but "
                       f"the seeds disagree{rng(off)}: no clear use of the neighbours.",
        }[j_off])  # fmt: skip
    if shuf is None:
        lines.append("RETRO-shuffled was not evaluated, so whether a gain comes from the neighbours' content "
                     "is not checked.")  # fmt: skip
    elif j_shuf == "above" and j_off == "below":
        lines.append(f"RETRO beats RETRO-shuffled by {pct(shuf, inverse=True)}{rng(shuf)}: the gain comes from "
                     "the neighbours' content, not from seeing some text.")  # fmt: skip
    elif j_shuf == "above":
        lines.append(f"RETRO-shuffled is {pct(shuf)} worse than RETRO{rng(shuf)}: wrong neighbours hurt it, so "
                     "it does read them, but the right ones do not make it better than without any.")  # fmt: skip
    elif j_off == "below":
        lines.append(
            f"But RETRO-shuffled is not clearly worse than RETRO ({pct(shuf)} apart{rng(shuf)}): the "
            "gain does not come from what the neighbours say (unrelated database text helps as much)."
        )
    else:
        lines.append(f"RETRO-shuffled (wrong neighbours) is {pct(shuf)} from RETRO{rng(shuf)}: what the "
                     "neighbours say makes no clear difference to it.")  # fmt: skip
    return " ".join(lines)


def corpus_case(s: dict[str, Any]) -> str:
    """Which case the corpus is: how much text related to the held-out chunks the database holds."""
    split = s["headline_split"]
    shares = overlap_shares(s["comparison"][split])
    high, some = shares["over_half"], shares["over_eighth"]
    numbers = (f"{100 * high:.0f}% of the `{split}` chunks share more than half a chunk verbatim with the "
               f"neighbours RETRO reads for them (high overlap) and {100 * some:.0f}% share more than 1/8 of "
               "a chunk")  # fmt: skip
    if high >= 0.1:
        case = ("the database holds closely related, partly verbatim text for many held-out chunks (other "
                "documents saying the same thing in other words or with other names, never the held-out "
                "document itself), so large RETRO gains are possible and most of any gain is copying; the "
                "bucket table shows how RETRO does where there is nothing to copy")  # fmt: skip
    elif some >= 0.2:
        case = (
            "the database holds related text (shared phrases) for a fair share of held-out chunks, "
            "but few long verbatim matches, so only moderate RETRO gains are expected"
        )
    else:
        case = ("the database holds little text related to the held-out chunks (the nearly leak-free case), "
                "so only small RETRO gains are expected")  # fmt: skip
    return f"**How much related text the database holds:** {numbers}: {case}."


# -- plots ---------------------------------------------------------------------------------------


def _ema(values: list[float]) -> np.ndarray:
    """Bias-corrected exponential moving average, span ~ 1/25 of the points."""
    window = max(1, len(values) // 25)
    beta = 1 - 2 / (window + 1)
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i) if beta > 0 else v)
    return np.asarray(out)


STYLE = {"GPT": ("tab:blue", "-", "o"), "RAG_GPT": ("tab:cyan", ":", "v"), "RETRO": ("tab:red", "--", "s"),
         "RETRO-off": ("tab:orange", "-.", "^"), "RETRO-shuffled": ("tab:purple", (0, (1, 1)), "D")}  # fmt: skip


def plot_curves(seed_runs: list[dict[str, Path]], points: dict[str, tuple[float, float]], split: str,
                path: Path) -> Path | None:  # fmt: skip
    """PNG: smoothed training loss of GPT and RETRO against tokens, held-out loss at the end.

    `seed_runs[s]` maps GPT / RETRO to seed s's run directory (seed 0 drawn bold);
    `points[name]` = (tokens, held-out loss in nats/token) of seed 0's final checkpoint.
    """
    import matplotlib

    from retrolm.training.monitor import read_metrics

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for s, runs in enumerate(seed_runs):
        for name, run_dir in runs.items():
            records = read_metrics(run_dir)
            if not records:
                continue
            colour, style, marker = STYLE[name]
            x, y = [r["tokens"] for r in records], [r["loss"] for r in records]
            if s == 0:
                ax.plot(x, y, color=colour, alpha=0.2, linewidth=0.8)
                ax.plot(
                    x,
                    _ema(y),
                    color=colour,
                    linestyle=style,
                    linewidth=2,
                    label=f"{name} train loss (smoothed)",
                )
                if name in points:
                    ax.plot(
                        *points[name],
                        marker=marker,
                        color=colour,
                        markersize=9,
                        linestyle="none",
                        markeredgecolor="black",
                        label=f"{name} held-out {split} loss (final)",
                    )
            else:
                ax.plot(x, _ema(y), color=colour, linestyle=style, linewidth=1, alpha=0.5,
                        label=f"{name} other seeds" if s == 1 else None)  # fmt: skip
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    return _finish_plot(fig, ax, "training tokens", "loss (nats/token)",
                        "GPT vs RETRO: same decoder start, same sequences, same tokens", path)  # fmt: skip


def _finish_plot(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Label, grid and legend the axes, then write the figure atomically as a PNG."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def _alpha_label(alpha: float) -> str:
    return {0.0: "0", 0.125: "1/8", 0.25: "1/4", 0.5: "1/2", 1.0: "1"}.get(
        round(alpha, 4), f"{alpha:g}"
    )


def plot_buckets(split_table: dict[str, Any], split: str, path: Path) -> Path | None:
    """PNG: bits per byte over the held-out chunks with overlap r <= alpha, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = split_table["rows"]
    if not rows:
        return None
    buckets = next(iter(rows.values()))["buckets"]
    x = np.arange(len(buckets))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, row in rows.items():
        colour, style, marker = STYLE[name]
        ax.plot(x, [b["bpb"] for b in row["buckets"]], color=colour, linestyle=style, marker=marker,
                linewidth=1.5, label=name)  # fmt: skip
    ax.set_xticks(x, [f"r <= {_alpha_label(b['alpha'])}\n{b['n_chunks']} chunks ({100 * b['share']:.0f}%)"
                      for b in buckets])  # fmt: skip
    return _finish_plot(fig, ax, "held-out chunks whose overlap r with their neighbours is at most ...",
                        "bits per byte (lower is better)",
                        f"Held-out {split} chunks: bits per byte by overlap bucket", path)  # fmt: skip


# -- the run ----------------------------------------------------------------------------------


def _plan(out: Path, key: dict[str, Any], make: Any) -> dict[str, Any]:
    """The stored plan when its key matches; a new one otherwise (refused over other runs)."""
    path = out / "plan.json"
    if path.is_file():
        plan = json.loads(path.read_text())
        if plan.get("key") == key:
            return plan
        if any(p.is_dir() for p in out.glob("gpt*")) or any(p.is_dir() for p in out.glob("retro*")):
            raise RetrolmError(
                f"{out} holds a demo run made with other settings ({path}); use the same settings or a new --out"
            )
    plan = {"key": key, **make()}
    write_json(path, plan)
    return plan


def _code_version() -> str:
    """sha256 over the evaluation, generation and model code: a change there invalidates the eval cache."""
    import retrolm

    root = Path(retrolm.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(
        p for folder in ("evaluation", "generation", "model") for p in (root / folder).glob("*.py")
    ):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


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


def run_demo(
    corpus: str | None = None,
    out: str | Path = "runs/demo",
    minutes: float | None = None,
    tiny: bool = False,
    retriever: str | None = None,
    progress: bool = True,
    train_overrides: dict[str, Any] | None = None,
    model_overrides: dict[str, Any] | None = None,
    tokens: int | None = None,
    seeds: int = 1,
) -> dict[str, Any]:
    """Run the whole demo into `out`; return the results (also in `<out>/results.json`).

    Default budget: `DemoSettings.tokens` training tokens per run (`tokens` changes it),
    so the numbers do not depend on the machine's load. `minutes` plans the time instead.
    `seeds` repeats the GPT/RETRO pair with seeds 0..seeds-1 on the same database.
    `train_overrides` / `model_overrides` change TrainConfig / model config fields (for
    experiments; they are part of the stored plan).
    """
    from retrolm.checkpoints import FINAL, WEIGHTS
    from retrolm.db.database import RetrievalDB
    from retrolm.evaluation.perplexity import evaluate
    from retrolm.model.config import RetroConfig

    t0 = time.time()
    if minutes is not None and tokens is not None:
        raise RetrolmError("give --tokens or --minutes, not both")
    if minutes is not None and minutes <= 0:
        raise RetrolmError(f"--minutes must be > 0, got {minutes}")
    if tokens is not None and tokens <= 0:
        raise RetrolmError(f"--tokens must be > 0, got {tokens}")
    if seeds < 1:
        raise RetrolmError(f"--seeds must be >= 1, got {seeds}")
    st = resolve_settings(tiny, corpus, retriever, tokens, train_overrides, model_overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    timings = {k: v for k, v in timings.items() if k in ("database_s", "train_s", "eval_s", "samples_s",
                                                         "first_run_s")}  # fmt: skip
    timings.setdefault("train_s", {})
    timings.setdefault("eval_s", {})
    now: dict[str, bool] = {}  # stage -> ran in this invocation

    # 1. database
    spec = (
        write_slice(st.corpus, out / "corpus-slice.jsonl", st.corpus_docs)
        if st.corpus_docs
        else st.corpus
    )
    db_dir = out / "db"
    manifest = db_dir / "manifest.json"
    before = manifest.stat().st_mtime_ns if manifest.is_file() else None
    t = time.time()
    log(f"database {db_dir} ({st.retriever} retriever, corpus {spec})")
    db = RetrievalDB.build(spec, db_dir, progress=progress, retriever=st.retriever, overwrite=True,
                           **{**st.db, "split": tuple(st.db["split"])})  # fmt: skip
    db_reused = before is not None and manifest.stat().st_mtime_ns == before
    log(
        "reusing the complete database"
        if db_reused
        else f"database built in {time.time() - t:.0f} s"
    )
    if not db_reused:
        timings["database_s"] = round(time.time() - t, 1)
    now["database"] = not db_reused

    # 2. plan (stored: a re-run keeps it)
    config = RetroConfig.from_name(
        st.model, vocab_size=db.vocab_size, chunk_size=db.chunk_size, **st.overrides
    )
    budget_key = {"minutes": minutes} if minutes is not None else {"tokens": st.tokens}
    key = {"corpus": st.corpus, "corpus_docs": st.corpus_docs, "retriever": st.retriever,
           "db": {**st.db, "split": list(st.db["split"])}, "model": config.to_dict(), "train": st.train,
           "budget": budget_key}  # fmt: skip

    def make() -> dict[str, Any]:
        if minutes is None:
            return {"gpt_budget": {"tokens": st.tokens}}
        left = minutes - (time.time() - t0) / 60 - st.eval_reserve_minutes
        gpt_minutes = max(0.5, left / seeds / (1 + RETRO_TIME_RATIO))
        if gpt_minutes == 0.5:
            log(
                f"only {max(left, 0):.1f} min left after the database: training each GPT for 0.5 min anyway"
            )
        return {"gpt_budget": {"minutes": round(gpt_minutes, 3)}}

    plan = _plan(out, key, make)

    # 3. training: per seed a GPT and a RETRO on the same tokens (the seed-0 GPT's count)
    seed_runs = [run_dirs(out, s) for s in range(seeds)]
    states: list[dict[str, dict[str, Any]]] = []
    budget = dict(plan["gpt_budget"])
    for s, runs in enumerate(seed_runs):
        settings = {**st.train, "seed": s}
        states.append({})
        for name in ("GPT", "RETRO"):
            t = time.time()
            state, ran = _train(
                db, config, runs[name], settings, name == "RETRO", budget, progress
            )
            states[s][name] = state
            label = f"{name} seed {s}"
            if ran:
                timings["train_s"][label] = round(time.time() - t, 1)
            now[f"train {label}"] = ran
            budget = {
                "tokens": int(states[0]["GPT"]["tokens_seen"])
            }  # everything after: the same tokens
        write_json(timings_path, timings)

    # 4. evaluation of every seed on the held-out splits (the first is the headline), cached
    # in <out>/eval_cache.json under the checkpoints' weights and the evaluation code
    cache_path = out / "eval_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if "entries" not in cache:
        cache = {"entries": {}}
    k = int(st.train["k"])
    common = {"k": k, "splits": list(st.eval_splits), "code": _code_version(),
              "db": db.manifest["files"]["tokenizer.json"]["sha256"]}  # fmt: skip
    per_seed: list[dict[str, Any]] = []
    for s, runs in enumerate(seed_runs):
        finals = [runs["GPT"] / FINAL, runs["RETRO"] / FINAL]
        entry_key = {**common, "weights": [sha256_file(f / WEIGHTS) for f in finals]}
        entry = cache["entries"].get(f"seed {s}")
        if entry is not None and entry.get("key") == entry_key:
            log(f"reusing the evaluation of the seed-{s} checkpoints (eval_cache.json)")
            now[f"eval seed {s}"] = False
        else:
            t = time.time()
            entry = {
                "key": entry_key,
                "eval": {sp: evaluate(db, finals, split=sp, k=k) for sp in st.eval_splits},
            }
            cache["entries"][f"seed {s}"] = entry
            write_json(cache_path, cache)
            timings["eval_s"][f"seed {s}"] = round(time.time() - t, 1)
            now[f"eval seed {s}"] = True
        per_seed.append(entry["eval"])

    # 5. one sampled continuation per model (seed 0), cached the same way
    headline = st.eval_splits[0]
    sample_key = {
        **common,
        "weights": cache["entries"]["seed 0"]["key"]["weights"],
        "sample": asdict(st.sample),
    }
    if cache.get("samples", {}).get("key") == sample_key:
        samples = cache["samples"]["samples"]
        now["samples"] = False
    else:
        t = time.time()
        samples = sample_generations(db, seed_runs[0], headline, st.sample, k)
        cache["samples"] = {"key": sample_key, "samples": samples}
        write_json(cache_path, cache)
        timings["samples_s"] = round(time.time() - t, 1)
        now["samples"] = True

    # 6. numbers, plots, leakage checks, report
    table = comparison(per_seed)
    curve_split = "valid" if "valid" in per_seed[0] else headline
    points = {}
    from retrolm.evaluation.perplexity import find_row

    for name in ("GPT", "RETRO"):
        row = find_row(per_seed[0][curve_split], name)
        if row:
            points[name] = (float(states[0][name]["tokens_seen"]), float(row["loss"]))
    curves = plot_curves(seed_runs, points, curve_split, out / "loss_curves.png")
    buckets_png = plot_buckets(table[headline], headline, out / "overlap_bpb.png")
    wall = time.time() - t0
    if not db_reused and "first_run_s" not in timings:
        timings["first_run_s"] = round(wall, 1)
    timings["last_invocation_s"] = round(wall, 1)
    write_json(timings_path, timings)
    summary = {
        "corpus": st.corpus,
        "tiny": tiny,
        "settings": {**asdict(st), "db": {**st.db, "split": list(st.db["split"])},
                     "eval_splits": list(st.eval_splits)},
        "db_reused": db_reused,
        "plan": plan,
        "seeds": seeds,
        "runs": {f"{name} seed {s}": _run_stats(seed_runs[s][name], states[s][name])
                 for s in range(seeds) for name in ("GPT", "RETRO")},
        "eval": per_seed[0],
        "eval_per_seed": per_seed,
        "headline_split": headline,
        "comparison": table,
        "leakage": leakage_controls(db),
        "training_signal": training_signal(db, int(st.train["seq_len"]), k),
        "samples": samples,
        "loss_curves": curves.name if curves else None,
        "overlap_plot": buckets_png.name if buckets_png else None,
        "timings": timings,
        "this_invocation": now,
    }  # fmt: skip
    summary["verdict"] = verdict(summary)
    write_json(out / "results.json", summary)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(render_report(summary), encoding="utf-8")
    log(f"report: {out / 'report.md'} ({wall:.0f} s this run)")
    return summary


# -- the report ---------------------------------------------------------------------------------


def _num(stat: dict[str, Any] | None, digits: int) -> str:
    """A per-seed spread as `mean` (one seed) or `mean (min-max)`."""
    if stat is None:
        return "n/a"
    if len(stat["values"]) == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ({stat['min']:.{digits}f}-{stat['max']:.{digits}f})"


RATIO_MEANING = {
    "RETRO/GPT": "below 1: RETRO predicts better than a GPT trained on the same tokens",
    "RETRO/RETRO-off": "below 1: the trained RETRO gets something out of its neighbours",
    "RETRO-shuffled/RETRO": "above 1: what the neighbours say matters, not just that some text is there",
}


def comparison_markdown(summary: dict[str, Any]) -> str:
    """The headline tables: ppl and bpb of every model per split, then the three ratios."""
    table, splits = summary["comparison"], list(summary["comparison"])
    n = summary["seeds"]
    note = f"mean over {n} seeds (min-max)" if n > 1 else "one seed"
    head = summary["headline_split"]
    names = [f"{sp} (headline)" if sp == head else sp for sp in splits]
    lines = [f"Held-out perplexity (ppl) and bits per byte (bpb), lower is better; {note}.", "",
             "| model | " + " | ".join(f"{nm} ppl | {nm} bpb" for nm in names) + " |",
             "|---|" + "---|---|" * len(splits)]  # fmt: skip
    for model in MODELS:
        cells = []
        for sp in splits:
            row = table[sp]["rows"].get(model)
            cells += [_num(row["ppl"], 2), _num(row["bpb"], 3)] if row else ["n/a", "n/a"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "| perplexity ratio | " + " | ".join(names) + " | reading |",
              "|---|" + "---|" * len(splits) + "---|"]  # fmt: skip
    for a, b in RATIOS:
        key = f"{a}/{b}"
        cells = [_num(table[sp]["ratios"].get(key), 3) for sp in splits]
        lines.append(f"| {a} / {b} | " + " | ".join(cells) + f" | {RATIO_MEANING[key]} |")
    return "\n".join(lines) + "\n"


def _fence(text: str) -> str:
    run, longest = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def code_block(text: str) -> list[str]:
    """A fenced text block that shows `text` verbatim (newlines kept, tabs as spaces)."""
    text = text.replace("\r", "").replace("\t", "    ")
    fence = _fence(text)
    return [fence + "text", *text.split("\n"), fence]


def quote_block(text: str) -> list[str]:
    """`text` verbatim inside a Markdown quote."""
    return [("> " + line).rstrip() for line in code_block(text)]


GLOSSARY = [
    ("GPT", "the decoder alone, trained on the database's training documents without retrieval."),
    ("RAG_GPT", "the same GPT checkpoint with the text of the top neighbour (its chunk and continuation, "
                "then an end-of-document token) pasted before its context; no extra training."),
    ("RETRO", "the same decoder plus a neighbour encoder and chunked cross-attention, trained on the same "
              "sequences with k neighbours per chunk, evaluated with its neighbours."),
    ("copy head", "an addition to RETRO (beyond the paper): at each position the model may point at a token "
                  "of a neighbour whose preceding tokens match its own and predict the token that follows "
                  "it there, mixed with the decoder's own prediction by a learned weight (docs/model.md)."),
    ("RETRO-off", "the RETRO checkpoint evaluated with retrieval switched off (cross-attention and copy head "
                  "skipped): what its decoder predicts without any neighbours."),
    ("RETRO-shuffled", "the RETRO checkpoint fed the neighbours of another held-out sequence: real database "
                       "text of the right shape that is unrelated to what it predicts."),
    ("ppl", "perplexity, exp of the mean negative log-likelihood per token (lower is better)."),
    ("bpb", "bits per UTF-8 byte of text: the same loss, independent of the tokenizer."),
    ("held-out splits", "`valid` and `test` are whole documents that never enter the database; `valid` was "
                        "used to choose settings, `test` is the headline."),
    ("overlap r", "for a held-out chunk of m tokens, the longest run of tokens it shares verbatim with the "
                  "neighbours RETRO reads while predicting it, divided by m (1 = the whole chunk is in a "
                  "neighbour)."),
    ("overlap bucket", "the held-out chunks whose overlap r is at most alpha; bpb over a low bucket measures "
                       "prediction where there was nothing to copy."),
    ("seed", "one seed fixes the decoder's starting weights and the order of the training sequences; GPT "
             "and RETRO of one seed share both."),
]  # fmt: skip


def _plain(value: Any) -> str:
    """A setting's value as a person writes it (on/off, not True/False)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _settings_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    st = s["settings"]
    db, tr, sm = st["db"], st["train"], st["sample"]
    retr = {"dense": "dense (MiniLM sentence embeddings, FAISS search)",
            "bm25": "BM25 (lexical): it indexes and queries 100k chunks in about a minute on a 2-core CPU, "
                    "where MiniLM embeddings would take about 14 minutes, and surface overlap is what RETRO "
                    "can copy (lexical neighbours were reported to lower RETRO's perplexity more than "
                    "dense ones)"}  # fmt: skip
    over = ", ".join(f"{k} = {_plain(v)}" for k, v in st["overrides"].items()) or "none"
    run = s["runs"]["GPT seed 0"]
    budget = s["plan"]["gpt_budget"]
    how = (f"fixed at {budget['tokens']:,} training tokens per run" if "tokens" in budget else
           f"time-planned: the seed-0 GPT trained for {budget['minutes']} minutes, every other run on its "
           "token count")  # fmt: skip
    split = db["split"]
    return [
        ("corpus", f"`{st['corpus']}`" + (f", every k-th document, {st['corpus_docs']} at most"
                                           if st["corpus_docs"] else "")),
        ("retriever", retr.get(st["retriever"], st["retriever"])),
        ("database", f"chunks of m = {db['chunk_size']} tokens, BPE vocabulary {db['vocab_size']}, "
                     f"{db['neighbors']} neighbours stored per chunk, documents split {split[0]}/{split[1]}/"
                     f"{split[2]} (train/valid/test) by a hash of their id"),
        ("model", f"preset `{st['model']}` for both runs (changed fields: {over}); the GPT is the same model "
                  "without the encoder and cross-attention"),
        ("training", f"{tr['seq_len']}-token sequences, batch {tr['batch_size']}, peak learning rate {tr['lr']:g} "
                     f"after {tr['warmup_steps']} warm-up steps, cosine decay to {tr['min_lr_ratio']:g} of it, "
                     f"bf16 autocast {'on' if tr['bf16'] else 'off'}, k = {tr['k']} neighbours per chunk"
                     + (f"; {tr['wrong_neighbour_share']:.0%} of RETRO's training sequences get another "
                        "sequence's neighbours" if tr.get("wrong_neighbour_share") else "")),
        ("budget", f"{how}: {run['tokens']:,} tokens = {run['steps']} steps, the same for GPT and RETRO, "
                   "same sequences in the same order"),
        ("seeds", f"{s['seeds']} (seeds 0 to {s['seeds'] - 1}), one database" if s["seeds"] > 1 else "1 (seed 0)"),
        ("samples", f"nucleus sampling p = {sm['top_p']}, temperature {sm['temperature']}, repetition penalty "
                    f"{sm['repetition_penalty']}, sampling seed {sm['seed']}; {sm['new_tokens']} new tokens "
                    f"after a {sm['prompt_tokens']}-token prompt"),
    ]  # fmt: skip


def _bucket_table(split_table: dict[str, Any]) -> list[str]:
    rows = split_table["rows"]
    names = list(rows)
    buckets = next(iter(rows.values()))["buckets"]
    lines = ["| overlap r at most | chunks (share) | " + " | ".join(f"{nm} bpb" for nm in names) + " |",
             "|---|---|" + "---|" * len(names)]  # fmt: skip
    for i, b in enumerate(buckets):
        cells = " | ".join("n/a" if math.isnan(rows[nm]["buckets"][i]["bpb"]) else
                           f"{rows[nm]['buckets'][i]['bpb']:.3f}" for nm in names)  # fmt: skip
        lines.append(
            f"| {_alpha_label(b['alpha'])} | {b['n_chunks']} ({100 * b['share']:.1f}%) | {cells} |"
        )
    return lines


def _wall_rows(s: dict[str, Any]) -> list[str]:
    t, now = s["timings"], s["this_invocation"]

    def fmt(sec: Any) -> str:
        return "n/a" if sec is None else f"{sec:,.1f} s"

    def state(key: str) -> str:
        return "ran" if now.get(key) else "reused"

    lines = ["| stage | wall time | tokens/s | this invocation |", "|---|---|---|---|",
             f"| database | {fmt(t.get('database_s'))} | | {state('database')} |"]  # fmt: skip
    for label, run in s["runs"].items():
        wall = t["train_s"].get(label, run["seconds"])
        rate = f"{run['tokens_per_s']:,.0f}" if run["tokens_per_s"] else "n/a"
        lines.append(f"| {label} training ({run['tokens']:,} tokens) | {fmt(wall)} | {rate} | "
                     f"{state('train ' + label)} |")  # fmt: skip
    for seed in range(s["seeds"]):
        splits = " and ".join(s["settings"]["eval_splits"])
        lines.append(f"| evaluation, seed {seed} ({splits}) | {fmt(t['eval_s'].get(f'seed {seed}'))} | | "
                     f"{state(f'eval seed {seed}')} |")  # fmt: skip
    lines.append(f"| samples | {fmt(t.get('samples_s'))} | | {state('samples')} |")
    lines.append(f"| this invocation, all stages | {fmt(t['last_invocation_s'])} | | |")
    if "first_run_s" in t:
        lines.append(f"| first complete run | {fmt(t['first_run_s'])} | | |")
    return lines


def render_report(s: dict[str, Any]) -> str:
    """`<out>/report.md` from the demo summary."""
    head = s["headline_split"]
    lk = s["leakage"]
    k = s["settings"]["train"]["k"]
    lines = [
        "# retrolm demo report",
        "",
        f"GPT vs RETRO on `{s['corpus']}`{' (--tiny)' if s['tiny'] else ''}: the same decoder trained on the "
        f"same token sequences, evaluated on held-out documents that are not in the retrieval database. "
        f"Differences under {100 * MIN_EFFECT:.0f}% perplexity are treated as noise"
        + (f"; {s['seeds']} seeds, numbers are the mean with the min-max range." if s["seeds"] > 1 else
           "; one seed (`--seeds N` repeats the pair to show the spread).") ,
        "",
        s["verdict"],
        "",
        corpus_case(s),
        "",
        "## Headline",
        "",
        comparison_markdown(s),
        "## What the terms mean",
        "",
        *[f"- **{term}**: {text}" for term, text in GLOSSARY],
        "",
    ]  # fmt: skip
    if s.get("overlap_plot"):
        lines += ["## Bits per byte by overlap", "",
                  f"![bits per byte by overlap bucket]({s['overlap_plot']})", "",
                  f"Held-out `{head}` chunks, cumulative buckets (each includes the ones to its left; the last is "
                  "all chunks). If retrieval is used, RETRO's line falls below RETRO-off and GPT where overlap "
                  "is high; on the low buckets nothing could be copied.", "",
                  *_bucket_table(s["comparison"][head]), ""]  # fmt: skip
    if s.get("loss_curves"):
        lines += ["## Loss curves", "", f"![training loss]({s['loss_curves']})", "",
                  "Training loss per step (faint) and its moving average (bold) against training tokens; the "
                  "large markers are each model's held-out loss at the end of training (training itself logs no "
                  "validation loss). Per-run metrics: `gpt/metrics.jsonl`, `retro/metrics.jsonl`.", ""]  # fmt: skip
    lines += _samples_section(s)
    lines += ["## Leakage controls (checked on the built database)", ""] + _leakage_lines(lk)
    sig = s.get("training_signal")
    if sig:
        lines += [
            f"How often training rewarded reading the neighbours: {100 * sig['share_over_half']:.1f}% of the first "
            f"{sig['chunks']} training chunks share more than half a chunk verbatim with their neighbours and "
            f"{100 * sig['share_at_most_eighth']:.0f}% share at most 1/8 (RETRO learns to copy only if enough "
            "training chunks can be copied).",
            "",
        ]
    lines += ["## Settings", "", "| setting | value |", "|---|---|",
              *[f"| {a} | {b} |" for a, b in _settings_rows(s)], "",
              "## Wall time and speed", "", *_wall_rows(s), "",
              f"RETRO reads k = {k} neighbours per chunk in training, evaluation and sampling. Wall times vary "
              "with the machine's load; " + ("the numbers above do not (fixed token budget, fixed seeds). "
              if "tokens" in s["plan"]["gpt_budget"] else "so do the numbers above, because this run's "
              "budget was planned in minutes (the token count is what the seed-0 GPT reached in that time). ")
              + "A re-run into the same directory reuses the database, the checkpoints and the evaluation.", "",
              "More: `docs/evaluation.md` in the retrolm repository explains each measurement; `results.json` "
              "(in this directory) holds every number of this report.", ""]  # fmt: skip
    return "\n".join(lines)


def _leakage_lines(lk: dict[str, Any]) -> list[str]:
    held = lk["held_out_docs"]
    near = (
        f"on, {lk['near_duplicates_removed']} removed"
        if lk["near_dedup"]
        else "off in this run (the overlap buckets show how much held-out text still has close matches)"
    )
    return [
        f"- **Held-out documents kept out of the database**: valid and test documents are chosen by a hash of "
        f"their id and never chunked into the database, so no model can retrieve the text it is scored on "
        f"(valid {held.get('valid', 0)}, test {held.get('test', 0)} documents; found in the database: "
        f"**{lk['held_out_docs_in_database']}**).",
        f"- **Exact duplicates removed**: identical documents are dropped before the split, so a held-out "
        f"document has no verbatim copy in the database ({lk['exact_duplicates_removed']} removed).",
        f"- **Near-duplicate removal** (MinHash): drops documents that are almost identical to another one: "
        f"{near}.",
        f"- **Same-document neighbours removed**: a training chunk's stored neighbours never come from a "
        f"document that chunk is part of, so RETRO cannot learn to copy its own document (checked over "
        f"{lk['train_windows']} training chunks: **{lk['same_document_neighbours_stored']}** found).",
        "- **Whole-sequence exclusion in training**: a neighbour is also dropped when its document appears "
        "anywhere in the training sequence being predicted.",
        "",
    ]  # fmt: skip


def _samples_section(s: dict[str, Any]) -> list[str]:
    sm, st = s["samples"], s["settings"]["sample"]
    lines = [
        "## One sample from each model",
        "",
        f"Each model continues the opening of the first long enough `{sm['split']}` document (held out: not in "
        f"the database) with nucleus sampling (p = {st['top_p']}, temperature {st['temperature']}, repetition "
        f"penalty {st['repetition_penalty']}, the same sampling seed {st['seed']} for every model).",
        "",
        "Prompt:",
        "",
        *code_block(sm["prompt"]),
        "",
        "What the document really says next:",
        "",
        *code_block(sm["reference"]),
        "",
    ]
    for name, entry in sm["samples"].items():
        lines += [f"### {name}", "", *code_block(entry["text"]), ""]
        if "chunks" not in entry:
            continue
        lines += ["What RETRO read, chunk by chunk: while writing chunk u (m tokens) it reads the neighbours "
                  "retrieved with chunk u-1; chunks made only of prompt are left out.", ""]  # fmt: skip
        for ch in entry["chunks"]:
            part = (
                f"{ch['prompt_tokens']} prompt tokens, then generated"
                if ch["prompt_tokens"]
                else "generated"
            )
            lines += [f"**Chunk {ch['chunk']}** ({part}):", "", *code_block(ch["text"]), ""]
            if not ch["read"]:
                lines += ["No neighbour was retrieved for the previous chunk.", ""]
            for j, nb in enumerate(ch["read"], 1):
                lines += [f"Neighbour {j} of {len(ch['read'])} it read (document `{nb['doc_id']}`, score "
                          f"{nb['score']:.3f}; neighbour chunk and its continuation):", "",
                          *quote_block(nb["text"]), ""]  # fmt: skip
    return lines
