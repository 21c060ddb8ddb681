"""`<out>/report.md` and its plots, written from the demo summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from retrolm.atomic import atomic_path
from retrolm.demo.numbers import corpus_case
from retrolm.demo.settings import MIN_EFFECT, MODELS, RATIOS

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
