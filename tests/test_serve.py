"""The HTTP server: endpoints, SSE format, stop strings, limits, malformed requests, load."""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from retrolm.generation.decode import generate
from retrolm.serve import Engine, ServeLimits, create_app
from test_generate import tiny_model

LIMITS = ServeLimits(max_prompt_tokens=64, max_tokens=48, max_body_bytes=8192, max_retrieve_k=8)
PROMPT = "The grey otter number 3 lives near the river. It hunts fish at dawn by the"


@pytest.fixture(scope="module")
def engine(tiny_db):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine(tiny_model(tiny_db.vocab_size, retro=True, seed=4), tiny_db.tokenizer, tiny_db, name="tiny")
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(create_app(engine=engine, limits=LIMITS))


def sse_events(response) -> list[str]:
    """The payloads of a server-sent event stream; checks the `data: ...` framing."""
    body = response.read().decode() if hasattr(response, "read") else response.text
    assert body.endswith("data: [DONE]\n\n")
    blocks = body.split("\n\n")
    assert blocks[-1] == ""
    payloads = []
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        payloads.append(block[len("data: ") :])
    return payloads


def stream_text(client, payload) -> tuple[str, str | None, list[dict]]:
    with client.stream("POST", "/v1/completions", json={**payload, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_events(r)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["text"] for c in chunks)
    return text, chunks[-1]["choices"][0]["finish_reason"], chunks


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["kind"] == "retro" and body["database"]


def test_completion_equals_library_greedy(client, engine):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = generate(engine.model, engine.tokenizer, PROMPT, db=engine.db, max_new_tokens=20, greedy=True)[0]
    choice = body["choices"][0]
    assert choice["text"] == ref.text and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ref.prompt_ids), "completion_tokens": 20,
                             "total_tokens": len(ref.prompt_ids) + 20}
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")


def test_stream_matches_non_stream(client):
    payload = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0.8, "top_p": 0.9, "seed": 3}
    plain = client.post("/v1/completions", json=payload).json()["choices"][0]
    text, finish, chunks = stream_text(client, payload)
    assert text == plain["text"] and finish == plain["finish_reason"] == "length"
    assert len(chunks) > 2  # really streamed, token by token


def test_seed_reproducible(client):
    payload = {"prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "seed": 11}
    a = client.post("/v1/completions", json=payload).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json=payload).json()["choices"][0]["text"]
    c = client.post("/v1/completions", json={**payload, "seed": 12}).json()["choices"][0]["text"]
    assert a == b != c


def test_stop_strings(client):
    payload = {"prompt": PROMPT, "max_tokens": 40, "temperature": 1.0, "seed": 5}
    full = client.post("/v1/completions", json=payload).json()["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip()
    cut = client.post("/v1/completions", json={**payload, "stop": stop}).json()["choices"][0]
    assert cut["text"] == full[: full.find(stop)] and cut["finish_reason"] == "stop"
    text, finish, chunks = stream_text(client, {**payload, "stop": [stop, "zzzz"]})
    assert text == cut["text"] and finish == "stop"
    assert all(stop not in c["choices"][0]["text"] for c in chunks)


def test_retrieve(client, tiny_db):
    r = client.post("/v1/retrieve", json={"text": "The otter hunts fish at dawn", "k": 3})
    assert r.status_code == 200, r.text
    hits = r.json()["data"]
    assert len(hits) == 3 and all({"chunk_id", "doc_id", "score", "text", "continuation"} <= h.keys()
                                  for h in hits)
    assert hits == tiny_db.search("The otter hunts fish at dawn", 3)
    assert client.post("/v1/retrieve", json={"text": "x", "k": 99}).status_code == 400


def test_return_retrieval(client):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 20, "temperature": 0,
                                              "return_retrieval": True})
    rec = r.json()["choices"][0]["retrieval"]
    assert [x["chunk_index"] for x in rec][:1] == [0] and len(rec[0]["neighbours"]) == 2


@pytest.mark.parametrize(
    "body, status, match",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"max_tokens": 4}', 400, "prompt"),
        (b'{"prompt": 5}', 400, "prompt"),
        (b'{"prompt": "hi", "max_tokens": "5"}', 400, "max_tokens"),
        (b'{"prompt": "hi", "max_tokens": true}', 400, "max_tokens"),
        (b'{"prompt": "hi", "max_tokens": -1}', 400, "max_tokens"),
        (b'{"prompt": "hi", "max_tokens": 49}', 400, "at most 48"),
        (b'{"prompt": "hi", "temperature": "hot"}', 400, "temperature"),
        (b'{"prompt": "hi", "temperature": -1}', 400, "temperature"),
        (b'{"prompt": "hi", "top_p": 0}', 400, "top_p"),
        (b'{"prompt": "hi", "stream": "yes"}', 400, "stream"),
        (b'{"prompt": "hi", "stop": 3}', 400, "stop"),
        (b'{"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', 400, "at most 4"),
        (b'{"prompt": "hi", "n": 0}', 400, "n"),
        (b'{"prompt": "hi", "n": 40}', 400, "the limit is 32"),
        (b'{"prompt": "hi", "logprobs": 21}', 400, "logprobs: at most 20"),
        (b'{"prompt": [1, 99999]}', 400, "token ids must be in"),
        (b'{"prompt": [[]]}', 400, "must not be empty"),
        (b'{"prompt": []}', 400, "prompt"),
        (b'{"prompt": [1, true]}', 400, "prompt"),
        (b'{"prompt": "hi", "stop": ' + b"[" * 4000 + b"]" * 4000 + b"}", 400, "nested 4001 levels"),
        (b'{"prompt": "hi", "user": ' + b"{" * 50 + b"}" * 50 + b"}", 400, "nested"),
        (b'{"prompt": "hi", "seed": -3}', 400, "seed"),
        (b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
        (b'{"prompt": "\\ud800 otter"}', 400, "surrogate"),
        (b'{"prompt": "hi", "stop": ["\\udfff"]}', 400, "surrogate"),
        (b'{"prompt": "hi", "repetition_penalty": 1e-300}', 400, "repetition_penalty"),
        (json.dumps({"prompt": "otter " * 100}).encode(), 400, "limit is 64"),
        (json.dumps({"prompt": "x" * 9000}).encode(), 413, "8192 bytes"),
    ],
)
def test_malformed_requests_get_4xx(client, body, status, match):
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert match in message and "\n" not in message


def test_tiny_temperature_is_greedy(client):
    greedy = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    tiny = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 1e-300})
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_other_errors_are_json_4xx(client):
    assert client.get("/v1/completions").status_code == 405
    r = client.get("/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = client.post("/v1/retrieve", json={"text": 3})
    assert r.status_code == 400 and "text" in r.json()["error"]["message"]


def test_gpt_server_has_no_retrieve(tiny_db):
    engine = Engine(tiny_model(tiny_db.vocab_size, retro=False), tiny_db.tokenizer, None)
    gpt = TestClient(create_app(engine=engine, limits=LIMITS))
    assert gpt.post("/v1/retrieve", json={"text": "otter"}).status_code == 400
    r = gpt.post("/v1/completions", json={"prompt": "", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


# ------------------------------------------------------------------------------ load test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app):
    """Serve `app` with uvicorn on a free loopback port in a thread; yield its base URL."""
    import uvicorn

    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_load_on_loopback(engine):
    limits = ServeLimits(max_prompt_tokens=64, max_tokens=5000)
    with running_server(create_app(engine=engine, limits=limits)) as url:
        n_clients, n_requests = 8, 48  # benchmarks/bench_serve.py runs 200 with hostile ones

        def one(i: int) -> float:
            payload = {"prompt": f"The otter number {i} lives near the", "max_tokens": 6,
                       "temperature": 0 if i % 3 == 0 else 0.9, "seed": i, "stream": i % 4 == 1}
            t0 = time.perf_counter()
            with httpx.Client(timeout=30.0) as http:
                r = http.post(f"{url}/v1/completions", json=payload)
            assert r.status_code == 200, r.text
            if payload["stream"]:
                assert r.text.endswith("data: [DONE]\n\n")
                chunks = [json.loads(b[6:]) for b in r.text.split("\n\n")[:-2]]
                assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
            else:
                body = r.json()
                assert body["usage"]["completion_tokens"] <= 6
                assert isinstance(body["choices"][0]["text"], str)
            return time.perf_counter() - t0

        t0 = time.perf_counter()
        with ThreadPoolExecutor(n_clients) as pool:
            latencies = list(pool.map(one, range(n_requests), timeout=120))
        wall = time.perf_counter() - t0
        assert len(latencies) == n_requests and wall < 120
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 200 and health.json()["pending"] == 0

        # a streaming client that hangs up stops its (long) generation at once
        t_drop = time.perf_counter()
        with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                          json={"prompt": "otter", "max_tokens": 5000, "temperature": 0,
                                "stream": True}) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: {")
        while httpx.get(f"{url}/health", timeout=10).json()["pending"]:
            # 5000 greedy tokens (a loop, no EOS) take far longer than 3 s on a CPU
            assert time.perf_counter() - t_drop < 3, "generation kept running after the client left"
            time.sleep(0.05)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "otter", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        p95 = statistics.quantiles(latencies, n=20)[-1]
        print(f"\nload test: {n_requests} requests, {n_clients} clients, {n_requests / wall:.1f} req/s, "
              f"p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")


def test_model_name_defaults_to_checkpoint_directory(tmp_path, tiny_db, tiny_db_path):
    from retrolm.serve.engine import default_model_name

    ckpt = tmp_path / "otters" / "final"
    tiny_model(tiny_db.vocab_size, retro=False).save_pretrained(str(ckpt))
    assert default_model_name(ckpt) == "otters/final" and default_model_name(tmp_path / "step_9") == "step_9"
    named = TestClient(create_app(ckpt, tiny_db_path, LIMITS, model_name="my-otter"))
    assert [m["id"] for m in named.get("/v1/models").json()["data"]] == ["my-otter"]
    r = named.post("/v1/completions", json={"prompt": "otter", "max_tokens": 2, "model": "anything"})
    assert r.status_code == 200 and r.json()["model"] == "my-otter"
