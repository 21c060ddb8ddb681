"""Does a RETRO trained from scratch learn to read its neighbours, and how fast? One JSON object per line.

Run: `python benchmarks/bench_reading.py [--steps 1000] [--eval-every 250] [--seed 0] [--lr 1e-3]
[--out runs/bench_reading] [--set copy_head=false --set cca_layers=[2,4]] [--train-set bf16=true]`.

Why this corpus: on builtin:twins (random-word stories whose noisy twins only the database
holds, see docs/database.md) nothing but the neighbours predicts the next word, so a model
that reads them must end far below RETRO-off, and RETRO-shuffled (the same model fed another
sequence's neighbours) must stay up at RETRO-off. On natural text the two effects are too
small to see in a CPU budget.

Steps:
1. database `<out>/db`: builtin:twins (or --corpus), BM25, m = 32, BPE 4096, 2 stored
   neighbours, split 90/5/5 (reused when it exists with the same settings);
2. a RETRO trained from scratch with `retrolm.training.trainer.train` into `<out>/run-<hash of the
   settings>`, with a step checkpoint every --eval-every steps (an existing run with the
   same settings is reused or resumed, so a re-run only re-evaluates);
3. every checkpoint evaluated with `retrolm.evaluation.perplexity.evaluate` on the held-out valid split
   (documents never in the database): RETRO, RETRO-off and RETRO-shuffled.

Output: one `{"kind": "checkpoint", ...}` line per checkpoint (step, tokens, ppl per row,
RETRO/RETRO-off, RETRO-shuffled/RETRO), then one `{"kind": "summary", ...}` with the first
evaluated step where RETRO/RETRO-off <= 0.5 (null if never), the settings, wall time and
training tokens/s. Model overrides (`--set`, JSON values) go to `RetroConfig`, trainer
overrides (`--train-set`) to `TrainConfig`; a plain word that is not JSON is taken as a string.
`--steps` holds whatever batch size and sequence length `--train-set` gives.

Cost, measured on the 2-core AVX2 EPYC this was written on: the defaults (4 layers x 192,
encoder 1 x 96, vocab 4096, 1,000 steps of 8 x 256 tokens, fp32) run ~3,400 tokens/s with
2 threads on an idle machine (0.6 s/step: ~10 min of training for 1,000 steps) and 0.85
s/step on one thread (~14 min); the evaluation of 32 sequences x 3 rows costs a few seconds
per checkpoint, the database ~15 s once. When other jobs share the cores, 2 threads can
collapse to ~200 tokens/s (OpenMP threads waiting for each other): use `--threads 1` then.
bf16 autocast is off on purpose: on a CPU without AVX-512 BF16 it is ~10-17x SLOWER than
fp32 for training (measured here). `--train-set seq_len=128` halves the step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

RATIO_TARGET = 0.5
DB_SETTINGS: dict[str, Any] = dict(retriever="bm25", chunk_size=32, vocab_size=4096, neighbors=2,
                                   split=(90, 5, 5), seed=0)  # fmt: skip
# The demo's model family (copy head on, as in `retrolm demo`); `--set copy_head=false` is
# plain RETRO, which does not get below ~0.94 in 1,000 steps (docs/results.md).
MODEL_DEFAULTS: dict[str, Any] = dict(n_layers=4, d_model=192, n_heads=4, chunk_size=32, n_neighbors=1,
                                      enc_layers=1, enc_d_model=96, enc_heads=4, max_seq_len=256,
                                      copy_head=True, copy_match=4)  # fmt: skip
BATCH, SEQ_LEN = 8, 256


def emit(**record: Any) -> None:
    """One JSON line on stdout, flushed (the bench's only output there)."""
    print(json.dumps(record), flush=True)


def note(text: str) -> None:
    """Progress for the person watching, on stderr so stdout stays JSON lines."""
    print(text, file=sys.stderr, flush=True)


def parse_overrides(pairs: list[str], what: str, allowed: set[str]) -> dict[str, Any]:
    """`key=value` strings to a dict; values are JSON when they parse, else plain strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SystemExit(f"error: {what} {pair}: expected key=value")
        if key not in allowed:
            raise SystemExit(f"error: {what} {key}: not a field; known: {', '.join(sorted(allowed))}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def settings_hash(obj: Any) -> str:
    """Short stable hash naming a run directory, so different settings never share one."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def main() -> None:
    from retrolm.model.config import RetroConfig
    from retrolm.training.trainer import TrainConfig

    model_fields = {f.name for f in dataclasses.fields(RetroConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps (batch 8 x 256 tokens)")
    ap.add_argument("--eval-every", type=int, default=250, help="checkpoint + evaluation interval (steps)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (model init and data order)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_reading"), help="database + runs go here")
    ap.add_argument("--corpus", default="builtin:twins", help="corpus for the database")
    ap.add_argument("--split", default="valid", choices=["valid", "test"], help="held-out split to score")
    ap.add_argument("--eval-sequences", type=int, default=32,
                    help="held-out sequences scored per checkpoint (0: all; 32 x 256 tokens by default)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); 1 on a machine shared with other jobs")
    ap.add_argument("--set", dest="model_set", action="append", default=[], metavar="KEY=VALUE",
                    help="RetroConfig override, JSON value (repeatable), e.g. copy_head=true")
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                    help="TrainConfig override, JSON value (repeatable), e.g. bf16=true")
    args = ap.parse_args()
    if args.steps < 1 or args.eval_every < 1:
        raise SystemExit("error: --steps and --eval-every must be >= 1")
    model_set = parse_overrides(args.model_set, "--set", model_fields)
    train_set = parse_overrides(args.train_set, "--train-set", train_fields)

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from retrolm.db.database import RetrievalDB
    from retrolm.errors import RetrolmError
    from retrolm.evaluation.perplexity import content_gain, evaluate, find_row
    from retrolm.training import checkpointing as ckpt
    from retrolm.training.trainer import train

    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    db = RetrievalDB.build(args.corpus, args.out / "db", progress=False, **DB_SETTINGS)
    db_s = time.perf_counter() - t0
    note(f"database {db.path}: {db.manifest['counts']['train']['chunks']} chunks ({db_s:.1f} s)")

    try:
        config = RetroConfig.from_dict({**MODEL_DEFAULTS, "vocab_size": db.vocab_size, **model_set})
    except RetrolmError as err:
        raise SystemExit(f"error: {err}") from None
    tcfg = dict(seq_len=SEQ_LEN, batch_size=BATCH, lr=args.lr, seed=args.seed, checkpoint_every=args.eval_every,
                keep_checkpoints=args.steps // args.eval_every + 1, k=config.n_neighbors, bf16=False,
                progress=False, device="cpu")  # fmt: skip
    tcfg.update(train_set)
    tcfg.setdefault("tokens", args.steps * tcfg["batch_size"] * tcfg["seq_len"])  # --steps whatever the batch
    cfg = TrainConfig(**tcfg)
    run_dir = args.out / f"run-{settings_hash([config.to_dict(), cfg.to_dict(), args.corpus])}"
    cfg.resume = True  # same settings -> same directory: reuse a finished run, resume a killed one
    reused = (run_dir / "final" / "trainer_state.json").is_file()
    note(f"training into {run_dir} ({'reused' if reused else f'{args.steps} steps'}) ...")
    t0 = time.perf_counter()
    final = train(db.path, config, run_dir, cfg)
    train_wall_s = time.perf_counter() - t0
    state = ckpt.read_trainer_state(final)
    steps, tokens, train_s = int(state["step"]), int(state["tokens_seen"]), float(state["elapsed_s"])

    dirs = [path for step, path in ckpt.list_checkpoints(run_dir) if step % args.eval_every == 0 or step == steps]
    first_hit, eval_s, curve = None, 0.0, []
    for path in dirs:
        t0 = time.perf_counter()
        res = evaluate(db, [path], split=args.split, k=config.n_neighbors, rag=False,
                       max_sequences=args.eval_sequences or None)  # fmt: skip
        eval_s += time.perf_counter() - t0
        step_state = ckpt.read_trainer_state(path)
        gain = content_gain(res)
        ppl = {name: find_row(res, name)["ppl"] for name in ("RETRO", "RETRO-off", "RETRO-shuffled")}
        step = int(step_state["step"])
        record = dict(kind="checkpoint", step=step, tokens=int(step_state["tokens_seen"]),
                      ppl={k: round(v, 3) for k, v in ppl.items()},
                      retro_over_off=round(gain["retro_over_off"], 4),
                      shuffled_over_retro=round(gain["shuffled_over_retro"], 4),
                      split=args.split, eval_tokens=res["tokens"])  # fmt: skip
        emit(**record)
        curve.append(record)
        if first_hit is None and gain["retro_over_off"] <= RATIO_TARGET:
            first_hit = step

    emit(kind="summary", steps_until_retro_over_off_le_0_5=first_hit, target_ratio=RATIO_TARGET,
         final_retro_over_off=curve[-1]["retro_over_off"] if curve else None,
         final_shuffled_over_retro=curve[-1]["shuffled_over_retro"] if curve else None,
         steps=steps, tokens=tokens, reused_run=reused, run_dir=str(run_dir),
         wall_s=round(time.perf_counter() - t_start, 1), db_s=round(db_s, 1),
         train_s=round(train_s, 1), train_wall_s_this_call=round(train_wall_s, 1), eval_s=round(eval_s, 1),
         train_tokens_per_s=round(tokens / train_s, 1) if train_s else None,
         model_config=config.to_dict(), model_overrides=model_set, train_config=cfg.to_dict(),
         train_overrides=train_set, database={"path": str(db.path), "corpus": args.corpus, **DB_SETTINGS},
         machine={"python": platform.python_version(), "cores": os.cpu_count(),
                  "torch_threads": torch.get_num_threads(), "torch": torch.__version__})  # fmt: skip


if __name__ == "__main__":
    main()
