"""Hostile and impatient clients on a real loopback server: deep JSON, abandoned work, a full queue."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from retrolm.serve import Engine, ServeLimits, create_app
from test_generate import tiny_model
from test_serve import running_server

pytestmark = pytest.mark.usefixtures("one_thread")
LONG = {"prompt": "otter", "max_tokens": 5000, "temperature": 0}  # minutes of greedy decoding on a CPU


@pytest.fixture(scope="module")
def engine(tiny_db):
    return Engine(tiny_model(tiny_db.vocab_size, retro=True, seed=4), tiny_db.tokenizer, tiny_db, name="tiny")


def wait_idle(url: str, seconds: float) -> None:
    t0 = time.perf_counter()
    while httpx.get(f"{url}/health", timeout=10).json()["pending"]:
        assert time.perf_counter() - t0 < seconds, "abandoned work is still running"
        time.sleep(0.05)


def test_deep_json_is_400_and_harms_nobody(engine):
    deep = b'{"prompt": "otter", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with running_server(create_app(engine=engine, limits=ServeLimits(max_tokens=5000))) as url:

        def one(i: int) -> tuple[int, str]:
            if i % 2:
                r = httpx.post(f"{url}/v1/completions", content=deep, timeout=30,
                               headers={"content-type": "application/json"})
                return r.status_code, r.json()["error"]["message"]
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "otter", "max_tokens": 4}, timeout=30)
            return r.status_code, r.text

        with ThreadPoolExecutor(4) as pool:
            out = list(pool.map(one, range(12)))
        assert all(code == 400 and "nested 5001 levels" in msg for code, msg in out[1::2])
        assert all(code == 200 for code, _ in out[0::2])
        assert httpx.get(f"{url}/health", timeout=10).json()["pending"] == 0


def test_abandoned_requests_do_not_delay_others(engine):
    with running_server(create_app(engine=engine, limits=ServeLimits(max_tokens=5000))) as url:

        def abandon(stream: bool) -> None:
            if stream:  # read one event, then hang up
                with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True},
                                  timeout=30) as r:
                    lines = r.iter_lines()
                    assert next(lines).startswith("data: {")
                return
            try:  # the client gives up after 0.5 s; httpx then closes the connection
                httpx.post(f"{url}/v1/completions", json=LONG, timeout=0.5)
            except httpx.TimeoutException:
                return
            raise AssertionError("5000 tokens in 0.5 s?")

        threads = [threading.Thread(target=abandon, args=(i == 1,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "otter", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
        assert time.perf_counter() - t0 < 3, "a 4-token request waited behind abandoned ones"
        wait_idle(url, 3)


def test_full_queue_gets_429_with_retry_after(engine):
    limits = ServeLimits(max_tokens=5000, max_pending=2)
    with running_server(create_app(engine=engine, limits=limits)) as url, httpx.Client(timeout=30) as a, \
            httpx.Client(timeout=30) as b:
        with a.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}) as running:
            lines = running.iter_lines()  # keep it: a dropped iterator closes the connection
            assert next(lines).startswith("data: {")
            with b.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}) as queued:
                assert queued.status_code == 200
                r = httpx.post(f"{url}/v1/completions", json={"prompt": "otter", "max_tokens": 2},
                               timeout=30)
                assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["type"] == "server_busy"
                assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        wait_idle(url, 3)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "otter", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
