"""The demo's stages: database, plan, training, evaluation, samples, then the report.

Each stage reuses what an earlier invocation into the same directory finished.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrolm.atomic import atomic_path, sha256_file, write_json
from retrolm.demo.numbers import comparison, verdict
from retrolm.demo.report import plot_buckets, plot_curves, render_report
from retrolm.demo.settings import RETRO_TIME_RATIO, DemoSettings, SampleSettings, resolve_settings
from retrolm.errors import RetrolmError

if TYPE_CHECKING:
    from retrolm.db.database import RetrievalDB
    from retrolm.generation.retrieval import ChunkRetrieval
    from retrolm.model.config import RetroConfig


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


@dataclass
class _Invocation:
    """What the stages of one `run_demo` call share: settings, run directory, bookkeeping."""

    st: DemoSettings
    out: Path
    seeds: int
    progress: bool
    t0: float  # time.time() at the start of the invocation
    timings: dict[str, Any]  # <out>/timings.json: wall time per stage, kept across invocations
    now: dict[str, bool] = field(default_factory=dict)  # stage -> ran in this invocation

    @property
    def timings_path(self) -> Path:
        return self.out / "timings.json"


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
    t0 = time.time()
    _check_arguments(minutes, tokens, seeds)
    st = resolve_settings(tiny, corpus, retriever, tokens, train_overrides, model_overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inv = _Invocation(st, out, seeds, progress, t0, _read_timings(out))
    db, db_reused = _database_stage(inv)
    config, plan = _plan_stage(inv, db, minutes)
    seed_runs = [run_dirs(out, s) for s in range(seeds)]
    states = _training_stage(inv, db, config, plan, seed_runs)
    cache = _read_eval_cache(out)
    common = {"k": int(st.train["k"]), "splits": list(st.eval_splits), "code": _code_version(),
              "db": db.manifest["files"]["tokenizer.json"]["sha256"]}  # fmt: skip
    per_seed = _evaluation_stage(inv, db, seed_runs, cache, common)
    samples = _samples_stage(inv, db, seed_runs[0], cache, common)
    table = comparison(per_seed)
    curves, buckets_png = _plots(inv, table, per_seed, states, seed_runs)
    wall = time.time() - t0
    if not db_reused and "first_run_s" not in inv.timings:
        inv.timings["first_run_s"] = round(wall, 1)
    inv.timings["last_invocation_s"] = round(wall, 1)
    write_json(inv.timings_path, inv.timings)
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
        "headline_split": st.eval_splits[0],
        "comparison": table,
        "leakage": leakage_controls(db),
        "training_signal": training_signal(db, int(st.train["seq_len"]), int(st.train["k"])),
        "samples": samples,
        "loss_curves": curves.name if curves else None,
        "overlap_plot": buckets_png.name if buckets_png else None,
        "timings": inv.timings,
        "this_invocation": inv.now,
    }  # fmt: skip
    return _write_report(out, summary, wall)


def _check_arguments(minutes: float | None, tokens: int | None, seeds: int) -> None:
    if minutes is not None and tokens is not None:
        raise RetrolmError("give --tokens or --minutes, not both")
    if minutes is not None and minutes <= 0:
        raise RetrolmError(f"--minutes must be > 0, got {minutes}")
    if tokens is not None and tokens <= 0:
        raise RetrolmError(f"--tokens must be > 0, got {tokens}")
    if seeds < 1:
        raise RetrolmError(f"--seeds must be >= 1, got {seeds}")


def _read_timings(out: Path) -> dict[str, Any]:
    """The stage timings of earlier invocations (per-invocation entries dropped)."""
    path = out / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings = {k: v for k, v in timings.items() if k in ("database_s", "train_s", "eval_s", "samples_s",
                                                         "first_run_s")}  # fmt: skip
    timings.setdefault("train_s", {})
    timings.setdefault("eval_s", {})
    return timings


def _database_stage(inv: _Invocation) -> tuple[RetrievalDB, bool]:
    """1. The database (reused when complete); returns it and whether it was reused."""
    from retrolm.db.database import RetrievalDB

    st, out = inv.st, inv.out
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
    db = RetrievalDB.build(spec, db_dir, progress=inv.progress, retriever=st.retriever, overwrite=True,
                           **{**st.db, "split": tuple(st.db["split"])})  # fmt: skip
    db_reused = before is not None and manifest.stat().st_mtime_ns == before
    log(
        "reusing the complete database"
        if db_reused
        else f"database built in {time.time() - t:.0f} s"
    )
    if not db_reused:
        inv.timings["database_s"] = round(time.time() - t, 1)
    inv.now["database"] = not db_reused
    return db, db_reused


def _plan_stage(
    inv: _Invocation, db: RetrievalDB, minutes: float | None
) -> tuple[RetroConfig, dict[str, Any]]:
    """2. The model config and the budget plan (stored: a re-run keeps it)."""
    from retrolm.model.config import RetroConfig

    st = inv.st
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
        left = minutes - (time.time() - inv.t0) / 60 - st.eval_reserve_minutes
        gpt_minutes = max(0.5, left / inv.seeds / (1 + RETRO_TIME_RATIO))
        if gpt_minutes == 0.5:
            log(
                f"only {max(left, 0):.1f} min left after the database: training each GPT for 0.5 min anyway"
            )
        return {"gpt_budget": {"minutes": round(gpt_minutes, 3)}}

    return config, _plan(inv.out, key, make)


def _training_stage(
    inv: _Invocation, db: RetrievalDB, config: RetroConfig, plan: dict[str, Any],
    seed_runs: list[dict[str, Path]],
) -> list[dict[str, dict[str, Any]]]:  # fmt: skip
    """3. Per seed a GPT and a RETRO on the same tokens (the seed-0 GPT's count)."""
    states: list[dict[str, dict[str, Any]]] = []
    budget = dict(plan["gpt_budget"])
    for s, runs in enumerate(seed_runs):
        settings = {**inv.st.train, "seed": s}
        states.append({})
        for name in ("GPT", "RETRO"):
            t = time.time()
            state, ran = _train(
                db, config, runs[name], settings, name == "RETRO", budget, inv.progress
            )
            states[s][name] = state
            label = f"{name} seed {s}"
            if ran:
                inv.timings["train_s"][label] = round(time.time() - t, 1)
            inv.now[f"train {label}"] = ran
            budget = {
                "tokens": int(states[0]["GPT"]["tokens_seen"])
            }  # everything after: the same tokens
        write_json(inv.timings_path, inv.timings)
    return states


def _read_eval_cache(out: Path) -> dict[str, Any]:
    """<out>/eval_cache.json: evaluations and samples under the checkpoints' weights and code."""
    path = out / "eval_cache.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if "entries" not in cache:
        cache = {"entries": {}}
    return cache


def _evaluation_stage(
    inv: _Invocation, db: RetrievalDB, seed_runs: list[dict[str, Path]], cache: dict[str, Any],
    common: dict[str, Any],
) -> list[dict[str, Any]]:  # fmt: skip
    """4. Every seed on the held-out splits (the first is the headline), cached."""
    from retrolm.checkpoints import FINAL, WEIGHTS
    from retrolm.evaluation.perplexity import evaluate

    per_seed: list[dict[str, Any]] = []
    for s, runs in enumerate(seed_runs):
        finals = [runs["GPT"] / FINAL, runs["RETRO"] / FINAL]
        entry_key = {**common, "weights": [sha256_file(f / WEIGHTS) for f in finals]}
        entry = cache["entries"].get(f"seed {s}")
        if entry is not None and entry.get("key") == entry_key:
            log(f"reusing the evaluation of the seed-{s} checkpoints (eval_cache.json)")
            inv.now[f"eval seed {s}"] = False
        else:
            t = time.time()
            entry = {
                "key": entry_key,
                "eval": {sp: evaluate(db, finals, split=sp, k=common["k"]) for sp in inv.st.eval_splits},
            }
            cache["entries"][f"seed {s}"] = entry
            write_json(inv.out / "eval_cache.json", cache)
            inv.timings["eval_s"][f"seed {s}"] = round(time.time() - t, 1)
            inv.now[f"eval seed {s}"] = True
        per_seed.append(entry["eval"])
    return per_seed


def _samples_stage(
    inv: _Invocation, db: RetrievalDB, runs: dict[str, Path], cache: dict[str, Any],
    common: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """5. One sampled continuation per model (seed 0's `runs`), cached the same way."""
    st = inv.st
    sample_key = {
        **common,
        "weights": cache["entries"]["seed 0"]["key"]["weights"],
        "sample": asdict(st.sample),
    }
    if cache.get("samples", {}).get("key") == sample_key:
        inv.now["samples"] = False
        return cache["samples"]["samples"]
    t = time.time()
    samples = sample_generations(db, runs, st.eval_splits[0], st.sample, common["k"])
    cache["samples"] = {"key": sample_key, "samples": samples}
    write_json(inv.out / "eval_cache.json", cache)
    inv.timings["samples_s"] = round(time.time() - t, 1)
    inv.now["samples"] = True
    return samples


def _plots(
    inv: _Invocation, table: dict[str, Any], per_seed: list[dict[str, Any]],
    states: list[dict[str, dict[str, Any]]], seed_runs: list[dict[str, Path]],
) -> tuple[Path | None, Path | None]:  # fmt: skip
    """6a. Loss curves and the overlap plot (None where there is nothing to draw)."""
    from retrolm.evaluation.perplexity import find_row

    headline = inv.st.eval_splits[0]
    curve_split = "valid" if "valid" in per_seed[0] else headline
    points = {}
    for name in ("GPT", "RETRO"):
        row = find_row(per_seed[0][curve_split], name)
        if row:
            points[name] = (float(states[0][name]["tokens_seen"]), float(row["loss"]))
    curves = plot_curves(seed_runs, points, curve_split, inv.out / "loss_curves.png")
    buckets_png = plot_buckets(table[headline], headline, inv.out / "overlap_bpb.png")
    return curves, buckets_png


def _write_report(out: Path, summary: dict[str, Any], wall: float) -> dict[str, Any]:
    """6b. The verdict, results.json and report.md; returns the completed summary."""
    summary["verdict"] = verdict(summary)
    write_json(out / "results.json", summary)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(render_report(summary), encoding="utf-8")
    log(f"report: {out / 'report.md'} ({wall:.0f} s this run)")
    return summary
