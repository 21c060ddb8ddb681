"""The HTTP server under load and under lm-evaluation-harness, on loopback only.

    python benchmarks/bench_serve.py [--checkpoint DIR --db DIR] [--load] [--lm-eval]
        [--requests 200] [--concurrency 8] [--threads 1]

Prints JSON lines. Model: --checkpoint/--db, else the demo's (runs/demo/retro/final +
runs/demo/db), else a random tiny RETRO over a BM25 database of the test suite's
synthetic corpus built in a temporary directory (speed figures only; scores are chance).

--load: N mixed requests from C concurrent clients: plain, sampled, streamed, n=2, list
and token-id prompts, logprobs + echo scoring, and hostile ones (5,000-level nested
`stop`, malformed JSON, wrong types, a 300 KB body, an unknown path). Passes when no
answer is a 5xx, every valid request gets 200 with no connection error, every hostile one
a 4xx, and /health answers afterwards.

--lm-eval: EleutherAI lm-evaluation-harness, model `local-completions` pointed at the
server (tokenizer_backend=remote: the server's /tokenize), on the two tasks kept in
benchmarks/lm_eval/ (a multiple-choice loglikelihood task and a generate_until task;
no downloads). Needs `pip install lm-eval`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = Path(__file__).resolve().parent / "lm_eval"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def load_engine(args):
    """The Engine to serve and a note on where it came from."""
    from retrolm.serve import Engine

    ckpt, db = args.checkpoint, args.db
    if ckpt is None and (ROOT / "runs/demo/retro/final").is_dir():
        ckpt, db = ROOT / "runs/demo/retro/final", ROOT / "runs/demo/db"
    if ckpt is not None:
        return Engine.load(ckpt, db, name="retrolm-demo"), f"checkpoint {ckpt}, database {db}"
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_corpus_dir
    from retrolm.db.database import RetrievalDB
    from retrolm.model.config import RetroConfig
    from retrolm.model.retro import Retro

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    database = RetrievalDB.build(str(make_corpus_dir(tmp)), tmp / "db", retriever="bm25", chunk_size=16,
                                 vocab_size=512, neighbors=2, seed=0, progress=False)
    model = Retro(RetroConfig.from_name("tiny", vocab_size=database.vocab_size, chunk_size=16)).eval()
    return Engine(model, database.tokenizer, database, name="retrolm-tiny"), "random tiny RETRO, synthetic corpus"


@contextlib.contextmanager
def serving(engine, limits):
    """uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    import uvicorn

    from retrolm.serve import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine=engine, limits=limits), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# ------------------------------------------------------------------------------ load test

PROMPTS = ["To open a file in Python", "The function returns", "import numpy as np\n", "class Config:"]
DEEP = b'{"prompt": "x", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}"


def request_mix(i: int, ids: list[int]) -> tuple[str, str, dict]:
    """(kind, path, httpx keyword arguments) of request i: ~1 in 5 is hostile."""
    prompt = PROMPTS[i % len(PROMPTS)]
    base = {"prompt": prompt, "max_tokens": 8, "seed": i}
    hostile = {
        0: ("deep_json", "/v1/completions", {"content": DEEP}),
        1: ("malformed", "/v1/completions", {"content": b'{"prompt": "x", '}),
        2: ("wrong_type", "/v1/completions", {"json": {"prompt": "x", "max_tokens": "8"}}),
        3: ("huge_body", "/v1/completions", {"content": b'{"prompt": "' + b"x" * 300_000 + b'"}'}),
        4: ("unknown_path", "/v1/nothing", {"json": base}),
    }
    if i % 5 == 4:
        return hostile[(i // 5) % 5]
    valid = [
        ("greedy", {**base, "temperature": 0}),
        ("sampled", {**base, "temperature": 0.8, "top_p": 0.9}),
        ("stream", {**base, "stream": True, "stream_options": {"include_usage": True}}),
        ("n2_list", {**base, "prompt": [prompt, PROMPTS[0]], "n": 2, "max_tokens": 4}),
        ("token_ids", {**base, "prompt": [ids], "temperature": 0}),
        ("score_echo", {"prompt": prompt + " and returns a list", "max_tokens": 0, "echo": True,
                        "logprobs": 1, "user": "bench"}),
    ]
    kind, body = valid[random.Random(i).randrange(len(valid))]
    return kind, "/v1/completions", {"json": body}


def one_request(url: str, i: int, ids: list[int]) -> dict:
    import httpx

    kind, path, kw = request_mix(i, ids)
    headers = {"content-type": "application/json"}
    t0 = time.perf_counter()
    try:
        with httpx.Client(timeout=120) as http:
            r = http.post(url + path, headers=headers, **kw)
            status, ok_body = r.status_code, True
            if status == 200:
                ok_body = r.text.endswith("data: [DONE]\n\n") if kind == "stream" else "choices" in r.json()
    except httpx.TransportError as err:
        status, ok_body = f"{type(err).__name__}", False
    return {"kind": kind, "hostile": i % 5 == 4, "status": status, "ok_body": ok_body,
            "seconds": time.perf_counter() - t0}


def bench_load(engine, note: str, args) -> dict:
    import httpx

    from retrolm.serve import ServeLimits

    ids = engine.tokenizer.encode(PROMPTS[0])
    with serving(engine, ServeLimits()) as url:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            out = list(pool.map(lambda i: one_request(url, i, ids), range(args.requests)))
        wall = time.perf_counter() - t0
        health = httpx.get(f"{url}/health", timeout=10).json()
    valid = [o for o in out if not o["hostile"]]
    hostile = [o for o in out if o["hostile"]]
    lat = sorted(o["seconds"] for o in valid)
    record = {
        "bench": "serve_load", "model": note, "requests": len(out), "concurrency": args.concurrency,
        "valid": len(valid), "hostile": len(hostile), "wall_s": round(wall, 1),
        "requests_per_s": round(len(out) / wall, 2),
        "valid_p50_ms": round(statistics.median(lat) * 1000, 1),
        "valid_p95_ms": round(statistics.quantiles(lat, n=20)[-1] * 1000, 1),
        "hostile_p50_ms": round(statistics.median(o["seconds"] for o in hostile) * 1000, 1),
        "status_counts": dict(sorted({str(s): sum(str(o["status"]) == str(s) for o in out)
                                      for s in {o["status"] for o in out}}.items())),
        "server_errors_5xx": sum(isinstance(o["status"], int) and o["status"] >= 500 for o in out),
        "valid_not_200": sum(o["status"] != 200 or not o["ok_body"] for o in valid),
        "hostile_not_4xx": [o["kind"] for o in hostile
                            if not (isinstance(o["status"], int) and 400 <= o["status"] < 500)],
        "healthy_after": health["status"] == "ok" and health["pending"] == 0,
    }
    record["passed"] = (record["server_errors_5xx"] == 0 and record["valid_not_200"] == 0
                        and not record["hostile_not_4xx"] and record["healthy_after"])
    return record


# ----------------------------------------------------------------------------- lm-eval


def bench_lm_eval(engine, note: str, args) -> dict:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from lm_eval import simple_evaluate
    from retrolm.serve import ServeLimits

    with serving(engine, ServeLimits()) as url:
        cwd = os.getcwd()
        os.chdir(TASKS)  # the task YAMLs name their JSONL files relative to this folder
        try:
            t0 = time.perf_counter()
            results = simple_evaluate(
                model="local-completions",
                model_args=f"model={engine.name},base_url={url}/v1/completions,tokenizer_backend=remote,"
                           "tokenized_requests=True,num_concurrent=1,max_retries=1,max_length=1024",
                tasks=["retrolm_pydoc_mc", "retrolm_pydoc_complete"],
                task_manager=TaskManager(include_path=str(TASKS)),
                random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
                log_samples=True,
            )
            seconds = time.perf_counter() - t0
        finally:
            os.chdir(cwd)
    print(make_table(results), file=sys.stderr, flush=True)
    scores = {task: {k: v for k, v in res.items() if isinstance(v, float)}
              for task, res in results["results"].items()}
    mc, gen = results["samples"]["retrolm_pydoc_mc"], results["samples"]["retrolm_pydoc_complete"]
    return {"bench": "lm_eval", "model": note, "tasks": scores, "seconds": round(seconds, 1),
            "n_samples": results.get("n-samples"),
            "loglikelihood_max_abs_diff_vs_in_process": max_loglikelihood_diff(engine, mc),
            "generations": [{"prompt": g["doc"]["prompt"], "output": g["filtered_resps"][0]} for g in gen[:4]],
            "table": make_table(results)}


def max_loglikelihood_diff(engine, samples: list[dict]) -> float:
    """lm-eval's loglikelihoods (over HTTP) against the same sums computed in-process."""
    from retrolm.serve.logprobs import TokenLogprobs

    tok, worst = engine.tokenizer, 0.0
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            whole, ctx = tok.encode(context + continuation), tok.encode(context)
            scores = TokenLogprobs(engine, 1)
            scores.feed(whole)
            worst = max(worst, abs(sum(scores.logprobs[len(ctx):]) - resp[0][0]))
    return worst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--db")
    ap.add_argument("--load", action="store_true")
    ap.add_argument("--lm-eval", action="store_true")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    engine, note = load_engine(args)
    if args.load or not args.lm_eval:
        emit(bench_load(engine, note, args))
    if args.lm_eval:
        emit(bench_lm_eval(engine, note, args))


if __name__ == "__main__":
    main()
