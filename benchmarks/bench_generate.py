"""Decoding speed: plain vs retrieval-draft speculative greedy, RETRO vs GPT, server load.

    python benchmarks/bench_generate.py [--db DIR] [--retro-checkpoint DIR] [--gpt-checkpoint DIR]
        [--prompts 8] [--prompt-tokens 64] [--max-new-tokens 128] [--threads N] [--serve-load]

Prints JSON lines (including "decode_step_growth": KV-cached ms/token at 128 vs 1,024
generated tokens and their ratio). Prompts are the starts of held-out (test split) documents. Defaults:
the demo's database and checkpoints (runs/demo/db, runs/demo/**/final); else the
builtin:pydocs database at runs/pydocs-db; else it builds runs/bench-gen/db from
builtin:pydocs and trains tiny RETRO and GPT models for --train-minutes each in
runs/bench-gen (and says so in the "setup" line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _complete_db(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def _kind(checkpoint: Path) -> str | None:
    from retrolm.checkpoints import CONFIG

    try:
        cfg = json.loads((checkpoint / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return "retro" if cfg.get("cca_layers") else "gpt"


def find_setup(args) -> dict:
    """Pick (or make) the database and the two checkpoints; record where they came from."""
    notes = []
    db = Path(args.db) if args.db else None
    if db is None:
        for cand in (ROOT / "runs/demo/db", ROOT / "runs/pydocs-db"):
            if _complete_db(cand):
                db = cand
                break
    if db is None:
        from retrolm.db.database import RetrievalDB

        db = ROOT / "runs/bench-gen/db"
        notes.append("built runs/bench-gen/db from builtin:pydocs")
        RetrievalDB.build("builtin:pydocs", db)
    from retrolm.checkpoints import tokenizer_sha

    found = {"retro": args.retro_checkpoint, "gpt": args.gpt_checkpoint}
    db_tok = json.loads((db / "manifest.json").read_text())["files"]["tokenizer.json"]["sha256"]
    for kind in ("retro", "gpt"):
        if found[kind]:
            continue
        for final in sorted((ROOT / "runs/demo").glob("**/final")) + sorted(
            (ROOT / "runs/bench-gen").glob("*/final")
        ):
            if _kind(final) == kind and tokenizer_sha(final) == db_tok:
                found[kind] = str(final)
                break
        if not found[kind]:
            from retrolm.training.trainer import TrainConfig, train

            out = ROOT / "runs/bench-gen" / kind
            notes.append(f"trained tiny {kind} for {args.train_minutes} min in {out}")
            found[kind] = str(train(db, "tiny", out, TrainConfig(
                minutes=args.train_minutes, retrieval=kind == "retro", lr=3e-3, checkpoint_every=0,
                resume=True,
            )))  # fmt: skip
    return {"db": str(db), "retro": found["retro"], "gpt": found["gpt"], "notes": notes}


def bench_decoding(setup: dict, args) -> None:

    from retrolm.checkpoints import load_checkpoint
    from retrolm.db.database import RetrievalDB
    from retrolm.evaluation.degeneration import held_out_prompts
    from retrolm.generation.decode import generate

    db = RetrievalDB.open(setup["db"], verify=False)
    prompts = held_out_prompts(db, args.prompts, args.prompt_tokens, seed=0)
    texts = [db.tokenizer.decode(p) for p in prompts]
    speed = {}
    for kind in ("retro", "gpt"):
        model = load_checkpoint(setup[kind], map_location=args.device).eval()
        kw = dict(db=db, max_new_tokens=args.max_new_tokens, greedy=True, draft_len=args.draft_len)
        generate(model, db.tokenizer, texts[:1], prompt_ids=prompts[:1], **{**kw, "max_new_tokens": 8})
        modes = {"plain": {}, "speculative": {"speculative": True}}
        if kind == "retro":  # what the neighbours alone contribute
            modes["speculative_neighbours_only"] = {"speculative": True, "draft_history": False}
        agg = {mode: {"tokens": 0, "seconds": 0.0, "retrieval_s": 0.0, "steps": 0, "accepted": [],
                      "from": {"neighbours": 0, "history": 0}, "identical": True} for mode in modes}
        for text, ids in zip(texts, prompts, strict=True):  # interleaved: same load on every mode
            ref = None
            for mode, extra in modes.items():
                res = generate(model, db.tokenizer, text, prompt_ids=[ids], **kw, **extra)[0]
                a = agg[mode]
                ref = ref if ref is not None else res.token_ids
                a["identical"] &= res.token_ids == ref
                a["tokens"] += res.stats["new_tokens"]
                a["seconds"] += res.stats["seconds"]
                a["retrieval_s"] += res.stats["retrieval_seconds"]
                a["steps"] += res.stats["model_steps"]
                a["accepted"] += res.stats["accepted_lengths"]
                for key, n in res.stats["accepted_from"].items():
                    a["from"][key] += n
        plain_tps = agg["plain"]["tokens"] / agg["plain"]["seconds"]
        speed[kind] = (plain_tps, agg["plain"])
        for mode, a in agg.items():
            tps = a["tokens"] / a["seconds"]
            rec = {"bench": "decode", "model": kind, "checkpoint": setup[kind], "mode": mode,
                   "prompts": len(prompts), "new_tokens": a["tokens"], "seconds": round(a["seconds"], 3),
                   "tokens_per_s": round(tps, 1), "retrieval_seconds": round(a["retrieval_s"], 3),
                   "tokens_per_model_step": round(a["tokens"] / max(1, a["steps"]), 3)}
            if mode != "plain":
                rec.update({"speedup_vs_plain": round(tps / plain_tps, 3),
                            "mean_accepted_draft": round(sum(a["accepted"]) / max(1, len(a["accepted"])), 3),
                            "accepted_tokens_from": a["from"], "identical_to_plain_greedy": a["identical"],
                            "draft_len": args.draft_len})
            emit(rec)
    (r_tps, r), (g_tps, _) = speed["retro"], speed["gpt"]
    emit({"bench": "retro_vs_gpt_decode", "retro_tokens_per_s": round(r_tps, 1), "gpt_tokens_per_s": round(g_tps, 1),
          "retro_over_gpt_time": round(g_tps / r_tps, 3),
          "retro_tokens_per_s_excluding_search": round(r["tokens"] / (r["seconds"] - r["retrieval_s"]), 1),
          "retro_search_share": round(r["retrieval_s"] / r["seconds"], 3)})


def bench_step_growth(setup: dict, args, lengths: tuple[int, int] = (128, 1024), window: int = 32) -> None:
    """KV-cached decode time per token at 128 vs 1,024 generated tokens (how the step cost grows).

    Feeds one token per `Retro.step` (argmax, whatever it is: EOS does not stop a timing run)
    after one held-out prompt, with online retrieval for RETRO; ms/token is the mean of the
    `window` steps ending at each length.
    """
    import torch

    from retrolm.checkpoints import load_checkpoint
    from retrolm.db.database import RetrievalDB
    from retrolm.evaluation.degeneration import held_out_prompts
    from retrolm.generation.retrieval import OnlineRetriever

    db = RetrievalDB.open(setup["db"], verify=False)
    prompt = held_out_prompts(db, 1, args.prompt_tokens, seed=0)[0]
    short, long = lengths
    for kind in ("retro", "gpt"):
        model = load_checkpoint(setup[kind], map_location=args.device).eval()
        device = next(model.parameters()).device
        retriever = OnlineRetriever(db, model.config.n_neighbors, 1, device) if kind == "retro" else None
        logits, cache = model.step(torch.tensor([prompt], device=device), None, retriever)
        times = []
        for _ in range(long):
            t0 = time.perf_counter()
            logits, cache = model.step(logits[:, -1:].argmax(-1), cache, retriever)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        at = {n: 1000 * statistics.mean(times[n - window : n]) for n in lengths}
        emit({"bench": "decode_step_growth", "model": kind, "checkpoint": setup[kind],
              "prompt_tokens": len(prompt), "window": window,
              f"ms_per_token_at_{short}": round(at[short], 3), f"ms_per_token_at_{long}": round(at[long], 3),
              f"ratio_{long}_over_{short}": round(at[long] / at[short], 3),
              "retrieval_seconds": round(retriever.seconds, 3) if retriever is not None else 0.0})


def bench_serve_load(setup: dict, args) -> None:
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import uvicorn

    from retrolm.serve import Engine, ServeLimits, create_app

    engine = Engine.load(setup["retro"], setup["db"], device=args.device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine=engine, limits=ServeLimits()),
                                           host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/completions"

    def one(i: int) -> tuple[float, bool]:
        payload = {"prompt": "To open a file in Python", "max_tokens": args.serve_tokens,
                   "temperature": 0.0 if i % 2 else 0.8, "seed": i, "stream": i % 4 == 1}
        t0 = time.perf_counter()
        with httpx.Client(timeout=60) as http:
            r = http.post(url, json=payload)
        ok = r.status_code == 200 and (r.text.endswith("data: [DONE]\n\n") if payload["stream"]
                                       else "choices" in r.json())
        return time.perf_counter() - t0, ok

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(one, range(200)))
    wall = time.perf_counter() - t0
    lat = [t for t, _ in out]
    healthy = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    server.should_exit = True
    thread.join(timeout=10)
    emit({"bench": "serve_load", "model": setup["retro"], "clients": 8, "requests": 200,
          "max_tokens": args.serve_tokens, "all_ok": all(ok for _, ok in out), "healthy_after": healthy,
          "requests_per_s": round(200 / wall, 2), "p50_ms": round(statistics.median(lat) * 1000, 1),
          "p95_ms": round(statistics.quantiles(lat, n=20)[-1] * 1000, 1)})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db")
    ap.add_argument("--retro-checkpoint")
    ap.add_argument("--gpt-checkpoint")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--draft-len", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-minutes", type=float, default=4.0)
    ap.add_argument("--serve-load", action="store_true", help="also run the 8-client, 200-request load test")
    ap.add_argument("--serve-tokens", type=int, default=16)
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    setup = find_setup(args)
    emit({"bench": "setup", **setup, "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
          "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(), "device": args.device,
          "python": sys.version.split()[0], "torch": torch.__version__})
    if not args.skip_decode:
        bench_decoding(setup, args)
        bench_step_growth(setup, args)
    if args.serve_load:
        bench_serve_load(setup, args)


if __name__ == "__main__":
    main()
